//! Orders to restore an aggregator range that this node holds no files for (sans-IO).
//!
//! With aggregators spread over the nodes, a range restores from the checkpoint files on its
//! host's disk: its own files when it stayed where it was, none when it just moved here (its
//! node died) or when a new coordinator restores an older step than this node kept. The
//! coordinator and its replicas hold every file of every complete checkpoint (each range's
//! host copies its files to them), so such an order **waits here** while the node fetches the
//! step's files from the coordinator, and goes on once they are stored — and every later
//! message for that range waits behind it, so a range never sees the gradients of a
//! generation before the rollback that starts it.
//!
//! ```text
//!  spawn(range r, restore s) / rollback(r, s) ──▶ files of r at s here? ──yes──▶ pass
//!                                                        │ no
//!                                                        ▼
//!             Fetch(s) from the coordinator, hold it (and what follows for r)
//!                                                        │ files stored / timeout
//!                                                        ▼
//!                                   release in arrival order (a timed-out order goes on
//!                                   and fails to restore: the supervisor restarts it)
//! ```
//!
//! Bounded: at most [`MAX_HELD`] messages wait in all; one more releases the oldest order
//! with what follows it. The node shell feeds it and carries out its commands; the rules are
//! unit-tested here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Messages held at most, all ranges together.
pub(crate) const MAX_HELD: usize = 4096;
/// How long an order waits for its files (below the supervisor's spawn answer timeout, so a
/// spawn that cannot be served fails here first, with the reason).
pub(crate) const RESTORE_WAIT: Duration = Duration::from_secs(2);

/// What the shell must do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum GateCommand<T> {
    /// Handle this message now.
    Release(T),
    /// Ask the coordinator for the files of `step` (one ask per step at a time).
    Fetch {
        /// The checkpoint step.
        step: u64,
    },
    /// An order waited [`RESTORE_WAIT`] (or was pushed out) without its files: say so; it is
    /// released next and will fail to restore.
    GaveUp {
        /// The range.
        range: u32,
        /// The step.
        step: u64,
    },
}

struct Held<T> {
    range: u32,
    /// `Some(step)`: an order to restore `step`; `None`: a message behind one.
    restore: Option<u64>,
    since: Instant,
    item: T,
}

/// The gate of one job on one node.
pub(crate) struct RestoreGate<T> {
    held: VecDeque<Held<T>>,
    /// Steps asked for and not yet stored, with when they were asked.
    asked: Vec<(u64, Instant)>,
}

impl<T> Default for RestoreGate<T> {
    fn default() -> Self {
        Self { held: VecDeque::new(), asked: Vec::new() }
    }
}

impl<T> RestoreGate<T> {
    /// Nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// An order to restore `range` at `step`; `have` says whether this node holds the files
    /// of `range` at `step` now.
    pub(crate) fn restore(&mut self, range: u32, step: u64, have: bool, item: T, now: Instant) -> Vec<GateCommand<T>> {
        if have && !self.holds_range(range) {
            return vec![GateCommand::Release(item)];
        }
        let mut out = Vec::new();
        if !have && !self.asked.iter().any(|(s, _)| *s == step) {
            self.asked.push((step, now));
            out.push(GateCommand::Fetch { step });
        }
        self.hold(Held { range, restore: Some(step), since: now, item }, now, &mut out);
        out
    }

    /// Any other message for aggregator `range`: it waits behind an order held for the range.
    pub(crate) fn message(&mut self, range: u32, item: T, now: Instant) -> Vec<GateCommand<T>> {
        if !self.holds_range(range) {
            return vec![GateCommand::Release(item)];
        }
        let mut out = Vec::new();
        self.hold(Held { range, restore: None, since: now, item }, now, &mut out);
        out
    }

    /// Files were stored: `have(range, step)` says what this node holds now.
    pub(crate) fn on_files(&mut self, have: impl Fn(u32, u64) -> bool, now: Instant) -> Vec<GateCommand<T>> {
        self.asked.retain(|(step, _)| !self.held.iter().any(|h| h.restore == Some(*step) && have(h.range, *step)));
        self.release(|h| have(h.range, h.restore.unwrap_or_default()), now, false)
    }

    /// The clock advanced: orders that waited [`RESTORE_WAIT`] go on without their files.
    pub(crate) fn on_tick(&mut self, now: Instant) -> Vec<GateCommand<T>> {
        if self.held.is_empty() {
            self.asked.clear();
            return Vec::new();
        }
        self.asked.retain(|(_, at)| now.saturating_duration_since(*at) < RESTORE_WAIT);
        self.release(|_| false, now, false)
    }

    fn holds_range(&self, range: u32) -> bool {
        self.held.iter().any(|h| h.range == range)
    }

