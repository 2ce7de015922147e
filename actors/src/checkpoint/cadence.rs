//! Which checkpoint steps are taken: every `checkpoint_every` steps, but at most one per
//! `checkpoint_min_interval_ms` of training, and at most one per [`WRITE_BUDGET`] times the
//! time the last checkpoint took to write — CheckFreq's point that a checkpoint's cost must be
//! measured against the time between checkpoints, not the steps.
//!
//! A tiny model steps in tens of microseconds: twenty steps are over before one write with its
//! two fsyncs is, so checkpointing every twenty steps would pace training to the disk; the
//! floor spaces them. A large model's write (megabytes to serialise, hash, fsync and copy to a
//! replica) competes with training for the CPU even in the background; spacing checkpoints by
//! `WRITE_BUDGET` times its duration keeps that cost at about `1 / WRITE_BUDGET` of the run.
//! A floor of zero turns both off: every `checkpoint_every` steps exactly. The final state is
//! always checkpointed.
//!
//! **Every range decides alike.** A step is complete on disk only if every range wrote it, so
//! the ranges of a job must take the same steps. One `CheckpointCadence` is shared by all
//! the ranges of a job in a process (they all run beside the job's supervisor), and its
//! decision for a step is made once — by the first range that asks — and remembered for the
//! others, which are at most one step behind (a range cannot apply step `s + 1` before every
//! range has applied `s`: the trainers need all of `θ_s`).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use phalanx_actors::checkpoint::CheckpointCadence;
//!
//! let mut cadence = CheckpointCadence::new(20, Duration::from_millis(100));
//! let t0 = Instant::now();
//! assert!(cadence.decide(0, false, t0));                                  // the first is taken
//! assert!(!cadence.decide(20, false, t0 + Duration::from_millis(5)));     // too soon: skipped
//! assert!(!cadence.decide(20, false, t0 + Duration::from_millis(500)));   // decided once
//! assert!(cadence.decide(40, false, t0 + Duration::from_millis(150)));    // the floor is over
//! assert!(cadence.decide(50, true, t0 + Duration::from_millis(151)));     // the end always is
//! assert!(!cadence.decide(41, false, t0 + Duration::from_secs(9)));       // no checkpoint step
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Decisions remembered: ranges are at most one step apart, so two would do; a few more
/// cost nothing.
const REMEMBERED: usize = 8;

/// Checkpoints are at least this many times their write time apart (a write costs about
/// `1/50` = 2 % of the run; the replica's copy roughly doubles it).
pub const WRITE_BUDGET: u32 = 50;

/// The checkpoint cadence of one job in one process (see the [module docs](self)).
#[derive(Debug)]
pub struct CheckpointCadence {
    every: u64,
    min_interval: Duration,
    /// When the last taken checkpoint was decided.
    last_taken: Option<Instant>,
    /// How long a checkpoint takes to write (the newest report, or more while older, longer
    /// ones fade: each report keeps at least 7/8 of the previous estimate).
    write_time: Duration,
    /// Recent decisions by step, oldest first.
    decided: VecDeque<(u64, bool)>,
}

impl CheckpointCadence {
    /// Every `every` steps (0: only the final state), at most one per `min_interval`
    /// (zero: every `every` steps exactly).
    pub fn new(every: u64, min_interval: Duration) -> Self {
        Self {
            every,
            min_interval,
            last_taken: None,
            write_time: Duration::ZERO,
            decided: VecDeque::with_capacity(REMEMBERED),
        }
    }

    /// A checkpoint of the job took `took` to write (save, replicate, prune).
    pub fn record_write(&mut self, took: Duration) {
        self.write_time = took.max(self.write_time * 7 / 8);
    }

    /// The least time between two checkpoints now: the floor, or [`WRITE_BUDGET`] times the
    /// write time if that is longer; zero when the floor is zero (the exact cadence).
    pub fn spacing(&self) -> Duration {
        if self.min_interval.is_zero() {
            return Duration::ZERO;
        }
        self.min_interval.max(self.write_time * WRITE_BUDGET)
    }

