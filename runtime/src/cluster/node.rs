//! A cluster node: the QUIC transport, membership and failure detection,
//! and a stream of events for people and scripts.
//!
//! ```text
//!   seeds ──dial──▶ Transport (mTLS QUIC) ──events──▶ node loop ──▶ Membership core
//!                        ▲                               │  ticks (every TICK_MS)
//!                        └──────── frames (NodeMsg) ◀────┘──▶ stdout: one JSON event per line
//! ```
//!
//! The node hands one typed event per state change to its sink (see
//! [`super::event`]); `phalanx node` prints each as one JSON object per line
//! on stdout (`listening` with the process id, `peer_up`, `peer_down`,
//! `down`, `view`, `quorum_lost`, `duplicate_identity`, `stopped`; with a job
//! `coordinating`, `spawn`, `step`, `recovered`, `job_done`, `job_failed`), each with
//! `node` and `t_ms` (milliseconds since the Unix epoch, so a driver can
//! measure detection time against the moment it killed a process), and logs
//! for people on stderr. `step` events come at a bounded rate (see
//! [`super::step_events`]) while the coordinator appends every step to
//! `OUT/history.csv`.
//!
//! **One process per node id.** A second process started with a member's id
//! (an operator mistake) is refused by every member whose connection to the
//! first one is still heard from (see
//! [`TransportConfig::restart_silence_ms`], set here to the failure timeout):
//! the members print `duplicate_identity` with `"role": "member"`, the second
//! process prints it with `"role": "refused"` and stops with
//! [`Error::DuplicateIdentity`]. A restarted node (the old process is dead,
//! so silent) takes over as before.

use phalanx_actors::clock;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_transport::api::{self, Events as _};
use phalanx_transport::certs::NodeIdentity;
use phalanx_transport::{codes, DecodeError, Limits, Revocations, Transport, TransportConfig, TransportEvent};
use tokio::sync::{broadcast, mpsc};

pub use super::node_config::NodeConfig;

use super::client_api::{ClientApi, ClusterStatus, MemberStatus};
use super::coordination::shell::{Input as ServiceInput, ServicePlane, LEAVE_TIMEOUT};
use super::coordination::Coordination;
use super::event::{DownCause, DuplicateRole, Emitter, EventSink, NodeEvent, NodeEventKind};
use super::jobs::{Jobs, NodeCommand};
use super::membership::{LeaseCell, Membership, MembershipCommand, View};
use super::node_job::NodeShared;
use super::rejections::{MALFORMED_FRAME, OVERSIZED_FRAME};
use super::runner::{OutPermit, OutQueue, Outbound, Traffic, OUT_QUEUE_BYTES};
use super::wire::{self, Inbound, InboundError, NodeMsg};
use crate::error::Error;
use crate::job::PreparedJob;
use crate::metrics::{Kind, NodeMetrics};

/// How often the node loop advances the membership clock.
const TICK_MS: u64 = 20;
/// Delay before re-dialling a seed that did not answer.
const REDIAL_MS: u64 = 200;

/// What a node is given besides its config: where its events go, its
/// metrics, optionally its identity and job in memory, and a channel told the
/// bound address once it listens.
pub struct NodeParts {
    /// Where events go (the binary prints them; a [`NodeHandle`](crate::node::NodeHandle) broadcasts them).
    pub events: EventSink,
    /// This node's metrics.
    pub metrics: Arc<NodeMetrics>,
    /// The identity; loaded from `config.certs` when absent.
    pub identity: Option<NodeIdentity>,
    /// The job; read from `config.job` when absent.
    pub job: Option<crate::JobConfig>,
    /// Told the bound address once the node listens.
    pub bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// Commands of a [`NodeHandle`](crate::node::NodeHandle) (submit, cancel, list jobs).
    pub commands: Option<mpsc::Receiver<NodeCommand>>,
    /// The models and data sources this node can host.
    pub registries: crate::job::Registries,
    /// Later revocation lists (replacing `config.revoked` and each other).
    pub revocations: Option<tokio::sync::watch::Receiver<Revocations>>,
    /// Fault injection for the simulation tier (the cargo feature `fault-injection`): while
    /// this reads `true` the node loop stands still — no tick, no frame, no heartbeat — as a
    /// process stopped by SIGSTOP would (see [`Freeze`]).
    #[cfg(feature = "fault-injection")]
    pub freeze: Option<tokio::sync::watch::Receiver<bool>>,
}

