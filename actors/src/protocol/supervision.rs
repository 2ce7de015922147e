//! The job supervisor's core (sans-IO): restart policy, rollback decisions,
//! progress and recovery accounting.
//!
//! ractor reports a dead child as a `SupervisionEvent`; it restarts nothing
//! by itself. This core decides, OTP-style, what happens next:
//!
//! ```text
//!  child failed ─▶ too many restarts in window? ─yes─▶ Fail(job error naming actor, partitions, step)
//!                        │ no
//!                        ▼
//!                 RestartAfter(backoff) ─timer─▶ restart due ─▶ Spawn (+ Rollback of the other
//!                                                               aggregators when an aggregator died)
//! ```
//!
//! Trainers and shards restart one-for-one: a new trainer asks the
//! aggregators for θ and recomputes the current step; a new shard is
//! announced to the trainer owning its partition, which re-sends its
//! requests. An aggregator restart rolls *every* aggregator back to the
//! newest complete checkpoint under a new generation, because the ranges
//! together form one θ and must agree on its version; the steps since are
//! recomputed and give the same bits. An aggregator that was still starting
//! when a later rollback was ordered (a spawn on another node is answered
//! late, and a message to an actor not started yet is dropped there) gets
//! that rollback when it reports started, so no range stays behind in an
//! older generation.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ledger::Ledger;
use super::loss_series::LossSeries;
use super::msg::{ActorKey, JobId, Msg, Role};
use super::{Addr, Schedule};

/// Steps past the global one whose loss the supervisor keeps while a slower range catches up
/// (ranges run in lockstep: one or two in practice).
const MAX_STEPS_AHEAD: usize = 256;

/// How often a child may fail before the failure escalates, as in OTP's
/// `intensity`/`period`, and how long to wait before each restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Restarts allowed within `window_ms`; one more failure fails the job.
    pub max_restarts: u32,
    /// The sliding window, in milliseconds.
    pub window_ms: u64,
    /// Delay before the first restart in a window, in milliseconds.
    pub backoff_initial_ms: u64,
    /// Upper bound of the exponentially growing delay, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { max_restarts: 5, window_ms: 10_000, backoff_initial_ms: 5, backoff_max_ms: 1_000 }
    }
}

impl RestartPolicy {
    /// Delay before restart number `n` (1-based) within the window.
    pub fn backoff(&self, n: u32) -> Duration {
        let shift = n.saturating_sub(1).min(20);
        let ms = self.backoff_initial_ms.saturating_mul(1u64 << shift).min(self.backoff_max_ms);
        Duration::from_millis(ms)
    }
}

/// The shape of a job as the supervisor sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPlan {
    /// The job.
    pub job: JobId,
    /// Partition `p` → the trainer owning it.
    pub assignment: Vec<u32>,
    /// Number of trainers.
    pub trainers: u32,
    /// `(offset, len)` of every aggregator range.
    pub ranges: Vec<(usize, usize)>,
    /// The step schedule.
    pub schedule: Schedule,
    /// Policy for shards.
    pub shard_policy: RestartPolicy,
    /// Policy for trainers.
    pub trainer_policy: RestartPolicy,
    /// Policy for aggregators.
    pub aggregator_policy: RestartPolicy,
}

