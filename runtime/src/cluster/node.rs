//! A cluster node: the QUIC transport, membership and failure detection,
//! and a stream of events for people and scripts.
//!
//! ```text
//!   seeds ──dial──▶ Transport (mTLS QUIC) ──events──▶ node loop ──▶ Membership core
//!                        ▲                               │  ticks (every TICK_MS)
//!                        └──────── frames (NodeMsg) ◀────┘──▶ stdout: one JSON event per line
//! ```
//!
//! The node prints one JSON object per line on stdout (`listening`,
//! `peer_up`, `peer_down`, `down`, `view`, `quorum_lost`, `stopped`), each with
//! `node` and `t_ms` (milliseconds since the Unix epoch, so a driver can
//! measure detection time against the moment it killed a process), and logs
//! for people on stderr.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phalanx_transport::certs::NodeIdentity;
use phalanx_transport::{Limits, Transport, TransportConfig, TransportEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::membership::{DetectorConfig, Membership, MembershipCommand, MembershipMsg};
use crate::error::Error;

/// How often the node loop advances the membership clock.
const TICK_MS: u64 = 20;
/// Delay before re-dialling a seed that did not answer.
const REDIAL_MS: u64 = 200;

/// What a node needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (must match its certificate, `node-<id>`).
    pub id: u32,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory with `ca.pem` and `node-<id>.pem`/`.key` (see `phalanx certs`).
    pub certs: PathBuf,
    /// Addresses of the other members.
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// Configured cluster size; members are nodes `0..nodes`. Default: seeds + 1.
    #[serde(default)]
    pub nodes: Option<u32>,
    /// Where the node keeps its state (checkpoint copies).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Failure-detector settings.
    #[serde(default)]
    pub detector: DetectorConfig,
}

impl NodeConfig {
    /// The configured members: `0..nodes`.
    pub fn members(&self) -> u32 {
        self.nodes.unwrap_or(self.seeds.len() as u32 + 1)
    }

    /// Check what can be checked before binding.
    pub fn validate(&self) -> Result<(), Error> {
        let field = |f: &str, reason: String| Err(Error::Field { field: f.into(), reason });
        if self.id >= self.members() {
            return field(
                "id",
                format!(
                    "node {} is not a member of a {}-node cluster (ids 0..{})",
                    self.id,
                    self.members(),
                    self.members()
                ),
            );
        }
        if self.detector.heartbeat_ms == 0 || self.detector.failure_timeout_ms <= self.detector.heartbeat_ms {
            return field("detector", "failure_timeout_ms must exceed heartbeat_ms, and both be positive".into());
        }
        Ok(())
    }
}

/// What nodes say to each other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// Membership: heartbeats and views.
    Membership(MembershipMsg),
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Print one event line on stdout.
fn emit(node: u32, event: &str, mut fields: serde_json::Value) {
    if let Some(map) = fields.as_object_mut() {
        map.insert("event".into(), event.into());
        map.insert("node".into(), node.into());
        map.insert("t_ms".into(), unix_ms().into());
    }
    println!("{fields}");
}

