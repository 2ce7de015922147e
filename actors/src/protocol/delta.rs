//! A version of a parameter range as the XOR with the version before it: how θ crosses the
//! wire to a node that holds the previous version.
//!
//! An SGD step moves each weight by a tiny fraction of itself, so two consecutive versions of a
//! weight share their sign, exponent and high mantissa bits: the XOR of their bit patterns is
//! mostly zero bytes at the top. The code keeps, per block of [`BLOCK`] values, only as many
//! low bytes of each XOR as the block's largest needs:
//!
//! ```text
//!  block i:  [width w ∈ 0..=4] [w low bytes of x₀] [w low bytes of x₁] … [w low bytes of x₇]
//!            xⱼ = bits(newⱼ) ^ bits(baseⱼ)   (little-endian; the last block may be shorter)
//! ```
//!
//! It is exact: decoding gives every value bit for bit (NaN payloads and `-0.0` included),
//! whatever the values — a block whose values changed wholesale costs 4 bytes a value and one
//! byte more, and a sender that finds the code no smaller than the values sends the values
//! ([`encode`] returns `None`). On the 1.2 M-parameter MLP of the benchmark a version takes
//! 0.43–0.46 of its bytes this way.
//!
//! The decoder also checks that it XORs against the same base the sender did: the code carries
//! a 64-bit hash of the base's bits ([`Coded::base_check`]), which the receiver recomputes from
//! its own copy while it decodes; a different base (a bug, or a version the receiver holds
//! under the same number from an earlier life) is refused, never decoded into wrong weights.

use std::fmt;

/// Values per block (one width byte each).
pub const BLOCK: usize = 8;

/// The largest range whose new versions are coded (16 KiB of values): an aggregator offers a
/// base with a new version only up to here.
///
/// Coding costs CPU on both sides (about 0.7 ns a value to encode, once per version, and 0.8 ns
/// to decode, on every receiving node) to save bytes, and what a byte saved is worth depends on
/// the link. Measured on loopback, where a byte costs only the CPU that copies and seals it
/// (alternating runs, in-run ms/step, same model bits): a small range is a packet or a few,
/// whose headers are a visible share and whose coding takes microseconds — at 1,158
/// parameters (ranges of 579 and 386 values) the bytes per node and step fell from 1.08 / 1.47
/// to 0.97 / 1.34 × the model at 2 / 3 nodes, the step time unchanged (0.16 / 0.25 ms). Above
/// it the CPU outweighs the bytes: ranges of 36,867 values (73,734 parameters on 2 nodes)
/// 0.62 → 0.69 ms a step, 4 of 4 pairs slower; 393,218 (1.2 M on 3 nodes) 13.6 → 14.2 ms.
pub const CODED_RANGE_VALUES: usize = 4096;

/// Values decoded per pass: the base's values are read into a buffer of this many (from a
/// received tensor's chunks, if that is what the receiver holds) and XORed there, in L1.
const PASS: usize = 1024;

/// The largest code of `len` values: 4 bytes a value and a width byte per block.
pub fn max_coded_bytes(len: usize) -> usize {
    len * 4 + len.div_ceil(BLOCK)
}

/// A range coded against its base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coded {
    /// The code.
    pub bytes: Vec<u8>,
    /// [`base_check`] of the base it was coded against.
    pub base_check: u64,
}

/// Why a code did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A width byte above 4.
    #[error("block {block} has width {width} (at most 4 bytes a value)")]
    BadWidth {
        /// The block.
        block: usize,
        /// Its width byte.
        width: u8,
    },
    /// The code ends inside block `block`.
    #[error("the code ends inside block {block} ({len} values need more than its {bytes} bytes)")]
    Truncated {
        /// The block.
        block: usize,
        /// Values of the range.
        len: usize,
        /// Bytes of the code.
        bytes: usize,
    },
    /// Bytes are left after the last block.
    #[error("{extra} bytes after the last block")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// The receiver's base is not the one the sender coded against.
    #[error("coded against another version of the base (check {expected:#018x}, the base held here {found:#018x})")]
    OtherBase {
        /// The sender's check.
        expected: u64,
        /// This base's.
        found: u64,
    },
}

