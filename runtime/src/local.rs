//! `phalanx local`: a cluster of N node processes on loopback, for demos and
//! chaos runs. Generates certificates in a temp dir, starts the nodes with
//! the job, streams progress, injects faults on a schedule, waits for the job
//! and adds the faults (with detection and recovery times) to `summary.json`.
//! Every node event, and every fault injected (`injected`), goes to
//! `OUT/events.jsonl`; the nodes report steps at a bounded rate, plus each
//! step at which a fault is due (`phalanx node --report-steps`), so faults
//! fire at their exact step. Every step is in `OUT/history.csv`.
//!
//! Faults, each when the job reaches a step:
//!
//! | flag | what happens |
//! |---|---|
//! | `--kill NODE@STEP` | SIGKILL |
//! | `--pause NODE@STEP:MS` | SIGSTOP, SIGCONT `MS` later |
//! | `--restart NODE@STEP` | start the node again (after a kill) |
//! | `--partition NODES@STEP:MS` | cut every link between `NODES` (comma-separated) and the rest for `MS` |
//! | `--degrade SPEC@STEP:MS` | every link loses/delays/duplicates packets for `MS`; `SPEC` is `loss=0.2,delay=20,jitter=10,dup=0.05` (any subset) |
//! | `--disk-full NODE@STEP:MS` | the node's data directory (a size-limited tmpfs, mounted for the run; needs root) is filled for `MS` |
//! | `--corrupt NODE@STEP` | flip a byte in every checkpoint file of the newest step on the node |
//! | `--crash-before-rename NODE@STEP` | the node aborts after writing the checkpoint of `STEP` to its temporary file, before the rename (an in-process hook: only a build with the cargo feature `fault-injection` has it) |
//! | `--wipe NODE@STEP` | delete every checkpoint file on the node (its copies are lost) |
//! | `--duplicate NODE@STEP` | start a second process with node `NODE`'s id and certificate on another free port (same seeds, dialled directly); the members must refuse it, and `summary.json` records how it exited |
//! | `--rogue NODE@STEP` | node `NODE` runs as a rogue member (`phalanx node --rogue`) and gets SIGUSR1 at `STEP`: it sends every other member one round of forged messages (repeat the flag for more rounds; an in-process hook: only a build with the cargo feature `fault-injection` has it) |
//!
//! Network faults go through a [`FaultRelay`] between the nodes (started
//! only when the schedule has one): `tc netem` and iptables are not
//! available, and the relay damages real QUIC traffic between real processes.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::cluster::coordination::servers::{LocalEtcd, LocalZooKeeper};
use crate::cluster::coordination::{Coordination, CoordinationError};
use crate::config::JobConfig;
use crate::error::Error;
use crate::relay::{FaultRelay, LinkFaults};
use phalanx_actors::checkpoint::{is_temp_name, FileKey};

/// How long a local run may go without a step applied (or, before the
/// first, without starting) before it is abandoned as hung.
const STALL_BOUND: Duration = Duration::from_secs(60);
/// How long nodes get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Size of the tmpfs mounted for a node whose disk is filled.
const TMPFS_SIZE: &str = "16m";
/// The file that fills a node's disk.
const FILLER: &str = "chaos-filler";

/// A fault to inject when the job reaches a step.
#[derive(Clone, Debug, PartialEq)]
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
    /// Cut every link between `side` and the other nodes for `ms`.
    Partition {
        /// One side of the cut.
        side: Vec<u32>,
        /// The step.
        step: u64,
        /// How long the cut lasts.
        ms: u64,
    },
    /// Damage every link (loss, delay, jitter, duplication) for `ms`.
    Degrade {
        /// What every link does to packets.
        link: LinkFaults,
        /// The step.
        step: u64,
        /// How long it lasts.
        ms: u64,
    },
    /// Fill node `node`'s data directory (a size-limited tmpfs) for `ms`.
    DiskFull {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
        /// How long the disk stays full.
        ms: u64,
    },
    /// Flip a byte in every checkpoint file of the newest step on node `node`.
    Corrupt {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
    },
    /// Node `node` aborts between writing and renaming its checkpoint of `step`.
    CrashBeforeRename {
        /// The node.
        node: u32,
        /// The checkpoint step.
        step: u64,
    },
    /// Delete every checkpoint file on node `node`.
    Wipe {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
    },
    /// Start a second process with node `node`'s id and certificate at `step`
    /// (an operator mistake the members must refuse).
    Duplicate {
        /// The node whose identity is used twice.
        node: u32,
        /// The step.
        step: u64,
    },
    /// Node `node` runs as a rogue member from its start; at `step` it gets SIGUSR1 and sends
    /// every other member one round of forged messages.
    Rogue {
        /// The rogue node.
        node: u32,
        /// The step of the round.
        step: u64,
    },
    /// SIGKILL members of the coordination server started for the run.
    ServiceKill {
        /// Which.
        target: ServiceTarget,
        /// The step.
        step: u64,
    },
    /// Start killed members of the coordination server again, on their data.
    ServiceRestart {
        /// Which.
        target: ServiceTarget,
        /// The step.
        step: u64,
    },
    /// Cut node `node` off from the coordination service (not from its peers) for `ms`.
    ServiceCut {
        /// The node.
        node: u32,
        /// The step.
        step: u64,
        /// How long the cut lasts.
        ms: u64,
    },
    /// SIGSTOP members of the coordination server, SIGCONT them `ms` later.
    ServicePause {
        /// Which.
        target: ServiceTarget,
        /// The step.
        step: u64,
        /// How long they stay stopped.
        ms: u64,
    },
}

/// Which members of a run's coordination server a fault hits: `leader` (etcd's leader when
/// the fault fires; ZooKeeper's one server), `all`, or a member's index (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceTarget {
    /// The etcd leader at that moment.
    Leader,
    /// Every member.
    All,
    /// One member.
    Member(usize),
}

impl std::fmt::Display for ServiceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceTarget::Leader => f.write_str("leader"),
            ServiceTarget::All => f.write_str("all"),
            ServiceTarget::Member(i) => write!(f, "{i}"),
        }
    }
}

impl FromStr for ServiceTarget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "leader" => Ok(ServiceTarget::Leader),
            "all" => Ok(ServiceTarget::All),
            n => {
                n.parse().map(ServiceTarget::Member).map_err(|_| "expected `leader`, `all` or a member's index".into())
            }
        }
    }
}

impl NodeFault {
    /// The step at which it is injected.
    pub fn step(&self) -> u64 {
        match self {
            NodeFault::Kill { step, .. }
            | NodeFault::Pause { step, .. }
            | NodeFault::Restart { step, .. }
            | NodeFault::Partition { step, .. }
            | NodeFault::Degrade { step, .. }
            | NodeFault::DiskFull { step, .. }
            | NodeFault::Corrupt { step, .. }
            | NodeFault::CrashBeforeRename { step, .. }
            | NodeFault::Wipe { step, .. }
            | NodeFault::Duplicate { step, .. }
            | NodeFault::Rogue { step, .. }
            | NodeFault::ServiceKill { step, .. }
            | NodeFault::ServiceRestart { step, .. }
            | NodeFault::ServicePause { step, .. }
            | NodeFault::ServiceCut { step, .. } => *step,
        }
    }

    /// The step whose arrival makes the harness act. A crash before a rename
    /// fires inside the node while it saves `step`, before it reports that
    /// step, so the harness starts its clock one step earlier.
    fn trigger(&self) -> u64 {
        match self {
            NodeFault::CrashBeforeRename { step, .. } => step.saturating_sub(1),
            other => other.step(),
        }
    }

