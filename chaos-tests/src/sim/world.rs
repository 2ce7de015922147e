//! The simulated world: actors are protocol cores, the network is an event
//! queue ordered by `(virtual ms, sequence number)`, and every random choice
//! comes from one seeded ChaCha8 stream.
//!
//! `PHALANX_SIM_TRACE=1` prints every delivered message with its virtual
//! time, for reading a failing seed's story.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx::PreparedJob;
use phalanx_actors::model::Model;
use phalanx_actors::protocol::{
    ActorKey, Addr, AggCommand, AggregatorCore, AggregatorSetup, JobCommand, JobCore, JobError, JobPlan, Ledger, Msg,
    RangeState, RestartPolicy, Role, ShardCore, TrainerCommand, TrainerCore, TrainerSetup, Verdict,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Virtual milliseconds between trainer ticks (the actors use 250 ms too).
const TICK_MS: u64 = 250;

/// What a run may throw at the job.
#[derive(Clone, Debug, PartialEq)]
pub struct SimOptions {
    /// The seed of every random choice.
    pub seed: u64,
    /// Faults happen only in `[0, fault_phase_ms)`; after it the network heals.
    pub fault_phase_ms: u64,
    /// At most this many actor crashes.
    pub max_crashes: u32,
    /// Probability that a data-plane message is lost during the fault phase.
    pub drop_probability: f64,
    /// Probability that a data-plane message is delivered twice during the fault phase.
    pub duplicate_probability: f64,
    /// Messages are delayed uniformly in `0..=max_delay_ms` (reordering them).
    pub max_delay_ms: u64,
    /// At most this many partitions: a trainer, shard or aggregator cut off
    /// from every other actor (both directions) for 20–150 virtual ms.
    pub max_partitions: u32,
    /// Virtual time allowed after the fault phase for the job to finish.
    pub liveness_budget_ms: u64,
    /// Deliberately broken build, for proving that the checkers can fail:
    /// the aggregators accept a duplicate `(step, partition)` contribution.
    pub break_accept_duplicates: bool,
}

impl SimOptions {
    /// Default fault intensities for `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            fault_phase_ms: 400,
            max_crashes: 5,
            drop_probability: 0.02,
            duplicate_probability: 0.02,
            max_delay_ms: 3,
            max_partitions: 2,
            liveness_budget_ms: 60_000,
            break_accept_duplicates: false,
        }
    }
}

/// Counters of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Events processed.
    pub events: u64,
    /// Actors crashed.
    pub crashes: u32,
    /// Messages dropped by the network (including to dead actors).
    pub dropped: u64,
    /// Messages duplicated by the network.
    pub duplicated: u64,
    /// Partitions (an actor cut off for a while).
    pub partitions: u32,
    /// Messages lost to partitions.
    pub cut: u64,
    /// Contributions the aggregators ignored as duplicates or stale.
    pub ignored_contributions: u64,
    /// Rollbacks to a checkpoint.
    pub rollbacks: u64,
    /// Virtual milliseconds until the job finished.
    pub finished_at_ms: u64,
}

/// How a run ended; the invariants judge it.
#[derive(Clone, Debug)]
pub struct SimOutcome {
    /// The seed.
    pub seed: u64,
    /// The job's result: final parameters and ledger, or its error; `None`
    /// when the liveness budget ran out first.
    pub result: Option<Result<(Vec<f32>, Ledger), JobError>>,
    /// Per `(range, step)`: the SHA-256 of the range's parameters produced
    /// by every commit of that step, with the committing generation.
    pub commits: BTreeMap<(u32, u64), Vec<(u64, String)>>,
    /// Counters.
    pub stats: SimStats,
    /// A digest of the whole event trace: equal seeds give equal digests.
    pub trace_digest: String,
    /// The supervisor's record of every crash and its recovery (virtual ms).
    pub faults: Vec<phalanx_actors::protocol::FaultRecord>,
    /// Mean loss per step, by the version it produced (downsampled on long jobs).
    pub losses: BTreeMap<u64, f64>,
}

enum Event {
    Deliver(Addr, Msg),
    RestartDue(ActorKey),
    Tick(u32, u64),
    Crash(ActorKey),
}

