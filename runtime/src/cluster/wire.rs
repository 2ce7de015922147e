//! What nodes send each other, and how a message's tensors travel as raw
//! little-endian f32 after the frame header rather than inside it.

use phalanx_actors::model::kernel::KernelFingerprint;
use phalanx_actors::protocol::{delta, ActorKey, Addr, Msg, SharedValues};
use phalanx_transport::{
    DecodeError, EncodeError, Frame, LeTensor, Limits, OutFrame, ReceiveBudget, RecvFrame, TensorBytes,
};
use serde::{Deserialize, Serialize};

use super::membership::MembershipMsg;
use super::registry::{JobId, Snapshot, Version};
use super::resume::Inventory;
use crate::config::JobConfig;

/// A frame's header between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// Membership: heartbeats and views.
    Membership(MembershipMsg),
    /// A protocol message for an actor hosted by the receiving node. The
    /// tensors of `Params`/`Gradient(s)` are moved to the frame's tensor
    /// payload; `lens` says how to cut it back.
    Deliver {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The addressee.
        to: Addr,
        /// The message, its tensor values emptied.
        msg: Msg,
        /// Lengths of the tensors moved to the payload, in order.
        lens: Vec<u32>,
    },
    /// Coordinator → host: spawn this actor here.
    Spawn {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The actor.
        key: ActorKey,
        /// The generation it starts in.
        generation: u64,
        /// Aggregators: the checkpoint to restore.
        restore: Option<u64>,
        /// The coordinator's id of this request (echoed in the answers).
        spawn: u64,
        /// The kernel the job computes with (the coordinator's): a host whose maths
        /// gives other bits refuses ([`phalanx_actors::model::kernel`]).
        kernel: KernelFingerprint,
    },
    /// Coordinator → host: stop this actor, it moves elsewhere.
    Stop {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The actor.
        key: ActorKey,
    },
    /// Host → coordinator: the actor is running.
    Started {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The actor.
        key: ActorKey,
        /// The spawn request.
        spawn: u64,
    },
    /// Host → coordinator: the actor failed (or failed to start).
    Failed {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The actor.
        key: ActorKey,
        /// The spawn request.
        spawn: u64,
        /// Why.
        reason: String,
    },
    /// Coordinator → replica: a checkpoint file (its bytes are the payload,
    /// packed four to an f32, `len` of them meaningful).
    CheckpointCopy {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The file name.
        name: String,
        /// Number of bytes.
        len: u64,
    },
    /// Coordinator → all: where every spawned actor runs.
    Locations {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The epoch the sender coordinates in.
        epoch: u64,
        /// When the job first started (Unix ms), so that a successor reports
        /// the whole job's duration, not only its own share.
        job_started_ms: u64,
        /// Actor → node.
        map: std::collections::BTreeMap<ActorKey, u32>,
        /// The map's number in the sender's term: frames travel on separate streams, so an
        /// older map may arrive after a newer one, and must not replace it.
        seq: u64,
    },
    /// Coordinator → all: the job finished; `summary` is where its summary was written.
    JobDone {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// Path of summary.json, if one was written.
        summary: Option<String>,
        /// SHA-256 of the final parameters.
        model_sha256: String,
    },
    /// Coordinator → all: the job failed for good.
    JobFailed {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// Why.
        error: String,
    },
    /// New coordinator → member: what do you hold of the job? (see
    /// [`resume`](super::resume)).
    CheckpointQuery {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The view the question belongs to.
        epoch: u64,
    },
    /// Member → coordinator: the answer to a [`NodeMsg::CheckpointQuery`].
    CheckpointInventory {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The view of the question.
        epoch: u64,
        /// What the member holds.
        inventory: Inventory,
    },
    /// New coordinator → member: send me the files of checkpoint `step`
    /// (they come back as [`NodeMsg::CheckpointCopy`] frames).
    CheckpointFetch {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The view of the request.
        epoch: u64,
        /// The checkpoint step.
        step: u64,
    },
    /// Replica → coordinator: the copy `name` is stored and verified.
    CheckpointStored {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The file name.
        name: String,
    },
    /// A node's own record (never sent to a peer): checkpoint copy `name`
    /// went to the replicas `to`.
    Replicating {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// The file name.
        name: String,
        /// The replicas it was sent to.
        to: Vec<u32>,
    },
    /// Coordinator → members: the job registry (see [`super::registry`]).
    Registry(Box<Snapshot>),
    /// Member → coordinator: it holds the registry of this version.
    RegistryAck {
        /// The version held.
        version: Version,
    },
    /// Member → coordinator: a job submitted at the member (already validated there).
    Submit {
        /// The member's id of the request (echoed in the answer).
        request: u64,
        /// The job.
        spec: Box<JobConfig>,
    },
    /// Coordinator → member: the answer to a [`NodeMsg::Submit`] (the job's id
    /// once a majority holds it, or why not).
    SubmitAnswer {
        /// The request.
        request: u64,
        /// The job's id, or why it was refused.
        result: Result<JobId, String>,
    },
    /// Member → coordinator: cancel a job.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Coordinator → members: the job's progress, sent with each `step` event the
    /// coordinator reports (so at a bounded rate), so that a job watched on any node
    /// shows its progress (a `progress` event there).
    Progress {
        /// The job (its id in the cluster's registry).
        job: JobId,
        /// Steps applied.
        step: u64,
        /// Steps of the whole job.
        total_steps: u64,
        /// Mean loss of the last step.
        loss: f64,
    },
}