    /// The kind, as `summary.json` and the flags name it.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeFault::Kill { .. } => "kill",
            NodeFault::Pause { .. } => "pause",
            NodeFault::Restart { .. } => "restart",
            NodeFault::Partition { .. } => "partition",
            NodeFault::Degrade { .. } => "degrade",
            NodeFault::DiskFull { .. } => "disk-full",
            NodeFault::Corrupt { .. } => "corrupt",
            NodeFault::CrashBeforeRename { .. } => "crash-before-rename",
            NodeFault::Wipe { .. } => "wipe",
            NodeFault::Duplicate { .. } => "duplicate",
            NodeFault::Rogue { .. } => "rogue",
            NodeFault::ServiceKill { .. } => "service-kill",
            NodeFault::ServiceRestart { .. } => "service-restart",
            NodeFault::ServicePause { .. } => "service-pause",
            NodeFault::ServiceCut { .. } => "service-cut",
        }
    }

    /// The nodes it acts on (none for link damage).
    pub fn nodes(&self) -> Vec<u32> {
        match self {
            NodeFault::Kill { node, .. }
            | NodeFault::Pause { node, .. }
            | NodeFault::Restart { node, .. }
            | NodeFault::DiskFull { node, .. }
            | NodeFault::Corrupt { node, .. }
            | NodeFault::CrashBeforeRename { node, .. }
            | NodeFault::Wipe { node, .. }
            | NodeFault::Duplicate { node, .. }
            | NodeFault::Rogue { node, .. }
            | NodeFault::ServiceCut { node, .. } => vec![*node],
            NodeFault::Partition { side, .. } => side.clone(),
            NodeFault::Degrade { .. }
            | NodeFault::ServiceKill { .. }
            | NodeFault::ServiceRestart { .. }
            | NodeFault::ServicePause { .. } => Vec::new(),
        }
    }

    /// Does it hit the coordination service rather than a node?
    pub fn on_service(&self) -> bool {
        matches!(
            self,
            NodeFault::ServiceKill { .. }
                | NodeFault::ServiceRestart { .. }
                | NodeFault::ServicePause { .. }
                | NodeFault::ServiceCut { .. }
        )
    }

    /// Parse the argument of `--KIND` (see the module docs for the syntax).
    pub fn parse(kind: &str, s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--{kind} {s}: {why}");
        let (what, rest) = s.split_once('@').ok_or_else(|| bad("expected WHAT@STEP"))?;
        let number =
            |text: &str, name: &str| u64::from_str(text.trim()).map_err(|_| bad(&format!("{name} is not a number")));
        let with_ms = matches!(kind, "pause" | "partition" | "degrade" | "disk-full" | "service-pause" | "service-cut");
        let (step, ms) = match rest.split_once(':') {
            Some((step, ms)) if with_ms => (number(step, "STEP")?, number(ms, "MS")?),
            None if with_ms => return Err(bad("expected ...@STEP:MS")),
            Some(_) => return Err(bad("expected ...@STEP (no :MS)")),
            None => (number(rest, "STEP")?, 0),
        };
        let node = || number(what, "NODE").map(|n| n as u32);
        Ok(match kind {
            "kill" => NodeFault::Kill { node: node()?, step },
            "restart" => NodeFault::Restart { node: node()?, step },
            "pause" => NodeFault::Pause { node: node()?, step, ms },
            "disk-full" => NodeFault::DiskFull { node: node()?, step, ms },
            "corrupt" => NodeFault::Corrupt { node: node()?, step },
            "crash-before-rename" => NodeFault::CrashBeforeRename { node: node()?, step },
            "wipe" => NodeFault::Wipe { node: node()?, step },
            "duplicate" => NodeFault::Duplicate { node: node()?, step },
            "rogue" => NodeFault::Rogue { node: node()?, step },
            "partition" => {
                let side =
                    what.split(',').map(|n| number(n, "NODE").map(|n| n as u32)).collect::<Result<Vec<_>, _>>()?;
                NodeFault::Partition { side, step, ms }
            }
            "degrade" => NodeFault::Degrade { link: parse_link(what).map_err(|e| bad(&e))?, step, ms },
            "service-kill" => NodeFault::ServiceKill { target: what.parse().map_err(|e: String| bad(&e))?, step },
            "service-restart" => NodeFault::ServiceRestart { target: what.parse().map_err(|e: String| bad(&e))?, step },
            "service-pause" => NodeFault::ServicePause { target: what.parse().map_err(|e: String| bad(&e))?, step, ms },
            "service-cut" => NodeFault::ServiceCut { node: node()?, step, ms },
            _ => return Err(bad("unknown fault kind")),
        })
    }

    /// The spelling [`parse`](Self::parse) reads: `(kind, argument)`.
    pub fn to_flag(&self) -> (&'static str, String) {
        let arg = match self {
            NodeFault::Kill { node, step }
            | NodeFault::Restart { node, step }
            | NodeFault::Corrupt { node, step }
            | NodeFault::CrashBeforeRename { node, step }
            | NodeFault::Wipe { node, step }
            | NodeFault::Duplicate { node, step }
            | NodeFault::Rogue { node, step } => format!("{node}@{step}"),
            NodeFault::Pause { node, step, ms }
            | NodeFault::DiskFull { node, step, ms }
            | NodeFault::ServiceCut { node, step, ms } => {
                format!("{node}@{step}:{ms}")
            }
            NodeFault::Partition { side, step, ms } => {
                let side: Vec<String> = side.iter().map(u32::to_string).collect();
                format!("{}@{step}:{ms}", side.join(","))
            }
            NodeFault::Degrade { link, step, ms } => format!(
                "loss={},delay={},jitter={},dup={}@{step}:{ms}",
                link.loss, link.delay_ms, link.jitter_ms, link.duplicate
            ),
            NodeFault::ServiceKill { target, step } | NodeFault::ServiceRestart { target, step } => {
                format!("{target}@{step}")
            }
            NodeFault::ServicePause { target, step, ms } => format!("{target}@{step}:{ms}"),
        };
        (self.kind(), arg)
    }
}

/// `loss=0.2,delay=20,jitter=10,dup=0.05`, any subset, in any order.
fn parse_link(spec: &str) -> Result<LinkFaults, String> {
    let mut link = LinkFaults::default();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| format!("'{part}' is not KEY=VALUE"))?;
        let value = value.trim();
        let prob = || {
            f64::from_str(value)
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| format!("{key}={value}: expected a probability in [0, 1]"))
        };
        let ms = || u64::from_str(value).map_err(|_| format!("{key}={value}: expected milliseconds"));
        match key.trim() {
            "loss" => link.loss = prob()?,
            "dup" => link.duplicate = prob()?,
            "delay" => link.delay_ms = ms()?,
            "jitter" => link.jitter_ms = ms()?,
            other => return Err(format!("unknown key '{other}' (expected loss, delay, jitter, dup)")),
        }
    }
    Ok(link)
}

/// One injected fault, as `summary.json` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeFaultReport {
    /// `kill`, `pause`, `restart`, `partition`, `degrade`, `disk-full`,
    /// `corrupt`, `crash-before-rename`, `wipe`, `duplicate` or `rogue`.
    pub kind: String,
    /// The node (the first of a partition's side; none for `degrade`).
    pub node: Option<u32>,
    /// The step at which it was injected.
    pub step: u64,
    /// Milliseconds until a survivor declared the node down (if it was).
    pub detection_ms: Option<u64>,
    /// Milliseconds from the fault until the first step applied after the
    /// node was declared down (training running again without it).
    pub recovery_ms: Option<u64>,
    /// What the harness saw that shows the fault really happened (files
    /// corrupted, a temporary file left by the crash, bytes filled, how the
    /// duplicate process exited and the error it printed).
    pub evidence: Option<String>,
    /// The checkpoint the fault made bad (`corrupt`: the step whose files
    /// were damaged; `crash-before-rename`: the step never renamed). No
    /// takeover on that node may restore it.
    pub checkpoint_step: Option<u64>,
    /// `duplicate`: the second process's exit code (none: it was still
    /// running at the end of the job, or ended by a signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// How a node that ran until the end exited when it was told to stop.
#[derive(Clone, Debug, Serialize)]
pub struct NodeExit {
    /// The node.
    pub node: u32,
    /// Its exit code (none: ended by a signal).
    pub code: Option<i32>,
    /// The status in words.
    pub detail: String,
}

