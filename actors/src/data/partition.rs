//! The job's fixed partitions of the training rows and the batch each feeds at every step.
//!
//! ```text
//!  train rows 0..n ──shuffle(derive_seed(ASSIGN, [seed]))──▶ [ p0 | p1 | … | pP-1 ]   contiguous
//!  partition p, epoch e ──shuffle(derive_seed(EPOCH, [seed, p, e]))──▶ perm (length m)
//!  step k of S ──▶ perm[k·m/S .. (k+1)·m/S]
//! ```
//!
//! Only `(seed, p, epoch, step)` and the job's fixed `(n, P, B)` decide a batch, so any node can
//! replay any batch, and over an epoch each partition's batches cover it exactly once.

use serde::{Deserialize, Serialize};

use super::{check_row_count, derive_seed, seeded_shuffle, DataError};

/// Domain tag of the row-to-partition shuffle in [`derive_seed`]: ASCII `phx.part`.
const ASSIGN_DOMAIN: u64 = u64::from_be_bytes(*b"phx.part");
/// Domain tag of the per-epoch shuffles in [`derive_seed`]: ASCII `phx.epch`.
const EPOCH_DOMAIN: u64 = u64::from_be_bytes(*b"phx.epch");

/// The seed of partition `p`'s shuffle in `epoch`.
fn epoch_seed(seed: u64, partition: u32, epoch: u32) -> u64 {
    derive_seed(EPOCH_DOMAIN, &[seed, u64::from(partition), u64::from(epoch)])
}

/// Chunk `step` of `steps` of a permutation of length `m`: `perm[step·m/S .. (step+1)·m/S]`.
fn chunk_of(permutation: &[u32], step: u32, steps: u32) -> Result<&[u32], DataError> {
    if step >= steps {
        return Err(DataError::StepOutOfRange { step, steps });
    }
    // u128 so that no slice length and step count can overflow; both bounds are <= m.
    let m = permutation.len() as u128;
    let bound = |k: u32| (u128::from(k) * m / u128::from(steps)) as usize;
    Ok(&permutation[bound(step)..bound(step + 1)])
}

/// The job's fixed split of the training rows into `P` partitions.
///
/// Built by [`Partitions::new`]: the rows `0..n` are shuffled once with the seed and partition
/// `p` gets the contiguous block `[p·n/P, (p+1)·n/P)` of that order, so sizes differ by at most
/// one. Each epoch, partition `p` shuffles its rows with a ChaCha8 stream seeded by
/// `derive_seed(EPOCH_DOMAIN, [seed, p, epoch])` (see [`super::derive_seed`]; the domain is
/// ASCII `phx.epch` as a big-endian `u64`) and feeds chunk `k` of that permutation at step `k`.
///
/// ```
/// use phalanx_actors::data::Partitions;
/// let parts = Partitions::new(10, 3, 4, 99)?;
/// assert_eq!(parts.sizes(), vec![3, 3, 4]);
/// assert_eq!(parts.steps_per_epoch, 3); // ceil(10 / 4), capped at the smallest partition
/// let mut seen: Vec<u32> = (0..parts.steps_per_epoch)
///     .flat_map(|step| parts.batch(1, 0, step).unwrap_or_default())
///     .collect();
/// seen.sort_unstable();
/// let mut rows = parts.indices[1].clone();
/// rows.sort_unstable();
/// assert_eq!(seen, rows); // epoch 0 of partition 1 feeds each of its rows once
/// # Ok::<(), phalanx_actors::data::DataError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partitions {
    /// The job seed.
    pub seed: u64,
    /// Per partition, its row indices into the training table.
    pub indices: Vec<Vec<u32>>,
    /// Steps in one epoch: `ceil(n / batch_size)` capped at the smallest partition's size.
    pub steps_per_epoch: u32,
}

