//! What a node tells the program that runs it: typed events.
//!
//! The library never prints. A node hands every event to its [`EventSink`];
//! the `phalanx node` binary prints each as one JSON line on stdout (the
//! format `phalanx local` and scripts read: `event`, `node`, `t_ms` and the
//! event's fields), and an embedding service subscribes to
//! [`NodeHandle::events`](crate::node::NodeHandle::events).
//!
//! ```
//! use phalanx::cluster::event::{NodeEvent, NodeEventKind};
//!
//! let e = NodeEvent::new(2, NodeEventKind::Down { peer: 0, cause: None });
//! let line = serde_json::to_value(&e).unwrap();
//! assert_eq!((line["event"].as_str(), line["node"].as_u64(), line["peer"].as_u64()), (Some("down"), Some(2), Some(0)));
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::registry::JobId;

/// One event of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// The node that saw it.
    pub node: u32,
    /// When, in milliseconds since the Unix epoch (so a driver can measure
    /// detection time against the moment it killed a process).
    pub t_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: NodeEventKind,
}

impl NodeEvent {
    /// `kind` seen by `node` now.
    pub fn new(node: u32, kind: NodeEventKind) -> Self {
        Self { node, t_ms: unix_ms(), kind }
    }
}

/// Milliseconds since the Unix epoch, on the runtime's clock (virtual in the simulation
/// tier; see [`phalanx_actors::clock`]).
pub fn unix_ms() -> u64 {
    phalanx_actors::clock::unix_ms()
}

/// Which side of a duplicate identity a node is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateRole {
    /// A member that refused a second process with a member's id.
    Member,
    /// The second process, refused.
    Refused,
}

/// Why a member was declared down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DownCause {
    /// Nothing heard from it for the failure timeout.
    Silence,
    /// Silent for two heartbeats, and its host refused a probe of its address: no process
    /// listens there any more.
    Refused,
    /// Another process with its id connected (it restarted, perhaps before any silence was
    /// noticed): the process known before died, with its actors.
    Restarted,
}

/// What happened (serialised with `"event": "<snake_case name>"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEventKind {
    /// The node is bound and listening.
    Listening {
        /// The bound UDP address.
        addr: SocketAddr,
        /// The process id.
        pid: u32,
    },
    /// A member connected.
    PeerUp {
        /// The member.
        peer: u32,
        /// Its address.
        addr: SocketAddr,
    },
    /// A member's connection went away.
    PeerDown {
        /// The member.
        peer: u32,
        /// Why.
        reason: String,
    },
    /// A member was declared down.
    Down {
        /// The member.
        peer: u32,
        /// Why: `silence` (no heartbeat within the failure timeout), `refused` (silent for
        /// two heartbeats, and its host refused a probe of its address: the process died) or
        /// `restarted` (another process with its id connected).
        /// Absent in events written before the probe existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<DownCause>,
    },
    /// A membership view was adopted.
    View {
        /// Its epoch.
        epoch: u64,
        /// Its coordinator.
        coordinator: u32,
        /// Its live members.
        members: BTreeSet<u32>,
    },
    /// This node no longer hears a majority: it stops training and waits.
    QuorumLost {
        /// Members it still hears (itself included).
        reachable: Vec<u32>,
        /// Members it waits for.
        missing: Vec<u32>,
        /// Members needed for a majority.
        needed: u32,
    },
    /// A connection was refused.
    Rejected {
        /// Where it came from.
        addr: SocketAddr,
        /// The node it claimed to be, if known.
        peer: Option<u32>,
        /// The close code.
        code: u32,
        /// Why.
        reason: String,
    },
    /// A second process with a member's node id.
    DuplicateIdentity {
        /// This node's side of it.
        role: DuplicateRole,
        /// The other node.
        peer: Option<u32>,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The coordinator asked this node to run an actor.
    Spawn {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// The actor, e.g. `trainer 1`.
        actor: String,
        /// The coordinator.
        from: u32,
    },
    /// This node coordinates the job from now on.
    Coordinating {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Its view's epoch.
        epoch: u64,
        /// The checkpoint step it restores (none: from step 0).
        restore: Option<u64>,
        /// Where that checkpoint came from: `local`, `node N`, `none`.
        restore_from: String,
    },
    /// A new coordinator fetches a checkpoint from a member.
    Fetching {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// The member.
        from: u32,
        /// The step.
        step: u64,
        /// The view.
        epoch: u64,
    },
    /// The coordinator does not start the job yet.
    Waiting {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Configured members it waits for.
        missing: Vec<u32>,
        /// Why.
        reason: String,
    },
    /// Training progressed (at a bounded rate, and at every step a harness asked for).
    Step {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Steps applied.
        step: u64,
        /// Steps of the whole job.
        total_steps: u64,
        /// Mean loss of the last step.
        loss: f64,
    },
    /// The coordinator's `step` of a job, relayed to this node, which does not
    /// coordinate it (so a job watched on any node shows its progress; at most as
    /// often as the coordinator reports `step`).
    Progress {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Steps applied.
        step: u64,
        /// Steps of the whole job.
        total_steps: u64,
        /// Mean loss of the last step.
        loss: f64,
        /// The coordinator that applied it.
        from: u32,
    },
    /// Training progressed again after failures: the first step applied
    /// once the lost actors run again (or, after a takeover, the first step
    /// this node applies as the new coordinator). Counted in the same place
    /// as `phalanx_recoveries_total` and `phalanx_recovery_duration_seconds`.
    Recovered {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// The step applied.
        step: u64,
        /// Why actors were lost: `actor_failed`, `start_failed`,
        /// `spawn_timeout`, `node_lost`, or `takeover`.
        cause: String,
        /// The actors lost, e.g. `trainer 2` (none for a takeover).
        actors: Vec<String>,
        /// From the first failure being noticed (or the view that made this
        /// node coordinator) to the step.
        recovery_ms: u64,
    },
    /// The job finished.
    JobDone {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Where its summary was written.
        summary: Option<String>,
        /// SHA-256 of the final parameters.
        model_sha256: String,
        /// The coordinator that finished it.
        from: u32,
    },
    /// The job failed.
    JobFailed {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// Why.
        error: String,
    },
    /// This node's copy of the job registry changed a job's state
    /// (`queued`, `running`, `finished`, `failed`, `cancelled`).
    JobState {
        /// The job.
        job: u64,
        /// Its state now.
        state: String,
        /// Finished: SHA-256 of the final parameters.
        model_sha256: Option<String>,
        /// Finished: where the summary was written.
        summary: Option<String>,
        /// Failed: why.
        error: Option<String>,
    },
    /// Messages of a kind from a member were dropped because the member was not entitled to
    /// send them under the adopted view (a `job-done` not from the coordinator, a `params`
    /// from a node that does not host that aggregator, a `view` not from the node the local
    /// rules elect) or because a value in them is out of range. Reported at a bounded rate:
    /// `count` is the running total of this kind from this member, and the last event of a
    /// burst always carries the final total (see [`authority`](super::authority)).
    MessageRejected {
        /// The member that sent them.
        peer: u32,
        /// The message kind, e.g. `job-done`, `spawn`, `rollback`, `view`, `checkpoint-copy`.
        kind: String,
        /// Why the last one was dropped.
        reason: String,
        /// Messages of this kind from this member dropped so far.
        count: u64,
    },
    /// Fault injection (a `fault-injection` build acting as a rogue member): this node sent a
    /// forged message of `kind` to `to`.
    Forged {
        /// The member it went to.
        to: u32,
        /// The message kind, as [`NodeEventKind::MessageRejected`] names it.
        kind: String,
    },
    /// An aggregator on this node (the coordinator) applied a step (only with
    /// [`NodeConfig::record_commits`](super::node_config::NodeConfig::record_commits); the
    /// commit invariants of [`commits`](super::commits) are checked on these).
    Commit {
        /// The job (its id in the cluster's registry).
        job: u64,
        /// The parameter range.
        range: u32,
        /// The aggregator's generation (its top bits name the coordination term).
        generation: u64,
        /// The step applied: the range is now at this version.
        step: u64,
        /// FNV-1a hash of the range's parameters after the step (hex).
        hash: String,
        /// When, in microseconds since the Unix epoch.
        t_us: u64,
    },
    /// The node stopped.
    Stopped,
}

