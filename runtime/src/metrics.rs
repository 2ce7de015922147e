//! Prometheus metrics of one node.
//!
//! Every node owns its own [`NodeMetrics`] (a `prometheus-client` registry),
//! so several nodes in one process — as the tests run them — never share a
//! counter by accident; nothing here is process-global. Names follow
//! Prometheus' conventions: prefix `phalanx_`, base units (`_seconds`,
//! `_bytes`), `_total` for counters, and a `phalanx_build_info` gauge.
//! `prometheus-client` was chosen over the `metrics` facade for exactly that:
//! explicit registries instead of one global recorder.
//!
//! `phalanx node --metrics ADDR` serves the text format at `/metrics`
//! ([`serve`]).
//!
//! ```
//! let metrics = phalanx::metrics::NodeMetrics::new(0);
//! metrics.steps_applied.inc();
//! let text = metrics.encode();
//! assert!(text.contains("phalanx_steps_applied_total{node=\"0\"} 1"));
//! assert!(text.contains("phalanx_build_info"));
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Error;

/// A label naming a kind (of traffic, of cause, of state, of reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The kind.
    pub kind: String,
}

impl Kind {
    /// The label `kind="…"`.
    pub fn of(kind: impl Into<String>) -> Self {
        Self { kind: kind.into() }
    }
}

/// A label naming why something happened (a restart, a recovery).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Cause {
    /// The cause.
    pub cause: String,
}

impl Cause {
    /// The label `cause="…"`.
    pub fn of(cause: impl Into<String>) -> Self {
        Self { cause: cause.into() }
    }
}

/// The label of `phalanx_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
    /// `true` in a build with the in-process fault hooks (see [`crate::FAULT_INJECTION`]).
    fault_injection: String,
}

/// Histogram buckets for durations from 1 ms to about 16 s.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

fn seconds_histogram() -> Histogram {
    Histogram::new(seconds_buckets())
}

/// Histogram buckets for checkpoint writes: from 100 µs (a small model on a
/// fast disk) to about 13 s.
fn checkpoint_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18))
}

/// The metrics of one node.
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    /// Training steps applied by the jobs this node coordinates.
    pub steps_applied: Counter,
    /// Training samples applied (replays included).
    pub samples_applied: Counter,
    /// Wall time between consecutive applied steps.
    pub step_duration: Histogram,
    /// Frame bytes sent to other nodes, by kind (`gradients`, `params`,
    /// `batches`, `checkpoint`, `control`, `membership`; see
    /// [`Traffic`](crate::cluster::runner::Traffic)).
    pub bytes_sent: Family<Kind, Counter>,
    /// Frame bytes received from other nodes, by kind.
    pub bytes_received: Family<Kind, Counter>,
    /// Actors restarted by the supervisors this node runs, by cause
    /// (`actor_failed`, `start_failed`, `spawn_timeout`, `node_lost`).
    pub restarts: Family<Cause, Counter>,
    /// Recoveries of the jobs this node coordinates — the first step applied
    /// after failures — by cause (those of `restarts`, and `takeover` when
    /// this node took over a job from a lost coordinator).
    pub recoveries: Family<Cause, Counter>,
    /// From a failure being noticed (or, for a takeover, the view that made
    /// this node coordinator) to the first step applied after it.
    pub recovery_duration: Histogram,
    /// From a member's last heartbeat to it being declared down.
    pub failure_detection: Histogram,
    /// Epoch of the adopted membership view.
    pub membership_epoch: Gauge,
    /// Members of the adopted view.
    pub members: Gauge,
    /// Connections refused, by reason (the transport's close code name).
    pub rejected_connections: Family<Kind, Counter>,
    /// Messages from members dropped by the authority checks, by message kind.
    pub rejected_messages: Family<Kind, Counter>,
    /// Checkpoint files this node wrote: the time to write, fsync and rename
    /// one and fsync its directory.
    pub checkpoint_duration: Histogram,
    /// Checkpoint files this node could not write, by kind (`save`: its own
    /// aggregator's; `copy`: a copy of another node's).
    pub checkpoint_failures: Family<Kind, Counter>,
    /// Jobs by state (`queued`, `running`, `finished`, `failed`, `cancelled`).
    pub jobs: Family<Kind, Gauge>,
    /// Coordinator takeovers, by where the restore came from (`local`, `fetched`, `scratch`).
    pub takeovers: Family<Kind, Counter>,
    /// 1 while a coordinator waits before starting a job (missing members of a fresh job).
    pub coordinator_waiting: Gauge,
}