impl Partitions {
    /// Splits `n_train` training rows into `partitions` partitions for a global batch size.
    ///
    /// Steps per epoch are `ceil(n_train / batch_size)`, but at most the smallest partition's
    /// size so that no partition ever feeds an empty batch (a batch larger than `n_train / S`
    /// rows per step then results). Fails when `partitions` or `batch_size` is 0, or when there
    /// are more partitions than rows.
    pub fn new(n_train: usize, partitions: u32, batch_size: u32, seed: u64) -> Result<Self, DataError> {
        if partitions == 0 {
            return Err(DataError::ZeroPartitions);
        }
        if batch_size == 0 {
            return Err(DataError::ZeroBatchSize);
        }
        check_row_count(n_train)?;
        if partitions as usize > n_train {
            return Err(DataError::MorePartitionsThanRows { partitions, rows: n_train });
        }
        // `n_train` fits u32 (checked above), so every index does.
        let mut order: Vec<u32> = (0..n_train).map(|i| i as u32).collect();
        seeded_shuffle(derive_seed(ASSIGN_DOMAIN, &[seed]), &mut order);
        let (n, parts) = (n_train as u64, u64::from(partitions));
        let bound = |p: u64| (p * n / parts) as usize;
        let indices = (0..parts).map(|p| order[bound(p)..bound(p + 1)].to_vec()).collect();
        // The smallest block has floor(n / P) >= 1 rows; S <= n fits u32.
        let steps = n.div_ceil(u64::from(batch_size)).min(n / parts);
        Ok(Self { seed, indices, steps_per_epoch: steps as u32 })
    }

    /// The number of partitions `P`.
    pub fn count(&self) -> u32 {
        u32::try_from(self.indices.len()).unwrap_or(u32::MAX)
    }

    /// Each partition's number of rows.
    pub fn sizes(&self) -> Vec<u64> {
        self.indices.iter().map(|rows| rows.len() as u64).collect()
    }

    /// Partition `p`'s number of rows; 0 for a partition that does not exist.
    pub fn len_of(&self, p: u32) -> usize {
        self.indices.get(p as usize).map_or(0, Vec::len)
    }

    /// The total number of rows over all partitions.
    pub fn total_rows(&self) -> usize {
        self.indices.iter().map(Vec::len).sum()
    }

    /// Partition `p`'s rows in their fixed (not per-epoch) order.
    pub fn rows_of(&self, p: u32) -> Result<&[u32], DataError> {
        self.indices
            .get(p as usize)
            .map(Vec::as_slice)
            .ok_or(DataError::PartitionOutOfRange { partition: p, partitions: self.count() })
    }

    fn check_step(&self, step: u32) -> Result<(), DataError> {
        if step >= self.steps_per_epoch {
            return Err(DataError::StepOutOfRange { step, steps: self.steps_per_epoch });
        }
        Ok(())
    }

    /// Row indices partition `p` feeds at `(epoch, step_in_epoch)`.
    ///
    /// A pure function of the partitions and its arguments; over one epoch the batches of `p`
    /// are disjoint and cover `p` exactly once. This shuffles the whole partition on every
    /// call: a shard feeding step after step should use a [`PartitionFeed`] instead.
    pub fn batch(&self, p: u32, epoch: u32, step_in_epoch: u32) -> Result<Vec<u32>, DataError> {
        self.check_step(step_in_epoch)?;
        let permutation = self.epoch_permutation(p, epoch)?;
        Ok(self.chunk(&permutation, step_in_epoch)?.to_vec())
    }

    /// Partition `p`'s rows in the order it feeds them in `epoch`; [`Partitions::chunk`] cuts
    /// it into the epoch's batches.
    pub fn epoch_permutation(&self, p: u32, epoch: u32) -> Result<Vec<u32>, DataError> {
        let mut permutation = self.rows_of(p)?.to_vec();
        seeded_shuffle(epoch_seed(self.seed, p, epoch), &mut permutation);
        Ok(permutation)
    }

