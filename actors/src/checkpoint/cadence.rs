//! Which checkpoint steps are taken: every `checkpoint_every` steps, but at most about one per
//! `checkpoint_min_interval_ms` of training, and at most about one per [`WRITE_BUDGET`] times
//! the time the last checkpoint took to write — CheckFreq's point that a checkpoint's cost must
//! be measured against the time between checkpoints, not the steps.
//!
//! A tiny model steps in tens of microseconds: twenty steps are over before one write with its
//! two fsyncs is, so checkpointing every twenty steps would pace training to the disk; the
//! floor spaces them. A large model's write (megabytes to serialise, hash, fsync and copy to a
//! replica) competes with training for the CPU even in the background; spacing checkpoints by
//! `WRITE_BUDGET` times its duration — counting each copy on another node as one more write
//! ([`CheckpointCadence::record_write`]) — keeps that cost at about `1 / WRITE_BUDGET` of the run.
//! A floor of zero turns both off: every `checkpoint_every` steps exactly. The final state is
//! always checkpointed.
//!
//! **A stride of steps, nested.** The spacing is turned into steps: checkpoints are taken at
//! the multiples of a *stride*, `checkpoint_every × 2^k`, with `k` the least for which the
//! stride at the measured step time (a moving average over the gaps between checkpoint steps)
//! lasts at least the spacing. So checkpoints are between one and two spacings apart once the
//! step time is known (the first checkpoint steps, before it is, are all taken).
//!
//! **Ranges agree wherever they run.** A step is complete on disk only if every range wrote
//! it. Ranges in one process share one `CheckpointCadence`, whose decision for a step is made
//! once — by the first range that asks — and remembered for the others, which are at most one
//! step behind (a range cannot apply step `s + 1` before every range has applied `s`: the
//! trainers need all of `θ_s`). Ranges in other processes decide alone, but strides are
//! powers of two times one base, so they nest: a multiple of the larger of two strides is a
//! multiple of the smaller, and every process takes it. The processes step together (training
//! is synchronous), so their step times — and their strides — agree but for noise, and where
//! they differ the complete checkpoints come at the coarser one's cadence: never fewer than
//! the process that asks for the fewest would write alone.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use phalanx_actors::checkpoint::CheckpointCadence;
//!
//! let mut cadence = CheckpointCadence::new(20, Duration::from_millis(100));
//! let t0 = Instant::now();
//! let ms = |n: u64| t0 + Duration::from_millis(n);
//! assert!(cadence.decide(0, false, ms(0)));      // the first is taken
//! assert!(!cadence.decide(20, false, ms(20)));   // 1 ms a step: the stride is now 160
//! assert!(!cadence.decide(20, false, ms(500)));  // decided once: a step's answer stands
//! assert!(!cadence.decide(40, false, ms(40)));   // not a multiple of the stride: skipped
//! assert!(cadence.decide(160, false, ms(160)));  // 160 ms after step 0 (the floor is 100)
//! assert!(cadence.decide(170, true, ms(170)));   // the end always is
//! assert!(!cadence.decide(161, false, ms(900))); // no checkpoint step
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Decisions remembered: ranges are at most one step apart, so two would do; a few more
/// cost nothing.
const REMEMBERED: usize = 8;

/// Checkpoints are at least this many times their write time apart, copies included (a write
/// and its copies cost about `1/50` = 2 % of the run).
pub const WRITE_BUDGET: u32 = 50;

/// The stride is at most `checkpoint_every × 2^MAX_SHIFT` steps.
const MAX_SHIFT: u32 = 32;

/// The checkpoint cadence of one job in one process (see the [module docs](self)).
#[derive(Debug)]
pub struct CheckpointCadence {
    every: u64,
    min_interval: Duration,
    /// The stride is `every << shift`.
    shift: u32,
    /// The last checkpoint step decided, and when (for the step time).
    last_due: Option<(u64, Instant)>,
    /// The time of a step: a moving average of the gaps between checkpoint steps.
    step_time: Option<Duration>,
    /// How long a checkpoint takes to write (the newest report, or more while older, longer
    /// ones fade: each report keeps at least 7/8 of the previous estimate).
    write_time: Duration,
    /// Recent decisions by step, oldest first.
    decided: VecDeque<(u64, bool)>,
}

impl CheckpointCadence {
    /// Every `every` steps (0: only the final state), at most about one per `min_interval`
    /// (zero: every `every` steps exactly).
    pub fn new(every: u64, min_interval: Duration) -> Self {
        Self {
            every,
            min_interval,
            shift: 0,
            last_due: None,
            step_time: None,
            write_time: Duration::ZERO,
            decided: VecDeque::with_capacity(REMEMBERED),
        }
    }

