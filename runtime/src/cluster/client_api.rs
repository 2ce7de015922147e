//! The client API: what `phalanx submit`, `jobs`, `cancel` and `status` ask a node, and how
//! the node answers.
//!
//! A client connects with a client certificate (`client-<name>`, see
//! [`phalanx_transport::certs`]) on the client ALPN; it is never a member. Each request is
//! one frame on its own stream ([`ClientRequest`]); the node answers with one or more
//! [`ClientAnswer`] frames and ends the stream. Structured payloads (job specs, registry
//! entries, events) travel as JSON text, the format users and scripts already read.
//!
//! The node side ([`ClientApi`]) runs each request in its own task off the node loop and
//! talks to the loop through the same commands a [`NodeHandle`](crate::node::NodeHandle)
//! uses, so a client can do exactly what embedding code can, and nothing more.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phalanx_transport::{ClientIdentity, ClientReply};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::command::NodeCommand;
pub use super::command::{ClusterStatus, MemberStatus};
use super::event::{NodeEvent, NodeEventKind};
use super::registry::{JobEntry, JobId, JobState};
use crate::job::Registries;
use crate::{Error, JobConfig};

/// Bytes of a file per [`ClientAnswer::File`] frame.
pub const FILE_CHUNK_BYTES: usize = 1 << 20;

/// The files of a finished job a client can fetch, beside its `summary.json`.
pub const OUTPUT_FILES: [&str; 4] = ["summary.json", "model.safetensors", "history.csv", "loss.svg"];

/// One request of a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Submit a job: its spec as JSON ([`JobConfig`]). Answered with
    /// [`ClientAnswer::Submitted`] once a majority of the cluster holds it.
    Submit {
        /// The spec, JSON.
        spec_json: String,
    },
    /// The cluster's jobs as this node holds them: [`ClientAnswer::Jobs`].
    Jobs,
    /// Cancel a job: [`ClientAnswer::Cancelled`].
    Cancel {
        /// The job.
        job: JobId,
    },
    /// The node's view of the cluster: [`ClientAnswer::Status`].
    Status,
    /// Follow a job: its events ([`ClientAnswer::Event`]) until it ends, then
    /// [`ClientAnswer::Ended`].
    Watch {
        /// The job.
        job: JobId,
    },
    /// The output files of a finished job, if this node wrote them: [`ClientAnswer::File`]
    /// frames, or [`ClientAnswer::NoOutput`].
    Output {
        /// The job.
        job: JobId,
    },
}

/// One answer frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientAnswer {
    /// The job was accepted with this id.
    Submitted {
        /// Its id.
        job: JobId,
    },
    /// The registry, JSON (a list of `{id, spec, state}`).
    Jobs {
        /// JSON text.
        json: String,
    },
    /// The cancellation went to the coordinator.
    Cancelled {
        /// The job.
        job: JobId,
    },
    /// [`ClusterStatus`] as JSON.
    Status {
        /// JSON text.
        json: String,
    },
    /// One of the job's events (or a cluster event during it: a view, a node down), JSON as
    /// `phalanx node` prints it.
    Event {
        /// JSON text.
        json: String,
    },
    /// The job is over: its final state as JSON (`{"finished": {...}}`, `{"failed": ...}`,
    /// `"cancelled"`).
    Ended {
        /// JSON text of the [`JobState`].
        state_json: String,
    },
    /// A piece of an output file.
    File {
        /// The file's name (one of [`OUTPUT_FILES`]).
        name: String,
        /// Where the piece starts.
        offset: u64,
        /// The bytes.
        bytes: Vec<u8>,
        /// Whether this is the file's last piece.
        last: bool,
    },
    /// This node does not hold the job's outputs.
    NoOutput {
        /// Why, naming the node and job.
        reason: String,
    },
    /// The request failed; the reason names the node, job or field.
    Error {
        /// Why.
        message: String,
    },
}

/// The node side of the client API: one per node, cloned into each request's task.
#[derive(Clone)]
pub(crate) struct ClientApi {
    pub(crate) node: u32,
    pub(crate) commands: mpsc::Sender<NodeCommand>,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    pub(crate) registries: Registries,
}

