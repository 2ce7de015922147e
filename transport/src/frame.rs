//! A received frame, holding its share of the receive budget until the receiver is done
//! with it; and a frame to send, whose tensors travel from their own buffers.
//!
//! Each peer's frames are bounded in bytes from the moment their reading starts
//! ([`TransportConfig::recv_budget_bytes_per_peer`](crate::TransportConfig::recv_budget_bytes_per_peer)):
//! a peer whose frames pile up unread — queued for the node loop, waiting to be decoded — stops
//! being read, and QUIC's flow control then slows it down, instead of the receiver's memory
//! growing. A [`RecvFrame`] carries that share: it goes back when the frame is dropped, or when
//! [`into_vec`](RecvFrame::into_vec) hands the bytes on (the receiver has taken them over:
//! decoded, or copied elsewhere). [`into_parts`](RecvFrame::into_parts) keeps the share apart,
//! for a receiver that decodes elsewhere and gives it back after.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
#[cfg(target_endian = "little")]
use zerocopy::IntoBytes;

use crate::LeTensor;

/// A share of a receive budget, given back when dropped.
pub struct ReceiveBudget(Option<Box<dyn Send + Sync>>);

impl ReceiveBudget {
    /// A share of nothing (a frame built outside a transport).
    pub fn none() -> Self {
        Self(None)
    }

    pub(crate) fn of(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }

    /// Whether it holds a share of a budget.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for ReceiveBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_held() { "ReceiveBudget(held)" } else { "ReceiveBudget(none)" })
    }
}

/// The body of a received frame (its length prefix removed) and its receive-budget share.
///
/// A frame read from QUIC holds its tensor apart, in the chunks QUIC delivered
/// ([`LeTensor`]): [`decode_le`](Self::decode_le) hands them over without a copy, for a
/// receiver that reads the values where it needs them; [`decode`](Self::decode) joins them
/// into values. The body as bytes is there too ([`to_vec`](Self::to_vec),
/// [`into_vec`](Self::into_vec)), joined on demand.
///
/// The chunks share QUIC's receive buffers, so a tensor kept after its frame is decoded keeps
/// those buffers alive (each at most one received datagram batch); the frame's budget share
/// covers its own bytes until it is dropped, as for a tensor copied out.
pub struct RecvFrame {
    /// The envelope and the header (the whole body for a frame built from bytes).
    head: Vec<u8>,
    /// The values after the header, when read apart: the bytes as QUIC delivered them.
    tensor: LeTensor,
    budget: ReceiveBudget,
}

/// The bytes of `head` followed by `tensor`'s; no copy when the tensor is empty.
pub(crate) fn join_le(mut head: Vec<u8>, tensor: &LeTensor) -> Vec<u8> {
    head.reserve_exact(tensor.byte_len());
    for chunk in tensor.chunks() {
        head.extend_from_slice(chunk);
    }
    head
}

