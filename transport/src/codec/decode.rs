//! Parsing frames: one at a time from a slice, or incrementally from a stream.

use std::fmt;

use serde::de::DeserializeOwned;

use super::header::decode_header;
use super::{DecodeError, Frame, Limits, ENVELOPE_BYTES, F32_BYTES, PREFIX_BYTES, PROTOCOL_VERSION};

/// Once a decoder has handed out every buffered byte, a buffer whose capacity grew past this
/// (a large tensor went through) is released rather than kept for the stream's lifetime.
const RETAINED_CAPACITY_BYTES: usize = 1024 * 1024;

/// Parses one frame whose 4-byte length prefix was already removed: `frame` is exactly the
/// bytes the prefix counted.
///
/// ```
/// use phalanx_transport::{decode, encode, DecodeError, Limits, codec::PREFIX_BYTES};
///
/// let limits = Limits::default();
/// let wire = encode(&7u32, &[], &limits)?;
/// assert_eq!(decode::<u32>(&wire[PREFIX_BYTES..], &limits)?.header, 7);
///
/// let mut bad = wire[PREFIX_BYTES..].to_vec();
/// bad[0] = 9; // version 9
/// let err = decode::<u32>(&bad, &limits).unwrap_err();
/// assert!(matches!(err, DecodeError::UnsupportedVersion { found: 9, .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode<H: DeserializeOwned>(frame: &[u8], limits: &Limits) -> Result<Frame<H>, DecodeError> {
    let frame_len = u64::try_from(frame.len()).unwrap_or(u64::MAX);
    let Some(header_len) = check_envelope(frame, frame_len, limits)? else {
        // check_envelope only waits for bytes when the frame is shorter than the envelope,
        // which it already reported; kept as an error rather than a panic all the same.
        return Err(DecodeError::Truncated { needed: ENVELOPE_BYTES as u64, available: frame_len });
    };
    let rest = frame.get(ENVELOPE_BYTES..).unwrap_or_default();
    let Some((header, tensor)) = rest.split_at_checked(header_len) else {
        return Err(DecodeError::Truncated { needed: (ENVELOPE_BYTES + header_len) as u64, available: frame_len });
    };
    // The cheap length check goes first: no point deserialising a header whose frame is bad.
    if tensor.len() % F32_BYTES != 0 {
        return Err(DecodeError::BadTensorLength { bytes: tensor.len() as u64 });
    }
    let header = decode_header(header)?;
    // The same one pass as a tensor read in chunks: no zeroed buffer first, bit-exact.
    let mut values = TensorAssembler::with_bytes(tensor.len());
    values.push(tensor);
    let tensor = values.finish().map_err(|bytes| DecodeError::BadTensorLength { bytes })?;
    Ok(Frame { header, tensor })
}

/// [`decode`] for a frame whose tensor was read apart from the rest ([`TensorAssembler`]):
/// `head` holds the envelope and the header, `tensor` the values that followed them. Every rule
/// is checked as for the whole frame; the values are taken over without a copy.
pub fn decode_parts<H: DeserializeOwned>(
    head: &[u8],
    tensor: Vec<f32>,
    limits: &Limits,
) -> Result<Frame<H>, DecodeError> {
    let tensor_bytes = (tensor.len() as u64).saturating_mul(F32_BYTES as u64);
    Ok(Frame { header: decode_head(head, tensor_bytes, limits)?, tensor })
}

/// The header of a frame whose envelope and header are `head` and whose tensor of
/// `tensor_bytes` bytes is held apart; every rule [`decode_parts`] checks.
pub fn decode_head<H: DeserializeOwned>(head: &[u8], tensor_bytes: u64, limits: &Limits) -> Result<H, DecodeError> {
    if tensor_bytes % F32_BYTES as u64 != 0 {
        return Err(DecodeError::BadTensorLength { bytes: tensor_bytes });
    }
    let frame_len = u64::try_from(head.len()).unwrap_or(u64::MAX).saturating_add(tensor_bytes);
    let Some(header_len) = check_envelope(head, frame_len, limits)? else {
        return Err(DecodeError::Truncated { needed: ENVELOPE_BYTES as u64, available: frame_len });
    };
    // The head is the envelope and the header, nothing more: a tensor byte in it would shift
    // every value that follows.
    let header = head.get(ENVELOPE_BYTES..).unwrap_or_default();
    if header.len() != header_len {
        return Err(DecodeError::Truncated {
            needed: (ENVELOPE_BYTES + header_len) as u64,
            available: head.len() as u64,
        });
    }
    Ok(decode_header(header)?)
}

/// Collects a tensor's little-endian bytes, arriving in chunks of any size (a value may be
/// split between two), straight into `f32` values: one pass over the bytes, with no buffer of
/// bytes in between and no zeroing of the values first. Bit-exact (NaN payloads included).
#[derive(Debug, Default)]
pub struct TensorAssembler {
    values: Vec<f32>,
    /// The first bytes of a value whose last ones have not arrived yet.
    partial: [u8; F32_BYTES],
    partial_len: usize,
}