impl NodeParts {
    /// Events to `events`, metrics into `metrics`; the identity and the job
    /// from the config, the built-in models and data sources, no handle.
    pub fn new(events: EventSink, metrics: Arc<NodeMetrics>) -> Self {
        Self {
            events,
            metrics,
            identity: None,
            job: None,
            bound: None,
            commands: None,
            registries: Default::default(),
            revocations: None,
            #[cfg(feature = "fault-injection")]
            freeze: None,
        }
    }
}

/// Run a node until `shutdown` resolves, handing its events to `events`.
pub async fn run_node(
    config: NodeConfig,
    events: EventSink,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = NodeMetrics::new(config.id);
    run_node_with(config, NodeParts::new(events, metrics), shutdown).await
}

/// [`run_node`] with every part given (see [`NodeParts`]). Everything the
/// node logs is inside a `node` span with its id.
pub async fn run_node_with(
    config: NodeConfig,
    parts: NodeParts,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    use tracing::Instrument;
    let span = tracing::info_span!("node", node = config.id);
    node_loop(config, parts, shutdown).instrument(span).await
}

/// The QUIC node: its identity, its endpoint, then the [generic loop](node_loop_on).
async fn node_loop(
    config: NodeConfig,
    mut parts: NodeParts,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    let identity = match parts.identity.take() {
        Some(identity) if identity.id == config.id => identity,
        Some(identity) => {
            return Err(Error::Field {
                field: "identity".into(),
                reason: format!("the identity is node {}'s, this is node {}", identity.id, config.id),
            })
        }
        None => NodeIdentity::load(&config.certs, config.id)
            .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?,
    };
    let mut transport_config = TransportConfig::new(identity, config.listen);
    // A certificate of the cluster's CA naming a node outside it never becomes a member.
    transport_config.members = Some(config.members());
    // A member silent for a failure timeout is down for membership too: only then may another
    // incarnation with its id replace it; until then a second process is refused.
    transport_config.restart_silence_ms = config.detector.failure_timeout_ms.min(transport_config.idle_timeout_ms);
    let (transport, events) = Transport::bind(transport_config)
        .await
        .map_err(|e| Error::Field { field: "listen".into(), reason: format!("{}: {e}", config.listen) })?;
    let emitter = Emitter { node: config.id, sink: parts.events.clone() };
    let rogue = super::rogue::Trigger::new(&config, &emitter, &transport)?;
    node_loop_on(config, parts, transport, events, rogue, shutdown).await
}

/// Run a node over any [`api::Transport`](phalanx_transport::api::Transport) until
/// `shutdown` resolves: the loop of [`run_node_with`], whose QUIC endpoint is replaced by
/// `transport` (already set up: its identity, its revocation list) and its `events`. The
/// simulation tier runs real nodes this way on an in-memory network
/// ([`MemNetwork`](phalanx_transport::mem::MemNetwork)) under a paused clock; `parts.identity`
/// is not used.
pub async fn run_node_on<T: api::Transport>(
    config: NodeConfig,
    parts: NodeParts,
    transport: T,
    events: T::Events,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    use tracing::Instrument;
    config.validate()?;
    let span = tracing::info_span!("node", node = config.id);
    let rogue = super::rogue::Trigger::none(&config)?;
    node_loop_on(config, parts, transport, events, rogue, shutdown).instrument(span).await
}

