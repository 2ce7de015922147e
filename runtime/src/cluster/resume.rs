//! Where a new coordinator resumes the job (sans-IO).
//!
//! A node that becomes coordinator holds a majority, so it must go on: never
//! wait for a member that may never come back. It resumes from the newest
//! complete checkpoint that **any live member** holds — its own copies may be
//! older than a peer's, or gone (it was not a replica, or its disk was
//! wiped). It asks every member of its view for its newest complete step,
//! fetches the files of the best one if a peer's is newer than its own, and
//! starts from there. When no member holds a checkpoint it starts from step
//! 0: every step is a pure function of the job, so recomputing ends with the
//! fault-free bits — slower, never different.
//!
//! ```text
//!  begin(view) ──▶ Ask every member ──▶ answers (or answer timeout)
//!       │                                   │
//!       │        a peer's step > own ──▶ Fetch(peer, step) ──▶ copies stored ──▶ Start(step)
//!       │                                   │        └─ fetch timeout: next best ─┘
//!       │        own newest, or none ──▶ Start(own) / Start(None)
//!       └─ a fresh job (nobody ever ran it) waits for every configured member,
//!          at most `fresh_start_grace`, so the first placement spreads the work
//! ```
//!
//! The node shell carries out the commands (frames over QUIC, timers from its
//! tick) and feeds back answers and stored copies; the rules live here, so
//! every order of answers, losses and timeouts is a unit test.

use phalanx_actors::clock;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a coordinator waits for its members' answers before deciding
/// with what it has (a member that does not answer in time is treated as
/// holding nothing).
pub const DEFAULT_ANSWER_TIMEOUT_MS: u64 = 1_000;
/// How long a fetch of one checkpoint may take before the coordinator tries
/// the next best source.
pub const DEFAULT_FETCH_TIMEOUT_MS: u64 = 10_000;
/// How long a fresh job (no member ever ran it) waits for every configured
/// member before it starts with the majority it has.
pub const DEFAULT_FRESH_START_GRACE_MS: u64 = 5_000;

/// Timeouts of a [`Resume`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeConfig {
    /// See [`DEFAULT_ANSWER_TIMEOUT_MS`].
    pub answer_timeout: Duration,
    /// See [`DEFAULT_FETCH_TIMEOUT_MS`].
    pub fetch_timeout: Duration,
    /// See [`DEFAULT_FRESH_START_GRACE_MS`].
    pub fresh_start_grace: Duration,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            answer_timeout: Duration::from_millis(DEFAULT_ANSWER_TIMEOUT_MS),
            fetch_timeout: Duration::from_millis(DEFAULT_FETCH_TIMEOUT_MS),
            fresh_start_grace: Duration::from_millis(DEFAULT_FRESH_START_GRACE_MS),
        }
    }
}

/// What a member holds of the job, as it answers a coordinator's question.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Its newest complete checkpoint step (verified files tiling the model).
    pub newest: Option<u64>,
    /// It has seen the job run (hosted its actors, had its locations, or
    /// coordinated it): the job is not fresh.
    pub started: bool,
}

/// Where the coordinator's restore point came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Its own checkpoint copies.
    Local,
    /// Files fetched from this member.
    Fetched(u32),
    /// No member held a checkpoint: from step 0.
    Scratch,
}

/// What the node must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeCommand {
    /// Ask member `to` for its [`Inventory`] (tagged with the view's epoch).
    Ask {
        /// The member.
        to: u32,
        /// The view the question belongs to.
        epoch: u64,
    },
    /// Ask member `from` for the files of checkpoint `step`.
    Fetch {
        /// The member holding it.
        from: u32,
        /// The step.
        step: u64,
        /// The view the request belongs to.
        epoch: u64,
    },
    /// Start coordinating: restore `restore` (none: from step 0).
    Start {
        /// The checkpoint step to restore.
        restore: Option<u64>,
        /// Where it came from.
        source: Source,
        /// The view it starts in.
        epoch: u64,
    },
    /// Not starting yet; say so (once per reason), naming what it waits for.
    Waiting {
        /// Configured members not in the view.
        missing: Vec<u32>,
        /// Why, for people.
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Not coordinating, or already started.
    Idle,
    /// Waiting for answers (or for a fresh job's members).
    Asking,
    /// Waiting for the files of `step` from `from`.
    Fetching { from: u32, step: u64, since: Instant },
}

/// The resume decision of one node.
#[derive(Debug)]
pub struct Resume {
    me: u32,
    configured: BTreeSet<u32>,
    config: ResumeConfig,
    phase: Phase,
    epoch: u64,
    members: BTreeSet<u32>,
    /// This node's newest complete checkpoint.
    local: Option<u64>,
    /// This node has seen the job run.
    seen_job: bool,
    asked_at: Instant,
    /// When this node first tried to start the job (for the fresh-start grace).
    first_begin: Option<Instant>,
    answers: BTreeMap<u32, Inventory>,
    /// Sources that failed to deliver: (member, step).
    failed: BTreeSet<(u32, u64)>,
    /// The last waiting reason reported (reported once each).
    reported: Option<String>,
}

