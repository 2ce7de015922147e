//! Event-by-event tests of the protocol cores, without actors or sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::trainer::{BATCH_WINDOW, STALL_TICKS};
use super::*;
use crate::model::{self, Head, ModelKind, ModelSpec};
use crate::optim::{OptimizerKind, OptimizerSpec};

const JOB: JobId = 7;

fn schedule() -> Schedule {
    Schedule { steps_per_epoch: 2, epochs: 2 }
}

fn agg_setup(range: u32, offset: usize, len: usize, partitions: u32) -> AggregatorSetup {
    AggregatorSetup {
        job: JOB,
        range,
        offset,
        len,
        partitions,
        // 4 rows per partition, 2 steps per epoch: every chunk holds 2 rows.
        partition_sizes: vec![4; partitions as usize],
        schedule: schedule(),
        checkpoint_every: 2,
        optimizer: OptimizerSpec::new(OptimizerKind::Adam),
    }
}

fn fresh(len: usize) -> RangeState {
    RangeState {
        step: 0,
        params: Arc::new((0..len).map(|i| i as f32 * 0.1).collect()),
        optimizer: OptimizerSpec::new(OptimizerKind::Adam).new_state(len),
        ledger: Ledger::new(),
    }
}

fn grad(step: u64, p: u32, offset: usize, values: Vec<f32>) -> Gradient {
    Gradient {
        job: JOB,
        generation: 0,
        step,
        partition: p,
        partitions: 1,
        samples: 2,
        loss_sum: 1.0 + f64::from(p),
        offset: offset as u64,
        values: values.into(),
    }
}

/// Values chosen so that float addition order matters.
fn awkward(p: u32, len: usize) -> Vec<f32> {
    (0..len).map(|i| [1.0e8f32, 1.0, -1.0e8, 3.3e-3][(p as usize + i) % 4] * (1.0 + i as f32)).collect()
}

fn applied_params(order: &[u32]) -> Vec<f32> {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 5, 4), 0, fresh(5));
    for &p in order {
        core.on_gradient(grad(0, p, 0, awkward(p, 5)));
    }
    assert_eq!(core.step(), 1);
    core.state().params.to_vec()
}

#[test]
fn aggregator_sums_in_tree_order_whatever_the_arrival_order() {
    let a = applied_params(&[0, 1, 2, 3]);
    for order in [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
        let b = applied_params(&order);
        assert_eq!(bits(&a), bits(&b), "order {order:?}");
    }
}

/// The sum of partitions `lo..hi`'s gradients as a trainer owning them sends it (tree order).
fn span_grad(lo: u32, hi: u32, len: usize) -> Gradient {
    let mut sums: reduce::Reducer<reduce::Partial> = reduce::Reducer::new(4, len);
    for p in lo..hi {
        let part = reduce::Partial { values: awkward(p, len), samples: 2, loss_sum: 1.0 + f64::from(p) };
        sums.insert(reduce::Span::leaf(p), part).unwrap();
    }
    let sum = sums.take(&reduce::Span { lo, hi }).expect("a node of the tree");
    Gradient { partitions: hi - lo, samples: sum.samples as u32, loss_sum: sum.loss_sum, ..grad(0, lo, 0, sum.values) }
}

#[test]
fn pre_reduced_sums_give_the_bits_of_one_gradient_per_partition() {
    let expected = applied_params(&[0, 1, 2, 3]);
    // Two trainers owning 0..2 and 2..4, one owning all, and a mix with a replayed leaf.
    let deployments: [&[(u32, u32)]; 4] =
        [&[(0, 2), (2, 4)], &[(2, 4), (0, 2)], &[(0, 4)], &[(3, 4), (0, 2), (2, 3), (3, 4)]];
    for spans in deployments {
        let mut core = AggregatorCore::new(agg_setup(0, 0, 5, 4), 0, fresh(5));
        let mut loss = None;
        for &(lo, hi) in spans {
            for cmd in core.on_gradient(span_grad(lo, hi, 5)).1 {
                if let AggCommand::Send(Addr::Job, Msg::StepApplied { loss_sum, samples, .. }) = cmd {
                    loss = Some((loss_sum, samples));
                }
            }
        }
        assert_eq!(core.step(), 1, "{spans:?}");
        assert_eq!(bits(&core.state().params), bits(&expected), "{spans:?}");
        assert_eq!(loss, Some(((1.0 + 2.0) + (3.0 + 4.0), 8)), "{spans:?}: the loss is summed in tree order too");
        assert_eq!(core.state().ledger.open.get(&0), Some(&vec![2, 2, 2, 2]), "{spans:?}: each sample once");
    }
}

#[test]
fn a_node_covering_held_parts_replaces_them_and_a_covered_part_is_a_duplicate() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 5, 4), 0, fresh(5));
    assert_eq!(core.on_gradient(grad(0, 0, 0, awkward(0, 5))).0, Verdict::Accepted);
    // The trainer of 0..2 restarted and sent its sum: it replaces leaf 0.
    assert_eq!(core.on_gradient(span_grad(0, 2, 5)).0, Verdict::Accepted);
    assert_eq!(core.on_gradient(grad(0, 1, 0, awkward(1, 5))).0, Verdict::Duplicate, "inside 0..2");
    assert_eq!(core.on_gradient(span_grad(0, 2, 5)).0, Verdict::Duplicate);
    assert_eq!(core.on_gradient(span_grad(2, 4, 5)).0, Verdict::Applied);
    assert_eq!(bits(&core.state().params), bits(&applied_params(&[0, 1, 2, 3])));
    assert_eq!(core.state().ledger.open.get(&0), Some(&vec![2, 2, 2, 2]));
    assert_eq!(core.stats().duplicates, 2);
}

#[test]
fn a_span_that_is_no_tree_node_or_has_the_wrong_samples_is_malformed() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 5, 4), 0, fresh(5));
    let not_a_node = Gradient { partitions: 2, samples: 4, ..grad(0, 1, 0, awkward(1, 5)) };
    let Verdict::Malformed(reason) = core.on_gradient(not_a_node).0 else { panic!("1..3 is no node") };
    assert!(reason.contains("partitions 1..3 is not a node of the reduction tree over 4 partitions"), "{reason}");
    let short = Gradient { samples: 2, ..span_grad(0, 2, 5) };
    let Verdict::Malformed(reason) = core.on_gradient(short).0 else { panic!("2 samples for 2 batches of 2") };
    assert!(reason.contains("partitions 0..2 step 0: 2 samples, but its batches have 4"), "{reason}");
    let empty = Gradient { partitions: 0, ..grad(0, 1, 0, awkward(1, 5)) };
    assert!(matches!(core.on_gradient(empty).0, Verdict::Malformed(_)));
    assert_eq!((core.stats().malformed, core.step()), (3, 0));
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A step whose gradients are all in waits while the coordinator has no lease,
/// and is then applied bit for bit as it would have been at once.
#[test]
fn aggregator_commits_only_under_a_lease() {
    let mut held = AggregatorCore::new(agg_setup(0, 0, 5, 4), 0, fresh(5));
    assert!(held.on_lease(false).is_empty());
    for p in [2, 0, 3, 1] {
        let (verdict, cmds) = held.on_gradient(grad(0, p, 0, awkward(p, 5)));
        assert_eq!((verdict, cmds.len()), (Verdict::Accepted, 0), "partition {p}");
    }
    assert_eq!(held.step(), 0, "no step without the lease");
    assert!(held.waiting_for_lease());
    assert!(held.on_lease(false).is_empty(), "still none");
    let cmds = held.on_lease(true);
    assert!(cmds.iter().any(|c| matches!(c, AggCommand::Send(Addr::Job, Msg::StepApplied { step: 1, .. }))));
    assert_eq!(held.step(), 1);
    assert!(!held.waiting_for_lease());
    assert_eq!(bits(&held.state().params), bits(&applied_params(&[0, 1, 2, 3])));
}