impl JobPlan {
    /// Contiguous assignment, the default: trainer `t` of `T` owns the partitions
    /// `⌈t·P/T⌉ .. ⌈(t+1)·P/T⌉`, so the trainers' shares differ by at most one partition and
    /// whole subtrees of the reduction tree stay with one trainer (it sends one partial sum
    /// per subtree instead of one gradient per partition; see [`super::reduce`]). The larger
    /// shares come first: with 8 partitions and 3 trainers the blocks are `[0,3) [3,6) [6,8)`,
    /// 5 partial sums a step (as `[0,2) [2,5) [5,8)`; no split into shares of 3, 3 and 2
    /// gives fewer). With every range on the coordinator's node (placement `coordinator`)
    /// trainer 0 runs beside them, so 3 of those sums cross the network instead of 4; with the
    /// ranges spread, (N−1)/N of every sum does. P = T × 2^k partitions give each trainer one
    /// whole subtree, one sum (docs/ARCHITECTURE.md, "Bytes per node"). With more trainers
    /// than partitions, trainer `p` owns partition `p` and the others none.
    pub fn contiguous(partitions: u32, trainers: u32) -> Vec<u32> {
        let (p, t) = (u64::from(partitions), u64::from(trainers.clamp(1, partitions.max(1))));
        // The owner of partition q is the largest t with ⌈t·P/T⌉ ≤ q, i.e. t·P/T ≤ q.
        (0..p).map(|q| ((q * t) / p.max(1)).min(t - 1) as u32).collect()
    }

    /// Round-robin assignment: partition `p` goes to trainer `p mod trainers`.
    pub fn round_robin(partitions: u32, trainers: u32) -> Vec<u32> {
        (0..partitions).map(|p| p % trainers.max(1)).collect()
    }

    fn policy(&self, role: Role) -> &RestartPolicy {
        match role {
            Role::Shard => &self.shard_policy,
            Role::Trainer => &self.trainer_policy,
            Role::Aggregator => &self.aggregator_policy,
        }
    }

    /// Partitions a trainer owns.
    pub fn partitions_of(&self, trainer: u32) -> Vec<u32> {
        (0..self.assignment.len() as u32).filter(|p| self.assignment[*p as usize] == trainer).collect()
    }

    /// A human description of what an actor is responsible for.
    pub fn describe(&self, key: ActorKey) -> String {
        match key.role {
            Role::Shard => format!("shard {} (partition {})", key.index, key.index),
            Role::Trainer => {
                let ps: Vec<String> = self.partitions_of(key.index).iter().map(u32::to_string).collect();
                format!("trainer {} (partitions {})", key.index, ps.join(", "))
            }
            Role::Aggregator => match self.ranges.get(key.index as usize) {
                Some((o, l)) => format!("aggregator {} (parameters {}..{})", key.index, o, o + l),
                None => format!("aggregator {}", key.index),
            },
        }
    }

    /// True when `key` is one of the job's actors (an index in range for its role).
    pub fn contains(&self, key: ActorKey) -> bool {
        let count = match key.role {
            Role::Shard => self.assignment.len(),
            Role::Trainer => self.trainers as usize,
            Role::Aggregator => self.ranges.len(),
        };
        (key.index as usize) < count
    }

    /// Every actor of the job, shards first, then aggregators, then trainers.
    pub fn actors(&self) -> Vec<ActorKey> {
        let shards = (0..self.assignment.len() as u32).map(ActorKey::shard);
        let aggs = (0..self.ranges.len() as u32).map(ActorKey::aggregator);
        let trainers = (0..self.trainers).map(ActorKey::trainer);
        shards.chain(aggs).chain(trainers).collect()
    }
}

/// Why a job failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum JobError {
    /// An actor failed more often than its restart policy allows.
    #[error("{what} failed {failures} times within {window_ms} ms at step {step}; giving up. last error: {reason}")]
    RestartIntensity {
        /// The actor.
        actor: ActorKey,
        /// The actor and what it is responsible for, in words.
        what: String,
        /// The global step when it failed last.
        step: u64,
        /// Failures counted in the window.
        failures: u32,
        /// The window.
        window_ms: u64,
        /// The last failure's reason.
        reason: String,
    },
    /// The aggregators disagree about the samples applied: a protocol bug.
    #[error("exactly-once ledgers of aggregator 0 and aggregator {range} differ")]
    LedgerMismatch {
        /// The range that disagrees with range 0.
        range: u32,
    },
    /// A rollback needs a generation above every one issued, and none is left.
    #[error("no generation left above {generation} for the rollback that {actor} needs")]
    GenerationsExhausted {
        /// The actor whose restart needed the rollback.
        actor: ActorKey,
        /// The current generation.
        generation: u64,
    },
    /// The job's newest checkpoint was computed with other maths (another kernel
    /// fingerprint): restoring it here would not give the job's bits, and starting over
    /// would quietly train another model.
    #[error("{actor} cannot be restored: {reason}")]
    ForeignCheckpoint {
        /// The actor to restore.
        actor: ActorKey,
        /// The store's error (file, both kernels).
        reason: String,
    },
}

