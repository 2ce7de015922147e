//! Who may send what (sans-IO): the authority rules of the control plane.
//!
//! A node obeys a message only if its sender is entitled to send it under the
//! view this node has adopted:
//!
//! | message                                                                  | only from                                   |
//! |--------------------------------------------------------------------------|---------------------------------------------|
//! | `spawn`, `stop`, `locations`, `job-done`, `job-failed`, `checkpoint-query`, `registry`; `assign`, `rollback`, `shard-ready` | the view's coordinator |
//! | `checkpoint-fetch`                                                       | the view's coordinator, or a member to this node as its coordinator |
//! | `started`, `failed`, `checkpoint-inventory`, `checkpoint-stored`, `registry-ack` | a member of the view, to this node as its coordinator |
//! | `step-applied`, `checkpoint-saved`, `checkpoint-failed`, `finished`      | the host of that aggregator, to this node as coordinator |
//! | `params`                                                                 | the host of that aggregator range           |
//! | `gradient(s)`, `params-request`, `batch-request`                         | the host of the trainer that owns the partition |
//! | `batches`                                                                | the host of that partition's shard          |
//! | `checkpoint-copy`                                                        | the coordinator, the member a resume fetches from, or the host of the file's range |
//! | `replicating`                                                            | the host of the file's range, to this node as coordinator |
//! | `submit`, `cancel`                                                       | a member of the view                        |
//!
//! Hosts are where the coordinator's location map (or the view's placement)
//! puts the actor. Every index, offset and length is checked against the
//! job's plan before anything uses it.
//!
//! A message can be early rather than forged: a new coordinator's `spawn` can
//! overtake its view (frames travel on separate streams), an aggregator's
//! `params` the location map that moved it. Such a message **waits** in a
//! bounded lot ([`Parked`]) until the next view or location map, and is
//! judged again then; one still not entitled after [`Parked::max_age`], or
//! pushed out by the bounds, is rejected. Every rejection is counted by kind
//! (`phalanx_rejected_messages_total`) and reported as a `message_rejected`
//! event.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use phalanx_actors::protocol::{ActorKey, JobPlan, Msg};

use super::membership::View;
use super::runner::Routes;
use super::wire::{Inbound, NodeMsg};

/// What to do with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The sender is entitled: handle it.
    Accept,
    /// The sender may become entitled once a newer view or location map
    /// arrives (the message overtook it): hold it, then judge it again.
    Wait(String),
    /// Never acceptable as it is: drop and count it.
    Reject(String),
}

/// What the rules look at for a message of a job this node hosts.
pub(crate) struct JobScope<'a> {
    /// The job's shape: partitions, trainers, parameter ranges.
    pub plan: &'a JobPlan,
    /// Where the job's actors run.
    pub routes: &'a Routes,
    /// The member a resume on this node fetches checkpoint files from.
    pub fetching_from: Option<u32>,
}

/// What the rules look at.
pub(crate) struct Scope<'a> {
    /// This node.
    pub me: u32,
    /// Configured members are `0..members`.
    pub members: u32,
    /// The adopted view.
    pub view: Option<&'a View>,
    /// The message's job, if it is scoped to one this node hosts.
    pub job: Option<JobScope<'a>>,
}

