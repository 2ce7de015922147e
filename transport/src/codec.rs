//! Sans-IO frame codec: a length prefix, a fixed envelope, a bincode-2 header and raw tensor bytes.
//!
//! [`encode`] / [`encode_into`] build a frame; [`FrameDecoder`] reassembles frames from a byte
//! stream and [`decode`] parses one frame whose length prefix was already removed. The layout is
//! drawn in the [crate docs](crate). Rules every decoder path applies, in this order:
//!
//! 1. the length prefix is at most [`Limits::max_frame_bytes`] (checked on the 4 prefix bytes,
//!    before any of the body is buffered or allocated);
//! 2. the version is [`PROTOCOL_VERSION`] (checked as soon as its 2 bytes arrive);
//! 3. the header length is at most [`Limits::max_header_bytes`] and fits inside the frame;
//! 4. the tensor region is a whole number of `f32`s;
//! 5. the header region is exactly one bincode-2 encoding of the expected header type.

mod decode;
mod encode;
mod error;
mod header;

#[cfg(test)]
mod tests;

pub(crate) use decode::check_envelope;
pub(crate) use decode::check_frame_start;
pub use decode::{check_frame, decode, decode_head, decode_parts, FrameDecoder, TensorAssembler};
pub use encode::{encode, encode_into, encode_parts};
pub use error::{DecodeError, EncodeError};

/// Version carried by every frame; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u16 = 8;

/// QUIC ALPN protocol id of Phalanx connections (`phalanx/<PROTOCOL_VERSION>`).
pub const ALPN: &[u8] = b"phalanx/8";

/// Bytes of the length prefix in front of every frame.
pub const PREFIX_BYTES: usize = 4;

/// Bytes of the fixed envelope after the prefix: version (`u16`) and header length (`u32`).
pub const ENVELOPE_BYTES: usize = 2 + 4;

/// Default for [`Limits::max_frame_bytes`]: 256 MiB, a 64 Mi-parameter `f32` tensor.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 256 * 1024 * 1024;

/// Default for [`Limits::max_header_bytes`]: 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Bytes of one tensor element on the wire.
const F32_BYTES: usize = 4;

/// Size limits, applied before any allocation sized by the peer's bytes.
///
/// Both sides of a connection should use the same limits: [`encode`] refuses to build a frame
/// the peer's decoder would refuse.
///
/// ```
/// use phalanx_transport::Limits;
///
/// // A control stream never carries tensors, so it can afford a much smaller limit.
/// let control = Limits { max_frame_bytes: 1024 * 1024, ..Limits::default() };
/// assert_eq!(control.max_header_bytes, 64 * 1024);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest value the length prefix may carry: bytes of a frame after its prefix
    /// (envelope, header and tensor).
    pub max_frame_bytes: u32,
    /// Largest header region, in bytes on the wire. Decoding one header allocates at most
    /// 64 × its region even if its length fields lie; values above 64 MiB are not useful.
    pub max_header_bytes: u32,
}

impl Limits {
    /// 256 MiB frames, 64 KiB headers.
    pub const DEFAULT: Limits =
        Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_header_bytes: DEFAULT_MAX_HEADER_BYTES };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One decoded frame: the message header and the tensor that followed it (empty if none).
#[derive(Clone, Debug, PartialEq)]
pub struct Frame<H> {
    /// The bincode-decoded header.
    pub header: H,
    /// The tensor, bit-exact as the sender had it (NaN payloads and `-0.0` included).
    pub tensor: Vec<f32>,
}