/// A node taking over as coordinator, and the checkpoint it restored.
#[derive(Clone, Debug, Serialize)]
pub struct Takeover {
    /// The node.
    pub node: u32,
    /// Its view's epoch.
    pub epoch: u64,
    /// The checkpoint step it restored (none: from the start).
    pub restore: Option<u64>,
    /// Where that checkpoint came from: `local` (its own copies), `node N`
    /// (fetched from a member), `none` (no member held one: from step 0).
    pub restore_from: Option<String>,
}

/// How `phalanx local` lays out its cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalOptions {
    /// Node processes.
    pub nodes: u32,
    /// Checkpoint copies on other nodes (`phalanx node --replicas`); none: the node's default.
    pub replicas: Option<u32>,
    /// Where the nodes coordinate (`phalanx local --coordination`).
    pub coordination: LocalCoordination,
    /// Tokio worker threads of every node process (`phalanx --worker-threads`); none: the
    /// host's cores shared among the nodes ([`default_worker_threads`]).
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

/// The tokio worker threads of each of `nodes` node processes on one host: its cores shared
/// among them, at least one each. More workers than cores only adds wake-ups: with two cores
/// and two or three nodes, one worker per node took the step of a 1,158-parameter model from
/// 0.47 to 0.38 ms (2 nodes) and 0.80 to 0.59 ms (3 nodes), the same at 1.2 M parameters,
/// whose maths runs off the workers anyway.
pub fn default_worker_threads(nodes: u32) -> std::num::NonZeroUsize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    std::num::NonZeroUsize::new(cores / nodes.max(1) as usize).unwrap_or(std::num::NonZeroUsize::MIN)
}

/// Where the nodes of a local run coordinate: `embedded` (the default), `etcd` or `zookeeper`
/// (a server started for the run, as a child process on a loopback port with its data in the
/// run's directory), or the spec of a running service (`etcd://…`, `zk://…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LocalCoordination {
    /// Heartbeats between the nodes.
    #[default]
    Embedded,
    /// An etcd of this many members started for the run (`etcd` is one, `etcd:3` three;
    /// Debian's `etcd-server`, installed when missing).
    Etcd(usize),
    /// One standalone ZooKeeper started for the run (Debian's `zookeeperd`).
    ZooKeeper,
    /// A service that runs already.
    Service(Coordination),
}

impl FromStr for LocalCoordination {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "embedded" => Ok(LocalCoordination::Embedded),
            "etcd" => Ok(LocalCoordination::Etcd(1)),
            "zookeeper" | "zk" => Ok(LocalCoordination::ZooKeeper),
            text if text.starts_with("etcd:") && !text.contains("//") => match text["etcd:".len()..].parse() {
                Ok(n @ 1..=MAX_LOCAL_ETCD) => Ok(LocalCoordination::Etcd(n)),
                _ => Err(format!("{text:?}: `etcd:N` starts N etcd members, 1 to {MAX_LOCAL_ETCD}")),
            },
            spec => spec.parse().map(LocalCoordination::Service).map_err(|e: CoordinationError| {
                format!("{e} (or `etcd` / `zookeeper` for a server started for the run)")
            }),
        }
    }
}

/// The most etcd members `phalanx local --coordination etcd:N` starts.
pub const MAX_LOCAL_ETCD: usize = 7;

/// A coordination server started for a run.
enum LocalService {
    Etcd(LocalEtcd),
    ZooKeeper(Box<LocalZooKeeper>),
}

impl LocalService {
    /// The members `target` names now (the leader is asked for; ZooKeeper has one server).
    fn resolve(&self, target: ServiceTarget) -> Result<Vec<usize>, String> {
        let size = match self {
            LocalService::Etcd(etcd) => etcd.size(),
            LocalService::ZooKeeper(_) => 1,
        };
        match (target, self) {
            (ServiceTarget::All, _) => Ok((0..size).collect()),
            (ServiceTarget::Member(i), _) if i < size => Ok(vec![i]),
            (ServiceTarget::Member(i), _) => Err(format!("there is no member {i} among {size} (0..{size})")),
            (ServiceTarget::Leader, LocalService::ZooKeeper(_)) => Ok(vec![0]),
            (ServiceTarget::Leader, LocalService::Etcd(etcd)) => {
                etcd.leader_blocking().map(|i| vec![i]).ok_or_else(|| "the etcd has no leader now".into())
            }
        }
    }

    fn name(&self, member: usize) -> String {
        match self {
            LocalService::Etcd(_) => format!("etcd member {member}"),
            LocalService::ZooKeeper(_) => "the ZooKeeper server".into(),
        }
    }

    fn pid(&self, member: usize) -> Option<u32> {
        match self {
            LocalService::Etcd(etcd) => etcd.pid(member),
            LocalService::ZooKeeper(zk) => zk.pid(),
        }
    }

    fn kill(&mut self, member: usize) {
        match self {
            LocalService::Etcd(etcd) => etcd.kill(member),
            LocalService::ZooKeeper(zk) => zk.kill(),
        }
    }

    fn restart(&mut self, member: usize) -> Result<(), String> {
        match self {
            LocalService::Etcd(etcd) => etcd.restart(member),
            LocalService::ZooKeeper(zk) => zk.restart(),
        }
        .map_err(|e| e.to_string())
    }

    fn pause(&self, member: usize, stop: bool) {
        match (self, stop) {
            (LocalService::Etcd(etcd), true) => etcd.pause(member),
            (LocalService::Etcd(etcd), false) => etcd.resume(member),
            (LocalService::ZooKeeper(zk), true) => zk.pause(),
            (LocalService::ZooKeeper(zk), false) => zk.resume(),
        }
    }
}

/// Start what `wanted` needs in `dir`; the spec the nodes join.
fn start_service(wanted: &LocalCoordination, dir: &Path) -> Result<(Option<LocalService>, Coordination), Error> {
    let started = match wanted {
        LocalCoordination::Embedded => return Ok((None, Coordination::Embedded)),
        LocalCoordination::Service(spec) => return Ok((None, spec.clone())),
        LocalCoordination::Etcd(_) | LocalCoordination::ZooKeeper => {
            let (wanted, dir) = (wanted.clone(), dir.to_path_buf());
            // The harness is synchronous; the servers' readiness checks are async.
            std::thread::spawn(move || -> Result<LocalService, String> {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    match wanted {
                        LocalCoordination::Etcd(members) => {
                            LocalEtcd::start(members, Some(&dir.join("etcd"))).await.map(LocalService::Etcd)
                        }
                        _ => LocalZooKeeper::start(Some(&dir.join("zookeeper")))
                            .await
                            .map(|z| LocalService::ZooKeeper(Box::new(z))),
                    }
                    .map_err(|e| e.to_string())
                })
            })
            .join()
            .map_err(|_| Error::Spawn("the coordination server's starter panicked".into()))?
            .map_err(|reason| Error::Field { field: "coordination".into(), reason })?
        }
    };
    let spec = match &started {
        LocalService::Etcd(etcd) => etcd.spec(LOCAL_PREFIX),
        LocalService::ZooKeeper(zookeeper) => zookeeper.spec(LOCAL_PREFIX),
    };
    Ok((Some(started), spec))
}

/// The prefix (etcd) or chroot (ZooKeeper) of a local run's cluster.
const LOCAL_PREFIX: &str = "/phalanx";