async fn node_loop_on<T: api::Transport>(
    config: NodeConfig,
    parts: NodeParts,
    transport: T,
    mut events: T::Events,
    mut rogue: super::rogue::Trigger,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut freeze = Freeze::of(&parts);
    let NodeParts { events: sink, metrics, identity: _, job, bound, commands, registries, revocations, .. } = parts;
    // A node without later lists keeps its config's: a channel whose sender is kept here.
    let (_no_revocations, unchanged) = tokio::sync::watch::channel(Revocations::default());
    let mut revocations = revocations.unwrap_or(unchanged);
    // A node without a handle gets no commands: a channel nobody sends on.
    let (_no_commands, unused) = mpsc::channel(1);
    let mut commands = commands.unwrap_or(unused);
    // Every event also goes to the clients following a job (`phalanx submit --wait`); a
    // broadcast without subscribers costs a lock and nothing else.
    let (client_events, _) = broadcast::channel::<NodeEvent>(CLIENT_EVENT_CAPACITY);
    let sink: EventSink = {
        let client_events = client_events.clone();
        Arc::new(move |event: NodeEvent| {
            if client_events.receiver_count() > 0 {
                let _ = client_events.send(event.clone());
            }
            sink(event)
        })
    };
    let emitter = Emitter { node: config.id, sink };
    // Commands of client requests (their tasks answer off the loop, through the loop).
    let (client_commands, mut client_commands_rx) = mpsc::channel::<NodeCommand>(64);
    let client_api =
        ClientApi { node: config.id, commands: client_commands, events: client_events, registries: registries.clone() };
    let limits = Limits::default();
    // Frames of the jobs for other nodes: bounded in bytes until the transport takes them.
    let (out_tx, mut out_rx) = OutQueue::new(OUT_QUEUE_BYTES);
    let mut senders = Senders::default();
    // Large frames decoded off the loop come back here.
    // Each with its frame's receive budget, given back once the loop has handed it on.
    let (decoded_tx, mut decoded_rx) =
        mpsc::channel::<(u32, usize, Result<Inbound, InboundError>, phalanx_transport::ReceiveBudget)>(16);
    // The job given at start is loaded here, so a bad one stops the node with its error.
    let startup = match (job, &config.job) {
        (Some(job), _) => Some(job),
        (None, Some(path)) => Some(crate::JobConfig::from_toml_file(path)?),
        (None, None) => None,
    };
    let startup = match startup {
        Some(mut job) => {
            config.admit(&mut job);
            let r = registries.clone();
            Some(Arc::new(
                tokio::task::spawn_blocking(move || PreparedJob::with_registries(job, &r.models, &r.data))
                    .await
                    .map_err(|e| Error::Spawn(e.to_string()))??,
            ))
        }
        None => None,
    };
    let (ready_tx, mut ready_rx) = mpsc::channel(16);
    let (stored_tx, mut stored_rx) = mpsc::channel(super::node_job::STORED_COPIES_CAPACITY);
    let lease = Arc::new(LeaseCell::new());
    let shared = NodeShared {
        out_tx,
        events: emitter.clone(),
        metrics: metrics.clone(),
        instance: rand::random(),
        stored: stored_tx,
        lease: lease.clone(),
    };
    let mut jobs = Jobs::new(config.clone(), startup, registries, ready_tx, shared).await?;
    transport.set_revocations(Revocations::new(config.revoked.iter().cloned()));
    let me = config.id;
    let addr = transport.local_addr();
    tracing::info!(node = me, %addr, "listening");
    emitter.emit(NodeEventKind::Listening { addr, pid: std::process::id() });
    if let Some(bound) = bound {
        let _ = bound.send(addr);
    }

    let mut membership = match &config.coordination {
        Coordination::Embedded => {
            let mut membership = Membership::new(me, 0..config.members(), config.detector);
            if config.no_leases {
                membership = membership.without_leases();
            }
            Control::Embedded(membership)
        }
        spec => {
            tracing::info!(node = me, service = %spec, "membership on a coordination service");
            Control::Service(ServicePlane::start(spec.clone(), config.coordination_settings()?, me, addr.to_string()))
        }
    };
    let mut dialing: BTreeMap<SocketAddr, Instant> = BTreeMap::new();
    let mut connected_addrs: BTreeMap<u32, SocketAddr> = BTreeMap::new();
    // The incarnation of each member's process last seen connected (one entry per member).
    let mut incarnations: BTreeMap<u32, u64> = BTreeMap::new();
    let (dial_tx, mut dial_rx) = mpsc::channel::<(SocketAddr, Result<u32, String>)>(64);
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Set when this process must stop with an error (it is a second one with this id).
    let mut fatal: Option<Error> = None;
    // When this node last handed the allocator's kept memory back (see `trim_allocator`).
    let mut trimmed = clock::now();

    loop {
        let cmds = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                let now = clock::now();
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
                jobs.on_tick(now);
                if crate::allocator_tuned() && now.duration_since(trimmed) >= crate::ALLOCATOR_TRIM_EVERY {
                    trimmed = now;
                    tokio::task::spawn_blocking(crate::trim_allocator);
                }
                membership.on_tick(now)
            }
            Some((out, permit)) = out_rx.recv() => {
                if out.to == me {
                    // A frame to itself (control messages only: actors on this node are
                    // reached directly) is one buffer already.
                    let frame = out.frame.into_vec();
                    if let Ok(inbound) = wire::decode(&frame[4..], &limits) {
                        jobs.on_frame(me, inbound);
                    }
                } else {
                    senders.send(&transport, &metrics, out, permit);
                }
                Vec::new()
            }
            // A handle's commands and the client API's, answered alike.
            Some(cmd) = commands.recv() => {
                on_command(cmd, &mut jobs, status(&config, &membership, &transport));
                Vec::new()
            }
            Ok(()) = revocations.changed() => {
                let list = revocations.borrow_and_update().clone();
                tracing::info!(node = me, ?list, "revocation list replaced");
                transport.set_revocations(list);
                Vec::new()
            }
            // Fault injection (the simulation tier's pause): the loop waits here, doing nothing.
            () = freeze.requested() => {
                freeze.hold(&lease).await;
                Vec::new()
            }
            // Fault injection (a rogue member at SIGUSR1); never in a default build.
            () = rogue.signalled() => {
                rogue.round(membership.view(), &mut jobs);
                Vec::new()
            }
            input = membership.next() => match membership.handle(input) {
                Ok(cmds) => cmds,
                Err(e) => {
                    tracing::error!(node = me, "{e}");
                    fatal = Some(Error::Coordination(e));
                    break;
                }
            },
            Some(cmd) = client_commands_rx.recv() => {
                on_command(cmd, &mut jobs, status(&config, &membership, &transport));
                Vec::new()
            }
            Some(copy) = stored_rx.recv() => {
                jobs.on_copy_stored(copy);
                Vec::new()
            }
            Some((peer, len, decoded, budget)) = decoded_rx.recv() => {
                let cmds = on_decoded(me, peer, len, decoded, &mut membership, &mut jobs, &metrics, &transport);
                drop(budget);
                cmds
            }
            Some((id, job)) = ready_rx.recv() => {
                jobs.on_ready(id, job);
                Vec::new()
            }
            Some((seed, result)) = dial_rx.recv() => {
                match result {
                    Ok(peer) => {
                        connected_addrs.insert(peer, seed);
                        dialing.remove(&seed);
                    }
                    Err(e) => {
                        tracing::debug!(node = me, %seed, "dial failed: {e}");
                        dialing.insert(seed, clock::now() + Duration::from_millis(REDIAL_MS));
                    }
                }
                Vec::new()
            }
            event = events.recv() => match event {
                None => break,
                Some(TransportEvent::PeerUp { peer, addr }) => {
                    emitter.emit(NodeEventKind::PeerUp { peer, addr });
                    // Another process with the member's id: the one known before died.
                    let incarnation = transport.peer_info(peer).map(|i| i.incarnation);
                    let before = incarnation.and_then(|now| incarnations.insert(peer, now));
                    match (before, incarnation) {
                        (Some(before), Some(now)) if before != now => membership.on_restarted(peer, clock::now()),
                        _ => Vec::new(),
                    }
                }
                Some(TransportEvent::PeerDown { peer, reason }) => {
                    connected_addrs.remove(&peer);
                    emitter.emit(NodeEventKind::PeerDown { peer, reason });
                    Vec::new()
                }
                // The answer to a probe of a silent member: its process is gone.
                Some(TransportEvent::PeerGone { peer, addr }) => {
                    tracing::debug!(node = me, peer, %addr, "no process listens at node {peer}'s address any more");
                    membership.on_gone(peer, clock::now())
                }
                // A message's header is decoded here, and parameters and gradients take the
                // values the transport read over without a copy: cheap at any size, so they go
                // on at once (through the blocking pool, a large one waited for two thread
                // wake-ups on every step). A checkpoint copy's payload of up to hundreds of MiB
                // is turned back into bytes on the blocking pool instead, which must not hold up
                // the heartbeats; its share of the peer's receive budget is held until the loop
                // has handed it on: a peer whose copies pile up there is read no further.
                Some(TransportEvent::Message { peer, frame }) => {
                    let len = frame.len();
                    match wire::decode_received_head(frame, &limits) {
                        (Ok(copy @ wire::Decoded::Copy(..)), budget) => {
                            let tx = decoded_tx.clone();
                            tokio::task::spawn_blocking(move || {
                                // Waits while the loop is behind (bounded); fails only once it stopped.
                                let _ = tx.blocking_send((peer, len, copy.finish(), budget));
                            });
                            Vec::new()
                        }
                        (decoded, _budget) => {
                            let decoded = decoded.and_then(wire::Decoded::finish);
                            on_decoded(me, peer, len, decoded, &mut membership, &mut jobs, &metrics, &transport)
                        }
                    }
                }
                // The transport closed a connection for a frame that broke a codec rule.
                Some(TransportEvent::BadFrame { peer, code, reason }) => {
                    let kind = if code == DecodeError::CODE_OVERSIZE { OVERSIZED_FRAME } else { MALFORMED_FRAME };
                    jobs.rejected(peer, kind, reason);
                    Vec::new()
                }
                Some(TransportEvent::Rejected { addr, peer, code: codes::DUPLICATE_IDENTITY, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, "refused a second process with a member's id: {reason}");
                    metrics.rejected_connections.get_or_create(&Kind::of(codes::name(codes::DUPLICATE_IDENTITY))).inc();
                    emitter.emit(NodeEventKind::DuplicateIdentity { role: DuplicateRole::Member, peer, addr, reason });
                    Vec::new()
                }
                Some(TransportEvent::Rejected { addr, peer, code, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, code, "rejected connection: {reason}");
                    metrics.rejected_connections.get_or_create(&Kind::of(codes::name(code))).inc();
                    emitter.emit(NodeEventKind::Rejected { addr, peer, code, reason });
                    Vec::new()
                }
                Some(TransportEvent::ClientRequest { client, addr, request, reply }) => {
                    tokio::spawn(client_api.clone().serve(client, addr, request, reply));
                    Vec::new()
                }
                Some(TransportEvent::DuplicateIdentity { peer, addr, reason }) => {
                    tracing::error!(node = me, by = peer, %addr, "refused as a second process with this id: {reason}");
                    emitter.emit(NodeEventKind::DuplicateIdentity {
                        role: DuplicateRole::Refused,
                        peer: Some(peer),
                        addr,
                        reason: reason.clone(),
                    });
                    fatal = Some(Error::DuplicateIdentity { node: me, by: peer, addr, reason });
                    break;
                }
            },
        };
        // The coordinator's aggregators read the lease before every step.
        lease.set(membership.lease(clock::now()));
        for cmd in cmds {
            match cmd {
                MembershipCommand::Send(to, msg) => {
                    if let Ok(frame) = wire::encode(&NodeMsg::Membership(msg), &limits) {
                        let bytes = frame.len() as u64;
                        // A peer without a connection simply misses a heartbeat.
                        if transport.send(to, frame).is_ok() {
                            metrics.bytes_sent.get_or_create(&Kind::of(Traffic::Membership.as_str())).inc_by(bytes);
                        }
                    }
                }
                MembershipCommand::Probe(peer) => transport.probe(peer),
                MembershipCommand::Down(peer) | MembershipCommand::Gone(peer) | MembershipCommand::Restarted(peer) => {
                    let (cause, why) = match cmd {
                        MembershipCommand::Gone(_) => (DownCause::Refused, "silent, and its host refused a probe"),
                        MembershipCommand::Restarted(_) => {
                            (DownCause::Restarted, "another process with its id connected")
                        }
                        _ => (DownCause::Silence, "no heartbeat"),
                    };
                    tracing::warn!(node = me, peer, "node {peer} is down ({why})");
                    if let Some(heard) = membership.last_heard(peer) {
                        metrics.failure_detection.observe(clock::now().saturating_duration_since(heard).as_secs_f64());
                    }
                    emitter.emit(NodeEventKind::Down { peer, cause: Some(cause) });
                    jobs.on_node_lost(peer);
                }
                MembershipCommand::Adopted(view) => {
                    tracing::info!(
                        node = me,
                        epoch = view.epoch,
                        coordinator = view.coordinator,
                        "new view {:?}",
                        view.members
                    );
                    metrics.membership_epoch.set(i64::try_from(view.epoch).unwrap_or(i64::MAX));
                    metrics.members.set(view.members.len() as i64);
                    emitter.emit(NodeEventKind::View {
                        epoch: view.epoch,
                        coordinator: view.coordinator,
                        members: view.members.clone(),
                    });
                    jobs.on_view(&view);
                }
                MembershipCommand::Rejected { peer, kind, reason } => jobs.rejected(peer, kind, reason),
                MembershipCommand::GaveUp(view) => {
                    tracing::info!(node = me, epoch = view.epoch, coordinator = view.coordinator, "view given up");
                    jobs.on_view_given_up(&view);
                }
                MembershipCommand::QuorumLost => {
                    let reachable: Vec<u32> = membership.reachable();
                    let missing: Vec<u32> = (0..config.members()).filter(|m| !reachable.contains(m)).collect();
                    let need = config.members() / 2 + 1;
                    if let Control::Service(plane) = &membership {
                        tracing::warn!(
                            node = me,
                            service = %plane.service(),
                            "this node's coordination session ended: its actors stop until it has joined again"
                        );
                        metrics.members.set(0);
                        emitter.emit(NodeEventKind::QuorumLost { reachable, missing, needed: need });
                        jobs.stop_all("lost its coordination session");
                        continue;
                    }
                    tracing::warn!(
                        node = me,
                        ?reachable,
                        ?missing,
                        "no majority of the cluster is reachable ({} of {}, {need} needed): waiting for any of nodes {missing:?}",
                        reachable.len(),
                        config.members()
                    );
                    metrics.members.set(0);
                    emitter.emit(NodeEventKind::QuorumLost { reachable, missing, needed: need });
                    jobs.stop_all("lost its quorum");
                }
            }
        }
        // On a coordination service, the registry is kept there (one write at a time), and a
        // coordinator takes over what it kept there.
        if let Control::Service(plane) = &mut membership {
            if jobs.taking_over() {
                if let Some(stored) = plane.take_stored_jobs() {
                    jobs.take_over_stored(stored);
                }
            }
            for (version, held) in plane.take_stored() {
                jobs.on_stored(version, held);
            }
            if let Some(write) = jobs.next_store_write(clock::now()) {
                plane.store(write);
            }
        }
    }
    // Nothing here commits any more, then the registration goes: the next coordinator may
    // start at once rather than a lease later.
    lease.set(None);
    if let Control::Service(plane) = &mut membership {
        flush_registry(plane, &mut jobs).await;
    }
    jobs.stop_all("is shutting down");
    jobs.flush_rejections();
    if let Control::Service(plane) = membership {
        plane.leave().await;
    }
    transport.shutdown().await;
    if let Some(error) = fatal {
        return Err(error);
    }
    emitter.emit(NodeEventKind::Stopped);
    Ok(())
}