impl ClientApi {
    /// Answers one request (run it in its own task).
    pub(crate) async fn serve(self, client: String, addr: SocketAddr, request: Vec<u8>, mut reply: ClientReply) {
        let node = self.node;
        let request =
            match phalanx_transport::decode::<ClientRequest>(&request, &phalanx_transport::CLIENT_REQUEST_LIMITS) {
                Ok(frame) => frame.header,
                Err(e) => {
                    tracing::warn!(node, client, %addr, "bad client request: {e}");
                    let message = format!("node {node}: bad request: {e}");
                    let _ = reply.send(&ClientAnswer::Error { message }).await;
                    return reply.finish();
                }
            };
        tracing::debug!(node, client, %addr, ?request, "client request");
        if let Err(message) = self.answer(request, &mut reply).await {
            let _ = reply.send(&ClientAnswer::Error { message }).await;
        }
        reply.finish();
    }

    async fn answer(&self, request: ClientRequest, reply: &mut ClientReply) -> Result<(), String> {
        let gone = |e: phalanx_transport::ReplyError| format!("cannot answer: {e}");
        match request {
            ClientRequest::Submit { spec_json } => {
                let job = self.submit(&spec_json).await?;
                reply.send(&ClientAnswer::Submitted { job }).await.map_err(gone)
            }
            ClientRequest::Jobs => {
                let json = serde_json::to_string(&self.jobs().await?).map_err(|e| e.to_string())?;
                reply.send(&ClientAnswer::Jobs { json }).await.map_err(gone)
            }
            ClientRequest::Cancel { job } => {
                self.entry(job).await?;
                self.command(NodeCommand::Cancel { job }).await?;
                reply.send(&ClientAnswer::Cancelled { job }).await.map_err(gone)
            }
            ClientRequest::Status => {
                let (tx, rx) = oneshot::channel();
                self.command(NodeCommand::Status { reply: tx }).await?;
                let status = rx.await.map_err(|_| self.stopped())?;
                let json = serde_json::to_string(&status).map_err(|e| e.to_string())?;
                reply.send(&ClientAnswer::Status { json }).await.map_err(gone)
            }
            ClientRequest::Watch { job } => self.watch(job, reply).await,
            ClientRequest::Output { job } => self.output(job, reply).await,
        }
    }

    /// Checks a spec as [`NodeHandle::submit`](crate::node::NodeHandle::submit) does and
    /// hands it to the node loop.
    async fn submit(&self, spec_json: &str) -> Result<JobId, String> {
        let node = self.node;
        let spec: JobConfig = serde_json::from_str(spec_json).map_err(|e| format!("node {node}: bad job spec: {e}"))?;
        if spec.out.is_some() {
            return Err(format!(
                "node {node}: bad job spec: field `out`: a submitted job's outputs stay on the cluster; \
                 fetch them with `phalanx submit --wait --out DIR`"
            ));
        }
        let (check, registries) = (spec.clone(), self.registries.clone());
        tokio::task::spawn_blocking(move || {
            crate::PreparedJob::with_registries(check, &registries.models, &registries.data).map(|_| ())
        })
        .await
        .map_err(|e| format!("node {node}: checking the job: {e}"))?
        .map_err(|e| format!("node {node}: {e}"))?;
        let (tx, rx) = oneshot::channel();
        self.command(NodeCommand::Submit { spec: Box::new(spec), reply: tx }).await?;
        rx.await.map_err(|_| self.stopped())?.map_err(|e| e.to_string())
    }

    async fn jobs(&self) -> Result<Vec<JobEntry>, String> {
        let (tx, rx) = oneshot::channel();
        self.command(NodeCommand::Jobs { reply: tx }).await?;
        rx.await.map_err(|_| self.stopped())
    }

    async fn entry(&self, job: JobId) -> Result<JobEntry, String> {
        self.jobs()
            .await?
            .into_iter()
            .find(|e| e.id == job)
            .ok_or_else(|| format!("node {}: no job {job} in the cluster's registry", self.node))
    }

