//! The receiving rules for the bytes of one stream, applied to a whole stream at once: the
//! same checks, in the same order and with the same errors, as the QUIC transport's
//! `read_frame` applies while the bytes arrive (`endpoint/stream.rs`).

use crate::codec::{check_frame, PREFIX_BYTES};
use crate::{codes, DecodeError, Limits, PROTOCOL_VERSION};

/// Bytes of the version field at the start of a frame body.
const VERSION_BYTES: usize = 2;

/// Why a stream's bytes are not one valid frame: the close code and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Violation {
    pub(crate) code: u32,
    pub(crate) reason: String,
}

impl From<DecodeError> for Violation {
    fn from(err: DecodeError) -> Self {
        Self { code: err.reason_code(), reason: err.to_string() }
    }
}

/// The frame body (prefix removed) that `stream` carries, or the rule it breaks:
///
/// 1. at least a length prefix (else truncated);
/// 2. the prefix is at most `limits.max_frame_bytes` (oversize);
/// 3. the version, once two bytes of the body are there (unsupported version);
/// 4. as many body bytes as the prefix says (truncated);
/// 5. nothing after them ([`codes::STREAM_FRAMING`]);
/// 6. the envelope ([`check_frame`]).
pub(crate) fn read_stream<'a>(stream: &'a [u8], limits: &Limits) -> Result<&'a [u8], Violation> {
    let Some((prefix, rest)) = stream.split_first_chunk::<PREFIX_BYTES>() else {
        return Err(DecodeError::Truncated { needed: PREFIX_BYTES as u64, available: stream.len() as u64 }.into());
    };
    let announced = u32::from_le_bytes(*prefix);
    if announced > limits.max_frame_bytes {
        return Err(DecodeError::Oversize { len: u64::from(announced), max: limits.max_frame_bytes }.into());
    }
    let len = usize::try_from(announced)
        .map_err(|_| DecodeError::Oversize { len: u64::from(announced), max: limits.max_frame_bytes })?;
    // The QUIC reader never reads past the announced length, so it checks the version of
    // those bytes only.
    let body = &rest[..rest.len().min(len)];
    if let Some(version) = body.first_chunk::<VERSION_BYTES>().map(|v| u16::from_le_bytes(*v)) {
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version, supported: PROTOCOL_VERSION }.into());
        }
    }
    if body.len() < len {
        return Err(DecodeError::Truncated { needed: len as u64, available: body.len() as u64 }.into());
    }
    if rest.len() > len {
        return Err(Violation {
            code: codes::STREAM_FRAMING,
            reason: "stream carries bytes after its frame".to_owned(),
        });
    }
    check_frame(body, limits)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    fn limits() -> Limits {
        Limits { max_frame_bytes: 1024, ..Limits::default() }
    }

    fn code(stream: &[u8]) -> u32 {
        read_stream(stream, &limits()).expect_err("a violation").code
    }

    #[test]
    fn a_whole_frame_is_its_body() {
        let wire = encode(&"header", &[1.0, 2.0], &limits()).unwrap();
        assert_eq!(read_stream(&wire, &limits()).unwrap(), &wire[PREFIX_BYTES..]);
    }

    #[test]
    fn each_rule_has_the_codec_code() {
        let wire = encode(&"header", &[1.0], &limits()).unwrap();
        assert_eq!(code(&wire[..3]), DecodeError::CODE_TRUNCATED);
        assert_eq!(code(&[&1025u32.to_le_bytes()[..], &[0; 8]].concat()), DecodeError::CODE_OVERSIZE);
        let mut foreign = wire.clone();
        foreign[PREFIX_BYTES] = 9;
        assert_eq!(code(&foreign), DecodeError::CODE_UNSUPPORTED_VERSION);
        // A foreign version is refused from its first bytes, even if the rest never came.
        assert_eq!(code(&foreign[..PREFIX_BYTES + 2]), DecodeError::CODE_UNSUPPORTED_VERSION);
        assert_eq!(code(&wire[..wire.len() - 1]), DecodeError::CODE_TRUNCATED);
        assert_eq!(code(&[&wire[..], &[0]].concat()), codes::STREAM_FRAMING);
        // A tensor region that is not a whole number of f32s, with a consistent prefix.
        let mut odd = wire.clone();
        odd.push(0);
        let len = (odd.len() - PREFIX_BYTES) as u32;
        odd[..PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
        assert_eq!(code(&odd), DecodeError::CODE_BAD_TENSOR_LENGTH);
    }
}