/// Appends `event` to the run's event log as one JSON line in one `write`. (`Display` of a
/// `Value` writes token by token: on an unbuffered file that was some 60 system calls per
/// event, and the nodes send one `commit` event per step and range.)
fn log_event(log: &mut impl Write, event: &serde_json::Value) {
    let mut line = event.to_string();
    line.push('\n');
    // A failed write (a full disk) loses the line, not the run.
    let _ = log.write_all(line.as_bytes());
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct LocalCluster {
    dir: tempfile::TempDir,
    exe: PathBuf,
    ports: Vec<u16>,
    out: PathBuf,
    nodes: Vec<Option<Child>>,
    events: mpsc::Sender<Value>,
    relay: Option<FaultRelay>,
    /// tmpfs mount points to unmount at the end.
    mounts: Vec<PathBuf>,
    /// Nodes started with `--crash-before-rename STEP` at their first start.
    crash_before_rename: BTreeMap<u32, u64>,
    /// Nodes started with `--rogue` (at every start): SIGUSR1 makes them forge a round.
    rogues: std::collections::BTreeSet<u32>,
    /// Steps at which a fault is due: the coordinator reports each of them
    /// as a `step` event (it reports others at a bounded rate).
    report_steps: Vec<u64>,
    /// `--replicas` of every node.
    replicas: Option<u32>,
    /// `--worker-threads` of every node.
    worker_threads: std::num::NonZeroUsize,
    /// Second processes started with a member's identity (`--duplicate`).
    duplicates: Vec<Duplicate>,
    /// Where the nodes coordinate (`--coordination` of every node).
    coordination: Coordination,
    /// The server started for the run, if any (stopped with the cluster, after the nodes).
    service: Option<LocalService>,
    /// The TCP relay between the nodes and that server, when a fault cuts a node off from it.
    service_relay: Option<crate::service_relay::ServiceRelay>,
}

/// A second process started with a member's identity (`--duplicate`).
struct Duplicate {
    /// The node whose id and certificate it uses.
    node: u32,
    child: Child,
    log: PathBuf,
    /// Its fault's index among the run's reports.
    report: usize,
}

/// How a `--duplicate` process ended, for its fault report.
struct DuplicateOutcome {
    report: usize,
    exit_code: Option<i32>,
    evidence: String,
}

impl LocalCluster {
    fn data_dir(&self, id: u32) -> PathBuf {
        self.dir.path().join(format!("data-{id}"))
    }

    /// Node `id`'s checkpoint copies of the run's job (the job given at start:
    /// `DATA_DIR/jobs/1/checkpoints`).
    fn checkpoints(&self, id: u32) -> PathBuf {
        let job = crate::cluster::jobs::STARTUP_JOB.to_string();
        self.data_dir(id).join("jobs").join(job).join("checkpoints")
    }

    fn spawn(&mut self, id: u32) -> Result<(), Error> {
        let seeds: Vec<String> = (0..self.ports.len() as u32)
            .filter(|j| *j != id)
            .map(|j| match self.relay.as_ref().and_then(|r| r.addr(id, j)) {
                Some(addr) => addr.to_string(),
                None => format!("127.0.0.1:{}", self.ports[j as usize]),
            })
            .collect();
        let log_path = self.dir.path().join(format!("node-{id}.log"));
        let mut command = self.node_command(id, self.ports[id as usize], &seeds, &self.data_dir(id), &self.out);
        // Only the first start crashes: the restarted node is the one that must cope.
        if let Some(step) = self.crash_before_rename.remove(&id) {
            command.args(["--crash-before-rename", &step.to_string()]);
        }
        if self.rogues.contains(&id) {
            command.arg("--rogue");
        }
        let child = self.start(command, &log_path, false)?;
        self.nodes[id as usize] = Some(child);
        Ok(())
    }

    /// `phalanx node` for node `id` listening on `port`, with the job.
    fn node_command(&self, id: u32, port: u16, seeds: &[String], data_dir: &Path, out: &Path) -> Command {
        let dir = self.dir.path();
        let mut command = Command::new(&self.exe);
        command
            .args(["node", "--id", &id.to_string(), "--listen", &format!("127.0.0.1:{port}")])
            .args(["--worker-threads", &self.worker_threads.to_string()])
            .arg("--certs")
            .arg(dir.join("certs"));
        // A one-node cluster has no seeds (an empty `--seeds` is not an address list).
        if !seeds.is_empty() {
            command.args(["--seeds", &seeds.join(",")]);
        }
        command
            .arg("--job")
            .arg(dir.join("job.toml"))
            .arg("--out")
            .arg(out)
            .arg("--data-dir")
            .arg(data_dir)
            // Every commit is an event: the harness checks the lease invariants on them.
            .arg("--record-commits");
        let coordination = match &self.service_relay {
            Some(relay) => self.coordination.through(relay.endpoints(id)),
            None => self.coordination.clone(),
        };
        if coordination != Coordination::Embedded {
            command.arg("--coordination").arg(coordination.to_string());
        }
        if let Some(r) = self.replicas {
            command.args(["--replicas", &r.to_string()]);
        }
        if !self.report_steps.is_empty() {
            let steps: Vec<String> = self.report_steps.iter().map(u64::to_string).collect();
            command.args(["--report-steps", &steps.join(",")]);
        }
        command
    }

    /// Starts `command` with stderr appended to `log_path` and its JSON event
    /// lines forwarded to the run's events (marked `"duplicate": true` for a
    /// duplicate process).
    fn start(&self, mut command: Command, log_path: &Path, duplicate: bool) -> Result<Child, Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|source| Error::Io { path: log_path.to_path_buf(), source })?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| Error::Io { path: self.exe.clone(), source })?;
        if let Some(out) = child.stdout.take() {
            let tx = self.events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                        if let (true, Some(map)) = (duplicate, v.as_object_mut()) {
                            map.insert("duplicate".into(), true.into());
                        }
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        Ok(child)
    }

    /// Starts a second process with node `id`'s id and certificate on another
    /// free port. It dials the members directly (never through the fault
    /// relay) and has a data and output directory of its own, so whatever it
    /// does cannot touch the real node's files.
    fn spawn_duplicate(&mut self, id: u32, report: usize) -> Result<String, Error> {
        let (ports, held) = reserve_ports(1)?;
        let port = ports[0];
        drop(held);
        let seeds: Vec<String> = (0..self.ports.len() as u32)
            .filter(|j| *j != id)
            .map(|j| format!("127.0.0.1:{}", self.ports[j as usize]))
            .collect();
        let dir = self.dir.path();
        let (data_dir, out) = (dir.join(format!("data-{id}-duplicate")), dir.join(format!("out-{id}-duplicate")));
        let log = dir.join(format!("node-{id}-duplicate-{}.log", self.duplicates.len()));
        let command = self.node_command(id, port, &seeds, &data_dir, &out);
        let child = self.start(command, &log, true)?;
        let started = format!("started a second node {id} (pid {}) on 127.0.0.1:{port}", child.id());
        self.duplicates.push(Duplicate { node: id, child, log, report });
        Ok(started)
    }

    /// Waits (at most [`STOP_GRACE`] in all) for each duplicate process to
    /// exit on its own, stops those still running, and says how each ended:
    /// its exit status and the error line it printed.
    fn finish_duplicates(&mut self) -> Vec<DuplicateOutcome> {
        let deadline = Instant::now() + STOP_GRACE;
        let mut outcomes = Vec::new();
        for d in &mut self.duplicates {
            let status = loop {
                match d.child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => break None,
                }
            };
            let node = d.node;
            let (exit_code, evidence) = match status {
                Some(status) => {
                    let text = std::fs::read_to_string(&d.log).unwrap_or_default();
                    let error = text.lines().rev().find(|l| l.starts_with("error:")).unwrap_or("(no error line)");
                    (status.code(), format!("the second process with node {node}'s id exited ({status}): {error}"))
                }
                None => {
                    let _ = d.child.kill();
                    let _ = d.child.wait();
                    (None, format!("the second process with node {node}'s id was still running at the end: killed"))
                }
            };
            outcomes.push(DuplicateOutcome { report: d.report, exit_code, evidence });
        }
        outcomes
    }

    /// Sends `sig` to node `id` if its process still runs. A child this harness already
    /// reaped (`try_wait` saw it exit) is never signalled: its pid may belong to another
    /// process by now. An unreaped child's pid cannot be reused, so the check is race-free.
    fn signal(&mut self, id: u32, sig: &str) {
        if let Some(child) = self.nodes[id as usize].as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status();
            }
        }
    }

    fn kill(&mut self, id: u32) {
        if let Some(mut child) = self.nodes[id as usize].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM every running node, SIGKILL what is left after the grace
    /// period; returns how each running node exited.
    fn stop_all(&mut self) -> Vec<NodeExit> {
        for id in 0..self.nodes.len() as u32 {
            self.signal(id, "CONT");
            self.signal(id, "TERM");
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut exits = Vec::new();
        for (id, slot) in self.nodes.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else { continue };
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => break None,
                }
            };
            let exit = match status {
                Some(s) => NodeExit { node: id as u32, code: s.code(), detail: s.to_string() },
                None => NodeExit { node: id as u32, code: None, detail: "did not stop on SIGTERM: killed".into() },
            };
            exits.push(exit);
        }
        for id in 0..self.nodes.len() as u32 {
            self.kill(id);
        }
        exits
    }

    /// Nodes that exited on their own (not killed by the harness), and how.
    fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, slot) in self.nodes.iter_mut().enumerate() {
            if let Some(Ok(Some(status))) = slot.as_mut().map(Child::try_wait) {
                out.push(format!("node {id} exited ({status})"));
            }
        }
        out
    }

    /// Lines of the node logs (duplicate processes' included) that report a panic.
    fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        let logs = (0..self.nodes.len())
            .map(|id| (format!("node {id}"), self.dir.path().join(format!("node-{id}.log"))))
            .chain(self.duplicates.iter().map(|d| (format!("duplicate of node {}", d.node), d.log.clone())));
        for (who, path) in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            found.extend(text.lines().filter(|l| l.contains("panicked")).map(|l| format!("{who}: {l}")));
        }
        found
    }

    /// Mount a size-limited tmpfs as node `id`'s data directory.
    fn mount_tmpfs(&mut self, id: u32) -> Result<(), Error> {
        let dir = self.data_dir(id);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE},mode=0755"), "phalanx-chaos"])
            .arg(&dir)
            .output()
            .map_err(|source| Error::Io { path: PathBuf::from("mount"), source })?;
        if !output.status.success() {
            return Err(Error::Field {
                field: "disk-full".into(),
                reason: format!(
                    "node {id}: mounting a {TMPFS_SIZE} tmpfs on {} failed (it needs root): {}",
                    dir.display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            });
        }
        self.mounts.push(dir);
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.stop_all();
        for d in &mut self.duplicates {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        // Keep the node logs with the outputs: the temp dir goes away.
        let logs = self.out.join("logs");
        if std::fs::create_dir_all(&logs).is_ok() {
            for id in 0..self.nodes.len() {
                let name = format!("node-{id}.log");
                let _ = std::fs::copy(self.dir.path().join(&name), logs.join(&name));
            }
            for d in &self.duplicates {
                if let Some(name) = d.log.file_name() {
                    let _ = std::fs::copy(&d.log, logs.join(name));
                }
            }
        }
        for dir in self.mounts.drain(..) {
            let _ = Command::new("umount").arg(&dir).status();
        }
    }
}