    /// Is the state at `step` checkpointed? `last` says it is the job's final state. The first
    /// call for a step decides, at `now`; later calls for it get the same answer.
    pub fn decide(&mut self, step: u64, last: bool, now: Instant) -> bool {
        if let Some(&(_, taken)) = self.decided.iter().find(|(s, _)| *s == step) {
            return taken;
        }
        let due = last || (self.every > 0 && step % self.every == 0);
        let spacing = self.spacing();
        let taken = due && (last || self.last_taken.is_none_or(|t| now.saturating_duration_since(t) >= spacing));
        if taken {
            self.last_taken = Some(now);
        }
        if self.decided.len() == REMEMBERED {
            self.decided.pop_front();
        }
        self.decided.push_back((step, taken));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no floor every checkpoint step is taken, whatever the clock says.
    #[test]
    fn a_zero_floor_takes_every_checkpoint_step() {
        let mut c = CheckpointCadence::new(3, Duration::ZERO);
        let t = Instant::now();
        let taken: Vec<u64> = (0..13).filter(|s| c.decide(*s, *s == 12, t)).collect();
        assert_eq!(taken, vec![0, 3, 6, 9, 12]);
    }

    /// Steps that take 10 ms with a 25 ms floor and a checkpoint every step: one in three is
    /// taken, always at least the floor apart.
    #[test]
    fn the_floor_spaces_checkpoints_in_time() {
        let mut c = CheckpointCadence::new(1, Duration::from_millis(25));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(10 * s);
        let taken: Vec<u64> = (0..10).filter(|s| c.decide(*s, false, at(*s))).collect();
        assert_eq!(taken, vec![0, 3, 6, 9]);
    }

    /// Ranges asking in any order and at other times get the first answer for a step.
    #[test]
    fn every_range_gets_the_first_decision() {
        let mut c = CheckpointCadence::new(2, Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(c.decide(0, false, t0));
        assert!(!c.decide(2, false, t0 + Duration::from_millis(1)));
        // Another range asks about step 2 late (when the floor would be over): still skipped.
        assert!(!c.decide(2, false, t0 + Duration::from_millis(300)));
        assert!(c.decide(0, false, t0 + Duration::from_millis(300)));
        // Step 4, first asked after the floor: taken, and for the other range too.
        assert!(c.decide(4, false, t0 + Duration::from_millis(300)));
        assert!(c.decide(4, false, t0 + Duration::from_millis(301)));
    }

    /// A write that takes 10 ms spaces checkpoints by WRITE_BUDGET × 10 ms when that is above the
    /// floor, and the estimate fades when writes get faster; a zero floor ignores it.
    #[test]
    fn slow_writes_space_checkpoints_by_the_budget() {
        let mut c = CheckpointCadence::new(1, Duration::from_millis(100));
        assert_eq!(c.spacing(), Duration::from_millis(100));
        c.record_write(Duration::from_millis(10));
        assert_eq!(c.spacing(), Duration::from_millis(10) * WRITE_BUDGET);
        let t0 = Instant::now();
        assert!(c.decide(0, false, t0));
        assert!(!c.decide(1, false, t0 + Duration::from_millis(10) * (WRITE_BUDGET - 1)));
        assert!(c.decide(2, false, t0 + Duration::from_millis(10) * WRITE_BUDGET));
        for _ in 0..40 {
            c.record_write(Duration::from_micros(100));
        }
        assert_eq!(c.spacing(), Duration::from_millis(100), "back to the floor once writes are fast");
        let mut exact = CheckpointCadence::new(1, Duration::ZERO);
        exact.record_write(Duration::from_secs(1));
        assert_eq!(exact.spacing(), Duration::ZERO);
        assert!(exact.decide(0, false, t0) && exact.decide(1, false, t0));
    }

    /// The memory is bounded, and the job's final state is always checkpointed.
    #[test]
    fn memory_is_bounded_and_the_end_is_always_taken() {
        let mut c = CheckpointCadence::new(1, Duration::from_secs(3600));
        let t = Instant::now();
        for s in 0..1000 {
            c.decide(s, false, t);
        }
        assert!(c.decided.len() <= REMEMBERED);
        assert!(c.decide(1000, true, t));
        assert!(!c.decide(1001, false, t), "the floor counts from the final checkpoint too");
    }
}