/// Why the supervisor lost an actor: the cause label of restarts and
/// recoveries in metrics and events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultCause {
    /// The actor panicked, returned an error or stopped (here or on its node).
    #[default]
    ActorFailed,
    /// The actor failed to start here (its `pre_start` failed).
    StartFailed,
    /// The node asked to run the actor did not answer in time.
    SpawnTimeout,
    /// The node running the actor was declared down.
    NodeLost,
}

impl FaultCause {
    /// The cause as a metric label and event field: `actor_failed`,
    /// `start_failed`, `spawn_timeout`, `node_lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultCause::ActorFailed => "actor_failed",
            FaultCause::StartFailed => "start_failed",
            FaultCause::SpawnTimeout => "spawn_timeout",
            FaultCause::NodeLost => "node_lost",
        }
    }
}

impl std::fmt::Display for FaultCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Training progressed again after failures of one cause: reported with the
/// first step applied once their replacements run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Why the actors were lost.
    pub cause: FaultCause,
    /// The actors lost, in the order their failures were noticed.
    pub actors: Vec<ActorKey>,
    /// From the first of these failures being noticed to the step applied.
    pub duration: Duration,
}

/// One failure of an actor and how the job recovered from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// What failed, e.g. "trainer 2".
    pub actor: ActorKey,
    /// Why it was lost.
    #[serde(default)]
    pub cause: FaultCause,
    /// The global step (parameter version) when the failure was noticed.
    pub step: u64,
    /// The failure's reason (panic message or error).
    pub reason: String,
    /// Milliseconds since the job started when the failure was noticed.
    pub at_ms: u64,
    /// Milliseconds from the failure until the replacement was spawned.
    pub restart_ms: Option<u64>,
    /// Milliseconds from the failure until training progressed again (the
    /// first step applied after the replacement started).
    pub recovery_ms: Option<u64>,
    /// For aggregator failures: the checkpoint the job rolled back to.
    pub rolled_back_to: Option<u64>,
}

/// What the job's actor must do.
#[derive(Clone, Debug, PartialEq)]
pub enum JobCommand {
    /// Spawn (or respawn) an actor.
    Spawn {
        /// Which.
        key: ActorKey,
        /// The generation it starts in.
        generation: u64,
        /// Aggregators only: the checkpoint step to restore (`None` = fresh start).
        restore: Option<u64>,
    },
    /// Call [`JobCore::on_restart_due`] for `key` after `delay`.
    RestartAfter {
        /// Which.
        key: ActorKey,
        /// The backoff.
        delay: Duration,
    },
    /// Send a message.
    Send(Addr, Msg),
    /// The global step advanced (for progress displays).
    Progress {
        /// The new parameter version.
        step: u64,
        /// Mean loss of the step just applied.
        loss: f64,
        /// Samples applied in it.
        samples: u64,
        /// The failures this step recovers from, one entry per cause
        /// (usually none).
        recovered: Vec<Recovery>,
    },
    /// The job failed; stop everything.
    Fail(JobError),
    /// Every range applied the last step; the job is done.
    Complete {
        /// The final parameter vector.
        params: Vec<f32>,
        /// The exactly-once ledger.
        ledger: Ledger,
    },
}

#[derive(Default)]
struct Child {
    failures: VecDeque<Instant>,
    /// Fault records waiting for this child's restart, with when each failure was noticed.
    awaiting_restart: Vec<(usize, Instant)>,
    /// The generation of the last spawn ordered for it (after its restart, if it restarted).
    spawned_at: Option<u64>,
}

