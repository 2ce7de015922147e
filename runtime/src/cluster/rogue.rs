//! Fault injection (the cargo feature `fault-injection`): a rogue member for the chaos
//! campaign. A default build has no such code; it refuses a node config with `rogue = true`.
//!
//! A rogue node is an honest `phalanx node` — it hosts actors, heartbeats and trains — that
//! holds a valid node certificate and, each time it gets SIGUSR1, sends one **round** of
//! forged messages to every other member of its adopted view, for the jobs it knows are
//! running: orders only the coordinator may give, a view it may not issue, values out of
//! range, and last a frame that breaks the codec. Members must drop and count every one of
//! them (`message_rejected`), keep training and end with the fault-free bits.
//!
//! ```text
//!  SIGUSR1 ─▶ node loop ─▶ Trigger::round ─(view, running jobs)─▶ forge_round ─▶ per member:
//!     job-done · spawn · rollback · view · checkpoint-copy · params · gradient   (send_raw, `forged` events)
//!     ── wait until the member acknowledged them all ──
//!     oversized-frame                                                        (the member closes the connection)
//! ```
//!
//! The oversized frame goes last, and only once the member's QUIC stack has acknowledged
//! every other frame of the round: the connection it closes then cannot take a forged frame
//! with it, so every `forged` event has a frame the member saw. A round is bounded: one
//! message of each kind per member and job, for at most [`MAX_FORGED_JOBS`] jobs.

use std::collections::BTreeMap;

use phalanx_actors::checkpoint::FileKey;
use phalanx_actors::protocol::{ActorKey, Addr, Gradient, Msg, Params};
use phalanx_transport::{Limits, OutFrame, RawSend, Transport};
use tokio::sync::oneshot;

use super::event::{Emitter, NodeEventKind};
use super::jobs::{Jobs, NodeCommand};
use super::membership::{MembershipMsg, View, MAX_EPOCH};
use super::node_config::NodeConfig;
use super::registry::{JobId, JobState};
use super::rejections::OVERSIZED_FRAME;
use super::wire::{self, NodeMsg};
use crate::config::JobConfig;
use crate::error::Error;

/// How far ahead of the adopted view's epoch the forged view and generations claim to be.
pub const FAR_AHEAD: u64 = 1_000_000;

/// Most jobs a round forges messages for.
pub const MAX_FORGED_JOBS: usize = 4;

/// Bytes of garbage in a forged checkpoint copy.
const GARBAGE_BYTES: usize = 256;

/// Values in a forged parameter or gradient range.
const FORGED_VALUES: usize = 4;

/// A running job the rogue forges messages for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownJob {
    /// Its id in the cluster's registry (what node messages carry).
    pub id: JobId,
    /// The job id its actors' messages carry ([`PreparedJob::cluster_job_id`](crate::PreparedJob::cluster_job_id));
    /// none if this node could not prepare the job (then no protocol message is forged).
    pub actors_job: Option<u64>,
}

/// One forged frame of a round.
#[derive(Clone, Debug)]
pub struct ForgedFrame {
    /// The member it goes to.
    pub to: u32,
    /// Its kind as the receiver names it ([`NodeMsg::kind`], or [`OVERSIZED_FRAME`]).
    pub kind: &'static str,
    /// The whole frame, length prefix included.
    pub bytes: Vec<u8>,
}

