//! Property tests: every protocol core takes any message a peer could send —
//! arbitrary variants with arbitrary numbers (zero, one past the end, huge,
//! `u64::MAX`), empty and mismatched tensors, NaN — mixed with well-formed
//! traffic so the cores also reach their later states, and never panics.
//! Each core's own bounds are asserted after every event.
//!
//! The messages are what the actors' handlers hand their cores; a panic
//! here is one a peer could cause in a node (DESIGN: "Every number from the
//! wire is validated").

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

use super::*;
use crate::data::{Partitions, Table, TaskKind};
use crate::model::{self, Head, ModelKind, ModelSpec};
use crate::optim::{OptimizerKind, OptimizerSpec};

const JOB: JobId = 7;
/// Events per generated run: enough to apply steps, restart actors and finish.
const EVENTS: usize = 48;

fn cases() -> ProptestConfig {
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

// ------------------------------------------------------------------ numbers

/// Numbers a peer could send: small ones that land inside the job, the edges,
/// and anything at all.
fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..8u64,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(u64::from(u32::MAX) + 1),
        1 => any::<u64>(),
    ]
}

fn any_u32() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0..8u32, 1 => Just(u32::MAX), 1 => Just(u32::MAX - 1), 1 => any::<u32>()]
}

fn any_f32() -> impl Strategy<Value = f32> {
    prop_oneof![4 => -2.0f32..2.0, 1 => Just(f32::NAN), 1 => Just(f32::INFINITY), 1 => any::<f32>()]
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![4 => -2.0f64..2.0, 1 => Just(f64::NAN), 1 => Just(f64::NEG_INFINITY), 1 => any::<f64>()]
}

/// Tensors: empty, the right length for some range, or a little off.
fn tensor() -> impl Strategy<Value = Vec<f32>> {
    vec(any_f32(), 0..12)
}

fn row() -> impl Strategy<Value = Vec<u64>> {
    vec(any_u64(), 0..5)
}

fn ledger() -> impl Strategy<Value = Ledger> {
    (btree_map(any_u64(), row(), 0..4), any_u64(), any_u64(), row(), any_u64(), any_u64()).prop_map(
        |(open, epochs, exact, per_partition, lost, duplicated)| Ledger {
            open,
            closed: ClosedEpochs { epochs, exact, per_partition, lost, duplicated, first_inexact: None },
        },
    )
}

fn key() -> impl Strategy<Value = ActorKey> {
    (prop_oneof![Just(Role::Shard), Just(Role::Trainer), Just(Role::Aggregator)], any_u32())
        .prop_map(|(role, index)| ActorKey { role, index })
}

// ----------------------------------------------------------------- messages

fn any_job() -> impl Strategy<Value = JobId> {
    prop_oneof![4 => Just(JOB), 1 => any_u64()]
}

fn gradient() -> impl Strategy<Value = Gradient> {
    (any_job(), any_u64(), any_u64(), any_u32(), any_u32(), any_u32(), any_f64(), any_u64(), tensor()).prop_map(
        |(job, generation, step, partition, partitions, samples, loss_sum, offset, values)| Gradient {
            job,
            generation,
            step,
            partition,
            partitions,
            samples,
            loss_sum,
            offset,
            values: values.into(),
        },
    )
}

fn params() -> impl Strategy<Value = Params> {
    (any_job(), any_u64(), any_u64(), any_u32(), any_u64(), tensor()).prop_map(
        |(job, generation, step, range, offset, values)| Params {
            job,
            generation,
            step,
            range,
            offset,
            values: values.into(),
            delta: None,
            base: None,
        },
    )
}

fn batch() -> impl Strategy<Value = Batch> {
    let targets = prop_oneof![
        vec(any_f32(), 0..5).prop_map(BatchTargets::Real),
        vec(any_u32(), 0..5).prop_map(BatchTargets::Class),
    ];
    (any_job(), any_u32(), any_u64(), any_u32(), tensor(), targets)
        .prop_map(|(job, partition, step, features, x, targets)| Batch { job, partition, step, features, x, targets })
}