/// The supervisor's state machine.
pub struct JobCore {
    plan: JobPlan,
    started: Instant,
    generation: u64,
    /// The checkpoint step every range returned to when `generation` began by a rollback.
    rollback_step: Option<u64>,
    /// Rollbacks this supervisor ordered.
    rollbacks: u64,
    children: BTreeMap<ActorKey, Child>,
    range_steps: Vec<u64>,
    global_step: u64,
    /// Loss sum and samples of the steps some range applied past `global_step`, as the first
    /// range reported them (every range reports the same: each gradient carries its
    /// partition's loss). Ranges on other nodes report over separate streams, so step `s + 1`
    /// of one range can arrive before step `s` of another: the global step then moves by two,
    /// and both get their record. At most [`MAX_STEPS_AHEAD`] entries.
    step_losses: BTreeMap<u64, (f64, u64)>,
    faults: Vec<FaultRecord>,
    /// Fault records whose replacement runs, waiting for the next applied
    /// step, with when each failure was noticed.
    awaiting_progress: Vec<(usize, Instant)>,
    losses: LossSeries,
    finished: Vec<Option<(u64, Vec<f32>, Ledger)>>,
    done: bool,
    /// Events dropped because a value in them does not fit the plan.
    rejected: u64,
}

impl JobCore {
    /// A supervisor for `plan`, started at `now`.
    pub fn new(plan: JobPlan, now: Instant) -> Self {
        let ranges = plan.ranges.len();
        let children = plan.actors().into_iter().map(|k| (k, Child::default())).collect();
        Self {
            plan,
            started: now,
            generation: 0,
            rollback_step: None,
            rollbacks: 0,
            children,
            range_steps: vec![0; ranges],
            global_step: 0,
            step_losses: BTreeMap::new(),
            faults: Vec::new(),
            awaiting_progress: Vec::new(),
            losses: LossSeries::new(),
            finished: vec![None; ranges],
            done: false,
            rejected: 0,
        }
    }

    /// Start at generation `generation` instead of 0 (a supervisor taking
    /// over from one on another node).
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Resume at a checkpointed step instead of 0.
    pub fn with_start_step(mut self, step: u64) -> Self {
        self.range_steps.iter_mut().for_each(|s| *s = step);
        self.global_step = step;
        self.step_losses.clear();
        self
    }

    /// The plan.
    pub fn plan(&self) -> &JobPlan {
        &self.plan
    }
    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Rollbacks to a checkpoint this supervisor ordered (aggregator failures).
    pub fn rollbacks(&self) -> u64 {
        self.rollbacks
    }
    /// The newest version every range has reached.
    pub fn global_step(&self) -> u64 {
        self.global_step
    }
    /// Every failure so far.
    pub fn faults(&self) -> &[FaultRecord] {
        &self.faults
    }
    /// Mean loss of the applied steps, by the version they produced,
    /// downsampled to a bounded number of points (see [`LossSeries`]).
    pub fn losses(&self) -> &LossSeries {
        &self.losses
    }
    /// True once the job completed or failed.
    pub fn is_done(&self) -> bool {
        self.done
    }
    /// Events dropped because a value in them (an actor, a range, a step, an
    /// offset or a length) does not fit the plan.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Count and log an event that does not fit the plan.
    fn reject(&mut self, what: std::fmt::Arguments<'_>) -> Vec<JobCommand> {
        self.rejected += 1;
        tracing::warn!(job = self.plan.job, "supervisor dropped {what}");
        Vec::new()
    }

    fn ms_since_start(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64
    }

    /// Spawn every actor; `restore` is the checkpoint the aggregators resume from.
    pub fn start(&mut self, restore: Option<u64>) -> Vec<JobCommand> {
        let generation = self.generation;
        self.children.values_mut().for_each(|c| c.spawned_at = Some(generation));
        self.plan
            .actors()
            .into_iter()
            .map(|key| JobCommand::Spawn {
                key,
                generation,
                restore: if key.role == Role::Aggregator { restore } else { None },
            })
            .collect()
    }

