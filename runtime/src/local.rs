//! `phalanx local`: a cluster of N node processes on loopback, for demos and
//! chaos runs. Generates certificates in a temp dir, starts the nodes with
//! the job, streams progress, injects node faults on a schedule
//! (`--kill`, `--pause`, `--restart`), waits for the job and adds the
//! node-level faults (with detection and recovery times) to `summary.json`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::config::JobConfig;
use crate::error::Error;

/// How long a whole local run may take before it is abandoned.
const RUN_BOUND: Duration = Duration::from_secs(600);
/// How long nodes get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A node fault to inject when the job reaches a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeFault {
    /// SIGKILL node `node` at `step`.
    Kill {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
    },
    /// SIGSTOP node `node` at `step`, SIGCONT it `ms` later.
    Pause {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
        /// How long it stays stopped.
        ms: u64,
    },
    /// Start node `node` again at `step` (after a kill).
    Restart {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
    },
}

impl NodeFault {
    fn step(&self) -> u64 {
        match self {
            NodeFault::Kill { step, .. } | NodeFault::Pause { step, .. } | NodeFault::Restart { step, .. } => *step,
        }
    }

    /// Parse `NODE@STEP` (kill, restart) or `NODE@STEP:MS` (pause).
    pub fn parse(kind: &str, s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--{kind} {s}: {why}");
        let (node, rest) = s.split_once('@').ok_or_else(|| bad("expected NODE@STEP"))?;
        let node = u32::from_str(node).map_err(|_| bad("NODE is not a number"))?;
        let (step, ms) = match (kind, rest.split_once(':')) {
            ("pause", Some((st, ms))) => (st, Some(u64::from_str(ms).map_err(|_| bad("MS is not a number"))?)),
            ("pause", None) => return Err(bad("expected NODE@STEP:MS")),
            (_, _) => (rest, None),
        };
        let step = u64::from_str(step).map_err(|_| bad("STEP is not a number"))?;
        Ok(match (kind, ms) {
            ("kill", _) => NodeFault::Kill { node, step },
            ("restart", _) => NodeFault::Restart { node, step },
            (_, Some(ms)) => NodeFault::Pause { node, step, ms },
            _ => return Err(bad("unknown fault")),
        })
    }
}

/// One injected node fault, as `summary.json` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeFaultReport {
    /// `kill`, `pause` or `restart`.
    pub kind: String,
    /// The node.
    pub node: u32,
    /// The step at which it was injected.
    pub step: u64,
    /// Milliseconds until a survivor declared the node down (kill, pause).
    pub detection_ms: Option<u64>,
    /// Milliseconds from the fault until the first step applied after the
    /// node was declared down (training running again without it).
    pub recovery_ms: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Node {
    child: Option<Child>,
}

struct LocalCluster {
    dir: tempfile::TempDir,
    exe: PathBuf,
    ports: Vec<u16>,
    out: PathBuf,
    nodes: Vec<Node>,
    events: mpsc::Sender<Value>,
}

