//! The sans-IO core of a node on a coordination service: it turns what the service reports
//! ([`Observed`]) into the same [`MembershipCommand`]s the embedded membership gives the node
//! loop, and tells the shell when to campaign and what view to publish.
//!
//! The rules, the embedded membership's with the service as the majority:
//! - **Members** are the registered ones. A member of the adopted view that is no longer
//!   registered (its lease or session ran out, or it left) is `Down`, once.
//! - **The coordinator** is the holder of the role, with its fencing token. When the role is
//!   free, the lowest registered node campaigns (the service decides if two try at once), as
//!   the embedded membership makes the lowest live id coordinator — except that a node other
//!   than node 0 first waits for the cluster to settle ([`Coordinated::on_settled`]: the shell
//!   calls it a lease after joining), so that at start node 0 coordinates, as it does there.
//! - **Views** are issued by the coordinator only, as fenced writes: epoch one above the
//!   highest this node has seen, members the registered set. A node adopts a view written by
//!   the current holder of the role (its token) whose epoch is above every one it has seen; a
//!   view of an earlier holder is a leftover (the one a restarted cluster finds in the store)
//!   and is ignored; anything else is `Rejected`.
//! - **Expiry** of this node's lease or session is `QuorumLost`: the node stops its actors;
//!   the shell joins again as a new incarnation and tells the core ([`Coordinated::rejoined`]).
//!   The highest epoch seen survives, so a view older than one adopted is never taken again.
//!
//! ```text
//!  Observed::Members ──▶ Down(id) for view members gone; (coordinator) ──▶ Publish(view)
//!  Observed::Leader(None) ──▶ Campaign      Leader(me) ──▶ token; Publish     Leader(other) ──▶ GaveUp (if it was me)
//!  Observed::View(epoch > seen, token ≥ adopted) ──▶ Adopted      Observed::Expired ──▶ QuorumLost
//! ```

use std::collections::BTreeSet;

use super::super::membership::{MembershipCommand, View, MAX_EPOCH};
use super::{Leader, Observed, Published};

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Carry out a membership command, as for the embedded membership.
    Membership(MembershipCommand),
    /// Try to take the coordinator role; report with [`Coordinated::on_campaigned`].
    Campaign,
    /// Write this view fenced by `token`; report with [`Coordinated::on_published`].
    Publish {
        /// This node's fencing token.
        token: u64,
        /// The view.
        view: View,
    },
}

/// The state machine of one node on a coordination service.
#[derive(Debug)]
pub struct Coordinated {
    me: u32,
    incarnation: u64,
    /// The members the service lists, as last observed.
    registered: BTreeSet<u32>,
    /// The holder of the role, as last observed.
    leader: Option<Leader>,
    /// This node's token while it holds the role.
    token: Option<u64>,
    view: Option<View>,
    /// The token of the coordinator that wrote the adopted view.
    view_token: u64,
    highest_epoch: u64,
    /// The highest epoch of any view seen in the store, adopted or not (a leftover of the
    /// cluster's previous life): a new holder's views go above it, so that a node that did see
    /// the newer epochs can adopt them.
    stored_epoch: u64,
    /// Members of the adopted view reported down (each once, until registered again).
    down: BTreeSet<u32>,
    campaigning: bool,
    /// The view being written.
    publishing: Option<View>,
    /// The newest view this node wrote in its current term (its notification may not have
    /// come yet): the next one must differ from it and go above its epoch.
    written: Option<View>,
    expired: bool,
    /// May campaign (node 0 at once, others once the cluster had time to register).
    settled: bool,
}

impl Coordinated {
    /// Node `me`, incarnation `incarnation`, before it has observed anything.
    pub fn new(me: u32, incarnation: u64) -> Self {
        Self {
            me,
            incarnation,
            registered: BTreeSet::new(),
            leader: None,
            token: None,
            view: None,
            view_token: 0,
            highest_epoch: 0,
            stored_epoch: 0,
            down: BTreeSet::new(),
            campaigning: false,
            publishing: None,
            written: None,
            expired: false,
            settled: me == 0,
        }
    }

    /// Which start of this node the core is for (a new one at each rejoin).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The adopted view.
    pub fn view(&self) -> Option<&View> {
        self.view.as_ref()
    }

    /// This node's fencing token, while it holds the coordinator role.
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// Does this node coordinate the adopted view (it holds the role and the view is its own)?
    pub fn is_coordinator(&self) -> bool {
        self.token.is_some() && self.view.as_ref().is_some_and(|v| v.coordinator == self.me)
    }

