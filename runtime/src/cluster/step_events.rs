//! Which applied steps the coordinator reports as `step` events.
//!
//! A node's events are for people and harnesses: a job of a million steps
//! must not print a million lines (every step is in `history.csv`). The
//! coordinator reports a step when
//!
//! - it is the first it applies, or the last of the job;
//! - it is one of the steps named in `report_steps` (a harness that injects a
//!   fault at a step must see that exact step);
//! - [`STEP_EVENT_INTERVAL`] passed since the last report (steady progress);
//! - training resumes after a stall of [`STALL_GAP`] or more, or it is the
//!   first step after the view changed ([`StepEvents::report_next`]): the
//!   moment a job recovers from a fault is reported when it happens, not up
//!   to an interval later.
//!
//! So at most `1 / STEP_EVENT_INTERVAL + 1 / STALL_GAP` events per second,
//! plus the named steps and one per view change, whatever the step rate.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Steady progress is reported at most this often.
pub const STEP_EVENT_INTERVAL: Duration = Duration::from_millis(100);
/// A step applied this long after the previous one ends a stall and is reported.
pub const STALL_GAP: Duration = Duration::from_millis(50);

/// Decides which steps become `step` events (see the module docs).
#[derive(Clone, Debug)]
pub struct StepEvents {
    report: BTreeSet<u64>,
    total_steps: u64,
    last_report: Option<Instant>,
    last_step: Option<Instant>,
    next: bool,
}

impl StepEvents {
    /// A filter for a job of `total_steps` that always reports `report_steps`.
    pub fn new(report_steps: impl IntoIterator<Item = u64>, total_steps: u64) -> Self {
        Self {
            report: report_steps.into_iter().collect(),
            total_steps,
            last_report: None,
            last_step: None,
            next: false,
        }
    }

    /// Report the next step whatever the rate (the view changed).
    pub fn report_next(&mut self) {
        self.next = true;
    }

    /// Is the step that produced version `step`, applied at `now`, reported?
    pub fn due(&mut self, step: u64, now: Instant) -> bool {
        let since = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t));
        let stalled = since(self.last_step).is_some_and(|gap| gap >= STALL_GAP);
        self.last_step = Some(now);
        let due = match since(self.last_report) {
            None => true,
            Some(quiet) => {
                quiet >= STEP_EVENT_INTERVAL
                    || stalled
                    || self.next
                    || step >= self.total_steps
                    || self.report.contains(&step)
            }
        };
        if due {
            self.last_report = Some(now);
            self.next = false;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of `steps`, step `s` applied at `t0 + s × every`, that are reported.
    fn reported(events: &mut StepEvents, t0: Instant, steps: std::ops::Range<u64>, every: Duration) -> Vec<u64> {
        steps.filter(|s| events.due(*s, t0 + every * *s as u32)).collect()
    }

    #[test]
    fn steady_progress_is_reported_at_a_bounded_rate_with_the_first_and_last_step() {
        let t0 = Instant::now();
        let mut e = StepEvents::new([], 100_000);
        // 100k steps at 10 µs: one second of training.
        let got = reported(&mut e, t0, 1..100_001, Duration::from_micros(10));
        assert_eq!(got.first(), Some(&1));
        assert_eq!(got.last(), Some(&100_000));
        assert!(got.len() <= 12, "{} events in a second: {got:?}", got.len());
        assert!(got.windows(2).all(|w| w[1] - w[0] >= 10_000 || w[1] == 100_000), "{got:?}");
    }

    #[test]
    fn named_steps_are_always_reported() {
        let t0 = Instant::now();
        let mut e = StepEvents::new([150, 151, 300], 1_000);
        let got = reported(&mut e, t0, 1..1_001, Duration::from_micros(10));
        assert_eq!(got, vec![1, 150, 151, 300, 1_000]);
    }

    #[test]
    fn the_first_step_after_a_stall_is_reported() {
        let t0 = Instant::now();
        let mut e = StepEvents::new([], 1_000);
        assert!(e.due(1, t0));
        assert!(!e.due(2, t0 + Duration::from_millis(1)));
        // Nothing for 60 ms (less than the interval since the last report), then training resumes.
        assert!(e.due(3, t0 + Duration::from_millis(61)));
        assert!(!e.due(4, t0 + Duration::from_millis(62)));
        assert!(!e.due(5, t0 + Duration::from_millis(100)));
        // The view changed: the next step is reported, the one after is not.
        e.report_next();
        assert!(e.due(6, t0 + Duration::from_millis(101)));
        assert!(!e.due(7, t0 + Duration::from_millis(102)));
    }
}