#[test]
fn aggregator_ignores_duplicates_stale_future_and_other_generations() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 3, 2), 0, fresh(3));
    assert_eq!(core.on_gradient(grad(0, 0, 0, vec![1.0; 3])).0, Verdict::Accepted);
    assert_eq!(core.on_gradient(grad(0, 0, 0, vec![9.0; 3])).0, Verdict::Duplicate);
    assert_eq!(core.on_gradient(grad(1, 1, 0, vec![1.0; 3])).0, Verdict::Future);
    let mut other = grad(0, 1, 0, vec![1.0; 3]);
    other.generation = 1;
    assert_eq!(core.on_gradient(other).0, Verdict::OtherGeneration);
    assert_eq!(core.on_gradient(grad(0, 1, 0, vec![1.0; 3])).0, Verdict::Applied);
    assert_eq!(core.on_gradient(grad(0, 1, 0, vec![1.0; 3])).0, Verdict::Stale);
    // Exactly once: each partition's 2 samples counted once despite the replays.
    assert_eq!(core.state().ledger.open[&0], vec![2, 2]);
    let s = core.stats();
    assert_eq!((s.duplicates, s.stale, s.future, s.other_generation), (1, 1, 1, 1));
}

#[test]
fn aggregator_rejects_malformed_gradients_without_panicking() {
    let mut core = AggregatorCore::new(agg_setup(1, 3, 3, 2), 0, fresh(3));
    let cases = [
        grad(0, 0, 3, vec![1.0; 2]),                            // wrong length
        grad(0, 0, 0, vec![1.0; 3]),                            // wrong offset
        grad(0, 5, 3, vec![1.0; 3]),                            // no such partition
        Gradient { samples: 3, ..grad(0, 0, 3, vec![1.0; 3]) }, // more samples than its batch
        Gradient { job: 99, ..grad(0, 0, 3, vec![1.0; 3]) },    // another job
    ];
    for g in cases {
        let (v, cmds) = core.on_gradient(g);
        assert!(matches!(v, Verdict::Malformed(_)), "{v:?}");
        assert!(cmds.is_empty());
    }
    assert_eq!(core.stats().malformed, 5);
    assert_eq!(core.step(), 0);
}

#[test]
fn aggregator_checkpoints_every_k_steps_and_reports_the_end() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 1), 0, fresh(2));
    assert!(core.start(true).contains(&AggCommand::Checkpoint { step: 0 }));
    assert!(core.on_checkpoint_done().is_empty());
    let mut checkpoints = Vec::new();
    let mut finished = false;
    for step in 0..4 {
        let (v, cmds) = core.on_gradient(grad(step, 0, 0, vec![0.5, -0.5]));
        assert_eq!(v, Verdict::Applied);
        for c in cmds {
            match c {
                AggCommand::Checkpoint { step } => {
                    checkpoints.push(step);
                    assert!(core.on_checkpoint_done().is_empty());
                }
                AggCommand::Send(Addr::Job, Msg::Finished { ledger, .. }) => {
                    finished = true;
                    // Both epochs applied [4] (the partition's size), folded when they ended.
                    assert!(ledger.open.is_empty(), "{ledger:?}");
                    assert_eq!((ledger.closed.epochs, ledger.closed.exact), (2, 2), "{ledger:?}");
                    assert_eq!(ledger.closed.per_partition, vec![8]);
                }
                _ => {}
            }
        }
    }
    assert_eq!(checkpoints, vec![2, 4]);
    assert!(finished);
    assert_eq!(core.on_gradient(grad(4, 0, 0, vec![0.5, -0.5])).0, Verdict::AfterFinish);
}

/// Checkpoints are written in the background while training goes on (CheckFreq): the steps
/// after a checkpoint are applied while it is written, and only the step that would ask for
/// the next checkpoint waits until it is done — at most one checkpoint of a range is being
/// written, and a slow disk paces checkpoints instead of piling them up.
#[test]
fn steps_go_on_while_a_checkpoint_is_written_and_the_next_checkpoint_waits_for_it() {
    let params_sent =
        |cmds: &[AggCommand]| cmds.iter().any(|c| matches!(c, AggCommand::Send(Addr::AllTrainers, Msg::Params(_))));
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 1), 0, fresh(2));
    let _ = core.start(true);
    assert_eq!(core.awaiting_checkpoint(), Some(0));
    // Step 0 → 1 while the checkpoint of step 0 is written: 1 is no checkpoint step (every 2).
    let (v, cmds) = core.on_gradient(grad(0, 0, 0, vec![0.5, -0.5]));
    assert_eq!(v, Verdict::Applied);
    assert!(params_sent(&cmds), "{cmds:?}");
    assert_eq!((core.step(), core.awaiting_checkpoint()), (1, Some(0)));
    // Step 1 → 2 would ask for the checkpoint of step 2 while step 0's is still written: it waits.
    let (v, cmds) = core.on_gradient(grad(1, 0, 0, vec![0.5, -0.5]));
    assert_eq!((v, cmds.len()), (Verdict::Accepted, 0));
    assert_eq!(core.step(), 1);
    assert!(!core.waiting_for_lease(), "it waits for the checkpoint, not for the lease");
    assert!(core.on_lease(true).is_empty(), "the lease alone does not release it");
    // Done: the waiting step is applied at once, as it would have been without the wait.
    let cmds = core.on_checkpoint_done();
    assert_eq!(core.step(), 2);
    assert!(params_sent(&cmds), "{cmds:?}");
    assert!(cmds.contains(&AggCommand::Checkpoint { step: 2 }), "{cmds:?}");
    assert_eq!(core.awaiting_checkpoint(), Some(2));
    assert_eq!(core.on_gradient(grad(2, 0, 0, vec![0.5, -0.5])).0, Verdict::Applied);
    assert_eq!(core.on_gradient(grad(3, 0, 0, vec![0.5, -0.5])).0, Verdict::Accepted);
    // A failed write releases it too (the failure is reported; the previous one stays the rollback point).
    assert!(!core.on_checkpoint_done().is_empty());
    assert_eq!(core.step(), 4);
}

#[test]
fn split_ranges_apply_the_same_bits_as_one_range() {
    let len = 7;
    let mut whole = AggregatorCore::new(agg_setup(0, 0, len, 3), 0, fresh(len));
    let full = fresh(len);
    let part = |o: usize, l: usize| RangeState {
        step: 0,
        params: full.params[o..o + l].to_vec().into(),
        optimizer: full.optimizer.slice(o..o + l),
        ledger: Ledger::new(),
    };
    let mut a = AggregatorCore::new(agg_setup(0, 0, 3, 3), 0, part(0, 3));
    let mut b = AggregatorCore::new(agg_setup(1, 3, 4, 3), 0, part(3, 4));
    for step in 0..3 {
        for p in 0..3 {
            let g = awkward(p + step as u32, len);
            whole.on_gradient(grad(step, p, 0, g.clone()));
            a.on_gradient(grad(step, p, 0, g[..3].to_vec()));
            b.on_gradient(grad(step, p, 3, g[3..].to_vec()));
        }
    }
    let mut joined = a.state().params.to_vec();
    joined.extend_from_slice(&b.state().params);
    assert_eq!(bits(&whole.state().params), bits(&joined));
}

