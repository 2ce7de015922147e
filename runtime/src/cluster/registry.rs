//! The cluster's job registry (sans-IO): accepted jobs, their order and
//! state, replicated from the coordinator to every member.
//!
//! A long-lived cluster runs job after job. Any member takes a submission and
//! forwards it to the coordinator, which gives it the next id, queues it
//! (FIFO) and replicates the registry to the members. The submitter is told
//! "accepted" only once a **majority** holds a registry with the job, so a
//! coordinator that dies right after cannot lose an accepted job: whoever
//! takes over holds it (the rules elect a live member, and any two majorities
//! meet) and goes on with every running and queued job.
//!
//! ```text
//!  submit ──▶ (member) ──forward──▶ coordinator: accept → id, version v ──Registry{v}──▶ members
//!                                        ▲                                   │
//!                                        └────────── RegistryAck{v} ◀────────┘
//!  majority acked v ──▶ Accepted(id) to the submitter;  to_start(): queued jobs while running < max
//! ```
//!
//! Versions are `(epoch, seq)`: a member adopts a registry only if it is
//! newer than the one it holds, so a deposed coordinator's late update never
//! overwrites its successor's.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::JobConfig;

/// A job's id in its cluster.
pub type JobId = u64;

/// Jobs kept in the registry at most; the oldest finished ones are dropped
/// first, so a cluster that runs jobs for months holds a bounded registry.
pub const MAX_JOBS_KEPT: usize = 256;
/// Jobs queued at most; a submission beyond is refused (back-pressure).
pub const MAX_QUEUED: usize = 64;
/// Jobs running at once at most, whatever a node's `max_jobs` asks: with
/// [`MAX_QUEUED`] it keeps the jobs that are not over below [`MAX_JOBS_KEPT`],
/// so the registry stays within that bound.
pub const MAX_RUNNING: u32 = 64;
/// The largest job id and version sequence number a registry gives or adopts:
/// far beyond any real count, and below `u64::MAX` so that the next one exists.
pub const MAX_SEQ: u64 = u64::MAX / 2;

/// Where a job stands.
// Externally tagged (serde's default): it travels in bincode frames, which
// cannot carry internally tagged enums.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, waiting for a free slot.
    Queued,
    /// Running (or being resumed by a new coordinator).
    Running,
    /// Done.
    Finished {
        /// SHA-256 of the final parameters.
        model_sha256: String,
        /// Where the summary was written, if anywhere.
        summary: Option<String>,
    },
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// Finished, failed or cancelled.
    pub fn is_over(&self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    /// The state's name, as metrics and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Finished { .. } => "finished",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One accepted job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    /// Its id.
    pub id: JobId,
    /// What to train.
    pub spec: JobConfig,
    /// Where it stands.
    pub state: JobState,
}

/// A registry version: the coordinator's epoch, then its update count.
pub type Version = (u64, u64);

/// The replicated part of a registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its version.
    pub version: Version,
    /// The next id to give.
    pub next_id: JobId,
    /// The jobs, by id (ids grow with acceptance: the FIFO order).
    pub jobs: BTreeMap<JobId, JobEntry>,
}

/// Why a submission was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too many jobs wait already.
    #[error("the queue is full ({MAX_QUEUED} jobs wait); submit again later")]
    QueueFull,
    /// This node does not coordinate (the submission is forwarded instead).
    #[error("node {me} does not coordinate")]
    NotCoordinator {
        /// This node.
        me: u32,
    },
    /// No job id or registry version is left to give.
    #[error("the registry has no job id or version left to give")]
    Exhausted,
}