    /// The members the service lists, as last observed.
    pub fn registered(&self) -> &BTreeSet<u32> {
        &self.registered
    }

    /// The highest view epoch this node has seen.
    pub fn highest_epoch(&self) -> u64 {
        self.highest_epoch
    }

    /// Feed one observation.
    pub fn on_observed(&mut self, event: Observed) -> Vec<Action> {
        if self.expired {
            // Nothing of the old session counts; the shell is joining again.
            return Vec::new();
        }
        let mut out = Vec::new();
        match event {
            Observed::Members(members) => {
                self.registered = members.into_keys().collect();
                self.down.retain(|id| !self.registered.contains(id));
                if let Some(view) = &self.view {
                    for &id in &view.members {
                        if !self.registered.contains(&id) && id != self.me && self.down.insert(id) {
                            out.push(Action::Membership(MembershipCommand::Down(id)));
                        }
                    }
                }
                if self.leader.is_none() {
                    self.campaign(&mut out);
                }
            }
            Observed::Leader(None) => {
                self.leader = None;
                self.lose_role(&mut out);
                self.campaign(&mut out);
            }
            Observed::Leader(Some(leader)) => {
                self.leader = Some(leader);
                if leader.node == self.me && leader.incarnation == self.incarnation {
                    self.token = Some(leader.token);
                } else {
                    self.lose_role(&mut out);
                }
            }
            Observed::View(published) => self.on_view(published, &mut out),
            Observed::Expired { .. } => {
                self.expired = true;
                self.token = None;
                self.campaigning = false;
                self.publishing = None;
                self.written = None;
                out.push(Action::Membership(MembershipCommand::QuorumLost));
                return out;
            }
        }
        self.publish(&mut out);
        out
    }

    /// The campaign's answer: `Some(token)` when this node holds the role.
    pub fn on_campaigned(&mut self, token: Option<u64>) -> Vec<Action> {
        self.campaigning = false;
        let mut out = Vec::new();
        if self.expired {
            return out;
        }
        if let Some(token) = token {
            self.token = Some(token);
            self.leader = Some(Leader { node: self.me, incarnation: self.incarnation, token });
        }
        self.publish(&mut out);
        out
    }

    /// The write of the view of `epoch`: `written` false when the role was no longer this
    /// node's (fenced out).
    pub fn on_published(&mut self, epoch: u64, written: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(view) = self.publishing.take_if(|v| v.epoch == epoch) else { return out };
        if written && self.token.is_some() {
            self.written = Some(view);
        } else if !written {
            self.lose_role(&mut out);
        }
        // Adoption comes with the service's notification of the write; members may have
        // changed meanwhile.
        self.publish(&mut out);
        out
    }

    /// The shell joined again after [`Observed::Expired`], as `incarnation`. A node other
    /// than node 0 settles again before it may campaign: when the whole service was away,
    /// every node rejoins at once, and node 0 — which holds its own checkpoints — should
    /// coordinate again rather than whoever came back first.
    pub fn rejoined(&mut self, incarnation: u64) {
        *self = Self {
            highest_epoch: self.highest_epoch,
            stored_epoch: self.stored_epoch,
            view_token: self.view_token,
            ..Self::new(self.me, incarnation)
        };
    }

    /// The cluster had time to register since this node joined: it may campaign now.
    pub fn on_settled(&mut self) -> Vec<Action> {
        self.settled = true;
        let mut out = Vec::new();
        if !self.expired && self.leader.is_none() {
            self.campaign(&mut out);
        }
        out
    }

    /// Has this node waited for the cluster to settle?
    pub fn settled(&self) -> bool {
        self.settled
    }