impl TensorAssembler {
    /// An assembler for a tensor of `bytes` bytes (memory for it is reserved at once: the
    /// caller has checked the length against its limits).
    pub fn with_bytes(bytes: usize) -> Self {
        Self { values: Vec::with_capacity(bytes / F32_BYTES), ..Self::default() }
    }

    /// Bytes taken so far.
    pub fn bytes(&self) -> usize {
        self.values.len() * F32_BYTES + self.partial_len
    }

    /// Takes the next bytes of the tensor.
    pub fn push(&mut self, mut bytes: &[u8]) {
        if self.partial_len > 0 {
            let take = (F32_BYTES - self.partial_len).min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(head);
            self.partial_len += take;
            bytes = rest;
            if self.partial_len < F32_BYTES {
                return;
            }
            self.values.push(f32::from_le_bytes(self.partial));
            self.partial_len = 0;
        }
        let chunks = bytes.chunks_exact(F32_BYTES);
        let rest = chunks.remainder();
        self.values.extend(chunks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    /// The values, once the bytes taken are a whole number of them; else how many bytes were
    /// taken.
    pub fn finish(self) -> Result<Vec<f32>, u64> {
        if self.partial_len == 0 {
            Ok(self.values)
        } else {
            Err(self.bytes() as u64)
        }
    }
}

/// Checks every rule of one frame body (prefix removed) except the header's content: the
/// length limit, the version, the header length and the tensor length (rules 1–4 of the
/// [module docs](super)).
///
/// A transport that does not know the header type uses this to refuse a foreign or broken
/// frame itself; the receiver of the frame then only has to run [`decode`] for rule 5.
///
/// ```
/// use phalanx_transport::{check_frame, encode, DecodeError, Limits, codec::PREFIX_BYTES};
///
/// let limits = Limits::default();
/// let wire = encode(&"any header", &[1.0], &limits)?;
/// check_frame(&wire[PREFIX_BYTES..], &limits)?;
///
/// let err = check_frame(&[0xff; 16], &limits).unwrap_err();
/// assert_eq!(err.reason_code(), DecodeError::CODE_UNSUPPORTED_VERSION);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn check_frame(frame: &[u8], limits: &Limits) -> Result<(), DecodeError> {
    check_frame_start(frame, u64::try_from(frame.len()).unwrap_or(u64::MAX), limits)
}

/// [`check_frame`] for a frame body of `frame_len` bytes of which `start` holds the first
/// ones (at least the envelope: a frame whose tensor is held in buffers of its own).
pub(crate) fn check_frame_start(start: &[u8], frame_len: u64, limits: &Limits) -> Result<(), DecodeError> {
    let Some(header_len) = check_envelope(start, frame_len, limits)? else {
        return Err(DecodeError::Truncated { needed: ENVELOPE_BYTES as u64, available: frame_len });
    };
    let tensor_bytes = frame_len.saturating_sub(ENVELOPE_BYTES as u64).saturating_sub(header_len as u64);
    if tensor_bytes % F32_BYTES as u64 != 0 {
        return Err(DecodeError::BadTensorLength { bytes: tensor_bytes });
    }
    Ok(())
}

/// Checks every envelope rule that the bytes present allow, for a frame whose prefix says
/// `frame_len`; `body` holds the first bytes after the prefix (possibly not all of them yet).
///
/// Returns the header length once the whole envelope is present, `None` while it is not.
/// Checking partial envelopes is what lets [`FrameDecoder`] refuse a foreign or oversize
/// frame from its first bytes instead of after buffering it.
pub(crate) fn check_envelope(body: &[u8], frame_len: u64, limits: &Limits) -> Result<Option<usize>, DecodeError> {
    if frame_len > u64::from(limits.max_frame_bytes) {
        return Err(DecodeError::Oversize { len: frame_len, max: limits.max_frame_bytes });
    }
    if frame_len < ENVELOPE_BYTES as u64 {
        return Err(DecodeError::Truncated { needed: ENVELOPE_BYTES as u64, available: frame_len });
    }
    let Some(version) = read_array(body, 0).map(u16::from_le_bytes) else {
        return Ok(None);
    };
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version, supported: PROTOCOL_VERSION });
    }
    let Some(header_len) = read_array(body, 2).map(u32::from_le_bytes) else {
        return Ok(None);
    };
    if header_len > limits.max_header_bytes {
        return Err(DecodeError::HeaderTooLarge { len: u64::from(header_len), max: limits.max_header_bytes });
    }
    let needed = ENVELOPE_BYTES as u64 + u64::from(header_len);
    if needed > frame_len {
        return Err(DecodeError::Truncated { needed, available: frame_len });
    }
    // header_len ≤ frame_len ≤ max_frame_bytes (a u32), so it fits in usize on every target
    // this crate builds for; a failure here would mean a 16-bit target.
    usize::try_from(header_len)
        .map(Some)
        .map_err(|_| DecodeError::HeaderTooLarge { len: u64::from(header_len), max: limits.max_header_bytes })
}