impl NodeEventKind {
    /// The job the event is about, if any.
    pub fn job(&self) -> Option<JobId> {
        match self {
            Self::Spawn { job, .. }
            | Self::Coordinating { job, .. }
            | Self::Fetching { job, .. }
            | Self::Waiting { job, .. }
            | Self::Step { job, .. }
            | Self::Progress { job, .. }
            | Self::Recovered { job, .. }
            | Self::JobDone { job, .. }
            | Self::JobFailed { job, .. }
            | Self::JobState { job, .. } => Some(*job),
            _ => None,
        }
    }
}

/// Where a node sends its events. Called on the node's own tasks: it must
/// return quickly (print a line, send on a channel), never block.
pub type EventSink = Arc<dyn Fn(NodeEvent) + Send + Sync>;

/// Hands a node's events to its sink, stamped with the node and the time.
#[derive(Clone)]
pub(crate) struct Emitter {
    pub(crate) node: u32,
    pub(crate) sink: EventSink,
}

impl Emitter {
    pub(crate) fn emit(&self, kind: NodeEventKind) {
        (self.sink)(NodeEvent::new(self.node, kind));
    }
}

/// A sink that drops every event.
pub fn discard() -> EventSink {
    Arc::new(|_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_as_the_json_lines_scripts_read() {
        let e = NodeEvent {
            node: 1,
            t_ms: 7,
            kind: NodeEventKind::Coordinating { job: 1, epoch: 3, restore: None, restore_from: "none".into() },
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"event": "coordinating", "node": 1, "t_ms": 7, "job": 1, "epoch": 3, "restore": null, "restore_from": "none"})
        );
        let stopped = serde_json::to_value(NodeEvent { node: 0, t_ms: 1, kind: NodeEventKind::Stopped }).unwrap();
        assert_eq!(stopped, serde_json::json!({"event": "stopped", "node": 0, "t_ms": 1}));
        let dup = NodeEventKind::DuplicateIdentity {
            role: DuplicateRole::Refused,
            peer: Some(0),
            addr: "127.0.0.1:9".parse().unwrap(),
            reason: "x".into(),
        };
        let v = serde_json::to_value(NodeEvent { node: 1, t_ms: 1, kind: dup }).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["role"].as_str(), v["addr"].as_str()),
            (Some("duplicate_identity"), Some("refused"), Some("127.0.0.1:9"))
        );
    }
}
