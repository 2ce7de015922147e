//! The exactly-once ledger: samples applied per partition, per epoch.
//!
//! An aggregator counts the samples every partition contributes to the
//! steps it applies. While an epoch is being applied its row stays open;
//! once its last step is applied, the row can no longer change (steps are
//! applied in order), so it is compared with the partition sizes and folded
//! into [`ClosedEpochs`]: counts, totals, and the first epoch that was not
//! applied exactly once, with its row. The ledger therefore stays the same
//! size whatever the number of epochs, and the check is as strict as
//! comparing every row at the end: every epoch is compared, only earlier.
//!
//! ```text
//!  apply step s of epoch e ──▶ open[e][p] += samples(p)
//!  s was the last step of e ──▶ open[e] == sizes ? exact += 1 : first_inexact.get_or_insert((e, open[e]))
//!                               lost/duplicated += |open[e][p] - sizes[p]|, open[e] removed
//! ```
//!
//! The ledger is checkpointed with the parameters, so a rollback rolls the
//! folded counts back too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Finished epochs of a [`Ledger`], folded into counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosedEpochs {
    /// Epochs folded.
    pub epochs: u64,
    /// Of those, epochs in which every partition applied exactly its size.
    pub exact: u64,
    /// Samples applied per partition, summed over the folded epochs.
    pub per_partition: Vec<u64>,
    /// Samples a partition applied fewer than its size, summed over epochs and partitions.
    pub lost: u64,
    /// Samples a partition applied more than its size, summed over epochs and partitions.
    pub duplicated: u64,
    /// The first folded epoch that was not applied exactly once, and what its
    /// partitions applied.
    pub first_inexact: Option<(u64, Vec<u64>)>,
}

/// Samples applied per partition: open epochs row by row, finished epochs
/// folded (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Epochs still being applied: epoch → samples applied per partition so far.
    pub open: BTreeMap<u64, Vec<u64>>,
    /// Finished epochs.
    pub closed: ClosedEpochs,
}

impl FromIterator<(u64, Vec<u64>)> for Ledger {
    /// A ledger whose epochs are all open (not folded yet).
    fn from_iter<I: IntoIterator<Item = (u64, Vec<u64>)>>(rows: I) -> Self {
        Self { open: rows.into_iter().collect(), closed: ClosedEpochs::default() }
    }
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count `samples` applied for partition `p` (of `partitions`) in
    /// `epoch`; returns the partition's count in that epoch so far.
    pub fn add(&mut self, epoch: u64, partitions: usize, p: usize, samples: u64) -> u64 {
        let row = self.open.entry(epoch).or_insert_with(|| vec![0; partitions]);
        if row.len() <= p {
            row.resize(p + 1, 0);
        }
        // Saturating: a ledger restored from a checkpoint copy holds numbers from
        // another node; an absurd count must show as duplicated, not overflow.
        row[p] = row[p].saturating_add(samples);
        row[p]
    }

    /// Fold `epoch` into the closed counts, comparing what each partition
    /// applied with `sizes`. An epoch with no row applied nothing.
    pub fn close(&mut self, epoch: u64, sizes: &[u64]) {
        let row = self.open.remove(&epoch).unwrap_or_else(|| vec![0; sizes.len()]);
        let c = &mut self.closed;
        c.epochs = c.epochs.saturating_add(1);
        if c.per_partition.len() < row.len().max(sizes.len()) {
            c.per_partition.resize(row.len().max(sizes.len()), 0);
        }
        let mut exact = row.len() == sizes.len();
        for p in 0..row.len().max(sizes.len()) {
            let got = row.get(p).copied().unwrap_or(0);
            let want = sizes.get(p).copied().unwrap_or(0);
            c.per_partition[p] = c.per_partition[p].saturating_add(got);
            c.lost = c.lost.saturating_add(want.saturating_sub(got));
            c.duplicated = c.duplicated.saturating_add(got.saturating_sub(want));
            exact &= got == want;
        }
        if exact {
            c.exact = c.exact.saturating_add(1);
        } else if c.first_inexact.is_none() {
            c.first_inexact = Some((epoch, row));
        }
    }

