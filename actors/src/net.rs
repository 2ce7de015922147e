//! How actors reach each other: the [`Net`] trait and its in-process
//! implementation.
//!
//! The protocol cores address messages with [`Addr`]; a `Net` delivers
//! them. [`LocalNet`] finds actors of one job in ractor's registry by name;
//! the cluster runtime implements `Net` over QUIC for actors on other
//! nodes. Delivery is best-effort on purpose: a message to an actor that is
//! restarting is dropped, and the protocol recovers because every restarted
//! actor re-requests what it needs.

use ractor::ActorRef;

use crate::protocol::{ActorKey, Addr, Msg, Role};

/// Delivers protocol messages.
pub trait Net: Send + Sync + 'static {
    /// Send `msg` to `to`; best-effort (see the module docs).
    fn send(&self, to: Addr, msg: Msg);
}

/// The message type of the shard, trainer and aggregator actors: protocol
/// messages plus local timer ticks (which never cross the wire).
#[derive(Debug)]
pub enum ActorMsg {
    /// A protocol message.
    Net(Msg),
    /// A periodic tick (trainers use it to notice a stall).
    Tick,
}

/// The message type of the job supervisor actor.
#[derive(Debug)]
pub enum JobMsg {
    /// A protocol message from another actor.
    Net(Msg),
    /// A restart backoff elapsed.
    RestartDue(ActorKey),
    /// An actor asked of another node is running there: (actor, node, spawn request).
    RemoteStarted(ActorKey, u32, u64),
    /// An actor on another node failed, failed to start or was stopped there:
    /// (actor, node, spawn request, why).
    RemoteFailed(ActorKey, u32, u64, String),
    /// A spawn request (actor, node, request) got no answer in time.
    SpawnTimeout(ActorKey, u32, u64),
    /// A node was declared down: its actors are gone.
    NodeLost(u32),
    /// Membership grew: move actors back to where the placement wants them.
    Rebalance,
}

/// Delivers to actors of one job in this process, by registered name.
#[derive(Clone, Debug)]
pub struct LocalNet {
    prefix: String,
    trainers: u32,
}

impl LocalNet {
    /// A net for the job whose actors are named under `prefix`.
    pub fn new(prefix: impl Into<String>, trainers: u32) -> Self {
        Self { prefix: prefix.into(), trainers }
    }

    /// The registry name of an actor of this job.
    pub fn name_of(&self, key: ActorKey) -> String {
        format!("{}/{}-{}", self.prefix, key.role, key.index)
    }

    /// The registry name of the job supervisor.
    pub fn job_name(&self) -> String {
        format!("{}/job", self.prefix)
    }

    fn deliver(&self, key: ActorKey, msg: Msg) {
        let name = self.name_of(key);
        match ActorRef::<ActorMsg>::where_is(name) {
            Some(actor) => {
                if actor.send_message(ActorMsg::Net(msg)).is_err() {
                    tracing::debug!(to = %key, "actor stopping; message dropped");
                }
            }
            None => tracing::debug!(to = %key, kind = msg.kind(), "no such actor (restarting?); message dropped"),
        }
    }
}

/// Hand `msg` to `send` once per trainer `0..trainers`: a copy for each but the last, which
/// gets the message itself (a parameter range is the largest message of a step; one copy
/// fewer per step).
pub fn to_each_trainer(trainers: u32, msg: Msg, mut send: impl FnMut(u32, Msg)) {
    let Some(last) = trainers.checked_sub(1) else { return };
    for i in 0..last {
        send(i, msg.clone());
    }
    send(last, msg);
}

impl Net for LocalNet {
    fn send(&self, to: Addr, msg: Msg) {
        match to {
            Addr::Shard(p) => self.deliver(ActorKey { role: Role::Shard, index: p }, msg),
            Addr::Trainer(i) => self.deliver(ActorKey::trainer(i), msg),
            Addr::Aggregator(r) => self.deliver(ActorKey::aggregator(r), msg),
            Addr::AllTrainers => to_each_trainer(self.trainers, msg, |i, msg| self.deliver(ActorKey::trainer(i), msg)),
            Addr::Job => match ActorRef::<JobMsg>::where_is(self.job_name()) {
                Some(job) => {
                    let _ = job.send_message(JobMsg::Net(msg));
                }
                None => tracing::debug!(kind = msg.kind(), "job supervisor gone; message dropped"),
            },
        }
    }
}