/// Why a member refused a registry snapshot from the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// More jobs than a registry ever holds.
    #[error("{jobs} jobs, and a registry holds at most {MAX_JOBS_KEPT} (+1 seeded)")]
    TooManyJobs {
        /// Jobs in the snapshot.
        jobs: usize,
    },
    /// A job filed under another id than its own.
    #[error("job {id} filed under id {key}")]
    MisfiledJob {
        /// The key it is filed under.
        key: JobId,
        /// Its own id.
        id: JobId,
    },
    /// An id, the next id or the version's sequence number beyond [`MAX_SEQ`].
    #[error("{what} {value} is beyond {MAX_SEQ}")]
    OutOfRange {
        /// Which number.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

impl Snapshot {
    /// Check what a snapshot from another node must satisfy before a member
    /// adopts it: bounded size, ids that match their keys, numbers whose
    /// successors exist.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if self.jobs.len() > MAX_JOBS_KEPT + 1 {
            return Err(SnapshotError::TooManyJobs { jobs: self.jobs.len() });
        }
        let beyond = |what, value: u64| (value > MAX_SEQ).then_some(SnapshotError::OutOfRange { what, value });
        if let Some(e) = beyond("next id", self.next_id).or_else(|| beyond("version sequence", self.version.1)) {
            return Err(e);
        }
        for (key, job) in &self.jobs {
            if *key != job.id {
                return Err(SnapshotError::MisfiledJob { key: *key, id: job.id });
            }
            if let Some(e) = beyond("job id", *key) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The registry of one node: the coordinator's working copy, or a member's
/// replica.
#[derive(Debug)]
pub struct Registry {
    me: u32,
    snapshot: Snapshot,
    /// Running jobs at most.
    max_running: u32,
    /// Coordinator only: (version, acks) of updates not yet held by a majority.
    acks: BTreeMap<Version, BTreeSet<u32>>,
    /// Coordinator only: the newest version a majority holds.
    durable: Version,
}

impl Registry {
    /// An empty registry of node `me`, running at most `max_running` jobs at once
    /// (at least 1, at most [`MAX_RUNNING`]).
    pub fn new(me: u32, max_running: u32) -> Self {
        Self {
            me,
            snapshot: Snapshot::default(),
            max_running: max_running.clamp(1, MAX_RUNNING),
            acks: BTreeMap::new(),
            durable: (0, 0),
        }
    }

    /// The registry as it stands.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// A job.
    pub fn job(&self, id: JobId) -> Option<&JobEntry> {
        self.snapshot.jobs.get(&id)
    }

    /// The newest version a majority of `members` holds (coordinator).
    pub fn durable(&self) -> Version {
        self.durable
    }

    /// Every member knows job `id` from its start (the job given on the
    /// command line): queued, in version `(0, 0)`, below anything a coordinator issues.
    pub fn seed(&mut self, id: JobId, spec: JobConfig) {
        self.snapshot.jobs.insert(id, JobEntry { id, spec, state: JobState::Queued });
        self.snapshot.next_id = self.snapshot.next_id.max(id.saturating_add(1));
    }

    /// This node starts coordinating in `epoch`: its updates carry versions of
    /// that epoch, above everything it holds.
    pub fn take_over(&mut self, epoch: u64) {
        if self.snapshot.version.0 < epoch {
            self.snapshot.version = (epoch, 0);
        }
        self.acks.clear();
        self.durable = self.durable.min(self.snapshot.version);
    }

    fn bump(&mut self) -> Version {
        // Adopted snapshots keep the sequence at most MAX_SEQ: no real registry
        // gets near the end, and a saturated one stops being newer, not a panic.
        self.snapshot.version.1 = self.snapshot.version.1.saturating_add(1);
        self.acks.insert(self.snapshot.version, [self.me].into_iter().collect());
        self.snapshot.version
    }

    /// Accept `spec` (already validated): its id and the version that must
    /// become durable before the submitter is told.
    pub fn accept(&mut self, spec: JobConfig) -> Result<(JobId, Version), SubmitError> {
        let queued = self.snapshot.jobs.values().filter(|j| j.state == JobState::Queued).count();
        if queued >= MAX_QUEUED {
            return Err(SubmitError::QueueFull);
        }
        let after_last = self.snapshot.jobs.keys().next_back().map_or(0, |k| k.saturating_add(1));
        let id = self.snapshot.next_id.max(after_last).max(1);
        if id > MAX_SEQ || self.snapshot.version.1 >= MAX_SEQ {
            return Err(SubmitError::Exhausted);
        }
        self.snapshot.next_id = id + 1;
        self.snapshot.jobs.insert(id, JobEntry { id, spec, state: JobState::Queued });
        self.forget_old();
        Ok((id, self.bump()))
    }

    /// Set a job's state (coordinator); returns the new version, or none if
    /// the job is unknown or already over.
    pub fn set_state(&mut self, id: JobId, state: JobState) -> Option<Version> {
        let entry = self.snapshot.jobs.get_mut(&id)?;
        if entry.state.is_over() || entry.state == state {
            return None;
        }
        entry.state = state;
        Some(self.bump())
    }

    /// Jobs to start now: queued ones, oldest first, while fewer than
    /// `max_running` run. They are marked running (a new version).
    pub fn to_start(&mut self) -> Vec<JobId> {
        let running = self.running().len() as u32;
        let free = self.max_running.saturating_sub(running) as usize;
        let start: Vec<JobId> =
            self.snapshot.jobs.values().filter(|j| j.state == JobState::Queued).map(|j| j.id).take(free).collect();
        for id in &start {
            if let Some(j) = self.snapshot.jobs.get_mut(id) {
                j.state = JobState::Running;
            }
        }
        if !start.is_empty() {
            self.bump();
        }
        start
    }

    /// Jobs marked running.
    pub fn running(&self) -> Vec<JobId> {
        self.snapshot.jobs.values().filter(|j| j.state == JobState::Running).map(|j| j.id).collect()
    }

    /// Member `from` holds version `v` (coordinator). Returns the newly durable
    /// version when a majority of the `configured` members holds it.
    pub fn on_ack(&mut self, from: u32, v: Version, configured: u32) -> Option<Version> {
        let majority = configured as usize / 2 + 1;
        let mut newly = None;
        for (version, acks) in self.acks.range_mut(..=v) {
            acks.insert(from);
            if acks.len() >= majority && *version > self.durable {
                newly = Some(*version);
            }
        }
        if let Some(v) = newly {
            self.durable = v;
            self.acks.retain(|version, _| *version > v);
        }
        newly
    }

    /// A member's copy: adopt `snapshot` if newer than the one held and valid
    /// ([`Snapshot::validate`]; an invalid one is logged and refused). Returns
    /// whether it was adopted.
    pub fn adopt(&mut self, snapshot: Snapshot) -> bool {
        if snapshot.version <= self.snapshot.version {
            return false;
        }
        if let Err(e) = snapshot.validate() {
            tracing::warn!(node = self.me, version = ?snapshot.version, "registry snapshot refused: {e}");
            return false;
        }
        self.snapshot = snapshot;
        true
    }

    /// A new coordinator on a coordination service: fold in the jobs the service keeps
    /// (`stored`, as [`ServiceStore`] wrote them), so that no job accepted by an earlier
    /// coordinator is lost even when every node that held it is gone. Per job the further
    /// state wins (queued, then running, then over; an over state is never changed), and ids go
    /// on after the highest. A node that has not yet held a registry of this cluster's life
    /// but has a startup job (seeded from its command line) is starting the cluster again: the
    /// stored job of that id is the previous life's, and the command line's replaces it.
    /// Entries that are misfiled or out of range are skipped. Returns whether anything changed.
    pub fn merge_stored(&mut self, stored: Vec<JobEntry>, startup: JobId) -> bool {
        let new_life = self.snapshot.version == (0, 0) && self.snapshot.jobs.contains_key(&startup);
        let mut changed = false;
        for entry in stored {
            if entry.id > MAX_SEQ || entry.id == 0 || (new_life && entry.id == startup) {
                continue;
            }
            let further = match self.snapshot.jobs.get(&entry.id) {
                None => true,
                Some(held) => !held.state.is_over() && rank(&entry.state) > rank(&held.state),
            };
            if further {
                self.snapshot.next_id = self.snapshot.next_id.max(entry.id + 1);
                self.snapshot.jobs.insert(entry.id, entry);
                changed = true;
            }
        }
        if changed {
            self.forget_old();
        }
        changed
    }

    /// Keep at most [`MAX_JOBS_KEPT`] jobs: drop the oldest that are over.
    fn forget_old(&mut self) {
        while self.snapshot.jobs.len() > MAX_JOBS_KEPT {
            let Some(old) = self.snapshot.jobs.values().find(|j| j.state.is_over()).map(|j| j.id) else { break };
            self.snapshot.jobs.remove(&old);
        }
    }
}

/// How far along a job is: queued, running, over.
fn rank(state: &JobState) -> u8 {
    match state {
        JobState::Queued => 0,
        JobState::Running => 1,
        _ => 2,
    }
}

/// Where the registry is kept on a coordination service, relative to the cluster's prefix:
/// one key per job, `jobs/ID`, holding its [`JobEntry`] as JSON.
pub const STORE_DIR: &str = "jobs";
/// Jobs a new coordinator reads from the service at most: the kept ones, and room for a
/// predecessor's writes not yet pruned.
pub const MAX_STORED: usize = 2 * MAX_JOBS_KEPT;
/// Pause before a write of the registry that failed is tried again.
pub const STORE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Where the newest complete checkpoint of each job is recorded on a service.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Where each job's partition → node assignment is recorded on a service.
pub const ASSIGNMENTS_DIR: &str = "assignments";
/// The directories of a job's records, deleted with the job.
pub const RECORD_DIRS: [&str; 2] = [CHECKPOINTS_DIR, ASSIGNMENTS_DIR];
/// Records are written at most this often (with a job's entry, at once): a checkpoint record
/// changes with every checkpoint, and the service's other clients need not hear of each.
pub const RECORD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The service key of job `id`.
pub fn store_key(id: JobId) -> String {
    format!("{STORE_DIR}/{id}")
}

/// A job's newest complete checkpoint (a file for every aggregator range, written by its
/// coordinator) and the nodes that hold all of it: the coordinator and the replicas that
/// acknowledged every file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Its step.
    pub step: u64,
    /// Nodes holding every file of it.
    pub copies: Vec<u32>,
}

/// Where a job's partitions are (each shard beside the trainer that owns its partition), as
/// its coordinator placed them for a view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    /// The view's epoch.
    pub epoch: u64,
    /// The node of partition `p`, at index `p`.
    pub partitions: Vec<u32>,
}

