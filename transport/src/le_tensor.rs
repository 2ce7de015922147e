//! A received tensor as QUIC delivered it: its little-endian bytes in the chunks they arrived
//! in, not copied into values.
//!
//! Reading a tensor into a `Vec<f32>` is a copy of every received byte, and the receiver then
//! often copies the values once more (a trainer into the block of weights it computes on, an
//! aggregator into a sum). [`LeTensor`] skips the first: the receiver reads the values out of
//! the chunks where it needs them ([`copy_to`](LeTensor::copy_to)), or joins them
//! ([`to_vec`](LeTensor::to_vec)) when it needs them in one piece. A value may lie across two
//! chunks; every read gives the values bit for bit (NaN payloads included).

use std::fmt;

use bytes::{Bytes, BytesMut};
#[cfg(target_endian = "little")]
use zerocopy::IntoBytes;

/// A tensor's values as little-endian `f32` bytes in chunks. Cloning shares the chunks.
///
/// ```
/// use bytes::Bytes;
/// use phalanx_transport::LeTensor;
///
/// let bytes: Vec<u8> = [1.5f32, -2.0, 3.25].iter().flat_map(|v| v.to_le_bytes()).collect();
/// // Cut inside the second value, as QUIC may deliver it.
/// let tensor = LeTensor::from_chunks(vec![Bytes::copy_from_slice(&bytes[..6]), Bytes::copy_from_slice(&bytes[6..])])
///     .expect("a whole number of values");
/// assert_eq!(tensor.len(), 3);
/// let mut out = [0.0f32; 2];
/// tensor.copy_to(1, &mut out);
/// assert_eq!(out, [-2.0, 3.25]);
/// assert_eq!(tensor.to_vec(), vec![1.5, -2.0, 3.25]);
/// ```
#[derive(Clone, Default)]
pub struct LeTensor {
    chunks: Vec<Bytes>,
    /// Byte offset where each chunk starts, then the total.
    starts: Vec<usize>,
}

impl LeTensor {
    /// The tensor made of `chunks` in order (empty ones are dropped); `None` unless they hold a
    /// whole number of values.
    pub fn from_chunks(chunks: Vec<Bytes>) -> Option<Self> {
        let chunks: Vec<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut at = 0;
        starts.push(at);
        for chunk in &chunks {
            at += chunk.len();
            starts.push(at);
        }
        (at % 4 == 0).then_some(Self { chunks, starts })
    }

    /// The tensor of `values` (taken over; no copy on a little-endian machine).
    pub fn from_values(values: Vec<f32>) -> Self {
        let bytes = crate::frame::TensorBytes::owned(values).into_bytes();
        Self::from_chunks(vec![bytes]).expect("4 bytes per value")
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.byte_len() / 4
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.byte_len() == 0
    }

    /// Number of bytes.
    pub fn byte_len(&self) -> usize {
        // Empty for the default tensor, which has no chunks.
        self.starts.last().copied().unwrap_or(0)
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// Values `range`, sharing the chunks (no copy).
    ///
    /// # Panics
    /// If `range` is not inside `0..len()`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.len(), "values {range:?} of {}", self.len());
        let (from, to) = (range.start * 4, range.end * 4);
        let mut chunks = Vec::new();
        for (chunk, &start) in self.chunks.iter().zip(&self.starts) {
            let end = start + chunk.len();
            if end <= from || start >= to {
                continue;
            }
            chunks.push(chunk.slice(from.max(start) - start..to.min(end) - start));
        }
        Self::from_chunks(chunks).expect("whole values")
    }

    /// Copies values `at..at + out.len()` into `out`, bit for bit.
    ///
    /// # Panics
    /// If the range is not inside `0..len()`.
    pub fn copy_to(&self, at: usize, out: &mut [f32]) {
        let end = at + out.len();
        assert!(end <= self.len(), "values {at}..{end} of {}", self.len());
        if out.is_empty() {
            return;
        }
        #[cfg(target_endian = "little")]
        self.copy_bytes(at * 4, out.as_mut_bytes());
        #[cfg(not(target_endian = "little"))]
        {
            let mut bytes = vec![0u8; out.len() * 4];
            self.copy_bytes(at * 4, &mut bytes);
            for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }

    /// The values in one vector (a copy).
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.copy_to(0, &mut out);
        out
    }

    /// Copies bytes `from..from + out.len()` into `out`.
    fn copy_bytes(&self, from: usize, mut out: &mut [u8]) {
        // The chunk holding byte `from`: the last one starting at or before it.
        let mut i = self.starts[1..].partition_point(|&end| end <= from);
        let mut pos = from;
        while !out.is_empty() {
            let chunk = &self.chunks[i];
            let skip = pos - self.starts[i];
            let take = (chunk.len() - skip).min(out.len());
            let (head, rest) = out.split_at_mut(take);
            head.copy_from_slice(&chunk[skip..skip + take]);
            out = rest;
            pos += take;
            i += 1;
        }
    }
}

/// Chunks at least this long are kept as QUIC delivered them; shorter ones are copied together.
pub(crate) const MIN_SHARED_CHUNK: usize = 1024;