/// The forged frames of one round of node `me`, whose adopted view is `view`, for `jobs`:
/// for every other member of the view, in this order, per job (at most [`MAX_FORGED_JOBS`])
/// a `job-done`, a `spawn` of trainer 0 with a generation far ahead, a `rollback` of
/// aggregator 0 to step 0 with a generation far ahead, then one `view` naming `me` the
/// coordinator with an epoch [`FAR_AHEAD`] above `view`'s, per job a `checkpoint-copy` of a
/// plausible file name holding garbage, a `params` for trainer 0 and a `gradient` for
/// aggregator 0 with out-of-range offsets (and partition), and last one frame whose length
/// prefix is above `limits.max_frame_bytes`.
pub fn forge_round(me: u32, view: &View, jobs: &[KnownJob], limits: &Limits) -> Vec<ForgedFrame> {
    let jobs = &jobs[..jobs.len().min(MAX_FORGED_JOBS)];
    let epoch = view.epoch.saturating_add(FAR_AHEAD).min(MAX_EPOCH);
    // Generations carry their view's epoch in the high 32 bits (see `node_job`).
    let generation = epoch << 32;
    let mut members = view.members.clone();
    members.insert(me);
    let mut round = Vec::new();
    for to in view.members.iter().copied().filter(|m| *m != me) {
        let mut push = |kind: &'static str, bytes: Result<Vec<u8>, phalanx_transport::EncodeError>| match bytes {
            Ok(bytes) => round.push(ForgedFrame { to, kind, bytes }),
            Err(e) => tracing::warn!(node = me, to, kind, "cannot encode a forged {kind}: {e}"),
        };
        for job in jobs {
            let done = NodeMsg::JobDone { job: job.id, summary: None, model_sha256: "0".repeat(64) };
            push(done.kind(), wire::encode(&done, limits));
            let kernel = phalanx_actors::model::kernel::fingerprint();
            let spawn =
                NodeMsg::Spawn { job: job.id, key: ActorKey::trainer(0), generation, restore: None, spawn: 0, kernel };
            push(spawn.kind(), wire::encode(&spawn, limits));
            if let Some(actors) = job.actors_job {
                let rollback = Msg::Rollback { job: actors, generation, step: 0 };
                push(
                    rollback.kind(),
                    wire::encode_deliver(job.id, Addr::Aggregator(0), rollback, limits).map(OutFrame::into_vec),
                );
            }
        }
        let forged_view =
            NodeMsg::Membership(MembershipMsg::View(View { epoch, coordinator: me, members: members.clone() }));
        push(forged_view.kind(), wire::encode(&forged_view, limits));
        for job in jobs {
            // A name the coordinator's copies could have; the bytes are no checkpoint.
            let name = FileKey { step: FAR_AHEAD, offset: 0, len: FORGED_VALUES }.file_name();
            let garbage: Vec<u8> = (0..GARBAGE_BYTES).map(|i| (i as u8).wrapping_mul(151)).collect();
            push(
                NodeMsg::CheckpointCopy { job: job.id, name: name.clone(), len: 0 }.kind(),
                wire::encode_checkpoint(job.id, &name, garbage, limits).map(OutFrame::into_vec),
            );
            let Some(actors) = job.actors_job else { continue };
            let values = vec![0.5; FORGED_VALUES];
            // Offsets whose end does not fit in a u64: any range check that adds overflows.
            let offset = u64::MAX - 1;
            let params = Msg::Params(Params {
                job: actors,
                generation,
                step: 0,
                range: 0,
                offset,
                values: values.clone().into(),
                delta: None,
                base: None,
            });
            push(params.kind(), wire::encode_deliver(job.id, Addr::Trainer(0), params, limits).map(OutFrame::into_vec));
            let gradient = Msg::Gradient(Gradient {
                job: actors,
                generation,
                step: 0,
                partition: u32::MAX,
                partitions: 1,
                samples: 1,
                loss_sum: 0.0,
                offset,
                values: values.into(),
            });
            push(
                gradient.kind(),
                wire::encode_deliver(job.id, Addr::Aggregator(0), gradient, limits).map(OutFrame::into_vec),
            );
        }
        // A length prefix one above the limit, and a little of a body that never comes.
        let oversized = [&limits.max_frame_bytes.saturating_add(1).to_le_bytes()[..], &[0u8; 16]].concat();
        push(OVERSIZED_FRAME, Ok(oversized));
    }
    round
}

/// A rogue node's trigger: SIGUSR1 starts a round. Created for every node of a
/// fault-injection build; only a node configured with `rogue = true` listens for the signal.
pub(crate) struct Trigger {
    me: u32,
    emitter: Emitter,
    limits: Limits,
    #[cfg(unix)]
    signals: Option<tokio::signal::unix::Signal>,
    /// The transport forged bytes go out on (a rogue needs the QUIC one: `send_raw`).
    transport: Option<Transport>,
    rounds: u64,
}

impl Trigger {
    /// The trigger of node `config.id` on `transport`: listening for SIGUSR1 if `config.rogue`.
    pub(crate) fn new(config: &NodeConfig, emitter: &Emitter, transport: &Transport) -> Result<Self, Error> {
        let me = config.id;
        #[cfg(unix)]
        let signals = match config.rogue {
            true => {
                use tokio::signal::unix::{signal, SignalKind};
                let s = signal(SignalKind::user_defined1()).map_err(|e| Error::Field {
                    field: "rogue".into(),
                    reason: format!("node {me}: cannot listen for SIGUSR1: {e}"),
                })?;
                tracing::warn!(
                    node = me,
                    "a rogue member (fault injection): every SIGUSR1 sends every member forged messages"
                );
                Some(s)
            }
            false => None,
        };
        #[cfg(not(unix))]
        if config.rogue {
            return Err(Error::Field { field: "rogue".into(), reason: format!("node {me}: needs SIGUSR1 (unix)") });
        }
        Ok(Self {
            me,
            emitter: emitter.clone(),
            limits: Limits::default(),
            #[cfg(unix)]
            signals,
            transport: Some(transport.clone()),
            rounds: 0,
        })
    }