/// A node loop's pause switch: [`NodeParts::freeze`] in a build with the cargo feature
/// `fault-injection`, never requested otherwise. While frozen the loop awaits nothing but
/// the switch, so the node neither ticks, heartbeats, decodes nor sends; what arrives waits in
/// the transport. Its actors keep running but hear nothing and reach nobody (their frames
/// queue for the loop), and the aggregators stop committing once the lease the loop no
/// longer renews runs out — the node, seen from outside, is a stopped process.
struct Freeze {
    #[cfg(feature = "fault-injection")]
    switch: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Freeze {
    fn of(parts: &NodeParts) -> Self {
        #[cfg(feature = "fault-injection")]
        return Self { switch: parts.freeze.clone() };
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = parts;
            Self {}
        }
    }

    /// Resolves when the switch turns on; never without one.
    async fn requested(&mut self) {
        #[cfg(feature = "fault-injection")]
        if let Some(switch) = self.switch.as_mut() {
            let on = switch.wait_for(|frozen| *frozen).await.is_ok();
            if on {
                return;
            }
            // The switch is gone: never frozen again.
            self.switch = None;
        }
        std::future::pending::<()>().await
    }

    /// Stands still until the switch turns off again (or is gone), with `lease` frozen.
    async fn hold(&mut self, lease: &LeaseCell) {
        #[cfg(feature = "fault-injection")]
        if let Some(switch) = self.switch.as_mut() {
            lease.set_frozen(true);
            let _ = switch.wait_for(|frozen| !*frozen).await;
            lease.set_frozen(false);
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = lease;
    }
}

/// An orderly stop of a coordinator on a service: write what the service does not hold yet of
/// the registry (jobs' states, their newest checkpoints), for at most [`LEAVE_TIMEOUT`].
async fn flush_registry(plane: &mut ServicePlane, jobs: &mut Jobs) {
    let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
    loop {
        for (version, held) in plane.take_stored() {
            jobs.on_stored(version, held);
        }
        if let Some(write) = jobs.next_store_write(clock::now()) {
            plane.store(write);
        }
        if !jobs.store_pending() || tokio::time::Instant::now() >= deadline {
            return;
        }
        // The write's answer, or the moment a failed one may be tried again. What else the
        // service says no longer matters to a node that stops.
        let wake = deadline.min(tokio::time::Instant::now() + crate::cluster::registry::STORE_RETRY);
        if let Ok(input) = tokio::time::timeout_at(wake, plane.next()).await {
            let _ = plane.handle(input);
        }
    }
}

/// Where a node's membership comes from: its own heartbeats, or a coordination service.
enum Control {
    Embedded(Membership),
    Service(ServicePlane),
}

impl Control {
    fn view(&self) -> Option<&View> {
        match self {
            Control::Embedded(m) => m.view(),
            Control::Service(p) => p.view(),
        }
    }

