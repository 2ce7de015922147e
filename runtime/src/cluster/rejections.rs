//! Messages a node drops, counted per member and kind, and reported at a bounded rate.
//!
//! A member may send what it must not — an order only the coordinator gives, a value out of
//! range, a frame that breaks the codec — and a broken or hostile one may send a great many.
//! Each is counted at once (the node's `rejected_messages{kind}` metric), but reported as a
//! [`NodeEventKind::MessageRejected`] at most once per (member, kind) per
//! [`REPORT_INTERVAL`], carrying the running total of that kind from that member. A
//! rejection inside the interval is remembered as pending, and [`Rejections::flush`] reports
//! it once the interval has passed, so **the last event of a burst always carries the final
//! total** — what a reader of the events (the chaos harness) compares against what was sent.
//!
//! ```text
//!  t=0    record → event (count 1)
//!  t=10   record → none  (count 2, pending)
//!  t=40   record → none  (count 3, pending)
//!  t=250  flush  → event (count 3)
//! ```
//!
//! Sans-IO: the caller passes the clock, so every order is unit-tested.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use phalanx::cluster::event::NodeEventKind;
//! use phalanx::cluster::rejections::{Rejections, REPORT_INTERVAL};
//!
//! let mut r = Rejections::new();
//! let t0 = Instant::now();
//! let first = r.record(3, "job-done", "not the coordinator", t0);
//! assert!(matches!(first, Some(NodeEventKind::MessageRejected { peer: 3, count: 1, .. })));
//! assert!(r.record(3, "job-done", "not the coordinator", t0 + Duration::from_millis(10)).is_none());
//! assert!(r.flush(t0 + Duration::from_millis(20)).is_empty(), "within the interval");
//! let last = r.flush(t0 + REPORT_INTERVAL);
//! assert!(matches!(last.as_slice(), [NodeEventKind::MessageRejected { count: 2, .. }]));
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::event::{Emitter, NodeEventKind};
use crate::metrics::{Kind, NodeMetrics};

/// Least time between two events about the same (member, kind).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Most (member, kind) pairs counted one by one; beyond, rejections are only counted in
/// [`Rejections::untracked`] (and the metric). Kinds are a fixed set and members a
/// configured one, so this is never reached by a cluster of any real size.
pub const MAX_TRACKED: usize = 4096;

/// The kind of a frame that broke the frame size limit (an oversized length prefix).
pub const OVERSIZED_FRAME: &str = "oversized-frame";
/// The kind of any other frame that could not be decoded (bad framing, an unknown header,
/// tensors that do not match their header).
pub const MALFORMED_FRAME: &str = "malformed-frame";

/// One (member, kind).
#[derive(Debug)]
struct Entry {
    /// Dropped so far.
    count: u64,
    /// When the last event went out.
    reported_at: Instant,
    /// The reason of the newest rejection not reported yet (none: the last event carries
    /// the current total).
    pending: Option<String>,
}

/// The rejections of one node: running totals per (member, kind), and which totals have not
/// been reported yet.
#[derive(Debug, Default)]
pub struct Rejections {
    entries: BTreeMap<(u32, &'static str), Entry>,
    untracked: u64,
}

impl Rejections {
    /// No rejection yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one message of `kind` from `peer`, dropped for `reason`, at `now`. Returns the
    /// event to emit now: one if no event about this (member, kind) went out within the last
    /// [`REPORT_INTERVAL`]; otherwise none, and the total waits for [`flush`](Self::flush).
    pub fn record(
        &mut self,
        peer: u32,
        kind: &'static str,
        reason: impl Into<String>,
        now: Instant,
    ) -> Option<NodeEventKind> {
        let reason = reason.into();
        if !self.entries.contains_key(&(peer, kind)) && self.entries.len() >= MAX_TRACKED {
            self.untracked = self.untracked.saturating_add(1);
            return None;
        }
        let entry = self.entries.entry((peer, kind)).or_insert(Entry { count: 0, reported_at: now, pending: None });
        let first = entry.count == 0;
        entry.count = entry.count.saturating_add(1);
        if first || now.saturating_duration_since(entry.reported_at) >= REPORT_INTERVAL {
            entry.reported_at = now;
            entry.pending = None;
            Some(event(peer, kind, reason, entry.count))
        } else {
            entry.pending = Some(reason);
            None
        }
    }

    /// The events of the pending totals whose interval has passed at `now` (call it on every
    /// tick): the final totals of bursts that ended.
    pub fn flush(&mut self, now: Instant) -> Vec<NodeEventKind> {
        self.take_pending(|e| now.saturating_duration_since(e.reported_at) >= REPORT_INTERVAL, now)
    }

    /// The events of every pending total, whatever the time (the node is stopping).
    pub fn flush_all(&mut self, now: Instant) -> Vec<NodeEventKind> {
        self.take_pending(|_| true, now)
    }

    fn take_pending(&mut self, due: impl Fn(&Entry) -> bool, now: Instant) -> Vec<NodeEventKind> {
        let mut out = Vec::new();
        for ((peer, kind), entry) in &mut self.entries {
            if entry.pending.is_some() && due(entry) {
                let reason = entry.pending.take().unwrap_or_default();
                entry.reported_at = now;
                out.push(event(*peer, kind, reason, entry.count));
            }
        }
        out
    }

