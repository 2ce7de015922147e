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
//! stride at the measured step time lasts at least the spacing; it shrinks again only to a
//! stride that lasts 1.5 spacings, so that noise in the step time does not flip it to and fro.
//! So checkpoints are between one and three spacings apart once the step time is known (a
//! checkpoint step before it is, is taken). The step time is the median of the last [`GAPS`]
//! steps' durations ([`CheckpointCadence::observe`], every applied step): the first steps of a
//! job — connections opening, the first θ going out, caches and allocators warming — and a
//! recovery's stall are a few slow steps among many, and a median does not see them. (Until
//! December 2026 it was a moving average over the gaps between checkpoint steps, seeded with
//! the first gap: at 1.2 M parameters on 3 nodes the first 20 steps took 38 ms each against
//! 13 ms after, so the first strides came out 2–4 × too short, and a 160-step job wrote steps
//! 20 and 40 or 80 between its first and its last checkpoint where now it writes 80 only:
//! +4.8 % step time against none, now +1.0 %.)
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

/// The stride shrinks only to one that lasts this many times the spacing (see
/// [`CheckpointCadence::shift_now`]).
const SHRINK_MARGIN: f64 = 1.5;

/// Step durations the step time is the median of (odd, so the median is one of them).
pub const GAPS: usize = 15;

/// The checkpoint cadence of one job in one process (see the [module docs](self)).
#[derive(Debug)]
pub struct CheckpointCadence {
    every: u64,
    min_interval: Duration,
    /// The stride is `every << shift`.
    shift: u32,
    /// The newest step observed, and when (for the step time).
    last_step: Option<(u64, Instant)>,
    /// The durations of the newest steps observed (at most [`GAPS`], oldest first).
    gaps: VecDeque<Duration>,
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
            last_step: None,
            gaps: VecDeque::with_capacity(GAPS),
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

    /// The time of a step now: the median of the newest steps' durations, if any was observed.
    pub fn step_time(&self) -> Option<Duration> {
        let mut gaps: Vec<Duration> = self.gaps.iter().copied().collect();
        gaps.sort_unstable();
        gaps.get(gaps.len() / 2).copied()
    }

    /// The state at `step` is applied, at `now` (every range of the process may say so; a step
    /// observed already, or an older one — another range a step behind, a rollback — adds no
    /// duration). A step later than the newest by `n` adds its mean duration over the `n`.
    pub fn observe(&mut self, step: u64, now: Instant) {
        match self.last_step {
            Some((last, _)) if step <= last => {
                // A rollback far behind: count from here (the stall is not a step's duration).
                if last - step > 1 {
                    self.last_step = Some((step, now));
                }
                return;
            }
            Some((last, at)) => {
                let n = (step - last).min(u64::from(u32::MAX)) as u32;
                if self.gaps.len() == GAPS {
                    self.gaps.pop_front();
                }
                self.gaps.push_back(now.saturating_duration_since(at) / n);
            }
            None => {}
        }
        self.last_step = Some((step, now));
    }

    /// Is the state at `step` checkpointed? `last` says it is the job's final state. The first
    /// call for a step decides, at `now` (and [observes](Self::observe) the step); later calls
    /// for it get the same answer.
    pub fn decide(&mut self, step: u64, last: bool, now: Instant) -> bool {
        if let Some(&(_, taken)) = self.decided.iter().find(|(s, _)| *s == step) {
            return taken;
        }
        self.observe(step, now);
        let due = self.every > 0 && step % self.every == 0;
        if due {
            self.shift = self.shift_now();
        }
        let taken = last || (due && step % self.stride() == 0);
        if self.decided.len() == REMEMBERED {
            self.decided.pop_front();
        }
        self.decided.push_back((step, taken));
        taken
    }