/// A record the coordinator keeps on a service beside a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobRecord {
    /// At `checkpoints/ID`.
    Checkpoint(CheckpointRecord),
    /// At `assignments/ID`.
    Assignment(AssignmentRecord),
}

impl JobRecord {
    /// The directory it is kept in.
    pub fn dir(&self) -> &'static str {
        match self {
            JobRecord::Checkpoint(_) => CHECKPOINTS_DIR,
            JobRecord::Assignment(_) => ASSIGNMENTS_DIR,
        }
    }

    /// Its value on the service (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            JobRecord::Checkpoint(r) => serde_json::to_vec(r),
            JobRecord::Assignment(r) => serde_json::to_vec(r),
        }
        .expect("a record serialises")
    }
}

/// The records of the jobs, by job and directory.
pub type Records = BTreeMap<(JobId, &'static str), JobRecord>;

/// One write of the registry to the coordination service: the entries that changed since the
/// service last held them, the jobs the registry forgot, and records that changed.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreWrite {
    /// The registry version it brings the service to.
    pub version: Version,
    /// Entries to write.
    pub puts: Vec<JobEntry>,
    /// Jobs to delete (with their records).
    pub deletes: Vec<JobId>,
    /// Records that changed.
    pub records: Vec<(JobId, JobRecord)>,
}