impl NodeMsg {
    /// The job a job-scoped message belongs to.
    pub fn job(&self) -> Option<JobId> {
        match self {
            NodeMsg::Deliver { job, .. }
            | NodeMsg::Spawn { job, .. }
            | NodeMsg::Stop { job, .. }
            | NodeMsg::Started { job, .. }
            | NodeMsg::Failed { job, .. }
            | NodeMsg::CheckpointCopy { job, .. }
            | NodeMsg::Locations { job, .. }
            | NodeMsg::JobDone { job, .. }
            | NodeMsg::JobFailed { job, .. }
            | NodeMsg::CheckpointQuery { job, .. }
            | NodeMsg::CheckpointInventory { job, .. }
            | NodeMsg::CheckpointFetch { job, .. }
            | NodeMsg::CheckpointStored { job, .. }
            | NodeMsg::Replicating { job, .. }
            | NodeMsg::Progress { job, .. } => Some(*job),
            NodeMsg::Membership(_)
            | NodeMsg::Registry(_)
            | NodeMsg::RegistryAck { .. }
            | NodeMsg::Submit { .. }
            | NodeMsg::SubmitAnswer { .. }
            | NodeMsg::Cancel { .. } => None,
        }
    }

    /// A short kebab-case name of the message kind for logs and counters (a `Deliver` is
    /// named by the protocol message it carries, as [`Msg::kind`] names it).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeMsg::Membership(MembershipMsg::Heartbeat { .. }) => "heartbeat",
            NodeMsg::Membership(MembershipMsg::View(_)) => "view",
            NodeMsg::Deliver { msg, .. } => msg.kind(),
            NodeMsg::Spawn { .. } => "spawn",
            NodeMsg::Stop { .. } => "stop",
            NodeMsg::Started { .. } => "started",
            NodeMsg::Failed { .. } => "failed",
            NodeMsg::CheckpointCopy { .. } => "checkpoint-copy",
            NodeMsg::Locations { .. } => "locations",
            NodeMsg::JobDone { .. } => "job-done",
            NodeMsg::JobFailed { .. } => "job-failed",
            NodeMsg::CheckpointQuery { .. } => "checkpoint-query",
            NodeMsg::CheckpointInventory { .. } => "checkpoint-inventory",
            NodeMsg::CheckpointFetch { .. } => "checkpoint-fetch",
            NodeMsg::CheckpointStored { .. } => "checkpoint-stored",
            NodeMsg::Replicating { .. } => "replicating",
            NodeMsg::Registry(_) => "registry",
            NodeMsg::RegistryAck { .. } => "registry-ack",
            NodeMsg::Submit { .. } => "submit",
            NodeMsg::SubmitAnswer { .. } => "submit-answer",
            NodeMsg::Cancel { .. } => "cancel",
            NodeMsg::Progress { .. } => "progress",
        }
    }
}