impl Resume {
    /// Node `me` of a cluster configured with `configured` members.
    pub fn new(me: u32, configured: impl IntoIterator<Item = u32>, config: ResumeConfig) -> Self {
        Self {
            me,
            configured: configured.into_iter().collect(),
            config,
            phase: Phase::Idle,
            epoch: 0,
            members: BTreeSet::new(),
            local: None,
            seen_job: false,
            asked_at: clock::now(),
            first_begin: None,
            answers: BTreeMap::new(),
            failed: BTreeSet::new(),
            reported: None,
        }
    }

    /// True while a decision is under way.
    pub fn is_deciding(&self) -> bool {
        self.phase != Phase::Idle
    }

    /// The member a fetch is waiting on, if any.
    pub fn fetching_from(&self) -> Option<u32> {
        match self.phase {
            Phase::Fetching { from, .. } => Some(from),
            _ => None,
        }
    }

    /// This node coordinates the view `epoch` of `members` and must start the
    /// job: `local` is its newest complete checkpoint, `seen_job` whether it has
    /// seen the job run. A new view restarts an unfinished decision.
    pub fn begin(
        &mut self,
        epoch: u64,
        members: &BTreeSet<u32>,
        local: Option<u64>,
        seen_job: bool,
        now: Instant,
    ) -> Vec<ResumeCommand> {
        self.first_begin.get_or_insert(now);
        self.phase = Phase::Asking;
        self.epoch = epoch;
        self.members = members.clone();
        self.local = local;
        self.seen_job |= seen_job;
        self.asked_at = now;
        self.answers.clear();
        self.failed.clear();
        let mut out: Vec<ResumeCommand> = self.others().map(|to| ResumeCommand::Ask { to, epoch }).collect::<Vec<_>>();
        out.extend(self.decide(now));
        out
    }

    /// Stop deciding: this node no longer coordinates (or the job ended).
    pub fn cancel(&mut self) {
        self.phase = Phase::Idle;
        self.reported = None;
    }

    /// Member `from` answered the question of view `epoch`.
    pub fn on_inventory(&mut self, from: u32, epoch: u64, inventory: Inventory, now: Instant) -> Vec<ResumeCommand> {
        if self.phase == Phase::Idle || epoch != self.epoch || !self.members.contains(&from) || from == self.me {
            return Vec::new();
        }
        self.answers.insert(from, inventory);
        match self.phase {
            Phase::Asking => self.decide(now),
            _ => Vec::new(),
        }
    }

    /// This node's newest complete checkpoint is now `newest` (a fetched copy
    /// was stored).
    pub fn on_local(&mut self, newest: Option<u64>, now: Instant) -> Vec<ResumeCommand> {
        self.local = self.local.max(newest);
        match self.phase {
            Phase::Fetching { from, step, .. } if self.local >= Some(step) => {
                self.phase = Phase::Idle;
                vec![ResumeCommand::Start { restore: self.local, source: Source::Fetched(from), epoch: self.epoch }]
            }
            Phase::Asking => self.decide(now),
            _ => Vec::new(),
        }
    }

    /// The clock advanced: answer and fetch timeouts, the fresh-start grace.
    pub fn on_tick(&mut self, now: Instant) -> Vec<ResumeCommand> {
        match self.phase {
            Phase::Idle => Vec::new(),
            Phase::Asking => self.decide(now),
            Phase::Fetching { from, step, since } => {
                if now.saturating_duration_since(since) < self.config.fetch_timeout {
                    return Vec::new();
                }
                self.failed.insert((from, step));
                self.phase = Phase::Asking;
                let mut out = vec![ResumeCommand::Waiting {
                    missing: Vec::new(),
                    reason: format!(
                        "node {from} did not deliver checkpoint {step} within {} ms; trying the next best source",
                        self.config.fetch_timeout.as_millis()
                    ),
                }];
                out.extend(self.decide(now));
                out
            }
        }
    }

