//! A cluster of real `phalanx node` processes on 127.0.0.1 for tests, with
//! their JSON events collected in order. Waits are bounded (a hang fails the
//! test) and wait on events, never on sleeps.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// Bound on any single wait: a hang fails the test instead of CI.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Node {
    child: Child,
}

pub struct Cluster {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    ports: Vec<u16>,
    pub nodes: Vec<Option<Node>>,
    events: mpsc::Receiver<Value>,
    sender: mpsc::Sender<Value>,
    /// Every event seen so far, in arrival order.
    history: std::cell::RefCell<Vec<Value>>,
    job: bool,
    /// More command-line arguments for some nodes, by id (for the next [`Cluster::spawn`]).
    pub extra: std::collections::BTreeMap<u32, Vec<String>>,
}

/// `model_sha256` of the one-process run of the job file `job`.
pub fn expected_sha(job: &str) -> String {
    let job = phalanx::PreparedJob::new(phalanx::JobConfig::from_toml_str(job).unwrap()).unwrap();
    phalanx::model_sha256(job.model.as_ref(), &job.reference_params().unwrap())
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Free UDP ports on loopback (bound, read, released).
fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<_> = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    sockets.iter().map(|s| s.local_addr().unwrap().port()).collect()
}

impl Cluster {
    pub fn start(n: u32) -> Self {
        Self::start_with_job(n, None)
    }

    /// Start `n` nodes; with a job file, every node trains it, writing to `out()`.
    pub fn start_with_job(n: u32, job: Option<&str>) -> Self {
        Self::start_with_args(n, job, Default::default())
    }

    /// As [`Cluster::start_with_job`], node `id` getting the arguments `extra[id]` too.
    pub fn start_with_args(n: u32, job: Option<&str>, extra: std::collections::BTreeMap<u32, Vec<String>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let ok = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(["certs", "--dir", certs.to_str().unwrap(), "--nodes", &n.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let (sender, events) = mpsc::channel();
        let mut c = Cluster {
            _dir: dir,
            certs,
            ports: free_ports(n as usize),
            nodes: Vec::new(),
            events,
            sender,
            history: Default::default(),
            job: false,
            extra,
        };
        if let Some(text) = job {
            std::fs::write(c.dir().join("job.toml"), text).unwrap();
            c.job = true;
        }
        for id in 0..n {
            let node = c.spawn(id);
            c.nodes.push(Some(node));
        }
        c
    }

    pub fn dir(&self) -> PathBuf {
        self.certs.parent().unwrap().to_path_buf()
    }

    /// The certificates directory (`phalanx certs`: nodes' and the client's).
    pub fn certs(&self) -> PathBuf {
        self.certs.clone()
    }

    /// Every node's address, comma-separated (`--cluster`).
    pub fn addrs(&self) -> String {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// Where the coordinator writes summary.json.
    pub fn out(&self) -> PathBuf {
        self.dir().join("out")
    }

    /// Wait until node `observer` reports the job done; its `job_done` event.
    pub fn wait_done(&self, observer: u32) -> Value {
        self.wait_for(0, &format!("node {observer} to report the job done"), |v| {
            v["event"] == "job_done" && v["node"] == observer
        })
    }

    /// The job's `summary.json`.
    pub fn summary(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.out().join("summary.json")).unwrap()).unwrap()
    }

    pub fn spawn(&self, id: u32) -> Node {
        let seeds: Vec<String> = (0..self.ports.len() as u32)
            .filter(|j| *j != id)
            .map(|j| format!("127.0.0.1:{}", self.ports[j as usize]))
            .collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .args(["node", "--id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[id as usize])])
            .args(["--certs", self.certs.to_str().unwrap(), "--seeds", &seeds.join(",")])
            .args(["--data-dir", self.dir().join(format!("data-{id}")).to_str().unwrap()])
            .args(if self.job {
                vec![
                    "--job".to_string(),
                    self.dir().join("job.toml").to_string_lossy().into_owned(),
                    "--out".to_string(),
                    self.out().to_string_lossy().into_owned(),
                ]
            } else {
                Vec::new()
            })
            .args(self.extra.get(&id).into_iter().flatten())
            .env("RUST_LOG", "phalanx=debug,phalanx_transport=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.log(id)).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let tx = self.sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Node { child }
    }

    pub fn log(&self, id: u32) -> PathBuf {
        self.certs.parent().unwrap().join(format!("node-{id}.log"))
    }

    /// The end of every node's log, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.ports.len() as u32)
            .map(|id| {
                let text = std::fs::read_to_string(self.log(id)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains("heartbeat")).collect();
                format!("--- node {id}\n{}", lines[lines.len().saturating_sub(25)..].join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A position in the event history: waits after it ignore earlier events.
    pub fn mark(&self) -> usize {
        while let Ok(v) = self.events.try_recv() {
            self.history.borrow_mut().push(v);
        }
        self.history.borrow().len()
    }

    /// Every event at or after `since` received so far.
    pub fn events_since(&self, since: usize) -> Vec<Value> {
        self.mark();
        self.history.borrow().iter().skip(since).cloned().collect()
    }

    /// Wait for an event at or after `since` matching `pred`; returns it.
    pub fn wait_for(&self, since: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.history.borrow().iter().skip(since).find(|v| pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.history.borrow_mut().push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; events: {:?}\n{}",
                    self.history.borrow().iter().skip(since).collect::<Vec<_>>(),
                    self.logs()
                ),
            }
        }
    }

    pub fn wait_view(&self, since: usize, observer: u32, members: &[u32]) -> Value {
        let want: Vec<Value> = members.iter().map(|m| Value::from(*m)).collect();
        self.wait_for(since, &format!("node {observer} to adopt a view of {members:?}"), |v| {
            v["event"] == "view" && v["node"] == observer && v["members"].as_array() == Some(&want)
        })
    }

    pub fn signal(&self, id: u32, sig: &str) {
        let pid = self.nodes[id as usize].as_ref().unwrap().child.id();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    /// How node `id`'s process ended, if it has.
    pub fn exited(&mut self, id: u32) -> Option<std::process::ExitStatus> {
        self.nodes[id as usize].as_mut().and_then(|node| node.child.try_wait().ok().flatten())
    }

    pub fn kill(&mut self, id: u32) -> u64 {
        let mut node = self.nodes[id as usize].take().unwrap();
        let at = unix_ms();
        node.child.kill().unwrap();
        node.child.wait().unwrap();
        at
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = Command::new("kill").args(["-CONT", &node.child.id().to_string()]).status();
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}