impl Scope<'_> {
    /// Judge a message from `peer`.
    pub(crate) fn judge(&self, peer: u32, inbound: &Inbound) -> Verdict {
        if peer == self.me {
            // This node's own frames (its coordinator's records, its own queue).
            return Verdict::Accept;
        }
        match inbound {
            Inbound::Control(msg) => self.control(peer, msg),
            Inbound::Deliver(_, _, msg) => self.deliver(peer, msg),
            Inbound::Checkpoint(_, name, _) => {
                let fetching = self.job.as_ref().and_then(|j| j.fetching_from);
                if self.coordinator() == Some(peer) || fetching == Some(peer) {
                    return Verdict::Accept;
                }
                // A range's host copies what it wrote (aggregators spread over the nodes).
                if let Ok(range) = self.range_of_file(name) {
                    if self.sent_by_host(peer, range) == Verdict::Accept {
                        return Verdict::Accept;
                    }
                }
                Verdict::Reject(format!(
                    "node {peer} is not the coordinator ({}), a node this one fetches from, nor the host of the \
                     range of {name:?}",
                    self.named_coordinator()
                ))
            }
        }
    }

    fn coordinator(&self) -> Option<u32> {
        self.view.map(|v| v.coordinator)
    }

    fn named_coordinator(&self) -> String {
        match self.view {
            Some(v) => format!("node {} in view {}", v.coordinator, v.epoch),
            None => "none: no view adopted".into(),
        }
    }

    /// Only the coordinator of the adopted view sends it.
    fn sent_by_coordinator(&self, peer: u32) -> Verdict {
        if self.coordinator() == Some(peer) {
            Verdict::Accept
        } else {
            Verdict::Wait(format!("node {peer} is not the coordinator ({})", self.named_coordinator()))
        }
    }

    /// A member of the adopted view sends it to this node as its coordinator.
    fn to_coordinator(&self, peer: u32) -> Verdict {
        match self.view {
            Some(v) if v.coordinator == self.me && v.members.contains(&peer) => Verdict::Accept,
            Some(v) if v.coordinator == self.me => {
                Verdict::Reject(format!("node {peer} is not a member of view {}", v.epoch))
            }
            _ => Verdict::Reject(format!("this node does not coordinate ({})", self.named_coordinator())),
        }
    }

    /// A member of the adopted view sends it.
    fn sent_by_member(&self, peer: u32) -> Verdict {
        match self.view {
            Some(v) if v.members.contains(&peer) => Verdict::Accept,
            Some(v) => Verdict::Wait(format!("node {peer} is not a member of view {}", v.epoch)),
            None => Verdict::Wait("no view adopted".into()),
        }
    }

    /// The node hosting `key` sends it.
    fn sent_by_host(&self, peer: u32, key: ActorKey) -> Verdict {
        let Some(job) = &self.job else { return Verdict::Wait("the job is not hosted here (yet)".into()) };
        if !job.plan.contains(key) {
            return Verdict::Reject(format!("the job has no {key}"));
        }
        match job.routes.node_of(key) {
            Some(host) if host == peer => Verdict::Accept,
            host => Verdict::Wait(format!("node {peer} does not host {key} (node {host:?} does)")),
        }
    }

    fn plan(&self) -> Option<&JobPlan> {
        self.job.as_ref().map(|j| j.plan)
    }

    fn control(&self, peer: u32, msg: &NodeMsg) -> Verdict {
        match msg {
            NodeMsg::Spawn { key, generation, .. } => {
                if let Some(reject) = self.unknown_actor(*key) {
                    return reject;
                }
                // A spawn of a later epoch than this node's view overtook the view that makes
                // its sender that epoch's coordinator (they travel on separate streams): it
                // waits for that view, as any early order does.
                let epoch = generation >> 32;
                match self.sent_by_coordinator(peer) {
                    Verdict::Accept if self.view.is_some_and(|v| epoch > v.epoch) => Verdict::Wait(format!(
                        "generation {generation} belongs to epoch {epoch}, after the view's {}",
                        self.view.map_or(0, |v| v.epoch)
                    )),
                    verdict => verdict,
                }
            }
            NodeMsg::Stop { key, .. } => self.unknown_actor(*key).unwrap_or_else(|| self.sent_by_coordinator(peer)),
            NodeMsg::Locations { map, .. } => {
                if let Some((key, node)) = map.iter().find(|(_, node)| **node >= self.members) {
                    return Verdict::Reject(format!("{key} placed on node {node}, not a configured member"));
                }
                if let Some(reject) = map.keys().find_map(|key| self.unknown_actor(*key)) {
                    return reject;
                }
                self.sent_by_coordinator(peer)
            }
            // A new coordinator fetches a member's files to resume; a member fetches the
            // coordinator's to restore a range that moved to it.
            NodeMsg::CheckpointFetch { .. } => {
                if self.view.is_some_and(|v| v.coordinator == self.me && v.members.contains(&peer)) {
                    Verdict::Accept
                } else {
                    self.sent_by_coordinator(peer)
                }
            }
            NodeMsg::JobDone { .. }
            | NodeMsg::JobFailed { .. }
            | NodeMsg::Progress { .. }
            | NodeMsg::CheckpointQuery { .. }
            | NodeMsg::Registry(_)
            | NodeMsg::SubmitAnswer { .. } => self.sent_by_coordinator(peer),
            NodeMsg::Started { key, .. } | NodeMsg::Failed { key, .. } => {
                self.unknown_actor(*key).unwrap_or_else(|| self.to_coordinator(peer))
            }
            NodeMsg::CheckpointInventory { .. } | NodeMsg::CheckpointStored { .. } | NodeMsg::RegistryAck { .. } => {
                self.to_coordinator(peer)
            }
            NodeMsg::Submit { .. } | NodeMsg::Cancel { .. } => self.sent_by_member(peer),
            NodeMsg::Replicating { name, .. } => match self.range_of_file(name) {
                Ok(range) => match self.to_coordinator(peer) {
                    Verdict::Accept => self.sent_by_host(peer, range),
                    other => other,
                },
                Err(reject) => reject,
            },
            // Checkpoint copies and deliveries arrive decoded as such (see wire::decode);
            // membership goes to the membership core.
            NodeMsg::CheckpointCopy { .. } | NodeMsg::Deliver { .. } | NodeMsg::Membership(_) => {
                Verdict::Reject(format!("a {} frame in the wrong place", msg.kind()))
            }
        }
    }

    /// The aggregator whose range the checkpoint file `name` holds.
    fn range_of_file(&self, name: &str) -> Result<ActorKey, Verdict> {
        let Some(plan) = self.plan() else { return Err(Verdict::Wait("the job is not hosted here (yet)".into())) };
        let key = phalanx_actors::checkpoint::FileKey::parse(name)
            .ok_or_else(|| Verdict::Reject(format!("{name:?} is not a checkpoint file name")))?;
        plan.ranges
            .iter()
            .position(|(o, l)| (*o, *l) == (key.offset, key.len))
            .map(|r| ActorKey::aggregator(r as u32))
            .ok_or_else(|| Verdict::Reject(format!("{name:?} holds no parameter range of the job")))
    }

    /// `Some(reject)` when the job is known here and has no such actor.
    fn unknown_actor(&self, key: ActorKey) -> Option<Verdict> {
        self.plan().filter(|p| !p.contains(key)).map(|_| Verdict::Reject(format!("the job has no {key}")))
    }

    fn deliver(&self, peer: u32, msg: &Msg) -> Verdict {
        let Some(plan) = self.plan() else {
            // Not hosted here: nothing would take it; only the sender class is known.
            return match msg {
                Msg::Assign { .. } | Msg::Rollback { .. } | Msg::ShardReady { .. } => self.sent_by_coordinator(peer),
                _ => Verdict::Accept,
            };
        };
        let partitions = plan.assignment.len() as u64;
        let owner = |partition: u32| -> Result<ActorKey, Verdict> {
            match plan.assignment.get(partition as usize) {
                Some(t) => Ok(ActorKey::trainer(*t)),
                None => Err(Verdict::Reject(format!("partition {partition} of {partitions}"))),
            }
        };
        let range = |range: u32| -> Result<(usize, usize), Verdict> {
            plan.ranges
                .get(range as usize)
                .copied()
                .ok_or_else(|| Verdict::Reject(format!("range {range} of {}", plan.ranges.len())))
        };
        let shaped = |what: &str, offset: u64, len: usize, expected: (usize, usize)| -> Result<(), Verdict> {
            if (offset, len) == (expected.0 as u64, expected.1) {
                Ok(())
            } else {
                Err(Verdict::Reject(format!(
                    "{what} of {len} values at offset {offset}; the range is {} values at {}",
                    expected.1, expected.0
                )))
            }
        };
        let gradient = |g: &phalanx_actors::protocol::Gradient| -> Result<ActorKey, Verdict> {
            // One partition's gradient or a trainer's sum over a node of the reduction tree:
            // every partition of it must be the sender's.
            let trainer = owner(g.partition)?;
            let span = g.span();
            if !span.is_node(partitions as u32) {
                return Err(Verdict::Reject(format!(
                    "a gradient of {span}: not a node of the reduction tree over {partitions} partitions"
                )));
            }
            if (span.lo..span.hi).any(|p| owner(p).ok() != Some(trainer)) {
                return Err(Verdict::Reject(format!("a gradient of {span}: partitions of different trainers")));
            }
            let fits = plan.ranges.iter().any(|(o, l)| (g.offset, g.values.len()) == (*o as u64, *l));
            if !fits {
                return Err(Verdict::Reject(format!(
                    "a gradient of {} values at offset {}: no parameter range is that",
                    g.values.len(),
                    g.offset
                )));
            }
            Ok(trainer)
        };
        let verdict = (|| -> Result<Verdict, Verdict> {
            Ok(match msg {
                Msg::Assign { .. } | Msg::Rollback { .. } | Msg::ShardReady { .. } => self.sent_by_coordinator(peer),
                Msg::Params(p) => {
                    shaped("parameters", p.offset, p.len(), range(p.range)?)?;
                    self.sent_by_host(peer, ActorKey::aggregator(p.range))
                }
                Msg::Gradient(g) => self.sent_by_host(peer, gradient(g)?),
                Msg::Gradients(gs) => {
                    let Some(first) = gs.first() else { return Err(Verdict::Reject("no gradients".into())) };
                    let trainer = gradient(first)?;
                    for g in &gs[1..] {
                        if gradient(g)? != trainer {
                            return Err(Verdict::Reject("gradients of partitions of different trainers".into()));
                        }
                    }
                    self.sent_by_host(peer, trainer)
                }
                Msg::ParamsRequest { trainer, .. } => self.sent_by_host(peer, ActorKey::trainer(*trainer)),
                Msg::BatchRequest { partition, trainer, .. } => {
                    owner(*partition)?;
                    self.sent_by_host(peer, ActorKey::trainer(*trainer))
                }
                Msg::Batches(batches) => {
                    let Some(first) = batches.first() else { return Err(Verdict::Reject("no batches".into())) };
                    if batches.iter().any(|b| b.partition != first.partition) {
                        return Err(Verdict::Reject("batches of several partitions".into()));
                    }
                    owner(first.partition)?;
                    self.sent_by_host(peer, ActorKey::shard(first.partition))
                }
                Msg::StepApplied { range: r, .. }
                | Msg::CheckpointSaved { range: r, .. }
                | Msg::CheckpointFailed { range: r, .. } => {
                    range(*r)?;
                    self.to_coordinator_from_host(peer, ActorKey::aggregator(*r))
                }
                Msg::Finished { range: r, offset, values, .. } => {
                    shaped("final parameters", *offset, values.len(), range(*r)?)?;
                    self.to_coordinator_from_host(peer, ActorKey::aggregator(*r))
                }
            })
        })();
        verdict.unwrap_or_else(|reject| reject)
    }

    fn to_coordinator_from_host(&self, peer: u32, key: ActorKey) -> Verdict {
        match self.to_coordinator(peer) {
            Verdict::Accept => self.sent_by_host(peer, key),
            other => other,
        }
    }
}