/// Fill the file system of `dir` until it refuses another byte; returns the bytes written.
fn fill_disk(dir: &Path) -> Result<u64, Error> {
    let path = dir.join(FILLER);
    let io = |source| Error::Io { path: path.clone(), source };
    let mut file = std::fs::File::create(&path).map_err(io)?;
    let mut written = 0u64;
    let mut chunk = 64 * 1024;
    let zeros = vec![0u8; chunk];
    while chunk > 0 {
        match file.write(&zeros[..chunk]) {
            Ok(0) => chunk /= 2,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => chunk /= 2,
            Err(e) => return Err(io(e)),
        }
    }
    let _ = file.sync_all();
    Ok(written)
}

/// The newest step among the checkpoint files in `dir`, and its files.
fn newest_checkpoint_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let key = FileKey::parse(e.file_name().to_str()?)?;
            Some((key.step, e.path()))
        })
        .collect();
    let newest = files.iter().map(|(s, _)| *s).max();
    files.retain(|(s, _)| Some(*s) == newest);
    files
}

/// Flip one byte in the middle of every checkpoint file of the newest step in `dir`.
fn corrupt_newest(dir: &Path) -> Result<(String, Option<u64>), Error> {
    let files = newest_checkpoint_files(dir);
    let Some(step) = files.first().map(|(s, _)| *s) else {
        return Ok((format!("no checkpoint file in {} to corrupt", dir.display()), None));
    };
    for (_, path) in &files {
        let io = |source| Error::Io { path: path.clone(), source };
        let mut bytes = std::fs::read(path).map_err(io)?;
        let mid = bytes.len() / 2;
        if let Some(b) = bytes.get_mut(mid) {
            *b ^= 0x5a;
        }
        std::fs::write(path, &bytes).map_err(io)?;
    }
    Ok((format!("corrupted {} checkpoint file(s) of step {step} in {}", files.len(), dir.display()), Some(step)))
}

/// Delete every checkpoint file in `dir`; says what went.
fn wipe_checkpoints(dir: &Path) -> Result<String, Error> {
    let mut steps = std::collections::BTreeSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Some(key) = entry.file_name().to_str().and_then(FileKey::parse) else { continue };
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                steps.insert(key.step);
                count += 1;
            }
            // The node pruned it between the listing and here: gone either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Io { path, source }),
        }
    }
    Ok(format!("deleted {count} checkpoint file(s) of steps {steps:?} in {}", dir.display()))
}

/// Temporary checkpoint files in `dir` (what a crash between write and rename leaves).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_temp_name(n))
        .collect()
}

