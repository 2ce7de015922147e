//! Reading the one frame a stream carries, with every limit applied before the bytes are
//! buffered.

use std::sync::Arc;

use bytes::BufMut;
use quinn::{ConnectionError, ReadError, ReadExactError, RecvStream, VarInt};
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::codec::{check_envelope, check_frame_start, ENVELOPE_BYTES, PREFIX_BYTES};
use crate::{codes, DecodeError, Limits, PROTOCOL_VERSION};

/// Bytes of the version field at the start of a frame body.
const VERSION_BYTES: usize = 2;

/// Why a stream did not yield a frame.
#[derive(Debug)]
pub(crate) enum FrameReadError {
    /// The bytes break a codec rule: the peer is broken or hostile.
    Invalid(DecodeError),
    /// The stream went on after its frame: the peer does not speak this protocol.
    Trailing,
    /// The sender reset the stream, giving the frame up (a sender may cancel a send; this is
    /// no protocol violation).
    Reset(VarInt),
    /// The connection ended while the frame was being read.
    Lost(ConnectionError),
    /// Any other read failure (a stream read after it was closed, 0-RTT rejected).
    Read(ReadError),
}

impl FrameReadError {
    /// Close code and reason if the error is the peer's fault, `None` if the stream or
    /// connection merely ended.
    pub(crate) fn violation(&self) -> Option<(u32, String)> {
        match self {
            Self::Invalid(err) => Some((err.reason_code(), err.to_string())),
            Self::Trailing => Some((codes::STREAM_FRAMING, "stream carries bytes after its frame".to_owned())),
            Self::Reset(_) | Self::Lost(_) | Self::Read(_) => None,
        }
    }
}

impl std::fmt::Display for FrameReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(err) => write!(f, "invalid frame: {err}"),
            Self::Trailing => f.write_str("stream carries bytes after its frame"),
            Self::Reset(code) => write!(f, "stream reset by the sender with code {code}"),
            Self::Lost(err) => write!(f, "connection lost: {err}"),
            Self::Read(err) => write!(f, "read failed: {err}"),
        }
    }
}

impl From<ReadError> for FrameReadError {
    fn from(err: ReadError) -> Self {
        match err {
            ReadError::Reset(code) => Self::Reset(code),
            ReadError::ConnectionLost(err) => Self::Lost(err),
            other => Self::Read(other),
        }
    }
}

/// Recovers quinn's typed error from the `io::Error` its `AsyncRead` implementation wraps it
/// in.
fn from_io(err: std::io::Error) -> FrameReadError {
    match err.into_inner().map(|inner| inner.downcast::<ReadError>()) {
        Some(Ok(read)) => (*read).into(),
        // quinn only ever wraps a ReadError; anything else means the stream is unusable.
        _ => FrameReadError::Read(ReadError::ClosedStream),
    }
}

/// A frame body (prefix removed), its tensor apart, and the receive-budget permit that pays
/// for its bytes.
pub(crate) struct ReceivedFrame {
    /// The envelope and the header.
    pub(crate) head: Vec<u8>,
    /// The tensor after the header, in the chunks QUIC delivered.
    pub(crate) tensor: crate::LeTensor,
    /// Held until the body is handed over, so the bytes buffered per connection stay within
    /// the budget. `None` when no budget applies (the hello).
    pub(crate) _budget: Option<OwnedSemaphorePermit>,
}

impl ReceivedFrame {
    /// The body as one buffer: for frames whose tensor is empty by their limits (hellos,
    /// client requests), with no copy then.
    pub(crate) fn into_body(self) -> Vec<u8> {
        crate::frame::join_le(self.head, &self.tensor)
    }
}