/// Any message of the protocol, every variant.
fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        params().prop_map(Msg::Params),
        gradient().prop_map(Msg::Gradient),
        (any_job(), any_u32(), proptest::option::of(any_u64())).prop_map(|(job, trainer, step)| Msg::ParamsRequest {
            job,
            trainer,
            step
        }),
        (any_job(), any_u32(), any_u64(), any_u32(), any_u32()).prop_map(|(job, partition, step, count, trainer)| {
            Msg::BatchRequest { job, partition, step, count, trainer }
        }),
        vec(batch(), 0..4).prop_map(Msg::Batches),
        vec(gradient(), 0..4).prop_map(Msg::Gradients),
        (any_job(), any_u32()).prop_map(|(job, partition)| Msg::ShardReady { job, partition }),
        (any_job(), any_u64(), vec(any_u32(), 0..6)).prop_map(|(job, generation, partitions)| Msg::Assign {
            job,
            generation,
            partitions
        }),
        (any_job(), any_u64(), any_u64()).prop_map(|(job, generation, step)| Msg::Rollback { job, generation, step }),
        (any_job(), any_u32(), any_u64(), any_u64(), any_f64(), any_u64()).prop_map(
            |(job, range, generation, step, loss_sum, samples)| Msg::StepApplied {
                job,
                range,
                generation,
                step,
                loss_sum,
                samples
            }
        ),
        (any_job(), any_u32(), any_u64()).prop_map(|(job, range, step)| Msg::CheckpointSaved { job, range, step }),
        (any_job(), any_u32(), any_u64(), ".{0,8}").prop_map(|(job, range, step, reason)| Msg::CheckpointFailed {
            job,
            range,
            step,
            reason
        }),
        (any_job(), any_u32(), any_u64(), any_u64(), tensor(), ledger()).prop_map(
            |(job, range, generation, offset, values, ledger)| Msg::Finished {
                job,
                range,
                generation,
                offset,
                values,
                ledger
            }
        ),
    ]
}

// --------------------------------------------------------------- aggregator

/// Range 1 of `[0, 2) [2, 6)` over 3 partitions of 4 rows, 2 steps an epoch.
fn aggregator() -> AggregatorCore {
    let setup = AggregatorSetup {
        job: JOB,
        range: 1,
        offset: 2,
        len: 4,
        partitions: 3,
        partition_sizes: vec![4; 3],
        schedule: Schedule { steps_per_epoch: 2, epochs: 2 },
        checkpoint_every: 2,
        optimizer: OptimizerSpec::new(OptimizerKind::Adam),
    };
    let state = RangeState {
        step: 0,
        params: vec![0.5; 4].into(),
        optimizer: setup.optimizer.new_state(4),
        ledger: Ledger::new(),
    };
    AggregatorCore::new(setup, 0, state)
}