    fn on_tick(&mut self, now: Instant) -> Vec<MembershipCommand> {
        match self {
            Control::Embedded(m) => m.on_tick(now),
            // The service detects failures; the QUIC connections keep themselves alive.
            Control::Service(_) => Vec::new(),
        }
    }

    fn on_restarted(&mut self, peer: u32, now: Instant) -> Vec<MembershipCommand> {
        match self {
            Control::Embedded(m) => m.on_restarted(peer, now),
            // The service detects failures: the old process's session expires.
            Control::Service(_) => Vec::new(),
        }
    }

    fn on_gone(&mut self, peer: u32, now: Instant) -> Vec<MembershipCommand> {
        match self {
            Control::Embedded(m) => m.on_gone(peer, now),
            // The service detects failures (and never asks for probes).
            Control::Service(_) => Vec::new(),
        }
    }

    fn on_message(&mut self, peer: u32, msg: super::membership::MembershipMsg, now: Instant) -> Vec<MembershipCommand> {
        match self {
            Control::Embedded(m) => m.on_message(peer, msg, now),
            Control::Service(p) => vec![MembershipCommand::Rejected {
                peer,
                kind: "heartbeat",
                reason: format!(
                    "node {peer} runs the embedded membership, this node coordinates on {}: every node of a cluster must name the same --coordination",
                    p.service()
                ),
            }],
        }
    }