/// Move the tensors out of `msg`: the lengths for the header and the buffers that follow it
/// on the wire, each handed to the transport as it is (a version of the parameters shared by
/// every trainer's message, a trainer's gradients without being joined into one buffer).
fn take_tensors(msg: &mut Msg) -> (Vec<u32>, Vec<TensorBytes>) {
    fn one(values: Vec<f32>) -> (Vec<u32>, Vec<TensorBytes>) {
        (vec![values.len() as u32], vec![TensorBytes::owned(values)])
    }
    match msg {
        Msg::Params(p) => {
            // A new version for a node whose trainers hold the one before: its XOR with that
            // one, coded once for every node it goes to (see `phalanx_actors::protocol::delta`).
            if let Some((delta, code)) = p.wire_delta() {
                p.values = SharedValues::default();
                p.base = None;
                p.delta = Some(Box::new(delta));
                return (vec![(code.len() / 4) as u32], vec![code]);
            }
            p.base = None;
            let (buf, range) = std::mem::take(&mut p.values).into_parts();
            (vec![range.len() as u32], vec![TensorBytes::shared_range(buf, range)])
        }
        Msg::Gradient(g) => {
            let (buf, range) = std::mem::take(&mut g.values).into_parts();
            (vec![range.len() as u32], vec![TensorBytes::shared_range(buf, range)])
        }
        Msg::Gradients(gs) => gs
            .iter_mut()
            .map(|g| {
                let (buf, range) = std::mem::take(&mut g.values).into_parts();
                (range.len() as u32, TensorBytes::shared_range(buf, range))
            })
            .unzip(),
        // A hosted range's final values (aggregators spread over the nodes): a range of θ, far
        // over the header's limit.
        Msg::Finished { values, .. } => one(std::mem::take(values)),
        _ => (Vec::new(), Vec::new()),
    }
}

/// Put the tensors back; `None` when the lengths do not add up (a bad frame). Parameters and
/// gradients keep the tensor as it came off the wire (their receivers read it where they need
/// it); several gradients in one frame share its chunks.
fn put_tensors(msg: &mut Msg, lens: &[u32], tensor: LeTensor) -> Option<()> {
    let total: u64 = lens.iter().map(|l| u64::from(*l)).sum();
    if total != tensor.len() as u64 {
        return None;
    }
    match msg {
        Msg::Params(p) if lens.len() == 1 => match &mut p.delta {
            // The code, padded to whole words, and no longer than the values could need.
            Some(d) => {
                let bytes = usize::try_from(d.bytes).ok()?;
                let len = usize::try_from(d.len).ok()?;
                if bytes.checked_next_multiple_of(4)? != tensor.byte_len() || bytes > delta::max_coded_bytes(len) {
                    return None;
                }
                d.code = tensor;
            }
            None => p.values = SharedValues::from_le(tensor),
        },
        Msg::Gradient(g) if lens.len() == 1 => g.values = SharedValues::from_le(tensor),
        Msg::Finished { values, .. } if lens.len() == 1 => *values = tensor.to_vec(),
        Msg::Gradients(gs) if lens.len() == gs.len() => {
            let mut at = 0;
            for (g, len) in gs.iter_mut().zip(lens) {
                let len = *len as usize;
                g.values = SharedValues::from_le(tensor.slice(at..at + len));
                at += len;
            }
        }
        _ if lens.is_empty() => {}
        _ => return None,
    }
    Some(())
}

/// Encode a protocol message of `job` for `to` as one frame.
pub fn encode_deliver(job: JobId, to: Addr, mut msg: Msg, limits: &Limits) -> Result<OutFrame, EncodeError> {
    let (lens, tensor) = take_tensors(&mut msg);
    phalanx_transport::encode_parts(&NodeMsg::Deliver { job, to, msg, lens }, tensor, limits)
}