    fn on_view(&mut self, published: Published, out: &mut Vec<Action>) {
        let Published { token, view } = published;
        if self.view.as_ref() == Some(&view) {
            return;
        }
        let reject = |reason: String| {
            Action::Membership(MembershipCommand::Rejected { peer: view.coordinator, kind: "view", reason })
        };
        if view.epoch <= MAX_EPOCH {
            self.stored_epoch = self.stored_epoch.max(view.epoch);
        }
        let Some(holder) = self.leader.filter(|l| l.token == token) else {
            // Not the current holder's: written before the role last changed hands (fenced
            // writes let no one else write). Its successor publishes its own.
            return;
        };
        if view.coordinator != holder.node {
            out.push(reject(format!(
                "names node {} as coordinator, but token {token} is node {}'s",
                view.coordinator, holder.node
            )));
        } else if view.coordinator == self.me && self.token != Some(token) {
            // An earlier process with this node's id still holds the role (its lease has not
            // run out yet): following its view would make this one act as a coordinator whose
            // writes no token fences.
            out.push(reject(format!(
                "names this node as coordinator under token {token}, held by its earlier incarnation {}",
                holder.incarnation
            )));
        } else if view.epoch <= self.highest_epoch {
            out.push(reject(format!("epoch {} is not above {} (seen)", view.epoch, self.highest_epoch)));
        } else if view.epoch > MAX_EPOCH {
            out.push(reject(format!("epoch {} is above the limit {MAX_EPOCH}", view.epoch)));
        } else if token < self.view_token {
            out.push(reject(format!("written with token {token}, older than {} (adopted)", self.view_token)));
        } else {
            self.highest_epoch = view.epoch;
            self.view_token = token;
            self.view = Some(view.clone());
            // A member this view lists is up again as far as downs go.
            self.down.retain(|id| !view.members.contains(id));
            out.push(Action::Membership(MembershipCommand::Adopted(view)));
        }
    }

    fn campaign(&mut self, out: &mut Vec<Action>) {
        let lowest = self.registered.first() == Some(&self.me);
        if self.settled && lowest && !self.campaigning && self.token.is_none() {
            self.campaigning = true;
            out.push(Action::Campaign);
        }
    }

    fn lose_role(&mut self, out: &mut Vec<Action>) {
        self.written = None;
        if self.token.take().is_some() {
            if let Some(view) = &self.view {
                out.push(Action::Membership(MembershipCommand::GaveUp(view.clone())));
            }
        }
    }