/// Per-lane FNV-1a over 32-bit words: lane `j` takes words `j, j + 8, …`; eight independent
/// lanes keep the multiply off the critical path.
#[derive(Clone, Copy)]
struct Check([u64; BLOCK]);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Check {
    fn new() -> Self {
        Self([FNV_OFFSET; BLOCK])
    }

    #[inline(always)]
    fn add(&mut self, words: &[u32]) {
        for (lane, w) in self.0.iter_mut().zip(words) {
            *lane = (*lane ^ u64::from(*w)).wrapping_mul(FNV_PRIME);
        }
    }

    fn finish(self, len: usize) -> u64 {
        self.0.iter().fold(FNV_OFFSET ^ len as u64, |h, lane| (h ^ lane).wrapping_mul(FNV_PRIME))
    }
}

/// The hash of `values`' bits that a code carries for its base.
pub fn base_check(values: &[f32]) -> u64 {
    let mut check = Check::new();
    let mut words = [0u32; BLOCK];
    for block in values.chunks(BLOCK) {
        for (w, v) in words.iter_mut().zip(block) {
            *w = v.to_bits();
        }
        check.add(&words[..block.len()]);
    }
    check.finish(values.len())
}

/// Bytes needed for the low part of `x` that is not zero.
/// Bytes needed for the low part of `x` that is not zero.
#[inline(always)]
fn width_of(x: u32) -> usize {
    (32 - x.leading_zeros() as usize).div_ceil(8).min(4)
}

/// The low `w` bytes of a word, by width.
const MASKS: [u32; 5] = [0, 0xff, 0xffff, 0xff_ffff, u32::MAX];

/// Bytes after a block that its stores and loads may touch: every value is moved as a whole
/// 4-byte word, `w` bytes apart (the next value's store overwrites the extra bytes).
const SLACK: usize = 3;

/// Bytes a block's stores and loads may touch: its width byte, 8 values of 4 bytes, the slack.
const BLOCK_ROOM: usize = 1 + 4 * BLOCK + SLACK;

/// Writes the block of the XORs `xs` (the first `len` of them count; the others are zero) into
/// `block`: its width byte and `len` words of that width (and spill into the slack); returns
/// the bytes of the block.
#[inline(always)]
fn put_block(block: &mut [u8; BLOCK_ROOM], xs: &[u32; BLOCK], len: usize) -> usize {
    let width = width_of(xs.iter().fold(0, |any, x| any | x));
    block[0] = width as u8;
    for (j, x) in xs.iter().enumerate() {
        let from = 1 + j * width;
        block[from..from + 4].copy_from_slice(&x.to_le_bytes());
    }
    1 + len * width
}

/// `new` coded against `base` (same length), or `None` when the code would be no smaller
/// than `new`'s own bytes.
///
/// # Panics
/// If the lengths differ.
pub fn encode(new: &[f32], base: &[f32]) -> Option<Coded> {
    assert_eq!(new.len(), base.len(), "coding a range against a base of another length");
    let limit = new.len() * 4;
    // Written in place; every byte up to the end of the code is written by its own block
    // last (a block's spill past its end is overwritten by the blocks after it).
    let mut out = vec![0u8; max_coded_bytes(new.len()) + BLOCK_ROOM];
    let mut at = 0;
    let mut check = Check::new();
    let (whole, tail) = new.split_at(new.len() - new.len() % BLOCK);
    for (n, b) in whole.chunks_exact(BLOCK).zip(base.chunks_exact(BLOCK)) {
        let mut bases = [0u32; BLOCK];
        let mut xs = [0u32; BLOCK];
        for j in 0..BLOCK {
            bases[j] = b[j].to_bits();
            xs[j] = n[j].to_bits() ^ bases[j];
        }
        check.add(&bases);
        let block: &mut [u8; BLOCK_ROOM] = (&mut out[at..at + BLOCK_ROOM]).try_into().expect("room for a block");
        at += put_block(block, &xs, BLOCK);
        if at >= limit {
            return None;
        }
    }
    if !tail.is_empty() {
        let mut bases = [0u32; BLOCK];
        let mut xs = [0u32; BLOCK];
        for (j, (n, b)) in tail.iter().zip(&base[whole.len()..]).enumerate() {
            bases[j] = b.to_bits();
            xs[j] = n.to_bits() ^ bases[j];
        }
        check.add(&bases[..tail.len()]);
        let block: &mut [u8; BLOCK_ROOM] = (&mut out[at..at + BLOCK_ROOM]).try_into().expect("room for a block");
        at += put_block(block, &xs, tail.len());
        if at >= limit {
            return None;
        }
    }
    out.truncate(at);
    Some(Coded { bytes: out, base_check: check.finish(new.len()) })
}