/// The `N` bytes of `bytes` at `at`, if present.
fn read_array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Incremental decoder for one stream: push bytes as they arrive, in any chunking, and pull
/// complete frames.
///
/// Memory: the decoder holds at most one incomplete frame (≤ 4 + `max_frame_bytes`) plus the
/// not-yet-pulled part of the latest push, so call [`next_frame`](Self::next_frame) until it
/// returns `Ok(None)` after every push. It never reserves memory because a length prefix
/// asked for it: the buffer grows only with bytes actually received, so 4 bytes cannot make
/// it allocate 256 MiB.
///
/// After the first error the decoder is poisoned: it drops its buffer, ignores further pushes
/// and returns the same error forever. A stream carrying a bad frame is closed, not
/// resynchronised, because nothing after a bad length can be trusted to be a frame boundary.
///
/// ```
/// use phalanx_transport::{encode_into, FrameDecoder, Limits};
///
/// let limits = Limits::default();
/// let mut wire = Vec::new();
/// encode_into(&"hello", &[], &limits, &mut wire)?;
/// encode_into(&"tensor", &[1.5; 3], &limits, &mut wire)?;
///
/// let mut decoder = FrameDecoder::new(limits);
/// let mut frames = Vec::new();
/// for chunk in wire.chunks(5) {
///     decoder.push(chunk);
///     while let Some(frame) = decoder.next_frame::<String>()? {
///         frames.push(frame);
///     }
/// }
/// assert_eq!(frames[0].header, "hello");
/// assert_eq!(frames[1].tensor, [1.5; 3]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FrameDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out. Consumed frames are cut off lazily, on the next
    /// push, so pulling many small frames out of one push copies nothing.
    start: usize,
    poisoned: Option<DecodeError>,
}

// Not derived: the buffer can hold up to a whole frame, far too much for a log line.
impl fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("limits", &self.limits)
            .field("buffered", &self.buffered())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl FrameDecoder {
    /// An empty decoder applying `limits` to every frame.
    pub fn new(limits: Limits) -> Self {
        Self { limits, buf: Vec::new(), start: 0, poisoned: None }
    }

    /// Appends bytes received from the stream. Ignored once the decoder is poisoned.
    ///
    /// The next frame's envelope is checked right away, so an oversize length or a foreign
    /// version poisons the decoder (and frees its buffer) before the body is buffered.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned.is_some() {
            return;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        if let Err(err) = self.check_next_envelope() {
            self.poison(err);
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error that
    /// poisoned the decoder (the same one on every later call).
    pub fn next_frame<H: DeserializeOwned>(&mut self) -> Result<Option<Frame<H>>, DecodeError> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        match self.try_next_frame() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.poison(err.clone());
                Err(err)
            }
        }
    }

    /// Bytes received but not yet returned as frames (0 once poisoned).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The limits this decoder applies.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The error that poisoned this decoder, if any.
    pub fn error(&self) -> Option<&DecodeError> {
        self.poisoned.as_ref()
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// Checks the envelope of the frame at the front; returns the frame's total size
    /// (prefix included) once its prefix is known.
    fn check_next_envelope(&self) -> Result<Option<usize>, DecodeError> {
        let pending = self.pending();
        let Some(frame_len) = read_array(pending, 0).map(u32::from_le_bytes) else {
            return Ok(None);
        };
        let body = pending.get(PREFIX_BYTES..).unwrap_or_default();
        check_envelope(body, u64::from(frame_len), &self.limits)?;
        // check_envelope bounded frame_len by max_frame_bytes, a u32.
        let total = usize::try_from(frame_len)
            .ok()
            .and_then(|len| len.checked_add(PREFIX_BYTES))
            .ok_or(DecodeError::Oversize { len: u64::from(frame_len), max: self.limits.max_frame_bytes })?;
        Ok(Some(total))
    }

    fn try_next_frame<H: DeserializeOwned>(&mut self) -> Result<Option<Frame<H>>, DecodeError> {
        let Some(total) = self.check_next_envelope()? else {
            return Ok(None);
        };
        let Some(body) = self.pending().get(PREFIX_BYTES..total) else {
            return Ok(None);
        };
        let frame = decode(body, &self.limits)?;
        self.start += total;
        if self.start == self.buf.len() {
            self.start = 0;
            if self.buf.capacity() > RETAINED_CAPACITY_BYTES {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        }
        Ok(Some(frame))
    }

    fn poison(&mut self, err: DecodeError) {
        tracing::debug!(
            reason_code = err.reason_code(),
            error = %err,
            "frame decoder poisoned"
        );
        self.buf = Vec::new();
        self.start = 0;
        self.poisoned = Some(err);
    }
}