/// A gradient this aggregator takes when its step comes.
fn good_gradient() -> impl Strategy<Value = Msg> {
    (0..5u64, 0..3u32, vec(-1.0f32..1.0, 4)).prop_map(|(step, partition, values)| {
        Msg::Gradient(Gradient {
            job: JOB,
            generation: 0,
            step,
            partition,
            partitions: 1,
            samples: 2,
            loss_sum: 1.0,
            offset: 2,
            values: values.into(),
        })
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_aggregator_core_takes_any_message(msgs in vec(prop_oneof![msg(), good_gradient()], 0..EVENTS)) {
        let mut core = aggregator();
        let total = core.setup().schedule.total_steps();
        for m in msgs {
            // What the aggregator actor hands its core.
            match m {
                Msg::Gradient(g) => {
                    let _ = core.on_gradient(g);
                }
                Msg::Gradients(gs) => {
                    for g in gs {
                        let _ = core.on_gradient(g);
                    }
                }
                Msg::ParamsRequest { trainer, step, .. } => {
                    let _ = core.on_params_request(trainer, step);
                }
                _ => {}
            }
            prop_assert!(core.step() <= total);
            prop_assert_eq!(core.state().params.len(), 4);
            let ledger = &core.state().ledger;
            prop_assert!(ledger.open.values().flatten().chain(&ledger.closed.per_partition).all(|n| *n <= 8));
        }
    }
}

// ------------------------------------------------------------------ trainer

/// A linear model on 2 features (3 parameters) split into `[0, 2) [2, 3)`.
fn trainer() -> TrainerCore {
    let spec = ModelSpec { kind: ModelKind::Linear, inputs: 2, outputs: 1, hidden: 0, head: Head::Regression };
    let model: Arc<dyn crate::model::Model> = Arc::from(model::build(&spec).unwrap());
    let schedule = Schedule { steps_per_epoch: 2, epochs: 2 };
    let setup = TrainerSetup { job: JOB, index: 0, ranges: vec![(0, 2), (2, 1)], schedule, features: 2, partitions: 8 };
    TrainerCore::new(setup, model, 0, vec![0, 2])
}

/// Params and batches this trainer takes.
fn good_trainer_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (0..5u64, 0..2u32).prop_map(|(step, range)| {
            let (offset, values) = if range == 0 { (0, vec![0.1, 0.2]) } else { (2, vec![0.3]) };
            Msg::Params(Params::new(JOB, 0, step, range, offset, values.into()))
        }),
        (0..5u64, prop_oneof![Just(0u32), Just(2)]).prop_map(|(step, partition)| {
            let targets = BatchTargets::Real(vec![1.0, 0.0]);
            Msg::Batches(vec![Batch { job: JOB, partition, step, features: 2, x: vec![1.0, 2.0, 3.0, 4.0], targets }])
        }),
    ]
}

/// A trainer event: a message, or a tick of its stall clock.
#[derive(Clone, Debug)]
enum TrainerEvent {
    Msg(Msg),
    Tick,
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_trainer_core_takes_any_message(events in vec(prop_oneof![
        3 => msg().prop_map(TrainerEvent::Msg),
        3 => good_trainer_msg().prop_map(TrainerEvent::Msg),
        1 => Just(TrainerEvent::Tick),
    ], 0..EVENTS)) {
        let mut core = trainer();
        let total = Schedule { steps_per_epoch: 2, epochs: 2 }.total_steps();
        for event in events {
            // What the trainer actor hands its core, and the computations it carries out.
            let mut queue: std::collections::VecDeque<TrainerCommand> = match event {
                TrainerEvent::Tick => core.on_tick(),
                TrainerEvent::Msg(Msg::Params(p)) => core.on_params(p),
                TrainerEvent::Msg(Msg::Batches(b)) => core.on_batches(b),
                TrainerEvent::Msg(Msg::ShardReady { partition, .. }) => core.on_shard_ready(partition),
                TrainerEvent::Msg(Msg::Assign { generation, partitions, .. }) => core.on_assign(generation, partitions),
                TrainerEvent::Msg(_) => Vec::new(),
            }
            .into();
            while let Some(cmd) = queue.pop_front() {
                match cmd {
                    TrainerCommand::Compute { step, partition } => {
                        if let Ok(cmds) = core.compute(step, partition) {
                            queue.extend(cmds);
                        }
                    }
                    TrainerCommand::Send(_, Msg::BatchRequest { step, count, .. }) => {
                        prop_assert!(step + u64::from(count) <= total, "{step}+{count}")
                    }
                    TrainerCommand::Send(..) => {}
                }
            }
        }
    }
}

// -------------------------------------------------------------------- shard

fn shard() -> ShardCore {
    let rows: Vec<[f32; 2]> = (0..12).map(|i| [i as f32, 1.0]).collect();
    let targets: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    let names = vec!["a".to_string(), "b".to_string()];
    let table = Table::from_rows("proptest", names, &rows, &targets, TaskKind::Regression).unwrap();
    let partitions = Partitions::new(table.len(), 3, 6, 5).unwrap();
    let schedule = Schedule { steps_per_epoch: partitions.steps_per_epoch, epochs: 3 };
    ShardCore::new(JOB, 1, schedule, &partitions, Arc::new(table)).unwrap()
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_shard_core_takes_any_batch_request(msgs in vec(msg(), 0..EVENTS)) {
        let mut core = shard();
        for m in msgs {
            // What the shard actor hands its core.
            let Msg::BatchRequest { job, partition, step, count, .. } = m else { continue };
            let steps = core.steps(job, partition, step, count);
            prop_assert!(steps.clone().count() <= MAX_BATCHES_PER_REQUEST as usize);
            for s in steps {
                let b = core.batch(s).unwrap();
                prop_assert_eq!((b.partition, b.step), (1, s));
            }
        }
    }
}