    /// As the coordinator, write a view when the registered members differ from the adopted
    /// view's (or the adopted view is another coordinator's).
    fn publish(&mut self, out: &mut Vec<Action>) {
        let Some(token) = self.token else { return };
        if self.publishing.is_some() || !self.registered.contains(&self.me) {
            return;
        }
        let newest = match (&self.written, &self.view) {
            (Some(w), Some(v)) if v.epoch > w.epoch => Some(v),
            (Some(w), _) => Some(w),
            (None, v) => v.as_ref(),
        };
        let current = newest.is_some_and(|v| v.coordinator == self.me && v.members == self.registered);
        let above = self.highest_epoch.max(self.stored_epoch).max(self.written.as_ref().map_or(0, |w| w.epoch));
        if current || above >= MAX_EPOCH {
            return;
        }
        let view = View { epoch: above + 1, coordinator: self.me, members: self.registered.clone() };
        self.publishing = Some(view.clone());
        out.push(Action::Publish { token, view });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::coordination::Member;
    use std::collections::BTreeMap;

    fn members(ids: &[u32]) -> Observed {
        Observed::Members(
            ids.iter()
                .map(|&id| (id, Member { id, incarnation: 1, addr: format!("127.0.0.1:{id}") }))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn leader(node: u32, token: u64) -> Observed {
        Observed::Leader(Some(Leader { node, incarnation: 1, token }))
    }

    fn view(epoch: u64, coordinator: u32, ids: &[u32]) -> View {
        View { epoch, coordinator, members: ids.iter().copied().collect() }
    }

    fn published(token: u64, v: &View) -> Observed {
        Observed::View(Published { token, view: v.clone() })
    }

    /// The commands of `actions` of the membership kind.
    fn commands(actions: &[Action]) -> Vec<MembershipCommand> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Membership(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_registered_node_campaigns_once_and_the_winner_publishes_the_registered_set() {
        let mut core = Coordinated::new(0, 1);
        // Not registered yet: no campaign.
        assert!(core.on_observed(Observed::Leader(None)).is_empty());
        assert_eq!(core.on_observed(members(&[0, 1])), vec![Action::Campaign]);
        // A campaign in flight is not repeated.
        assert!(core.on_observed(members(&[0, 1, 2])).is_empty());
        let out = core.on_campaigned(Some(7));
        assert_eq!(out, vec![Action::Publish { token: 7, view: view(1, 0, &[0, 1, 2]) }]);
        // One write at a time; the next comes after the answer.
        assert!(core.on_observed(members(&[0, 1])).is_empty());
        assert_eq!(core.on_published(1, true), vec![Action::Publish { token: 7, view: view(2, 0, &[0, 1]) }]);
        assert_eq!(
            commands(&core.on_observed(published(7, &view(2, 0, &[0, 1])))),
            vec![MembershipCommand::Adopted(view(2, 0, &[0, 1]))]
        );
        assert!(core.is_coordinator());
        assert!(core.on_published(2, true).is_empty(), "the view is current");
    }

    #[test]
    fn members_gone_from_the_service_are_down_once_and_the_coordinator_issues_the_next_view() {
        let mut core = Coordinated::new(0, 1);
        core.on_observed(members(&[0, 1, 2]));
        assert_eq!(core.on_campaigned(Some(3)), vec![Action::Publish { token: 3, view: view(1, 0, &[0, 1, 2]) }]);
        assert!(core.on_published(1, true).is_empty(), "written: nothing more until the members change");
        core.on_observed(published(3, &view(1, 0, &[0, 1, 2])));
        let out = core.on_observed(members(&[0, 2]));
        assert_eq!(
            out,
            vec![
                Action::Membership(MembershipCommand::Down(1)),
                Action::Publish { token: 3, view: view(2, 0, &[0, 2]) }
            ]
        );
        // Told again (a re-read after a broken watch): no second down.
        assert_eq!(commands(&core.on_observed(members(&[0, 2]))), vec![]);
    }

    #[test]
    fn a_follower_adopts_newer_views_only_and_names_what_it_rejects() {
        let mut core = Coordinated::new(1, 1);
        core.on_observed(leader(0, 5));
        core.on_observed(members(&[0, 1]));
        assert_eq!(
            commands(&core.on_observed(published(5, &view(3, 0, &[0, 1])))),
            vec![MembershipCommand::Adopted(view(3, 0, &[0, 1]))]
        );
        // Same view again: nothing. Older epoch: rejected.
        assert!(core.on_observed(published(5, &view(3, 0, &[0, 1]))).is_empty());
        let out = commands(&core.on_observed(published(5, &view(2, 0, &[0]))));
        assert!(
            matches!(&out[..], [MembershipCommand::Rejected { peer: 0, kind: "view", reason }] if reason.contains("not above"))
        );
        // Written with another token than the holder's (a leftover of an earlier holder):
        // ignored, even with a higher epoch.
        assert!(core.on_observed(published(4, &view(9, 2, &[1, 2]))).is_empty());
        // The holder's token naming another coordinator: rejected.
        let out = commands(&core.on_observed(published(5, &view(9, 2, &[1, 2]))));
        assert!(
            matches!(&out[..], [MembershipCommand::Rejected { peer: 2, reason, .. }] if reason.contains("node 0's"))
        );
        // Past the epoch limit: rejected.
        let out = commands(&core.on_observed(published(5, &view(MAX_EPOCH + 1, 0, &[0, 1]))));
        assert!(matches!(&out[..], [MembershipCommand::Rejected { reason, .. }] if reason.contains("limit")));
        assert_eq!(core.view(), Some(&view(3, 0, &[0, 1])));
    }

    #[test]
    fn losing_the_role_gives_the_view_up_and_a_fenced_out_write_ends_the_term() {
        let mut core = Coordinated::new(0, 1);
        core.on_observed(members(&[0, 1]));
        core.on_campaigned(Some(3));
        core.on_published(1, true);
        core.on_observed(published(3, &view(1, 0, &[0, 1])));
        // The service says another holds the role now: this term is over.
        let out = core.on_observed(leader(1, 9));
        assert_eq!(commands(&out), vec![MembershipCommand::GaveUp(view(1, 0, &[0, 1]))]);
        assert!(!core.is_coordinator());

        // A write refused by the fence ends the term too, without waiting for the notification.
        let mut core = Coordinated::new(0, 1);
        core.on_observed(members(&[0, 1]));
        core.on_campaigned(Some(3));
        core.on_published(1, true);
        core.on_observed(published(3, &view(1, 0, &[0, 1])));
        core.on_observed(members(&[0, 1, 2]));
        let out = core.on_published(2, false);
        assert_eq!(commands(&out), vec![MembershipCommand::GaveUp(view(1, 0, &[0, 1]))]);
        assert_eq!(core.token(), None);
    }

    #[test]
    fn the_lowest_registered_node_campaigns_and_others_wait_to_settle_first() {
        let mut one = Coordinated::new(1, 1);
        // Node 0 has not registered yet: node 1 is the lowest, but waits for the others.
        assert!(one.on_observed(members(&[1, 2])).is_empty());
        assert_eq!(one.on_settled(), vec![Action::Campaign]);
        // Node 2 never campaigns while node 1 is registered.
        let mut two = Coordinated::new(2, 1);
        two.on_settled();
        assert!(two.on_observed(members(&[1, 2])).is_empty());
        assert!(two.on_observed(Observed::Leader(None)).is_empty());
        // Node 0 campaigns at once when it is the lowest.
        let mut zero = Coordinated::new(0, 1);
        assert_eq!(zero.on_observed(members(&[0, 1, 2])), vec![Action::Campaign]);
        // Once node 1 is gone, node 2 is the lowest.
        assert_eq!(two.on_observed(members(&[2])), vec![Action::Campaign]);
    }

    #[test]
    fn a_previous_incarnations_role_is_not_this_ones() {
        let mut core = Coordinated::new(0, 2);
        core.on_observed(members(&[0, 1]));
        core.on_campaigned(None);
        // Incarnation 1 of node 0 still holds the role until its lease runs out.
        assert!(core.on_observed(leader(0, 4)).is_empty());
        assert_eq!(core.token(), None);
        // Its view names node 0 as coordinator: not this incarnation, which holds no token.
        let old = view(3, 0, &[0, 1]);
        let rejected = commands(&core.on_observed(published(4, &old)));
        assert!(
            matches!(&rejected[..], [MembershipCommand::Rejected { reason, .. }] if reason.contains("earlier incarnation")),
            "{rejected:?}"
        );
        assert_eq!(core.view(), None);
        // When it does, this incarnation campaigns.
        assert_eq!(core.on_observed(Observed::Leader(None)), vec![Action::Campaign]);
    }

    #[test]
    fn expiry_stops_the_node_and_a_rejoin_keeps_the_epochs_seen() {
        let mut core = Coordinated::new(1, 1);
        core.on_observed(members(&[0, 1]));
        core.on_campaigned(None);
        core.on_observed(leader(0, 5));
        core.on_observed(published(5, &view(4, 0, &[0, 1])));
        assert_eq!(
            core.on_observed(Observed::Expired { reason: "lease 7 not renewed in time".into() }),
            vec![Action::Membership(MembershipCommand::QuorumLost)]
        );
        // What the old session still delivers does not count.
        assert!(core.on_observed(members(&[0])).is_empty());
        core.rejoined(2);
        core.on_observed(members(&[0, 1]));
        // The holder is not known again yet: its views wait.
        assert!(core.on_observed(published(5, &view(4, 0, &[0, 1]))).is_empty());
        core.on_observed(leader(0, 5));
        let out = commands(&core.on_observed(published(5, &view(4, 0, &[0, 1]))));
        assert!(
            matches!(&out[..], [MembershipCommand::Rejected { .. }]),
            "a view seen before the expiry is not news: {out:?}"
        );
        assert_eq!(
            commands(&core.on_observed(published(5, &view(5, 0, &[0, 1])))),
            vec![MembershipCommand::Adopted(view(5, 0, &[0, 1]))]
        );
        // Back after the whole service was away, node 1 is the lowest registered but waits to
        // settle, so that node 0 can take the role back.
        let mut core = Coordinated::new(1, 1);
        core.on_settled();
        core.on_observed(members(&[0, 1]));
        core.on_observed(Observed::Expired { reason: "session Expired".into() });
        core.rejoined(2);
        assert!(core.on_observed(members(&[1])).is_empty());
        assert!(core.on_observed(Observed::Leader(None)).is_empty());
        assert_eq!(core.on_settled(), vec![Action::Campaign]);
    }

    #[test]
    fn a_restarted_cluster_ignores_the_view_left_in_the_store() {
        // The store still has the view of the cluster's previous life; nobody holds the role.
        let mut core = Coordinated::new(0, 1);
        core.on_observed(members(&[0, 1]));
        assert!(core.on_observed(Observed::Leader(None)).is_empty(), "already campaigning");
        assert!(core.on_observed(published(4, &view(17, 0, &[0, 1, 2]))).is_empty());
        assert_eq!(core.view(), None);
        // The new holder's first view goes above the leftover's epoch: a member that lived
        // through it (and saw epoch 17) must be able to adopt it.
        assert_eq!(core.on_campaigned(Some(9)), vec![Action::Publish { token: 9, view: view(18, 0, &[0, 1]) }]);
    }

    #[test]
    fn views_never_pass_the_epoch_limit() {
        let mut core = Coordinated::new(0, 1);
        core.on_observed(members(&[0]));
        core.on_observed(leader(1, 2));
        core.on_observed(published(2, &view(MAX_EPOCH, 1, &[0, 1])));
        core.on_observed(Observed::Leader(None));
        assert!(core.on_campaigned(Some(3)).is_empty(), "no epoch left to issue");
    }
}