    /// A child died (panic or error): [`JobCore::on_child_lost`] with
    /// [`FaultCause::ActorFailed`].
    pub fn on_child_failed(&mut self, key: ActorKey, reason: String, now: Instant) -> Vec<JobCommand> {
        self.on_child_lost(key, FaultCause::ActorFailed, reason, now)
    }

    /// A child is gone for `cause`: restart it after a backoff, or fail the
    /// job when it failed too often within its policy's window.
    pub fn on_child_lost(&mut self, key: ActorKey, cause: FaultCause, reason: String, now: Instant) -> Vec<JobCommand> {
        if self.done {
            return Vec::new();
        }
        if !self.plan.contains(key) {
            return self.reject(format_args!("a failure of {key}, which is not an actor of the job"));
        }
        let policy = *self.plan.policy(key.role);
        let at_ms = self.ms_since_start(now);
        let record = FaultRecord {
            actor: key,
            cause,
            step: self.global_step,
            reason: reason.clone(),
            at_ms,
            restart_ms: None,
            recovery_ms: None,
            rolled_back_to: None,
        };
        self.faults.push(record);
        let idx = self.faults.len() - 1;
        let child = self.children.entry(key).or_default();
        let window = Duration::from_millis(policy.window_ms);
        while child.failures.front().is_some_and(|t| now.saturating_duration_since(*t) > window) {
            child.failures.pop_front();
        }
        child.failures.push_back(now);
        let failures = child.failures.len() as u32;
        if failures > policy.max_restarts {
            self.done = true;
            return vec![JobCommand::Fail(JobError::RestartIntensity {
                actor: key,
                what: self.plan.describe(key),
                step: self.global_step,
                failures,
                window_ms: policy.window_ms,
                reason,
            })];
        }
        child.awaiting_restart.push((idx, now));
        vec![JobCommand::RestartAfter { key, delay: policy.backoff(failures) }]
    }

    /// Why `key` is about to restart: the cause of the first failure waiting
    /// for its restart (`None` when none waits).
    pub fn restart_cause(&self, key: ActorKey) -> Option<FaultCause> {
        let (first, _) = self.children.get(&key)?.awaiting_restart.first()?;
        Some(self.faults[*first].cause)
    }

    /// The backoff of `key` elapsed. For an aggregator, `checkpoint` is the
    /// newest step with a complete verified checkpoint (looked up by the
    /// actor, since that is I/O).
    pub fn on_restart_due(&mut self, key: ActorKey, checkpoint: Option<u64>, now: Instant) -> Vec<JobCommand> {
        if self.done {
            return Vec::new();
        }
        if !self.plan.contains(key) {
            return self.reject(format_args!("a restart of {key}, which is not an actor of the job"));
        }
        let since = self.ms_since_start(now);
        let waiting = self.children.get_mut(&key).map(|c| std::mem::take(&mut c.awaiting_restart)).unwrap_or_default();
        let mut out = Vec::new();
        let mut restore = None;
        if key.role == Role::Aggregator {
            // A checkpoint past the last step (a copy another node sent) is no
            // version of this job: start over from step 0, which gives the same bits.
            let total = self.plan.schedule.total_steps();
            let checkpoint = match checkpoint {
                Some(step) if step > total => {
                    self.reject(format_args!("checkpoint {step} to restart {key} from (the job has {total} steps)"));
                    None
                }
                other => other,
            };
            // The ranges make one θ: every aggregator returns to the same version.
            let Some(next) = self.generation.checked_add(1) else {
                self.done = true;
                return vec![JobCommand::Fail(JobError::GenerationsExhausted {
                    actor: key,
                    generation: self.generation,
                })];
            };
            self.generation = next;
            self.rollbacks += 1;
            let step = checkpoint.unwrap_or(0);
            restore = Some(step);
            self.rollback_step = Some(step);
            self.range_steps.iter_mut().for_each(|s| *s = step);
            self.global_step = step;
            self.step_losses.clear();
            self.finished.iter_mut().for_each(|f| *f = None);
            for r in 0..self.plan.ranges.len() as u32 {
                if r != key.index {
                    out.push(JobCommand::Send(
                        Addr::Aggregator(r),
                        Msg::Rollback { job: self.plan.job, generation: self.generation, step },
                    ));
                }
            }
            for &(i, _) in &waiting {
                self.faults[i].rolled_back_to = Some(step);
            }
        }
        for &(i, noticed) in &waiting {
            self.faults[i].restart_ms = Some(since.saturating_sub(self.faults[i].at_ms));
            self.awaiting_progress.push((i, noticed));
        }
        if let Some(child) = self.children.get_mut(&key) {
            child.spawned_at = Some(self.generation);
        }
        out.push(JobCommand::Spawn { key, generation: self.generation, restore });
        out
    }