    /// Fold every open epoch before `epoch` (a state restored from an older
    /// checkpoint may still hold finished epochs as rows).
    pub fn close_before(&mut self, epoch: u64, sizes: &[u64]) {
        let finished: Vec<u64> = self.open.range(..epoch).map(|(e, _)| *e).collect();
        for e in finished {
            self.close(e, sizes);
        }
    }

    /// Epochs the ledger has seen: folded and open.
    pub fn epochs(&self) -> u64 {
        self.closed.epochs.saturating_add(self.open.len() as u64)
    }

    /// The first epoch not applied exactly once against `sizes`, with its
    /// row: the first folded one, or an open one (an open epoch at the end of
    /// a job was not finished).
    pub fn first_inexact(&self, sizes: &[u64]) -> Option<(u64, Vec<u64>)> {
        let open = self.open.iter().find(|(_, row)| row.as_slice() != sizes).map(|(e, row)| (*e, row.clone()));
        match (&self.closed.first_inexact, open) {
            (Some(closed), Some(open)) => Some(if closed.0 <= open.0 { closed.clone() } else { open }),
            (Some(closed), None) => Some(closed.clone()),
            (None, open) => open,
        }
    }

    /// Every partition applied exactly `sizes` in each of `epochs` epochs,
    /// and nothing else was applied.
    pub fn is_exact(&self, sizes: &[u64], epochs: u64) -> bool {
        let open_exact = self.open.values().filter(|row| row.as_slice() == sizes).count() as u64;
        self.epochs() == epochs && self.closed.exact.saturating_add(open_exact) == epochs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_epochs_fold_into_counts_and_keep_the_first_inexact_row() {
        let sizes = [3, 2];
        let mut l = Ledger::new();
        for (epoch, row) in [(0, [3, 2]), (1, [3, 3]), (2, [3, 2]), (3, [1, 2])] {
            for (p, n) in row.iter().enumerate() {
                l.add(epoch, 2, p, *n);
            }
            l.close(epoch, &sizes);
        }
        assert!(l.open.is_empty());
        let c = &l.closed;
        assert_eq!((c.epochs, c.exact, c.lost, c.duplicated), (4, 2, 2, 1));
        assert_eq!(c.per_partition, vec![10, 9]);
        assert_eq!(c.first_inexact, Some((1, vec![3, 3])));
        assert!(!l.is_exact(&sizes, 4));
        assert_eq!(l.first_inexact(&sizes), Some((1, vec![3, 3])));
    }

    #[test]
    fn an_exact_ledger_is_exact_only_for_the_right_number_of_epochs() {
        let sizes = [2, 2];
        let mut l: Ledger = [(0, vec![2, 2]), (1, vec![2, 2]), (2, vec![2, 1])].into_iter().collect();
        l.close_before(2, &sizes);
        assert_eq!((l.closed.epochs, l.closed.exact, l.open.len()), (2, 2, 1));
        assert!(!l.is_exact(&sizes, 3), "the open epoch is short");
        assert_eq!(l.first_inexact(&sizes), Some((2, vec![2, 1])));
        l.add(2, 2, 1, 1);
        l.close(2, &sizes);
        assert!(l.is_exact(&sizes, 3));
        assert!(!l.is_exact(&sizes, 4), "an epoch never applied");
        assert_eq!(l.first_inexact(&sizes), None);
    }

    #[test]
    fn the_ledger_does_not_grow_with_epochs() {
        let sizes = [5; 8];
        let mut l = Ledger::new();
        for epoch in 0..10_000 {
            for p in 0..8 {
                l.add(epoch, 8, p, 5);
            }
            l.close(epoch, &sizes);
        }
        assert_eq!(l.open.len(), 0);
        assert!(l.is_exact(&sizes, 10_000));
        assert!(serde_json::to_string(&l).unwrap().len() < 200);
    }
}