    fn lease(&self, now: Instant) -> Option<(Instant, Instant)> {
        match self {
            Control::Embedded(m) => m.lease(now),
            Control::Service(p) => p.lease(),
        }
    }

    fn last_heard(&self, peer: u32) -> Option<Instant> {
        match self {
            Control::Embedded(m) => m.last_heard(peer),
            Control::Service(_) => None,
        }
    }

    /// The members this node can count on now.
    fn reachable(&self) -> Vec<u32> {
        match self {
            Control::Embedded(m) => m.up().iter().copied().collect(),
            Control::Service(p) => p.registered(),
        }
    }

    /// The coordination service's next input (never, for the embedded membership).
    async fn next(&mut self) -> ServiceInput {
        match self {
            Control::Embedded(_) => std::future::pending().await,
            Control::Service(p) => p.next().await,
        }
    }

    fn handle(
        &mut self,
        input: ServiceInput,
    ) -> Result<Vec<MembershipCommand>, super::coordination::CoordinationError> {
        match self {
            Control::Embedded(_) => Ok(Vec::new()),
            Control::Service(p) => p.handle(input),
        }
    }
}

/// A frame from `peer` of `len` bytes, decoded: membership to its core, the rest to the jobs
/// (through the authority rules); a frame that does not decode closes that peer's connection.
#[allow(clippy::too_many_arguments)]
fn on_decoded(
    me: u32,
    peer: u32,
    len: usize,
    decoded: Result<Inbound, InboundError>,
    membership: &mut Control,
    jobs: &mut Jobs,
    metrics: &NodeMetrics,
    transport: &impl api::Transport,
) -> Vec<MembershipCommand> {
    match decoded {
        Ok(Inbound::Control(NodeMsg::Membership(m))) => {
            metrics.bytes_received.get_or_create(&Kind::of(Traffic::Membership.as_str())).inc_by(len as u64);
            membership.on_message(peer, m, clock::now())
        }
        Ok(inbound) => {
            let traffic = match &inbound {
                Inbound::Deliver(_, _, msg) => Traffic::of(msg),
                Inbound::Checkpoint(..) => Traffic::Checkpoint,
                Inbound::Control(_) => Traffic::Control,
            };
            metrics.bytes_received.get_or_create(&Kind::of(traffic.as_str())).inc_by(len as u64);
            jobs.on_frame(peer, inbound);
            Vec::new()
        }
        Err(e) => {
            let code = match &e {
                InboundError::Decode(d) => d.reason_code(),
                InboundError::TensorMismatch { .. } => wire::TENSOR_MISMATCH_CODE,
            };
            tracing::warn!(node = me, peer, "closing the connection of node {peer}: bad frame: {e}");
            transport.reject(peer, code, &e.to_string());
            jobs.rejected(peer, MALFORMED_FRAME, e.to_string());
            Vec::new()
        }
    }
}

/// One sender task per peer for the jobs' frames: each frame goes to the transport in order,
/// when the transport has room for it (`send_when_ready`: a busy peer delays its frames, it
/// does not lose them), and its share of the out-queue budget is given back then — so a slow
/// peer slows the producers down through the [`OutQueue`] instead of growing a queue.
#[derive(Default)]
struct Senders {
    tasks: BTreeMap<u32, mpsc::UnboundedSender<(Outbound, OutPermit)>>,
}

impl Senders {
    fn send<T: api::Transport>(&mut self, transport: &T, metrics: &Arc<NodeMetrics>, out: Outbound, permit: OutPermit) {
        let to = out.to;
        let tx = self.tasks.entry(to).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<(Outbound, OutPermit)>();
            let (transport, metrics) = (transport.clone(), metrics.clone());
            tokio::spawn(async move {
                while let Some((Outbound { to, frame, traffic }, permit)) = rx.recv().await {
                    let bytes = frame.len() as u64;
                    match transport.send_when_ready(to, frame).await {
                        Ok(()) => {
                            metrics.bytes_sent.get_or_create(&Kind::of(traffic.as_str())).inc_by(bytes);
                        }
                        // The peer is gone: the protocol recovers what it carried.
                        Err(e) => tracing::debug!(to, "frame not sent: {e}"),
                    }
                    drop(permit);
                }
            });
            tx
        });
        // Fails only if the task is gone (the runtime is shutting down): the frame goes too.
        let _ = tx.send((out, permit));
    }
}

/// A command of a handle or a client: the node loop answers `Status` (it holds the view and
/// the connections), the jobs everything else.
fn on_command(cmd: NodeCommand, jobs: &mut Jobs, status: ClusterStatus) {
    match cmd {
        NodeCommand::Status { reply } => {
            let _ = reply.send(status);
        }
        cmd => jobs.on_command(cmd),
    }
}

/// Events a following client may fall behind by before it skips the oldest.
const CLIENT_EVENT_CAPACITY: usize = 1024;

/// This node's view of the cluster, for `phalanx status`.
fn status(config: &NodeConfig, membership: &Control, transport: &impl api::Transport) -> ClusterStatus {
    let me = config.id;
    let view = membership.view();
    let members = view
        .map(|v| v.members.iter().copied().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|id| MemberStatus {
            id,
            addr: if id == me { Some(transport.local_addr()) } else { transport.peer_info(id).map(|p| p.addr) },
        })
        .collect();
    ClusterStatus {
        node: me,
        configured: config.members(),
        epoch: view.map(|v| v.epoch),
        coordinator: view.map(|v| v.coordinator),
        members,
    }
}