    /// A child finished starting (the current instance: the shell drops reports about older
    /// ones). A new shard is announced to its trainer. An aggregator started under an older
    /// generation than the current one missed the rollback that began it — it was ordered
    /// while the aggregator was still starting, on a node that drops messages to actors not
    /// started yet — and gets it now (an aggregator ignores a rollback it already had).
    pub fn on_child_started(&mut self, key: ActorKey) -> Vec<JobCommand> {
        if self.done {
            return Vec::new();
        }
        match key.role {
            Role::Shard => {
                let Some(&trainer) = self.plan.assignment.get(key.index as usize) else { return Vec::new() };
                vec![JobCommand::Send(
                    Addr::Trainer(trainer),
                    Msg::ShardReady { job: self.plan.job, partition: key.index },
                )]
            }
            Role::Aggregator => {
                let spawned_at = self.children.get(&key).and_then(|c| c.spawned_at);
                match (spawned_at, self.rollback_step) {
                    (Some(at), Some(step)) if at < self.generation => vec![JobCommand::Send(
                        Addr::Aggregator(key.index),
                        Msg::Rollback { job: self.plan.job, generation: self.generation, step },
                    )],
                    _ => Vec::new(),
                }
            }
            Role::Trainer => Vec::new(),
        }
    }

    /// An aggregator applied a step.
    pub fn on_step_applied(
        &mut self,
        range: u32,
        generation: u64,
        step: u64,
        loss_sum: f64,
        samples: u64,
        now: Instant,
    ) -> Vec<JobCommand> {
        if generation != self.generation || self.done {
            return Vec::new();
        }
        let total = self.plan.schedule.total_steps();
        if step > total || range as usize >= self.range_steps.len() {
            return self.reject(format_args!(
                "step {step} applied by range {range} (the job has {} ranges and {total} steps)",
                self.range_steps.len()
            ));
        }
        let Some(slot) = self.range_steps.get_mut(range as usize) else { return Vec::new() };
        *slot = (*slot).max(step);
        if step > self.global_step && self.step_losses.len() < MAX_STEPS_AHEAD {
            self.step_losses.entry(step).or_insert((loss_sum, samples));
        }
        let min = self.range_steps.iter().copied().min().unwrap_or(0);
        if min <= self.global_step {
            return Vec::new();
        }
        // Every step the global step moves over gets its record (a jump longer than the
        // bound, which ranges in lockstep cannot make, records its last step only).
        let first = if min - self.global_step <= MAX_STEPS_AHEAD as u64 { self.global_step + 1 } else { min };
        self.global_step = min;
        let mut out: Vec<JobCommand> = Vec::with_capacity((min - first + 1) as usize);
        for s in first..=min {
            // The first report of step `s`, taken out in place (reports of steps a jump passed
            // without a record go too; the map keeps those ahead).
            let mut found = None;
            while let Some(entry) = self.step_losses.first_entry().filter(|e| *e.key() <= s) {
                found = (*entry.key() == s).then(|| *entry.get());
                entry.remove();
            }
            let (loss_sum, samples) = found.unwrap_or((loss_sum, samples));
            let loss = if samples > 0 { loss_sum / samples as f64 } else { 0.0 };
            self.losses.record(s, loss);
            out.push(JobCommand::Progress { step: s, loss, samples, recovered: Vec::new() });
        }
        let since = self.ms_since_start(now);
        // One recovery per cause, timed from the first of its failures.
        let mut recovered: Vec<Recovery> = Vec::new();
        for (i, noticed) in std::mem::take(&mut self.awaiting_progress) {
            let fault = &mut self.faults[i];
            fault.recovery_ms = Some(since.saturating_sub(fault.at_ms));
            let duration = now.saturating_duration_since(noticed);
            match recovered.iter_mut().find(|r| r.cause == fault.cause) {
                Some(r) => {
                    r.actors.push(fault.actor);
                    r.duration = r.duration.max(duration);
                }
                None => recovered.push(Recovery { cause: fault.cause, actors: vec![fault.actor], duration }),
            }
        }
        if let Some(JobCommand::Progress { recovered: first, .. }) = out.first_mut() {
            *first = recovered;
        }
        // The last step's report can come after a range's final values (they travel on
        // other streams): the job completes once both are in.
        out.extend(self.complete_if_ready());
        out
    }

