//! What a node needs to start: its configuration (the `phalanx node` config file), and
//! what can be checked of it before binding. Its own module because the node loop, the job
//! registry and every hosted job read it, while it needs none of them.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::membership::DetectorConfig;
use super::placement::default_replicas;
use crate::error::Error;

/// What a node needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (must match its certificate, `node-<id>`).
    pub id: u32,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The certificates directory of `phalanx certs` (this node's `node-<id>/` in it is
    /// used), or this node's own directory (`node.pem`, `node.key`, `ca.pem`).
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
    /// The training job this cluster runs (every node gets the same file).
    #[serde(default)]
    pub job: Option<PathBuf>,
    /// Where the coordinator writes summary.json and model.safetensors.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Fault injection for chaos tests: abort this process after writing the
    /// checkpoint of this step to its temporary file, before the rename. Only a
    /// build with the cargo feature `fault-injection` does; a default build
    /// refuses a config that sets it ([`validate`](Self::validate)).
    #[serde(default)]
    pub crash_before_rename: Option<u64>,
    /// Fault injection for chaos tests: a rogue member, otherwise honest, that sends every
    /// other member a round of forged messages at each SIGUSR1 (see `cluster::rogue`). Only a
    /// build with the cargo feature `fault-injection` has one; a default build refuses it.
    #[serde(default)]
    pub rogue: bool,
    /// Other nodes that keep a copy of every checkpoint (the coordinator's
    /// successor first). Default: 2 when the cluster has at least 5 members,
    /// else 1 (see [`default_replicas`]).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Steps that always get a `step` event when this node coordinates (a
    /// harness injecting faults at those steps); other steps are reported at
    /// a bounded rate (see [`super::step_events`]).
    #[serde(default)]
    pub report_steps: Vec<u64>,
    /// Jobs running at once; more wait in the queue (FIFO). Default 1.
    #[serde(default = "one")]
    pub max_jobs: u32,
    /// Certificates this node refuses: `node-<id>`, `client-<name>` or `serial:<hex>`. Live
    /// connections presenting one are closed at once; `phalanx node` reloads the list from
    /// its config file on SIGHUP, and [`NodeParts::revocations`] changes it while running.
    #[serde(default)]
    pub revoked: Vec<phalanx_transport::Revoked>,
    /// Emit a `commit` event for every step this node's aggregators apply (what the chaos
    /// harness checks the lease invariants on). Off by default: one event per step.
    #[serde(default)]
    pub record_commits: bool,
    /// Fault injection for tests: coordinate without leases (what the lease invariant
    /// is shown to catch). Only a build with the cargo feature `fault-injection` accepts it.
    #[serde(default)]
    pub no_leases: bool,
    /// Where membership, the coordinator election and the views live: `embedded` (heartbeats
    /// between the nodes, the default), `etcd://HOST:PORT[,…]/PREFIX` or
    /// `zk://HOST:PORT[,…]/CHROOT` (see [`super::coordination`]).
    #[serde(default)]
    pub coordination: super::coordination::Coordination,
    /// On etcd the lease's TTL, on ZooKeeper the session timeout, in ms (default 2000; etcd
    /// counts whole seconds). A node silent for this long is down.
    #[serde(default)]
    pub coordination_ttl_ms: Option<u64>,
    /// TLS to the coordination service: a directory with `ca.pem` (the service's CA) and, for
    /// a service that checks its clients, `client.pem` and `client.key` (etcd or ZooKeeper).
    #[serde(default)]
    pub coordination_certs: Option<PathBuf>,
}

/// The shortest lease or session a node asks a coordination service for.
pub const MIN_COORDINATION_TTL_MS: u64 = 500;
/// The longest.
pub const MAX_COORDINATION_TTL_MS: u64 = 60_000;

fn one() -> u32 {
    1
}

impl NodeConfig {
    /// Node `id` listening on `listen` with the certificates in `certs`, everything else at
    /// its default (no seeds, a cluster of one until `nodes` or `seeds` say more).
    pub fn new(id: u32, listen: SocketAddr, certs: PathBuf) -> Self {
        Self {
            id,
            listen,
            certs,
            seeds: Vec::new(),
            nodes: None,
            data_dir: None,
            detector: DetectorConfig::default(),
            job: None,
            out: None,
            crash_before_rename: None,
            rogue: false,
            replicas: None,
            report_steps: Vec::new(),
            max_jobs: one(),
            revoked: Vec::new(),
            record_commits: false,
            no_leases: false,
            coordination: Default::default(),
            coordination_ttl_ms: None,
            coordination_certs: None,
        }
    }