/// Encode a copy of a checkpoint file of `job`, taking `bytes` over without a copy (the frame
/// can go to several nodes: its clones share them).
pub fn encode_checkpoint(job: JobId, name: &str, mut bytes: Vec<u8>, limits: &Limits) -> Result<OutFrame, EncodeError> {
    let len = bytes.len() as u64;
    // A frame's tensor is whole f32 words. Checkpoint files are (8-byte header length, header
    // padded to 8 bytes, f32 tensors); one of another length is damaged, and is sent padded
    // with zeros, which the receiver cuts off (`len`) before verifying it.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let tensor = TensorBytes::le_words(bytes).expect("padded to whole words");
    phalanx_transport::encode_parts(&NodeMsg::CheckpointCopy { job, name: name.to_string(), len }, vec![tensor], limits)
}

/// Encode a message without tensors.
pub fn encode(msg: &NodeMsg, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    phalanx_transport::encode(msg, &[], limits)
}

/// A decoded frame from a peer.
#[derive(Debug)]
pub enum Inbound {
    /// A control message.
    Control(NodeMsg),
    /// A protocol message of a job for a local actor.
    Deliver(JobId, Addr, Msg),
    /// A checkpoint file of a job.
    Checkpoint(JobId, String, Vec<u8>),
}

impl Inbound {
    /// The message kind, as [`NodeMsg::kind`] names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Inbound::Control(msg) => msg.kind(),
            Inbound::Deliver(_, _, msg) => msg.kind(),
            Inbound::Checkpoint(..) => "checkpoint-copy",
        }
    }
}

/// Why a peer's frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// The frame did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The tensor payload does not match the header.
    #[error("tensor payload of {got} values does not match the header")]
    TensorMismatch {
        /// Values in the payload.
        got: usize,
    },
}

/// Application close code for a frame whose tensor does not fit its header.
pub const TENSOR_MISMATCH_CODE: u32 = 0x301;

/// Decode a frame body from a peer.
pub fn decode(frame: &[u8], limits: &Limits) -> Result<Inbound, InboundError> {
    let Frame { header, tensor } = phalanx_transport::decode::<NodeMsg>(frame, limits)?;
    inbound(header, LeTensor::from_values(tensor))
}

/// [`decode`] for a frame as the transport delivers it, up to what is cheap: the header decoded
/// and the tensor, in the chunks QUIC delivered, taken over without a copy — all a message
/// needs (parameters and gradients keep the values the transport read). A checkpoint copy,
/// whose payload is turned back into bytes (hundreds of MiB), is left to [`Decoded::finish`],
/// for the caller to run where a long copy holds nothing up. The frame's share of the receive
/// budget comes back beside the result.
pub fn decode_received_head(frame: RecvFrame, limits: &Limits) -> (Result<Decoded, InboundError>, ReceiveBudget) {
    let (decoded, budget) = frame.decode_le::<NodeMsg>(limits);
    let decoded = decoded.map_err(InboundError::from).and_then(|(header, tensor)| match header {
        header @ NodeMsg::CheckpointCopy { .. } => Ok(Decoded::Copy(header, tensor)),
        header => inbound(header, tensor).map(Decoded::Ready),
    });
    (decoded, budget)
}

/// A frame from a peer with its header decoded (see [`decode_received_head`]).
#[derive(Debug)]
pub enum Decoded {
    /// The message, ready.
    Ready(Inbound),
    /// A checkpoint copy whose payload is still in the transport's chunks.
    Copy(NodeMsg, LeTensor),
}

impl Decoded {
    /// The message (a checkpoint copy's payload joined into its bytes).
    pub fn finish(self) -> Result<Inbound, InboundError> {
        match self {
            Decoded::Ready(inbound) => Ok(inbound),
            Decoded::Copy(header, tensor) => inbound(header, tensor),
        }
    }
}