/// `n` free loopback UDP ports, with the sockets that hold them: keep them
/// until everything else of the harness (the fault relay) is bound, so the
/// kernel cannot hand a node's port to one of its sockets.
fn reserve_ports(n: usize) -> Result<(Vec<u16>, Vec<std::net::UdpSocket>), Error> {
    let io = |source| Error::Io { path: PathBuf::from("127.0.0.1:0"), source };
    let sockets: Vec<std::net::UdpSocket> =
        (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>().map_err(io)?;
    let ports = sockets.iter().map(|s| s.local_addr().map(|a| a.port()).map_err(io)).collect::<Result<_, _>>()?;
    Ok((ports, sockets))
}

/// Something to undo when its time comes.
enum Undo {
    Resume(u32),
    /// SIGCONT these members of the coordination server.
    ResumeService(Vec<usize>),
    /// Let every node reach the coordination server again.
    HealService,
    Heal,
    FreeDisk(u32),
}

/// Run `config` on `options.nodes` local node processes with `faults`; returns the
/// summary (with `node_faults` added). `on_step` sees (step, total, loss) of
/// every `step` event: the steps at which faults are due, and the others at
/// a bounded rate (every step is in `OUT/history.csv`). The nodes run this
/// same executable (`phalanx node`).
pub fn run_local(
    config: &JobConfig,
    options: &LocalOptions,
    faults: Vec<NodeFault>,
    on_step: impl FnMut(u64, u64, f64),
) -> Result<Value, Error> {
    let exe = std::env::current_exe().map_err(|source| Error::Io { path: PathBuf::from("phalanx"), source })?;
    run_local_with_options(&exe, config, options, faults, on_step)
}

fn check_faults(
    config: &JobConfig,
    nodes: u32,
    faults: &[NodeFault],
    coordination: &LocalCoordination,
) -> Result<(), Error> {
    let bad = |f: &NodeFault, reason: String| {
        let (kind, arg) = f.to_flag();
        Error::Field { field: format!("--{kind} {arg}"), reason }
    };
    for f in faults {
        if f.on_service() {
            let members = match coordination {
                LocalCoordination::Etcd(n) => *n,
                LocalCoordination::ZooKeeper => 1,
                _ => {
                    return Err(bad(
                        f,
                        "faults of the coordination service need a server started for the run: --coordination etcd, etcd:N or zookeeper".into(),
                    ))
                }
            };
            let target = match f {
                NodeFault::ServiceKill { target, .. }
                | NodeFault::ServiceRestart { target, .. }
                | NodeFault::ServicePause { target, .. } => *target,
                _ => continue,
            };
            if let ServiceTarget::Member(i) = target {
                if i >= members {
                    return Err(bad(f, format!("there is no member {i} among the service's {members} (0..{members})")));
                }
            }
        }
        if let Some(node) = f.nodes().into_iter().find(|n| *n >= nodes) {
            return Err(bad(f, format!("there is no node {node} among {nodes} (ids 0..{nodes})")));
        }
        match f {
            NodeFault::Partition { side, .. } if side.is_empty() || side.len() as u32 >= nodes => {
                return Err(bad(f, "one side must have at least one node and leave at least one".into()));
            }
            NodeFault::Duplicate { .. } if nodes < 2 => {
                return Err(bad(f, "a duplicate needs another member to refuse it (at least 2 nodes)".into()));
            }
            NodeFault::Rogue { .. } if nodes < 2 => {
                return Err(bad(f, "a rogue needs other members to forge messages for (at least 2 nodes)".into()));
            }
            NodeFault::CrashBeforeRename { .. } | NodeFault::Rogue { .. } if !crate::FAULT_INJECTION => {
                let (kind, arg) = f.to_flag();
                return crate::require_fault_injection(false, &format!("--{kind}"), &arg);
            }
            NodeFault::CrashBeforeRename { step, .. }
                if config.checkpoint_every == 0 || step % config.checkpoint_every != 0 || *step == 0 =>
            {
                return Err(bad(
                    f,
                    format!("{step} is not a checkpoint step (checkpoint_every = {})", config.checkpoint_every),
                ));
            }
            NodeFault::CrashBeforeRename { step, .. } if config.checkpoint_min_interval_ms > 0 => {
                return Err(bad(
                    f,
                    format!(
                        "step {step} may be skipped by checkpoint_min_interval_ms = {} (a checkpoint sooner than \
                         that after the last one is not written): set checkpoint_min_interval_ms = 0",
                        config.checkpoint_min_interval_ms
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// [`run_local`] with the `phalanx` executable to start nodes from.
pub fn run_local_with(
    exe: &Path,
    config: &JobConfig,
    nodes: u32,
    faults: Vec<NodeFault>,
    on_step: impl FnMut(u64, u64, f64),
) -> Result<Value, Error> {
    run_local_with_options(exe, config, &LocalOptions { nodes, ..LocalOptions::default() }, faults, on_step)
}

/// [`run_local_with`] with every cluster option.
pub fn run_local_with_options(
    exe: &Path,
    config: &JobConfig,
    options: &LocalOptions,
    faults: Vec<NodeFault>,
    mut on_step: impl FnMut(u64, u64, f64),
) -> Result<Value, Error> {
    run_local_watching(exe, config, options, faults, |event| {
        if event["event"] == "step" {
            let step = event["step"].as_u64().unwrap_or(0);
            let total = event["total_steps"].as_u64().unwrap_or(0);
            on_step(step, total, event["loss"].as_f64().unwrap_or(f64::NAN));
        }
    })
}

/// [`run_local_with_options`] showing `on_event` every node event as it
/// arrives (each node's `listening` event carries its process id), before
/// the harness acts on it. Events of a `--duplicate` process are not shown.
pub fn run_local_watching(
    exe: &Path,
    config: &JobConfig,
    options: &LocalOptions,
    mut faults: Vec<NodeFault>,
    mut on_event: impl FnMut(&Value),
) -> Result<Value, Error> {
    let nodes = options.nodes;
    if nodes == 0 {
        return Err(Error::Field { field: "nodes".into(), reason: "must be at least 1".into() });
    }
    check_faults(config, nodes, &faults, &options.coordination)?;
    if let Some(r) = options.replicas.filter(|r| *r >= nodes) {
        return Err(Error::Field {
            field: "replicas".into(),
            reason: format!("{r} copies need {r} other nodes, and {nodes} nodes have {}", nodes - 1),
        });
    }
    faults.sort_by_key(NodeFault::trigger);
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
    // The coordinators append to the history; this run starts it.
    let _ = std::fs::remove_file(out.join(crate::output::HISTORY_FILE));
    let (ports, held) = reserve_ports(nodes as usize)?;
    let relay = if faults.iter().any(|f| matches!(f, NodeFault::Partition { .. } | NodeFault::Degrade { .. })) {
        let addrs = ports.iter().map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], *p))).collect();
        Some(FaultRelay::start(addrs, config.seed).map_err(|source| Error::Io { path: "fault relay".into(), source })?)
    } else {
        None
    };
    let (service, coordination) = start_service(&options.coordination, dir.path())?;
    let service_relay = if faults.iter().any(|f| matches!(f, NodeFault::ServiceCut { .. })) {
        let relay = crate::service_relay::ServiceRelay::start(nodes, coordination.endpoints())
            .map_err(|source| Error::Io { path: "service relay".into(), source })?;
        Some(relay)
    } else {
        None
    };
    // The nodes bind these ports next.
    drop(held);
    let (tx, rx) = mpsc::channel();
    let mut cluster = LocalCluster {
        dir,
        exe: exe.to_path_buf(),
        ports,
        out: out.clone(),
        nodes: (0..nodes).map(|_| None).collect(),
        events: tx,
        relay,
        mounts: Vec::new(),
        crash_before_rename: faults
            .iter()
            .filter_map(|f| match f {
                NodeFault::CrashBeforeRename { node, step } => Some((*node, *step)),
                _ => None,
            })
            .collect(),
        rogues: faults
            .iter()
            .filter_map(|f| match f {
                NodeFault::Rogue { node, .. } => Some(*node),
                _ => None,
            })
            .collect(),
        replicas: options.replicas,
        worker_threads: options.worker_threads.unwrap_or_else(|| default_worker_threads(nodes)),
        duplicates: Vec::new(),
        coordination,
        service,
        service_relay,
        report_steps: {
            let mut steps: Vec<u64> = faults.iter().map(NodeFault::trigger).collect();
            steps.dedup();
            steps
        },
    };
    let mut full: Vec<u32> = faults
        .iter()
        .filter_map(|f| match f {
            NodeFault::DiskFull { node, .. } => Some(*node),
            _ => None,
        })
        .collect();
    full.dedup();
    for node in full {
        cluster.mount_tmpfs(node)?;
    }
    for id in 0..nodes {
        cluster.spawn(id)?;
    }
    let mut pending = faults.into_iter().peekable();
    // (report, injected at, declared down at) — times in Unix ms, as the nodes stamp events.
    let mut reports: Vec<(NodeFaultReport, u64, Option<u64>)> = Vec::new();
    let mut takeovers: Vec<Takeover> = Vec::new();
    let mut undo: Vec<(Instant, Undo)> = Vec::new();
    // Every node event as a JSON line, for reading a run afterwards.
    std::fs::create_dir_all(&out).map_err(|source| Error::Io { path: out.clone(), source })?;
    let events_path = out.join("events.jsonl");
    let mut events_log =
        std::fs::File::create(&events_path).map_err(|source| Error::Io { path: events_path.clone(), source })?;
    let mut progress = (Instant::now(), None::<u64>);
    let done = loop {
        let left = STALL_BOUND.saturating_sub(progress.0.elapsed());
        if left.is_zero() {
            let last = progress.1.map_or("before the first step".to_string(), |s| format!("after step {s}"));
            let exited = cluster.exited();
            let exited = if exited.is_empty() { String::new() } else { format!("; {}", exited.join(", ")) };
            return Err(Error::Spawn(format!(
                "no training progress for {} s ({last}{exited}); node events are in {}, node logs in {}",
                STALL_BOUND.as_secs(),
                events_path.display(),
                out.join("logs").display()
            )));
        }
        // Undo faults whose time is over (the length is the fault, not a wait).
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = undo.into_iter().partition(|(at, _)| *at <= now);
        undo = later;
        for (_, u) in due {
            match u {
                Undo::Resume(node) => cluster.signal(node, "CONT"),
                Undo::HealService => {
                    if let Some(relay) = &cluster.service_relay {
                        relay.heal();
                    }
                }
                Undo::ResumeService(members) => {
                    if let Some(service) = &cluster.service {
                        for member in members {
                            service.pause(member, false);
                        }
                    }
                }
                Undo::Heal => {
                    if let Some(r) = &cluster.relay {
                        r.heal();
                    }
                }
                Undo::FreeDisk(node) => {
                    let path = cluster.data_dir(node).join(FILLER);
                    std::fs::remove_file(&path).map_err(|source| Error::Io { path, source })?;
                }
            }
        }
        let wait = undo.iter().map(|(at, _)| at.saturating_duration_since(now)).min().unwrap_or(left).min(left);
        let event = match rx.recv_timeout(wait) {
            Ok(v) => v,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::Spawn("every node exited".into())),
        };
        log_event(&mut events_log, &event);
        if event["duplicate"] == true {
            // A duplicate process speaks with a member's id: its events are kept, never counted.
            continue;
        }
        on_event(&event);
        match event["event"].as_str() {
            Some("step") => {
                let step = event["step"].as_u64().unwrap_or(0);
                progress = (Instant::now(), Some(step));
                // Training resumed: the first step applied after the node was declared down.
                let t = event["t_ms"].as_u64().unwrap_or(0);
                for (r, at, down) in reports.iter_mut() {
                    if r.recovery_ms.is_none() && down.is_some_and(|d| t >= d) {
                        r.recovery_ms = Some(t.saturating_sub(*at));
                    }
                }
                while pending.peek().is_some_and(|f| f.trigger() <= step) {
                    let Some(f) = pending.next() else { break };
                    let at = unix_ms();
                    let mut evidence = None;
                    let mut checkpoint_step = None;
                    match &f {
                        NodeFault::Kill { node, .. } => cluster.kill(*node),
                        NodeFault::Pause { node, ms, .. } => {
                            cluster.signal(*node, "STOP");
                            undo.push((Instant::now() + Duration::from_millis(*ms), Undo::Resume(*node)));
                        }
                        NodeFault::Restart { node, .. } => {
                            cluster.kill(*node);
                            cluster.spawn(*node)?;
                        }
                        NodeFault::Partition { side, ms, .. } => {
                            if let Some(r) = &cluster.relay {
                                r.partition(side);
                            }
                            undo.push((Instant::now() + Duration::from_millis(*ms), Undo::Heal));
                        }
                        NodeFault::Degrade { link, ms, .. } => {
                            if let Some(r) = &cluster.relay {
                                r.set_all(*link);
                            }
                            undo.push((Instant::now() + Duration::from_millis(*ms), Undo::Heal));
                        }
                        NodeFault::DiskFull { node, ms, .. } => {
                            let bytes = fill_disk(&cluster.data_dir(*node))?;
                            evidence = Some(format!("filled node {node}'s {TMPFS_SIZE} tmpfs with {bytes} bytes"));
                            undo.push((Instant::now() + Duration::from_millis(*ms), Undo::FreeDisk(*node)));
                        }
                        NodeFault::Corrupt { node, .. } => {
                            let (what, step) = corrupt_newest(&cluster.checkpoints(*node))?;
                            evidence = Some(what);
                            checkpoint_step = step;
                        }
                        // Armed at spawn; it fires inside the node.
                        NodeFault::CrashBeforeRename { step, .. } => checkpoint_step = Some(*step),
                        NodeFault::Wipe { node, .. } => evidence = Some(wipe_checkpoints(&cluster.checkpoints(*node))?),
                        // How it ended is filled in at the end of the run.
                        NodeFault::Duplicate { node, .. } => {
                            evidence = Some(cluster.spawn_duplicate(*node, reports.len())?);
                        }
                        NodeFault::ServiceCut { node, ms, .. } => {
                            if let Some(relay) = &cluster.service_relay {
                                relay.cut(*node);
                                evidence = Some(format!(
                                    "closed node {node}'s connections to the service and refused new ones for {ms} ms"
                                ));
                            }
                            undo.push((Instant::now() + Duration::from_millis(*ms), Undo::HealService));
                        }
                        NodeFault::ServiceKill { target, .. }
                        | NodeFault::ServiceRestart { target, .. }
                        | NodeFault::ServicePause { target, .. } => {
                            let service = cluster.service.as_mut().expect("checked before the run");
                            let members = service.resolve(*target).map_err(|reason| Error::Field {
                                field: format!("--{} {}", f.kind(), f.to_flag().1),
                                reason,
                            })?;
                            let mut done = Vec::new();
                            for &m in &members {
                                let (name, pid) = (service.name(m), service.pid(m));
                                match &f {
                                    NodeFault::ServiceKill { .. } => {
                                        service.kill(m);
                                        done.push(format!("SIGKILL {name} (pid {pid:?})"));
                                    }
                                    NodeFault::ServiceRestart { .. } => {
                                        service.restart(m).map_err(|reason| Error::Field {
                                            field: format!("--{} {}", f.kind(), f.to_flag().1),
                                            reason,
                                        })?;
                                        done.push(format!("started {name} again (pid {:?})", service.pid(m)));
                                    }
                                    _ => {
                                        service.pause(m, true);
                                        done.push(format!("SIGSTOP {name} (pid {pid:?})"));
                                    }
                                }
                            }
                            if let NodeFault::ServicePause { ms, .. } = &f {
                                undo.push((Instant::now() + Duration::from_millis(*ms), Undo::ResumeService(members)));
                            }
                            evidence = Some(done.join("; "));
                        }
                        // Started with `--rogue`; the signal makes it forge one round.
                        NodeFault::Rogue { node, .. } => {
                            cluster.signal(*node, "USR1");
                            evidence = Some(format!("sent SIGUSR1 to node {node}, a rogue member: one round of forged messages (its `forged` events)"));
                        }
                    }
                    let (kind, arg) = f.to_flag();
                    eprintln!("injected: --{kind} {arg} at step {step}");
                    // The harness's own state change, beside the nodes' in the event log.
                    let injected = serde_json::json!({
                        "event": "injected", "kind": kind, "fault": format!("--{kind} {arg}"),
                        "nodes": f.nodes(), "step": step, "t_ms": at,
                    });
                    log_event(&mut events_log, &injected);
                    let node = f.nodes().first().copied();
                    let report = NodeFaultReport {
                        kind: kind.into(),
                        node,
                        step: step.max(f.step()),
                        detection_ms: None,
                        recovery_ms: None,
                        evidence,
                        checkpoint_step,
                        exit_code: None,
                    };
                    reports.push((report, at, None));
                }
            }
            Some("down") => {
                let peer = event["peer"].as_u64().unwrap_or(u64::MAX) as u32;
                let t = event["t_ms"].as_u64().unwrap_or(0);
                for (r, at, down) in reports.iter_mut() {
                    if r.node == Some(peer) && r.detection_ms.is_none() && r.kind != "restart" {
                        r.detection_ms = Some(t.saturating_sub(*at));
                        *down = Some(t);
                        if r.kind == "crash-before-rename" {
                            let left = temp_files(&cluster.checkpoints(peer));
                            r.evidence = Some(format!("the crash left {} temporary file(s): {left:?}", left.len()));
                        }
                    }
                }
            }
            Some("coordinating") => takeovers.push(Takeover {
                node: event["node"].as_u64().unwrap_or(u64::MAX) as u32,
                epoch: event["epoch"].as_u64().unwrap_or(0),
                restore: event["restore"].as_u64(),
                restore_from: event["restore_from"].as_str().map(str::to_owned),
            }),
            Some("job_done") => break event,
            Some("job_failed") => {
                return Err(Error::Spawn(format!("the job failed: {}", event["error"].as_str().unwrap_or("?"))));
            }
            _ => {}
        }
    };
    let relay_stats = cluster.relay.as_ref().map(FaultRelay::stats);
    for outcome in cluster.finish_duplicates() {
        if let Some((r, _, _)) = reports.get_mut(outcome.report) {
            r.exit_code = outcome.exit_code;
            r.evidence = Some(outcome.evidence);
        }
    }
    let exits = cluster.stop_all();
    let panics = cluster.panics();
    let path = out.join("summary.json");
    let text = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let mut summary: Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Encode { what: path.display().to_string(), reason: e.to_string() })?;
    let node_faults: Vec<NodeFaultReport> = reports.into_iter().map(|(r, _, _)| r).collect();
    if let Some(map) = summary.as_object_mut() {
        map.insert("nodes".into(), nodes.into());
        map.insert("node_faults".into(), serde_json::to_value(&node_faults).unwrap_or_default());
        map.insert("coordinator".into(), done["from"].clone());
        map.insert("takeovers".into(), serde_json::to_value(&takeovers).unwrap_or_default());
        map.insert("node_exits".into(), serde_json::to_value(&exits).unwrap_or_default());
        map.insert("panics".into(), serde_json::to_value(&panics).unwrap_or_default());
        if let Some(stats) = relay_stats {
            map.insert("relay".into(), serde_json::to_value(stats).unwrap_or_default());
        }
    }
    let bytes = serde_json::to_vec_pretty(&summary)
        .map_err(|e| Error::Encode { what: "summary".into(), reason: e.to_string() })?;
    crate::output::write_atomic(&path, &bytes)?;
    // The coordinator drew its own faults; the node faults are known here.
    let mut marks: Vec<(u64, String)> = node_faults
        .iter()
        .map(|f| (f.step, format!("{}{}", f.kind, f.node.map(|n| format!(" {n}")).unwrap_or_default())))
        .collect();
    for f in summary["faults"].as_array().into_iter().flatten() {
        marks.push((f["step"].as_u64().unwrap_or(0), f["what"].as_str().unwrap_or("").to_string()));
    }
    if let Err(e) = crate::output::write_loss_svg(&out, &marks) {
        tracing::warn!(dir = %out.display(), "loss.svg not drawn: {e}");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's cores are shared among the nodes, never below one worker each.
    #[test]
    fn each_local_node_gets_its_share_of_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(default_worker_threads(1).get(), cores);
        assert_eq!(default_worker_threads(0).get(), cores, "no nodes counts as one");
        for nodes in 1..=2 * cores as u32 + 1 {
            let share = default_worker_threads(nodes).get();
            assert_eq!(share, (cores / nodes as usize).max(1), "{nodes} nodes on {cores} cores");
            assert!(share * nodes as usize <= cores || share == 1);
        }
        assert_eq!(default_worker_threads(u32::MAX).get(), 1);
    }

    /// Each event is one JSON line handed to the file in one `write` (a `Value`'s `Display`
    /// straight into the file made one system call per token).
    #[test]
    fn an_event_goes_to_the_log_in_one_write() {
        struct Writes(Vec<Vec<u8>>);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let event = serde_json::json!({"event": "commit", "node": 0, "range": 1, "step": 7, "hash": "00ff"});
        let mut log = Writes(Vec::new());
        log_event(&mut log, &event);
        log_event(&mut log, &event);
        assert_eq!(log.0.len(), 2, "one write per event");
        let line = String::from_utf8(log.0[0].clone()).expect("UTF-8");
        assert_eq!(line, format!("{event}\n"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(line.trim_end()).expect("JSON"), event);
    }

    #[test]
    fn every_fault_flag_round_trips() {
        for (kind, arg) in [
            ("kill", "2@150"),
            ("restart", "1@300"),
            ("pause", "1@150:1200"),
            ("partition", "0,2@100:1500"),
            ("degrade", "loss=0.2,delay=20,jitter=10,dup=0.05@100:2000"),
            ("disk-full", "0@100:1500"),
            ("corrupt", "1@150"),
            ("crash-before-rename", "0@160"),
            ("wipe", "1@310"),
            ("duplicate", "1@300"),
            ("rogue", "2@300"),
        ] {
            let f = NodeFault::parse(kind, arg).unwrap_or_else(|e| panic!("{e}"));
            let (k, a) = f.to_flag();
            assert_eq!(NodeFault::parse(k, &a), Ok(f), "{kind} {arg}");
        }
    }

    #[test]
    fn bad_fault_flags_name_the_flag_and_the_problem() {
        for (kind, arg, want) in [
            ("kill", "x@1", "NODE is not a number"),
            ("kill", "1", "expected WHAT@STEP"),
            ("pause", "1@5", "expected ...@STEP:MS"),
            ("kill", "1@5:3", "no :MS"),
            ("degrade", "loss=2@1:5", "probability"),
            ("degrade", "lost=0.1@1:5", "unknown key 'lost'"),
            ("partition", "0,a@1:5", "NODE is not a number"),
            ("rogue", "x@300", "NODE is not a number"),
            ("rogue", "2", "expected WHAT@STEP"),
            ("rogue", "2@300:50", "no :MS"),
            ("rogue", "2@soon", "STEP is not a number"),
        ] {
            let e = NodeFault::parse(kind, arg).unwrap_err();
            assert!(e.starts_with(&format!("--{kind} {arg}:")) && e.contains(want), "{e}");
        }
    }

    #[test]
    fn faults_that_cannot_happen_are_refused_before_any_node_starts() {
        let config = JobConfig { checkpoint_every: 20, ..JobConfig::default() };
        for (f, want) in [
            (NodeFault::Kill { node: 3, step: 1 }, "no node 3"),
            (NodeFault::Partition { side: vec![0, 1, 2], step: 1, ms: 5 }, "one side"),
            (NodeFault::CrashBeforeRename { node: 0, step: 150 }, "not a checkpoint step"),
            (NodeFault::Duplicate { node: 3, step: 1 }, "no node 3"),
        ] {
            let e = check_faults(&config, 3, &[f], &LocalCoordination::Embedded).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let e = check_faults(&config, 1, &[NodeFault::Duplicate { node: 0, step: 1 }], &LocalCoordination::Embedded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--duplicate 0@1") && e.contains("another member"), "{e}");
        let e = check_faults(&config, 3, &[NodeFault::Rogue { node: 3, step: 300 }], &LocalCoordination::Embedded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--rogue 3@300") && e.contains("no node 3"), "{e}");
        let e = check_faults(&config, 1, &[NodeFault::Rogue { node: 0, step: 300 }], &LocalCoordination::Embedded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--rogue 0@300") && e.contains("other members"), "{e}");
        // Faults of the coordination service need one started for the run, with that member.
        let kill_leader = NodeFault::parse("service-kill", "leader@300").unwrap();
        let e = check_faults(&config, 3, std::slice::from_ref(&kill_leader), &LocalCoordination::Embedded)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--service-kill leader@300") && e.contains("--coordination etcd"), "{e}");
        assert!(check_faults(&config, 3, &[kill_leader], &LocalCoordination::Etcd(3)).is_ok());
        let pause = NodeFault::parse("service-pause", "3@300:1000").unwrap();
        let e = check_faults(&config, 3, &[pause], &LocalCoordination::Etcd(3)).unwrap_err().to_string();
        assert!(e.contains("no member 3 among the service's 3"), "{e}");
        assert!(NodeFault::parse("service-pause", "all@300").unwrap_err().contains("@STEP:MS"));
        assert!(NodeFault::parse("service-kill", "boss@300").unwrap_err().contains("`leader`, `all`"));
        assert_eq!(
            NodeFault::parse("service-pause", "all@300:1000").unwrap().to_flag(),
            ("service-pause", "all@300:1000".into())
        );
    }

    #[test]
    fn local_coordination_names_a_backend_or_a_service() {
        assert_eq!("embedded".parse(), Ok(LocalCoordination::Embedded));
        assert_eq!("etcd".parse(), Ok(LocalCoordination::Etcd(1)));
        assert_eq!("etcd:3".parse(), Ok(LocalCoordination::Etcd(3)));
        assert_eq!("zookeeper".parse(), Ok(LocalCoordination::ZooKeeper));
        assert!(matches!("etcd://127.0.0.1:2379/p".parse(), Ok(LocalCoordination::Service(_))));
        assert!("etcd:0".parse::<LocalCoordination>().unwrap_err().contains("1 to 7"));
        assert!("consul".parse::<LocalCoordination>().unwrap_err().contains("`etcd` / `zookeeper`"));
    }
}