impl RecvFrame {
    /// A frame of `bytes` that holds no budget (tests, frames a node hands itself).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { head: bytes, tensor: LeTensor::default(), budget: ReceiveBudget::none() }
    }

    pub(crate) fn with_budget(head: Vec<u8>, tensor: LeTensor, budget: ReceiveBudget) -> Self {
        Self { head, tensor, budget }
    }

    /// Bytes of the body.
    pub fn len(&self) -> usize {
        self.head.len() + self.tensor.byte_len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes the frame as [`decode`](crate::codec::decode) does (a tensor read apart is
    /// joined into values: one copy); the budget share comes back beside the result, to be
    /// dropped once the receiver is done with it.
    pub fn decode<H: serde::de::DeserializeOwned>(
        self,
        limits: &crate::Limits,
    ) -> (Result<crate::Frame<H>, crate::DecodeError>, ReceiveBudget) {
        let Self { head, tensor, budget } = self;
        let decoded = if tensor.is_empty() {
            crate::codec::decode(&head, limits)
        } else {
            crate::codec::decode_parts(&head, tensor.to_vec(), limits)
        };
        (decoded, budget)
    }

    /// [`decode`](Self::decode) with the tensor left as QUIC delivered it (no copy): for a
    /// receiver that reads the values where it needs them.
    pub fn decode_le<H: serde::de::DeserializeOwned>(
        self,
        limits: &crate::Limits,
    ) -> (Result<(H, LeTensor), crate::DecodeError>, ReceiveBudget) {
        let Self { head, tensor, budget } = self;
        let decoded = if tensor.is_empty() {
            // A frame built from bytes holds its whole body in `head`.
            crate::codec::decode(&head, limits).map(|f| (f.header, LeTensor::from_values(f.tensor)))
        } else {
            crate::codec::decode_head(&head, tensor.byte_len() as u64, limits).map(|h| (h, tensor))
        };
        (decoded, budget)
    }

    /// The body's bytes, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        join_le(self.head.clone(), &self.tensor)
    }

    /// The body's bytes; the budget share goes back now.
    pub fn into_vec(self) -> Vec<u8> {
        join_le(self.head, &self.tensor)
    }

    /// The body's bytes and the budget share apart (drop the share once done with the bytes).
    pub fn into_parts(self) -> (Vec<u8>, ReceiveBudget) {
        (join_le(self.head, &self.tensor), self.budget)
    }

    /// Whether it still holds a share of a receive budget.
    pub fn holds_budget(&self) -> bool {
        self.budget.is_held()
    }

    fn eq_bytes(&self, other: &[u8]) -> bool {
        let Some((head, rest)) = other.split_at_checked(self.head.len()) else { return false };
        if head != self.head || rest.len() != self.tensor.byte_len() {
            return false;
        }
        let mut rest = rest;
        self.tensor.chunks().iter().all(|chunk| {
            let (this, next) = rest.split_at(chunk.len());
            rest = next;
            this == &chunk[..]
        })
    }
}

impl PartialEq<[u8]> for RecvFrame {
    fn eq(&self, other: &[u8]) -> bool {
        self.eq_bytes(other)
    }
}

impl PartialEq<Vec<u8>> for RecvFrame {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.eq_bytes(other)
    }
}

impl PartialEq<RecvFrame> for Vec<u8> {
    fn eq(&self, other: &RecvFrame) -> bool {
        other.eq_bytes(self)
    }
}

impl fmt::Debug for RecvFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvFrame").field("bytes", &self.len()).field("budget", &self.budget).finish()
    }
}

/// A tensor's values as the little-endian bytes a frame carries, without a copy where the
/// machine is little-endian (every target Phalanx ships for): the buffer is handed to QUIC as
/// it is and freed once QUIC no longer needs it (the peer acknowledged every byte). A shared
/// buffer ([`shared`](Self::shared)) can go to several peers at once.
#[derive(Clone)]
pub struct TensorBytes(Bytes);

impl TensorBytes {
    /// The bytes of `values`, which the frame takes over.
    pub fn owned(values: Vec<f32>) -> Self {
        Self::of(F32Owner::Owned(values))
    }

    /// The bytes of a buffer shared with others (a version of the parameters on its way to
    /// every trainer); the buffer stays alive until the last frame holding it is sent.
    pub fn shared(values: Arc<Vec<f32>>) -> Self {
        Self::of(F32Owner::Shared(values))
    }

    /// The bytes of values `range` of a shared buffer (one aggregator's range of a trainer's
    /// gradient sum, the other ranges on their way to other peers); no copy on a little-endian
    /// machine. Panics if `range` is not inside `values`.
    pub fn shared_range(values: Arc<Vec<f32>>, range: std::ops::Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= values.len(), "range {range:?} of {} values", values.len());
        let whole = Self::shared(values);
        Self(whole.0.slice(range.start * 4..range.end * 4))
    }

    /// Values already in their wire form, little-endian `f32` words (a checkpoint file, which
    /// holds whole words), taken over without a copy; `None` unless `bytes` is whole words.
    pub fn le_words(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() % 4 == 0).then(|| Self(Bytes::from(bytes)))
    }

    /// Bytes of the tensor on the wire (4 per value).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(target_endian = "little")]
    fn of(owner: F32Owner) -> Self {
        Self(Bytes::from_owner(owner))
    }

    #[cfg(not(target_endian = "little"))]
    fn of(owner: F32Owner) -> Self {
        Self(Bytes::from(owner.values().iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()))
    }
}

