//! Membership and failure detection (sans-IO).
//!
//! Every node heartbeats every other configured member. A member not heard
//! from within `failure_timeout_ms` is considered down. The **coordinator**
//! issues views; it stays coordinator while it is alive and has a majority
//! (*sticky*: a node that comes back with a lower id joins its view rather
//! than taking over, which would restart the job from its older checkpoints).
//! When no live coordinator is known — at start, or after the coordinator
//! died — the lowest live id takes over. Heartbeats carry the sender's view
//! (epoch and coordinator), so a returning node learns who coordinates
//! before it could claim the role. A view carries an
//! **epoch** (a term number): a node adopts a view only if its epoch is
//! higher than any it has seen, so a stale coordinator — one that was paused
//! or cut off and wakes up — cannot override the current one. Only a side
//! that sees a strict majority of the configured members may issue views;
//! the minority side stops and waits (no split brain).
//!
//! **Authority.** A node takes a view only from the node its own rules elect:
//! the live coordinator it knows of, or the member that would succeed it (the
//! lowest live id besides it). Epochs move by bounded steps: a view at most
//! [`MAX_EPOCH_STEP`] above the highest epoch this node knows, a heartbeat
//! raising that by at most as much. Everything else is counted and dropped
//! ([`MembershipCommand::Rejected`]).
//!
//! ```text
//!  tick ──▶ heartbeats out; silent members ──▶ down ──▶ (coordinator with quorum) ──▶ View{epoch+1}
//!  heartbeat in ──▶ member up ──▶ (coordinator) ──▶ View{epoch+1} with it
//!  View in (epoch > seen) ──▶ adopt; epoch ≤ seen ──▶ ignored (fenced)
//! ```

use phalanx_actors::clock;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Heartbeat period on a LAN by default.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// Silence after which a member counts as down: four and a half heartbeat periods of
/// tolerance — the kill lands between two heartbeats, so the survivors notice 350–450 ms after
/// it (plus one node-loop tick). A process that died on a live host is found sooner: after two
/// heartbeat periods of silence its host refuses a probe ([`DetectorConfig::probe`]). The
/// chaos campaign checks that no live member is ever declared down (`no-false-detection`).
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 450;

/// The highest view epoch a node issues or accepts. A job supervisor's
/// generations carry the epoch of its view in their high 32 bits (see
/// `node_job::first_generation`), so a larger epoch would not fence anything;
/// a heartbeat or view claiming one is dropped, and a node whose epochs run
/// out issues no more views (four billion view changes: never in practice).
pub const MAX_EPOCH: u64 = u32::MAX as u64;

/// The most a view's epoch may run ahead of the highest epoch a node knows, and
/// the most one heartbeat raises it by. A node away while the cluster went
/// through more views catches up in a few heartbeats; a member announcing
/// epochs near [`MAX_EPOCH`] cannot use up the range in one message.
pub const MAX_EPOCH_STEP: u64 = 1024;

/// Detector settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Heartbeat period in milliseconds.
    pub heartbeat_ms: u64,
    /// Silence, in milliseconds, after which a member counts as down.
    pub failure_timeout_ms: u64,
    /// The coordinator's lease in milliseconds (see [`Membership::lease`]); default: the
    /// failure timeout. At least two heartbeats, so that a lease is renewed before it runs out.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Probe a member silent for two heartbeat periods: ask its host whether a process still
    /// listens at its address ([`MembershipCommand::Probe`]); if the host says none does (ICMP
    /// port unreachable: the process died, its host is up), the member is down at once
    /// instead of after the failure timeout ([`Membership::on_gone`]). A paused or cut-off
    /// member, a dead host or a network that filters ICMP gives no such answer, and the
    /// failure timeout decides as before. Default: on.
    #[serde(default = "probe_default")]
    pub probe: bool,
}

fn probe_default() -> bool {
    true
}

impl DetectorConfig {
    /// The lease period.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.unwrap_or(self.failure_timeout_ms))
    }

    /// The silence after which a member is probed, and after which its host's answer that
    /// no process listens there makes it down: two heartbeat periods (a live member has
    /// sent two heartbeats by then), if that is below the failure timeout.
    pub fn probe_after(&self) -> Option<Duration> {
        let after = self.heartbeat_ms.saturating_mul(2);
        (self.probe && after < self.failure_timeout_ms).then(|| Duration::from_millis(after))
    }
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            failure_timeout_ms: DEFAULT_FAILURE_TIMEOUT_MS,
            lease_ms: None,
            probe: true,
        }
    }
}

/// A node's lease as its actors read it: published by the node loop after every
/// membership event, read by the coordinator's aggregators before every step
/// (`Cluster::may_commit`). Times are microseconds since the cell was made;
/// reading takes two atomic loads and a clock read.
#[derive(Debug)]
pub struct LeaseCell {
    base: Instant,
    from_us: std::sync::atomic::AtomicU64,
    until_us: std::sync::atomic::AtomicU64,
    /// Fault injection (the simulation tier's pause): the node stands still, so nothing
    /// on it commits, whatever the lease says.
    #[cfg(feature = "fault-injection")]
    frozen: std::sync::atomic::AtomicBool,
}

impl Default for LeaseCell {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseCell {
    /// No lease.
    pub fn new() -> Self {
        Self {
            base: clock::now(),
            from_us: std::sync::atomic::AtomicU64::new(u64::MAX),
            until_us: std::sync::atomic::AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    /// Publish [`Membership::lease`].
    pub fn set(&self, lease: Option<(Instant, Instant)>) {
        use std::sync::atomic::Ordering::Release;
        let (from, until) = lease.map_or((u64::MAX, 0), |(f, u)| (self.micros(f), self.micros(u)));
        // Narrow first, widen last: a reader between the stores never sees a wider lease.
        self.until_us.store(0, Release);
        self.from_us.store(from, Release);
        self.until_us.store(until, Release);
    }

    /// Fault injection: while `frozen`, [`holds_at`](Self::holds_at) is false (the node is
    /// paused: its aggregators wait, as a stopped process would, and on waking read the lease
    /// the loop last published, before the loop has heard anything new).
    #[cfg(feature = "fault-injection")]
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, std::sync::atomic::Ordering::Release);
    }

    /// True when the lease holds at `now`.
    pub fn holds_at(&self, now: Instant) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        #[cfg(feature = "fault-injection")]
        if self.frozen.load(Acquire) {
            return false;
        }
        let now = self.micros(now);
        self.from_us.load(Acquire) <= now && now < self.until_us.load(Acquire)
    }

    /// True when the lease holds now.
    pub fn holds(&self) -> bool {
        self.holds_at(clock::now())
    }
}

/// The cluster as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Term number; every placement change bumps it.
    pub epoch: u64,
    /// The node that issued the view (the lowest live id).
    pub coordinator: u32,
    /// Live members.
    pub members: BTreeSet<u32>,
}

/// Messages between the membership cores of nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipMsg {
    /// I am alive; what I know of views.
    Heartbeat {
        /// Epoch of the view the sender has adopted (0: none).
        view_epoch: u64,
        /// The highest epoch the sender has seen anywhere.
        highest_epoch: u64,
        /// Coordinator of the view the sender has adopted.
        coordinator: Option<u32>,
        /// When the sender sent it, in microseconds of the sender's own clock.
        sent_us: u64,
        /// The newest `sent_us` the sender has had from the receiver, when it
        /// acknowledges the receiver as its coordinator: the receiver's lease
        /// runs from that moment of its own clock (see [`Membership::lease`]).
        echo_us: Option<u64>,
        /// How long ago (µs) the sender received the newest heartbeat of another
        /// coordinator that it acknowledged, or last coordinated itself — that
        /// coordinator's lease through the sender ends a lease after it (since the
        /// sender's start when none).
        released_us: u64,
    },
    /// The coordinator's view.
    View(View),
}