    /// Messages of `kind` from `peer` dropped so far.
    pub fn count(&self, peer: u32, kind: &str) -> u64 {
        self.entries.iter().find(|((p, k), _)| *p == peer && *k == kind).map_or(0, |(_, e)| e.count)
    }

    /// Rejections not counted per (member, kind) because [`MAX_TRACKED`] pairs were already.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Counts one rejection in the node's `rejected_messages{kind}` metric and here, logs it,
    /// and emits its event if one is due.
    pub(crate) fn reject(
        &mut self,
        metrics: &NodeMetrics,
        emitter: &Emitter,
        peer: u32,
        kind: &'static str,
        reason: String,
        now: Instant,
    ) {
        metrics.rejected_messages.get_or_create(&Kind::of(kind)).inc();
        tracing::debug!(node = emitter.node, peer, kind, "dropped a message from node {peer}: {reason}");
        if let Some(event) = self.record(peer, kind, reason, now) {
            emitter.emit(event);
        }
    }

    /// Emits the events [`flush`](Self::flush) returns at `now`.
    pub(crate) fn emit_due(&mut self, emitter: &Emitter, now: Instant) {
        for event in self.flush(now) {
            emitter.emit(event);
        }
    }
}

fn event(peer: u32, kind: &str, reason: String, count: u64) -> NodeEventKind {
    NodeEventKind::MessageRejected { peer, kind: kind.to_string(), reason, count }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn count_of(e: &NodeEventKind) -> (u32, String, u64) {
        match e {
            NodeEventKind::MessageRejected { peer, kind, count, .. } => (*peer, kind.clone(), *count),
            other => panic!("not a rejection: {other:?}"),
        }
    }

    #[test]
    fn the_first_rejection_is_reported_at_once_and_a_burst_once_per_interval() {
        let mut r = Rejections::new();
        let t0 = Instant::now();
        let first = r.record(2, "spawn", "not the coordinator", t0).expect("the first is reported");
        assert_eq!(count_of(&first), (2, "spawn".into(), 1));
        // 99 more within the interval: none reported, all counted.
        for i in 1..100 {
            assert!(r.record(2, "spawn", "not the coordinator", t0 + ms(i)).is_none());
        }
        assert_eq!(r.count(2, "spawn"), 100);
        // One past the interval is reported at once, with the running total.
        let e = r.record(2, "spawn", "again", t0 + REPORT_INTERVAL).expect("due");
        assert_eq!(count_of(&e), (2, "spawn".into(), 101));
        // Nothing pending afterwards.
        assert!(r.flush_all(t0 + REPORT_INTERVAL * 10).is_empty());
    }

    #[test]
    fn the_last_event_of_a_burst_carries_the_final_total() {
        let mut r = Rejections::new();
        let t0 = Instant::now();
        let mut events: Vec<NodeEventKind> = Vec::new();
        // A burst of 7, 10 ms apart, with flushes on a 20 ms tick throughout and after.
        for i in 0..7u64 {
            events.extend(r.record(1, "view", format!("view {i}"), t0 + ms(10 * i)));
            if i % 2 == 0 {
                events.extend(r.flush(t0 + ms(10 * i)));
            }
        }
        assert_eq!(events.len(), 1, "one event inside the interval: {events:?}");
        for tick in (80..600).step_by(20) {
            events.extend(r.flush(t0 + ms(tick)));
        }
        assert_eq!(events.len(), 2, "{events:?}");
        let NodeEventKind::MessageRejected { count, reason, .. } = events.last().expect("two") else { panic!() };
        assert_eq!((*count, reason.as_str()), (7, "view 6"), "the final total and the last reason");
        // Nothing more to say.
        assert!(r.flush(t0 + ms(10_000)).is_empty());
    }

    #[test]
    fn members_and_kinds_are_counted_and_rate_limited_apart() {
        let mut r = Rejections::new();
        let t0 = Instant::now();
        assert!(r.record(1, "job-done", "x", t0).is_some());
        assert!(r.record(2, "job-done", "x", t0).is_some(), "another member");
        assert!(r.record(1, "rollback", "x", t0).is_some(), "another kind");
        assert!(r.record(1, "job-done", "x", t0 + ms(1)).is_none());
        assert_eq!((r.count(1, "job-done"), r.count(2, "job-done"), r.count(1, "rollback")), (2, 1, 1));
        assert_eq!(r.count(3, "job-done"), 0);
        let flushed: Vec<_> = r.flush_all(t0 + ms(2)).iter().map(count_of).collect();
        assert_eq!(flushed, vec![(1, "job-done".into(), 2)]);
    }

    #[test]
    fn the_pairs_tracked_are_bounded() {
        let mut r = Rejections::new();
        let t0 = Instant::now();
        for peer in 0..MAX_TRACKED as u32 {
            assert!(r.record(peer, "params", "x", t0).is_some());
        }
        assert!(r.record(u32::MAX, "params", "x", t0).is_none(), "one pair too many");
        assert_eq!((r.untracked(), r.count(u32::MAX, "params")), (1, 0));
        // Pairs already tracked go on being counted.
        assert!(r.record(0, "params", "x", t0 + REPORT_INTERVAL).is_some());
        assert_eq!(r.count(0, "params"), 2);
    }
}