    /// Batch `step_in_epoch` of an epoch permutation of length `m`:
    /// `permutation[k·m/S .. (k+1)·m/S]` with `S` = [`Partitions::steps_per_epoch`].
    pub fn chunk<'a>(&self, permutation: &'a [u32], step_in_epoch: u32) -> Result<&'a [u32], DataError> {
        chunk_of(permutation, step_in_epoch, self.steps_per_epoch)
    }

    /// A feeder for partition `p` that shuffles once per epoch.
    pub fn feed(&self, p: u32) -> Result<PartitionFeed, DataError> {
        Ok(PartitionFeed {
            seed: self.seed,
            partition: p,
            steps_per_epoch: self.steps_per_epoch,
            rows: self.rows_of(p)?.to_vec(),
            epoch: None,
            permutation: Vec::new(),
        })
    }

    /// Checks the invariants [`Partitions::new`] guarantees, for partitions that came from a
    /// checkpoint or the wire, against a training table of `n_rows` rows: at least one
    /// partition, the partitions together hold every row exactly once, and
    /// `1 <= steps_per_epoch <= ` the smallest partition's size.
    pub fn validate(&self, n_rows: usize) -> Result<(), DataError> {
        let inconsistent = |reason: String| Err(DataError::InconsistentPartitions { reason });
        if self.indices.is_empty() {
            return inconsistent("no partitions".to_owned());
        }
        if self.indices.len() > u32::MAX as usize {
            return inconsistent(format!("{} partitions exceed u32", self.indices.len()));
        }
        let smallest = self.indices.iter().map(Vec::len).min().unwrap_or(0);
        if self.steps_per_epoch == 0 || self.steps_per_epoch as usize > smallest {
            return inconsistent(format!(
                "{} steps per epoch with a smallest partition of {smallest} rows",
                self.steps_per_epoch
            ));
        }
        if self.total_rows() != n_rows {
            return inconsistent(format!("partitions hold {} rows, the table has {n_rows}", self.total_rows()));
        }
        let mut seen = vec![false; n_rows];
        for (p, rows) in self.indices.iter().enumerate() {
            for &row in rows {
                match seen.get_mut(row as usize) {
                    None => return Err(DataError::RowOutOfRange { index: row, rows: n_rows }),
                    Some(true) => return inconsistent(format!("row {row} appears twice (again in {p})")),
                    Some(slot) => *slot = true,
                }
            }
        }
        Ok(())
    }
}

/// Feeds one partition's batches step after step, shuffling once per epoch.
///
/// Gives exactly what [`Partitions::batch`] gives for the same arguments, in any call order; it
/// only caches the current epoch's permutation.
///
/// ```
/// use phalanx_actors::data::Partitions;
/// let parts = Partitions::new(1000, 4, 64, 3)?;
/// let mut feed = parts.feed(2)?;
/// for step in 0..parts.steps_per_epoch {
///     assert_eq!(feed.batch(5, step)?, parts.batch(2, 5, step)?.as_slice());
/// }
/// # Ok::<(), phalanx_actors::data::DataError>(())
/// ```
#[derive(Clone, Debug)]
pub struct PartitionFeed {
    seed: u64,
    partition: u32,
    steps_per_epoch: u32,
    rows: Vec<u32>,
    epoch: Option<u32>,
    permutation: Vec<u32>,
}

impl PartitionFeed {
    /// The partition this feeds.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Steps in one epoch.
    pub fn steps_per_epoch(&self) -> u32 {
        self.steps_per_epoch
    }