/// What the node must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipCommand {
    /// Send to a member.
    Send(u32, MembershipMsg),
    /// A new view was adopted (issued here or received).
    Adopted(View),
    /// A member was declared down: silent for the failure timeout (detection time is now).
    Down(u32),
    /// A member was declared down: silent, and its host said no process listens at its
    /// address any more ([`Membership::on_gone`]; detection time is now). The same for the
    /// node as [`Down`](Self::Down); only the cause differs.
    Gone(u32),
    /// A member was declared down: another process with its id connected
    /// ([`Membership::on_restarted`]). The same for the node as [`Down`](Self::Down).
    Restarted(u32),
    /// Ask the member's host whether a process still listens at its address (it has been
    /// silent for [`DetectorConfig::probe_after`]); an answer that none does goes to
    /// [`Membership::on_gone`].
    Probe(u32),
    /// This node no longer sees a majority: stop training and wait.
    QuorumLost,
    /// The adopted view lost to another coordinator's (see `reconcile`): this node follows
    /// no view until the winner's arrives. If it coordinated, its term is over — should it
    /// coordinate again later, that is a new term.
    GaveUp(View),
    /// A message from a member was dropped: it was not entitled to send it (a
    /// view from a node these rules do not elect) or a value in it is out of bounds.
    Rejected {
        /// The member.
        peer: u32,
        /// The message kind (`view`, `heartbeat`).
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

/// The membership state machine of one node.
pub struct Membership {
    me: u32,
    members: BTreeSet<u32>,
    config: DetectorConfig,
    last_heard: BTreeMap<u32, Instant>,
    up: BTreeSet<u32>,
    view: Option<View>,
    highest_epoch: u64,
    last_heartbeat: Option<Instant>,
    had_quorum: bool,
    /// First tick with a majority heard (since start, or since the quorum was
    /// lost); until a failure timeout has passed since, a node that has not
    /// heard every member does not coordinate: it may simply not have heard
    /// the coordinator yet (a restarted or healed node must not usurp it).
    started: Option<Instant>,
    settled: bool,
    /// Lost its quorum and has not settled since: it must wait out the whole
    /// settling window even if it hears every member at once, because what it
    /// hears first are the messages queued while it was away (a pause, a cut),
    /// which describe the cluster as it was.
    rejoining: bool,
    /// The view each member last said it had adopted: (epoch, coordinator).
    reported: BTreeMap<u32, (u64, u32)>,
    /// Messages from members dropped because a value in them is out of bounds.
    rejected: u64,
    /// The clock heartbeats' `sent_us` count from (the first moment this core saw).
    base: Option<Instant>,
    /// The newest `sent_us` each member sent (its clock) and when it came, echoed back
    /// to it as an acknowledgement.
    heard_sent: BTreeMap<u32, (u64, Instant)>,
    /// For each coordinator this node acknowledged, when it received the newest
    /// heartbeat of it that it echoed; for this node, when it last coordinated.
    echoed: BTreeMap<u32, Instant>,
    /// This node's coordination term, while it coordinates.
    term: Option<Term>,
    /// False only in tests showing what leases prevent (see [`Membership::without_leases`]).
    leases: bool,
    /// When each silent member was last probed (at most one probe per heartbeat period).
    probed: BTreeMap<u32, Instant>,
    /// The newest moment any event reached this core (see [`Membership::catch_up`]).
    last_event: Option<Instant>,
}

/// A run of views this node coordinates without another coordinator between them.
#[derive(Clone, Debug)]
struct Term {
    /// The epoch of the view this node started the term with.
    epoch: u64,
    /// For each member, the newest moment of this node's clock (µs since `base`) it
    /// acknowledged this node as coordinator at.
    acks: BTreeMap<u32, u64>,
    /// For each acknowledging member, the newest moment it could have acknowledged
    /// another coordinator (see `released_us`).
    released: BTreeMap<u32, Instant>,
    /// When this term may commit: a lease after the last moment any member of the
    /// first acknowledging majority (this node included) acknowledged another
    /// coordinator. Set once that majority is there.
    ready_at: Option<Instant>,
    /// When the term began (this node adopted the view it started with).
    began: Instant,
    /// The lease ran out since the term began (a pause, a cut): another coordinator may
    /// have been acknowledged, and have committed, meanwhile.
    lapsed: bool,
}

impl Membership {
    /// Node `me` of a cluster configured with `members` (which includes `me`).
    pub fn new(me: u32, members: impl IntoIterator<Item = u32>, config: DetectorConfig) -> Self {
        let mut members: BTreeSet<u32> = members.into_iter().collect();
        members.insert(me);
        Self {
            me,
            members,
            config,
            last_heard: BTreeMap::new(),
            up: [me].into_iter().collect(),
            view: None,
            highest_epoch: 0,
            last_heartbeat: None,
            had_quorum: false,
            started: None,
            settled: false,
            rejoining: false,
            reported: BTreeMap::new(),
            rejected: 0,
            base: None,
            heard_sent: BTreeMap::new(),
            echoed: BTreeMap::new(),
            term: None,
            leases: true,
            probed: BTreeMap::new(),
            last_event: None,
        }
    }

    /// A core whose coordinator commits without a lease: only for tests that show
    /// what leases prevent (two coordinators committing at once after a pause).
    pub fn without_leases(mut self) -> Self {
        self.leases = false;
        self
    }

    fn micros(&mut self, now: Instant) -> u64 {
        let base = *self.base.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX)
    }

    /// When this node may commit steps as coordinator: `(from, until)` of its
    /// lease, or none while it does not coordinate or no majority acknowledges it.
    ///
    /// A member acknowledges its coordinator in every heartbeat by echoing the
    /// newest `sent_us` it has from it; the lease runs from the *send* time the
    /// echo names (this node's own clock, so neither network delay nor a pause
    /// can stretch it) for [`DetectorConfig::lease`], and holds while a majority
    /// of the configured members (this node included) has acknowledged within it.
    /// A member stops acknowledging once it adopts another coordinator's view,
    /// and tells the new one how long ago it last acknowledged another; the new
    /// coordinator commits from a lease after the latest such moment of a
    /// majority (`from`, this node's own included) — any majority the old one
    /// could still count includes one of those members, so every lease of its
    /// predecessor has run out by then, and two coordinators never commit at the
    /// same time. After a crash or a pause the wait is already over when the
    /// successor takes over (detection took a failure timeout); after a cut that
    /// left the old coordinator heard by some, it waits out that lease.
    pub fn lease(&self, now: Instant) -> Option<(Instant, Instant)> {
        let view = self.view.as_ref().filter(|v| v.coordinator == self.me)?;
        if !self.leases {
            return Some((now, now + Duration::from_secs(3600)));
        }
        let term = self.term.as_ref()?;
        let base = self.base?;
        let lease = self.config.lease();
        let from = term.ready_at?;
        let need = self.members.len() / 2; // acknowledgements besides this node's own
        if need == 0 {
            return Some((from, now + lease));
        }
        let mut acks: Vec<u64> = term.acks.iter().filter(|(m, _)| view.members.contains(m)).map(|(_, t)| *t).collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let oldest_needed = *acks.get(need - 1)?;
        Some((from, base + Duration::from_micros(oldest_needed) + lease))
    }

    /// The epoch this node's current coordination term began in, while it coordinates.
    pub fn term(&self) -> Option<u64> {
        self.term.as_ref().map(|t| t.epoch)
    }

    /// Keep the term in step with the view: a new one when this node starts
    /// coordinating, none when it stops; note when a majority first acknowledged it.
    ///
    /// A term whose lease ran out starts over with fresh acknowledgements. If they show
    /// that a member acknowledged another coordinator after the term began, that
    /// coordinator may have committed in between, and this term must not go on after
    /// it: the term ends — the view is given up ([`MembershipCommand::GaveUp`]), and
    /// this node joins the newest live coordinator or, if that is still itself, issues
    /// a new view that begins a new term. So each term's commits form one interval of
    /// time, and the intervals of two terms never overlap.
    fn track_term(&mut self, now: Instant) -> Vec<MembershipCommand> {
        let coordinating = self.view.as_ref().is_some_and(|v| v.coordinator == self.me);
        if !coordinating {
            self.term = None;
            return Vec::new();
        }
        // Coordinating counts as acknowledging a coordinator (this node) for what it
        // tells the next one: a member that coordinated after a term began shows that
        // term that another coordinator may have committed meanwhile.
        self.echoed.insert(self.me, now);
        let need = self.members.len() / 2;
        let epoch = self.view.as_ref().map_or(0, |v| v.epoch);
        let own = self.released_since(self.me);
        let holds = self.lease(now).is_some_and(|(_, until)| now < until);
        let lease = self.config.lease();
        let term = self.term.get_or_insert_with(|| Term {
            epoch,
            acks: BTreeMap::new(),
            released: BTreeMap::new(),
            ready_at: None,
            began: now,
            lapsed: false,
        });
        if term.ready_at.is_some() && !holds {
            // The lease ran out (a pause, a cut): the term starts over — fresh
            // acknowledgements, and a wait if members acknowledged another coordinator
            // meanwhile (its lease may still run).
            term.ready_at = None;
            term.acks.clear();
            term.released.clear();
            term.lapsed = true;
        }
        if term.ready_at.is_none() && term.acks.len() >= need {
            let last = term.released.values().copied().chain(own).max().unwrap_or(now);
            if term.lapsed && last > term.began {
                let (began, epoch) = (term.began, term.epoch);
                self.term = None;
                let Some(lost) = self.view.take() else { return Vec::new() };
                tracing::info!(
                    node = self.me,
                    epoch,
                    "coordination term of epoch {epoch} ended: its lease ran out and a member acknowledged \
                     another coordinator {:?} after it began",
                    last.saturating_duration_since(began)
                );
                let mut out = vec![MembershipCommand::GaveUp(lost)];
                out.extend(self.reconcile());
                out.extend(self.track_term(now));
                return out;
            }
            term.ready_at = Some(last + lease);
        }
        Vec::new()
    }

    /// The newest moment this node acknowledged a coordinator other than `other`, or
    /// coordinated itself if `other` is another node (its start when neither).
    fn released_since(&self, other: u32) -> Option<Instant> {
        let echoed = self.echoed.iter().filter(|(c, _)| **c != other).map(|(_, t)| *t).max();
        echoed.or(self.base).map(|t| t.max(self.base.unwrap_or(t)))
    }

    /// Messages from members dropped because a value in them is out of bounds:
    /// an epoch above [`MAX_EPOCH`], a coordinator or view member that is not a
    /// configured member, a view not issued by its sender.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Why a message from member `from` cannot be taken, if it cannot.
    fn check(&self, from: u32, msg: &MembershipMsg, now_us: u64) -> Result<(), String> {
        match msg {
            MembershipMsg::Heartbeat { view_epoch, highest_epoch, coordinator, echo_us, .. } => {
                if echo_us.is_some_and(|e| e > now_us) {
                    return Err(format!(
                        "an acknowledgement of a heartbeat this node sends only in the future ({echo_us:?} µs)"
                    ));
                }
                if (*view_epoch).max(*highest_epoch) > MAX_EPOCH {
                    return Err(format!("epochs {view_epoch}/{highest_epoch} above {MAX_EPOCH}"));
                }
                if let Some(c) = coordinator.filter(|c| !self.members.contains(c)) {
                    return Err(format!("coordinator {c} is not a configured member"));
                }
            }
            MembershipMsg::View(view) => {
                if view.epoch > MAX_EPOCH {
                    return Err(format!("view epoch {} above {MAX_EPOCH}", view.epoch));
                }
                let bound = self.highest_epoch.saturating_add(MAX_EPOCH_STEP);
                if view.epoch > bound {
                    return Err(format!(
                        "view epoch {} is more than {MAX_EPOCH_STEP} above the highest epoch known here ({})",
                        view.epoch, self.highest_epoch
                    ));
                }
                if view.coordinator != from || !view.members.contains(&from) {
                    return Err(format!("a view of coordinator {} sent by node {from}", view.coordinator));
                }
                if let Some(m) = view.members.iter().find(|m| !self.members.contains(m)) {
                    return Err(format!("view member {m} is not a configured member"));
                }
            }
        }
        Ok(())
    }

    /// This node's id.
    pub fn me(&self) -> u32 {
        self.me
    }
    /// The adopted view, if any.
    pub fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }
    /// Members this node currently hears (itself included).
    pub fn up(&self) -> &BTreeSet<u32> {
        &self.up
    }
    /// When member `peer` was last heard from (for the detection-time metric).
    pub fn last_heard(&self, peer: u32) -> Option<Instant> {
        self.last_heard.get(&peer).copied()
    }
    /// True when this node hears a strict majority of the configured members.
    pub fn has_quorum(&self) -> bool {
        self.up.len() * 2 > self.members.len()
    }
    /// True when this node is the coordinator of the adopted view.
    pub fn is_coordinator(&self) -> bool {
        self.view.as_ref().is_some_and(|v| v.coordinator == self.me)
    }

    /// Advance the clock: heartbeat if due, declare silent members down,
    /// and (as coordinator with quorum) issue a new view if membership changed.
    pub fn on_tick(&mut self, now: Instant) -> Vec<MembershipCommand> {
        let mut out = self.catch_up(now);
        // The settling window opens when this node (again) hears a majority:
        // from then on it gives every member a failure timeout to be heard.
        if self.has_quorum() {
            let started = *self.started.get_or_insert(now);
            if now.saturating_duration_since(started) >= Duration::from_millis(self.config.failure_timeout_ms) {
                self.settled = true;
                self.rejoining = false;
            }
        }
        let period = Duration::from_millis(self.config.heartbeat_ms);
        if self.last_heartbeat.is_none_or(|t| now.saturating_duration_since(t) >= period) {
            self.last_heartbeat = Some(now);
            let sent_us = self.micros(now);
            for &m in self.members.iter().filter(|m| **m != self.me) {
                let view_epoch = self.view.as_ref().map_or(0, |v| v.epoch);
                let coordinator = self.view.as_ref().map(|v| v.coordinator);
                // Acknowledge the coordinator (only it) with its own newest send time.
                let echo = self.heard_sent.get(&m).copied().filter(|_| coordinator == Some(m));
                if let Some((_, received)) = echo {
                    let newest = self.echoed.entry(m).or_insert(received);
                    *newest = (*newest).max(received);
                }
                let released_us = self
                    .released_since(m)
                    .map_or(0, |t| u64::try_from(now.saturating_duration_since(t).as_micros()).unwrap_or(u64::MAX));
                let beat = MembershipMsg::Heartbeat {
                    view_epoch,
                    highest_epoch: self.highest_epoch,
                    coordinator,
                    sent_us,
                    echo_us: echo.map(|(sent, _)| sent),
                    released_us,
                };
                out.push(MembershipCommand::Send(m, beat));
            }
        }
        out.extend(self.expire_silent(now));
        if let Some(after) = self.config.probe_after() {
            let due: Vec<u32> = self
                .up
                .iter()
                .copied()
                .filter(|m| *m != self.me && self.silence(*m, now).is_some_and(|s| s >= after))
                .filter(|m| self.probed.get(m).is_none_or(|t| now.saturating_duration_since(*t) >= period))
                .collect();
            for m in due {
                self.probed.insert(m, now);
                out.push(MembershipCommand::Probe(m));
            }
        }
        out.extend(self.reconcile());
        out.extend(self.track_term(now));
        out
    }

    /// Every member silent for longer than the failure timeout is down.
    fn expire_silent(&mut self, now: Instant) -> Vec<MembershipCommand> {
        let timeout = Duration::from_millis(self.config.failure_timeout_ms);
        let silent: Vec<u32> = self
            .up
            .iter()
            .copied()
            .filter(|m| *m != self.me)
            .filter(|m| self.last_heard.get(m).is_none_or(|t| now.saturating_duration_since(*t) > timeout))
            .collect();
        for m in &silent {
            self.up.remove(m);
            self.reported.remove(m);
        }
        silent.into_iter().map(MembershipCommand::Down).collect()
    }

    /// Run first by every entry point. A core that stood still for longer than the failure
    /// timeout (its process was paused, or starved of its ticks) has heard nothing meanwhile:
    /// every other member is silent past the timeout, and the members have declared this node
    /// down by the same rule. So before it takes anything else — above all a message queued
    /// while it stood still, which describes the cluster as it was — it declares them all down
    /// and, having no majority, voids its view and starts over as a newcomer. Otherwise a
    /// heartbeat one member queued before the pause, taken before the first tick, would keep a
    /// majority and the old view alive, and a woken coordinator would issue views again that
    /// compete with its successor's. A node whose ticks come (every few milliseconds on a
    /// node loop) never meets this: the tick's own rule has already declared the same members
    /// down.
    fn catch_up(&mut self, now: Instant) -> Vec<MembershipCommand> {
        let timeout = Duration::from_millis(self.config.failure_timeout_ms);
        let stood_still = self.last_event.is_some_and(|t| now.saturating_duration_since(t) > timeout);
        self.last_event = Some(self.last_event.map_or(now, |t| t.max(now)));
        if !stood_still {
            return Vec::new();
        }
        tracing::info!(node = self.me, "no event for longer than the failure timeout: rejoining as a newcomer");
        let mut out = self.expire_silent(now);
        out.extend(self.reconcile());
        out.extend(self.track_term(now));
        out
    }

    /// How long member `peer` has been silent, if it was ever heard.
    fn silence(&self, peer: u32, now: Instant) -> Option<Duration> {
        self.last_heard.get(&peer).map(|t| now.saturating_duration_since(*t))
    }

    /// Member `peer` came back as another process (its transport connection now belongs to a
    /// new incarnation, authenticated by the member's certificate): the process this node
    /// knew died, and the actors it ran with it. If the member is still up here, it is down
    /// now, whatever its silence — it may have restarted faster than any detector — and the
    /// new process's heartbeats bring it back (a new view with it). Without this, a member
    /// restarted before this node noticed the silence would stay in the view with none of
    /// its actors.
    pub fn on_restarted(&mut self, peer: u32, now: Instant) -> Vec<MembershipCommand> {
        let mut out = self.catch_up(now);
        if peer == self.me || !self.up.contains(&peer) {
            return out;
        }
        self.last_heard.remove(&peer);
        out.extend(self.declare_down(peer, MembershipCommand::Restarted(peer), now));
        out
    }

    /// Takes member `peer` out of the view this node would issue, with `down` (the
    /// command saying why), and reconciles the view and the term as a silent member's loss
    /// does.
    fn declare_down(&mut self, peer: u32, down: MembershipCommand, now: Instant) -> Vec<MembershipCommand> {
        self.up.remove(&peer);
        self.reported.remove(&peer);
        let mut out = vec![down];
        out.extend(self.reconcile());
        out.extend(self.track_term(now));
        out
    }

    /// The host of member `peer` said that no process listens at its address (the answer
    /// to a [`MembershipCommand::Probe`]). If the member is still silent for at least
    /// [`DetectorConfig::probe_after`], it is down now: its process died, and waiting out
    /// the failure timeout would only delay the recovery. An answer about a member heard
    /// since (a restarted process, or a forged answer), or with probes off, changes nothing:
    /// the answer can only speed up the detection of a member that is silent anyway. Safety
    /// does not rest on it either way: a coordinator's successor still waits out its lease.
    pub fn on_gone(&mut self, peer: u32, now: Instant) -> Vec<MembershipCommand> {
        let mut out = self.catch_up(now);
        let silent =
            self.config.probe_after().zip(self.silence(peer, now)).is_some_and(|(after, silence)| silence >= after);
        if peer == self.me || !self.up.contains(&peer) || !silent {
            return out;
        }
        out.extend(self.declare_down(peer, MembershipCommand::Gone(peer), now));
        out
    }

    /// A message from member `from` arrived.
    pub fn on_message(&mut self, from: u32, msg: MembershipMsg, now: Instant) -> Vec<MembershipCommand> {
        if !self.members.contains(&from) || from == self.me {
            return Vec::new();
        }
        let mut out = self.catch_up(now);
        let now_us = self.micros(now);
        if let Err(why) = self.check(from, &msg, now_us) {
            // Not even a sign of life: a member that only says such things is
            // declared down like a silent one, and leaves the view.
            out.push(self.reject(from, &msg, why));
            return out;
        }
        self.last_heard.insert(from, now);
        self.up.insert(from);
        match msg {
            MembershipMsg::Heartbeat { view_epoch, highest_epoch, coordinator, sent_us, echo_us, released_us } => {
                self.heard_sent.insert(from, (sent_us, now));
                // An acknowledgement of this node's term (this view or a later one of it).
                let mine = self.view.as_ref().is_some_and(|v| v.coordinator == self.me && coordinator == Some(self.me));
                if let (true, Some(echo), Some(term)) = (mine, echo_us, self.term.as_mut()) {
                    let ack = term.acks.entry(from).or_default();
                    *ack = (*ack).max(echo);
                    // Received after it was sent: now minus its age is no earlier than the moment.
                    let released = now.checked_sub(Duration::from_micros(released_us)).unwrap_or(now);
                    let newest = term.released.entry(from).or_insert(released);
                    *newest = (*newest).max(released);
                }
                // Raised by a bounded step per heartbeat (see MAX_EPOCH_STEP).
                let bound = self.highest_epoch.saturating_add(MAX_EPOCH_STEP);
                self.highest_epoch = self.highest_epoch.max(highest_epoch.min(bound));
                match coordinator {
                    Some(c) if view_epoch > 0 && view_epoch <= bound => self.reported.insert(from, (view_epoch, c)),
                    _ => self.reported.remove(&from),
                };
                // A member behind the coordinator's view missed it (views go
                // out once, and a send can be lost), or holds another node's view of
                // the same epoch: send it again.
                if let Some(v) = self.view.as_ref().filter(|v| v.coordinator == self.me) {
                    let behind = view_epoch < v.epoch || (view_epoch == v.epoch && coordinator != Some(self.me));
                    if behind && v.members.contains(&from) {
                        out.push(MembershipCommand::Send(from, MembershipMsg::View(v.clone())));
                    }
                }
            }
            MembershipMsg::View(view) => {
                if view.epoch > self.view.as_ref().map_or(0, |v| v.epoch) && view.coordinator == from {
                    if let Some(elected) = self.electable(from, now) {
                        let why = format!("a view from node {from}, while the rules here elect node {elected}");
                        out.push(self.reject(from, &MembershipMsg::View(view), why));
                        out.extend(self.reconcile());
                        return out;
                    }
                    self.highest_epoch = self.highest_epoch.max(view.epoch);
                    self.view = Some(view.clone());
                    out.push(MembershipCommand::Adopted(view));
                }
            }
        }
        out.extend(self.reconcile());
        out.extend(self.track_term(now));
        out
    }

    /// Count and report a dropped message.
    fn reject(&mut self, from: u32, msg: &MembershipMsg, reason: String) -> MembershipCommand {
        tracing::warn!(node = self.me, peer = from, "membership message dropped: {reason}");
        self.rejected += 1;
        let kind = match msg {
            MembershipMsg::Heartbeat { .. } => "heartbeat",
            MembershipMsg::View(_) => "view",
        };
        MembershipCommand::Rejected { peer: from, kind, reason }
    }

    /// `None` when a view from `from` may be taken under the local rules: `from`
    /// is the live coordinator this node knows of, or the member that would
    /// succeed it (the lowest live id besides it — it may have seen the
    /// coordinator fail a heartbeat before this node did). Otherwise the node
    /// the rules elect.
    fn electable(&self, from: u32, now: Instant) -> Option<u32> {
        let live = self.live_coordinator();
        if live == Some(from) {
            return None;
        }
        // The successor only once the live coordinator has gone quiet here too: a node
        // waking from a pause must not take the role from a coordinator that is heard.
        let quiet = Duration::from_millis(self.config.failure_timeout_ms / 2);
        let silent = live.is_none_or(|c| {
            c != self.me && self.last_heard.get(&c).is_none_or(|t| now.saturating_duration_since(*t) >= quiet)
        });
        let successor = self.up.iter().copied().find(|m| Some(*m) != live);
        if silent && successor == Some(from) {
            return None;
        }
        live.or(successor)
    }

    /// The coordinator of the newest view this node knows of — its own or one
    /// a live member reports — if that coordinator is alive (heard, or this
    /// node). Ties between equal epochs go to the lower id.
    fn live_coordinator(&self) -> Option<u32> {
        let own = self.view.as_ref().map(|v| (v.epoch, v.coordinator));
        // A report naming this node is stale unless this node's own view says
        // so: it voided its view when it lost its quorum (and a heartbeat sent
        // before a partition can arrive after it heals).
        let mine = |r: &(u64, u32)| r.1 != self.me || own.is_some_and(|o| o.1 == self.me && o.0 >= r.0);
        let reported = self.reported.iter().filter(|(from, _)| self.up.contains(from)).map(|(_, r)| *r).filter(mine);
        own.into_iter()
            .chain(reported)
            .filter(|(_, c)| self.up.contains(c))
            .max_by_key(|(epoch, c)| (*epoch, std::cmp::Reverse(*c)))
            .map(|(_, c)| c)
    }

    /// Issue a view if this node should coordinate and the adopted view is
    /// not what it sees; report quorum loss once.
    fn reconcile(&mut self) -> Vec<MembershipCommand> {
        let mut out = Vec::new();
        let quorum = self.has_quorum();
        if !quorum {
            if std::mem::replace(&mut self.had_quorum, false) {
                // Without a majority the view is void: whatever comes back must
                // be a new view (a new epoch), even with the same members.
                self.view = None;
                // And this node starts over as a newcomer: after a long pause
                // or a cut its first messages may come from some members only,
                // so it must hear the cluster before it may claim the role.
                self.started = None;
                self.settled = false;
                self.rejoining = true;
                out.push(MembershipCommand::QuorumLost);
            }
            return out;
        }
        self.had_quorum = true;
        match self.live_coordinator() {
            // Someone else coordinates and is alive: join its view, never compete. A view that
            // lost to it (this node's own or a third node's, of an equal epoch issued by a
            // higher id, or an older one) is given up: this node's heartbeats then report no
            // view, and the coordinator sends its own again (it does for members behind it) —
            // else equal-epoch views would stand side by side, each side rejecting the other's
            // orders for ever.
            Some(c) if c != self.me => {
                if let Some(lost) = self.view.take_if(|v| v.coordinator != c) {
                    tracing::info!(
                        node = self.me,
                        coordinator = c,
                        "giving up view {} of node {} for node {c}'s",
                        lost.epoch,
                        lost.coordinator
                    );
                    out.push(MembershipCommand::GaveUp(lost));
                }
                return out;
            }
            // This node coordinates the newest view it knows of: it stays.
            Some(_) => {}
            // Nobody does: the lowest live id takes over, once it has heard the cluster.
            None => {
                let lowest = self.up.iter().next().copied();
                let heard_all = self.up.len() == self.members.len() && !self.rejoining;
                if lowest != Some(self.me) || (!self.settled && !heard_all) {
                    return out;
                }
            }
        }
        let current = self.view.as_ref();
        if current.is_some_and(|v| v.coordinator == self.me && v.members == self.up) {
            return out;
        }
        let Some(epoch) = self.highest_epoch.checked_add(1).filter(|e| *e <= MAX_EPOCH) else {
            tracing::error!(node = self.me, epoch = self.highest_epoch, "no view epoch left: issuing no view");
            return out;
        };
        self.highest_epoch = epoch;
        let view = View { epoch, coordinator: self.me, members: self.up.clone() };
        self.view = Some(view.clone());
        for &m in self.up.iter().filter(|m| **m != self.me) {
            out.push(MembershipCommand::Send(m, MembershipMsg::View(view.clone())));
        }
        out.push(MembershipCommand::Adopted(view));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated cluster: a virtual clock that jumps, messages delivered
    /// at once unless a link is cut (as raft-rs's test network does).
    struct Net {
        nodes: BTreeMap<u32, Membership>,
        cut: BTreeSet<(u32, u32)>,
        paused: BTreeSet<u32>,
        /// Nodes whose process died on a live host: a probe of them is refused.
        crashed: BTreeSet<u32>,
        /// (prober, probed) of every probe sent.
        probes: Vec<(u32, u32)>,
        /// (node, member) of every member declared down on its host's refusal.
        gone: Vec<(u32, u32)>,
        drop_views_to: BTreeSet<u32>,
        now: Instant,
        adopted: BTreeMap<u32, Vec<View>>,
        downs: Vec<(u32, u32, Instant)>,
        /// Every step a coordinator committed: one per tick while its lease holds.
        commits: Vec<crate::cluster::commits::Commit>,
        start: Instant,
        /// (receiver, sender, kind) of every message a core dropped.
        rejected: Vec<(u32, u32, &'static str)>,
        /// (node, view) of every view a node gave up.
        given_up: Vec<(u32, View)>,
    }

    impl Net {
        fn new(n: u32) -> Self {
            Self::with(n, |m| m)
        }

        fn with(n: u32, build: impl Fn(Membership) -> Membership) -> Self {
            let nodes = (0..n).map(|i| (i, build(Membership::new(i, 0..n, DetectorConfig::default())))).collect();
            let now = Instant::now();
            Self {
                commits: Vec::new(),
                start: now,
                nodes,
                cut: BTreeSet::new(),
                paused: BTreeSet::new(),
                crashed: BTreeSet::new(),
                probes: Vec::new(),
                gone: Vec::new(),
                drop_views_to: BTreeSet::new(),
                now,
                adopted: BTreeMap::new(),
                downs: Vec::new(),
                rejected: Vec::new(),
                given_up: Vec::new(),
            }
        }

        /// The process of `a` dies on a live host: it stands still, and probes of it are refused.
        fn crash(&mut self, a: u32) {
            self.paused.insert(a);
            self.crashed.insert(a);
        }

        fn isolate(&mut self, a: u32) {
            for b in self.nodes.keys().copied().collect::<Vec<_>>() {
                self.cut.insert((a, b));
                self.cut.insert((b, a));
            }
        }

        fn heal(&mut self) {
            self.cut.clear();
        }

        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 10 {
                self.now += Duration::from_millis(10);
                let ids: Vec<u32> = self.nodes.keys().copied().collect();
                for id in ids {
                    if self.paused.contains(&id) {
                        continue;
                    }
                    let now = self.now;
                    // What a coordinator's aggregators do first on waking (a step
                    // completed by messages queued meanwhile), before its clock ticks.
                    let node = &self.nodes[&id];
                    if let (Some((from, until)), Some(term)) = (node.lease(now), node.term()) {
                        if from <= now && now < until {
                            let step = self.commits.len() as u64;
                            self.commits.push(crate::cluster::commits::Commit {
                                node: id,
                                generation: (term << 32) | (u64::from(id) << 20),
                                range: 0,
                                step,
                                hash: format!("{step}"),
                                t_us: now.duration_since(self.start).as_micros() as u64,
                            });
                        }
                    }
                    let cmds = self.nodes.get_mut(&id).unwrap().on_tick(now);
                    self.apply(id, cmds);
                }
            }
        }

        fn apply(&mut self, from: u32, cmds: Vec<MembershipCommand>) {
            let mut queue: Vec<(u32, MembershipCommand)> = cmds.into_iter().map(|c| (from, c)).collect();
            while let Some((src, cmd)) = queue.pop() {
                match cmd {
                    MembershipCommand::Send(to, msg) => {
                        if self.cut.contains(&(src, to)) || self.paused.contains(&to) {
                            continue;
                        }
                        if matches!(msg, MembershipMsg::View(_)) && self.drop_views_to.remove(&to) {
                            continue;
                        }
                        let now = self.now;
                        let out = self.nodes.get_mut(&to).unwrap().on_message(src, msg, now);
                        queue.extend(out.into_iter().map(|c| (to, c)));
                    }
                    MembershipCommand::Adopted(v) => self.adopted.entry(src).or_default().push(v),
                    MembershipCommand::Down(m) => self.downs.push((src, m, self.now)),
                    MembershipCommand::Gone(m) => {
                        self.downs.push((src, m, self.now));
                        self.gone.push((src, m));
                    }
                    MembershipCommand::Restarted(m) => self.downs.push((src, m, self.now)),
                    MembershipCommand::Probe(m) => {
                        self.probes.push((src, m));
                        if self.crashed.contains(&m) && !self.cut.contains(&(src, m)) && !self.cut.contains(&(m, src)) {
                            let now = self.now;
                            let out = self.nodes.get_mut(&src).unwrap().on_gone(m, now);
                            queue.extend(out.into_iter().map(|c| (src, c)));
                        }
                    }
                    MembershipCommand::QuorumLost => {}
                    MembershipCommand::GaveUp(v) => self.given_up.push((src, v)),
                    MembershipCommand::Rejected { peer, kind, .. } => self.rejected.push((src, peer, kind)),
                }
            }
        }

        fn view_of(&self, id: u32) -> View {
            self.nodes[&id].view().cloned().expect("a view")
        }
    }

    #[test]
    fn three_nodes_agree_on_node_zero_as_coordinator() {
        let mut net = Net::new(3);
        net.run(300);
        for id in 0..3 {
            let v = net.view_of(id);
            assert_eq!(v.coordinator, 0, "node {id}");
            assert_eq!(v.members, [0, 1, 2].into_iter().collect());
        }
    }

    #[test]
    fn a_dead_node_is_detected_within_a_second_and_excluded() {
        let mut net = Net::new(3);
        net.run(300);
        let killed_at = net.now;
        net.paused.insert(2);
        net.run(1_000);
        let (_, _, detected) = *net.downs.iter().find(|(_, m, _)| *m == 2).expect("node 2 detected");
        let ms = detected.duration_since(killed_at).as_millis();
        assert!(ms < 1_000, "detected after {ms} ms");
        let v = net.view_of(0);
        assert_eq!(v.members, [0, 1].into_iter().collect());
        assert_eq!(net.view_of(1), v);
    }

    /// When `victim` was first declared down by any node, in ms after `since`.
    fn detected_after(net: &Net, victim: u32, since: Instant) -> u128 {
        let (_, _, at) = *net.downs.iter().find(|(_, m, _)| *m == victim).expect("detected");
        at.duration_since(since).as_millis()
    }

    #[test]
    fn a_crashed_member_is_down_two_heartbeats_after_its_last_and_a_paused_one_after_the_timeout() {
        let config = DetectorConfig::default();
        // Crash: the probe at two heartbeats of silence is refused; down at once. The last
        // heartbeat came at most one period before the crash.
        let mut net = Net::new(3);
        net.run(300);
        let crashed_at = net.now;
        net.crash(2);
        net.run(1_000);
        let ms = detected_after(&net, 2, crashed_at);
        assert!(ms <= u128::from(2 * config.heartbeat_ms) + 10, "crash detected after {ms} ms");
        assert!(net.probes.iter().any(|(by, of)| *by == 0 && *of == 2), "{:?}", net.probes);
        assert!(net.gone.contains(&(0, 2)), "down on the refusal: {:?}", net.gone);
        assert_eq!(net.view_of(0).members, [0, 1].into_iter().collect());
        // Pause: probed too, but nobody refuses; down only after the failure timeout.
        let mut net = Net::new(3);
        net.run(300);
        let paused_at = net.now;
        net.paused.insert(2);
        net.run(1_000);
        let ms = detected_after(&net, 2, paused_at);
        let least = u128::from(config.failure_timeout_ms - config.heartbeat_ms);
        assert!(ms >= least, "pause detected after {ms} ms, before the failure timeout");
        assert!(net.probes.iter().any(|(_, of)| *of == 2), "a silent member is probed");
        assert!(net.gone.is_empty(), "{:?}", net.gone);
        // A crash behind a cut: the refusal cannot come back; the timeout decides.
        let mut net = Net::new(3);
        net.run(300);
        let cut_at = net.now;
        net.isolate(2);
        net.crash(2);
        net.run(1_000);
        assert!(detected_after(&net, 2, cut_at) >= least);
        assert!(net.gone.is_empty(), "{:?}", net.gone);
    }

    #[test]
    fn a_member_restarted_before_its_silence_was_noticed_is_down_then_back() {
        let mut net = Net::new(3);
        net.run(300);
        let before = net.view_of(0);
        let now = net.now;
        // Heard a moment ago, yet its process was replaced: down at once.
        let cmds = net.nodes.get_mut(&0).unwrap().on_restarted(1, now);
        assert!(cmds.contains(&MembershipCommand::Restarted(1)), "{cmds:?}");
        assert!(!net.nodes[&0].up().contains(&1));
        net.apply(0, cmds);
        assert!(!net.view_of(0).members.contains(&1), "a view without the old process");
        // Its new process heartbeats: back in a later view.
        net.run(300);
        let after = net.view_of(0);
        assert!(after.members.contains(&1) && after.epoch > before.epoch + 1, "{before:?} → {after:?}");
        // Unknown, itself, or already down: nothing.
        assert!(net.nodes.get_mut(&0).unwrap().on_restarted(0, net.now).is_empty());
        assert!(net.nodes.get_mut(&0).unwrap().on_restarted(7, net.now).is_empty());
    }

    #[test]
    fn a_refusal_for_a_member_heard_recently_or_with_probes_off_changes_nothing() {
        let mut net = Net::new(3);
        net.run(300);
        let now = net.now;
        // Heard within the last heartbeat: a forged or stale answer does not take it down.
        assert_eq!(net.nodes.get_mut(&0).unwrap().on_gone(1, now), Vec::new());
        assert!(net.nodes[&0].up().contains(&1));
        // Unknown, or this node itself.
        assert_eq!(net.nodes.get_mut(&0).unwrap().on_gone(7, now), Vec::new());
        assert_eq!(net.nodes.get_mut(&0).unwrap().on_gone(0, now), Vec::new());
        // Probes off: none is asked for, a refusal is ignored, the timeout decides.
        let off = DetectorConfig { probe: false, ..DetectorConfig::default() };
        assert_eq!(off.probe_after(), None);
        let mut net = Net::with(3, |m| Membership::new(m.me(), 0..3, off));
        net.run(300);
        let crashed_at = net.now;
        net.crash(2);
        net.run(1_000);
        assert!(net.probes.is_empty(), "{:?}", net.probes);
        assert!(detected_after(&net, 2, crashed_at) >= u128::from(off.failure_timeout_ms - off.heartbeat_ms));
        // A failure timeout of two heartbeats or less leaves nothing to gain.
        let short = DetectorConfig { heartbeat_ms: 100, failure_timeout_ms: 200, ..DetectorConfig::default() };
        assert_eq!(short.probe_after(), None);
    }

    #[test]
    fn when_the_coordinator_dies_the_next_lowest_takes_over_with_a_higher_epoch() {
        let mut net = Net::new(3);
        net.run(300);
        let before = net.view_of(1).epoch;
        net.paused.insert(0);
        net.run(1_000);
        let v = net.view_of(1);
        assert_eq!((v.coordinator, v.epoch > before), (1, true));
        assert_eq!(net.view_of(2), v);
    }

    #[test]
    fn a_paused_coordinator_that_wakes_up_cannot_override_the_new_view() {
        let mut net = Net::new(3);
        net.run(300);
        net.paused.insert(0);
        net.run(1_000);
        let takeover = net.view_of(1);
        net.paused.remove(&0);
        net.run(1_000);
        // Node 0 rejoins node 1's view (the coordinator is sticky), with an
        // epoch above everything seen — never with its stale one.
        let v = net.view_of(2);
        assert!(v.epoch > takeover.epoch, "{v:?} vs {takeover:?}");
        assert_eq!((v.coordinator, v.members.clone()), (1, [0, 1, 2].into_iter().collect()));
        for id in 0..3 {
            assert_eq!(net.view_of(id), v, "node {id}");
        }
    }

    #[test]
    fn the_minority_side_of_a_partition_issues_no_view() {
        let mut net = Net::new(3);
        net.run(300);
        net.isolate(0);
        net.run(1_000);
        let majority = net.view_of(1);
        assert_eq!((majority.coordinator, majority.members.len()), (1, 2));
        assert!(!net.nodes[&0].has_quorum());
        assert!(net.adopted[&0].iter().all(|v| v.members.len() >= 2), "node 0 alone never adopted a view of itself");
        net.heal();
        net.run(1_000);
        let healed = net.view_of(0);
        assert_eq!(healed.members.len(), 3);
        assert!(healed.epoch > majority.epoch);
        assert_eq!(healed.coordinator, 1, "node 0 joined the majority's coordinator instead of taking over");
    }

    #[test]
    fn a_restarted_former_coordinator_joins_the_view_of_its_successor() {
        let mut net = Net::new(3);
        net.run(300);
        net.paused.insert(0);
        net.run(1_000);
        assert_eq!(net.view_of(1).coordinator, 1);
        // Node 0 comes back as a fresh process with the lowest id.
        net.paused.remove(&0);
        net.nodes.insert(0, Membership::new(0, 0..3, DetectorConfig::default()));
        net.run(1_000);
        for id in 0..3 {
            let v = net.view_of(id);
            assert_eq!((v.coordinator, v.members.len()), (1, 3), "node {id}: {v:?}");
        }
        let issued_by_0 = net.adopted.get(&0).into_iter().flatten().filter(|v| v.coordinator == 0).count();
        assert_eq!(issued_by_0, 1, "node 0 coordinated only in the first epoch: {:?}", net.adopted[&0]);
    }

    #[test]
    fn a_node_waking_from_a_pause_does_not_coordinate_on_the_first_member_it_hears() {
        let mut net = Net::new(3);
        net.run(300);
        net.paused.insert(1);
        net.run(1_000);
        // Node 1 wakes and hears node 2 first (node 0's messages are late).
        net.paused.remove(&1);
        net.cut.extend([(0, 1), (1, 0)]);
        net.run(200);
        net.heal();
        net.run(1_000);
        // The same after a long cut: node 1 loses its quorum, and when the cut
        // heals it hears node 2 before node 0.
        net.cut.extend([(0, 1), (1, 0), (2, 1), (1, 2)]);
        net.run(2_000);
        net.cut.retain(|(a, b)| (*a, *b) != (2, 1) && (*a, *b) != (1, 2));
        net.run(200);
        net.heal();
        net.run(1_000);
        let claimed: Vec<&View> = net.adopted[&1].iter().filter(|v| v.coordinator == 1).collect();
        assert!(claimed.is_empty(), "node 1 claimed the role: {claimed:?}");
        for id in 0..3 {
            let v = net.view_of(id);
            assert_eq!((v.coordinator, v.members.len()), (0, 3), "node {id}");
        }
    }

    #[test]
    fn a_late_heartbeat_naming_a_deposed_coordinator_does_not_bring_it_back() {
        let mut net = Net::new(3);
        net.run(300);
        net.isolate(0);
        net.run(2_000);
        assert_eq!(net.view_of(1).coordinator, 1);
        // A heartbeat node 2 sent before the cut, delivered after it healed.
        let stale = MembershipMsg::Heartbeat {
            view_epoch: 1,
            highest_epoch: 1,
            coordinator: Some(0),
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        let now = net.now;
        let node0 = net.nodes.get_mut(&0).unwrap();
        let mut cmds = node0.on_message(2, stale.clone(), now);
        // Node 1's stale heartbeat too: node 0 hears every member at once.
        cmds.extend(node0.on_message(1, stale, now));
        assert!(!cmds.iter().any(|c| matches!(c, MembershipCommand::Adopted(_))), "node 0 claimed the role: {cmds:?}");
        net.heal();
        net.run(1_000);
        let v = net.view_of(0);
        assert_eq!((v.coordinator, v.members.len()), (1, 3));
    }

    /// A member that is not elected (node 3 of 4, never the lowest live id)
    /// announces views naming itself: every view it sends is counted as
    /// rejected, and the cluster keeps node 0's view.
    #[test]
    fn views_from_a_member_the_rules_do_not_elect_are_rejected() {
        let mut net = Net::new(4);
        net.run(1_000);
        let before = net.view_of(0);
        assert_eq!((before.coordinator, before.members.len()), (0, 4));
        for step in 1..=3 {
            let forged = View { epoch: before.epoch + step, coordinator: 3, members: (0..4).collect() };
            let sends = (0..3).map(|to| MembershipCommand::Send(to, MembershipMsg::View(forged.clone()))).collect();
            net.apply(3, sends);
        }
        net.run(1_000);
        for id in 0..3 {
            assert_eq!(net.view_of(id).coordinator, 0, "node {id} followed the rogue");
        }
        let views: Vec<_> = net.rejected.iter().filter(|(_, from, kind)| *from == 3 && *kind == "view").collect();
        assert_eq!(views.len(), 9, "three forged views to each of three members: {:?}", net.rejected);
    }

    /// Even the coordinator's view may not jump the epoch range: a view far
    /// above the highest epoch known is refused, and heartbeats claiming one
    /// raise a node's epoch by bounded steps only.
    #[test]
    fn epochs_move_by_bounded_steps() {
        let mut net = Net::new(3);
        net.run(1_000);
        let v = net.view_of(0);
        let huge = View { epoch: MAX_EPOCH - 1, coordinator: 0, members: v.members.clone() };
        net.apply(0, vec![MembershipCommand::Send(1, MembershipMsg::View(huge))]);
        assert_eq!(net.view_of(1), v, "a view {} epochs ahead was taken", MAX_EPOCH - 1 - v.epoch);
        assert!(net.rejected.contains(&(1, 0, "view")), "{:?}", net.rejected);
        let beat = MembershipMsg::Heartbeat {
            view_epoch: v.epoch,
            highest_epoch: MAX_EPOCH,
            coordinator: Some(0),
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        let now = net.now;
        let node1 = net.nodes.get_mut(&1).unwrap();
        let before = node1.highest_epoch;
        node1.on_message(2, beat, now);
        assert_eq!(node1.highest_epoch, before + MAX_EPOCH_STEP);
    }

    /// A node far behind (away while the cluster went through many views)
    /// catches up through heartbeats and then takes the current view.
    #[test]
    fn a_node_far_behind_catches_up_in_bounded_steps() {
        let mut net = Net::new(3);
        net.run(1_000);
        let far = 3 * MAX_EPOCH_STEP + 5;
        for m in net.nodes.values_mut() {
            m.highest_epoch = far - 1;
        }
        net.nodes.get_mut(&2).unwrap().highest_epoch = 0;
        // Node 1 leaves and comes back: node 0 issues views at epochs far above node 2's.
        net.paused.insert(1);
        net.run(1_000);
        net.paused.remove(&1);
        net.run(2_000);
        let v = net.view_of(0);
        assert!(v.epoch >= far && v.members.len() == 3, "{v:?}");
        assert_eq!(net.view_of(2), v);
    }

    /// The coordinator is paused longer than its lease while the others elect a
    /// successor; on waking, it would commit before hearing anyone. With leases
    /// it cannot (its acknowledgements are old) and the successor waited a whole
    /// lease: the commit intervals never overlap.
    fn pause_the_coordinator_past_its_lease(net: &mut Net) -> Vec<String> {
        net.run(1_000);
        assert!(net.commits.iter().any(|c| c.node == 0), "node 0 committed before the pause");
        net.paused.insert(0);
        net.run(2_000);
        assert_eq!(net.view_of(1).coordinator, 1);
        net.paused.remove(&0);
        net.run(500);
        assert!(net.commits.iter().any(|c| c.node == 1), "the successor committed");
        crate::cluster::commits::check(&net.commits)
    }

    /// Found by the process tier: a coordinator woken from a long pause hears its successor
    /// first (a heartbeat queued while it slept), then notices the silence of the others. It
    /// must join the successor's view, not issue one of its own that the members, hearing
    /// their live coordinator, would take as a successor's.
    #[test]
    fn a_coordinator_waking_from_a_pause_does_not_take_the_role_back() {
        let mut net = Net::new(3);
        net.run(1_000);
        net.paused.insert(0);
        net.run(2_000);
        let v = net.view_of(1);
        assert_eq!(v.coordinator, 1);
        net.paused.remove(&0);
        let beat = MembershipMsg::Heartbeat {
            view_epoch: v.epoch,
            highest_epoch: v.epoch,
            coordinator: Some(1),
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        net.apply(1, vec![MembershipCommand::Send(0, beat)]);
        net.run(1_000);
        for id in 0..3 {
            assert_eq!(net.view_of(id).coordinator, 1, "node {id}");
        }
        let violations = crate::cluster::commits::check(&net.commits);
        assert!(violations.is_empty(), "{violations:?}");
    }

    /// Found by the simulation tier on real nodes (seeds 132 and 1424), and again by the process
    /// tier (`cluster_membership`): a coordinator woken from a pause first hears a heartbeat one
    /// member queued before the pause (it still names the sleeper as coordinator). Taking it
    /// before its first tick, the node kept a majority, declared only the other member down and
    /// issued views of its own again — one of the epoch its successor took over in, which won
    /// the tie, and then one with all three members. (The lapsed lease then ended that term, so
    /// no commits overlapped, but the coordinator was no longer sticky.) Now the core first
    /// notices that it stood still past the failure timeout and starts over as a newcomer
    /// ([`Membership::catch_up`]): it joins the successor's term, which goes on.
    #[test]
    fn a_coordinator_woken_to_a_heartbeat_queued_before_its_pause_rejoins_its_successors_term() {
        let mut net = Net::new(3);
        net.run(1_000);
        let first = net.view_of(0);
        assert_eq!(first.coordinator, 0);
        net.paused.insert(0);
        net.run(2_000);
        let successor = net.view_of(1);
        assert_eq!(successor.coordinator, 1);
        assert!(net.commits.iter().any(|c| c.node == 1), "the successor committed");
        // Node 0 wakes to node 2's heartbeat sent before the pause, then ticks.
        let adopted_before = net.adopted[&0].len();
        net.paused.remove(&0);
        let queued = plain_beat(first.epoch, first.epoch, Some(0));
        net.apply(2, vec![MembershipCommand::Send(0, queued)]);
        net.run(3_000);
        let v = net.view_of(0);
        for id in 0..3 {
            assert_eq!(net.view_of(id), v, "node {id}");
        }
        assert_eq!(v.members.len(), 3, "{v:?}");
        let violations = crate::cluster::commits::check(&net.commits);
        assert!(violations.is_empty(), "{violations:?}");
        // The successor's term goes on: node 0 rejoins it, and no term of node 0 comes between.
        let last = net.commits.last().expect("commits after the wake-up");
        assert_eq!((last.node, last.generation >> 32), (1, successor.epoch), "{last:?}");
        assert!(last.t_us > 5_000_000, "the successor commits to the end: {last:?}");
        // A core that stood still longer than the failure timeout starts over as a newcomer
        // before it takes any message: the queued heartbeat cannot keep its old view alive, and
        // it joins its successor's view (the coordinator is sticky), never issuing one of its own.
        assert_eq!(v.coordinator, 1, "{v:?}");
        let own = net.adopted[&0].iter().skip(adopted_before).find(|w| w.coordinator == 0);
        assert!(own.is_none(), "node 0 issued a view after waking: {own:?}");
        assert!(net.given_up.is_empty(), "{:?}", net.given_up);
    }

    #[test]
    fn with_leases_two_coordinators_never_commit_at_once() {
        let mut net = Net::new(3);
        let violations = pause_the_coordinator_past_its_lease(&mut net);
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn without_leases_the_commit_invariant_fails() {
        let mut net = Net::with(3, Membership::without_leases);
        let violations = pause_the_coordinator_past_its_lease(&mut net);
        assert!(violations.iter().any(|v| v.contains("two coordinators committed at once")), "{violations:?}");
    }

    #[test]
    fn two_coordinators_of_equal_epochs_converge_on_the_lower_id() {
        let mut net = Net::new(3);
        net.run(300);
        // Node 0 is cut off from node 2 only, node 1 from node 0 only: each of
        // 0 and 1 sees a majority, and both may issue a view.
        net.cut.extend([(0, 2), (2, 0)]);
        net.run(1_000);
        net.heal();
        net.run(1_000);
        let v = net.view_of(2);
        assert_eq!(v.members.len(), 3, "{v:?}");
        for id in 0..3 {
            assert_eq!(net.view_of(id), v, "node {id}");
        }
    }

    /// A heartbeat acknowledging nothing.
    fn plain_beat(view_epoch: u64, highest_epoch: u64, coordinator: Option<u32>) -> MembershipMsg {
        MembershipMsg::Heartbeat { view_epoch, highest_epoch, coordinator, sent_us: 0, echo_us: None, released_us: 0 }
    }

    /// Found by the simulation tier on real nodes: node 1 woke from a pause, issued a view
    /// while node 0 was still silent to it, and ended with a view of the same epoch as node
    /// 0's. Node 1 saw node 0 win the tie but kept its own view, node 0 saw node 1 up to date
    /// and never sent its view again: each rejected the other's orders for ever.
    #[test]
    fn a_node_whose_view_loses_an_equal_epoch_tie_gives_it_up_and_takes_the_winners() {
        let config = DetectorConfig::default();
        let beat = |view_epoch, highest_epoch, coordinator| plain_beat(view_epoch, highest_epoch, coordinator);
        let mut m = Membership::new(1, 0..3, config);
        let t0 = Instant::now();
        let step = Duration::from_millis(config.heartbeat_ms);
        // Node 2 is heard (having seen epoch 2), node 0 is silent: node 1 settles and coordinates.
        let mut now = t0;
        while now <= t0 + Duration::from_millis(3 * config.failure_timeout_ms) {
            m.on_message(2, beat(0, 2, None), now);
            m.on_tick(now);
            now += step;
        }
        let own = m.view().cloned().expect("node 1 issued a view");
        assert_eq!((own.coordinator, own.epoch), (1, 3), "{own:?}");
        // Node 0 comes back coordinating a view of the same epoch: the lower id wins the tie.
        let mut cmds = m.on_message(0, beat(3, 3, Some(0)), now);
        cmds.extend(m.on_message(2, beat(3, 3, Some(0)), now));
        assert_eq!(m.view(), None, "node 1 gave its view up");
        // And says so: its term as coordinator is over (a later one is a new term).
        assert!(cmds.contains(&MembershipCommand::GaveUp(own.clone())), "{cmds:?}");
        // Its heartbeats now say it is behind, so node 0 sends its view, which node 1 takes.
        let theirs = View { epoch: 3, coordinator: 0, members: [0, 1, 2].into_iter().collect() };
        let cmds = m.on_message(0, MembershipMsg::View(theirs.clone()), now);
        assert!(cmds.iter().any(|c| matches!(c, MembershipCommand::Adopted(v) if *v == theirs)), "{cmds:?}");
        assert_eq!(m.view(), Some(&theirs));
    }

    /// The same tie seen by a third node: node 2 followed node 1's view; once node 1 follows
    /// node 0's view of the same epoch, node 2 gives its view up too, and node 0 (told of a
    /// member holding another coordinator's view of its epoch) sends it its own.
    #[test]
    fn a_member_following_the_loser_of_an_equal_epoch_tie_moves_to_the_winner() {
        let config = DetectorConfig::default();
        let beat = |view_epoch, coordinator| plain_beat(view_epoch, view_epoch, coordinator);
        let mut m = Membership::new(2, 0..3, config);
        let now = Instant::now();
        m.on_message(1, beat(0, None), now);
        let loser = View { epoch: 1, coordinator: 1, members: [1, 2].into_iter().collect() };
        m.on_message(1, MembershipMsg::View(loser.clone()), now);
        assert_eq!(m.view(), Some(&loser));
        // Node 0 is heard coordinating epoch 1, and node 1 now follows it.
        m.on_message(0, beat(1, Some(0)), now);
        m.on_message(1, beat(1, Some(0)), now);
        assert_eq!(m.view(), None, "node 2 gave node 1's view up");
        let winner = View { epoch: 1, coordinator: 0, members: [0, 1, 2].into_iter().collect() };
        m.on_message(0, MembershipMsg::View(winner.clone()), now);
        assert_eq!(m.view(), Some(&winner));

        // The winner's side: a member reporting node 1's view of the same epoch gets node 0's.
        let mut c = Membership::new(0, 0..3, config);
        let mut t = now;
        while c.view().is_none() {
            for peer in [1, 2] {
                c.on_message(peer, beat(0, None), t);
            }
            c.on_tick(t);
            t += Duration::from_millis(config.heartbeat_ms);
        }
        let epoch = c.view().unwrap().epoch;
        let cmds = c.on_message(2, beat(epoch, Some(1)), t);
        let resent = cmds
            .iter()
            .any(|cmd| matches!(cmd, MembershipCommand::Send(2, MembershipMsg::View(v)) if v.coordinator == 0));
        assert!(resent, "{cmds:?}");
    }

    #[test]
    fn a_lost_view_is_sent_again_until_the_member_has_it() {
        let mut net = Net::new(3);
        net.run(300);
        net.paused.insert(2);
        net.run(1_000);
        net.paused.remove(&2);
        net.drop_views_to.insert(2);
        net.run(1_000);
        assert!(net.drop_views_to.is_empty(), "a view to node 2 was dropped");
        let v = net.view_of(0);
        assert_eq!(v.members.len(), 3);
        assert_eq!(net.view_of(2), v, "node 2 got the view on a later heartbeat");
    }

    #[test]
    fn regaining_quorum_issues_a_new_view_even_with_the_same_members() {
        let mut net = Net::new(3);
        net.run(300);
        net.paused.insert(1);
        net.run(1_000);
        let two = net.view_of(0);
        assert_eq!(two.members.len(), 2);
        net.paused.insert(2);
        net.run(1_000);
        assert!(net.nodes[&0].view().is_none(), "alone, node 0 has no view");
        net.paused.remove(&2);
        net.run(1_000);
        let back = net.view_of(0);
        assert_eq!(back.members, two.members);
        assert!(back.epoch > two.epoch, "{back:?} after {two:?}");
    }

    #[test]
    fn a_restarted_node_does_not_usurp_a_live_lower_coordinator() {
        let mut net = Net::new(3);
        net.run(300);
        let before = net.view_of(2);
        // Node 1 restarts: a fresh core that hears node 2 before node 0.
        net.nodes.insert(1, Membership::new(1, 0..3, DetectorConfig::default()));
        net.cut.insert((0, 1));
        net.cut.insert((1, 0));
        net.run(200);
        assert_eq!(net.view_of(2).coordinator, 0, "node 2 kept node 0's view");
        net.heal();
        net.run(500);
        let v = net.view_of(1);
        assert_eq!((v.coordinator, v.members.len()), (0, 3));
        assert!(v.epoch >= before.epoch, "node 1 adopted node 0's view again");
    }

    #[test]
    fn messages_from_strangers_are_ignored() {
        let mut m = Membership::new(0, 0..3, DetectorConfig::default());
        let now = Instant::now();
        let beat = MembershipMsg::Heartbeat {
            view_epoch: 99,
            highest_epoch: 99,
            coordinator: Some(7),
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        assert!(m.on_message(7, beat, now).is_empty());
        assert_eq!(m.up().len(), 1);
    }
}

/// Any message from anyone, any clock: the core never panics, never adopts or
/// issues a view beyond [`MAX_EPOCH`] or with a member outside the cluster.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;

    /// Configured members `0..MEMBERS`; the core under test is node 1.
    const MEMBERS: u32 = 5;

    fn any_u64() -> impl Strategy<Value = u64> {
        prop_oneof![4 => 0..6u64, 1 => Just(MAX_EPOCH), 1 => Just(MAX_EPOCH + 1), 1 => Just(u64::MAX), 1 => any::<u64>()]
    }

    fn any_u32() -> impl Strategy<Value = u32> {
        prop_oneof![4 => 0..MEMBERS + 1, 1 => Just(u32::MAX), 1 => any::<u32>()]
    }

    fn msg() -> impl Strategy<Value = MembershipMsg> {
        prop_oneof![
            (any_u64(), any_u64(), proptest::option::of(any_u32())).prop_map(
                |(view_epoch, highest_epoch, coordinator)| MembershipMsg::Heartbeat {
                    sent_us: 0,
                    echo_us: None,
                    released_us: 0,
                    view_epoch,
                    highest_epoch,
                    coordinator
                }
            ),
            (any_u64(), any_u32(), btree_set(any_u32(), 0..6))
                .prop_map(|(epoch, coordinator, members)| MembershipMsg::View(View { epoch, coordinator, members })),
        ]
    }

    #[derive(Clone, Debug)]
    enum Event {
        Message(u32, MembershipMsg),
        /// The clock advances by this many milliseconds, then a tick.
        Tick(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => (any_u32(), msg()).prop_map(|(from, m)| Event::Message(from, m)),
            // Heartbeats of live members, so views get issued and adopted too.
            2 => (0..MEMBERS, 0..4u64).prop_map(|(from, e)| Event::Message(
                from,
                MembershipMsg::Heartbeat { view_epoch: e, highest_epoch: e, coordinator: (e > 0).then_some(0), sent_us: 0, echo_us: None, released_us: 0 }
            )),
            2 => (0..800u64).prop_map(Event::Tick),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn the_membership_core_takes_any_message(events in vec(event(), 0..64)) {
            let mut m = Membership::new(1, 0..MEMBERS, DetectorConfig::default());
            let mut now = Instant::now();
            for event in events {
                let cmds = match event {
                    Event::Message(from, msg) => m.on_message(from, msg, now),
                    Event::Tick(ms) => {
                        now += Duration::from_millis(ms);
                        m.on_tick(now)
                    }
                };
                for cmd in cmds {
                    let view = match cmd {
                        MembershipCommand::Adopted(v) | MembershipCommand::Send(_, MembershipMsg::View(v)) => v,
                        MembershipCommand::Send(to, _)
                        | MembershipCommand::Down(to)
                        | MembershipCommand::Gone(to)
                        | MembershipCommand::Restarted(to)
                        | MembershipCommand::Probe(to) => {
                            prop_assert!(to < MEMBERS);
                            continue;
                        }
                        MembershipCommand::QuorumLost
                        | MembershipCommand::GaveUp(_)
                        | MembershipCommand::Rejected { .. } => continue,
                    };
                    prop_assert!(view.epoch <= MAX_EPOCH, "{view:?}");
                    prop_assert!(view.members.iter().all(|n| *n < MEMBERS), "{view:?}");
                    prop_assert!(view.members.contains(&view.coordinator), "{view:?}");
                }
            }
        }
    }

    #[test]
    fn an_epoch_at_the_end_of_the_range_is_refused_and_the_node_still_issues_views() {
        let mut m = Membership::new(0, 0..3, DetectorConfig::default());
        let now = Instant::now();
        let beat = |e| MembershipMsg::Heartbeat {
            view_epoch: e,
            highest_epoch: e,
            coordinator: None,
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        // Before the bound, `u64::MAX` as the highest epoch seen made the next view's `+ 1` overflow.
        let only_rejected =
            |cmds: Vec<MembershipCommand>| cmds.len() == 1 && matches!(cmds[0], MembershipCommand::Rejected { .. });
        for e in [u64::MAX, MAX_EPOCH + 1] {
            assert!(only_rejected(m.on_message(1, beat(e), now)));
        }
        let stranger = View { epoch: 5, coordinator: 2, members: [2, 9].into_iter().collect() };
        assert!(only_rejected(m.on_message(2, MembershipMsg::View(stranger), now)));
        let forged = View { epoch: 5, coordinator: 2, members: [1, 2].into_iter().collect() };
        assert!(only_rejected(m.on_message(1, MembershipMsg::View(forged), now)));
        assert_eq!(m.rejected(), 4);
        assert_eq!(m.up().len(), 1, "refused messages are no sign of life");
        m.on_message(1, beat(0), now);
        m.on_message(2, beat(0), now);
        let view = m.view().expect("node 0 heard everyone and coordinates");
        assert_eq!((view.epoch, view.coordinator, view.members.len()), (1, 0, 3));
    }

    #[test]
    fn a_node_whose_epochs_ran_out_issues_no_view() {
        let mut m = Membership::new(0, 0..3, DetectorConfig::default());
        let now = Instant::now();
        // Heartbeats raise the epoch by bounded steps: a cluster that went through every epoch.
        m.highest_epoch = MAX_EPOCH - 1;
        let beat = MembershipMsg::Heartbeat {
            view_epoch: 0,
            highest_epoch: MAX_EPOCH,
            coordinator: None,
            sent_us: 0,
            echo_us: None,
            released_us: 0,
        };
        m.on_message(1, beat.clone(), now);
        let cmds = m.on_message(2, beat, now);
        assert!(cmds.is_empty(), "{cmds:?}");
        assert!(m.view().is_none());
    }
}