impl LocalCluster {
    fn spawn(&mut self, id: u32) -> Result<(), Error> {
        let dir = self.dir.path();
        let seeds: Vec<String> =
            (0..self.ports.len()).filter(|j| *j as u32 != id).map(|j| format!("127.0.0.1:{}", self.ports[j])).collect();
        let log = std::fs::File::create(dir.join(format!("node-{id}.log")))
            .map_err(|source| Error::Io { path: dir.join(format!("node-{id}.log")), source })?;
        let mut child = Command::new(&self.exe)
            .args(["node", "--id", &id.to_string(), "--listen", &format!("127.0.0.1:{}", self.ports[id as usize])])
            .arg("--certs")
            .arg(dir.join("certs"))
            .args(["--seeds", &seeds.join(",")])
            .arg("--job")
            .arg(dir.join("job.toml"))
            .arg("--out")
            .arg(&self.out)
            .arg("--data-dir")
            .arg(dir.join(format!("data-{id}")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| Error::Io { path: self.exe.clone(), source })?;
        if let Some(out) = child.stdout.take() {
            let tx = self.events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        self.nodes[id as usize].child = Some(child);
        Ok(())
    }

    fn signal(&self, id: u32, sig: &str) {
        if let Some(child) = &self.nodes[id as usize].child {
            let _ = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status();
        }
    }

    fn kill(&mut self, id: u32) {
        if let Some(mut child) = self.nodes[id as usize].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_all(&mut self) {
        for id in 0..self.nodes.len() as u32 {
            self.signal(id, "CONT");
            self.signal(id, "TERM");
        }
        let deadline = Instant::now() + STOP_GRACE;
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        for id in 0..self.nodes.len() as u32 {
            self.kill(id);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let io = |source| Error::Io { path: PathBuf::from("127.0.0.1:0"), source };
    let sockets: Vec<std::net::UdpSocket> =
        (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>().map_err(io)?;
    sockets.iter().map(|s| s.local_addr().map(|a| a.port()).map_err(io)).collect()
}

/// Run `config` on `nodes` local node processes with `faults`; returns the
/// summary (with `node_faults` added). `on_step` sees (step, total, loss).
/// The nodes run this same executable (`phalanx node`).
pub fn run_local(
    config: &JobConfig,
    nodes: u32,
    faults: Vec<NodeFault>,
    on_step: impl FnMut(u64, u64, f64),
) -> Result<Value, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io { path: PathBuf::from("phalanx"), source })?;
    run_local_with(&exe, config, nodes, faults, on_step)
}

/// [`run_local`] with the `phalanx` executable to start nodes from.
pub fn run_local_with(
    exe: &std::path::Path,
    config: &JobConfig,
    nodes: u32,
    mut faults: Vec<NodeFault>,
    mut on_step: impl FnMut(u64, u64, f64),
) -> Result<Value, Error> {
    if nodes == 0 {
        return Err(Error::Field { field: "nodes".into(), reason: "must be at least 1".into() });
    }
    for f in &faults {
        let (NodeFault::Kill { node, .. } | NodeFault::Pause { node, .. } | NodeFault::Restart { node, .. }) = f;
        if *node >= nodes {
            return Err(Error::Field { field: "kill/pause/restart".into(), reason: format!("node {node} of {nodes}") });
        }
    }
    faults.sort_by_key(NodeFault::step);
    let out = config.out.clone().unwrap_or_else(|| PathBuf::from("phalanx-out"));
    let out = if out.is_absolute() { out } else { std::env::current_dir().unwrap_or_default().join(out) };
    // Validate and load here first: a bad config is one clear error, not N dying nodes.
    crate::PreparedJob::new(config.clone())?;
    let dir = tempfile::tempdir().map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
    phalanx_transport::certs::generate(&dir.path().join("certs"), nodes)
        .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?;
    let job = JobConfig { out: None, resume: false, ..config.clone() };
    let text = toml::to_string(&job).map_err(|e| Error::Encode { what: "job.toml".into(), reason: e.to_string() })?;
    let job_path = dir.path().join("job.toml");
    std::fs::write(&job_path, text).map_err(|source| Error::Io { path: job_path, source })?;
    let _ = std::fs::remove_file(out.join("summary.json"));
    let (tx, rx) = mpsc::channel();
    let mut cluster = LocalCluster {
        dir,
        exe: exe.to_path_buf(),
        ports: free_ports(nodes as usize)?,
        out: out.clone(),
        nodes: (0..nodes).map(|_| Node { child: None }).collect(),
        events: tx,
    };
    for id in 0..nodes {
        cluster.spawn(id)?;
    }
    let deadline = Instant::now() + RUN_BOUND;
    let mut pending = faults.into_iter().peekable();
    // (report, injected at, declared down at) — times in Unix ms, as the nodes stamp events.
    let mut reports: Vec<(NodeFaultReport, u64, Option<u64>)> = Vec::new();
    let mut resumes: BTreeMap<u32, Instant> = BTreeMap::new();
    let done = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Spawn(format!("the local cluster did not finish within {} s", RUN_BOUND.as_secs())));
        }
        // Resume paused nodes whose pause is over (the pause length is the fault, not a wait).
        let now = Instant::now();
        for (node, _) in resumes.clone().into_iter().filter(|(_, at)| *at <= now) {
            cluster.signal(node, "CONT");
            resumes.remove(&node);
        }
        let wait = resumes.values().map(|at| at.saturating_duration_since(now)).min().unwrap_or(left).min(left);
        let event = match rx.recv_timeout(wait) {
            Ok(v) => v,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Spawn("every node exited".into())),
        };
        match event["event"].as_str() {
            Some("step") => {
                let step = event["step"].as_u64().unwrap_or(0);
                let total = event["total_steps"].as_u64().unwrap_or(0);
                on_step(step, total, event["loss"].as_f64().unwrap_or(f64::NAN));
                // Training resumed: the first step applied after the node was declared down.
                let t = event["t_ms"].as_u64().unwrap_or(0);
                for (r, at, down) in reports.iter_mut() {
                    if r.recovery_ms.is_none() && down.is_some_and(|d| t >= d) {
                        r.recovery_ms = Some(t.saturating_sub(*at));
                    }
                }
                while pending.peek().is_some_and(|f| f.step() <= step) {
                    let Some(f) = pending.next() else { break };
                    let at = unix_ms();
                    let (kind, node) = match f {
                        NodeFault::Kill { node, .. } => {
                            cluster.kill(node);
                            ("kill", node)
                        }
                        NodeFault::Pause { node, ms, .. } => {
                            cluster.signal(node, "STOP");
                            resumes.insert(node, Instant::now() + Duration::from_millis(ms));
                            ("pause", node)
                        }
                        NodeFault::Restart { node, .. } => {
                            cluster.kill(node);
                            cluster.spawn(node)?;
                            ("restart", node)
                        }
                    };
                    eprintln!("injected: {kind} node {node} at step {step}");
                    let report =
                        NodeFaultReport { kind: kind.into(), node, step, detection_ms: None, recovery_ms: None };
                    reports.push((report, at, None));
                }
            }
            Some("down") => {
                let peer = event["peer"].as_u64().unwrap_or(u64::MAX) as u32;
                let t = event["t_ms"].as_u64().unwrap_or(0);
                for (r, at, down) in reports.iter_mut() {
                    if r.node == peer && r.detection_ms.is_none() && r.kind != "restart" {
                        r.detection_ms = Some(t.saturating_sub(*at));
                        *down = Some(t);
                    }
                }
            }
            Some("job_done") => break event,
            Some("job_failed") => {
                return Err(Error::Spawn(format!("the job failed: {}", event["error"].as_str().unwrap_or("?"))));
            }
            _ => {}
        }
    };
    cluster.stop_all();
    let path = out.join("summary.json");
    let text = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let mut summary: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Encode { what: path.display().to_string(), reason: e.to_string() })?;
    let node_faults: Vec<NodeFaultReport> = reports.into_iter().map(|(r, _, _)| r).collect();
    if let Some(map) = summary.as_object_mut() {
        map.insert("nodes".into(), nodes.into());
        map.insert("node_faults".into(), serde_json::to_value(&node_faults).unwrap_or_default());
        map.insert("coordinator".into(), done["from"].clone());
    }
    let bytes = serde_json::to_vec_pretty(&summary)
        .map_err(|e| Error::Encode { what: "summary".into(), reason: e.to_string() })?;
    crate::output::write_atomic(&path, &bytes)?;
    Ok(summary)
}