// --------------------------------------------------------------- supervisor

fn plan() -> JobPlan {
    let policy = RestartPolicy { max_restarts: 3, window_ms: 1_000, backoff_initial_ms: 10, backoff_max_ms: 35 };
    JobPlan {
        job: JOB,
        assignment: JobPlan::round_robin(4, 2),
        trainers: 2,
        ranges: vec![(0, 3), (3, 2)],
        schedule: Schedule { steps_per_epoch: 2, epochs: 2 },
        shard_policy: policy,
        trainer_policy: policy,
        aggregator_policy: policy,
    }
}

/// What reaches the supervisor's core: messages, supervision events, timers.
#[derive(Clone, Debug)]
enum JobEvent {
    Msg(Msg),
    Failed(ActorKey),
    RestartDue(ActorKey, Option<u64>),
    Started(ActorKey),
    /// The clock advances by this many milliseconds.
    Wait(u64),
}

/// Step reports and final ranges this supervisor takes (in generation 0, or
/// whichever generation `generation` says).
fn good_job_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (0..2u32, 0..2u64, 0..5u64).prop_map(|(range, generation, step)| Msg::StepApplied {
            job: JOB,
            range,
            generation,
            step,
            loss_sum: 1.0,
            samples: 8
        }),
        (0..2u32, 0..2u64).prop_map(|(range, generation)| {
            let (offset, len) = if range == 0 { (0, 3) } else { (3, 2) };
            Msg::Finished { job: JOB, range, generation, offset, values: vec![1.0; len], ledger: Ledger::new() }
        }),
    ]
}

