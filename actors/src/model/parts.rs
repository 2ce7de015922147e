//! A parameter vector held in pieces.
//!
//! A trainer's `θ` arrives as its aggregators' ranges, one buffer each. Joining them into one
//! model-sized vector is a copy of the whole model per trainer and step (about 3 % of all CPU in
//! a 3-node run at 1.2 M parameters); a model that reads its weights a block at a time anyway
//! (the built-in MLP packs each chunk of `W1` before its products) can read the blocks straight
//! from the pieces instead ([`Model::loss_grad_tree_parts`](super::Model::loss_grad_tree_parts)).

use std::ops::Range;

use phalanx_transport::LeTensor;

/// One piece of a parameter vector: values in memory, or a tensor as it came off the wire
/// (read out of its chunks, never joined).
#[derive(Clone, Copy, Debug)]
pub enum Piece<'a> {
    /// Values in memory.
    Values(&'a [f32]),
    /// A received tensor's chunks.
    Le(&'a LeTensor),
}

impl Piece<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Piece::Values(v) => v.len(),
            Piece::Le(t) => t.len(),
        }
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies values `at..at + out.len()` of the piece into `out`.
    fn copy_to(&self, at: usize, out: &mut [f32]) {
        match self {
            Piece::Values(v) => out.copy_from_slice(&v[at..at + out.len()]),
            Piece::Le(t) => t.copy_to(at, out),
        }
    }
}

/// Consecutive pieces of one flat parameter vector: piece `i` holds values
/// `start(i)..start(i) + len(i)`, and together they tile `0..len()`. Reading a range copies or
/// borrows the same values the joined vector would hold, so the bits of anything computed from
/// them cannot depend on where the pieces are cut.
///
/// ```
/// use phalanx_actors::model::ParamParts;
///
/// let (a, b) = ([1.0f32, 2.0, 3.0], [4.0f32, 5.0]);
/// let parts = ParamParts::new(vec![&a[..], &b[..]]);
/// assert_eq!(parts.len(), 5);
/// let mut scratch = Vec::new();
/// assert_eq!(parts.slice(1..3, &mut scratch), &[2.0, 3.0]); // inside one piece: borrowed
/// assert_eq!(parts.slice(2..4, &mut scratch), &[3.0, 4.0]); // across two: copied
/// assert_eq!(parts.to_vec(), vec![1.0, 2.0, 3.0, 4.0, 5.0]);
/// ```
#[derive(Clone, Debug)]
pub struct ParamParts<'a> {
    pieces: Vec<Piece<'a>>,
    /// Where each piece starts, then the total length.
    starts: Vec<usize>,
}

impl<'a> ParamParts<'a> {
    /// The vector made of `pieces` in order (empty pieces are allowed and hold nothing).
    pub fn new(pieces: Vec<&'a [f32]>) -> Self {
        Self::from_pieces(pieces.into_iter().map(Piece::Values).collect())
    }

    /// The vector made of `pieces` in order, in memory or as received.
    pub fn from_pieces(pieces: Vec<Piece<'a>>) -> Self {
        let mut starts = Vec::with_capacity(pieces.len() + 1);
        let mut at = 0;
        starts.push(at);
        for piece in &pieces {
            at += piece.len();
            starts.push(at);
        }
        Self { pieces, starts }
    }

    /// One piece: a vector that is already whole.
    pub fn whole(values: &'a [f32]) -> Self {
        Self::new(vec![values])
    }

    /// Values in all pieces.
    pub fn len(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole vector as one slice, when a single piece in memory holds every value.
    pub fn as_whole(&self) -> Option<&'a [f32]> {
        let mut nonempty = self.pieces.iter().filter(|p| !p.is_empty());
        match (nonempty.next(), nonempty.next()) {
            (Some(Piece::Values(only)), None) => Some(only),
            (None, _) => Some(&[]),
            _ => None,
        }
    }