impl fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TensorBytes({} values)", self.0.len() / 4)
    }
}

/// The owner of a tensor's buffer while QUIC sends it.
enum F32Owner {
    Owned(Vec<f32>),
    Shared(Arc<Vec<f32>>),
}

impl F32Owner {
    fn values(&self) -> &[f32] {
        match self {
            Self::Owned(v) => v,
            Self::Shared(v) => v,
        }
    }
}

/// On a little-endian machine an `f32`'s memory is its little-endian wire bytes.
#[cfg(target_endian = "little")]
impl AsRef<[u8]> for F32Owner {
    fn as_ref(&self) -> &[u8] {
        self.values().as_bytes()
    }
}

/// A frame to send: its head (length prefix, envelope and header, as
/// [`encode_parts`](crate::codec::encode_parts) builds them) and its tensors' bytes, handed to
/// QUIC as separate chunks instead of being copied into one buffer first. Cloning shares the
/// buffers. A whole encoded frame (`Vec<u8>`, as [`encode`](crate::encode) builds it) converts
/// into one with no copy.
#[derive(Clone)]
pub struct OutFrame {
    head: Bytes,
    tensor: Vec<Bytes>,
    background: bool,
}

impl OutFrame {
    pub(crate) fn from_parts(head: Vec<u8>, tensor: Vec<TensorBytes>) -> Self {
        Self {
            head: Bytes::from(head),
            tensor: tensor.into_iter().map(|t| t.0).filter(|b| !b.is_empty()).collect(),
            background: false,
        }
    }

    /// This frame, sent in the background: its QUIC stream has a lower priority than every
    /// other frame's, so the connection sends it only while no other frame to the same peer
    /// has bytes waiting (a checkpoint copy beside a training step's gradients and
    /// parameters, which would otherwise share the link with them round robin and hold the
    /// step up). It still arrives whole, but only as fast as the link has pauses: for bytes
    /// that can wait (a copy that lags only makes the newest replicated checkpoint older). The
    /// in-memory network has no priorities.
    #[must_use]
    pub fn background(mut self) -> Self {
        self.background = true;
        self
    }

    /// Whether [`background`](Self::background) marked this frame.
    pub fn is_background(&self) -> bool {
        self.background
    }

    /// Bytes of the whole frame, length prefix included.
    pub fn len(&self) -> usize {
        self.head.len() + self.tensor.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether the frame has no bytes at all (never one [`encode`](crate::encode) built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The head: the length prefix, the envelope and the header (and, for a frame built as
    /// one buffer, the tensor too).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The whole frame as one buffer (a copy when the tensor is held apart).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        for part in &self.tensor {
            out.extend_from_slice(part);
        }
        out
    }

    /// The whole frame as one buffer: the head's own buffer when the frame is one buffer
    /// and not shared, else a copy.
    pub fn into_vec(self) -> Vec<u8> {
        if self.tensor.is_empty() {
            Vec::from(self.head)
        } else {
            self.to_vec()
        }
    }

    /// The chunks to write, in order.
    pub(crate) fn into_chunks(self) -> Vec<Bytes> {
        let mut chunks = Vec::with_capacity(1 + self.tensor.len());
        chunks.push(self.head);
        chunks.extend(self.tensor);
        chunks
    }
}

impl From<Vec<u8>> for OutFrame {
    fn from(frame: Vec<u8>) -> Self {
        Self { head: Bytes::from(frame), tensor: Vec::new(), background: false }
    }
}

impl fmt::Debug for OutFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutFrame")
            .field("head", &self.head.len())
            .field("tensor_chunks", &self.tensor.len())
            .field("background", &self.background)
            .finish()
    }
}