/// What the coordinator's registry needs from the service now.
#[derive(Clone, Debug, PartialEq)]
pub enum StorePoll {
    /// Write this (one write at a time).
    Write(StoreWrite),
    /// The service holds this version already (nothing it keeps changed).
    Durable(Version),
    /// Nothing: no change, a write under way, or a failed one waiting to be tried again.
    Idle,
}

/// A coordinator's copy of what the coordination service holds of its registry (sans-IO): on
/// a service, a job is accepted — and a state change durable — once the service holds it,
/// not a majority of the nodes. One write at a time; a change made meanwhile goes in the next.
/// Records go at most every [`RECORD_INTERVAL`], or with an entry.
#[derive(Debug)]
pub struct ServiceStore {
    held: BTreeMap<JobId, JobEntry>,
    held_records: Records,
    in_flight: Option<StoreWrite>,
    not_before: Option<std::time::Instant>,
    /// When records were last written.
    records_written: Option<std::time::Instant>,
    /// The registry version and records generation last compared with what the service
    /// holds, and — when only records differed, waiting for their turn — when to compare again.
    /// The node loop polls on every pass: an unchanged registry costs one comparison of these.
    seen: Option<(Version, u64)>,
    recheck_at: Option<std::time::Instant>,
}

impl ServiceStore {
    /// A new term's store: the service holds `held` (as read when the term began).
    pub fn new(held: impl IntoIterator<Item = JobEntry>) -> Self {
        Self {
            held: held.into_iter().map(|e| (e.id, e)).collect(),
            held_records: BTreeMap::new(),
            in_flight: None,
            not_before: None,
            records_written: None,
            seen: None,
            recheck_at: None,
        }
    }

