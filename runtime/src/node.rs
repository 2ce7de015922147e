//! Embedding a node in a tokio program: [`Node::builder`] … [`NodeBuilder::start`]
//! returns a [`NodeHandle`] — the bound address, a stream of typed events, the
//! node's metrics, and a graceful shutdown.
//!
//! ```text
//!  Node::builder().id(0).listen(addr).certs_dir(dir).seeds(..).job(config)
//!        │ start().await            (binds, then runs on the caller's runtime)
//!        ▼
//!  NodeHandle ── local_addr() ── events() ──▶ Stream<NodeEvent> ── metrics() ── shutdown().await
//! ```
//!
//! Several nodes may run in one process (the tests do): nothing here is
//! process-global — each node has its own event channel, metrics registry and
//! actor names.
//!
//! ```no_run
//! # async fn demo() -> Result<(), phalanx::Error> {
//! use tokio_stream::StreamExt;
//! let node = phalanx::Node::builder()
//!     .id(0)
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .certs_dir("certs")
//!     .seeds(vec!["127.0.0.1:7001".parse().unwrap(), "127.0.0.1:7002".parse().unwrap()])
//!     .start()
//!     .await?;
//! println!("node 0 listening on {}", node.local_addr());
//! let mut events = node.events();
//! while let Some(event) = events.next().await {
//!     println!("{}", serde_json::to_string(&event).unwrap());
//! #   break;
//! }
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use phalanx_transport::certs::NodeIdentity;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::cluster::event::{NodeEvent, NodeEventKind};
use crate::cluster::jobs::NodeCommand;
use crate::cluster::membership::DetectorConfig;
use crate::cluster::node::{run_node_with, NodeConfig, NodeParts};
use crate::cluster::registry::{JobEntry, JobId};
use crate::config::JobConfig;
use crate::error::Error;
use crate::job::Registries;
use crate::metrics::NodeMetrics;

/// Commands (submit, cancel, list) queued to a node at most; callers wait beyond.
const COMMAND_CAPACITY: usize = 64;

/// Events buffered per subscriber; a subscriber further behind skips the
/// oldest (and is told how many in a log line), the node never waits for it.
pub const EVENT_CAPACITY: usize = 4096;

/// The entry point: see [`Node::builder`].
#[derive(Debug)]
pub struct Node;