#[test]
fn aggregator_folds_an_epoch_into_the_ledger_when_its_last_step_is_applied() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 2), 0, fresh(2));
    for p in 0..2 {
        core.on_gradient(grad(0, p, 0, vec![0.1, 0.2]));
    }
    let ledger = &core.state().ledger;
    assert_eq!((ledger.open[&0].clone(), ledger.closed.epochs), (vec![2, 2], 0));
    for p in 0..2 {
        core.on_gradient(grad(1, p, 0, vec![0.1, 0.2]));
    }
    let ledger = &core.state().ledger;
    assert!(ledger.open.is_empty(), "{ledger:?}");
    assert_eq!((ledger.closed.epochs, ledger.closed.exact, ledger.closed.first_inexact.clone()), (1, 1, None));
}

#[test]
fn a_state_restored_with_finished_epochs_as_rows_folds_them() {
    // What a checkpoint written before epochs were folded holds at step 3.
    let state = RangeState { step: 3, ledger: [(0, vec![4, 4]), (1, vec![2, 2])].into_iter().collect(), ..fresh(2) };
    let core = AggregatorCore::new(agg_setup(0, 0, 2, 2), 0, state);
    let ledger = &core.state().ledger;
    assert_eq!((ledger.closed.epochs, ledger.closed.exact), (1, 1));
    assert_eq!(ledger.open.keys().copied().collect::<Vec<_>>(), vec![1]);
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_broken_aggregator_counting_a_duplicate_leaves_an_inexact_epoch_in_the_ledger() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 2), 0, fresh(2));
    core.break_accept_duplicates();
    core.on_gradient(grad(0, 0, 0, vec![0.1, 0.2]));
    core.on_gradient(grad(0, 0, 0, vec![0.1, 0.2])); // counted twice
    core.on_gradient(grad(0, 1, 0, vec![0.1, 0.2]));
    for p in 0..2 {
        core.on_gradient(grad(1, p, 0, vec![0.1, 0.2]));
    }
    let closed = &core.state().ledger.closed;
    assert_eq!((closed.epochs, closed.exact, closed.duplicated, closed.lost), (1, 0, 2, 0));
    assert_eq!(closed.first_inexact, Some((0, vec![6, 4])));
}

#[test]
fn aggregator_serves_the_previous_version_for_a_trainer_that_lagged() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 1), 0, fresh(2));
    let before = core.state().params.clone();
    core.on_gradient(grad(0, 0, 0, vec![1.0, 1.0]));
    let cmds = core.on_params_request(3, Some(0));
    let [AggCommand::Send(Addr::Trainer(3), Msg::Params(p))] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!((p.step, p.values.as_slice()), (0, before.as_slice()));
    let cmds = core.on_params_request(3, None);
    let [AggCommand::Send(_, Msg::Params(p))] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!(p.step, 1);
}

// ---------------------------------------------------------------- trainer

fn linear_model() -> Arc<dyn crate::model::Model> {
    let spec = ModelSpec { kind: ModelKind::Linear, inputs: 2, outputs: 1, hidden: 0, head: Head::Regression };
    Arc::from(model::build(&spec).unwrap())
}

fn trainer(partitions: Vec<u32>) -> TrainerCore {
    // linear model with 2 inputs: 3 parameters, split into ranges [0,2) and [2,3).
    let schedule = Schedule { steps_per_epoch: 2, epochs: 10 };
    let setup = TrainerSetup { job: JOB, index: 0, ranges: vec![(0, 2), (2, 1)], schedule, features: 2, partitions: 8 };
    TrainerCore::new(setup, linear_model(), 0, partitions)
}

fn params(range: u32, step: u64, generation: u64) -> Params {
    let (offset, values) = if range == 0 { (0, vec![0.1, 0.2]) } else { (2, vec![0.3]) };
    Params::new(JOB, generation, step, range, offset, values.into())
}

fn batch(p: u32, step: u64) -> Batch {
    Batch {
        job: JOB,
        partition: p,
        step,
        features: 2,
        x: vec![1.0, 2.0, 3.0, 4.0],
        targets: BatchTargets::Real(vec![1.0, 0.0]),
    }
}

fn sends(cmds: &[TrainerCommand]) -> Vec<(Addr, &'static str)> {
    cmds.iter()
        .filter_map(|c| match c {
            TrainerCommand::Send(a, m) => Some((*a, m.kind())),
            _ => None,
        })
        .collect()
}

fn requests(cmds: &[TrainerCommand]) -> Vec<(u32, u64, u32)> {
    cmds.iter()
        .filter_map(|c| match c {
            TrainerCommand::Send(_, Msg::BatchRequest { partition, step, count, .. }) => {
                Some((*partition, *step, *count))
            }
            _ => None,
        })
        .collect()
}

/// The gradients a trainer sends after computing `order` at step 0: (first partition, partitions, samples).
fn spans_sent(owned: Vec<u32>, order: &[u32]) -> Vec<Vec<(u32, u32, u32)>> {
    let mut t = trainer(owned.clone());
    t.on_params(params(0, 0, 0));
    t.on_params(params(1, 0, 0));
    for &p in &owned {
        t.on_batches(vec![batch(p, 0)]);
    }
    order
        .iter()
        .map(|&p| {
            let out = t.compute(0, p).unwrap();
            let gs: Vec<(u32, u32, u32)> = out
                .iter()
                .filter_map(|c| match c {
                    TrainerCommand::Send(Addr::Aggregator(0), Msg::Gradient(g)) => {
                        Some((g.partition, g.partitions, g.samples))
                    }
                    _ => None,
                })
                .collect();
            let to_range_1 =
                out.iter().filter(|c| matches!(c, TrainerCommand::Send(Addr::Aggregator(1), Msg::Gradient(_))));
            assert_eq!(to_range_1.count(), gs.len(), "every range gets its part of each sum");
            gs
        })
        .collect()
}

#[test]
fn a_trainer_owning_a_whole_subtree_sends_one_sum_for_it() {
    // Partitions 0..4 of 8: one sum of 4 batches of 2 rows, computed in one call by whichever
    // partition's command comes first (all batches are here); the others find it done.
    let sent = spans_sent(vec![0, 1, 2, 3], &[2, 0, 3, 1]);
    assert_eq!(sent, vec![vec![(0, 4, 8)], vec![], vec![], vec![]]);
    // Partitions 3..6: the node 4..6, then leaf 3 alone.
    let sent = spans_sent(vec![3, 4, 5], &[4, 3, 5]);
    assert_eq!(sent, vec![vec![(4, 2, 4)], vec![(3, 1, 2)], vec![]]);
    // Round-robin ownership keeps no subtree whole: one gradient per partition.
    let sent = spans_sent(vec![1, 3], &[1, 3]);
    assert_eq!(sent, vec![vec![(1, 1, 2)], vec![(3, 1, 2)]]);
}

