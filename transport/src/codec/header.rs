//! The header region: bincode 2 (`config::standard()`: little-endian, varint integers) with
//! byte limits on both sides.

use bincode::config;
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Serialises `header` at the end of `out` and returns its length in bytes.
///
/// At most `max_bytes` are appended: past that the writer keeps counting without storing,
/// so a too-large header costs no memory yet still reports its real size.
pub(super) fn encode_header<H: Serialize + ?Sized>(
    header: &H,
    out: &mut Vec<u8>,
    max_bytes: u32,
) -> Result<u64, EncodeError> {
    let mut writer = BoundedWriter { out, written: 0, max: u64::from(max_bytes) };
    bincode::serde::encode_into_writer(header, &mut writer, config::standard())?;
    Ok(writer.written)
}

/// Appends to a `Vec` until `max` bytes, then only counts.
struct BoundedWriter<'a> {
    out: &'a mut Vec<u8>,
    written: u64,
    max: u64,
}

impl Writer for BoundedWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.written = self.written.saturating_add(len);
        if self.written <= self.max {
            self.out.extend_from_slice(bytes);
        }
        Ok(())
    }
}

/// Decodes exactly one `H` from the whole of `bytes`; trailing bytes are an error because a
/// sender of this version never writes them, so they mean corruption or a foreign encoder.
pub(super) fn decode_header<H: DeserializeOwned>(bytes: &[u8]) -> Result<H, DecodeError> {
    let (header, read) = decode_limited(bytes)?;
    match bytes.len().checked_sub(read) {
        Some(0) => Ok(header),
        Some(trailing) => Err(DecodeError::OtherString(format!("{trailing} trailing bytes after the header"))),
        None => Err(DecodeError::Other("header decoder read past its region")),
    }
}

/// Runs bincode with a byte limit that scales with the header region.
///
/// bincode allocates a `String` or byte buffer at the length its prefix claims before reading
/// the bytes; only its limit stops a lying length. The limit is a const generic, so we pick
/// from a ladder of powers of four the first rung covering the region: a claim can then be at
/// most 4 × the header bytes actually present, whatever `max_header_bytes` is. Honest headers
/// never reach it because bincode only charges the limit for such buffers, whose bytes are in
/// the region. (Sequences go through serde, which caps a lying length's preallocation at
/// 1 MiB per sequence on its own.)
fn decode_limited<H: DeserializeOwned>(bytes: &[u8]) -> Result<(H, usize), DecodeError> {
    macro_rules! ladder {
        ($($limit:expr),+ ; $last:expr) => {{
            $(
                if bytes.len() <= $limit {
                    let config = config::standard().with_limit::<{ $limit }>();
                    return bincode::serde::decode_from_slice(bytes, config);
                }
            )+
            let config = config::standard().with_limit::<{ $last }>();
            bincode::serde::decode_from_slice(bytes, config)
        }};
    }
    ladder!(
        1 << 6, 1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22,
        1 << 24, 1 << 26, 1 << 28, 1 << 30;
        u32::MAX as usize
    )
}