    /// A checkpoint of the job took `took` to write here (save, replicate, prune), and `copies`
    /// other nodes keep a copy of each file (on average over the job's ranges). Each copy costs
    /// its node about what the write cost here — the transfer, a checksum, a write and two
    /// fsyncs — so the checkpoint's cost is counted as `took × (1 + copies)`. (Measured at
    /// 1.2 M parameters on 3 nodes: a write took 10–16 ms; a checkpoint of the three ranges
    /// with their four copies added 17–28 ms of wall time to the run, about 2 × the write.)
    pub fn record_write(&mut self, took: Duration, copies: f64) {
        let cost = took.mul_f64(1.0 + copies.max(0.0));
        self.write_time = cost.max(self.write_time * 7 / 8);
    }

    /// The least time between two checkpoints now: the floor, or [`WRITE_BUDGET`] times the
    /// write time if that is longer; zero when the floor is zero (the exact cadence).
    pub fn spacing(&self) -> Duration {
        if self.min_interval.is_zero() {
            return Duration::ZERO;
        }
        self.min_interval.max(self.write_time * WRITE_BUDGET)
    }

    /// Steps between two checkpoints now: `checkpoint_every × 2^k` (0: only the final state).
    pub fn stride(&self) -> u64 {
        self.every.saturating_mul(1 << self.shift)
    }

    /// Is the state at `step` checkpointed? `last` says it is the job's final state. The first
    /// call for a step decides, at `now`; later calls for it get the same answer.
    pub fn decide(&mut self, step: u64, last: bool, now: Instant) -> bool {
        if let Some(&(_, taken)) = self.decided.iter().find(|(s, _)| *s == step) {
            return taken;
        }
        let due = self.every > 0 && step % self.every == 0;
        if due {
            self.measure(step, now);
        }
        let taken = last || (due && step % self.stride() == 0);
        if self.decided.len() == REMEMBERED {
            self.decided.pop_front();
        }
        self.decided.push_back((step, taken));
        taken
    }

    /// Checkpoint step `step` is reached at `now`: update the step time and the stride.
    fn measure(&mut self, step: u64, now: Instant) {
        if let Some((before, at)) = self.last_due.filter(|(before, _)| *before < step) {
            let gap = now.saturating_duration_since(at) / (step - before).min(u64::from(u32::MAX)) as u32;
            // A moving average: one slow gap (a recovery) moves it a quarter of the way.
            self.step_time = Some(self.step_time.map_or(gap, |t| (t * 3 + gap) / 4));
        }
        self.last_due = Some((step, now));
        let spacing = self.spacing();
        self.shift = match self.step_time {
            Some(t) if !spacing.is_zero() => (0..=MAX_SHIFT)
                .find(|k| {
                    t.saturating_mul(self.every.saturating_mul(1 << k).min(u64::from(u32::MAX)) as u32) >= spacing
                })
                .unwrap_or(MAX_SHIFT),
            _ => 0,
        };
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
        let taken: Vec<u64> = (0..13).filter(|s| c.decide(*s, *s == 12, t + Duration::from_secs(*s))).collect();
        assert_eq!(taken, vec![0, 3, 6, 9, 12]);
    }

    /// Steps that take 10 ms with a 25 ms floor and a checkpoint due every step: once the step
    /// time is known, the multiples of 4 are taken (40 ms apart: between one and two floors).
    #[test]
    fn the_floor_spaces_checkpoints_in_time() {
        let mut c = CheckpointCadence::new(1, Duration::from_millis(25));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(10 * s);
        let taken: Vec<u64> = (0..20).filter(|s| c.decide(*s, false, at(*s))).collect();
        assert_eq!(taken, vec![0, 4, 8, 12, 16]);
        assert_eq!(c.stride(), 4);
    }