impl NodeMetrics {
    /// A fresh registry for node `node` (every series carries `node="<id>"`).
    pub fn new(node: u32) -> Arc<Self> {
        let mut registry =
            Registry::with_prefix_and_labels("phalanx", [("node".into(), node.to_string().into())].into_iter());
        let m = Self {
            steps_applied: Counter::default(),
            samples_applied: Counter::default(),
            step_duration: seconds_histogram(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            restarts: Family::default(),
            recoveries: Family::default(),
            recovery_duration: seconds_histogram(),
            failure_detection: seconds_histogram(),
            membership_epoch: Gauge::default(),
            members: Gauge::default(),
            rejected_connections: Family::default(),
            rejected_messages: Family::default(),
            checkpoint_duration: checkpoint_histogram(),
            checkpoint_failures: Family::default(),
            jobs: Family::default(),
            takeovers: Family::default(),
            coordinator_waiting: Gauge::default(),
            registry: Registry::default(),
        };
        use prometheus_client::registry::Unit;
        let r = &mut registry;
        r.register("steps_applied", "Training steps applied", m.steps_applied.clone());
        r.register("samples_applied", "Training samples applied, replays included", m.samples_applied.clone());
        let seconds = "Wall time between consecutive applied steps";
        r.register_with_unit("step_duration", seconds, Unit::Seconds, m.step_duration.clone());
        r.register_with_unit("network_sent", "Frame bytes sent, by kind", Unit::Bytes, m.bytes_sent.clone());
        r.register_with_unit(
            "network_received",
            "Frame bytes received, by kind",
            Unit::Bytes,
            m.bytes_received.clone(),
        );
        r.register("restarts", "Actors restarted, by cause", m.restarts.clone());
        r.register("recoveries", "First steps applied after failures, by cause", m.recoveries.clone());
        let recovery = "From a failure being noticed to the first step applied after it";
        r.register_with_unit("recovery_duration", recovery, Unit::Seconds, m.recovery_duration.clone());
        let detection = "From a member's last heartbeat to it being declared down";
        r.register_with_unit("failure_detection", detection, Unit::Seconds, m.failure_detection.clone());
        r.register("membership_epoch", "Epoch of the adopted membership view", m.membership_epoch.clone());
        r.register("members", "Members of the adopted view", m.members.clone());
        r.register("rejected_connections", "Connections refused, by reason", m.rejected_connections.clone());
        r.register(
            "rejected_messages",
            "Messages from members dropped: not entitled under the view, or out of range; by kind",
            m.rejected_messages.clone(),
        );
        let checkpoint = "Time to write, fsync and rename a checkpoint file";
        r.register_with_unit("checkpoint_duration", checkpoint, Unit::Seconds, m.checkpoint_duration.clone());
        let failures = "Checkpoint files that could not be written, by kind";
        r.register("checkpoint_failures", failures, m.checkpoint_failures.clone());
        r.register("jobs", "Jobs by state", m.jobs.clone());
        r.register("takeovers", "Coordinator takeovers, by restore source", m.takeovers.clone());
        let waiting = "1 while a coordinator waits before starting a job";
        r.register("coordinator_waiting", waiting, m.coordinator_waiting.clone());
        let build: Family<Build, Gauge> = Family::default();
        build
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION").into(),
                fault_injection: crate::FAULT_INJECTION.to_string(),
            })
            .set(1);
        registry.register("build_info", "Build of this node", build);
        Arc::new(Self { registry, ..m })
    }

    /// The registry in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serve `metrics` at `http://ADDR/metrics` until `shutdown` resolves;
/// returns the bound address (port 0 picks one) once listening.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<NodeMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Field { field: "metrics".into(), reason: format!("cannot listen on {addr}: {e}") })?;
    let bound = listener.local_addr().map_err(|source| Error::Io { path: addr.to_string().into(), source })?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics.encode(),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(%bound, "metrics server stopped: {e}");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_in_one_process_keep_separate_counts() {
        let (a, b) = (NodeMetrics::new(0), NodeMetrics::new(1));
        a.steps_applied.inc_by(5);
        a.bytes_sent.get_or_create(&Kind::of("tensor")).inc_by(4096);
        b.rejected_connections.get_or_create(&Kind::of("duplicate identity")).inc();
        let (ta, tb) = (a.encode(), b.encode());
        assert!(ta.contains("phalanx_steps_applied_total{node=\"0\"} 5"), "{ta}");
        assert!(tb.contains("phalanx_steps_applied_total{node=\"1\"} 0"), "{tb}");
        assert!(ta.contains("phalanx_network_sent_bytes_total{node=\"0\",kind=\"tensor\"} 4096"), "{ta}");
        assert!(tb.contains("phalanx_rejected_connections_total{node=\"1\",kind=\"duplicate identity\"} 1"), "{tb}");
        assert!(!ta.contains("duplicate identity"));
    }

    #[test]
    fn restarts_and_recoveries_carry_their_cause_and_checkpoint_failures_their_kind() {
        let m = NodeMetrics::new(3);
        m.restarts.get_or_create(&Cause::of("node_lost")).inc_by(2);
        m.recoveries.get_or_create(&Cause::of("node_lost")).inc();
        m.recovery_duration.observe(0.25);
        m.checkpoint_duration.observe(0.003);
        m.checkpoint_failures.get_or_create(&Kind::of("copy")).inc();
        let text = m.encode();
        for line in [
            "phalanx_restarts_total{node=\"3\",cause=\"node_lost\"} 2",
            "phalanx_recoveries_total{node=\"3\",cause=\"node_lost\"} 1",
            "phalanx_recovery_duration_seconds_count{node=\"3\"} 1",
            "phalanx_recovery_duration_seconds_bucket{node=\"3\",le=\"0.256\"} 1",
            "phalanx_checkpoint_duration_seconds_bucket{node=\"3\",le=\"0.0032\"} 1",
            "phalanx_checkpoint_failures_total{node=\"3\",kind=\"copy\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let text = NodeMetrics::new(3).encode();
        for name in [
            "phalanx_step_duration_seconds",
            "phalanx_failure_detection_seconds",
            "phalanx_recovery_duration_seconds",
            "phalanx_checkpoint_duration_seconds",
            "phalanx_build_info",
            "phalanx_membership_epoch",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} in {text}");
        }
    }
}