fn job_event() -> impl Strategy<Value = JobEvent> {
    prop_oneof![
        3 => msg().prop_map(JobEvent::Msg),
        3 => good_job_msg().prop_map(JobEvent::Msg),
        1 => key().prop_map(JobEvent::Failed),
        1 => (key(), proptest::option::of(any_u64())).prop_map(|(k, c)| JobEvent::RestartDue(k, c)),
        1 => key().prop_map(JobEvent::Started),
        1 => (0..2_000u64).prop_map(JobEvent::Wait),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn the_supervisor_core_takes_any_event(
        events in vec(job_event(), 0..EVENTS),
        generation in prop_oneof![Just(0u64), any_u64()],
    ) {
        let start = Instant::now();
        let mut now = start;
        let mut core = JobCore::new(plan(), now).with_generation(generation);
        let total = core.plan().schedule.total_steps();
        for event in events {
            let cmds = match event {
                JobEvent::Msg(Msg::StepApplied { range, generation, step, loss_sum, samples, .. }) => {
                    core.on_step_applied(range, generation, step, loss_sum, samples, now)
                }
                JobEvent::Msg(Msg::Finished { range, generation, offset, values, ledger, .. }) => {
                    core.on_finished(range, generation, offset, values, ledger)
                }
                JobEvent::Msg(_) => Vec::new(),
                JobEvent::Failed(key) => core.on_child_failed(key, "proptest".into(), now),
                JobEvent::RestartDue(key, checkpoint) => core.on_restart_due(key, checkpoint, now),
                JobEvent::Started(key) => core.on_child_started(key),
                JobEvent::Wait(ms) => {
                    now += Duration::from_millis(ms);
                    Vec::new()
                }
            };
            prop_assert!(core.global_step() <= total);
            for cmd in cmds {
                match cmd {
                    JobCommand::Spawn { key, .. } | JobCommand::RestartAfter { key, .. } => {
                        prop_assert!(core.plan().contains(key), "{key}")
                    }
                    JobCommand::Complete { params, .. } => prop_assert_eq!(params.len(), 5),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn the_ledger_takes_any_numbers(
        mut ledger in ledger(),
        adds in vec((any_u64(), 0..6usize, 0..6usize, any_u64()), 0..16),
        sizes in vec(any_u64(), 0..5),
        closes in vec(any_u64(), 0..4),
    ) {
        for (epoch, partitions, p, samples) in adds {
            ledger.add(epoch, partitions, p, samples);
        }
        for epoch in closes {
            ledger.close_before(epoch, &sizes);
            ledger.close(epoch, &sizes);
        }
        let _ = (ledger.first_inexact(&sizes), ledger.is_exact(&sizes, 3), ledger.epochs());
    }
}

#[test]
fn a_finished_range_at_the_wrong_offset_is_dropped_not_written_outside_theta() {
    let total = plan().schedule.total_steps();
    let mut core = JobCore::new(plan(), Instant::now()).with_start_step(total);
    for (offset, len) in [(u64::MAX, 2), (4, 2), (3, 0), (3, 3), (0, 2)] {
        let cmds = core.on_finished(1, 0, offset, vec![1.0; len], Ledger::new());
        assert!(cmds.is_empty(), "[{offset}, +{len}): {cmds:?}");
    }
    assert_eq!(core.rejected(), 5);
    core.on_finished(0, 0, 0, vec![1.0; 3], Ledger::new());
    let cmds = core.on_finished(1, 0, 3, vec![2.0; 2], Ledger::new());
    assert!(matches!(&cmds[..], [JobCommand::Complete { params, .. }] if params == &[1.0, 1.0, 1.0, 2.0, 2.0]));
}

#[test]
fn events_about_actors_outside_the_plan_and_steps_past_the_end_are_dropped() {
    let mut core = JobCore::new(plan(), Instant::now());
    let now = Instant::now();
    for key in [ActorKey::aggregator(2), ActorKey::shard(u32::MAX), ActorKey::trainer(2)] {
        assert!(core.on_child_failed(key, "x".into(), now).is_empty(), "{key}");
        assert!(core.on_restart_due(key, Some(3), now).is_empty(), "{key}");
    }
    assert!(core.on_step_applied(0, 0, u64::MAX, 1.0, 1, now).is_empty());
    assert!(core.on_step_applied(7, 0, 1, 1.0, 1, now).is_empty());
    assert_eq!(core.rejected(), 8);
    assert!(core.faults().is_empty());
    assert_eq!(core.global_step(), 0);
}

#[test]
fn a_rollback_with_no_generation_left_fails_the_job_instead_of_wrapping() {
    let mut core = JobCore::new(plan(), Instant::now()).with_generation(u64::MAX);
    let cmds = core.on_restart_due(ActorKey::aggregator(0), None, Instant::now());
    assert!(matches!(&cmds[..], [JobCommand::Fail(JobError::GenerationsExhausted { generation: u64::MAX, .. })]));
    assert!(core.is_done());
}

#[test]
fn a_batch_that_cannot_feed_the_model_is_dropped_and_asked_for_again() {
    let mut core = trainer();
    core.on_params(Params::new(JOB, 0, 0, 0, 0, vec![0.1, 0.2].into()));
    let cmds = core.on_params(Params::new(JOB, 0, 0, 1, 2, vec![0.3].into()));
    assert!(!cmds.is_empty(), "θ_0 is ready: batches are requested");
    let bad = |x: Vec<f32>, features| Batch {
        job: JOB,
        partition: 0,
        step: 0,
        features,
        x,
        targets: BatchTargets::Real(vec![1.0, 0.0]),
    };
    assert!(core.on_batch(bad(vec![1.0; 3], 2)).is_empty());
    assert!(core.on_batch(bad(vec![1.0; 4], 4)).is_empty());
    assert_eq!(core.rejected(), 2);
    // Still wanted: the well-formed batch is computed.
    let cmds = core.on_batch(bad(vec![1.0; 4], 2));
    assert_eq!(cmds, vec![TrainerCommand::Compute { step: 0, partition: 0 }]);
}
