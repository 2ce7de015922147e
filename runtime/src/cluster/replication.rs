//! How many copies of each checkpoint the replicas acknowledged (sans-IO).
//!
//! The node that writes a checkpoint file (the host of its range) copies it
//! to the coordinator and the replicas (see
//! [`Placement::replicas`](super::placement::Placement::replicas)) off the
//! step's critical path, and tells the coordinator; each receiver stores and
//! verifies the file and acknowledges it to the coordinator, which keeps this
//! record. A checkpoint step counts as **replicated** once every file
//! of it was acknowledged by as many replicas as the cluster asks for. The
//! newest replicated step is what survives the coordinator and its replicas
//! but one dying together; `summary.json` reports it, and says so when a
//! checkpoint had fewer copies (fewer live nodes than replicas, or a copy
//! lost with its replica).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// Files tracked at most (the newest by step are kept): a bound on memory
/// however long the job runs.
pub const MAX_TRACKED_FILES: usize = 256;

/// What `summary.json` says of checkpoint replication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplicationStats {
    /// Copies wanted of every checkpoint file.
    pub replicas: u32,
    /// Checkpoint steps whose every file reached `replicas` acknowledged copies.
    pub checkpoints_replicated: u64,
    /// Checkpoint steps with a file that had fewer acknowledged copies when the
    /// next checkpoint (or the end of the job) came.
    pub checkpoints_under_replicated: u64,
    /// The newest step with every file fully replicated.
    pub newest_replicated_step: Option<u64>,
    /// Copies sent and acknowledged, all files.
    pub copies_sent: u64,
    /// See `copies_sent`.
    pub copies_acknowledged: u64,
}

#[derive(Clone, Debug)]
struct Copies {
    step: u64,
    /// The node that wrote it (unknown while only acknowledgements came).
    writer: Option<u32>,
    acked: BTreeSet<u32>,
}

/// The coordinator's record of copies.
#[derive(Clone, Debug)]
pub struct ReplicationTracker {
    wanted: u32,
    /// Files of a complete checkpoint (one per range of θ): a step with fewer recorded is not
    /// replicated yet, however well its first files are.
    files_per_step: usize,
    files: BTreeMap<String, Copies>,
    /// Steps already counted, as replicated (true) or not.
    settled: BTreeMap<u64, bool>,
    stats: ReplicationStats,
}

impl ReplicationTracker {
    /// A tracker for `replicas` copies of every file of checkpoints of `files_per_step` files.
    pub fn new(replicas: u32, files_per_step: usize) -> Self {
        Self {
            wanted: replicas,
            files_per_step: files_per_step.max(1),
            files: BTreeMap::new(),
            settled: BTreeMap::new(),
            stats: ReplicationStats { replicas, ..Default::default() },
        }
    }

    /// The file `name` of checkpoint `step`, written on `writer`, was sent to `to`.
    pub fn on_sent(&mut self, name: &str, step: u64, writer: u32, to: &[u32]) {
        self.stats.copies_sent += to.len() as u64;
        // A newer checkpoint settles the older ones: what they have now is what they get.
        let older: Vec<u64> =
            self.files.values().map(|c| c.step).filter(|s| *s < step).collect::<BTreeSet<_>>().into_iter().collect();
        for s in older {
            self.settle(s);
        }
        self.files.entry(name.to_string()).or_insert(Copies { step, writer: None, acked: BTreeSet::new() }).writer =
            Some(writer);
        while self.files.len() > MAX_TRACKED_FILES {
            let Some(oldest) = self.files.values().map(|c| c.step).min() else { break };
            self.settle(oldest);
            self.files.retain(|_, c| c.step != oldest);
        }
    }

    /// Replica `from` stored and verified `name` (possibly before the writer's record came:
    /// they travel apart).
    pub fn on_acked(&mut self, name: &str, from: u32) {
        if !self.files.contains_key(name) {
            let Some(key) = phalanx_actors::checkpoint::FileKey::parse(name) else { return };
            let newest = self.files.values().map(|c| c.step).max();
            // Only for a checkpoint still open: an old one was settled already.
            if newest.is_some_and(|n| key.step < n) || self.files.len() >= MAX_TRACKED_FILES {
                return;
            }
            self.files.insert(name.to_string(), Copies { step: key.step, writer: None, acked: BTreeSet::new() });
        }
        let Some(copies) = self.files.get_mut(name) else { return };
        if copies.acked.insert(from) {
            self.stats.copies_acknowledged += 1;
        }
        let step = copies.step;
        if self.step_replicated(step) {
            self.settle(step);
        }
    }

    /// What [`finish`](Self::finish) would say now, leaving the record open.
    pub fn snapshot(&self) -> ReplicationStats {
        let mut stats = self.stats.clone();
        for step in self.open_steps() {
            count(&mut stats, self.settled.get(&step).copied(), self.step_replicated(step), step);
        }
        stats
    }

    /// Steps with files still tracked, ascending.
    fn open_steps(&self) -> BTreeSet<u64> {
        self.files.values().map(|c| c.step).collect()
    }