/// Reads exactly one frame from `recv`: a length prefix, then that many bytes, then the end
/// of the stream.
///
/// The prefix is checked against `limits` before anything is allocated for the body; with a
/// `budget`, the body's bytes are also acquired from it first (it must hold at least
/// `limits.max_frame_bytes` permits, or a largest frame would wait forever). The version is
/// checked as soon as its bytes arrive and the whole envelope once the body is complete
/// ([`check_frame`](crate::codec::check_frame)); the header's content is left to whoever knows its type.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    limits: &Limits,
    budget: Option<&Arc<Semaphore>>,
) -> Result<ReceivedFrame, FrameReadError> {
    let mut prefix = [0u8; PREFIX_BYTES];
    if let Err(err) = recv.read_exact(&mut prefix).await {
        return Err(match err {
            ReadExactError::FinishedEarly(read) => {
                FrameReadError::Invalid(DecodeError::Truncated { needed: PREFIX_BYTES as u64, available: read as u64 })
            }
            ReadExactError::ReadError(err) => err.into(),
        });
    }
    let announced = u32::from_le_bytes(prefix);
    if announced > limits.max_frame_bytes {
        return Err(FrameReadError::Invalid(DecodeError::Oversize {
            len: u64::from(announced),
            max: limits.max_frame_bytes,
        }));
    }
    // announced ≤ max_frame_bytes, a u32; usize is at least 32 bits wherever quinn runs.
    let len = usize::try_from(announced).map_err(|_| {
        FrameReadError::Invalid(DecodeError::Oversize { len: u64::from(announced), max: limits.max_frame_bytes })
    })?;
    let permit = match budget {
        Some(budget) => Some(
            budget
                .clone()
                .acquire_many_owned(announced)
                .await
                .map_err(|_| FrameReadError::Lost(ConnectionError::LocallyClosed))?,
        ),
        None => None,
    };

    // Reserving the announced length is fine now: it is within the frame limit and paid for
    // by the budget. The envelope and the header are read into `head`: `read_buf` copies every
    // chunk QUIC has buffered straight into the spare capacity (one lock of the connection per
    // call, no zeroing of the buffer first), and the `limit` keeps it from reading past them.
    // The version is checked as soon as its bytes arrive (a foreign frame is refused from its
    // first bytes rather than after buffering all of it), the whole envelope as soon as it is
    // complete.
    let frame_len = u64::from(announced);
    let truncated = |available: usize| DecodeError::Truncated { needed: frame_len, available: available as u64 };
    let mut head = Vec::with_capacity(len.min(ENVELOPE_BYTES));
    let mut head_len = ENVELOPE_BYTES.min(len);
    while head.len() < head_len {
        let remaining = head_len - head.len();
        match recv.read_buf(&mut (&mut head).limit(remaining)).await {
            Ok(0) => return Err(FrameReadError::Invalid(truncated(head.len()))),
            Ok(_) => {}
            Err(err) => return Err(from_io(err)),
        }
        if head.len() >= VERSION_BYTES {
            let version = u16::from_le_bytes([head[0], head[1]]);
            if version != PROTOCOL_VERSION {
                return Err(FrameReadError::Invalid(DecodeError::UnsupportedVersion {
                    found: version,
                    supported: PROTOCOL_VERSION,
                }));
            }
        }
        if head.len() == ENVELOPE_BYTES && head_len == ENVELOPE_BYTES {
            let header_len = check_envelope(&head, frame_len, limits).map_err(FrameReadError::Invalid)?;
            // Present once the whole envelope is: the loop only gets here then.
            head_len += header_len.unwrap_or_default();
            head.reserve_exact(head_len - head.len());
        }
    }
    // The rest is the tensor: kept in the chunks QUIC delivered (no copy here; the receiver
    // reads the values out where it needs them, `LeTensor`), small chunks joined so that tiny
    // STREAM frames cannot make it hold a handle per byte. A value may lie across two.
    let tensor_bytes = len - head.len();
    check_frame_start(&head, frame_len, limits).map_err(FrameReadError::Invalid)?;
    let mut chunks = crate::le_tensor::ChunkCollector::default();
    while chunks.bytes() < tensor_bytes {
        match recv.read_chunk(tensor_bytes - chunks.bytes(), true).await? {
            Some(chunk) => chunks.push(chunk.bytes),
            None => return Err(FrameReadError::Invalid(truncated(head.len() + chunks.bytes()))),
        }
    }
    if recv.read_chunk(1, true).await?.is_some() {
        return Err(FrameReadError::Trailing);
    }
    // `check_frame_start` refused a tensor that is not a whole number of values.
    let tensor =
        chunks.finish().ok_or(FrameReadError::Invalid(DecodeError::BadTensorLength { bytes: tensor_bytes as u64 }))?;
    Ok(ReceivedFrame { head, tensor, _budget: permit })
}