    /// Streams the job's events (and the cluster's views and node losses meanwhile) until it
    /// ends.
    async fn watch(&self, job: JobId, reply: &mut ClientReply) -> Result<(), String> {
        // Subscribed before the state is read, so an end in between is not missed.
        let mut events = self.events.subscribe();
        let entry = self.entry(job).await?;
        if entry.state.is_over() {
            return send_ended(reply, &entry.state).await;
        }
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::warn!(node = self.node, job, skipped, "a watching client fell behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(self.stopped()),
            };
            let relevant = match &event.kind {
                NodeEventKind::View { .. } | NodeEventKind::Down { .. } | NodeEventKind::QuorumLost { .. } => true,
                kind => kind.job() == Some(job),
            };
            if !relevant {
                continue;
            }
            let json = serde_json::to_string(&event).map_err(|e| e.to_string())?;
            reply.send(&ClientAnswer::Event { json }).await.map_err(|e| format!("cannot answer: {e}"))?;
            if let NodeEventKind::JobState { job: j, .. } = &event.kind {
                if *j == job {
                    let state = self.entry(job).await?.state;
                    if state.is_over() {
                        return send_ended(reply, &state).await;
                    }
                }
            }
        }
    }

    /// Sends the output files of a finished job if this node wrote them.
    async fn output(&self, job: JobId, reply: &mut ClientReply) -> Result<(), String> {
        let node = self.node;
        let entry = self.entry(job).await?;
        let summary = match &entry.state {
            JobState::Finished { summary: Some(summary), .. } => PathBuf::from(summary),
            JobState::Finished { summary: None, .. } => {
                let reason = format!("job {job} finished without writing outputs");
                return reply.send(&ClientAnswer::NoOutput { reason }).await.map_err(|e| e.to_string());
            }
            other => return Err(format!("node {node}: job {job} has not finished (it is {})", other.name())),
        };
        let dir = summary.parent().map(Path::to_path_buf).unwrap_or_default();
        if !summary.is_file() {
            let reason = format!("node {node} does not hold job {job}'s outputs ({} is not here)", summary.display());
            return reply.send(&ClientAnswer::NoOutput { reason }).await.map_err(|e| e.to_string());
        }
        for name in OUTPUT_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            // Read off the async workers; a model file is at most a few hundred MiB.
            let read = path.clone();
            let bytes = tokio::task::spawn_blocking(move || std::fs::read(&read))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("node {node}: cannot read {}: {e}", path.display()))?;
            let mut offset = 0usize;
            loop {
                let end = (offset + FILE_CHUNK_BYTES).min(bytes.len());
                let last = end == bytes.len();
                let answer = ClientAnswer::File {
                    name: name.to_owned(),
                    offset: offset as u64,
                    bytes: bytes[offset..end].to_vec(),
                    last,
                };
                reply.send(&answer).await.map_err(|e| format!("cannot answer: {e}"))?;
                if last {
                    break;
                }
                offset = end;
            }
        }
        Ok(())
    }

    async fn command(&self, cmd: NodeCommand) -> Result<(), String> {
        self.commands.send(cmd).await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> String {
        format!("node {} is stopping", self.node)
    }
}

async fn send_ended(reply: &mut ClientReply, state: &JobState) -> Result<(), String> {
    let state_json = serde_json::to_string(state).map_err(|e| e.to_string())?;
    reply.send(&ClientAnswer::Ended { state_json }).await.map_err(|e| format!("cannot answer: {e}"))
}

/// How long a client waits for a node to answer the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits for the node it prefers (the coordinator it follows) before it
/// dials the others.
pub const PREFERRED_TIMEOUT: Duration = Duration::from_secs(1);

/// A client of a cluster: the addresses it was given and its identity. Each call connects
/// to the first address that answers (or the one asked for).
#[derive(Clone, Debug)]
pub struct ClusterClient {
    identity: ClientIdentity,
    addrs: Vec<SocketAddr>,
}

impl ClusterClient {
    /// A client of the nodes at `addrs` (any of them will do) with `identity`.
    pub fn new(identity: ClientIdentity, addrs: Vec<SocketAddr>) -> Result<Self, Error> {
        if addrs.is_empty() {
            return Err(Error::Field { field: "cluster".into(), reason: "give at least one node address".into() });
        }
        Ok(Self { identity, addrs })
    }