    /// The figures now, with every step still open counted as it stands.
    pub fn finish(&mut self) -> ReplicationStats {
        for s in self.open_steps() {
            self.settle(s);
        }
        self.stats.clone()
    }

    /// The newest checkpoint step of which `files_per_step` files were recorded (a complete
    /// checkpoint: one file per aggregator range), and the nodes holding every one of its files
    /// (its writer or a replica that acknowledged it).
    pub fn newest_complete(&self, files_per_step: usize) -> Option<(u64, BTreeSet<u32>)> {
        let mut by_step: BTreeMap<u64, Vec<BTreeSet<u32>>> = BTreeMap::new();
        for copies in self.files.values() {
            let holders = copies.acked.iter().copied().chain(copies.writer).collect();
            by_step.entry(copies.step).or_default().push(holders);
        }
        let (step, acked) = by_step.into_iter().rev().find(|(_, files)| files.len() >= files_per_step.max(1))?;
        let mut holders = acked[0].clone();
        for more in &acked[1..] {
            holders.retain(|n| more.contains(n));
        }
        Some((step, holders))
    }

    fn step_replicated(&self, step: u64) -> bool {
        let (mut files, mut all_acked) = (0, true);
        for c in self.files.values().filter(|c| c.step == step) {
            files += 1;
            all_acked &= c.acked.len() as u32 >= self.wanted;
        }
        files >= self.files_per_step && all_acked
    }

    /// Count `step` once, as it stands; a step settled as under-replicated
    /// that completes later is moved to the replicated count (never back).
    fn settle(&mut self, step: u64) {
        let replicated = self.step_replicated(step);
        if !count(&mut self.stats, self.settled.get(&step).copied(), replicated, step) {
            return;
        }
        self.settled.insert(step, replicated);
        while self.settled.len() > MAX_TRACKED_FILES {
            self.settled.pop_first();
        }
    }
}