    /// The trigger of a node on another transport than QUIC (the simulation tier's): never
    /// signalled; a config asking for a rogue is refused.
    pub(crate) fn none(config: &NodeConfig) -> Result<Self, Error> {
        if config.rogue {
            return Err(Error::Field {
                field: "rogue".into(),
                reason: format!("node {}: a rogue member forges on the QUIC transport only", config.id),
            });
        }
        Ok(Self {
            me: config.id,
            emitter: Emitter { node: config.id, sink: std::sync::Arc::new(|_| {}) },
            limits: Limits::default(),
            #[cfg(unix)]
            signals: None,
            transport: None,
            rounds: 0,
        })
    }

    /// Resolves at the next SIGUSR1 of a rogue node; never for an honest one.
    pub(crate) async fn signalled(&mut self) {
        #[cfg(unix)]
        if let Some(signals) = self.signals.as_mut() {
            if signals.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }

    /// Forges one round to every other member of `view` for the jobs `jobs` says are running,
    /// and sends it in the background (the node loop goes on at once).
    pub(crate) fn round(&mut self, view: Option<&View>, jobs: &mut Jobs) {
        let Some(transport) = self.transport.clone() else { return };
        self.rounds += 1;
        let (me, round) = (self.me, self.rounds);
        let Some(view) = view.cloned() else {
            return tracing::warn!(node = me, round, "rogue round {round}: no adopted view, nobody to forge for");
        };
        // `Jobs` answers this command before it returns.
        let (reply, mut answer) = oneshot::channel();
        jobs.on_command(NodeCommand::Jobs { reply });
        let running: Vec<(JobId, JobConfig)> = answer
            .try_recv()
            .into_iter()
            .flatten()
            .filter(|entry| entry.state == JobState::Running)
            .take(MAX_FORGED_JOBS)
            .map(|entry| (entry.id, entry.spec))
            .collect();
        let (emitter, limits) = (self.emitter.clone(), self.limits);
        tokio::spawn(async move {
            let jobs = known_jobs(running).await;
            let frames = forge_round(me, &view, &jobs, &limits);
            tracing::warn!(
                node = me,
                round,
                frames = frames.len(),
                epoch = view.epoch,
                ?jobs,
                "rogue round {round}: forging for every member of view {:?}",
                view.members
            );
            let mut by_member: BTreeMap<u32, Vec<ForgedFrame>> = BTreeMap::new();
            for f in frames {
                by_member.entry(f.to).or_default().push(f);
            }
            let mut sends = tokio::task::JoinSet::new();
            for (to, frames) in by_member {
                sends.spawn(send_to(transport.clone(), emitter.clone(), to, frames));
            }
            while sends.join_next().await.is_some() {}
        });
    }
}

/// The jobs with their actors' job id, prepared off the async workers (loading the data
/// of a job takes a while); a job that does not prepare here gets no protocol messages.
async fn known_jobs(running: Vec<(JobId, JobConfig)>) -> Vec<KnownJob> {
    let mut jobs = Vec::with_capacity(running.len());
    for (id, spec) in running {
        let prepared = tokio::task::spawn_blocking(move || crate::PreparedJob::new(spec)).await;
        let actors_job = match prepared {
            Ok(Ok(p)) => Some(p.cluster_job_id()),
            Ok(Err(e)) => {
                tracing::warn!(job = id, "rogue: cannot prepare job {id} to forge its protocol messages: {e}");
                None
            }
            Err(e) => {
                tracing::warn!(job = id, "rogue: preparing job {id} failed: {e}");
                None
            }
        };
        jobs.push(KnownJob { id, actors_job });
    }
    jobs
}

/// Hands `frames` (one member's share of a round) to the transport, each with its `forged`
/// event; the oversized frame only once the member acknowledged all the others.
async fn send_to(transport: Transport, emitter: Emitter, to: u32, frames: Vec<ForgedFrame>) {
    let (last, first): (Vec<ForgedFrame>, Vec<ForgedFrame>) =
        frames.into_iter().partition(|f| f.kind == OVERSIZED_FRAME);
    let mut acks: Vec<(&'static str, RawSend)> = Vec::with_capacity(first.len());
    for f in first.into_iter().chain(last) {
        if f.kind == OVERSIZED_FRAME {
            for (kind, ack) in acks.drain(..) {
                if let Err(e) = ack.acknowledged().await {
                    tracing::warn!(to, kind, "rogue: a forged {kind} to node {to} may not have arrived: {e}");
                }
            }
        }
        match transport.send_raw(to, f.bytes) {
            Ok(ack) => {
                emitter.emit(NodeEventKind::Forged { to, kind: f.kind.to_string() });
                acks.push((f.kind, ack));
            }
            Err(e) => tracing::warn!(to, kind = f.kind, "rogue: a forged {} for node {to} was not sent: {e}", f.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::Inbound;

    fn view(epoch: u64, members: &[u32]) -> View {
        View { epoch, coordinator: members[0], members: members.iter().copied().collect() }
    }

    fn kinds_to(round: &[ForgedFrame], to: u32) -> Vec<&'static str> {
        round.iter().filter(|f| f.to == to).map(|f| f.kind).collect()
    }

    #[test]
    fn a_round_sends_every_other_member_one_of_each_kind_and_the_oversized_frame_last() {
        let limits = Limits::default();
        let job = KnownJob { id: 1, actors_job: Some(0xabcd) };
        let round = forge_round(3, &view(7, &[0, 1, 2, 3]), &[job], &limits);
        let want = ["job-done", "spawn", "rollback", "view", "checkpoint-copy", "params", "gradient", OVERSIZED_FRAME];
        for to in [0, 1, 2] {
            assert_eq!(kinds_to(&round, to), want, "to node {to}");
        }
        assert!(kinds_to(&round, 3).is_empty(), "never to itself");
        assert_eq!(round.len(), 3 * want.len());

        // Each frame is what its kind says, as the receiver decodes it (or refuses it).
        for f in round.iter().filter(|f| f.to == 0) {
            if f.kind == OVERSIZED_FRAME {
                let prefix = u32::from_le_bytes(f.bytes[..4].try_into().unwrap());
                assert!(prefix > limits.max_frame_bytes, "{prefix}");
                continue;
            }
            let inbound = wire::decode(&f.bytes[4..], &limits).unwrap_or_else(|e| panic!("{}: {e}", f.kind));
            assert_eq!(inbound.kind(), f.kind);
            match inbound {
                Inbound::Control(NodeMsg::Membership(MembershipMsg::View(v))) => {
                    assert_eq!((v.epoch, v.coordinator), (7 + FAR_AHEAD, 3));
                    assert!(v.members.contains(&3));
                }
                Inbound::Control(NodeMsg::Spawn { generation, .. }) => assert!(generation >= FAR_AHEAD << 32),
                Inbound::Control(NodeMsg::JobDone { job, .. }) => assert_eq!(job, 1),
                Inbound::Deliver(1, Addr::Aggregator(0), Msg::Rollback { job, generation, step }) => {
                    assert_eq!((job, step), (0xabcd, 0));
                    assert!(generation >= FAR_AHEAD << 32);
                }
                Inbound::Deliver(1, Addr::Trainer(0), Msg::Params(p)) => {
                    assert_eq!(p.job, 0xabcd);
                    assert!(p.offset.checked_add(p.values.len() as u64).is_none(), "offset out of any range");
                }
                Inbound::Deliver(1, Addr::Aggregator(0), Msg::Gradient(g)) => {
                    assert_eq!((g.job, g.partition), (0xabcd, u32::MAX));
                    assert!(g.offset.checked_add(g.values.len() as u64).is_none());
                }
                Inbound::Checkpoint(1, name, bytes) => {
                    assert!(FileKey::parse(&name).is_some(), "a plausible name: {name}");
                    assert_eq!(bytes.len(), GARBAGE_BYTES);
                }
                other => panic!("unexpected {} frame", other.kind()),
            }
        }
    }

    #[test]
    fn a_round_is_bounded_whatever_the_jobs_and_epochs() {
        let limits = Limits::default();
        let jobs: Vec<KnownJob> = (1..=50).map(|id| KnownJob { id, actors_job: Some(id) }).collect();
        let round = forge_round(4, &view(MAX_EPOCH, &[0, 1, 2, 3, 4]), &jobs, &limits);
        // Per member: 6 job-scoped kinds per job (capped), one view, one oversized frame.
        assert_eq!(round.len(), 4 * (6 * MAX_FORGED_JOBS + 2));
        for f in round.iter().filter(|f| f.kind == "view") {
            let Inbound::Control(NodeMsg::Membership(MembershipMsg::View(v))) =
                wire::decode(&f.bytes[4..], &limits).unwrap()
            else {
                panic!()
            };
            assert_eq!(v.epoch, MAX_EPOCH, "saturates at the highest epoch a node accepts");
        }
        // A job that could not be prepared gets only the control messages.
        let round = forge_round(1, &view(2, &[0, 1]), &[KnownJob { id: 9, actors_job: None }], &limits);
        assert_eq!(kinds_to(&round, 0), ["job-done", "spawn", "view", "checkpoint-copy", OVERSIZED_FRAME]);
        // Nobody else in the view: nothing to send.
        assert!(forge_round(1, &view(2, &[1]), &jobs, &limits).is_empty());
    }
}