/// Collects a tensor's chunks as they arrive. A chunk of at least [`MIN_SHARED_CHUNK`] bytes is
/// kept as it is (shared with QUIC's buffer); shorter ones are copied together into a buffer of
/// their own. So a tensor holds at most about one chunk handle per `MIN_SHARED_CHUNK / 2`
/// bytes whatever the peer does: one that sends its tensor in tiny STREAM frames costs a copy,
/// not a 32-byte handle per byte.
#[derive(Default)]
pub(crate) struct ChunkCollector {
    chunks: Vec<Bytes>,
    small: BytesMut,
    bytes: usize,
}

impl ChunkCollector {
    /// Takes the next chunk.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        self.bytes += chunk.len();
        if chunk.len() >= MIN_SHARED_CHUNK {
            self.flush();
            self.chunks.push(chunk);
        } else {
            self.small.extend_from_slice(&chunk);
            if self.small.len() >= MIN_SHARED_CHUNK {
                self.flush();
            }
        }
    }

    /// Bytes taken so far.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The tensor; `None` unless the bytes are a whole number of values.
    pub(crate) fn finish(mut self) -> Option<LeTensor> {
        self.flush();
        LeTensor::from_chunks(self.chunks)
    }

    fn flush(&mut self) {
        if !self.small.is_empty() {
            self.chunks.push(self.small.split().freeze());
        }
    }
}

impl fmt::Debug for LeTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeTensor({} values in {} chunks)", self.len(), self.chunks.len())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{ChunkCollector, LeTensor, MIN_SHARED_CHUNK};

    fn cut(values: &[f32], at: &[usize]) -> LeTensor {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bounds = vec![0];
        bounds.extend_from_slice(at);
        bounds.push(bytes.len());
        LeTensor::from_chunks(bounds.windows(2).map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]])).collect())
            .expect("whole values")
    }

    /// Every range of a tensor cut anywhere (inside values, between them, with empty chunks)
    /// reads the values bit for bit, copied or sliced.
    #[test]
    fn every_range_of_every_cut_reads_the_values_bit_for_bit() {
        let values = [1.0f32, -0.0, f32::from_bits(0x7fc0_1234), f32::MIN_POSITIVE, -3.5, 1e30];
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for at in [&[][..], &[1], &[4, 4, 5], &[3, 7, 13, 22], &[24]] {
            let t = cut(&values, at);
            assert_eq!(t.len(), values.len());
            assert_eq!(bits(&t.to_vec()), bits(&values), "cut {at:?}");
            for a in 0..=values.len() {
                for b in a..=values.len() {
                    let mut out = vec![f32::NAN; b - a];
                    t.copy_to(a, &mut out);
                    assert_eq!(bits(&out), bits(&values[a..b]), "cut {at:?}, {a}..{b}");
                    assert_eq!(bits(&t.slice(a..b).to_vec()), bits(&values[a..b]), "cut {at:?}, slice {a}..{b}");
                }
            }
        }
        assert_eq!(bits(&LeTensor::from_values(values.to_vec()).to_vec()), bits(&values));
    }

    /// Large chunks are kept as they came (the same memory); small ones are joined, so tiny
    /// chunks cannot make the tensor hold a handle per byte. The values are the same either way.
    #[test]
    fn small_chunks_are_joined_and_large_ones_shared() {
        let values: Vec<f32> = (0..3000).map(|i| i as f32 - 0.5).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        // Byte by byte: one handle per MIN_SHARED_CHUNK bytes, not per byte.
        let mut tiny = ChunkCollector::default();
        for b in &bytes {
            tiny.push(Bytes::copy_from_slice(std::slice::from_ref(b)));
        }
        assert_eq!(tiny.bytes(), bytes.len());
        let t = tiny.finish().expect("whole values");
        assert_eq!(t.chunks().len(), bytes.len().div_ceil(MIN_SHARED_CHUNK));
        assert_eq!(t.to_vec(), values);
        // Alternating tiny and large chunks: the large ones are QUIC's own memory.
        let mut mixed = ChunkCollector::default();
        let large = Bytes::copy_from_slice(&bytes[1..1 + 2 * MIN_SHARED_CHUNK]);
        mixed.push(Bytes::copy_from_slice(&bytes[..1]));
        mixed.push(large.clone());
        mixed.push(Bytes::copy_from_slice(&bytes[1 + 2 * MIN_SHARED_CHUNK..]));
        let t = mixed.finish().expect("whole values");
        assert_eq!(t.chunks().len(), 3);
        assert_eq!(t.chunks()[1].as_ptr(), large.as_ptr(), "a large chunk is not copied");
        assert_eq!(t.to_vec(), values);
        assert!(ChunkCollector::default().finish().is_some_and(|t| t.is_empty()));
    }

    #[test]
    fn chunks_that_end_inside_a_value_are_refused() {
        assert!(LeTensor::from_chunks(vec![Bytes::from_static(&[1, 2, 3])]).is_none());
        assert!(LeTensor::from_chunks(vec![]).is_some_and(|t| t.is_empty()));
        let empty = LeTensor::default();
        assert_eq!((empty.len(), empty.byte_len()), (0, 0));
        assert!(empty.to_vec().is_empty() && empty.slice(0..0).is_empty());
    }

    #[test]
    #[should_panic(expected = "values 5..7 of 6")]
    fn a_range_past_the_end_panics() {
        cut(&[0.0; 6], &[9]).copy_to(5, &mut [0.0; 2]);
    }
}
