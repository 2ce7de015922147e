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

/// bincode charges its limit with the in-memory size of every value it decodes: up to 16 bytes
/// (a `u128`) for a single varint byte. An honest header therefore needs a budget of this many
/// times its wire bytes.
const CLAIM_BYTES_PER_WIRE_BYTE: usize = 16;

/// Budgets bincode may be given, smallest first; each is a const generic instantiation.
const CLAIM_LIMIT_RUNGS: [usize; 11] =
    [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28, 1 << 30];

/// The bincode limit used for a header region of `region_bytes`: the first rung covering
/// 16 × the region, capped at 1 GiB (so headers above 64 MiB may be refused; nobody needs them).
///
/// That is also the most a lying `String` length can make the decoder allocate: at most
/// 64 × the header bytes actually received (4 MiB for a 64 KiB header), never more than 1 GiB.
pub(super) fn claim_limit(region_bytes: usize) -> usize {
    let needed = region_bytes.saturating_mul(CLAIM_BYTES_PER_WIRE_BYTE);
    let top = CLAIM_LIMIT_RUNGS[CLAIM_LIMIT_RUNGS.len() - 1];
    CLAIM_LIMIT_RUNGS.into_iter().find(|&rung| rung >= needed).unwrap_or(top)
}

/// Runs bincode with a byte limit that scales with the header region.
///
/// bincode allocates a `String` or byte buffer at the length its prefix claims before reading
/// the bytes; only its limit stops a lying length. The limit is a const generic (and bincode's
/// `Decoder` trait is sealed, so no runtime limit can be plugged in), hence a ladder of
/// instantiations chosen by [`claim_limit`]. Sequences go through serde, which caps a lying
/// length's preallocation at 1 MiB per sequence on its own.
fn decode_limited<H: DeserializeOwned>(bytes: &[u8]) -> Result<(H, usize), DecodeError> {
    macro_rules! ladder {
        ($($rung:literal),+) => {{
            let limit = claim_limit(bytes.len());
            $(
                if limit == $rung {
                    let config = config::standard().with_limit::<{ $rung }>();
                    return bincode::serde::decode_from_slice(bytes, config);
                }
            )+
            Err(DecodeError::Other("no bincode limit covers this header"))
        }};
    }
    ladder!(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864, 268435456, 1073741824)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_claim_limit_rung_has_an_instantiation() {
        // The ladder! literals must match CLAIM_LIMIT_RUNGS exactly, or some region sizes
        // would fall through to the error.
        for rung in CLAIM_LIMIT_RUNGS {
            let region = vec![0u8; rung / CLAIM_BYTES_PER_WIRE_BYTE];
            assert_eq!(claim_limit(region.len()), rung);
            // Zeros decode as a u8 (the rest is left unread): the point is that this rung
            // has an instantiation rather than falling through to the error.
            let decoded = decode_limited::<u8>(&region);
            assert!(matches!(decoded, Ok((0, 1))), "rung {rung}: {decoded:?}");
        }
        assert_eq!(claim_limit(0), 1024);
        assert_eq!(claim_limit(65), 4096);
        assert_eq!(claim_limit(usize::MAX), 1 << 30);
    }

    #[test]
    fn honest_headers_of_wide_integers_fit_the_budget() {
        // 64 one-byte varint u128s claim 16 bytes each, the worst honest ratio, and exactly
        // fill the smallest rung.
        let header = ([1u128; 32], [2u128; 32]);
        let bytes = bincode::serde::encode_to_vec(header, config::standard()).expect("encodable");
        assert_eq!(bytes.len(), 64);
        assert_eq!(claim_limit(bytes.len()), 1024);
        let (decoded, read) = decode_limited::<([u128; 32], [u128; 32])>(&bytes).expect("within budget");
        assert_eq!((decoded, read), (header, 64));
    }
}