/// Counts `step` in `stats`: settled before as `settled` (replicated or not), `replicated`
/// now. False when the count does not change (settled already, and not upgraded).
fn count(stats: &mut ReplicationStats, settled: Option<bool>, replicated: bool, step: u64) -> bool {
    match settled {
        None if replicated => stats.checkpoints_replicated += 1,
        None => stats.checkpoints_under_replicated += 1,
        Some(false) if replicated => {
            // Only ever one of its own under-replicated count (a guard, not arithmetic to rely on).
            stats.checkpoints_under_replicated = stats.checkpoints_under_replicated.saturating_sub(1);
            stats.checkpoints_replicated += 1;
        }
        Some(_) => return false,
    }
    if replicated {
        stats.newest_replicated_step = stats.newest_replicated_step.max(Some(step));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_replicated_once_every_file_has_enough_acknowledged_copies() {
        let mut t = ReplicationTracker::new(2, 2);
        t.on_sent("a-20", 20, 0, &[1, 2]);
        t.on_sent("b-20", 20, 0, &[1, 2]);
        t.on_acked("a-20", 1);
        t.on_acked("a-20", 2);
        t.on_acked("b-20", 1);
        assert_eq!(t.stats.newest_replicated_step, None, "b-20 has one copy");
        t.on_acked("b-20", 2);
        t.on_acked("b-20", 2);
        let s = t.finish();
        assert_eq!(
            (s.newest_replicated_step, s.checkpoints_replicated, s.checkpoints_under_replicated),
            (Some(20), 1, 0)
        );
        assert_eq!((s.copies_sent, s.copies_acknowledged), (4, 4));
    }

    #[test]
    fn fewer_live_nodes_than_replicas_is_reported_as_under_replicated() {
        let mut t = ReplicationTracker::new(2, 1);
        t.on_sent("a-20", 20, 0, &[1]);
        t.on_acked("a-20", 1);
        t.on_sent("a-40", 40, 0, &[1]);
        let s = t.finish();
        assert_eq!((s.checkpoints_replicated, s.checkpoints_under_replicated, s.newest_replicated_step), (0, 2, None));
    }

    #[test]
    fn a_late_acknowledgement_moves_a_step_to_replicated() {
        let mut t = ReplicationTracker::new(1, 1);
        t.on_sent("a-20", 20, 0, &[1]);
        t.on_sent("a-40", 40, 0, &[1]);
        t.on_acked("a-20", 1);
        t.on_acked("a-40", 1);
        let s = t.finish();
        assert_eq!(
            (s.checkpoints_replicated, s.checkpoints_under_replicated, s.newest_replicated_step),
            (2, 0, Some(40))
        );
    }

    #[test]
    fn the_newest_complete_checkpoint_is_the_newest_with_every_range_and_its_holders_have_them_all() {
        let mut t = ReplicationTracker::new(2, 2);
        assert_eq!(t.newest_complete(2), None);
        t.on_sent("a-20", 20, 0, &[1, 2]);
        t.on_sent("b-20", 20, 0, &[1, 2]);
        t.on_sent("a-40", 40, 0, &[1, 2]);
        assert_eq!(t.newest_complete(2), Some((20, [0].into_iter().collect())), "step 40 has one of its two files");
        t.on_acked("a-20", 1);
        t.on_acked("b-20", 1);
        t.on_acked("b-20", 2);
        assert_eq!(t.newest_complete(2), Some((20, [0, 1].into_iter().collect())), "node 2 lacks a-20");
        t.on_sent("b-40", 40, 0, &[1, 2]);
        assert_eq!(t.newest_complete(2).map(|(s, _)| s), Some(40));
    }

    /// Ranges written on different nodes: each writer holds its own file, the coordinator and
    /// the replica hold them all; an acknowledgement that overtakes the writer's record counts.
    #[test]
    fn files_written_on_several_nodes_are_held_by_their_writers_and_the_receivers() {
        let a = phalanx_actors::checkpoint::FileKey { step: 20, offset: 0, len: 5 }.file_name();
        let b = phalanx_actors::checkpoint::FileKey { step: 20, offset: 5, len: 5 }.file_name();
        let mut t = ReplicationTracker::new(1, 2);
        // Node 0 (the coordinator) wrote range a and sent it to its replica, node 1.
        t.on_sent(&a, 20, 0, &[1]);
        t.on_acked(&a, 1);
        // Node 2 wrote range b: the coordinator's own acknowledgement comes before the record.
        t.on_acked(&b, 0);
        t.on_sent(&b, 20, 2, &[0, 1]);
        assert_eq!(t.newest_complete(2), Some((20, [0].into_iter().collect())), "node 1 lacks b, node 2 lacks a");
        t.on_acked(&b, 1);
        assert_eq!(t.newest_complete(2), Some((20, [0, 1].into_iter().collect())));
        let s = t.finish();
        assert_eq!((s.newest_replicated_step, s.copies_sent, s.copies_acknowledged), (Some(20), 3, 3));
    }

    #[test]
    fn memory_stays_bounded_over_a_long_job() {
        let mut t = ReplicationTracker::new(1, 1);
        for step in 1..=10_000u64 {
            let name = format!("f-{step}");
            t.on_sent(&name, step, 0, &[1]);
            t.on_acked(&name, 1);
        }
        assert!(t.files.len() <= MAX_TRACKED_FILES && t.settled.len() <= MAX_TRACKED_FILES);
        assert_eq!(t.finish().checkpoints_replicated, 10_000);
    }

    /// Ranges on several nodes: range a's acknowledgement (and so a settle of its step) can come
    /// before range b's record. The step is not replicated until every range's file is, and
    /// settling it again (a newer checkpoint) then b's late copy moves it once, without
    /// underflowing the under-replicated count (a coordinator's task panicked on it).
    #[test]
    fn a_step_with_ranges_on_several_nodes_is_counted_once_whatever_the_order() {
        let key = |step, offset| phalanx_actors::checkpoint::FileKey { step, offset, len: 5 }.file_name();
        let (a20, b20, a40) = (key(20, 0), key(20, 5), key(40, 0));
        let mut t = ReplicationTracker::new(1, 2);
        t.on_acked(&a20, 1);
        t.on_sent(&a20, 20, 0, &[1]);
        assert_eq!(t.snapshot().checkpoints_replicated, 0, "b-20 is not even recorded yet");
        t.on_sent(&b20, 20, 2, &[0]);
        t.on_sent(&a40, 40, 0, &[1]);
        assert_eq!(t.stats.checkpoints_under_replicated, 1, "settled by the newer step: b-20 unacknowledged");
        t.on_acked(&b20, 0);
        t.on_acked(&b20, 0);
        let s = t.finish();
        assert_eq!((s.checkpoints_replicated, s.newest_replicated_step), (1, Some(20)));
        assert_eq!(s.checkpoints_under_replicated, 1, "step 40 (one of its two files) at the end");
    }

    /// The published figures (computed without touching the record) are what finishing the
    /// record now would say, after every event of an interleaving of records and copies.
    #[test]
    fn a_snapshot_is_what_finishing_now_would_say() {
        let key = |step, offset| phalanx_actors::checkpoint::FileKey { step, offset, len: 5 }.file_name();
        let mut t = ReplicationTracker::new(2, 2);
        let check = |t: &ReplicationTracker| assert_eq!(t.snapshot(), t.clone().finish(), "{t:?}");
        for step in [20u64, 40, 60] {
            let (a, b) = (key(step, 0), key(step, 5));
            t.on_acked(&b, 1);
            check(&t);
            t.on_sent(&a, step, 0, &[1, 2]);
            check(&t);
            t.on_acked(&a, 1);
            check(&t);
            if step != 40 {
                t.on_acked(&a, 2);
                check(&t);
            }
            t.on_sent(&b, step, 2, &[0, 1]);
            check(&t);
            t.on_acked(&b, 0);
            check(&t);
        }
        t.on_acked(&key(40, 0), 2);
        check(&t);
        assert_eq!(t.finish().checkpoints_replicated, 3, "step 40 completed late");
    }
}
