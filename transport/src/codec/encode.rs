//! Building frames.

use serde::Serialize;

use super::header::encode_header;
#[cfg(not(target_endian = "little"))]
use super::F32_BYTES;
use super::{EncodeError, Limits, ENVELOPE_BYTES, PREFIX_BYTES, PROTOCOL_VERSION};
use crate::frame::{OutFrame, TensorBytes};

/// Room reserved up front for a typical control header, so building a frame usually takes a
/// single allocation even though the header's size is only known after serialising it.
const TYPICAL_HEADER_BYTES: usize = 128;

/// Builds one frame (length prefix included) from a header and a tensor.
///
/// ```
/// use phalanx_transport::{decode, encode, Limits, codec::PREFIX_BYTES};
///
/// let limits = Limits::default();
/// let wire = encode(&("gradient", 42u64), &[1.0, 2.0], &limits)?;
/// let frame = decode::<(String, u64)>(&wire[PREFIX_BYTES..], &limits)?;
/// assert_eq!(frame.header, ("gradient".to_string(), 42));
/// assert_eq!(frame.tensor, [1.0, 2.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode<H: Serialize + ?Sized>(header: &H, tensor: &[f32], limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(header, tensor, limits, &mut out)?;
    Ok(out)
}

/// Appends one frame (length prefix included) to `out`, which may already hold earlier frames.
///
/// On error `out` is left as it was. The frame is refused if a decoder with the same `limits`
/// would refuse it.
///
/// ```
/// use phalanx_transport::{encode_into, EncodeError, Limits};
///
/// let limits = Limits { max_frame_bytes: 64, max_header_bytes: 16 };
/// let mut out = Vec::new();
/// encode_into(&1u8, &[0.0; 4], &limits, &mut out)?;
/// let before = out.len();
/// let too_big = encode_into(&1u8, &[0.0; 100], &limits, &mut out);
/// assert!(matches!(too_big, Err(EncodeError::Oversize { .. })));
/// assert_eq!(out.len(), before);
/// # Ok::<(), EncodeError>(())
/// ```
pub fn encode_into<H: Serialize + ?Sized>(
    header: &H,
    tensor: &[f32],
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let start = out.len();
    let written = write_frame(header, tensor, limits, out);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

fn write_frame<H: Serialize + ?Sized>(
    header: &H,
    tensor: &[f32],
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    write_head(header, std::mem::size_of_val(tensor), Tensor::Follows, limits, out)?;
    append_tensor(out, tensor);
    Ok(())
}

/// Builds one frame whose tensor stays in its own buffers: the head (length prefix, envelope
/// and header) is encoded, the tensor's parts follow it on the wire in order, as one tensor of
/// their summed length. The bytes on the wire are exactly [`encode`]'s for the concatenated
/// tensor; the send path hands the parts to QUIC without copying them.
///
/// ```
/// use phalanx_transport::{decode, codec::{encode_parts, PREFIX_BYTES}, Limits, TensorBytes};
///
/// let limits = Limits::default();
/// let parts = vec![TensorBytes::owned(vec![1.0, 2.0]), TensorBytes::shared(vec![3.0].into())];
/// let frame = encode_parts(&"gradients", parts, &limits)?;
/// let wire = frame.to_vec();
/// let back = decode::<String>(&wire[PREFIX_BYTES..], &limits)?;
/// assert_eq!(back.tensor, [1.0, 2.0, 3.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_parts<H: Serialize + ?Sized>(
    header: &H,
    tensor: Vec<TensorBytes>,
    limits: &Limits,
) -> Result<OutFrame, EncodeError> {
    let tensor_bytes = tensor.iter().map(TensorBytes::len).fold(0usize, usize::saturating_add);
    let mut head = Vec::new();
    write_head(header, tensor_bytes, Tensor::Apart, limits, &mut head)?;
    Ok(OutFrame::from_parts(head, tensor))
}

/// Where a frame's tensor goes: after the head in the same buffer, or in buffers of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tensor {
    Follows,
    Apart,
}

/// Appends a frame's length prefix, envelope and header for a tensor of `tensor_bytes`
/// (reserving room for the tensor too when it follows in `out`).
fn write_head<H: Serialize + ?Sized>(
    header: &H,
    tensor_bytes: usize,
    tensor: Tensor,
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let max_frame = limits.max_frame_bytes;
    // Refuse an oversize tensor before serialising or allocating anything.
    let min_len = as_u64(ENVELOPE_BYTES).saturating_add(as_u64(tensor_bytes));
    if min_len > u64::from(max_frame) {
        return Err(EncodeError::Oversize { len: min_len, max: max_frame });
    }

    let room = if tensor == Tensor::Follows { tensor_bytes } else { 0 };
    out.reserve(PREFIX_BYTES + ENVELOPE_BYTES + TYPICAL_HEADER_BYTES + room);
    let prefix_at = out.len();
    out.extend_from_slice(&[0; PREFIX_BYTES]); // patched once the length is known
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let header_len_at = out.len();
    out.extend_from_slice(&[0; 4]); // patched once the header is serialised

    let header_len = encode_header(header, out, limits.max_header_bytes).map_err(EncodeError::Header)?;
    let header_len = match u32::try_from(header_len) {
        Ok(len) if len <= limits.max_header_bytes => len,
        _ => return Err(EncodeError::HeaderTooLarge { len: header_len, max: limits.max_header_bytes }),
    };
    let len = min_len.saturating_add(u64::from(header_len));
    let len = match u32::try_from(len) {
        Ok(len) if len <= max_frame => len,
        _ => return Err(EncodeError::Oversize { len, max: max_frame }),
    };

    patch(out, prefix_at, len.to_le_bytes());
    patch(out, header_len_at, header_len.to_le_bytes());
    Ok(())
}

/// Appends the tensor as little-endian `f32` bytes: on a little-endian machine its memory,
/// copied once.
#[cfg(target_endian = "little")]
fn append_tensor(out: &mut Vec<u8>, tensor: &[f32]) {
    use zerocopy::IntoBytes;
    out.extend_from_slice(tensor.as_bytes());
}

/// Appends the tensor as little-endian `f32` bytes.
///
/// Zero-filling then overwriting in fixed 4-byte chunks lets the compiler vectorise the copy,
/// instead of a capacity check per element.
#[cfg(not(target_endian = "little"))]
fn append_tensor(out: &mut Vec<u8>, tensor: &[f32]) {
    let start = out.len();
    out.resize(start + std::mem::size_of_val(tensor), 0);
    for (bytes, value) in out[start..].chunks_exact_mut(F32_BYTES).zip(tensor) {
        bytes.copy_from_slice(&value.to_le_bytes());
    }
}

/// Overwrites `N` bytes of `out` at `at`, a position this module reserved earlier.
fn patch<const N: usize>(out: &mut [u8], at: usize, bytes: [u8; N]) {
    out[at..at + N].copy_from_slice(&bytes);
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