    /// What to do for `snapshot` and the jobs' `records` (whose content changes with
    /// `generation`) at `now`.
    pub fn poll(
        &mut self,
        snapshot: &Snapshot,
        records: &Records,
        generation: u64,
        now: std::time::Instant,
    ) -> StorePoll {
        let looking_at = (snapshot.version, generation);
        let unchanged = self.seen == Some(looking_at) && self.recheck_at.is_none_or(|t| now < t);
        if self.in_flight.is_some() || self.not_before.is_some_and(|t| now < t) || unchanged {
            return StorePoll::Idle;
        }
        self.not_before = None;
        let puts: Vec<JobEntry> =
            snapshot.jobs.values().filter(|j| self.held.get(&j.id) != Some(*j)).cloned().collect();
        let deletes: Vec<JobId> = self.held.keys().filter(|id| !snapshot.jobs.contains_key(id)).copied().collect();
        let changed: Vec<(JobId, JobRecord)> = records
            .iter()
            .filter(|((id, _), r)| snapshot.jobs.contains_key(id) && self.held_records.get(&(*id, r.dir())) != Some(*r))
            .map(|((id, _), r)| (*id, r.clone()))
            .collect();
        let due_at = self.records_written.map(|t| t + RECORD_INTERVAL);
        let due = due_at.is_none_or(|t| now >= t);
        let records = if due || !puts.is_empty() || !deletes.is_empty() { changed.clone() } else { Vec::new() };
        if puts.is_empty() && deletes.is_empty() && records.is_empty() {
            // Held in full, or only records differ and wait for their turn: look again then.
            self.seen = Some(looking_at);
            self.recheck_at = if changed.is_empty() { None } else { due_at };
            return StorePoll::Durable(snapshot.version);
        }
        let write = StoreWrite { version: snapshot.version, puts, deletes, records };
        self.in_flight = Some(write.clone());
        StorePoll::Write(write)
    }

    /// A write is under way, or a failed one waits to be tried again.
    pub fn pending(&self) -> bool {
        self.in_flight.is_some() || self.not_before.is_some()
    }