struct World<'a> {
    job: &'a PreparedJob,
    opts: &'a SimOptions,
    rng: ChaCha8Rng,
    base: Instant,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    plan: JobPlan,
    model: Arc<dyn Model>,
    supervisor: JobCore,
    trainers: Vec<Option<TrainerCore>>,
    incarnations: Vec<u64>,
    aggregators: Vec<Option<AggregatorCore>>,
    shards: Vec<Option<ShardCore>>,
    checkpoints: BTreeMap<u64, BTreeMap<u32, RangeState>>,
    commits: BTreeMap<(u32, u64), Vec<(u64, String)>>,
    result: Option<Result<(Vec<f32>, Ledger), JobError>>,
    stats: SimStats,
    trace: Sha256,
    /// Actors cut off from all others during `[from, until)` virtual ms.
    cuts: Vec<(ActorKey, u64, u64)>,
    /// The actor whose commands are being carried out (the sender of `send`).
    sender: Option<ActorKey>,
}

/// Run `job` (its trainers, aggregators and partitions as configured)
/// through one seeded fault schedule.
pub fn simulate(job: &PreparedJob, opts: &SimOptions) -> SimOutcome {
    let sim_policy = RestartPolicy { max_restarts: 1_000, ..RestartPolicy::default() };
    let mut plan = job.plan(0xC4A05 ^ opts.seed);
    plan.shard_policy = sim_policy;
    plan.trainer_policy = sim_policy;
    plan.aggregator_policy = sim_policy;
    let base = Instant::now();
    let mut w = World {
        job,
        opts,
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
        base,
        now: 0,
        seq: 0,
        events: BTreeMap::new(),
        supervisor: JobCore::new(plan.clone(), base),
        trainers: (0..plan.trainers).map(|_| None).collect(),
        incarnations: vec![0; plan.trainers as usize],
        aggregators: (0..plan.ranges.len()).map(|_| None).collect(),
        shards: (0..plan.assignment.len()).map(|_| None).collect(),
        model: job.model.clone(),
        plan,
        checkpoints: BTreeMap::new(),
        commits: BTreeMap::new(),
        result: None,
        stats: SimStats::default(),
        trace: Sha256::new(),
        cuts: Vec::new(),
        sender: None,
    };
    w.schedule_crashes();
    w.schedule_partitions();
    let start = w.supervisor.start(None);
    w.run_job(start);
    let deadline = opts.fault_phase_ms + opts.liveness_budget_ms;
    while w.result.is_none() {
        let Some(((at, seq), event)) = w.events.pop_first() else { break };
        if at > deadline {
            break;
        }
        w.now = at;
        w.stats.events += 1;
        w.trace.update(at.to_le_bytes());
        w.trace.update(seq.to_le_bytes());
        w.handle(event);
    }
    w.stats.finished_at_ms = w.now;
    let faults = w.supervisor.faults().to_vec();
    let losses = w.supervisor.losses().to_map();
    SimOutcome {
        faults,
        losses,
        seed: opts.seed,
        result: w.result,
        commits: w.commits,
        stats: w.stats,
        trace_digest: hex::encode(w.trace.finalize()),
    }
}