impl Node {
    /// A builder for a node; at least [`id`](NodeBuilder::id) and an identity
    /// ([`certs_dir`](NodeBuilder::certs_dir) or [`identity`](NodeBuilder::identity)) are needed.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// Configures a node; [`start`](Self::start) binds and runs it.
#[derive(Debug, Default)]
pub struct NodeBuilder {
    id: Option<u32>,
    listen: Option<SocketAddr>,
    certs: Option<PathBuf>,
    identity: Option<NodeIdentity>,
    seeds: Vec<SocketAddr>,
    nodes: Option<u32>,
    data_dir: Option<PathBuf>,
    detector: DetectorConfig,
    replicas: Option<u32>,
    job: Option<JobConfig>,
    out: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    max_jobs: Option<u32>,
    registries: Registries,
    coordination: crate::cluster::coordination::Coordination,
    coordination_ttl_ms: Option<u64>,
    coordination_certs: Option<PathBuf>,
}

impl NodeBuilder {
    /// This node's id (its certificate must name `node-<id>`).
    pub fn id(mut self, id: u32) -> Self {
        self.id = Some(id);
        self
    }
    /// The UDP address to listen on (port 0 picks one; see [`NodeHandle::local_addr`]).
    /// Default `127.0.0.1:0`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }
    /// Load the identity from a directory written by `phalanx certs`.
    pub fn certs_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.certs = Some(dir.into());
        self
    }
    /// Use an identity already in memory (see [`NodeIdentity::from_pem`]).
    pub fn identity(mut self, identity: NodeIdentity) -> Self {
        self.identity = Some(identity);
        self
    }
    /// Addresses of the other members.
    pub fn seeds(mut self, seeds: Vec<SocketAddr>) -> Self {
        self.seeds = seeds;
        self
    }
    /// Configured cluster size (members are nodes `0..n`); default: seeds + 1.
    pub fn nodes(mut self, n: u32) -> Self {
        self.nodes = Some(n);
        self
    }
    /// Where the node keeps its state (checkpoint copies).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }
    /// Failure-detector settings.
    pub fn detector(mut self, detector: DetectorConfig) -> Self {
        self.detector = detector;
        self
    }
    /// Checkpoint copies on other nodes (default: 2 from 5 members on, else 1).
    pub fn replicas(mut self, r: u32) -> Self {
        self.replicas = Some(r);
        self
    }
    /// The job this cluster trains (every member is given the same one).
    pub fn job(mut self, job: JobConfig) -> Self {
        self.job = Some(job);
        self
    }
    /// Where the coordinator writes `summary.json` and `model.safetensors`.
    pub fn out(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out = Some(dir.into());
        self
    }
    /// Jobs running at once (default 1); more wait in the queue, first in first out.
    pub fn max_jobs(mut self, n: u32) -> Self {
        self.max_jobs = Some(n);
        self
    }
    /// The models this node can host (default: the built-ins). A job naming a model that is
    /// not in it fails with an error naming the model.
    pub fn models(mut self, models: phalanx_actors::model::ModelRegistry) -> Self {
        self.registries.models = models;
        self
    }
    /// The data sources this node can load (default: the built-ins and CSV). Every node that
    /// hosts part of a job loads its data through its own registry.
    pub fn datasets(mut self, datasets: phalanx_actors::data::DataRegistry) -> Self {
        self.registries.data = datasets;
        self
    }
    /// Keep membership, the coordinator election and the views on a coordination service
    /// (default: [`Coordination::Embedded`](crate::cluster::coordination::Coordination), heartbeats
    /// between the nodes). Every node of a cluster must name the same one.
    pub fn coordination(mut self, spec: crate::cluster::coordination::Coordination) -> Self {
        self.coordination = spec;
        self
    }
    /// TLS to the coordination service: a directory with `ca.pem` and, if the service checks
    /// its clients, `client.pem` and `client.key` (see [`crate::cluster::coordination::ServiceTls`]).
    pub fn coordination_certs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.coordination_certs = Some(dir.into());
        self
    }
    /// The lease TTL (etcd) or session timeout (ZooKeeper) in ms; default 2000.
    pub fn coordination_ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.coordination_ttl_ms = Some(ttl_ms);
        self
    }
    /// Serve Prometheus metrics at `http://ADDR/metrics` (port 0 picks one;
    /// see [`NodeHandle::metrics_addr`]).
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Bind and start the node on the caller's tokio runtime. Returns once it
    /// listens; errors (bad config, certificates, address in use) come back here.
    pub async fn start(self) -> Result<NodeHandle, Error> {
        let missing = |f: &str| Error::Field { field: f.into(), reason: "required".into() };
        let id = self.id.ok_or_else(|| missing("id"))?;
        let identity = match (self.identity, &self.certs) {
            (Some(identity), _) => identity,
            (None, Some(dir)) => NodeIdentity::load(dir, id)
                .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?,
            (None, None) => return Err(missing("certs (or an identity)")),
        };
        let config = NodeConfig {
            id,
            listen: self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            certs: self.certs.unwrap_or_default(),
            seeds: self.seeds,
            nodes: self.nodes,
            data_dir: self.data_dir,
            detector: self.detector,
            job: None,
            out: self.out,
            crash_before_rename: None,
            rogue: false,
            replicas: self.replicas,
            report_steps: Vec::new(),
            max_jobs: self.max_jobs.unwrap_or(1).max(1),
            revoked: Vec::new(),
            record_commits: false,
            no_leases: false,
            coordination: self.coordination,
            coordination_ttl_ms: self.coordination_ttl_ms,
            coordination_certs: self.coordination_certs,
        };
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let metrics = NodeMetrics::new(id);
        let (bound_tx, bound_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (commands, commands_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (revocations, revocations_rx) = tokio::sync::watch::channel(phalanx_transport::Revocations::default());
        let handle_registries = self.registries.clone();
        let sink_events = events.clone();
        let parts = NodeParts {
            events: Arc::new(move |e| {
                // No subscriber is fine: nobody listens.
                let _ = sink_events.send(e);
            }),
            metrics: metrics.clone(),
            identity: Some(identity),
            job: self.job,
            bound: Some(bound_tx),
            commands: Some(commands_rx),
            registries: self.registries.clone(),
            revocations: Some(revocations_rx),
            #[cfg(feature = "fault-injection")]
            freeze: None,
        };
        let task = tokio::spawn(run_node_with(config, parts, async move {
            let _ = stop_rx.await;
        }));
        let addr = match bound_rx.await {
            Ok(addr) => addr,
            // The node ended before it listened: its error says why.
            Err(_) => {
                return Err(match task.await {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => Error::Spawn(format!("node {id} stopped before it listened")),
                    Err(e) => Error::Spawn(format!("node {id} task failed: {e}")),
                })
            }
        };
        let metrics_addr = match self.metrics {
            Some(at) => {
                let mut stopped = events.subscribe();
                let until_stopped = async move {
                    loop {
                        match stopped.recv().await {
                            Ok(NodeEvent { kind: NodeEventKind::Stopped, .. })
                            | Err(broadcast::error::RecvError::Closed) => break,
                            _ => {}
                        }
                    }
                };
                Some(crate::metrics::serve(at, metrics.clone(), until_stopped).await?.0)
            }
            None => None,
        };
        Ok(NodeHandle {
            inner: Arc::new(Inner {
                id,
                addr,
                metrics_addr,
                events,
                metrics,
                commands,
                registries: handle_registries,
                revocations,
                stop: Mutex::new(Some(stop_tx)),
                task: tokio::sync::Mutex::new(Some(task)),
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    id: u32,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    events: broadcast::Sender<NodeEvent>,
    metrics: Arc<NodeMetrics>,
    commands: mpsc::Sender<NodeCommand>,
    registries: Registries,
    revocations: tokio::sync::watch::Sender<phalanx_transport::Revocations>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<Result<(), Error>>>>,
}

/// A running node; cheap to clone (every clone is the same node).
#[derive(Clone, Debug)]
pub struct NodeHandle {
    inner: Arc<Inner>,
}

impl NodeHandle {
    /// The node's id.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// The bound UDP address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Where `/metrics` is served, when asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.inner.metrics_addr
    }

    /// The node's metrics registry.
    pub fn metrics(&self) -> Arc<NodeMetrics> {
        self.inner.metrics.clone()
    }

    /// Every event from now on. A subscriber that falls more than
    /// [`EVENT_CAPACITY`] events behind skips the oldest (logged).
    pub fn events(&self) -> impl Stream<Item = NodeEvent> + Unpin + Send + 'static {
        let node = self.inner.id;
        BroadcastStream::new(self.inner.events.subscribe()).filter_map(move |e| match e {
            Ok(e) => Some(e),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!(node, skipped = n, "an event subscriber fell behind; {n} event(s) skipped");
                None
            }
        })
    }

    /// Replace the certificates this node refuses: handshakes presenting one are refused,
    /// and live connections (members and clients) presenting one are closed at once.
    pub fn set_revocations(&self, list: phalanx_transport::Revocations) {
        self.inner.revocations.send_replace(list);
    }

    /// Submit a job to the cluster from this node (any member: it is forwarded
    /// to the coordinator). Checks the spec here first (data, model, fields:
    /// errors name the field); returns once a majority of the cluster holds the
    /// job, so a coordinator dying right after does not lose it. Jobs run in
    /// submission order, at most `max_jobs` at once.
    pub async fn submit(&self, spec: JobConfig) -> Result<JobHandle, Error> {
        let (check, registries) = (spec.clone(), self.inner.registries.clone());
        tokio::task::spawn_blocking(move || {
            crate::PreparedJob::with_registries(check, &registries.models, &registries.data)
        })
        .await
        .map_err(|e| Error::Spawn(format!("checking the job: {e}")))??;
        // Subscribed before the job can run, so its events are never missed.
        let events = self.events();
        let (reply, answer) = oneshot::channel();
        self.command(NodeCommand::Submit { spec: Box::new(spec), reply }).await?;
        let id = answer.await.map_err(|_| self.stopped())??;
        Ok(JobHandle { id, node: self.clone(), events: Mutex::new(Some(Box::pin(events))) })
    }

    /// The jobs this node knows of (its copy of the cluster's registry).
    pub async fn jobs(&self) -> Result<Vec<JobEntry>, Error> {
        let (reply, answer) = oneshot::channel();
        self.command(NodeCommand::Jobs { reply }).await?;
        answer.await.map_err(|_| self.stopped())
    }

    /// Cancel job `id` (forwarded to the coordinator): its actors stop on every node.
    pub async fn cancel(&self, id: JobId) -> Result<(), Error> {
        self.command(NodeCommand::Cancel { job: id }).await
    }

    async fn command(&self, cmd: NodeCommand) -> Result<(), Error> {
        self.inner.commands.send(cmd).await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> Error {
        Error::Submit(format!("node {} has stopped", self.inner.id))
    }

    /// Stop gracefully: hosted actors stop (the coordinator, if this node is
    /// one, stops its job; a successor resumes it from the replicated
    /// checkpoints), connections close with a shutdown code, and this returns
    /// once the node has stopped (bounded: connections drain for at most
    /// 250 ms). Returns the node's error if it had failed. Idempotent.
    pub async fn shutdown(&self) -> Result<(), Error> {
        if let Some(stop) = self.inner.stop.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = stop.send(());
        }
        let task = self.inner.task.lock().await.take();
        match task {
            Some(task) => task.await.map_err(|e| Error::Spawn(format!("node {} task failed: {e}", self.inner.id)))?,
            None => Ok(()),
        }
    }
}

/// What a finished job produced, as the cluster reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobResult {
    /// The job.
    pub id: JobId,
    /// SHA-256 of the final parameters (see [`crate::model_sha256`]).
    pub model_sha256: String,
    /// Where the coordinator wrote `summary.json` (and `model.safetensors` beside it).
    pub summary: Option<PathBuf>,
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = NodeEvent> + Send>>;

/// A submitted job: its id, its events, its outcome.
pub struct JobHandle {
    id: JobId,
    node: NodeHandle,
    events: Mutex<Option<EventStream>>,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle").field("id", &self.id).field("node", &self.node.id()).finish()
    }
}

impl JobHandle {
    /// The job's id in the cluster.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// This job's events seen by the node it was submitted to (on the
    /// coordinator: `coordinating`, `step` at a bounded rate, `recovered`, `job_done`; on
    /// the other members: the coordinator's steps relayed as `progress`; on every node:
    /// `job_state` changes).
    pub fn progress(&self) -> impl Stream<Item = NodeEvent> + Unpin + Send + 'static {
        let id = self.id;
        self.node.events().filter(move |e| job_of(&e.kind) == Some(id))
    }

    /// Cancel the job.
    pub async fn cancel(&self) -> Result<(), Error> {
        self.node.cancel(self.id).await
    }

    /// Wait for the job to end: its result when it finished, an error naming
    /// the job when it failed or was cancelled (or the node stopped).
    pub async fn outcome(&self) -> Result<JobResult, Error> {
        let id = self.id;
        let taken = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let mut events: EventStream = match taken {
            Some(events) => events,
            None => Box::pin(self.node.events()),
        };
        // The job may have ended before this call (and before a fresh subscription).
        if let Some(entry) = self.node.jobs().await?.into_iter().find(|j| j.id == id) {
            if let Some(r) = ended(id, &entry.state) {
                return r;
            }
        }
        while let Some(e) = events.next().await {
            if let NodeEventKind::JobState { job, ref state, ref model_sha256, ref summary, ref error } = e.kind {
                if job != id {
                    continue;
                }
                let state = match state.as_str() {
                    "finished" => crate::cluster::registry::JobState::Finished {
                        model_sha256: model_sha256.clone().unwrap_or_default(),
                        summary: summary.clone(),
                    },
                    "failed" => crate::cluster::registry::JobState::Failed { error: error.clone().unwrap_or_default() },
                    "cancelled" => crate::cluster::registry::JobState::Cancelled,
                    _ => continue,
                };
                if let Some(r) = ended(id, &state) {
                    return r;
                }
            }
        }
        Err(Error::Submit(format!("node {} stopped before job {id} ended", self.node.id())))
    }
}

/// The result of a job that is over; none while it is queued or running.
fn ended(id: JobId, state: &crate::cluster::registry::JobState) -> Option<Result<JobResult, Error>> {
    use crate::cluster::registry::JobState;
    match state {
        JobState::Finished { model_sha256, summary } => {
            Some(Ok(JobResult { id, model_sha256: model_sha256.clone(), summary: summary.as_ref().map(PathBuf::from) }))
        }
        JobState::Failed { error } => Some(Err(Error::Submit(format!("job {id} failed: {error}")))),
        JobState::Cancelled => Some(Err(Error::Submit(format!("job {id} was cancelled")))),
        JobState::Queued | JobState::Running => None,
    }
}

/// The job an event is about, if any (see [`NodeEventKind::job`]).
pub fn job_of(kind: &NodeEventKind) -> Option<JobId> {
    kind.job()
}