/// Messages held until a newer view or location map says whether their
/// senders are entitled: at most [`PER_PEER_FRAMES`] frames and
/// [`PER_PEER_BYTES`] bytes per sender (a sender pushes out only its own
/// oldest), each for at most `max_age`.
pub(crate) struct Parked {
    lot: VecDeque<ParkedFrame>,
    max_age: Duration,
}

/// Frames one sender may have waiting.
pub(crate) const PER_PEER_FRAMES: usize = 256;
/// Bytes one sender may have waiting.
pub(crate) const PER_PEER_BYTES: usize = 32 << 20;

/// A held message.
pub(crate) struct ParkedFrame {
    /// When it arrived.
    pub at: Instant,
    /// Its sender.
    pub peer: u32,
    /// The message.
    pub inbound: Inbound,
    /// Why it waits.
    pub reason: String,
    bytes: usize,
}

impl Parked {
    /// A lot whose messages wait at most `max_age`.
    pub(crate) fn new(max_age: Duration) -> Self {
        Self { lot: VecDeque::new(), max_age }
    }

    /// How long a message waits at most.
    pub(crate) fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Messages waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lot.len()
    }

    /// Hold a message; returns the sender's oldest ones pushed out by the bounds.
    pub(crate) fn park(&mut self, at: Instant, peer: u32, inbound: Inbound, reason: String) -> Vec<ParkedFrame> {
        let bytes = approx_bytes(&inbound);
        self.lot.push_back(ParkedFrame { at, peer, inbound, reason, bytes });
        let mut out = Vec::new();
        loop {
            let (frames, total) = self
                .lot
                .iter()
                .filter(|f| f.peer == peer)
                .fold((0usize, 0usize), |(n, b), f| (n + 1, b.saturating_add(f.bytes)));
            if frames <= PER_PEER_FRAMES && total <= PER_PEER_BYTES {
                break;
            }
            let Some(oldest) = self.lot.iter().position(|f| f.peer == peer) else { break };
            out.extend(self.lot.remove(oldest));
        }
        out
    }

    /// Every held message, to be judged again (re-park those still waiting with their `at`).
    pub(crate) fn take(&mut self) -> Vec<ParkedFrame> {
        self.lot.drain(..).collect()
    }

    /// Put back a message taken with [`take`](Self::take) that still waits.
    pub(crate) fn keep(&mut self, frame: ParkedFrame) {
        self.lot.push_back(frame);
    }

    /// Messages that waited longer than `max_age` at `now`.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<ParkedFrame> {
        let max_age = self.max_age;
        let (old, young): (Vec<_>, Vec<_>) =
            self.lot.drain(..).partition(|f| now.saturating_duration_since(f.at) > max_age);
        self.lot = young.into();
        old
    }
}