#[test]
fn a_trainer_computes_an_owned_node_once_when_its_last_batch_arrives() {
    let mut t = trainer(vec![0, 1, 2, 3]);
    t.on_params(params(0, 0, 0));
    t.on_params(params(1, 0, 0));
    for p in [2, 0, 1] {
        assert!(t.on_batches(vec![batch(p, 0)]).is_empty(), "partition {p}: the node is not whole yet");
        assert!(t.compute(0, p).unwrap().is_empty(), "partition {p}: nothing to compute without every batch");
    }
    assert_eq!(t.on_batches(vec![batch(3, 0)]), vec![TrainerCommand::Compute { step: 0, partition: 0 }]);
    let sent = |out: &[TrainerCommand]| {
        out.iter()
            .filter_map(|c| match c {
                TrainerCommand::Send(Addr::Aggregator(r), Msg::Gradient(g)) => Some((*r, g.partition, g.partitions)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(sent(&t.compute(0, 3).unwrap()), vec![(0, 0, 4), (1, 0, 4)], "one sum of the node per range");
    for p in 0..4 {
        assert!(t.compute(0, p).unwrap().is_empty(), "partition {p}: computed already");
    }
    // A θ that comes after the batches: the node is computed at once.
    t.on_batches((0..4).map(|p| batch(p, 1)).collect());
    t.on_params(params(0, 1, 0));
    assert_eq!(t.on_params(params(1, 1, 0)), vec![TrainerCommand::Compute { step: 1, partition: 0 }]);
}

#[test]
fn a_trainers_sums_have_the_bits_of_the_tree_sum_step_after_step() {
    // Partitions 0..4 of 8 over 3 steps: from the second step on, every leaf is computed in a
    // buffer a previous sum handed back; the sums must still be ((g0+g1)+(g2+g3)) bit for bit.
    let model = linear_model();
    let mut t = trainer(vec![0, 1, 2, 3]);
    // Rows whose gradients differ by partition and step, in magnitudes where the order of
    // additions shows in the bits.
    let rows = |p: u32, step: u64| Batch {
        x: (0..4).map(|i| [1.0e6f32, -3.3e-3, 7.0, -2.5e4][(p as usize + i) % 4] * (1.0 + step as f32)).collect(),
        targets: BatchTargets::Real(vec![f32::from(p as u8) * 1.0e3, -1.0e-2]),
        ..batch(p, step)
    };
    for step in 0..3 {
        t.on_params(params(0, step, 0));
        t.on_params(params(1, step, 0));
        let mut sent = vec![0.0f32; 3];
        for p in 0..4 {
            t.on_batches(vec![rows(p, step)]);
            for cmd in t.compute(step, p).unwrap() {
                if let TrainerCommand::Send(_, Msg::Gradient(g)) = cmd {
                    assert_eq!((g.step, g.partition, g.partitions), (step, 0, 4));
                    sent[g.offset as usize..g.offset as usize + g.values.len()].copy_from_slice(&g.values);
                }
            }
        }
        let theta = [0.1, 0.2, 0.3];
        let leaf = |p: u32| {
            let b = rows(p, step);
            let BatchTargets::Real(y) = &b.targets else { unreachable!() };
            let x = ndarray::ArrayView2::from_shape((2, 2), &b.x).unwrap();
            let mut g = vec![f32::NAN; 3];
            model.loss_grad(&theta, x, crate::model::Targets::Real(y), &mut g).unwrap();
            g
        };
        let add = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).map(|(a, b)| a + b).collect::<Vec<f32>>();
        let expected = add(add(leaf(0), leaf(1)), add(leaf(2), leaf(3)));
        assert_eq!(bits(&sent), bits(&expected), "step {step}");
    }
}

/// Range `range` at `step` as a receiver gets it coded against version `base_step` (`base`).
fn coded(range: u32, step: u64, base_step: u64, new: &[f32], base: &[f32]) -> Params {
    let code = delta::encode(new, base).expect("a small step codes smaller");
    let len = code.bytes.len() as u64;
    let mut bytes = code.bytes;
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let delta = ParamsDelta {
        base_step,
        base_check: code.base_check,
        len: new.len() as u64,
        bytes: len,
        code: phalanx_transport::LeTensor::from_chunks(vec![bytes::Bytes::from(bytes)]).unwrap(),
    };
    let offset = if range == 0 { 0 } else { 2 };
    Params { delta: Some(Box::new(delta)), ..Params::new(JOB, 0, step, range, offset, SharedValues::default()) }
}

/// The gradient trainer `t` sends for partition 0 at `step`.
fn gradient_bits(t: &mut TrainerCore, step: u64) -> Vec<u32> {
    t.on_batches(vec![batch(0, step)]);
    let out = t.compute(step, 0).unwrap();
    let values: Vec<f32> = out
        .iter()
        .filter_map(|c| match c {
            TrainerCommand::Send(_, Msg::Gradient(g)) => Some(g.values.as_slice().to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(values.len(), 3, "{out:?}");
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_trainer_decodes_a_version_coded_against_the_one_it_holds_and_asks_for_values_otherwise() {
    let (r0, r1) = ([0.1f32, 0.2], [0.3f32]);
    let (n0, n1) = ([0.1f32 - 1e-7, 0.2 + 3e-8], [f32::from_bits(0.3f32.to_bits() ^ 0x15)]);
    let mut plain = trainer(vec![0]);
    let mut coded_side = trainer(vec![0]);
    for t in [&mut plain, &mut coded_side] {
        t.on_params(params(0, 0, 0));
        t.on_params(params(1, 0, 0));
        gradient_bits(t, 0);
    }
    plain.on_params(Params::new(JOB, 0, 1, 0, 0, n0.to_vec().into()));
    plain.on_params(Params::new(JOB, 0, 1, 1, 2, n1.to_vec().into()));
    assert!(sends(&coded_side.on_params(coded(0, 1, 0, &n0, &r0))).is_empty(), "decoded, θ_1 not whole yet");
    coded_side.on_params(coded(1, 1, 0, &n1, &r1));
    assert_eq!(coded_side.ready_step(), Some(1));
    assert_eq!(gradient_bits(&mut coded_side, 1), gradient_bits(&mut plain, 1), "θ_1 decoded bit for bit");
    assert_eq!(coded_side.rejected(), 0);

    // Coded against a version this trainer does not hold: it asks the range's aggregator for
    // the values of that version.
    let ask = coded_side.on_params(coded(0, 3, 2, &n0, &r0));
    let [TrainerCommand::Send(Addr::Aggregator(0), Msg::ParamsRequest { step: Some(3), .. })] = ask.as_slice() else {
        panic!("{ask:?}")
    };
    assert_eq!((coded_side.ready_step(), coded_side.rejected()), (Some(1), 0));

    // Coded against another θ_1 than the one held (the base check differs), or damaged: refused
    // and asked for, never decoded into other weights.
    let other_base = coded(0, 2, 1, &r0, &[0.1, 0.25]);
    let mut damaged = coded(0, 2, 1, &r0, &n0);
    damaged.delta.as_mut().unwrap().bytes += 4;
    for bad in [other_base, damaged] {
        let ask = coded_side.on_params(bad);
        let [TrainerCommand::Send(Addr::Aggregator(0), Msg::ParamsRequest { step: Some(2), .. })] = ask.as_slice()
        else {
            panic!("{ask:?}")
        };
    }
    assert_eq!((coded_side.ready_step(), coded_side.rejected()), (Some(1), 2));
    // The version itself, as the aggregator answers: taken.
    coded_side.on_params(coded(0, 2, 1, &r0, &n0));
    coded_side.on_params(Params::new(JOB, 0, 2, 1, 2, r1.to_vec().into()));
    assert_eq!(coded_side.ready_step(), Some(2));
}

#[test]
fn an_aggregator_offers_each_new_version_as_a_delta_against_the_one_before_and_answers_requests_with_values() {
    let mut core = AggregatorCore::new(agg_setup(0, 0, 2, 1), 0, fresh(2));
    let before = core.state().params.clone();
    let (_, cmds) = core.on_gradient(grad(0, 0, 0, vec![1.0, 1.0]));
    let Some(Msg::Params(p)) = cmds.iter().find_map(|c| match c {
        AggCommand::Send(Addr::AllTrainers, m) => Some(m),
        _ => None,
    }) else {
        panic!("{cmds:?}")
    };
    let base = p.base.as_ref().expect("the step's new version carries its base");
    assert_eq!((p.step, base.step, base.values.as_slice()), (1, 0, before.as_slice()));
    // Coded once, when a node first sends it to another, if the code is smaller.
    let expected = delta::encode(p.values.as_slice(), &before);
    let coded = p.wire_delta();
    assert_eq!(
        coded.as_ref().map(|(h, _)| (h.base_step, h.len, h.bytes)),
        expected.map(|c| (0, 2, c.bytes.len() as u64))
    );
    if let Some((header, code)) = coded {
        assert_eq!(header.bytes.next_multiple_of(4), code.len() as u64);
    }
    // Requests get values: the asking trainer may hold no base.
    for step in [None, Some(0), Some(1)] {
        let cmds = core.on_params_request(3, step);
        let [AggCommand::Send(_, Msg::Params(p))] = cmds.as_slice() else { panic!("{cmds:?}") };
        assert!(p.base.is_none() && p.delta.is_none(), "{step:?}");
    }
}

#[test]
fn only_ranges_small_enough_for_the_code_to_pay_offer_a_base() {
    for (len, coded) in [(delta::CODED_RANGE_VALUES, true), (delta::CODED_RANGE_VALUES + 1, false)] {
        let mut core = AggregatorCore::new(agg_setup(0, 0, len, 1), 0, fresh(len));
        let (_, cmds) = core.on_gradient(grad(0, 0, 0, vec![1.0; len]));
        let Some(p) = cmds.iter().find_map(|c| match c {
            AggCommand::Send(Addr::AllTrainers, Msg::Params(p)) => Some(p),
            _ => None,
        }) else {
            panic!("no new version of {len} values")
        };
        assert_eq!((p.step, p.base.is_some()), (1, coded), "{len} values");
        assert_eq!(p.wire_delta().is_some(), coded, "{len} values: what the wire would carry");
    }
}

#[test]
fn a_trainer_of_a_one_range_job_takes_the_range_as_its_theta() {
    let schedule = Schedule { steps_per_epoch: 2, epochs: 10 };
    let setup = TrainerSetup { job: JOB, index: 0, ranges: vec![(0, 3)], schedule, features: 2, partitions: 1 };
    let mut t = TrainerCore::new(setup, linear_model(), 0, vec![0]);
    let whole = Params::new(JOB, 0, 0, 0, 0, vec![0.1, 0.2, 0.3].into());
    assert_eq!(requests(&t.on_params(whole.clone())), vec![(0, 0, BATCH_WINDOW as u32)]);
    assert_eq!(t.ready_step(), Some(0));
    assert!(t.on_params(Params { values: vec![0.0; 2].into(), ..whole.clone() }).is_empty(), "a wrong length");
    assert_eq!((t.ready_step(), t.rejected()), (Some(0), 1));
    assert_eq!(t.on_batches(vec![batch(0, 0)]), vec![TrainerCommand::Compute { step: 0, partition: 0 }]);
    let out = t.compute(0, 0).unwrap();
    let [TrainerCommand::Send(Addr::Aggregator(0), Msg::Gradient(g)), ..] = out.as_slice() else { panic!("{out:?}") };
    assert_eq!((g.partition, g.partitions, g.offset, g.values.len()), (0, 1, 0, 3));
}

#[test]
fn contiguous_assignment_balances_trainers_and_keeps_subtrees_whole() {
    assert_eq!(JobPlan::contiguous(8, 2), vec![0, 0, 0, 0, 1, 1, 1, 1]);
    assert_eq!(JobPlan::contiguous(8, 3), vec![0, 0, 0, 1, 1, 1, 2, 2], "larger shares first");
    assert_eq!(JobPlan::contiguous(7, 2), vec![0, 0, 0, 0, 1, 1, 1]);
    assert_eq!(JobPlan::contiguous(3, 5), vec![0, 1, 2], "more trainers than partitions");
    assert_eq!(JobPlan::contiguous(4, 1), vec![0; 4]);
    assert_eq!(JobPlan::contiguous(4, 0), vec![0; 4]);
    assert!(JobPlan::contiguous(0, 3).is_empty());
    for (p, t) in [(8u32, 3u32), (7, 2), (16, 5), (5, 5), (1, 1), (3, 7)] {
        let a = JobPlan::contiguous(p, t);
        let counts: Vec<usize> = (0..t.min(p)).map(|i| a.iter().filter(|o| **o == i).count()).collect();
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{p} over {t}: {counts:?}");
        assert!(a.windows(2).all(|w| w[0] <= w[1]), "contiguous: {a:?}");
    }
}

#[test]
fn trainer_computes_only_with_full_params_and_the_batch_and_prefetches_a_window() {
    let mut t = trainer(vec![1]);
    let start = t.start();
    assert_eq!(sends(&start), vec![(Addr::Aggregator(0), "params-request"), (Addr::Aggregator(1), "params-request")]);
    assert!(t.on_params(params(0, 0, 0)).is_empty(), "half a θ is not enough");
    let cmds = t.on_params(params(1, 0, 0));
    assert_eq!(requests(&cmds), vec![(1, 0, BATCH_WINDOW as u32)], "one request for a window of steps");
    let cmds = t.on_batches(vec![batch(1, 0), batch(1, 1), batch(1, 2), batch(1, 3)]);
    assert_eq!(cmds, vec![TrainerCommand::Compute { step: 0, partition: 1 }], "only step 0 has its θ");
    let out = t.compute(0, 1).unwrap();
    assert_eq!(sends(&out), vec![(Addr::Aggregator(0), "gradient"), (Addr::Aggregator(1), "gradient")]);
    // Computing twice is a no-op; a duplicate batch is ignored.
    assert!(t.compute(0, 1).unwrap().is_empty());
    assert!(t.on_batch(batch(1, 0)).is_empty());
    // Steps 1..3 compute from the buffer as soon as their θ is complete; at
    // step 3 less than half a window is left, so the next window is asked for.
    for step in 1..4 {
        t.on_params(params(0, step, 0));
        let cmds = t.on_params(params(1, step, 0));
        assert_eq!(cmds, vec![TrainerCommand::Compute { step, partition: 1 }]);
        let out = t.compute(step, 1).unwrap();
        let expect = if step == 3 { vec![(1, BATCH_WINDOW, 4)] } else { vec![] };
        assert_eq!(requests(&out), expect, "step {step}");
    }
}

#[test]
fn trainer_prefetch_never_asks_past_the_last_step() {
    let mut t = trainer(vec![0]);
    t.on_params(params(0, 17, 0));
    let cmds = t.on_params(params(1, 17, 0));
    assert_eq!(requests(&cmds), vec![(0, 17, 3)], "the job has 20 steps");
}

#[test]
fn trainer_gradient_ranges_tile_the_full_gradient() {
    let mut t = trainer(vec![0]);
    t.on_params(params(0, 0, 0));
    t.on_params(params(1, 0, 0));
    t.on_batch(batch(0, 0));
    let out = t.compute(0, 0).unwrap();
    let grads: Vec<&Gradient> = out
        .iter()
        .filter_map(|c| match c {
            TrainerCommand::Send(_, Msg::Gradient(g)) => Some(g),
            _ => None,
        })
        .collect();
    let mut expect = vec![0.0f32; 3];
    let x = ndarray::Array2::from_shape_vec((2, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    linear_model().loss_grad(&[0.1, 0.2, 0.3], x.view(), model::Targets::Real(&[1.0, 0.0]), &mut expect).unwrap();
    assert_eq!(grads.len(), 2);
    assert_eq!((grads[0].offset, grads[0].values.as_slice()), (0, &expect[..2]));
    assert_eq!((grads[1].offset, grads[1].values.as_slice()), (2, &expect[2..]));
    assert_eq!(grads[0].samples, 2);
}

/// The buffer a trainer's gradient ranges share (all of them must share one).
/// Where the values of the buffer the gradient ranges share live (the vector's memory, not
/// the `Arc` around it: a reused buffer is put in a new `Arc`).
fn shared_buffer(out: &[TrainerCommand]) -> *const f32 {
    let buffers: Vec<Arc<Vec<f32>>> = out
        .iter()
        .filter_map(|c| match c {
            TrainerCommand::Send(_, Msg::Gradient(g)) => Some(g.values.clone().into_parts().0),
            _ => None,
        })
        .collect();
    assert_eq!(buffers.len(), 2, "one message per range");
    assert!(Arc::ptr_eq(&buffers[0], &buffers[1]), "the ranges are cut from one buffer, not copied");
    buffers[0].as_ptr()
}

#[test]
fn gradient_ranges_share_one_buffer_reused_once_every_range_is_let_go() {
    let mut t = trainer(vec![0]);
    let step = |t: &mut TrainerCore, s: u64| {
        t.on_params(params(0, s, 0));
        t.on_params(params(1, s, 0));
        t.on_batch(batch(0, s));
        t.compute(s, 0).unwrap()
    };
    let first = step(&mut t, 0);
    let first_buffer = shared_buffer(&first);
    // The messages of step 0 are still held (the transport has not sent them): step 1 takes a
    // new buffer and leaves the held one alone.
    let second = step(&mut t, 1);
    let second_buffer = shared_buffer(&second);
    assert_ne!(first_buffer, second_buffer, "a buffer still being sent is not overwritten");
    // Every range of step 1 let go: step 2 computes into its buffer (the trainer's one spare
    // for its one node). Step 0's messages are still alive, so the allocator cannot hand their
    // memory out again and make the reuse look like a coincidence.
    drop(second);
    let third = step(&mut t, 2);
    assert_eq!(shared_buffer(&third), second_buffer, "a buffer nothing holds is reused");
    drop(first);
}

#[test]
fn shared_values_copy_only_what_is_shared() {
    let whole = vec![1.0f32, -0.0, f32::MIN_POSITIVE, 4.0];
    let at = whole.as_ptr();
    // All of an unshared buffer: moved, not copied.
    let values = SharedValues::from(whole);
    assert_eq!(values.as_slice(), &[1.0, -0.0, f32::MIN_POSITIVE, 4.0]);
    let back = values.into_vec();
    assert_eq!(back.as_ptr(), at);
    // A range of a shared buffer: its own values, the buffer untouched.
    let buf = Arc::new(back);
    let range = SharedValues::range(&buf, 1..3).expect("inside");
    assert_eq!(range.len(), 2);
    assert_eq!(
        range.clone().into_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        [(-0.0f32).to_bits(), 1 << 23]
    );
    assert!(SharedValues::range(&buf, 3..5).is_none(), "past the end");
    assert!(SharedValues::range(&buf, 0..5).is_none(), "longer than the buffer");
    // On the wire it is a sequence of f32, as a Vec<f32> was.
    let config = bincode::config::standard();
    let encoded = bincode::serde::encode_to_vec(&range, config).expect("encodes");
    assert_eq!(encoded, bincode::serde::encode_to_vec(vec![-0.0f32, f32::MIN_POSITIVE], config).expect("encodes"));
    let (decoded, _): (SharedValues, usize) = bincode::serde::decode_from_slice(&encoded, config).expect("decodes");
    assert_eq!(decoded, range);
}

/// `add` into a buffer something else holds: a new buffer with the sums, element by element
/// (across blocks, with the other side read out of wire chunks cut inside values), the held
/// buffer untouched; into a buffer nothing else holds: in place.
#[test]
fn shared_values_add_sums_every_element_once() {
    let n = 2 * super::msg::ADD_BLOCK + 5;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 7.0).collect();
    let b: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * -1.5 + 0.125).collect();
    let expected: Vec<u32> = a.iter().zip(&b).map(|(x, y)| (x + y).to_bits()).collect();
    let bytes: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    let cuts = [0, 7, 4 * super::msg::ADD_BLOCK + 2, bytes.len()];
    let chunks = cuts.windows(2).map(|w| bytes::Bytes::copy_from_slice(&bytes[w[0]..w[1]])).collect();
    let received = SharedValues::from_le(phalanx_transport::LeTensor::from_chunks(chunks).expect("whole values"));

    let held = Arc::new(a.clone());
    let mut sum = SharedValues::range(&held, 0..n).expect("inside");
    assert!(!sum.adds_in_place());
    sum.add(&received);
    assert_eq!(sum.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected);
    assert_eq!(held.as_slice(), a.as_slice(), "the held buffer is not written");

    let mut own = SharedValues::from(a.clone());
    let at = own.as_slice().as_ptr();
    assert!(own.adds_in_place());
    own.add(&SharedValues::from(b));
    assert_eq!(own.as_slice().as_ptr(), at, "in place");
    assert_eq!(own.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected);
}

#[test]
fn trainer_adopts_a_new_generation_and_drops_the_old() {
    let mut t = trainer(vec![0]);
    t.on_params(params(0, 5, 0));
    t.on_params(params(1, 5, 0));
    assert_eq!(t.ready_step(), Some(5));
    // Rollback: generation 1 at step 2.
    assert!(t.on_params(params(0, 2, 1)).is_empty());
    assert_eq!(t.generation(), 1);
    assert_eq!(t.ready_step(), None);
    // A late message of generation 0 changes nothing.
    assert!(t.on_params(params(1, 6, 0)).is_empty());
    let cmds = t.on_params(params(1, 2, 1));
    assert_eq!(t.ready_step(), Some(2));
    assert_eq!(requests(&cmds), vec![(0, 2, BATCH_WINDOW as u32)]);
}

#[test]
fn trainer_rebuilds_an_older_version_when_ranges_disagree() {
    // Range 0 moved on to step 4, range 1 still waits at step 3 (a gradient
    // reached only range 0 before the previous trainer died).
    let mut t = trainer(vec![0]);
    t.on_params(params(0, 4, 0));
    let cmds = t.on_params(params(1, 3, 0));
    assert_eq!(
        cmds,
        vec![TrainerCommand::Send(Addr::Aggregator(0), Msg::ParamsRequest { job: JOB, trainer: 0, step: Some(3) })]
    );
    let cmds = t.on_params(params(0, 3, 0));
    assert_eq!(t.ready_step(), Some(3));
    assert_eq!(requests(&cmds), vec![(0, 3, BATCH_WINDOW as u32)]);
}

#[test]
fn trainer_resends_outstanding_requests_when_a_shard_restarts() {
    let mut t = trainer(vec![0, 1]);
    t.on_params(params(0, 0, 0));
    t.on_params(params(1, 0, 0));
    t.on_batches(vec![batch(1, 0), batch(1, 1)]);
    let cmds = t.on_shard_ready(1);
    assert_eq!(requests(&cmds), vec![(1, 2, BATCH_WINDOW as u32 - 2)], "steps 2.. of partition 1 are still due");
    let cmds = t.on_shard_ready(0);
    assert_eq!(requests(&cmds), vec![(0, 0, BATCH_WINDOW as u32)]);
    assert!(t.on_shard_ready(5).is_empty(), "not this trainer's partition");
}

#[test]
fn a_stalled_trainer_asks_again_and_recomputes_the_step() {
    let mut t = trainer(vec![0]);
    t.on_params(params(0, 0, 0));
    t.on_params(params(1, 0, 0));
    t.on_batch(batch(0, 0));
    t.compute(0, 0).unwrap();
    // The gradient is lost: no new θ arrives.
    for _ in 0..=STALL_TICKS {
        assert!(t.on_tick().is_empty() || t.ready_step().is_none());
    }
    assert_eq!(t.ready_step(), None, "the trainer dropped its state");
    let cmds = t.on_params(params(0, 0, 0));
    assert!(cmds.is_empty());
    let cmds = t.on_params(params(1, 0, 0));
    assert_eq!(requests(&cmds), vec![(0, 0, BATCH_WINDOW as u32)], "recomputes step 0 from a fresh batch");
}

#[test]
fn a_progressing_trainer_never_resyncs() {
    let mut t = trainer(vec![0]);
    for step in 0..10 {
        t.on_params(params(0, step, 0));
        t.on_params(params(1, step, 0));
        for _ in 0..STALL_TICKS - 1 {
            assert!(t.on_tick().is_empty(), "step {step}");
        }
    }
}

// ---------------------------------------------------------------- supervisor

fn plan() -> JobPlan {
    let policy = RestartPolicy { max_restarts: 3, window_ms: 1_000, backoff_initial_ms: 10, backoff_max_ms: 35 };
    JobPlan {
        job: JOB,
        assignment: JobPlan::round_robin(4, 2),
        trainers: 2,
        ranges: vec![(0, 5), (5, 5)],
        schedule: schedule(),
        shard_policy: policy,
        trainer_policy: policy,
        aggregator_policy: policy,
    }
}

#[test]
fn supervisor_backs_off_exponentially_then_escalates_naming_actor_partitions_and_step() {
    let t0 = Instant::now();
    let mut core = JobCore::new(plan(), t0);
    let key = ActorKey::trainer(1);
    let mut delays = Vec::new();
    for i in 0..3 {
        let now = t0 + Duration::from_millis(10 * i);
        let cmds = core.on_child_failed(key, "boom".into(), now);
        let [JobCommand::RestartAfter { delay, .. }] = cmds.as_slice() else { panic!("{cmds:?}") };
        delays.push(delay.as_millis());
        core.on_restart_due(key, None, now);
    }
    assert_eq!(delays, vec![10, 20, 35]);
    let cmds = core.on_child_failed(key, "boom".into(), t0 + Duration::from_millis(40));
    let [JobCommand::Fail(e)] = cmds.as_slice() else { panic!("{cmds:?}") };
    let msg = e.to_string();
    assert!(msg.contains("trainer 1 (partitions 1, 3)") && msg.contains("at step 0") && msg.contains("boom"), "{msg}");
    assert!(core.is_done());
}

#[test]
fn supervisor_forgets_failures_older_than_the_window() {
    let t0 = Instant::now();
    let mut core = JobCore::new(plan(), t0);
    for i in 0..10 {
        let cmds = core.on_child_failed(ActorKey::shard(2), "x".into(), t0 + Duration::from_millis(600 * i));
        assert!(matches!(cmds.as_slice(), [JobCommand::RestartAfter { .. }]), "failure {i}: {cmds:?}");
    }
}

#[test]
fn aggregator_restart_rolls_every_range_back_under_a_new_generation() {
    let t0 = Instant::now();
    let mut core = JobCore::new(plan(), t0);
    core.on_step_applied(0, 0, 1, 2.0, 8, t0);
    core.on_step_applied(1, 0, 1, 2.0, 8, t0);
    assert_eq!(core.global_step(), 1);
    core.on_child_failed(ActorKey::aggregator(1), "panic".into(), t0);
    let cmds = core.on_restart_due(ActorKey::aggregator(1), Some(0), t0 + Duration::from_millis(5));
    assert_eq!(core.generation(), 1);
    assert_eq!(
        cmds,
        vec![
            JobCommand::Send(Addr::Aggregator(0), Msg::Rollback { job: JOB, generation: 1, step: 0 }),
            JobCommand::Spawn { key: ActorKey::aggregator(1), generation: 1, restore: Some(0) },
        ]
    );
    // Old-generation progress is ignored; recovery is measured at the first new step.
    assert!(core.on_step_applied(0, 0, 2, 1.0, 8, t0).is_empty());
    core.on_step_applied(0, 1, 1, 1.0, 8, t0 + Duration::from_millis(20));
    let cmds = core.on_step_applied(1, 1, 1, 1.0, 8, t0 + Duration::from_millis(30));
    assert!(matches!(cmds.as_slice(), [JobCommand::Progress { step: 1, .. }]));
    let f = &core.faults()[0];
    assert_eq!((f.rolled_back_to, f.restart_ms, f.recovery_ms), (Some(0), Some(5), Some(30)));
}

#[test]
fn an_aggregator_still_starting_when_a_rollback_is_ordered_gets_it_once_it_started() {
    // Found by the process campaign with the ranges spread: both hosted ranges' spawns went
    // unanswered at the job's start, so both restarted; the first restart's spawn was still
    // on its way when the second restart's rollback was sent to it, and the host dropped that
    // rollback (no such actor yet). The range then ran one generation behind the others and
    // the job made no progress.
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut core = JobCore::new(plan(), t0);
    let _ = core.start(None);
    let (a0, a1) = (ActorKey::aggregator(0), ActorKey::aggregator(1));
    assert!(core.on_child_started(a0).is_empty(), "started in the generation it was spawned for");
    // Range 1's spawn is unanswered; range 0 fails: rollback to step 0, generation 1, and the
    // rollback sent to range 1 goes to an actor that is not running yet.
    core.on_child_failed(a0, "panic".into(), ms(1));
    let cmds = core.on_restart_due(a0, None, ms(10));
    assert!(cmds.contains(&JobCommand::Send(Addr::Aggregator(1), Msg::Rollback { job: JOB, generation: 1, step: 0 })));
    // Range 1 was spawned under generation 0: once started, it gets generation 1's rollback.
    let rollback_1 =
        |generation| JobCommand::Send(Addr::Aggregator(1), Msg::Rollback { job: JOB, generation, step: 0 });
    assert_eq!(core.on_child_started(a1), vec![rollback_1(1)]);
    // Both restart (their spawns timed out); range 0's restart comes second, so range 1's new
    // instance (spawned under generation 2) misses generation 3's rollback until it started.
    core.on_child_lost(a1, FaultCause::SpawnTimeout, "no answer".into(), ms(20));
    core.on_child_lost(a0, FaultCause::SpawnTimeout, "no answer".into(), ms(20));
    let cmds = core.on_restart_due(a1, Some(0), ms(30));
    assert!(cmds.contains(&JobCommand::Spawn { key: a1, generation: 2, restore: Some(0) }), "{cmds:?}");
    let cmds = core.on_restart_due(a0, Some(0), ms(30));
    assert!(cmds.contains(&rollback_1(3)), "{cmds:?}");
    assert!(cmds.contains(&JobCommand::Spawn { key: a0, generation: 3, restore: Some(0) }), "{cmds:?}");
    assert!(core.on_child_started(a0).is_empty(), "spawned under the current generation");
    assert_eq!(core.on_child_started(a1), vec![rollback_1(3)]);
}

#[test]
fn the_first_step_after_failures_is_one_recovery_per_cause_timed_from_its_first_failure() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut core = JobCore::new(plan(), t0);
    let lost = || "node 2 lost".to_string();
    core.on_child_lost(ActorKey::trainer(1), FaultCause::NodeLost, lost(), ms(0));
    core.on_child_lost(ActorKey::shard(1), FaultCause::NodeLost, lost(), ms(1));
    core.on_child_failed(ActorKey::trainer(0), "panic".into(), ms(2));
    assert_eq!(core.restart_cause(ActorKey::trainer(1)), Some(FaultCause::NodeLost));
    assert_eq!(core.restart_cause(ActorKey::trainer(0)), Some(FaultCause::ActorFailed));
    assert_eq!(core.restart_cause(ActorKey::shard(0)), None, "shard 0 did not fail");
    for key in [ActorKey::trainer(1), ActorKey::shard(1), ActorKey::trainer(0)] {
        core.on_restart_due(key, None, ms(10));
    }
    assert_eq!(core.restart_cause(ActorKey::trainer(1)), None, "restarted");
    let causes: Vec<FaultCause> = core.faults().iter().map(|f| f.cause).collect();
    assert_eq!(causes, [FaultCause::NodeLost, FaultCause::NodeLost, FaultCause::ActorFailed]);

    // Step 1 is applied once both ranges applied it: that step recovers all three.
    assert!(core.on_step_applied(0, 0, 1, 1.0, 8, ms(30)).is_empty());
    let cmds = core.on_step_applied(1, 0, 1, 1.0, 8, ms(40));
    let [JobCommand::Progress { step: 1, recovered, .. }] = cmds.as_slice() else { panic!("{cmds:?}") };
    let expected = vec![
        Recovery {
            cause: FaultCause::NodeLost,
            actors: vec![ActorKey::trainer(1), ActorKey::shard(1)],
            duration: Duration::from_millis(40),
        },
        Recovery {
            cause: FaultCause::ActorFailed,
            actors: vec![ActorKey::trainer(0)],
            duration: Duration::from_millis(38),
        },
    ];
    assert_eq!(recovered, &expected);
    // The next step recovers from nothing.
    core.on_step_applied(0, 0, 2, 1.0, 8, ms(50));
    let cmds = core.on_step_applied(1, 0, 2, 1.0, 8, ms(60));
    let [JobCommand::Progress { step: 2, recovered, .. }] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert!(recovered.is_empty());
}

/// Both ranges report the job's last step applied.
fn apply_the_last_step(core: &mut JobCore) {
    let total = plan().schedule.total_steps();
    for range in 0..2 {
        core.on_step_applied(range, 0, total, 1.0, 8, Instant::now());
    }
}

#[test]
fn supervisor_completes_when_every_range_finished_and_checks_the_ledgers() {
    let mut core = JobCore::new(plan(), Instant::now());
    apply_the_last_step(&mut core);
    let ledger: Ledger = [(0, vec![4, 4, 4, 4])].into_iter().collect();
    assert!(core.on_finished(1, 0, 5, vec![2.0; 5], ledger.clone()).is_empty());
    let cmds = core.on_finished(0, 0, 0, vec![1.0; 5], ledger.clone());
    let [JobCommand::Complete { params, ledger: l }] = cmds.as_slice() else { panic!("{cmds:?}") };
    assert_eq!(params, &[1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
    assert_eq!(l, &ledger);

    let mut core = JobCore::new(plan(), Instant::now());
    apply_the_last_step(&mut core);
    core.on_finished(0, 0, 0, vec![1.0; 5], ledger);
    let cmds = core.on_finished(1, 0, 5, vec![2.0; 5], [(0, vec![4, 4, 4, 3])].into_iter().collect());
    assert!(matches!(cmds.as_slice(), [JobCommand::Fail(JobError::LedgerMismatch { range: 1 })]));
}

/// A remote range's final values travel on another stream than its step reports and can
/// overtake its last one: the job completes only once the last step was reported too, and
/// that step's progress goes out before the outcome (seen in the bench: the history missed
/// its last row).
#[test]
fn final_values_that_overtake_the_last_step_report_wait_for_it() {
    let total = plan().schedule.total_steps();
    let mut core = JobCore::new(plan(), Instant::now());
    let ledger: Ledger = [(0, vec![4, 4, 4, 4])].into_iter().collect();
    for step in 1..total {
        for range in 0..2 {
            core.on_step_applied(range, 0, step, 1.0, 8, Instant::now());
        }
    }
    core.on_step_applied(0, 0, total, 1.0, 8, Instant::now());
    assert!(core.on_finished(0, 0, 0, vec![1.0; 5], ledger.clone()).is_empty());
    assert!(core.on_finished(1, 0, 5, vec![2.0; 5], ledger.clone()).is_empty(), "range 1's last step is not in");
    let cmds = core.on_step_applied(1, 0, total, 1.0, 8, Instant::now());
    let [JobCommand::Progress { step, .. }, JobCommand::Complete { params, .. }] = cmds.as_slice() else {
        panic!("{cmds:?}")
    };
    assert_eq!(*step, total);
    assert_eq!(params, &[1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
    // Nothing after the outcome.
    assert!(core.on_step_applied(1, 0, total, 1.0, 8, Instant::now()).is_empty());
}

#[test]
fn a_new_shard_is_announced_to_the_trainer_owning_its_partition() {
    let mut core = JobCore::new(plan(), Instant::now());
    let cmds = core.on_child_started(ActorKey::shard(3));
    assert_eq!(cmds, vec![JobCommand::Send(Addr::Trainer(1), Msg::ShardReady { job: JOB, partition: 3 })]);
    assert!(core.on_child_started(ActorKey::trainer(0)).is_empty());
}

#[test]
fn a_range_reporting_out_of_order_loses_no_step_record() {
    // Ranges on other nodes report over separate streams: range 1's step 1 comes after its
    // step 2 (or is overtaken for good). The global step then moves from 0 to 2 at once, and
    // steps 1 and 2 both get their record, each with its own loss.
    let t0 = Instant::now();
    let mut core = JobCore::new(plan(), t0);
    assert!(core.on_step_applied(0, 0, 1, 8.0, 8, t0).is_empty());
    assert!(core.on_step_applied(0, 0, 2, 4.0, 8, t0).is_empty());
    let cmds = core.on_step_applied(1, 0, 2, 4.0, 8, t0);
    let steps: Vec<(u64, f64)> = cmds
        .iter()
        .map(|c| match c {
            JobCommand::Progress { step, loss, .. } => (*step, *loss),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(steps, vec![(1, 1.0), (2, 0.5)]);
    assert_eq!(core.global_step(), 2);
    assert_eq!(core.losses().to_map().keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    // The late step 1 of range 1 moves nothing.
    assert!(core.on_step_applied(1, 0, 1, 8.0, 8, t0).is_empty());
}