    /// The addresses given.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// A connection to a node of the cluster: `first` if it answers within
    /// [`PREFERRED_TIMEOUT`], else whichever of the others answers first (all are dialled at
    /// once, so a dead node costs no more than one timeout).
    pub async fn connect(&self, first: Option<SocketAddr>) -> Result<phalanx_transport::Client, Error> {
        let mut failures = Vec::new();
        if let Some(addr) = first {
            match phalanx_transport::Client::connect(&self.identity, addr, PREFERRED_TIMEOUT).await {
                Ok(client) => return Ok(client),
                Err(e) => failures.push(e.to_string()),
            }
        }
        let mut dials = tokio::task::JoinSet::new();
        for addr in self.addrs.iter().copied().filter(|a| Some(*a) != first) {
            let identity = self.identity.clone();
            dials.spawn(async move { phalanx_transport::Client::connect(&identity, addr, CONNECT_TIMEOUT).await });
        }
        while let Some(dialled) = dials.join_next().await {
            match dialled {
                // The other dials are aborted when `dials` drops.
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => failures.push(e.to_string()),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(Error::Submit(format!("no node of the cluster answered: {}", failures.join("; "))))
    }

    /// Sends `request` to `client` and collects every answer; an [`ClientAnswer::Error`]
    /// becomes an error.
    pub async fn ask(client: &phalanx_transport::Client, request: &ClientRequest) -> Result<Vec<ClientAnswer>, Error> {
        let fail = |e: phalanx_transport::ClientError| Error::Submit(e.to_string());
        let mut answers = client.request::<_, ClientAnswer>(request).await.map_err(fail)?;
        let mut all = Vec::new();
        while let Some(answer) = answers.next().await.map_err(fail)? {
            if let ClientAnswer::Error { message } = answer {
                return Err(Error::Submit(message));
            }
            all.push(answer);
        }
        Ok(all)
    }

    /// Submits `spec`; returns the job's id once a majority of the cluster holds it.
    pub async fn submit(&self, spec: &JobConfig) -> Result<JobId, Error> {
        let spec_json = serde_json::to_string(spec).map_err(|e| Error::Submit(e.to_string()))?;
        let client = self.connect(None).await?;
        let answers = Self::ask(&client, &ClientRequest::Submit { spec_json }).await;
        client.close().await;
        match answers?.as_slice() {
            [ClientAnswer::Submitted { job }] => Ok(*job),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster's jobs.
    pub async fn jobs(&self) -> Result<Vec<JobEntry>, Error> {
        let client = self.connect(None).await?;
        let answers = Self::ask(&client, &ClientRequest::Jobs).await;
        client.close().await;
        match answers?.as_slice() {
            [ClientAnswer::Jobs { json }] => serde_json::from_str(json).map_err(|e| Error::Submit(e.to_string())),
            other => Err(unexpected(other)),
        }
    }

    /// Cancels job `job`.
    pub async fn cancel(&self, job: JobId) -> Result<(), Error> {
        let client = self.connect(None).await?;
        let answers = Self::ask(&client, &ClientRequest::Cancel { job }).await;
        client.close().await;
        match answers?.as_slice() {
            [ClientAnswer::Cancelled { .. }] => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// One node's view of the cluster (the first that answers, or `at`).
    pub async fn status(&self, at: Option<SocketAddr>) -> Result<ClusterStatus, Error> {
        let client = self.connect(at).await?;
        let answers = Self::ask(&client, &ClientRequest::Status).await;
        client.close().await;
        match answers?.as_slice() {
            [ClientAnswer::Status { json }] => serde_json::from_str(json).map_err(|e| Error::Submit(e.to_string())),
            other => Err(unexpected(other)),
        }
    }

    /// Follows job `job` until it ends, handing each event to `on_event`, and returns its
    /// final state. Watches the coordinator (whose events include the steps); when the
    /// connection to it breaks (the node died), it asks the remaining nodes for the new
    /// coordinator and follows that one, up to `patience` without any node answering.
    pub async fn watch(
        &self,
        job: JobId,
        patience: Duration,
        mut on_event: impl FnMut(&NodeEvent),
    ) -> Result<JobState, Error> {
        let mut last_contact = tokio::time::Instant::now();
        let mut failures: Vec<String> = Vec::new();
        loop {
            match self.watch_once(job, &mut on_event).await {
                Ok(Some(state)) => return Ok(state),
                Ok(None) => last_contact = tokio::time::Instant::now(),
                Err(e) => failures.push(e.to_string()),
            }
            if last_contact.elapsed() > patience {
                return Err(Error::Submit(format!(
                    "lost job {job}: no node answered for {} s ({})",
                    patience.as_secs(),
                    failures.join("; ")
                )));
            }
            // A node just died: the others need a failure timeout to agree on a new view.
            // Asking again at once would only find the old coordinator gone, so the loop
            // waits for the cluster, not for a clock: each status call is a round trip.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One attempt: `Some(state)` if the job ended, `None` if the stream ended early (the
    /// coordinator went away), an error if no node answered.
    async fn watch_once(&self, job: JobId, on_event: &mut impl FnMut(&NodeEvent)) -> Result<Option<JobState>, Error> {
        let status = self.status(None).await?;
        let coordinator_addr = status
            .coordinator
            .and_then(|c| status.members.iter().find(|m| m.id == c))
            .and_then(|m| m.addr)
            .map(|a| self.reachable(a));
        let client = self.connect(coordinator_addr).await?;
        let fail = |e: phalanx_transport::ClientError| Error::Submit(e.to_string());
        let mut answers = client.request::<_, ClientAnswer>(&ClientRequest::Watch { job }).await.map_err(fail)?;
        loop {
            match answers.next().await {
                Ok(Some(ClientAnswer::Event { json })) => {
                    if let Ok(event) = serde_json::from_str::<NodeEvent>(&json) {
                        on_event(&event);
                        // Another node coordinates now: follow it (its events carry the steps).
                        if matches!(event.kind, NodeEventKind::View { coordinator, .. } if coordinator != client.node())
                        {
                            client.close().await;
                            return Ok(None);
                        }
                    }
                }
                Ok(Some(ClientAnswer::Ended { state_json })) => {
                    client.close().await;
                    return serde_json::from_str(&state_json).map(Some).map_err(|e| Error::Submit(e.to_string()));
                }
                Ok(Some(ClientAnswer::Error { message })) => return Err(Error::Submit(message)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(None),
            }
        }
    }

    /// A node reports members at the addresses it reaches them at; a node listening on
    /// every interface is reached by the client at the address it was given.
    fn reachable(&self, addr: SocketAddr) -> SocketAddr {
        if addr.ip().is_unspecified() {
            self.addrs.iter().find(|a| a.port() == addr.port()).copied().unwrap_or(addr)
        } else {
            addr
        }
    }

    /// Fetches the output files of finished job `job` into `out` from whichever node holds
    /// them. Returns the files written.
    pub async fn fetch_outputs(&self, job: JobId, out: &Path) -> Result<Vec<PathBuf>, Error> {
        let mut reasons = Vec::new();
        // Every node is dialled at once and asked as it answers: a dead node costs nothing.
        let mut dials = tokio::task::JoinSet::new();
        for addr in self.addrs.iter().copied() {
            let identity = self.identity.clone();
            dials.spawn(async move { phalanx_transport::Client::connect(&identity, addr, CONNECT_TIMEOUT).await });
        }
        while let Some(dialled) = dials.join_next().await {
            let client = match dialled {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    reasons.push(e.to_string());
                    continue;
                }
                Err(e) => {
                    reasons.push(e.to_string());
                    continue;
                }
            };
            let answers = Self::ask(&client, &ClientRequest::Output { job }).await;
            client.close().await;
            match answers {
                Ok(answers) => match answers.as_slice() {
                    [ClientAnswer::NoOutput { reason }] => reasons.push(reason.clone()),
                    _ => return write_files(out, answers),
                },
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(Error::Submit(format!("no node holds job {job}'s outputs: {}", reasons.join("; "))))
    }
}

/// Writes the [`ClientAnswer::File`] pieces into `out` (each file whole, fsynced).
fn write_files(out: &Path, answers: Vec<ClientAnswer>) -> Result<Vec<PathBuf>, Error> {
    let io = |path: &Path, e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for answer in answers {
        let ClientAnswer::File { name, offset, bytes, .. } = answer else { continue };
        if !OUTPUT_FILES.contains(&name.as_str()) {
            return Err(Error::Submit(format!("a node sent an unexpected file {name:?}")));
        }
        match files.last_mut() {
            Some((last, data)) if *last == name => {
                if offset != data.len() as u64 {
                    return Err(Error::Submit(format!("{name}: piece at {offset}, expected {}", data.len())));
                }
                data.extend_from_slice(&bytes);
            }
            _ => files.push((name, bytes)),
        }
    }
    let mut written = Vec::new();
    for (name, data) in files {
        let path = out.join(&name);
        crate::output::write_atomic(&path, &data)?;
        written.push(path);
    }
    Ok(written)
}

fn unexpected(answers: &[ClientAnswer]) -> Error {
    Error::Submit(format!("unexpected answer from the node: {answers:?}"))
}