    /// `k` for the stride `checkpoint_every × 2^k` now (0 while the step time is unknown, or
    /// with no floor): at least the least `k` whose stride lasts the spacing at the step time
    /// now, and no less than it was unless a shorter stride lasts [`SHRINK_MARGIN`] × the
    /// spacing. Without the margin, a stride that lasts about the spacing flipped between two
    /// values from one decision to the next with the noise in the step time (steps slow while a
    /// checkpoint is written, then fast), and each process flipped at other steps: measured at
    /// 1.2 M parameters on 3 nodes, 800 steps, one process wrote steps 200 and 240 that the
    /// others did not — writes no complete checkpoint uses.
    fn shift_now(&self) -> u32 {
        let spacing = self.spacing();
        let Some(t) = self.step_time().filter(|_| !spacing.is_zero()) else { return 0 };
        let lasts = |k: u32, d: Duration| {
            t.saturating_mul(self.every.saturating_mul(1 << k).min(u64::from(u32::MAX)) as u32) >= d
        };
        let mut k = self.shift;
        while k < MAX_SHIFT && !lasts(k, spacing) {
            k += 1;
        }
        while k > 0 && lasts(k - 1, spacing.mul_f64(SHRINK_MARGIN)) {
            k -= 1;
        }
        k
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

    /// Slow first steps (connections, the first θ, cold caches) do not make the first strides
    /// short: at 13 ms a step after five of 100 ms, with a 500 ms floor, the stride is 40 from
    /// the first decision on, and step 20 is not taken (a moving average seeded with the first
    /// gap, 34.75 ms a step, took it).
    #[test]
    fn slow_first_steps_do_not_shorten_the_stride() {
        let mut c = CheckpointCadence::new(20, Duration::from_millis(500));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(if s <= 5 { 100 * s } else { 500 + 13 * (s - 5) });
        let mut taken = Vec::new();
        for s in 0..=200u64 {
            if s % 20 == 0 {
                if c.decide(s, false, at(s)) {
                    taken.push(s);
                }
            } else {
                c.observe(s, at(s));
            }
        }
        assert_eq!(c.step_time(), Some(Duration::from_millis(13)));
        assert_eq!(taken, vec![0, 40, 80, 120, 160, 200]);
    }

    /// A stride that lasts about the spacing does not flip with noise in the step time: steps
    /// of 12.4 and 12.6 ms in turn, a 500 ms floor and a checkpoint due every 20 steps give 40
    /// (504 ms) or 80 (992 ms) without the margin; with it the stride stays at 80 once there,
    /// and shrinks only when steps take 1.5 × as long.
    #[test]
    fn noise_in_the_step_time_does_not_flip_the_stride() {
        let mut c = CheckpointCadence::new(20, Duration::from_millis(500));
        let t0 = Instant::now();
        let mut t = t0;
        let mut strides = Vec::new();
        for s in 0..=2000u64 {
            // Runs of 15 slower steps and 15 faster ones, so the median moves.
            t += Duration::from_micros(if (s / 15) % 2 == 0 { 12_400 } else { 12_600 });
            c.decide(s, false, t);
            strides.push(c.stride());
        }
        let settled: Vec<u64> = strides[40..].to_vec();
        assert!(settled.iter().all(|&x| x == 80), "strides {:?}", &strides[..200]);
        for s in 2001..=2100u64 {
            t += Duration::from_millis(20);
            c.decide(s, false, t);
        }
        assert_eq!(c.stride(), 40, "20 ms a step: 40 steps last 800 ms, 1.6 × the floor");
    }

    /// Another range of the process a step behind, or observing a step again, adds no step
    /// duration; a rollback starts counting again from where it went back to.
    #[test]
    fn only_new_steps_are_timed() {
        let mut c = CheckpointCadence::new(10, Duration::from_millis(100));
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(c.step_time(), None);
        c.observe(5, ms(0));
        c.observe(5, ms(3));
        c.observe(4, ms(4));
        assert_eq!(c.step_time(), None, "no step was newer than the first");
        c.observe(6, ms(10));
        c.observe(8, ms(30));
        assert_eq!(c.step_time(), Some(Duration::from_millis(10)));
        // Back to step 2 after a stall: the stall is no step; steps 3 and 4 take 10 ms.
        c.observe(2, ms(1000));
        c.observe(3, ms(1010));
        c.observe(4, ms(1020));
        assert_eq!(c.gaps.len(), 4);
        assert_eq!(c.step_time(), Some(Duration::from_millis(10)));
        for s in 5..100 {
            c.observe(s, ms(1020 + 7 * (s - 4)));
        }
        assert_eq!(c.gaps.len(), GAPS, "bounded");
        assert_eq!(c.step_time(), Some(Duration::from_millis(7)));
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