    fn others(&self) -> impl Iterator<Item = u32> + '_ {
        self.members.iter().copied().filter(move |m| *m != self.me)
    }

    fn decide(&mut self, now: Instant) -> Vec<ResumeCommand> {
        let unanswered: Vec<u32> = self.others().filter(|m| !self.answers.contains_key(m)).collect();
        let timed_out = now.saturating_duration_since(self.asked_at) >= self.config.answer_timeout;
        if !unanswered.is_empty() && !timed_out {
            return Vec::new();
        }
        // The newest step a live member holds that is newer than ours; ties go
        // to the lowest id, so the choice does not depend on answer order.
        let best = self
            .answers
            .iter()
            .filter_map(|(node, inv)| inv.newest.map(|step| (step, *node)))
            .filter(|(step, node)| Some(*step) > self.local && !self.failed.contains(&(*node, *step)))
            .max_by_key(|(step, node)| (*step, std::cmp::Reverse(*node)));
        let epoch = self.epoch;
        if let Some((step, from)) = best {
            self.phase = Phase::Fetching { from, step, since: now };
            return vec![ResumeCommand::Fetch { from, step, epoch }];
        }
        if self.local.is_some() {
            self.phase = Phase::Idle;
            return vec![ResumeCommand::Start { restore: self.local, source: Source::Local, epoch }];
        }
        let started = self.seen_job || self.answers.values().any(|a| a.started);
        let missing: Vec<u32> = self.configured.difference(&self.members).copied().collect();
        let waited = self.first_begin.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if started || missing.is_empty() || waited >= self.config.fresh_start_grace {
            self.phase = Phase::Idle;
            return vec![ResumeCommand::Start { restore: None, source: Source::Scratch, epoch }];
        }
        let reason = format!(
            "a fresh job waits up to {} ms for every configured member before it starts; missing {missing:?}",
            self.config.fresh_start_grace.as_millis()
        );
        if self.reported.as_deref() == Some(reason.as_str()) {
            return Vec::new();
        }
        self.reported = Some(reason.clone());
        vec![ResumeCommand::Waiting { missing, reason }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    fn inv(newest: Option<u64>, started: bool) -> Inventory {
        Inventory { newest, started }
    }

    fn starts(cmds: &[ResumeCommand]) -> Option<(Option<u64>, Source)> {
        cmds.iter().find_map(|c| match c {
            ResumeCommand::Start { restore, source, .. } => Some((*restore, *source)),
            _ => None,
        })
    }

    /// Node 2 coordinates {2, 3, 4} of a 5-node cluster after nodes 0 and 1 died.
    fn successor() -> (Resume, Instant) {
        (Resume::new(2, 0..5, ResumeConfig::default()), Instant::now())
    }

    #[test]
    fn it_asks_every_other_member_of_the_view() {
        let (mut r, now) = successor();
        let cmds = r.begin(7, &set(&[2, 3, 4]), None, true, now);
        assert_eq!(cmds, vec![ResumeCommand::Ask { to: 3, epoch: 7 }, ResumeCommand::Ask { to: 4, epoch: 7 }]);
        assert!(r.is_deciding());
    }

    #[test]
    fn no_copy_anywhere_starts_from_step_zero_once_everyone_answered() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), None, true, now);
        assert!(r.on_inventory(3, 7, inv(None, true), now).is_empty(), "node 4 has not answered yet");
        let cmds = r.on_inventory(4, 7, inv(None, true), now);
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)));
        assert!(!r.is_deciding());
    }

    #[test]
    fn no_copy_anywhere_and_a_silent_member_starts_from_zero_after_the_answer_timeout() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), None, true, now);
        r.on_inventory(3, 7, inv(None, true), now);
        assert!(r.on_tick(now + Duration::from_millis(DEFAULT_ANSWER_TIMEOUT_MS - 1)).is_empty());
        let cmds = r.on_tick(now + Duration::from_millis(DEFAULT_ANSWER_TIMEOUT_MS));
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)), "never a silent hang: {cmds:?}");
    }

    #[test]
    fn a_copy_on_a_non_coordinator_member_is_fetched_then_restored() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), None, true, now);
        r.on_inventory(3, 7, inv(Some(100), true), now);
        let cmds = r.on_inventory(4, 7, inv(None, true), now);
        assert_eq!(cmds, vec![ResumeCommand::Fetch { from: 3, step: 100, epoch: 7 }]);
        assert_eq!(r.fetching_from(), Some(3));
        // A copy of an older step is not enough.
        assert!(r.on_local(Some(80), now).is_empty());
        let cmds = r.on_local(Some(100), now);
        assert_eq!(starts(&cmds), Some((Some(100), Source::Fetched(3))));
    }

    #[test]
    fn copies_of_different_steps_on_different_members_restore_the_newest() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), Some(60), true, now);
        r.on_inventory(4, 7, inv(Some(100), true), now);
        let cmds = r.on_inventory(3, 7, inv(Some(80), true), now);
        assert_eq!(cmds, vec![ResumeCommand::Fetch { from: 4, step: 100, epoch: 7 }]);
        assert_eq!(starts(&r.on_local(Some(100), now)), Some((Some(100), Source::Fetched(4))));
    }

    #[test]
    fn an_own_copy_at_least_as_new_as_every_member_s_is_restored_without_fetching() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), Some(100), true, now);
        r.on_inventory(3, 7, inv(Some(100), true), now);
        let cmds = r.on_inventory(4, 7, inv(Some(80), true), now);
        assert_eq!(starts(&cmds), Some((Some(100), Source::Local)));
    }

    #[test]
    fn equal_steps_on_two_members_are_fetched_from_the_lower_id_whatever_the_answer_order() {
        for order in [[3, 4], [4, 3]] {
            let (mut r, now) = successor();
            r.begin(7, &set(&[2, 3, 4]), None, true, now);
            let mut cmds = Vec::new();
            for m in order {
                cmds = r.on_inventory(m, 7, inv(Some(120), true), now);
            }
            assert_eq!(cmds, vec![ResumeCommand::Fetch { from: 3, step: 120, epoch: 7 }], "order {order:?}");
        }
    }

    #[test]
    fn a_fetch_that_does_not_arrive_falls_back_to_the_next_best_source() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), Some(40), true, now);
        r.on_inventory(3, 7, inv(Some(100), true), now);
        r.on_inventory(4, 7, inv(Some(80), true), now);
        let late = now + Duration::from_millis(DEFAULT_FETCH_TIMEOUT_MS);
        let cmds = r.on_tick(late);
        assert!(cmds.contains(&ResumeCommand::Fetch { from: 4, step: 80, epoch: 7 }), "{cmds:?}");
        // Node 4 fails too: its own older copy is the restore point.
        let cmds = r.on_tick(late + Duration::from_millis(DEFAULT_FETCH_TIMEOUT_MS));
        assert_eq!(starts(&cmds), Some((Some(40), Source::Local)));
    }

    #[test]
    fn answers_of_another_view_or_from_strangers_are_ignored() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), None, true, now);
        assert!(r.on_inventory(3, 6, inv(Some(100), true), now).is_empty());
        assert!(r.on_inventory(1, 7, inv(Some(100), true), now).is_empty(), "node 1 is not in the view");
        let cmds = r.on_tick(now + Duration::from_millis(DEFAULT_ANSWER_TIMEOUT_MS));
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)));
    }

    #[test]
    fn a_new_view_restarts_the_decision_and_forgets_old_answers() {
        let (mut r, now) = successor();
        r.begin(7, &set(&[2, 3, 4]), None, true, now);
        r.on_inventory(3, 7, inv(Some(100), true), now);
        let cmds = r.begin(8, &set(&[2, 4]), None, true, now);
        assert_eq!(cmds, vec![ResumeCommand::Ask { to: 4, epoch: 8 }]);
        let cmds = r.on_inventory(4, 8, inv(None, true), now);
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)), "node 3 left: its copy is out of reach");
    }

    #[test]
    fn a_fresh_job_waits_for_every_configured_member_within_the_grace() {
        let mut r = Resume::new(0, 0..3, ResumeConfig::default());
        let now = Instant::now();
        let cmds = r.begin(1, &set(&[0, 1]), None, false, now);
        assert!(cmds.contains(&ResumeCommand::Ask { to: 1, epoch: 1 }));
        let cmds = r.on_inventory(1, 1, inv(None, false), now);
        assert!(matches!(cmds.as_slice(), [ResumeCommand::Waiting { missing, .. }] if missing == &vec![2]), "{cmds:?}");
        assert!(r.on_tick(now + Duration::from_millis(10)).is_empty(), "the waiting is said once");
        // Node 2 arrives: a new view, everyone present.
        r.begin(2, &set(&[0, 1, 2]), None, false, now + Duration::from_millis(300));
        r.on_inventory(1, 2, inv(None, false), now);
        let cmds = r.on_inventory(2, 2, inv(None, false), now);
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)));
    }

    #[test]
    fn a_fresh_job_starts_with_its_majority_after_the_grace() {
        let mut r = Resume::new(0, 0..3, ResumeConfig::default());
        let now = Instant::now();
        r.begin(1, &set(&[0, 1]), None, false, now);
        r.on_inventory(1, 1, inv(None, false), now);
        let cmds = r.on_tick(now + Duration::from_millis(DEFAULT_FRESH_START_GRACE_MS));
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)));
    }

    #[test]
    fn a_job_a_member_has_seen_running_does_not_wait_for_missing_members() {
        let mut r = Resume::new(1, 0..3, ResumeConfig::default());
        let now = Instant::now();
        r.begin(4, &set(&[1, 2]), None, false, now);
        let cmds = r.on_inventory(2, 4, inv(None, true), now);
        assert_eq!(starts(&cmds), Some((None, Source::Scratch)), "node 0 is gone for good: {cmds:?}");
    }
}