/// XORs the [`BLOCK`] coded words of the block `code` holds (its width byte first, then the
/// words and the slack) into `values`.
#[inline(always)]
fn xor_block(values: &mut [f32; BLOCK], code: &[u8; BLOCK_ROOM]) {
    let width = usize::from(code[0]).min(4);
    let mask = MASKS[width];
    for (j, v) in values.iter_mut().enumerate() {
        let from = 1 + j * width;
        let word = u32::from_le_bytes([code[from], code[from + 1], code[from + 2], code[from + 3]]);
        *v = f32::from_bits(v.to_bits() ^ (word & mask));
    }
}

/// Why a block could not be read.
enum BlockError {
    /// The code ended.
    Truncated,
    /// Its width byte.
    Width(u8),
}

/// The code's bytes left: the rest of the current chunk and the chunks after it.
struct Code<'c, I> {
    chunk: &'c [u8],
    parts: I,
    /// Bytes read so far.
    read: usize,
}

impl<'c, I: Iterator<Item = &'c [u8]>> Code<'c, I> {
    /// The next block of `n` values, [`BLOCK_ROOM`] bytes readable from its width byte on: in
    /// place when its chunk holds them, else gathered into `scratch` (zeros after the block).
    #[inline(always)]
    fn block<'s>(&mut self, n: usize, scratch: &'s mut [u8; BLOCK_ROOM]) -> Result<&'s [u8; BLOCK_ROOM], BlockError>
    where
        'c: 's,
    {
        if let Some(code) = self.chunk.first_chunk::<BLOCK_ROOM>() {
            let width = code[0];
            if width > 4 {
                return Err(BlockError::Width(width));
            }
            let len = 1 + n * usize::from(width);
            self.chunk = &self.chunk[len..];
            self.read += len;
            return Ok(code);
        }
        let mut need = 1;
        let mut got = 0;
        while got < need {
            if self.chunk.is_empty() {
                self.chunk = self.parts.next().ok_or(BlockError::Truncated)?;
                continue;
            }
            let take = self.chunk.len().min(need - got);
            scratch[got..got + take].copy_from_slice(&self.chunk[..take]);
            self.chunk = &self.chunk[take..];
            got += take;
            if got == 1 {
                if scratch[0] > 4 {
                    return Err(BlockError::Width(scratch[0]));
                }
                need = 1 + n * usize::from(scratch[0]);
            }
        }
        scratch[need..].fill(0);
        self.read += need;
        Ok(scratch)
    }

    /// Bytes not read.
    fn rest(self) -> usize {
        self.chunk.len() + self.parts.map(<[u8]>::len).sum::<usize>()
    }
}