/// About how much memory a decoded message holds.
fn approx_bytes(inbound: &Inbound) -> usize {
    const HEADER: usize = 256;
    let tensors = match inbound {
        Inbound::Deliver(_, _, msg) => match msg {
            Msg::Params(p) => p.values.len() * 4 + p.delta.as_ref().map_or(0, |d| d.code.byte_len()),
            Msg::Gradient(g) => g.values.len() * 4,
            Msg::Gradients(gs) => gs.iter().map(|g| g.values.len() * 4).sum(),
            Msg::Finished { values, .. } => values.len() * 4,
            Msg::Batches(bs) => bs.iter().map(|b| b.x.len() * 4 + b.targets.len() * 4).sum(),
            _ => 0,
        },
        Inbound::Checkpoint(_, _, bytes) => bytes.len(),
        Inbound::Control(_) => 0,
    };
    HEADER + tensors
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use phalanx_actors::model::kernel::KernelFingerprint;
    use phalanx_actors::protocol::{Addr, Gradient, Params, RestartPolicy, Schedule};

    use super::*;
    use crate::cluster::placement::Placement;

    fn plan() -> JobPlan {
        let policy = RestartPolicy { max_restarts: 3, window_ms: 1_000, backoff_initial_ms: 10, backoff_max_ms: 35 };
        JobPlan {
            job: 1,
            assignment: JobPlan::round_robin(4, 2),
            trainers: 2,
            ranges: vec![(0, 10), (10, 6)],
            schedule: Schedule { epochs: 1, steps_per_epoch: 10 },
            shard_policy: policy,
            trainer_policy: policy,
            aggregator_policy: policy,
        }
    }

    fn view(epoch: u64, coordinator: u32) -> View {
        View { epoch, coordinator, members: (0..4).collect() }
    }

    /// Routes with aggregator 0 on node 1, aggregator 1 on node 2, trainer 0
    /// on node 2, trainer 1 and every shard on node 3 (as coordinator 0 said).
    fn routes(v: &View) -> Routes {
        let assignment = JobPlan::round_robin(4, 2);
        let shape = crate::cluster::placement::Shape {
            policy: crate::cluster::placement::Policy::Ring,
            configured: 4,
            trainers: 2,
            assignment: &assignment,
            aggregators: 2,
            spread: false,
            replicas: 1,
        };
        let placement = Placement::compute(v.epoch, v.coordinator, &v.members, &shape);
        let map: BTreeMap<ActorKey, u32> = [
            (ActorKey::aggregator(0), 1),
            (ActorKey::aggregator(1), 2),
            (ActorKey::trainer(0), 2),
            (ActorKey::trainer(1), 3),
        ]
        .into_iter()
        .chain((0..4).map(|p| (ActorKey::shard(p), 3)))
        .collect();
        let mut routes = Routes { placement, ..Routes::default() };
        let _ = routes.set_locations(v.coordinator, v.epoch, 1, map);
        routes
    }

    fn judge(me: u32, v: &View, peer: u32, inbound: &Inbound) -> Verdict {
        judge_in(&plan(), me, v, peer, inbound)
    }

    fn judge_in(plan: &JobPlan, me: u32, v: &View, peer: u32, inbound: &Inbound) -> Verdict {
        let routes = routes(v);
        let scope =
            Scope { me, members: 4, view: Some(v), job: Some(JobScope { plan, routes: &routes, fetching_from: None }) };
        scope.judge(peer, inbound)
    }

    fn control(msg: NodeMsg) -> Inbound {
        Inbound::Control(msg)
    }

    fn deliver(to: Addr, msg: Msg) -> Inbound {
        Inbound::Deliver(1, to, msg)
    }

    fn params(range: u32, offset: u64, len: usize) -> Msg {
        Msg::Params(Params::new(1, 1, 0, range, offset, vec![0.0; len].into()))
    }

    /// A gradient of job 1 at step 0 of `len` values at `offset`.
    fn grad_of(generation: u64, partition: u32, offset: u64, len: usize) -> Gradient {
        Gradient {
            job: 1,
            generation,
            step: 0,
            partition,
            partitions: 1,
            samples: 1,
            loss_sum: 0.0,
            offset,
            values: vec![0.0; len].into(),
        }
    }

    fn gradient(partition: u32, offset: u64, len: usize) -> Msg {
        Msg::Gradient(grad_of(1, partition, offset, len))
    }

    fn waits(v: &Verdict) -> bool {
        matches!(v, Verdict::Wait(_))
    }

    fn rejects(v: &Verdict) -> bool {
        matches!(v, Verdict::Reject(_))
    }

    #[test]
    fn coordinator_orders_are_taken_from_the_coordinator_only() {
        let v = view(3, 0);
        let done = control(NodeMsg::JobDone { job: 1, summary: None, model_sha256: "x".into() });
        assert_eq!(judge(2, &v, 0, &done), Verdict::Accept);
        assert!(waits(&judge(2, &v, 3, &done)), "a job-done from a member that does not coordinate");
        let progress = control(NodeMsg::Progress { job: 1, step: 5, total_steps: 10, loss: 0.5 });
        assert_eq!(judge(2, &v, 0, &progress), Verdict::Accept);
        assert!(waits(&judge(2, &v, 3, &progress)), "progress from a member that does not coordinate");
        let spawn = |generation| {
            control(NodeMsg::Spawn {
                job: 1,
                key: ActorKey::trainer(1),
                generation,
                restore: None,
                spawn: 1,
                kernel: KernelFingerprint(1),
            })
        };
        assert_eq!(judge(2, &v, 0, &spawn(3 << 32)), Verdict::Accept);
        assert!(waits(&judge(2, &v, 3, &spawn(3 << 32))));
        assert!(waits(&judge(2, &v, 0, &spawn(9 << 32))), "a generation of a later epoch waits for its view");
        assert_eq!(judge(2, &view(9, 0), 0, &spawn(9 << 32)), Verdict::Accept, "and is taken under it");
        let no_such = control(NodeMsg::Spawn {
            job: 1,
            key: ActorKey::trainer(7),
            generation: 1,
            restore: None,
            spawn: 1,
            kernel: KernelFingerprint(1),
        });
        assert!(rejects(&judge(2, &v, 0, &no_such)));
        let rollback = deliver(Addr::Aggregator(0), Msg::Rollback { job: 1, generation: u64::MAX, step: 0 });
        assert_eq!(judge(1, &v, 0, &rollback), Verdict::Accept);
        assert!(waits(&judge(1, &v, 3, &rollback)), "a rollback from a member that does not coordinate");
        let replicating = control(NodeMsg::Replicating { job: 1, name: "x".into(), to: vec![] });
        assert!(rejects(&judge(2, &v, 3, &replicating)), "not a checkpoint file");
        assert_eq!(judge(2, &v, 2, &replicating), Verdict::Accept, "its own record");
        // The host of a range tells the coordinator what it copied where; nobody else does.
        let name = phalanx_actors::checkpoint::FileKey { step: 4, offset: 10, len: 6 }.file_name();
        let range_1 = control(NodeMsg::Replicating { job: 1, name, to: vec![0] });
        assert_eq!(judge(0, &v, 2, &range_1), Verdict::Accept, "node 2 hosts aggregator 1");
        assert!(waits(&judge(0, &v, 1, &range_1)), "node 1 hosts aggregator 0, not 1");
        assert!(rejects(&judge(3, &v, 2, &range_1)), "node 3 does not coordinate");
        let fetch = control(NodeMsg::CheckpointFetch { job: 1, epoch: 3, step: 4 });
        assert_eq!(judge(2, &v, 0, &fetch), Verdict::Accept, "a coordinator fetching to resume");
        assert_eq!(judge(0, &v, 2, &fetch), Verdict::Accept, "a member fetching a range's files from its coordinator");
        assert!(waits(&judge(3, &v, 2, &fetch)), "between members that do not coordinate");
    }

    #[test]
    fn answers_to_the_coordinator_are_taken_only_by_it() {
        let v = view(3, 0);
        let started = control(NodeMsg::Started { job: 1, key: ActorKey::trainer(0), spawn: 1 });
        assert_eq!(judge(0, &v, 2, &started), Verdict::Accept);
        assert!(rejects(&judge(1, &v, 2, &started)), "node 1 does not coordinate");
        let small = View { members: [0, 1, 2].into_iter().collect(), ..v.clone() };
        assert!(rejects(&judge(0, &small, 3, &started)), "node 3 is not in the view");
        let applied = |range| {
            deliver(Addr::Job, Msg::StepApplied { job: 1, range, generation: 1, step: 1, loss_sum: 0.0, samples: 1 })
        };
        assert_eq!(judge(0, &v, 1, &applied(0)), Verdict::Accept);
        assert!(waits(&judge(0, &v, 2, &applied(0))), "node 2 does not host aggregator 0");
        assert!(rejects(&judge(0, &v, 1, &applied(5))), "no range 5");
    }

    #[test]
    fn actor_messages_come_from_their_hosts_with_the_plans_shapes() {
        let v = view(3, 0);
        // Params of range 0 (10 values at 0) from node 1, which hosts aggregator 0.
        assert_eq!(judge(2, &v, 1, &deliver(Addr::Trainer(0), params(0, 0, 10))), Verdict::Accept);
        assert!(waits(&judge(2, &v, 3, &deliver(Addr::Trainer(0), params(0, 0, 10)))), "not the host");
        for (range, offset, len) in [(0, 5, 10), (0, 0, 11), (1, u64::MAX, 6), (2, 0, 10)] {
            let forged = deliver(Addr::Trainer(0), params(range, offset, len));
            assert!(rejects(&judge(2, &v, 1, &forged)), "range {range} offset {offset} len {len}");
        }
        // Partition 1 belongs to trainer 1, on node 3.
        assert_eq!(judge(1, &v, 3, &deliver(Addr::Aggregator(0), gradient(1, 0, 10))), Verdict::Accept);
        assert!(waits(&judge(1, &v, 2, &deliver(Addr::Aggregator(0), gradient(1, 0, 10)))));
        assert!(rejects(&judge(1, &v, 3, &deliver(Addr::Aggregator(0), gradient(1, 3, 10)))), "offset");
        assert!(rejects(&judge(1, &v, 3, &deliver(Addr::Aggregator(0), gradient(9, 0, 10)))), "partition");
        assert!(rejects(&judge(1, &v, 3, &deliver(Addr::Aggregator(0), Msg::Gradients(vec![])))));
        let mixed = Msg::Gradients(vec![
            match gradient(1, 0, 10) {
                Msg::Gradient(g) => g,
                _ => unreachable!(),
            },
            match gradient(0, 0, 10) {
                Msg::Gradient(g) => g,
                _ => unreachable!(),
            },
        ]);
        assert!(rejects(&judge(1, &v, 3, &deliver(Addr::Aggregator(0), mixed))), "partitions of two trainers");
    }

    #[test]
    fn a_pre_reduced_gradient_must_be_a_tree_node_of_its_senders_partitions() {
        let v = view(3, 0);
        let sum = |partition, partitions| {
            let g = Gradient { partitions, samples: 2, ..grad_of(1, partition, 0, 10) };
            deliver(Addr::Aggregator(0), Msg::Gradient(g))
        };
        // Round-robin (trainer 1 owns 1 and 3): no subtree is whole.
        let Verdict::Reject(reason) = judge(1, &v, 3, &sum(0, 2)) else { panic!("0..2 spans two trainers") };
        assert!(reason.contains("partitions 0..2: partitions of different trainers"), "{reason}");
        // Contiguous (trainer 0 owns 0..2, trainer 1 owns 2..4, on node 3).
        let contiguous = JobPlan { assignment: JobPlan::contiguous(4, 2), ..plan() };
        assert_eq!(judge_in(&contiguous, 1, &v, 3, &sum(2, 2)), Verdict::Accept);
        assert!(waits(&judge_in(&contiguous, 1, &v, 2, &sum(2, 2))), "trainer 1 is on node 3, not 2");
        let Verdict::Reject(reason) = judge_in(&contiguous, 1, &v, 3, &sum(1, 2)) else { panic!("1..3 is no node") };
        assert!(reason.contains("not a node of the reduction tree over 4 partitions"), "{reason}");
        assert!(rejects(&judge_in(&contiguous, 1, &v, 3, &sum(2, 0))), "an empty span");
        assert!(rejects(&judge_in(&contiguous, 1, &v, 3, &sum(2, u32::MAX))), "past the end");
    }

    #[test]
    fn checkpoint_copies_come_from_the_coordinator_or_the_fetched_member() {
        let v = view(3, 0);
        let copy = Inbound::Checkpoint(1, "ckpt-x.safetensors".into(), vec![1, 2, 3]);
        assert_eq!(judge(2, &v, 0, &copy), Verdict::Accept);
        assert!(rejects(&judge(2, &v, 3, &copy)));
        let (plan, routes) = (plan(), routes(&v));
        let scope = Scope {
            me: 0,
            members: 4,
            view: Some(&v),
            job: Some(JobScope { plan: &plan, routes: &routes, fetching_from: Some(3) }),
        };
        assert_eq!(scope.judge(3, &copy), Verdict::Accept);
        // The host of a range copies its own files, and only those.
        let file = |offset, len| phalanx_actors::checkpoint::FileKey { step: 4, offset, len }.file_name();
        let copy_of = |offset, len| Inbound::Checkpoint(1, file(offset, len), vec![1, 2, 3]);
        assert_eq!(judge(3, &v, 2, &copy_of(10, 6)), Verdict::Accept, "node 2 hosts aggregator 1");
        assert!(rejects(&judge(3, &v, 2, &copy_of(0, 10))), "aggregator 0 is on node 1");
        assert!(rejects(&judge(3, &v, 2, &copy_of(0, 16))), "no range is that");
    }

    #[test]
    fn a_location_map_naming_strangers_or_unknown_actors_is_refused() {
        let v = view(3, 0);
        let map = |key, node| {
            control(NodeMsg::Locations { job: 1, epoch: 3, job_started_ms: 0, map: [(key, node)].into(), seq: 2 })
        };
        assert_eq!(judge(2, &v, 0, &map(ActorKey::trainer(0), 1)), Verdict::Accept);
        assert!(rejects(&judge(2, &v, 0, &map(ActorKey::trainer(0), 9))));
        assert!(rejects(&judge(2, &v, 0, &map(ActorKey::aggregator(4), 1))));
    }

    #[test]
    fn the_lot_bounds_each_sender_and_ages_out() {
        let mut lot = Parked::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let msg = || control(NodeMsg::Cancel { job: 1 });
        for _ in 0..PER_PEER_FRAMES {
            assert!(lot.park(t0, 3, msg(), "wait".into()).is_empty());
        }
        lot.park(t0, 1, msg(), "wait".into());
        let pushed = lot.park(t0, 3, msg(), "wait".into());
        assert_eq!((pushed.len(), pushed[0].peer), (1, 3), "node 3 pushes out its own oldest, not node 1's");
        assert_eq!(lot.len(), PER_PEER_FRAMES + 1);
        let big = Inbound::Checkpoint(1, "x".into(), vec![0; PER_PEER_BYTES - 256]);
        let pushed = lot.park(t0, 1, big, "wait".into());
        assert_eq!(pushed.len(), 1, "the 32 MiB copy and node 1's other frame do not both fit");
        assert!(matches!(pushed[0].inbound, Inbound::Control(_)), "the older frame goes");
        assert!(lot.expired(t0 + Duration::from_millis(400)).is_empty());
        assert_eq!(lot.expired(t0 + Duration::from_millis(600)).len(), PER_PEER_FRAMES + 1);
        assert_eq!(lot.len(), 0);
    }

    mod arbitrary {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        fn num() -> impl Strategy<Value = u64> {
            prop_oneof![4 => 0..20u64, 1 => Just(u64::MAX), 1 => Just(u64::from(u32::MAX) + 1), 1 => any::<u64>()]
        }

        fn small() -> impl Strategy<Value = u32> {
            prop_oneof![4 => 0..6u32, 1 => Just(u32::MAX), 1 => any::<u32>()]
        }

        fn key() -> impl Strategy<Value = ActorKey> {
            (0..3u8, small()).prop_map(|(r, i)| match r {
                0 => ActorKey::shard(i),
                1 => ActorKey::trainer(i),
                _ => ActorKey::aggregator(i),
            })
        }

        fn grad() -> impl Strategy<Value = Gradient> {
            (num(), small(), num(), 0..20usize)
                .prop_map(|(generation, partition, offset, len)| super::grad_of(generation, partition, offset, len))
        }

        fn inbound() -> impl Strategy<Value = Inbound> {
            let to = prop_oneof![Just(Addr::Job), small().prop_map(Addr::Trainer), small().prop_map(Addr::Aggregator)];
            let msg = prop_oneof![
                (small(), num(), 0..20usize).prop_map(|(range, offset, len)| Msg::Params(Params {
                    job: 1,
                    generation: 1,
                    step: 0,
                    range,
                    offset,
                    values: vec![0.0; len].into(),
                    delta: None,
                    base: None,
                })),
                grad().prop_map(Msg::Gradient),
                vec(grad(), 0..4).prop_map(Msg::Gradients),
                (small(), small()).prop_map(|(partition, trainer)| Msg::BatchRequest {
                    job: 1,
                    partition,
                    step: 0,
                    count: 1,
                    trainer
                }),
                small().prop_map(|trainer| Msg::ParamsRequest { job: 1, trainer, step: None }),
                (small(), num()).prop_map(|(range, step)| Msg::StepApplied {
                    job: 1,
                    range,
                    generation: 1,
                    step,
                    loss_sum: 0.0,
                    samples: 1
                }),
                (small(), num(), 0..20usize).prop_map(|(range, offset, len)| Msg::Finished {
                    job: 1,
                    range,
                    generation: 1,
                    offset,
                    values: vec![0.0; len],
                    ledger: Default::default()
                }),
                num().prop_map(|generation| Msg::Rollback { job: 1, generation, step: 0 }),
            ];
            let control = prop_oneof![
                (key(), num()).prop_map(|(key, generation)| NodeMsg::Spawn {
                    job: 1,
                    key,
                    generation,
                    restore: None,
                    spawn: 1,
                    kernel: KernelFingerprint(1)
                }),
                (key(), small()).prop_map(|(key, node)| NodeMsg::Locations {
                    job: 1,
                    epoch: 3,
                    job_started_ms: 0,
                    map: [(key, node)].into(),
                    seq: 1
                }),
                key().prop_map(|key| NodeMsg::Started { job: 1, key, spawn: 1 }),
                Just(NodeMsg::JobDone { job: 1, summary: None, model_sha256: String::new() }),
                (num(), num()).prop_map(|(step, total_steps)| NodeMsg::Progress {
                    job: 1,
                    step,
                    total_steps,
                    loss: 0.5
                }),
            ];
            prop_oneof![
                (to, msg).prop_map(|(to, msg)| Inbound::Deliver(1, to, msg)),
                control.prop_map(Inbound::Control),
                vec(any::<u8>(), 0..8).prop_map(|b| Inbound::Checkpoint(1, "ckpt-x".into(), b)),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]
            /// Whatever a member sends, judging it never panics, and what is let
            /// through has the shapes of the plan.
            #[test]
            fn any_message_is_judged_without_panic(me in 0..4u32, peer in 0..6u32, coordinator in 0..4u32, inbound in inbound()) {
                let v = view(3, coordinator);
                let verdict = judge(me, &v, peer, &inbound);
                if verdict == Verdict::Accept && peer != me {
                    let plan = plan();
                    if let Inbound::Deliver(_, _, Msg::Params(p)) = &inbound {
                        let r = plan.ranges[p.range as usize];
                        prop_assert_eq!((p.offset, p.values.len()), (r.0 as u64, r.1));
                    }
                    if let Inbound::Deliver(_, _, Msg::Gradient(g)) = &inbound {
                        prop_assert!((g.partition as usize) < plan.assignment.len());
                    }
                    if let Inbound::Control(NodeMsg::Spawn { key, .. }) = &inbound {
                        prop_assert!(plan.contains(*key) && peer == coordinator);
                    }
                }
            }
        }
    }
}