    /// Ranges asking in any order and at other times get the first answer for a step.
    #[test]
    fn every_range_gets_the_first_decision() {
        let mut c = CheckpointCadence::new(2, Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(c.decide(0, false, t0));
        assert!(!c.decide(2, false, t0 + Duration::from_millis(20)), "10 ms a step: the stride is 16");
        // Another range asks about step 2 late: still skipped.
        assert!(!c.decide(2, false, t0 + Duration::from_millis(300)));
        assert!(c.decide(0, false, t0 + Duration::from_millis(300)));
        assert!(c.decide(16, false, t0 + Duration::from_millis(160)));
        assert!(c.decide(16, false, t0 + Duration::from_millis(161)));
    }

    /// Two processes measuring a little differently pick strides a power of two apart; the
    /// steps the coarser one takes, the finer one takes too, so every range has them.
    #[test]
    fn processes_that_measure_differently_still_share_the_coarser_stride() {
        let floor = Duration::from_millis(100);
        let (mut fast, mut slow) = (CheckpointCadence::new(10, floor), CheckpointCadence::new(10, floor));
        let t0 = Instant::now();
        let mut both = Vec::new();
        let (mut only_fast, mut only_slow) = (0, 0);
        for s in 0..4000u64 {
            // 1.2 ms and 1.3 ms a step, either side of 100 ms / 80 steps: strides 160 and 80.
            let a = fast.decide(s, false, t0 + Duration::from_micros(1200 * s));
            let b = slow.decide(s, false, t0 + Duration::from_micros(1300 * s));
            match (a, b) {
                (true, true) => both.push(s),
                (true, false) => only_fast += 1,
                (false, true) => only_slow += 1,
                _ => {}
            }
            let (lo, hi) = (fast.stride().min(slow.stride()), fast.stride().max(slow.stride()));
            assert_eq!(hi % lo, 0, "strides {lo} and {hi} do not nest");
        }
        assert_eq!((fast.stride(), slow.stride()), (160, 80));
        assert_eq!(only_fast, 0, "the faster process has the larger stride; the slower takes its steps too");
        assert!(only_slow > 0, "the strides differ in this test");
        let gaps: Vec<u64> = both.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().skip(2).all(|g| *g <= fast.stride()), "complete checkpoints at {both:?}");
        assert!(both.len() >= 10, "{both:?}");
    }

    /// A write that takes 10 ms spaces checkpoints by WRITE_BUDGET × 10 ms when that is above the
    /// floor, and the estimate fades when writes get faster; a zero floor ignores it.
    #[test]
    fn slow_writes_space_checkpoints_by_the_budget() {
        let mut c = CheckpointCadence::new(1, Duration::from_millis(100));
        assert_eq!(c.spacing(), Duration::from_millis(100));
        c.record_write(Duration::from_millis(10), 0.0);
        assert_eq!(c.spacing(), Duration::from_millis(10) * WRITE_BUDGET);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(10 * s);
        let taken: Vec<u64> = (0..200).filter(|s| c.decide(*s, false, at(*s))).collect();
        assert_eq!(taken, vec![0, 64, 128, 192], "500 ms at 10 ms a step: a stride of 64");
        for _ in 0..40 {
            c.record_write(Duration::from_micros(100), 0.0);
        }
        assert_eq!(c.spacing(), Duration::from_millis(100), "back to the floor once writes are fast");
        c.decide(200, false, at(200));
        assert_eq!(c.stride(), 16);
        let mut exact = CheckpointCadence::new(1, Duration::ZERO);
        exact.record_write(Duration::from_secs(1), 0.0);
        assert_eq!(exact.spacing(), Duration::ZERO);
        assert!(exact.decide(0, false, t0) && exact.decide(1, false, t0 + Duration::from_millis(1)));
    }

    /// Copies on other nodes count as writes: a 10 ms write with 1.5 copies a file on average
    /// costs 25 ms, and spaces checkpoints by WRITE_BUDGET × 25 ms.
    #[test]
    fn copies_on_other_nodes_count_as_writes() {
        let mut c = CheckpointCadence::new(1, Duration::from_millis(100));
        c.record_write(Duration::from_millis(10), 1.5);
        assert_eq!(c.spacing(), Duration::from_millis(25) * WRITE_BUDGET);
        c.record_write(Duration::from_millis(10), -1.0);
        assert_eq!(c.spacing(), Duration::from_millis(25) * WRITE_BUDGET * 7 / 8, "no negative copies");
    }

    /// The memory is bounded, and the job's final state is always checkpointed.
    #[test]
    fn memory_is_bounded_and_the_end_is_always_taken() {
        let mut c = CheckpointCadence::new(1, Duration::from_secs(3600));
        let t = Instant::now();
        for s in 0..1000 {
            c.decide(s, false, t + Duration::from_millis(s));
        }
        assert!(c.decided.len() <= REMEMBERED);
        assert!(c.decide(1001, true, t + Duration::from_millis(1001)));
        assert!(!c.decide(1002, false, t + Duration::from_millis(1002)), "an hour at 1 ms a step");
        assert_eq!(c.stride(), 1 << 22);
    }
}