/// Decodes `bytes` bytes of a code of `len` values, held in `chunks` (more bytes may follow:
/// padding), against `base` (`len` values, read with `base(at, out)` a pass at a time), and
/// appends the values to `out`.
pub fn decode<B: AsRef<[u8]>>(
    chunks: &[B],
    bytes: usize,
    base_check: u64,
    len: usize,
    base: impl Fn(usize, &mut [f32]),
    out: &mut Vec<f32>,
) -> Result<(), DeltaError> {
    // The code's bytes chunk by chunk, cut at `bytes`.
    let parts = chunks.iter().map(AsRef::as_ref).scan(bytes, |left, c: &[u8]| {
        let c = &c[..c.len().min(*left)];
        *left -= c.len();
        Some(c)
    });
    let mut code = Code { chunk: &[], parts, read: 0 };
    out.reserve(len);
    let mut check = Check::new();
    let mut pass = [0f32; PASS];
    let mut scratch = [0u8; BLOCK_ROOM];
    let mut block = 0;
    let mut step = |values: &mut [f32; BLOCK], n: usize| -> Result<(), DeltaError> {
        let mut words = [0u32; BLOCK];
        for (w, v) in words.iter_mut().zip(values.iter()) {
            *w = v.to_bits();
        }
        check.add(&words[..n]);
        match code.block(n, &mut scratch) {
            Ok(bytes) => xor_block(values, bytes),
            Err(BlockError::Truncated) => return Err(DeltaError::Truncated { block, len, bytes }),
            Err(BlockError::Width(width)) => return Err(DeltaError::BadWidth { block, width }),
        }
        block += 1;
        Ok(())
    };
    for at in (0..len).step_by(PASS) {
        let pass = &mut pass[..PASS.min(len - at)];
        base(at, pass);
        let whole = pass.len() - pass.len() % BLOCK;
        let (blocks, tail) = pass.split_at_mut(whole);
        for values in blocks.chunks_exact_mut(BLOCK) {
            step(values.try_into().expect("a whole block"), BLOCK)?;
        }
        if !tail.is_empty() {
            let mut padded = [0f32; BLOCK];
            padded[..tail.len()].copy_from_slice(tail);
            step(&mut padded, tail.len())?;
            tail.copy_from_slice(&padded[..tail.len()]);
        }
        out.extend_from_slice(pass);
    }
    let read = code.read;
    let rest = code.rest();
    if read + rest < bytes {
        return Err(DeltaError::Truncated { block, len, bytes });
    }
    if rest > 0 {
        return Err(DeltaError::Trailing { extra: rest });
    }
    let found = check.finish(len);
    if found != base_check {
        return Err(DeltaError::OtherBase { expected: base_check, found });
    }
    Ok(())
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} coded bytes", self.bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_whole(coded: &Coded, base: &[f32], cuts: &[usize]) -> Result<Vec<f32>, DeltaError> {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().map(|c| c % (coded.bytes.len() + 1)));
        bounds.sort_unstable();
        bounds.push(coded.bytes.len());
        let chunks: Vec<&[u8]> = bounds.windows(2).map(|w| &coded.bytes[w[0]..w[1]]).collect();
        let mut out = Vec::new();
        decode(
            &chunks,
            coded.bytes.len(),
            coded.base_check,
            base.len(),
            |at, o| o.copy_from_slice(&base[at..at + o.len()]),
            &mut out,
        )?;
        Ok(out)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// An SGD-like step: each value moves by a tiny fraction.
    fn step(base: &[f32], seed: u32) -> Vec<f32> {
        base.iter()
            .enumerate()
            .map(|(i, v)| v - v * 1e-6 * (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 7) as f32)
            .collect()
    }

    #[test]
    fn a_small_step_codes_to_well_under_half_the_bytes_and_decodes_bit_for_bit() {
        let base: Vec<f32> = (0..10_003).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
        let new = step(&base, 9);
        let coded = encode(&new, &base).expect("smaller than the values");
        assert!(coded.bytes.len() * 2 < new.len() * 4, "{} bytes for {} values", coded.bytes.len(), new.len());
        for cuts in [vec![], vec![1], vec![7, 8, 9, 1000], vec![3, 4, 5, 6, 7, 8, 9, 10, 11]] {
            assert_eq!(bits(&decode_whole(&coded, &base, &cuts).unwrap()), bits(&new));
        }
    }

    #[test]
    fn identical_versions_cost_a_byte_per_block() {
        let base = vec![1.5f32; 20];
        let coded = encode(&base, &base).unwrap();
        assert_eq!(coded.bytes, vec![0, 0, 0]);
        assert_eq!(decode_whole(&coded, &base, &[]).unwrap(), base);
    }

    #[test]
    fn unrelated_values_are_sent_as_they_are() {
        let base: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let new: Vec<f32> = (0..64).map(|i| -(i as f32) - 0.123).collect();
        assert_eq!(encode(&new, &base), None);
    }

    #[test]
    fn garbage_is_refused_with_the_block_it_broke_in() {
        let base: Vec<f32> = (0..20).map(|i| i as f32 * 0.25).collect();
        let new = step(&base, 3);
        let coded = encode(&new, &base).unwrap();
        let mut wide = coded.clone();
        wide.bytes[0] = 5;
        assert_eq!(decode_whole(&wide, &base, &[]), Err(DeltaError::BadWidth { block: 0, width: 5 }));
        let mut short = coded.clone();
        short.bytes.pop();
        assert!(matches!(decode_whole(&short, &base, &[]), Err(DeltaError::Truncated { block: 2, .. })));
        let mut long = coded.clone();
        long.bytes.extend([0, 0]);
        assert_eq!(decode_whole(&long, &base, &[]), Err(DeltaError::Trailing { extra: 2 }));
        let mut other = base.clone();
        other[13] = f32::from_bits(other[13].to_bits() ^ 1);
        assert!(matches!(decode_whole(&coded, &other, &[]), Err(DeltaError::OtherBase { .. })));
        // Claiming more bytes than arrived.
        let mut out = Vec::new();
        let err = decode(&[&coded.bytes[..]], coded.bytes.len() + 4, coded.base_check, 20, |_, _| {}, &mut out);
        assert!(matches!(err, Err(DeltaError::Truncated { .. })), "{err:?}");
    }

    proptest! {
        #[test]
        fn any_two_versions_round_trip_bit_for_bit(
            pairs in proptest::collection::vec((any::<u32>(), any::<u32>(), 0u32..4), 0..200),
            cuts in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            // Each value: a random base, and a new value that differs in 0–4 of its low bytes
            // or (mode 3) anywhere — NaNs, infinities and -0.0 come up as bit patterns.
            let base: Vec<f32> = pairs.iter().map(|(b, _, _)| f32::from_bits(*b)).collect();
            let new: Vec<f32> = pairs.iter().map(|(b, d, mode)| {
                let mask = match mode { 0 => 0, 1 => 0xff, 2 => 0xffff, _ => u32::MAX };
                f32::from_bits(b ^ (d & mask))
            }).collect();
            match encode(&new, &base) {
                Some(coded) => {
                    prop_assert!(coded.bytes.len() < new.len() * 4 || new.is_empty());
                    prop_assert!(coded.bytes.len() <= max_coded_bytes(new.len()));
                    prop_assert_eq!(bits(&decode_whole(&coded, &base, &cuts).unwrap()), bits(&new));
                }
                None => prop_assert!(!new.is_empty()),
            }
        }
    }
}

#[cfg(test)]
mod speed_tmp {
    #[test]
    #[ignore]
    fn speed() {
        let n = 400_000;
        let base: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
        let new: Vec<f32> = base.iter().enumerate().map(|(i, v)| v - v * 3e-7 * ((i % 7) as f32)).collect();
        let t = std::time::Instant::now();
        let mut c = None;
        for _ in 0..50 {
            c = super::encode(&new, &base);
        }
        let enc = t.elapsed() / 50;
        let c = c.unwrap();
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        for _ in 0..50 {
            out.clear();
            super::decode(
                &[&c.bytes[..]],
                c.bytes.len(),
                c.base_check,
                n,
                |at, o| o.copy_from_slice(&base[at..at + o.len()]),
                &mut out,
            )
            .unwrap();
        }
        let dec = t.elapsed() / 50;
        let t = std::time::Instant::now();
        for _ in 0..50 {
            out.clear();
            out.extend_from_slice(&new);
        }
        let cp = t.elapsed() / 50;
        eprintln!("ratio {:.3} encode {enc:?} decode {dec:?} copy {cp:?}", c.bytes.len() as f64 / (4 * n) as f64);
    }
}
