//! Errors of the codec: one enum for encoding, one for decoding.

use std::sync::Arc;

/// Why a frame could not be built. The frame is not written; nothing about the connection is
/// wrong, but retrying the same message fails the same way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame would exceed [`Limits::max_frame_bytes`](super::Limits::max_frame_bytes).
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Bytes the frame would have after its length prefix (a lower bound when the tensor
        /// alone is too large and the header was never serialised).
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The header serialises to more than
    /// [`Limits::max_header_bytes`](super::Limits::max_header_bytes).
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge {
        /// Bytes the header serialises to.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// bincode refused to serialise the header (for example a sequence of unknown length).
    #[error("cannot encode header: {0}")]
    Header(bincode::error::EncodeError),
}

/// Why bytes from a peer are not a valid frame.
///
/// Every variant is fatal for the stream: the decoder that returned it is poisoned and the
/// connection should be closed with [`reason_code`](Self::reason_code) as the QUIC application
/// error code. Codec codes live in `0x100..0x200`, leaving other ranges to other layers.
///
/// | variant | code |
/// |---|---|
/// | [`Oversize`](Self::Oversize) | `0x101` |
/// | [`UnsupportedVersion`](Self::UnsupportedVersion) | `0x102` |
/// | [`HeaderTooLarge`](Self::HeaderTooLarge) | `0x103` |
/// | [`Truncated`](Self::Truncated) | `0x104` |
/// | [`BadTensorLength`](Self::BadTensorLength) | `0x105` |
/// | [`Header`](Self::Header) | `0x106` |
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more than
    /// [`Limits::max_frame_bytes`](super::Limits::max_frame_bytes); refused before any of the
    /// body is buffered.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversize {
        /// Bytes announced after the prefix.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The frame carries another protocol version.
    #[error("unsupported protocol version {found}, expected {supported}")]
    UnsupportedVersion {
        /// Version in the frame.
        found: u16,
        /// [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
        supported: u16,
    },
    /// The header length field exceeds
    /// [`Limits::max_header_bytes`](super::Limits::max_header_bytes).
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLarge {
        /// Header length announced by the frame.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The frame is shorter than its own fields say (shorter than the envelope, or a header
    /// length pointing past the end of the frame).
    #[error("frame truncated: needs {needed} bytes, has {available}")]
    Truncated {
        /// Bytes after the prefix that the fields require.
        needed: u64,
        /// Bytes after the prefix that the frame has.
        available: u64,
    },
    /// The tensor region is not a whole number of `f32`s.
    #[error("tensor region of {bytes} bytes is not a multiple of 4")]
    BadTensorLength {
        /// Bytes in the tensor region.
        bytes: u64,
    },
    /// The header region is not exactly one bincode encoding of the expected type: unknown
    /// enum variant, invalid data, a length beyond the region, or trailing bytes.
    #[error("invalid header: {0}")]
    Header(Arc<bincode::error::DecodeError>),
}

impl DecodeError {
    /// Close code of [`DecodeError::Oversize`].
    pub const CODE_OVERSIZE: u32 = 0x101;
    /// Close code of [`DecodeError::UnsupportedVersion`].
    pub const CODE_UNSUPPORTED_VERSION: u32 = 0x102;
    /// Close code of [`DecodeError::HeaderTooLarge`].
    pub const CODE_HEADER_TOO_LARGE: u32 = 0x103;
    /// Close code of [`DecodeError::Truncated`].
    pub const CODE_TRUNCATED: u32 = 0x104;
    /// Close code of [`DecodeError::BadTensorLength`].
    pub const CODE_BAD_TENSOR_LENGTH: u32 = 0x105;
    /// Close code of [`DecodeError::Header`].
    pub const CODE_HEADER: u32 = 0x106;

    /// Stable numeric code of this error, used as the QUIC application close code.
    ///
    /// ```
    /// use phalanx_transport::DecodeError;
    ///
    /// let err = DecodeError::UnsupportedVersion { found: 9, supported: 1 };
    /// assert_eq!(err.reason_code(), DecodeError::CODE_UNSUPPORTED_VERSION);
    /// ```
    pub const fn reason_code(&self) -> u32 {
        match self {
            Self::Oversize { .. } => Self::CODE_OVERSIZE,
            Self::UnsupportedVersion { .. } => Self::CODE_UNSUPPORTED_VERSION,
            Self::HeaderTooLarge { .. } => Self::CODE_HEADER_TOO_LARGE,
            Self::Truncated { .. } => Self::CODE_TRUNCATED,
            Self::BadTensorLength { .. } => Self::CODE_BAD_TENSOR_LENGTH,
            Self::Header(_) => Self::CODE_HEADER,
        }
    }
}

impl From<bincode::error::DecodeError> for DecodeError {
    fn from(err: bincode::error::DecodeError) -> Self {
        Self::Header(Arc::new(err))
    }
}