impl World<'_> {
    fn at(&mut self, delay_ms: u64, event: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay_ms, self.seq), event);
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn in_fault_phase(&self) -> bool {
        self.now < self.opts.fault_phase_ms
    }

    fn schedule_crashes(&mut self) {
        let actors = self.plan.actors();
        let crashes = self.rng.random_range(0..=self.opts.max_crashes);
        for _ in 0..crashes {
            let key = actors[self.rng.random_range(0..actors.len())];
            let when = self.rng.random_range(1..self.opts.fault_phase_ms.max(2));
            self.seq += 1;
            self.events.insert((when, self.seq), Event::Crash(key));
        }
    }

    fn schedule_partitions(&mut self) {
        let actors = self.plan.actors();
        let n = self.rng.random_range(0..=self.opts.max_partitions);
        for _ in 0..n {
            let key = actors[self.rng.random_range(0..actors.len())];
            let from = self.rng.random_range(0..self.opts.fault_phase_ms.max(1));
            let until = from + self.rng.random_range(20..=150);
            self.cuts.push((key, from, until));
        }
        self.stats.partitions = n;
    }

    /// Is `key` cut off now?
    fn is_cut(&self, key: Option<ActorKey>) -> bool {
        key.is_some_and(|k| self.cuts.iter().any(|(c, from, until)| *c == k && (*from..*until).contains(&self.now)))
    }

    /// Send over the simulated network. Messages to and from the supervisor
    /// are local to the coordinator in a real deployment, so they are never
    /// lost; data-plane messages may be dropped, duplicated and reordered
    /// while the fault phase lasts.
    fn send(&mut self, to: Addr, msg: Msg) {
        let control = matches!(to, Addr::Job)
            || matches!(msg, Msg::Rollback { .. } | Msg::ShardReady { .. } | Msg::Assign { .. });
        if let Addr::AllTrainers = to {
            for i in 0..self.plan.trainers {
                self.send(Addr::Trainer(i), msg.clone());
            }
            return;
        }
        let faulty = !control && self.in_fault_phase();
        if !control && (self.is_cut(self.sender) || self.is_cut(actor_of(to))) {
            self.stats.cut += 1;
            return;
        }
        if faulty && self.rng.random_bool(self.opts.drop_probability) {
            self.stats.dropped += 1;
            return;
        }
        let delay = self.rng.random_range(0..=self.opts.max_delay_ms);
        if faulty && self.rng.random_bool(self.opts.duplicate_probability) {
            self.stats.duplicated += 1;
            let again = self.rng.random_range(0..=self.opts.max_delay_ms);
            self.at(again, Event::Deliver(to, msg.clone()));
        }
        self.at(delay, Event::Deliver(to, msg));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver(to, msg) => self.deliver(to, msg),
            Event::RestartDue(key) => {
                let checkpoint = if key.role == Role::Aggregator { self.newest_complete() } else { None };
                let now = self.instant();
                let cmds = self.supervisor.on_restart_due(key, checkpoint, now);
                self.run_job(cmds);
            }
            Event::Tick(i, incarnation) => {
                if self.incarnations[i as usize] != incarnation {
                    return;
                }
                self.sender = Some(ActorKey::trainer(i));
                if let Some(t) = self.trainers[i as usize].as_mut() {
                    let cmds = t.on_tick();
                    self.run_trainer(i, cmds);
                    self.at(TICK_MS, Event::Tick(i, incarnation));
                }
            }
            Event::Crash(key) => self.crash(key),
        }
    }

    fn crash(&mut self, key: ActorKey) {
        let alive = match key.role {
            Role::Trainer => self.trainers[key.index as usize].take().is_some(),
            Role::Aggregator => self.aggregators[key.index as usize].take().is_some(),
            Role::Shard => self.shards[key.index as usize].take().is_some(),
        };
        if !alive {
            return;
        }
        self.stats.crashes += 1;
        self.trace.update(format!("crash {key}").as_bytes());
        let now = self.instant();
        let cmds = self.supervisor.on_child_failed(key, "simulated crash".into(), now);
        self.run_job(cmds);
    }

    fn deliver(&mut self, to: Addr, msg: Msg) {
        self.trace.update(msg.kind().as_bytes());
        // What the receiver sends while handling this comes from it.
        self.sender = actor_of(to);
        if std::env::var_os("PHALANX_SIM_TRACE").is_some() {
            let detail = match &msg {
                Msg::BatchRequest { partition, step, count, .. } => format!("p{partition} s{step}+{count}"),
                Msg::Batches(b) => format!(
                    "p{} s{:?}",
                    b.first().map_or(0, |b| b.partition),
                    b.iter().map(|b| b.step).collect::<Vec<_>>()
                ),
                Msg::Params(p) => format!("r{} s{} g{}", p.range, p.step, p.generation),
                Msg::ShardReady { partition, .. } => format!("p{partition}"),
                Msg::StepApplied { range, step, .. } => format!("r{range} s{step}"),
                _ => String::new(),
            };
            eprintln!("{:>6} ms {:?} <- {} {}", self.now, to, msg.kind(), detail);
        }
        match to {
            Addr::Job => {
                let now = self.instant();
                let cmds = match msg {
                    Msg::StepApplied { range, generation, step, loss_sum, samples, .. } => {
                        self.supervisor.on_step_applied(range, generation, step, loss_sum, samples, now)
                    }
                    Msg::Finished { range, generation, offset, values, ledger, .. } => {
                        self.supervisor.on_finished(range, generation, offset, values, ledger)
                    }
                    _ => Vec::new(),
                };
                self.run_job(cmds);
            }
            Addr::Trainer(i) => {
                let Some(t) = self.trainers[i as usize].as_mut() else {
                    self.stats.dropped += 1;
                    return;
                };
                let cmds = match msg {
                    Msg::Params(p) => t.on_params(p),
                    Msg::Batches(b) => t.on_batches(b),
                    Msg::ShardReady { partition, .. } => t.on_shard_ready(partition),
                    Msg::Assign { generation, partitions, .. } => t.on_assign(generation, partitions),
                    _ => Vec::new(),
                };
                self.run_trainer(i, cmds);
            }
            Addr::Shard(p) => {
                let Some(shard) = self.shards[p as usize].as_mut() else {
                    self.stats.dropped += 1;
                    return;
                };
                let Msg::BatchRequest { job, partition, step, count, trainer } = msg else { return };
                let mut batches = Vec::new();
                for s in shard.steps(job, partition, step, count) {
                    batches.push(shard.batch(s).expect("the sim's data is valid"));
                }
                if !batches.is_empty() {
                    self.send(Addr::Trainer(trainer), Msg::Batches(batches));
                }
            }
            Addr::Aggregator(r) => {
                if self.aggregators[r as usize].is_none() {
                    self.stats.dropped += 1;
                    return;
                }
                match msg {
                    Msg::Gradient(g) => self.gradient(r, g),
                    Msg::Gradients(gs) => gs.into_iter().for_each(|g| self.gradient(r, g)),
                    Msg::ParamsRequest { trainer, step, .. } => {
                        let cmds = self.aggregators[r as usize].as_mut().map(|a| a.on_params_request(trainer, step));
                        self.run_aggregator(r, cmds.unwrap_or_default());
                    }
                    Msg::Rollback { generation, step, .. } => {
                        let current = self.aggregators[r as usize].as_ref().map_or(0, AggregatorCore::generation);
                        if generation > current {
                            self.spawn_aggregator(r, generation, Some(step));
                        }
                    }
                    _ => {}
                }
            }
            Addr::AllTrainers => unreachable!("expanded by send"),
        }
    }

    fn gradient(&mut self, r: u32, g: phalanx_actors::protocol::Gradient) {
        let Some(agg) = self.aggregators[r as usize].as_mut() else { return };
        let (verdict, cmds) = agg.on_gradient(g);
        match verdict {
            Verdict::Applied => {
                let generation = agg.generation();
                let step = agg.step() - 1;
                let digest = hex::encode(Sha256::digest(bytes(&agg.state().params)));
                self.commits.entry((r, step)).or_default().push((generation, digest));
            }
            Verdict::Duplicate | Verdict::Stale => self.stats.ignored_contributions += 1,
            _ => {}
        }
        self.run_aggregator(r, cmds);
    }

    fn run_trainer(&mut self, i: u32, cmds: Vec<TrainerCommand>) {
        let mut queue = std::collections::VecDeque::from(cmds);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                TrainerCommand::Send(to, msg) => self.send(to, msg),
                TrainerCommand::Compute { step, partition } => {
                    let Some(t) = self.trainers[i as usize].as_mut() else { return };
                    queue.extend(t.compute(step, partition).expect("the sim's batches fit the model"));
                }
            }
        }
    }

    fn run_aggregator(&mut self, r: u32, cmds: Vec<AggCommand>) {
        let mut queue: std::collections::VecDeque<AggCommand> = cmds.into();
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                AggCommand::Send(to, msg) => self.send(to, msg),
                AggCommand::Checkpoint { step } => {
                    // Written at once here (the actor writes in the background and tells the
                    // core when it is done; meanwhile the core applies steps, up to the one
                    // that would ask for the next checkpoint).
                    if let Some(a) = self.aggregators[r as usize].as_mut() {
                        self.checkpoints.entry(step).or_default().insert(r, a.state().clone());
                        queue.extend(a.on_checkpoint_done());
                    }
                }
            }
        }
    }

    fn newest_complete(&self) -> Option<u64> {
        let ranges = self.plan.ranges.len();
        self.checkpoints.iter().rev().find(|(_, by_range)| by_range.len() == ranges).map(|(s, _)| *s)
    }

    fn spawn_aggregator(&mut self, r: u32, generation: u64, restore: Option<u64>) {
        let setup = AggregatorSetup::for_range(
            self.plan.job,
            r,
            &self.plan.ranges,
            self.job.partitions.sizes(),
            self.plan.schedule,
            self.job.config.checkpoint_every,
            self.job.optimizer,
        );
        let saved = restore.and_then(|s| self.checkpoints.get(&s)).and_then(|m| m.get(&r)).cloned();
        let fresh = saved.is_none();
        let state = saved.unwrap_or_else(|| {
            let (offset, len) = self.plan.ranges[r as usize];
            RangeState {
                step: 0,
                params: self.model.init_params(self.job.config.seed)[offset..offset + len].to_vec().into(),
                optimizer: self.job.optimizer.new_state(len),
                ledger: Ledger::new(),
            }
        });
        let mut core = AggregatorCore::new(setup, generation, state);
        if self.opts.break_accept_duplicates {
            core.break_accept_duplicates();
        }
        let cmds = core.start(fresh);
        self.aggregators[r as usize] = Some(core);
        self.run_aggregator(r, cmds);
    }

    fn run_job(&mut self, cmds: Vec<JobCommand>) {
        self.sender = None;
        let mut queue = std::collections::VecDeque::from(cmds);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                JobCommand::Spawn { key, generation, restore } => match key.role {
                    Role::Shard => {
                        let core = ShardCore::new(
                            self.plan.job,
                            key.index,
                            self.plan.schedule,
                            &self.job.partitions,
                            Arc::new(self.job.data.train.clone()),
                        )
                        .expect("valid partition");
                        self.shards[key.index as usize] = Some(core);
                        queue.extend(self.supervisor.on_child_started(key));
                    }
                    Role::Trainer => {
                        let i = key.index;
                        let setup = TrainerSetup {
                            job: self.plan.job,
                            index: i,
                            ranges: self.plan.ranges.clone(),
                            schedule: self.plan.schedule,
                            features: self.job.data.train.features(),
                            partitions: self.plan.assignment.len() as u32,
                        };
                        let t = TrainerCore::new(setup, self.model.clone(), generation, self.plan.partitions_of(i));
                        let cmds = t.start();
                        self.trainers[i as usize] = Some(t);
                        self.incarnations[i as usize] += 1;
                        let incarnation = self.incarnations[i as usize];
                        self.at(TICK_MS, Event::Tick(i, incarnation));
                        self.run_trainer(i, cmds);
                        queue.extend(self.supervisor.on_child_started(key));
                    }
                    Role::Aggregator => {
                        if restore.is_some() {
                            self.stats.rollbacks += 1;
                        }
                        self.spawn_aggregator(key.index, generation, restore);
                        queue.extend(self.supervisor.on_child_started(key));
                    }
                },
                JobCommand::RestartAfter { key, delay } => self.at(delay.as_millis() as u64, Event::RestartDue(key)),
                JobCommand::Send(to, msg) => self.send(to, msg),
                JobCommand::Progress { .. } => {}
                JobCommand::Fail(e) => self.result = Some(Err(e)),
                JobCommand::Complete { params, ledger } => self.result = Some(Ok((params, ledger))),
            }
        }
    }
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The actor an address names (none for the supervisor and broadcasts).
fn actor_of(to: Addr) -> Option<ActorKey> {
    match to {
        Addr::Trainer(i) => Some(ActorKey::trainer(i)),
        Addr::Shard(p) => Some(ActorKey::shard(p)),
        Addr::Aggregator(r) => Some(ActorKey::aggregator(r)),
        Addr::Job | Addr::AllTrainers => None,
    }
}