    /// An aggregator applied the last step.
    pub fn on_finished(
        &mut self,
        range: u32,
        generation: u64,
        offset: u64,
        values: Vec<f32>,
        ledger: Ledger,
    ) -> Vec<JobCommand> {
        if generation != self.generation || self.done {
            return Vec::new();
        }
        // The offset and length come from the wire: they must be the range's own,
        // or assembling θ below would write outside it.
        let expected = self.plan.ranges.get(range as usize).copied();
        if expected.is_none() || expected != usize::try_from(offset).ok().map(|o| (o, values.len())) {
            return self.reject(format_args!(
                "the final values of range {range} at [{offset}, +{}) (the range is {expected:?})",
                values.len()
            ));
        }
        let Some(slot) = self.finished.get_mut(range as usize) else { return Vec::new() };
        *slot = Some((offset, values, ledger));
        self.complete_if_ready()
    }

    /// The job's outcome once every range sent its final values **and** the global step
    /// reached the last one: every step's [`JobCommand::Progress`] goes out before
    /// [`JobCommand::Complete`], whatever order a range's last `StepApplied` and its
    /// `Finished` arrived in (a remote range's final values may overtake its last report).
    fn complete_if_ready(&mut self) -> Vec<JobCommand> {
        if self.done || self.finished.iter().any(Option::is_none) || self.global_step < self.plan.schedule.total_steps()
        {
            return Vec::new();
        }
        self.done = true;
        let total: usize = self.plan.ranges.iter().map(|(_, l)| l).sum();
        let mut params = vec![0.0f32; total];
        let mut ledger0: Option<&Ledger> = None;
        for (r, f) in self.finished.iter().enumerate() {
            let Some((offset, values, ledger)) = f else { continue };
            // Checked on arrival; a plan whose ranges do not tile θ is a bug, not an input.
            let o = *offset as usize;
            let Some(dst) = o.checked_add(values.len()).and_then(|end| params.get_mut(o..end)) else {
                unreachable!("range {r} [{o}, +{}) checked against the plan on arrival", values.len())
            };
            dst.copy_from_slice(values);
            match ledger0 {
                None => ledger0 = Some(ledger),
                Some(l0) if l0 != ledger => {
                    return vec![JobCommand::Fail(JobError::LedgerMismatch { range: r as u32 })];
                }
                Some(_) => {}
            }
        }
        let ledger = ledger0.cloned().unwrap_or_default();
        vec![JobCommand::Complete { params, ledger }]
    }
}