    /// The partition's number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the partition has no rows (never, for partitions from [`Partitions::new`]).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row indices the partition feeds at `(epoch, step_in_epoch)`.
    pub fn batch(&mut self, epoch: u32, step_in_epoch: u32) -> Result<&[u32], DataError> {
        if step_in_epoch >= self.steps_per_epoch {
            return Err(DataError::StepOutOfRange { step: step_in_epoch, steps: self.steps_per_epoch });
        }
        if self.epoch != Some(epoch) {
            self.permutation.clear();
            self.permutation.extend_from_slice(&self.rows);
            seeded_shuffle(epoch_seed(self.seed, self.partition, epoch), &mut self.permutation);
            self.epoch = Some(epoch);
        }
        chunk_of(&self.permutation, step_in_epoch, self.steps_per_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    /// Every batch of partition `p` in `epoch`, step by step.
    fn epoch_batches(parts: &Partitions, p: u32, epoch: u32) -> Vec<Vec<u32>> {
        (0..parts.steps_per_epoch).map(|step| parts.batch(p, epoch, step).expect("valid step")).collect()
    }

    #[test]
    fn partitions_steps_per_epoch_is_ceil_n_over_b_capped_at_smallest_partition() {
        let steps = |n, p, b| Partitions::new(n, p, b, 0).map(|x| x.steps_per_epoch).ok();
        assert_eq!(steps(100, 4, 10), Some(10));
        assert_eq!(steps(101, 4, 10), Some(11));
        assert_eq!(steps(100, 4, 1), Some(25)); // capped at 100 / 4
        assert_eq!(steps(10, 3, 1), Some(3)); // sizes 3, 3, 4
        assert_eq!(steps(5, 5, 1000), Some(1));
    }

    #[test]
    fn partitions_reject_bad_arguments_naming_the_values() {
        assert!(matches!(Partitions::new(10, 0, 1, 0), Err(DataError::ZeroPartitions)));
        assert!(matches!(Partitions::new(10, 1, 0, 0), Err(DataError::ZeroBatchSize)));
        let err = Partitions::new(3, 4, 1, 0).expect_err("too many partitions");
        assert!(matches!(err, DataError::MorePartitionsThanRows { partitions: 4, rows: 3 }));
        assert!(err.to_string().contains('4') && err.to_string().contains('3'), "{err}");
        assert!(matches!(Partitions::new(0, 1, 1, 0), Err(DataError::MorePartitionsThanRows { .. })));

        let parts = Partitions::new(20, 2, 5, 0).expect("valid");
        let err = parts.batch(2, 0, 0).expect_err("no partition 2");
        assert!(matches!(err, DataError::PartitionOutOfRange { partition: 2, partitions: 2 }));
        assert!(err.to_string().contains("partition 2"), "{err}");
        let err = parts.batch(0, 0, 4).expect_err("only 4 steps");
        assert!(matches!(err, DataError::StepOutOfRange { step: 4, steps: 4 }));
        assert!(err.to_string().contains("step 4"), "{err}");
        assert!(parts.epoch_permutation(7, 0).is_err());
        assert!(parts.chunk(&[1, 2, 3], 4).is_err());
        assert!(parts.feed(2).is_err());
        assert_eq!(parts.len_of(2), 0);
    }

    #[test]
    fn partitions_batch_is_pure() {
        let parts = Partitions::new(1000, 7, 50, 11).expect("valid");
        let first = parts.batch(3, 2, 5).expect("valid");
        // Other calls in between change nothing.
        let _ = epoch_batches(&parts, 4, 9);
        assert_eq!(parts.batch(3, 2, 5).expect("valid"), first);
        // A recomputed (restarted, other node) Partitions is equal and feeds the same rows.
        let again = Partitions::new(1000, 7, 50, 11).expect("valid");
        assert_eq!(again, parts);
        assert_eq!(again.batch(3, 2, 5).expect("valid"), first);
        // So does a feeder that has been used for another epoch first.
        let mut feed = again.feed(3).expect("valid");
        let _ = feed.batch(1, 0).expect("valid");
        assert_eq!(feed.batch(2, 5).expect("valid"), first.as_slice());
    }

    #[test]
    fn partitions_batch_depends_only_on_seed_p_epoch_and_step() {
        let parts = Partitions::new(600, 6, 60, 5).expect("valid");
        let table: Vec<Vec<Vec<u32>>> =
            (0..6).map(|p| (0..3).map(|e| sorted(parts.epoch_permutation(p, e).expect("p"))).collect()).collect();
        // Each (p, epoch) permutation holds exactly the partition's rows…
        for (p, per_epoch) in table.iter().enumerate() {
            for perm in per_epoch {
                assert_eq!(perm, &sorted(parts.indices[p].clone()));
            }
        }
        // …and a batch queried in any order, by any feeder, is the same.
        let mut feeds: Vec<PartitionFeed> = (0..6).map(|p| parts.feed(p).expect("p")).collect();
        for (p, epoch, step) in [(5, 2, 9), (0, 0, 0), (5, 0, 9), (2, 1, 3), (5, 2, 9), (2, 1, 0)] {
            let want = parts.batch(p, epoch, step).expect("valid");
            let got = feeds[p as usize].batch(epoch, step).expect("valid").to_vec();
            assert_eq!(got, want, "p {p} epoch {epoch} step {step}");
        }
        // A different seed gives a different job.
        let other = Partitions::new(600, 6, 60, 6).expect("valid");
        assert_ne!(other.batch(0, 0, 0).ok(), parts.batch(0, 0, 0).ok());
    }

    #[test]
    fn partitions_different_epochs_give_different_orders() {
        let parts = Partitions::new(1000, 4, 100, 1).expect("valid");
        for p in 0..4 {
            let orders: Vec<Vec<u32>> = (0..5).map(|e| parts.epoch_permutation(p, e).expect("p")).collect();
            for a in 0..orders.len() {
                for b in a + 1..orders.len() {
                    assert_ne!(orders[a], orders[b], "partition {p} epochs {a} and {b}");
                }
            }
        }
        // Partitions with equal rows in the same epoch still shuffle differently.
        assert_ne!(parts.epoch_permutation(0, 0).ok().map(sorted), parts.epoch_permutation(1, 0).ok().map(sorted));
    }

    #[test]
    fn partitions_global_step_takes_about_the_batch_size() {
        let parts = Partitions::new(1003, 4, 100, 2).expect("valid");
        assert_eq!(parts.steps_per_epoch, 11);
        let mut total = 0;
        for step in 0..parts.steps_per_epoch {
            let rows: usize = (0..4).map(|p| parts.batch(p, 0, step).map_or(0, |b| b.len())).sum();
            assert!((88..=96).contains(&rows), "step {step}: {rows} rows");
            total += rows;
        }
        assert_eq!(total, 1003);
    }

    #[test]
    fn partitions_are_pinned() {
        // Pins the exact assignment and epoch order so that a change of mixing, shuffle or
        // rand_chacha (which would break resuming old checkpoints) fails loudly.
        let parts = Partitions::new(10, 2, 2, 42).expect("valid");
        assert_eq!(parts.indices, PINNED_INDICES.map(|p| p.to_vec()).to_vec());
        assert_eq!(parts.epoch_permutation(1, 3).ok(), Some(PINNED_EPOCH_3.to_vec()));
        assert_eq!(parts.batch(1, 3, 1).ok(), Some(PINNED_EPOCH_3[1..2].to_vec()));
    }

    /// `Partitions::new(10, 2, 2, 42).indices`, recorded when the algorithm was written.
    const PINNED_INDICES: [[u32; 5]; 2] = [[9, 7, 3, 1, 4], [2, 0, 8, 6, 5]];
    /// `Partitions::new(10, 2, 2, 42).epoch_permutation(1, 3)`, recorded likewise.
    const PINNED_EPOCH_3: [u32; 5] = [2, 8, 5, 6, 0];

    #[test]
    fn partitions_validate_accepts_new_and_rejects_tampered() {
        let parts = Partitions::new(50, 3, 8, 4).expect("valid");
        assert!(parts.validate(50).is_ok());
        assert!(parts.validate(51).is_err());

        let mut dup = parts.clone();
        dup.indices[0][0] = dup.indices[1][0];
        assert!(matches!(dup.validate(50), Err(DataError::InconsistentPartitions { .. })));

        let mut outside = parts.clone();
        outside.indices[2][0] = 50;
        assert!(matches!(outside.validate(50), Err(DataError::RowOutOfRange { index: 50, rows: 50 })));

        let mut steps = parts.clone();
        steps.steps_per_epoch = 17;
        assert!(steps.validate(50).is_err());
        steps.steps_per_epoch = 0;
        assert!(steps.validate(50).is_err());
        // Broken partitions never panic when asked for batches.
        assert!(steps.batch(0, 0, 0).is_err());

        let none = Partitions { seed: 0, indices: vec![], steps_per_epoch: 1 };
        assert!(none.validate(0).is_err());
        assert!(none.batch(0, 0, 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn partitions_sizes_differ_by_at_most_one_and_cover_all_rows_once(
            n in 1usize..3000,
            p_frac in 0.0f64..1.0,
            batch in 1u32..5000,
            seed in any::<u64>(),
        ) {
            let p = 1 + ((n.min(64) - 1) as f64 * p_frac) as u32;
            let parts = Partitions::new(n, p, batch, seed).expect("valid arguments");
            prop_assert_eq!(parts.count(), p);
            let sizes = parts.sizes();
            let (lo, hi) = (sizes.iter().min().copied(), sizes.iter().max().copied());
            prop_assert!(matches!((lo, hi), (Some(lo), Some(hi)) if hi - lo <= 1));
            prop_assert!(parts.steps_per_epoch >= 1);
            prop_assert!(u64::from(parts.steps_per_epoch) <= lo.unwrap_or(0));
            let all = sorted(parts.indices.concat());
            prop_assert_eq!(all, (0..n as u32).collect::<Vec<_>>());
            prop_assert!(parts.validate(n).is_ok());
        }

        #[test]
        fn partitions_epoch_chunks_are_disjoint_nonempty_and_cover_each_partition_once(
            n in 1usize..1500,
            p_frac in 0.0f64..1.0,
            batch in 1u32..2000,
            seed in any::<u64>(),
            epoch in any::<u32>(),
        ) {
            let p = 1 + ((n.min(32) - 1) as f64 * p_frac) as u32;
            let parts = Partitions::new(n, p, batch, seed).expect("valid arguments");
            for part in 0..p {
                let batches = epoch_batches(&parts, part, epoch);
                prop_assert!(batches.iter().all(|b| !b.is_empty()));
                let fed = sorted(batches.concat());
                // Sorting then comparing with the sorted partition: disjoint and covering.
                prop_assert_eq!(fed, sorted(parts.indices[part as usize].clone()));
            }
        }
    }
}