    fn hold(&mut self, held: Held<T>, now: Instant, out: &mut Vec<GateCommand<T>>) {
        self.held.push_back(held);
        if self.held.len() > MAX_HELD {
            out.extend(self.release(|_| false, now, true));
        }
    }

    /// Release, per range in arrival order, every order `ready` says may go (or that timed
    /// out; with `push_out`, the oldest order whatever it waits for) and the messages behind
    /// it, up to the range's next order that still waits.
    fn release(&mut self, ready: impl Fn(&Held<T>) -> bool, now: Instant, push_out: bool) -> Vec<GateCommand<T>> {
        let mut out = Vec::new();
        let mut pushed = false;
        let mut blocked: Vec<u32> = Vec::new();
        let mut kept = VecDeque::with_capacity(self.held.len());
        for h in std::mem::take(&mut self.held) {
            if blocked.contains(&h.range) {
                kept.push_back(h);
                continue;
            }
            if let Some(step) = h.restore {
                let late = now.saturating_duration_since(h.since) >= RESTORE_WAIT;
                let push = push_out && !pushed;
                if !(ready(&h) || late || push) {
                    blocked.push(h.range);
                    kept.push_back(h);
                    continue;
                }
                pushed |= push;
                if !ready(&h) {
                    out.push(GateCommand::GaveUp { range: h.range, step });
                }
            }
            out.push(GateCommand::Release(h.item));
        }
        self.held = kept;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(cmds: &[GateCommand<&'static str>]) -> Vec<&'static str> {
        cmds.iter()
            .filter_map(|c| match c {
                GateCommand::Release(m) => Some(*m),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_order_whose_files_are_here_passes_at_once() {
        let mut g = RestoreGate::default();
        let now = Instant::now();
        assert_eq!(g.restore(1, 40, true, "spawn", now), vec![GateCommand::Release("spawn")]);
        assert_eq!(g.message(1, "gradient", now), vec![GateCommand::Release("gradient")]);
        assert!(g.is_empty());
    }

    #[test]
    fn an_order_without_its_files_fetches_them_and_holds_what_follows_for_its_range_only() {
        let mut g = RestoreGate::default();
        let now = Instant::now();
        assert_eq!(g.restore(1, 40, false, "rollback 1", now), vec![GateCommand::Fetch { step: 40 }]);
        assert!(g.restore(2, 40, false, "rollback 2", now).is_empty(), "step 40 is asked for already");
        assert!(g.message(1, "gradient for 1", now).is_empty());
        assert_eq!(released(&g.message(0, "gradient for 0", now)), ["gradient for 0"], "range 0 waits for nothing");
        // Range 2's file came first: it goes with what follows it; range 1 still waits.
        assert_eq!(released(&g.on_files(|r, s| (r, s) == (2, 40), now)), ["rollback 2"]);
        assert_eq!(released(&g.on_files(|_, s| s == 40, now)), ["rollback 1", "gradient for 1"]);
        assert!(g.is_empty());
    }

    #[test]
    fn a_second_order_for_a_range_waits_behind_the_first() {
        let mut g = RestoreGate::default();
        let now = Instant::now();
        g.restore(1, 40, false, "rollback 40", now);
        g.message(1, "gradient", now);
        // The files of 20 are here, but the order for 20 came after the one for 40.
        assert!(g.restore(1, 20, true, "rollback 20", now).is_empty());
        let cmds = g.on_files(|_, s| s == 40 || s == 20, now);
        assert_eq!(released(&cmds), ["rollback 40", "gradient", "rollback 20"]);
    }

    #[test]
    fn an_order_that_waits_too_long_goes_on_and_says_so() {
        let mut g = RestoreGate::default();
        let now = Instant::now();
        g.restore(1, 40, false, "spawn", now);
        g.message(1, "gradient", now);
        assert!(g.on_tick(now + RESTORE_WAIT - Duration::from_millis(1)).is_empty());
        let cmds = g.on_tick(now + RESTORE_WAIT);
        assert_eq!(cmds[0], GateCommand::GaveUp { range: 1, step: 40 });
        assert_eq!(released(&cmds), ["spawn", "gradient"]);
        // A later order for the same step asks again.
        assert_eq!(g.restore(1, 40, false, "again", now + RESTORE_WAIT), vec![GateCommand::Fetch { step: 40 }]);
    }

    #[test]
    fn the_lot_is_bounded() {
        let mut g = RestoreGate::default();
        let now = Instant::now();
        g.restore(0, 40, false, "order", now);
        let mut out = Vec::new();
        for _ in 0..MAX_HELD {
            out.extend(g.message(0, "m", now));
        }
        assert!(out.iter().any(|c| matches!(c, GateCommand::GaveUp { range: 0, step: 40 })));
        assert_eq!(released(&out).len(), MAX_HELD + 1);
        assert!(g.is_empty());
    }
}