fn inbound(header: NodeMsg, tensor: LeTensor) -> Result<Inbound, InboundError> {
    match header {
        NodeMsg::Deliver { job, to, mut msg, lens } => {
            let got = tensor.len();
            put_tensors(&mut msg, &lens, tensor).ok_or(InboundError::TensorMismatch { got })?;
            Ok(Inbound::Deliver(job, to, msg))
        }
        NodeMsg::CheckpointCopy { job, name, len } => {
            let mut bytes: Vec<u8> = Vec::with_capacity(tensor.byte_len());
            for chunk in tensor.chunks() {
                bytes.extend_from_slice(chunk);
            }
            if len > bytes.len() as u64 || bytes.len() as u64 - len >= 4 {
                return Err(InboundError::TensorMismatch { got: tensor.len() });
            }
            bytes.truncate(len as usize);
            Ok(Inbound::Checkpoint(job, name, bytes))
        }
        // A control message is its header alone (at most `max_header_bytes`, 64 KiB by
        // default): a tensor payload after it is a bad frame, not memory to hold.
        _ if !tensor.is_empty() => Err(InboundError::TensorMismatch { got: tensor.len() }),
        other => Ok(Inbound::Control(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_actors::protocol::{Gradient, Params, SharedValues};

    fn grad(p: u32, values: Vec<f32>) -> Gradient {
        Gradient {
            job: 1,
            generation: 2,
            step: 3,
            partition: p,
            partitions: 1,
            samples: 4,
            loss_sum: 0.5,
            offset: 0,
            values: values.into(),
        }
    }

    #[test]
    fn tensors_travel_as_payload_and_come_back_bit_exact() {
        let limits = Limits::default();
        let msgs = vec![
            Msg::Params(Params {
                job: 1,
                generation: 0,
                step: 9,
                range: 0,
                offset: 0,
                values: vec![1.5, f32::NAN, -0.0].into(),
                delta: None,
                base: None,
            }),
            Msg::Gradients(vec![grad(0, vec![1.0, 2.0]), grad(1, vec![]), grad(2, vec![f32::MIN_POSITIVE / 2.0])]),
            Msg::Gradients(vec![grad(0, vec![]), grad(1, vec![3.0, -0.0])]),
            // A trainer's one partial sum: it keeps the payload's buffer.
            Msg::Gradients(vec![grad(4, vec![4.0, 5.0, 6.0])]),
            // Ranges of one shared buffer, as a trainer cuts its sum: each sends only its values.
            {
                let sum = std::sync::Arc::new(vec![7.0, f32::NAN, -0.0, 8.5, 9.0]);
                let range = |p, r| Gradient { values: SharedValues::range(&sum, r).unwrap(), ..grad(p, vec![]) };
                Msg::Gradients(vec![range(0, 1..3), range(1, 3..5)])
            },
            Msg::Gradient(Gradient {
                values: SharedValues::range(&std::sync::Arc::new(vec![1.0, 2.0, 3.0]), 2..3).unwrap(),
                ..grad(5, vec![])
            }),
            Msg::ShardReady { job: 1, partition: 3 },
            // A hosted range's final values: far more than a header may hold.
            Msg::Finished {
                job: 1,
                range: 2,
                generation: 5,
                offset: 40,
                values: (0..400_000).map(|i| i as f32 * 0.5).collect(),
                ledger: Default::default(),
            },
        ];
        for msg in msgs {
            let frame = encode_deliver(7, Addr::Trainer(1), msg.clone(), &limits).unwrap().to_vec();
            let Inbound::Deliver(7, to, back) = decode(&frame[4..], &limits).unwrap() else { panic!() };
            assert_eq!(to, Addr::Trainer(1));
            assert_eq!(format!("{back:?}"), format!("{msg:?}"));
        }
    }

    #[test]
    fn checkpoint_bytes_of_any_length_round_trip() {
        let limits = Limits::default();
        for n in [0usize, 1, 3, 4, 5, 1001] {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let frame = encode_checkpoint(3, "ckpt-x", bytes.clone(), &limits).unwrap().into_vec();
            let Inbound::Checkpoint(3, name, back) = decode(&frame[4..], &limits).unwrap() else { panic!() };
            assert_eq!((name.as_str(), back), ("ckpt-x", bytes));
        }
    }

    /// A received frame decodes to the same message as its bytes do, and only a checkpoint
    /// copy's payload is left for `finish` (where a copy of the wrong length is refused).
    #[test]
    fn a_received_frame_leaves_only_a_checkpoint_copy_to_finish() {
        let limits = Limits::default();
        let received = |frame: Vec<u8>| decode_received_head(RecvFrame::new(frame[4..].to_vec()), &limits).0;
        let gradient = Msg::Gradients(vec![grad(3, vec![1.5, -0.0, f32::from_bits(0x7fc0_0001)])]);
        let frame = encode_deliver(7, Addr::Aggregator(0), gradient.clone(), &limits).unwrap().to_vec();
        let Ok(Decoded::Ready(Inbound::Deliver(7, Addr::Aggregator(0), back))) = received(frame) else { panic!() };
        assert_eq!(format!("{back:?}"), format!("{gradient:?}"));

        let bytes: Vec<u8> = (0..1001u32).map(|i| (i * 7) as u8).collect();
        let frame = encode_checkpoint(3, "ckpt-x", bytes.clone(), &limits).unwrap().into_vec();
        let Ok(copy @ Decoded::Copy(..)) = received(frame) else { panic!("a checkpoint copy is left to finish") };
        let Ok(Inbound::Checkpoint(3, name, back)) = copy.finish() else { panic!() };
        assert_eq!((name.as_str(), back), ("ckpt-x", bytes));

        let header = NodeMsg::CheckpointCopy { job: 3, name: "ckpt-x".into(), len: 9 };
        let frame = phalanx_transport::encode(&header, &[1.0], &limits).unwrap().to_vec();
        let Ok(copy @ Decoded::Copy(..)) = received(frame) else { panic!() };
        assert!(matches!(copy.finish(), Err(InboundError::TensorMismatch { got: 1 })), "9 bytes in a 4-byte payload");
        assert!(received(vec![0; 12]).is_err(), "garbage is refused at the head");
    }

    #[test]
    fn a_payload_that_does_not_match_its_header_is_refused() {
        let limits = Limits::default();
        let header = NodeMsg::Deliver {
            job: 1,
            to: Addr::Aggregator(0),
            msg: Msg::Gradients(vec![grad(0, vec![])]),
            lens: vec![5],
        };
        let frame = phalanx_transport::encode(&header, &[1.0, 2.0], &limits).unwrap();
        assert!(matches!(decode(&frame[4..], &limits), Err(InboundError::TensorMismatch { got: 2 })));
        // A control message carries no tensor.
        let control = NodeMsg::Cancel { job: 1 };
        let frame = phalanx_transport::encode(&control, &[0.0; 1000], &limits).unwrap();
        assert!(matches!(decode(&frame[4..], &limits), Err(InboundError::TensorMismatch { got: 1000 })));
    }

    #[test]
    fn a_job_spec_and_a_registry_travel_intact() {
        use crate::cluster::registry::Registry;
        let limits = Limits::default();
        let spec = JobConfig {
            dataset: "csv:data/x.csv:label".parse().unwrap(),
            fail: vec!["trainer:1@20".parse().unwrap()],
            epochs: Some(3),
            ..JobConfig::default()
        };
        let msg = NodeMsg::Submit { request: 9, spec: Box::new(spec.clone()) };
        let Inbound::Control(back) = decode(&encode(&msg, &limits).unwrap()[4..], &limits).unwrap() else { panic!() };
        assert_eq!(back, msg);
        let mut registry = Registry::new(0, 1);
        registry.take_over(2);
        // Every state a job can be in crosses the wire.
        use crate::cluster::registry::JobState;
        let ids: Vec<_> = (0..5).map(|_| registry.accept(spec.clone()).unwrap().0).collect();
        registry.to_start();
        registry.set_state(ids[1], JobState::Finished { model_sha256: "ab".into(), summary: Some("s".into()) });
        registry.set_state(ids[2], JobState::Failed { error: "e".into() });
        registry.set_state(ids[3], JobState::Cancelled);
        let msg = NodeMsg::Registry(Box::new(registry.snapshot().clone()));
        let Inbound::Control(back) = decode(&encode(&msg, &limits).unwrap()[4..], &limits).unwrap() else { panic!() };
        assert_eq!(back, msg);
    }
}