    /// How trainers are spread over the nodes: by hashing on a coordination service (as the
    /// classic ZooKeeper designs assign partitions), on the ring with the embedded membership.
    /// Every member derives it from the same coordination spec, so all compute one placement.
    pub fn placement(&self) -> super::placement::Policy {
        match self.coordination {
            super::coordination::Coordination::Embedded => super::placement::Policy::Ring,
            _ => super::placement::Policy::Hash,
        }
    }

    /// The timing of this node's session with its coordination service.
    pub fn coordination_settings(&self) -> Result<super::coordination::Settings, Error> {
        let mut settings = super::coordination::Settings::default();
        if let Some(ttl) = self.coordination_ttl_ms {
            settings.ttl = std::time::Duration::from_millis(ttl);
            settings.join_timeout = settings.join_timeout.max(3 * settings.ttl);
        }
        if let Some(dir) = &self.coordination_certs {
            settings.tls = Some(std::sync::Arc::new(super::coordination::ServiceTls::load(dir)?));
        }
        Ok(settings)
    }

    /// The configured members: `0..nodes`.
    pub fn members(&self) -> u32 {
        self.nodes.unwrap_or(self.seeds.len() as u32 + 1)
    }

    /// What a job leaves to the cluster, fixed the same way wherever the job enters it (a
    /// coordinator accepting a submission, every node loading its startup job): unless the job
    /// sets `aggregators`, one range of θ per configured member when it spreads them (the
    /// default), one when they all run on the coordinator (more ranges on one node would only
    /// add messages). The members are what every node already agrees on for its quorum, so the
    /// nodes agree on the ranges too.
    pub fn admit(&self, job: &mut crate::JobConfig) {
        let spread = job.aggregator_placement == crate::config::AggregatorPlacement::Spread;
        job.aggregators.get_or_insert(if spread { self.members() } else { 1 });
    }

    /// Checkpoint copies on other nodes: `replicas`, or the default for the cluster size.
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or_else(|| default_replicas(self.members())).min(self.members().saturating_sub(1))
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
        if let Some(r) = self.replicas.filter(|r| *r >= self.members()) {
            return field(
                "replicas",
                format!(
                    "{r} copies need {r} other nodes, and a {}-node cluster has {} (at most {})",
                    self.members(),
                    self.members() - 1,
                    self.members() - 1
                ),
            );
        }
        if self.detector.heartbeat_ms == 0 || self.detector.failure_timeout_ms <= self.detector.heartbeat_ms {
            return field("detector", "failure_timeout_ms must exceed heartbeat_ms, and both be positive".into());
        }
        if let Some(step) = self.crash_before_rename {
            crate::require_fault_injection(crate::FAULT_INJECTION, "crash_before_rename", &step)?;
        }
        if let Some(ttl) = self.coordination_ttl_ms {
            if !(MIN_COORDINATION_TTL_MS..=MAX_COORDINATION_TTL_MS).contains(&ttl) {
                return field(
                    "coordination_ttl_ms",
                    format!("{ttl} ms is outside {MIN_COORDINATION_TTL_MS}–{MAX_COORDINATION_TTL_MS} ms"),
                );
            }
        }
        if self.no_leases {
            crate::require_fault_injection(crate::FAULT_INJECTION, "no_leases", &true)?;
        }
        if let Some(lease) = self.detector.lease_ms {
            if lease < 2 * self.detector.heartbeat_ms {
                return field(
                    "detector",
                    format!(
                        "lease_ms {lease} is shorter than two heartbeats ({} ms): the lease would lapse between them",
                        2 * self.detector.heartbeat_ms
                    ),
                );
            }
        }
        if self.rogue {
            crate::require_fault_injection(crate::FAULT_INJECTION, "rogue", &"rogue = true")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregatorPlacement;

    #[test]
    fn a_job_without_aggregators_gets_one_range_per_member_when_spread_else_one() {
        let mut config = NodeConfig::new(0, "127.0.0.1:0".parse().unwrap(), PathBuf::from("certs"));
        config.nodes = Some(5);
        let admitted = |placement, aggregators| {
            let mut job = crate::JobConfig { aggregator_placement: placement, aggregators, ..Default::default() };
            config.admit(&mut job);
            job.aggregators
        };
        assert_eq!(admitted(AggregatorPlacement::default(), None), Some(5), "the default spreads them");
        assert_eq!(admitted(AggregatorPlacement::Spread, None), Some(5));
        assert_eq!(admitted(AggregatorPlacement::Coordinator, None), Some(1));
        assert_eq!(admitted(AggregatorPlacement::Spread, Some(2)), Some(2), "a job's own number stays");
        assert_eq!(admitted(AggregatorPlacement::Coordinator, Some(3)), Some(3));
    }
}