    /// Values `range`: borrowed when one piece in memory holds them all, else copied into
    /// `scratch`.
    ///
    /// # Panics
    /// If `range` is not inside `0..len()` (a model checks the length first).
    pub fn slice<'s>(&'s self, range: Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        assert!(range.start <= range.end && range.end <= self.len(), "range {range:?} of {} values", self.len());
        if range.is_empty() {
            return &[];
        }
        let i = self.piece_of(range.start);
        let start = self.starts[i];
        if let Piece::Values(piece) = self.pieces[i] {
            if range.end <= self.starts[i + 1] {
                return &piece[range.start - start..range.end - start];
            }
        }
        scratch.clear();
        scratch.resize(range.len(), 0.0);
        self.copy_to(range.start, scratch);
        scratch
    }

    /// Copies values `at..at + out.len()` into `out`.
    ///
    /// # Panics
    /// If the range is not inside `0..len()`.
    pub fn copy_to(&self, at: usize, out: &mut [f32]) {
        let end = at + out.len();
        assert!(end <= self.len(), "values {at}..{end} of {}", self.len());
        let mut i = self.piece_of(at);
        let mut pos = at;
        let mut out = out;
        while !out.is_empty() {
            let piece = self.pieces[i];
            let from = pos - self.starts[i];
            let take = (piece.len() - from).min(out.len());
            let (head, rest) = out.split_at_mut(take);
            piece.copy_to(from, head);
            out = rest;
            pos += take;
            i += 1;
        }
    }

    /// The joined vector (a copy).
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.copy_to(0, &mut out);
        out
    }

    /// The piece holding value `at`: the one with `start ≤ at < end` (so never an empty
    /// one), or the last piece for `at == len()`.
    fn piece_of(&self, at: usize) -> usize {
        self.starts[1..].partition_point(|&end| end <= at).min(self.pieces.len().saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::ParamParts;

    /// Every range of every cut gives the joined vector's values, borrowed or copied.
    #[test]
    fn every_range_of_every_cut_reads_the_joined_values() {
        let whole: Vec<f32> = (0..9).map(|i| i as f32 * 1.5 - 3.0).collect();
        let cuts: [&[usize]; 5] = [&[], &[4], &[0, 4, 4, 9], &[1, 2, 3, 8], &[9]];
        for cut in cuts {
            let mut bounds = vec![0];
            bounds.extend_from_slice(cut);
            bounds.push(whole.len());
            let pieces: Vec<&[f32]> = bounds.windows(2).map(|w| &whole[w[0]..w[1]]).collect();
            let parts = ParamParts::new(pieces);
            assert_eq!(parts.len(), whole.len());
            assert_eq!(parts.to_vec(), whole, "cut {cut:?}");
            let mut scratch = Vec::new();
            for a in 0..=whole.len() {
                for b in a..=whole.len() {
                    assert_eq!(parts.slice(a..b, &mut scratch), &whole[a..b], "cut {cut:?}, {a}..{b}");
                    let mut out = vec![f32::NAN; b - a];
                    parts.copy_to(a, &mut out);
                    assert_eq!(out, whole[a..b], "cut {cut:?}, copy {a}..{b}");
                }
            }
        }
    }

    #[test]
    fn a_range_inside_one_piece_is_borrowed() {
        let (a, b) = ([1.0f32, 2.0], [3.0f32, 4.0, 5.0]);
        let parts = ParamParts::new(vec![&a[..], &[], &b[..]]);
        let mut scratch = Vec::new();
        let s = parts.slice(2..5, &mut scratch);
        assert_eq!(s.as_ptr(), b.as_ptr(), "no copy");
        assert!(scratch.is_empty());
        assert_eq!(parts.as_whole(), None);
        assert_eq!(ParamParts::new(vec![&[], &b[..], &[]]).as_whole().map(<[f32]>::as_ptr), Some(b.as_ptr()));
    }

    #[test]
    #[should_panic(expected = "values 4..6 of 5")]
    fn a_range_past_the_end_panics() {
        let a = [0.0f32; 5];
        ParamParts::whole(&a).copy_to(4, &mut [0.0; 2]);
    }
}