    /// The write of `version` ended: `true` when the service holds it all. Returns the version
    /// now durable; after a failure the write is tried again [`STORE_RETRY`] later.
    pub fn on_written(&mut self, version: Version, ok: bool, now: std::time::Instant) -> Option<Version> {
        let write = self.in_flight.take_if(|w| w.version == version)?;
        if !ok {
            self.not_before = Some(now + STORE_RETRY);
            return None;
        }
        for id in write.deletes {
            self.held.remove(&id);
            self.held_records.retain(|(job, _), _| *job != id);
        }
        for entry in write.puts {
            self.held.insert(entry.id, entry);
        }
        if !write.records.is_empty() {
            self.records_written = Some(now);
        }
        for (id, record) in write.records {
            self.held_records.insert((id, record.dir()), record);
        }
        // The registry may have changed meanwhile: look again.
        self.seen = None;
        Some(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STARTUP: JobId = 1;

    fn spec(seed: u64) -> JobConfig {
        JobConfig { seed, ..JobConfig::default() }
    }

    #[test]
    fn jobs_queue_fifo_and_start_while_a_slot_is_free() {
        let mut r = Registry::new(0, 1);
        r.take_over(1);
        let (a, _) = r.accept(spec(1)).unwrap();
        let (b, _) = r.accept(spec(2)).unwrap();
        assert!(b > a);
        assert_eq!(r.to_start(), vec![a]);
        assert_eq!(r.to_start(), Vec::<JobId>::new(), "one slot");
        r.set_state(a, JobState::Finished { model_sha256: "x".into(), summary: None });
        assert_eq!(r.to_start(), vec![b]);
        assert_eq!(r.running(), vec![b]);
    }

    #[test]
    fn an_accept_is_durable_once_a_majority_holds_it() {
        let mut r = Registry::new(0, 1);
        r.take_over(3);
        let (_, v) = r.accept(spec(1)).unwrap();
        assert!(r.durable() < v);
        // Five members: the coordinator and two more make a majority.
        assert_eq!(r.on_ack(1, v, 5), None);
        assert_eq!(r.on_ack(4, v, 5), Some(v));
        assert_eq!(r.durable(), v);
        // A later ack of an older version changes nothing.
        assert_eq!(r.on_ack(2, (3, 0), 5), None);
    }

    #[test]
    fn an_ack_of_a_newer_version_covers_the_older_ones() {
        let mut r = Registry::new(0, 2);
        r.take_over(1);
        let (_, v1) = r.accept(spec(1)).unwrap();
        let (_, v2) = r.accept(spec(2)).unwrap();
        assert_eq!(r.on_ack(1, v2, 3), Some(v2));
        assert!(r.durable() >= v1);
    }

    #[test]
    fn a_member_adopts_only_newer_registries_so_a_deposed_coordinator_cannot_overwrite() {
        let mut old = Registry::new(0, 1);
        old.take_over(1);
        old.accept(spec(1)).unwrap();
        let mut new = Registry::new(1, 1);
        assert!(new.adopt(old.snapshot().clone()));
        new.take_over(2);
        let (b, _) = new.accept(spec(2)).unwrap();
        // The deposed coordinator accepts more in its old epoch; a member holding
        // the new registry ignores it.
        old.accept(spec(3)).unwrap();
        let mut member = Registry::new(2, 1);
        assert!(member.adopt(new.snapshot().clone()));
        assert!(!member.adopt(old.snapshot().clone()));
        assert!(member.job(b).is_some());
        assert_eq!(member.snapshot().jobs.len(), 2);
    }

    #[test]
    fn a_successor_keeps_numbering_after_the_jobs_it_holds() {
        let mut old = Registry::new(0, 1);
        old.take_over(1);
        let (a, _) = old.accept(spec(1)).unwrap();
        let mut new = Registry::new(1, 1);
        new.adopt(old.snapshot().clone());
        new.take_over(2);
        let (b, _) = new.accept(spec(2)).unwrap();
        assert!(b > a);
        assert_eq!(new.to_start(), vec![a], "the queued job accepted by the predecessor starts first");
    }

    #[test]
    fn the_queue_and_the_registry_are_bounded() {
        let mut r = Registry::new(0, 1);
        r.take_over(1);
        for i in 0..MAX_QUEUED {
            r.accept(spec(i as u64)).unwrap();
        }
        assert_eq!(r.accept(spec(0)), Err(SubmitError::QueueFull));
        for _ in 0..(MAX_JOBS_KEPT * 2) {
            let id = r.to_start()[0];
            r.set_state(id, JobState::Cancelled);
            r.accept(spec(1)).unwrap();
        }
        assert!(r.snapshot().jobs.len() <= MAX_JOBS_KEPT);
    }

    #[test]
    fn a_new_coordinator_keeps_every_job_the_service_holds_and_the_further_state() {
        let mut r = Registry::new(1, 1);
        r.seed(STARTUP, spec(7));
        r.adopt(Snapshot {
            version: (2, 3),
            next_id: 3,
            jobs: [
                (STARTUP, JobEntry { id: STARTUP, spec: spec(7), state: JobState::Running }),
                (2, JobEntry { id: 2, spec: spec(2), state: JobState::Queued }),
            ]
            .into_iter()
            .collect(),
        });
        let finished = JobState::Finished { model_sha256: "ab".into(), summary: None };
        let stored = vec![
            // Further than this node heard (the predecessor wrote it, then died).
            JobEntry { id: STARTUP, spec: spec(7), state: finished.clone() },
            // Behind: this node's copy is further.
            JobEntry { id: 2, spec: spec(2), state: JobState::Queued },
            // Accepted (and told) by the predecessor; never broadcast to this node.
            JobEntry { id: 5, spec: spec(5), state: JobState::Queued },
            // Not a job Phalanx files.
            JobEntry { id: 0, spec: spec(0), state: JobState::Queued },
        ];
        assert!(r.merge_stored(stored, STARTUP));
        assert_eq!(r.job(STARTUP).unwrap().state, finished);
        assert_eq!(r.job(5).unwrap().state, JobState::Queued);
        assert!(r.job(0).is_none());
        r.take_over(3);
        let (id, _) = r.accept(spec(9)).unwrap();
        assert_eq!(id, 6, "ids go on after the stored ones");
        // An over state is never changed by a stored entry.
        assert!(!r.merge_stored(vec![JobEntry { id: STARTUP, spec: spec(7), state: JobState::Running }], STARTUP));
    }

    #[test]
    fn a_cluster_started_again_runs_its_command_line_job_not_the_stored_one() {
        let mut r = Registry::new(0, 1);
        r.seed(STARTUP, spec(7));
        let old = JobState::Finished { model_sha256: "ab".into(), summary: None };
        let stored = vec![
            JobEntry { id: STARTUP, spec: spec(7), state: old },
            JobEntry { id: 2, spec: spec(2), state: JobState::Queued },
        ];
        assert!(r.merge_stored(stored, STARTUP));
        assert_eq!(r.job(STARTUP).unwrap().state, JobState::Queued);
        assert_eq!(r.job(2).unwrap().state, JobState::Queued, "a submitted job survives the whole cluster");
        // Without a job on its command line, job 1 is a submitted one like any other.
        let mut r = Registry::new(0, 1);
        let stored = JobEntry { id: STARTUP, spec: spec(7), state: JobState::Running };
        assert!(r.merge_stored(vec![stored.clone()], STARTUP));
        assert_eq!(r.job(STARTUP), Some(&stored));
    }

    #[test]
    fn the_store_writes_what_changed_one_write_at_a_time_and_retries_a_failed_one() {
        let now = std::time::Instant::now();
        let mut r = Registry::new(0, 1);
        r.take_over(1);
        let kept = JobEntry { id: 9, spec: spec(9), state: JobState::Cancelled };
        let mut store = ServiceStore::new([kept.clone()]);
        let (a, v1) = r.accept(spec(1)).unwrap();
        let StorePoll::Write(w) = store.poll(r.snapshot(), &Records::new(), 0, now) else { panic!("a write") };
        assert_eq!((w.version, w.puts.len(), w.deletes.clone()), (v1, 1, vec![9]), "job 9 is not in the registry");
        // A change while the write is under way waits for it.
        let (b, v2) = r.accept(spec(2)).unwrap();
        assert_eq!(store.poll(r.snapshot(), &Records::new(), 0, now), StorePoll::Idle);
        // Fenced out or unreachable: not durable, tried again later.
        assert_eq!(store.on_written(v1, false, now), None);
        assert_eq!(store.poll(r.snapshot(), &Records::new(), 0, now), StorePoll::Idle);
        let later = now + STORE_RETRY;
        let StorePoll::Write(w) = store.poll(r.snapshot(), &Records::new(), 0, later) else { panic!("tried again") };
        assert_eq!(w.version, v2);
        assert_eq!(w.puts.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a, b]);
        // A late answer for another version changes nothing.
        assert_eq!(store.on_written(v1, true, later), None);
        assert_eq!(store.on_written(v2, true, later), Some(v2));
        // Nothing changed since: durable at once, and then quiet.
        assert_eq!(store.poll(r.snapshot(), &Records::new(), 0, later), StorePoll::Durable(v2));
        assert_eq!(store.poll(r.snapshot(), &Records::new(), 0, later), StorePoll::Idle);
        r.set_state(a, JobState::Running);
        let StorePoll::Write(w) = store.poll(r.snapshot(), &Records::new(), 0, later) else { panic!("a write") };
        assert_eq!((w.puts.len(), w.puts[0].id, w.deletes.len()), (1, a, 0), "only what changed");
        assert_eq!(store.on_written(w.version, true, later), Some(w.version));
        // A job's records: written when they change (their generation moves on), only for jobs
        // the registry holds, and at most every RECORD_INTERVAL unless an entry goes too.
        let checkpoint = |step| JobRecord::Checkpoint(CheckpointRecord { step, copies: vec![0, 1] });
        let mut records = Records::new();
        records.insert((a, CHECKPOINTS_DIR), checkpoint(20));
        records.insert((77, CHECKPOINTS_DIR), checkpoint(20));
        let StorePoll::Write(w) = store.poll(r.snapshot(), &records, 1, later) else { panic!("a write") };
        assert_eq!(w.records, vec![(a, checkpoint(20))]);
        assert!(w.puts.is_empty() && w.deletes.is_empty());
        assert_eq!(store.on_written(w.version, true, later), Some(w.version));
        assert_eq!(store.poll(r.snapshot(), &records, 1, later), StorePoll::Durable(w.version));
        records.insert((a, CHECKPOINTS_DIR), checkpoint(40));
        let soon = later + RECORD_INTERVAL / 2;
        assert_eq!(store.poll(r.snapshot(), &records, 2, soon), StorePoll::Durable(w.version), "not yet");
        // An entry changing takes the record with it.
        r.set_state(b, JobState::Running);
        let StorePoll::Write(w) = store.poll(r.snapshot(), &records, 2, soon) else { panic!("a write") };
        assert_eq!((w.puts.len(), w.records.clone()), (1, vec![(a, checkpoint(40))]));
        assert_eq!(store.on_written(w.version, true, soon), Some(w.version));
        records.insert((a, CHECKPOINTS_DIR), checkpoint(60));
        assert_eq!(store.poll(r.snapshot(), &records, 3, soon), StorePoll::Durable(w.version));
        // Nothing changed and the record is not due: the next passes of the node loop compare nothing.
        assert_eq!(store.poll(r.snapshot(), &records, 3, soon + RECORD_INTERVAL / 2), StorePoll::Idle);
        let StorePoll::Write(w) = store.poll(r.snapshot(), &records, 3, soon + RECORD_INTERVAL) else { panic!("due") };
        assert_eq!(w.records, vec![(a, checkpoint(60))]);
    }

    #[test]
    fn a_job_that_is_over_stays_over() {
        let mut r = Registry::new(0, 1);
        r.take_over(1);
        let (a, _) = r.accept(spec(1)).unwrap();
        assert!(r.set_state(a, JobState::Cancelled).is_some());
        assert!(r.set_state(a, JobState::Running).is_none());
        assert_eq!(r.job(a).unwrap().state, JobState::Cancelled);
    }
}

/// Any snapshot, ack or order: the registry never panics and stays bounded.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    fn any_u64() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0..8u64, 1 => Just(MAX_SEQ), 1 => Just(MAX_SEQ + 1), 1 => Just(u64::MAX), 1 => any::<u64>()]
    }

    fn state() -> impl Strategy<Value = JobState> {
        prop_oneof![
            Just(JobState::Queued),
            Just(JobState::Running),
            Just(JobState::Finished { model_sha256: "ab".into(), summary: None }),
            Just(JobState::Failed { error: "e".into() }),
            Just(JobState::Cancelled),
        ]
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        let entry = (prop_oneof![Just(None), any_u64().prop_map(Some)], state());
        (any_u64(), any_u64(), any_u64(), btree_map(any_u64(), entry, 0..6), 0..300usize).prop_map(
            |(epoch, seq, next_id, entries, extra)| {
                let mut jobs: BTreeMap<JobId, JobEntry> = entries
                    .into_iter()
                    .map(|(key, (id, state))| {
                        (key, JobEntry { id: id.unwrap_or(key), spec: JobConfig::default(), state })
                    })
                    .collect();
                // Sometimes far more jobs than a registry holds.
                if extra > 250 {
                    jobs.extend(
                        (1000..1000 + extra as u64)
                            .map(|id| (id, JobEntry { id, spec: JobConfig::default(), state: JobState::Cancelled })),
                    );
                }
                Snapshot { version: (epoch, seq), next_id, jobs }
            },
        )
    }

    #[derive(Clone, Debug)]
    enum Op {
        Adopt(Snapshot),
        TakeOver(u64),
        Accept,
        SetState(u64, JobState),
        ToStart,
        Ack(u32, (u64, u64), u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => snapshot().prop_map(Op::Adopt),
            1 => any_u64().prop_map(Op::TakeOver),
            3 => Just(Op::Accept),
            2 => (any_u64(), state()).prop_map(|(id, s)| Op::SetState(id, s)),
            2 => Just(Op::ToStart),
            2 => (any::<u32>(), (any_u64(), any_u64()), any::<u32>()).prop_map(|(f, v, c)| Op::Ack(f, v, c)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_registry_takes_any_snapshot_ack_and_order(ops in vec(op(), 0..40), max_running in any::<u32>()) {
            let mut r = Registry::new(1, max_running);
            r.seed(1, JobConfig::default());
            for op in ops {
                match op {
                    Op::Adopt(s) => {
                        let valid = s.validate().is_ok();
                        if r.adopt(s) {
                            prop_assert!(valid);
                        }
                    }
                    Op::TakeOver(epoch) => r.take_over(epoch),
                    Op::Accept => {
                        let _ = r.accept(JobConfig::default());
                    }
                    Op::SetState(id, state) => {
                        let _ = r.set_state(id, state);
                    }
                    Op::ToStart => {
                        let _ = r.to_start();
                    }
                    Op::Ack(from, v, configured) => {
                        let _ = r.on_ack(from, v, configured);
                    }
                }
                let s = r.snapshot();
                prop_assert!(s.jobs.len() <= MAX_JOBS_KEPT + 1, "{} jobs", s.jobs.len());
                prop_assert!(r.running().len() <= MAX_RUNNING as usize);
            }
        }
    }

    #[test]
    fn a_snapshot_whose_numbers_have_no_successor_is_refused() {
        let job = |id| JobEntry { id, spec: JobConfig::default(), state: JobState::Queued };
        let mut r = Registry::new(1, 1);
        for bad in [
            Snapshot { version: (1, u64::MAX), ..Snapshot::default() },
            Snapshot { version: (1, 1), next_id: u64::MAX, ..Snapshot::default() },
            Snapshot {
                version: (1, 1),
                jobs: [(u64::MAX, job(u64::MAX))].into_iter().collect(),
                ..Snapshot::default()
            },
            Snapshot { version: (1, 1), jobs: [(3, job(4))].into_iter().collect(), ..Snapshot::default() },
            Snapshot { version: (1, 1), jobs: (0..300).map(|id| (id, job(id))).collect(), ..Snapshot::default() },
        ] {
            let why = bad.validate().unwrap_err();
            assert!(!r.adopt(bad), "{why}");
        }
        // Before validation, taking over after adopting `u64::MAX` made the next accept overflow.
        assert_eq!(r.snapshot().version, (0, 0));
        r.take_over(2);
        assert!(r.accept(JobConfig::default()).is_ok());
    }
}