/// Run a node until `shutdown` resolves.
pub async fn run_node(config: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    config.validate()?;
    let identity = NodeIdentity::load(&config.certs, config.id)
        .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?;
    let limits = Limits::default();
    let (transport, mut events) = Transport::bind(TransportConfig::new(identity, config.listen))
        .await
        .map_err(|e| Error::Field { field: "listen".into(), reason: format!("{}: {e}", config.listen) })?;
    let me = config.id;
    let addr = transport.local_addr();
    tracing::info!(node = me, %addr, "listening");
    eprintln!("node {me} listening on {addr}");
    emit(me, "listening", json!({ "addr": addr.to_string() }));

    let mut membership = Membership::new(me, 0..config.members(), config.detector);
    let mut dialing: BTreeMap<SocketAddr, Instant> = BTreeMap::new();
    let mut connected_addrs: BTreeMap<u32, SocketAddr> = BTreeMap::new();
    let (dial_tx, mut dial_rx) = tokio::sync::mpsc::channel::<(SocketAddr, Result<u32, String>)>(64);
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

    loop {
        let cmds = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                let now = Instant::now();
                // Dial seeds we have no connection to (a restarted seed comes back this way).
                for seed in &config.seeds {
                    let live = connected_addrs.values().any(|a| a == seed);
                    let due = dialing.get(seed).is_none_or(|t| now >= *t);
                    if !live && due {
                        dialing.insert(*seed, now + Duration::from_secs(3600));
                        let (t, tx, seed) = (transport.clone(), dial_tx.clone(), *seed);
                        tokio::spawn(async move {
                            let r = t.connect(seed, None).await.map_err(|e| e.to_string());
                            let _ = tx.send((seed, r)).await;
                        });
                    }
                }
                membership.on_tick(now)
            }
            Some((seed, result)) = dial_rx.recv() => {
                match result {
                    Ok(peer) => {
                        connected_addrs.insert(peer, seed);
                        dialing.remove(&seed);
                    }
                    Err(e) => {
                        tracing::debug!(node = me, %seed, "dial failed: {e}");
                        dialing.insert(seed, Instant::now() + Duration::from_millis(REDIAL_MS));
                    }
                }
                Vec::new()
            }
            event = events.recv() => match event {
                None => break,
                Some(TransportEvent::PeerUp { peer, addr }) => {
                    emit(me, "peer_up", json!({ "peer": peer, "addr": addr.to_string() }));
                    Vec::new()
                }
                Some(TransportEvent::PeerDown { peer, reason }) => {
                    connected_addrs.remove(&peer);
                    emit(me, "peer_down", json!({ "peer": peer, "reason": reason }));
                    Vec::new()
                }
                Some(TransportEvent::Message { peer, frame }) => {
                    match phalanx_transport::decode::<NodeMsg>(&frame, &limits) {
                        Ok(f) => match f.header {
                            NodeMsg::Membership(m) => membership.on_message(peer, m, Instant::now()),
                        },
                        Err(e) => {
                            tracing::warn!(node = me, peer, "closing the connection of node {peer}: bad frame: {e}");
                            transport.reject(peer, e.reason_code(), &e.to_string());
                            Vec::new()
                        }
                    }
                }
                Some(TransportEvent::Rejected { addr, peer, code, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, code, "rejected connection: {reason}");
                    emit(me, "rejected", json!({ "addr": addr.to_string(), "peer": peer, "code": code, "reason": reason }));
                    Vec::new()
                }
            },
        };
        for cmd in cmds {
            match cmd {
                MembershipCommand::Send(to, msg) => {
                    if let Ok(frame) = phalanx_transport::encode(&NodeMsg::Membership(msg), &[], &limits) {
                        // A peer without a connection simply misses a heartbeat.
                        let _ = transport.send(to, frame);
                    }
                }
                MembershipCommand::Down(peer) => {
                    tracing::warn!(node = me, peer, "node {peer} is down (no heartbeat)");
                    emit(me, "down", json!({ "peer": peer }));
                }
                MembershipCommand::Adopted(view) => {
                    tracing::info!(
                        node = me,
                        epoch = view.epoch,
                        coordinator = view.coordinator,
                        "new view {:?}",
                        view.members
                    );
                    emit(
                        me,
                        "view",
                        json!({ "epoch": view.epoch, "coordinator": view.coordinator, "members": view.members }),
                    );
                }
                MembershipCommand::QuorumLost => {
                    tracing::warn!(node = me, "no majority of the cluster is reachable: waiting");
                    emit(me, "quorum_lost", json!({}));
                }
            }
        }
    }
    transport.shutdown().await;
    emit(me, "stopped", json!({}));
    Ok(())
}
