//! The fixed reduction tree over partition indices (sans-IO): how per-partition gradients are
//! summed so that the sum has the same bits whoever computed which part and in what order the
//! parts arrived — the base of pre-reduced gradients (a trainer that owns a whole subtree sends
//! one partial sum instead of one gradient per partition; issue "data plane", item 3).
//!
//! Floating-point addition is commutative but not associative: `a + b` and `b + a` have the
//! same bits, `(a + b) + c` and `a + (b + c)` need not. So the order of every addition is fixed
//! by a tree over `[0, P)`: a node `[lo, hi)` of two or more partitions splits into a left child
//! covering the largest power of two below its length and a right child covering the rest
//! (`[0, 8)` → `[0, 4)` + `[4, 8)`; `[0, 6)` → `[0, 4)` + `[4, 6)`), and a node's sum is its
//! children's sums added element by element. Whoever adds two siblings — a trainer owning both,
//! or the aggregator receiving them from two trainers — gets the same bits, and so does the root.
//!
//! ```text
//!                [0,8)
//!           [0,4)      [4,8)          trainer A owns 0..4: sends [0,4) once
//!         [0,2) [2,4)  [4,6) [6,8)    trainer B owns 4..8: sends [4,8) once
//!        0  1  2  3   4  5  6  7      the aggregator adds [0,4) + [4,8)
//! ```
//!
//! A [`Reducer`] holds the sums received for one step: it takes any tree node (a leaf or a
//! partial sum), drops one it already covers (a duplicate or a replay), lets a larger node
//! replace the smaller ones it covers (a replacement trainer owning more partitions recomputes
//! them: the bits are the same), adds siblings as soon as both are in, and is complete when the
//! root is. [`maximal_owned`] says which nodes a trainer owning some partitions sends:
//! contiguous ownership keeps subtrees whole.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A node of the reduction tree: the partitions `lo..hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Span {
    /// First partition.
    pub lo: u32,
    /// One past the last partition.
    pub hi: u32,
}

impl Span {
    /// The root of the tree over `partitions` partitions.
    pub fn root(partitions: u32) -> Span {
        Span { lo: 0, hi: partitions }
    }

    /// The leaf of partition `p`.
    pub fn leaf(p: u32) -> Span {
        Span { lo: p, hi: p.saturating_add(1) }
    }

    /// How many partitions it covers.
    pub fn len(&self) -> u32 {
        self.hi.saturating_sub(self.lo)
    }

    /// True for an empty span (never a tree node).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `other` lies inside this span.
    pub fn covers(&self, other: &Span) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }

    /// Whether the two spans share a partition.
    pub fn overlaps(&self, other: &Span) -> bool {
        self.lo < other.hi && other.lo < self.hi
    }

    /// The two children of an inner node (the left one covers the largest power of two
    /// below its length), or `None` for a leaf.
    pub fn split(&self) -> Option<(Span, Span)> {
        let n = self.len();
        if n < 2 {
            return None;
        }
        let left = 1u32 << (31 - (n - 1).leading_zeros());
        let mid = self.lo + left;
        Some((Span { lo: self.lo, hi: mid }, Span { lo: mid, hi: self.hi }))
    }

    /// The path from the root of the tree over `partitions` to this span, root first, or
    /// `None` if it is not a node of that tree.
    fn path(&self, partitions: u32) -> Option<Vec<Span>> {
        if self.is_empty() || self.hi > partitions {
            return None;
        }
        let mut node = Span::root(partitions);
        let mut path = vec![node];
        while node != *self {
            let (left, right) = node.split()?;
            node = if left.covers(self) {
                left
            } else if right.covers(self) {
                right
            } else {
                return None;
            };
            path.push(node);
        }
        Some(path)
    }

    /// Whether it is a node of the tree over `partitions` partitions.
    pub fn is_node(&self, partitions: u32) -> bool {
        self.path(partitions).is_some()
    }

    /// Its parent in the tree over `partitions`, if it is a node other than the root.
    pub fn parent(&self, partitions: u32) -> Option<Span> {
        let path = self.path(partitions)?;
        path.len().checked_sub(2).map(|i| path[i])
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "partitions {}..{}", self.lo, self.hi)
    }
}

/// The largest tree nodes made only of partitions in `owned` (the nodes a trainer owning them
/// sends, each summed in tree order), left to right.
pub fn maximal_owned(partitions: u32, owned: &BTreeSet<u32>) -> Vec<Span> {
    fn walk(node: Span, owned: &BTreeSet<u32>, out: &mut Vec<Span>) {
        if owned.range(node.lo..node.hi).count() == node.len() as usize {
            out.push(node);
        } else if let Some((left, right)) = node.split() {
            walk(left, owned, out);
            walk(right, owned, out);
        }
    }
    let mut out = Vec::new();
    if partitions > 0 {
        walk(Span::root(partitions), owned, &mut out);
    }
    out
}

/// What a [`Reducer`] sums: anything whose parts are added element by element.
pub trait Summand {
    /// Its width (a reducer refuses a part of another width).
    fn width(&self) -> usize;
    /// `self += other`, element by element, `self` on the left.
    fn add(&mut self, other: &Self);
    /// `self += other` where `other` is given up, which comes back spent. The default adds
    /// into `self`; a summand whose values may be shared with someone else can add into
    /// whichever of the two it owns (addition is commutative, bit for bit).
    fn absorb(&mut self, other: Self) -> Self
    where
        Self: Sized,
    {
        self.add(&other);
        other
    }
    /// Whether [`add`](Self::add) writes into a buffer this summand owns; one whose values may
    /// be shared with someone else (which `add` must copy first) says no.
    fn adds_in_place(&self) -> bool {
        true
    }
}

impl Summand for Vec<f32> {
    fn width(&self) -> usize {
        self.len()
    }
    fn add(&mut self, other: &Self) {
        for (a, b) in self.iter_mut().zip(other) {
            *a += *b;
        }
    }
}

/// The sum of a tree node's gradients and what goes with it: the samples they were computed
/// on and the sum of those samples' losses (added in tree order too, so the reported loss has
/// the same bits whoever computed what).
///
/// `V` is how the values are held: a trainer's own buffer (`Vec<f32>`), or in an aggregator the
/// received gradients, which may be views of another actor's buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial<V = Vec<f32>> {
    /// The gradient sum (of one parameter range, or of the whole vector in a trainer).
    pub values: V,
    /// Samples summed.
    pub samples: u64,
    /// Sum of their losses.
    pub loss_sum: f64,
}

impl<V: Summand> Summand for Partial<V> {
    fn width(&self) -> usize {
        self.values.width()
    }
    fn add(&mut self, other: &Self) {
        self.values.add(&other.values);
        self.samples = self.samples.saturating_add(other.samples);
        self.loss_sum += other.loss_sum;
    }
    fn absorb(&mut self, mut other: Self) -> Self {
        // Add into the buffer nothing else holds (every addition here is commutative, bit for
        // bit: f32 and f64 sums, saturating counts): a shared one would have to be copied first.
        if !self.values.adds_in_place() && other.values.adds_in_place() {
            std::mem::swap(self, &mut other);
        }
        self.add(&other);
        other
    }
    fn adds_in_place(&self) -> bool {
        self.values.adds_in_place()
    }
}

/// What [`Reducer::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Taken (and added to whatever siblings were in).
    Taken,
    /// Already covered by what was received: dropped.
    Duplicate,
}

/// Why a span cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReduceError {
    /// Not a node of the tree (or out of range).
    #[error("{span} is not a node of the reduction tree over {partitions} partitions")]
    NotANode {
        /// The span.
        span: Span,
        /// The partitions of the job.
        partitions: u32,
    },
    /// The values do not have the reducer's length.
    #[error("{span}: {got} values where the reducer sums {expected}")]
    Length {
        /// The span.
        span: Span,
        /// The reducer's length.
        expected: usize,
        /// What came.
        got: usize,
    },
}

/// The sums received for one step, reduced in tree order as they come.
#[derive(Clone, Debug)]
pub struct Reducer<T = Vec<f32>> {
    partitions: u32,
    len: usize,
    /// Disjoint tree nodes and the tree-order sums of their partitions; none has its sibling
    /// here (siblings are added at once), except the root's two children when the root's sum
    /// is left to the caller ([`Reducer::leaving_root_unsummed`]).
    held: BTreeMap<Span, T>,
    /// Whether the root's two children are added here (else [`Reducer::take_complete`] hands
    /// them over as they are).
    sum_root: bool,
}

/// What a complete [`Reducer`] holds: the root's sum, or the sums of the root's two children
/// when their addition is left to the caller.
#[derive(Clone, Debug, PartialEq)]
pub enum Complete<T> {
    /// The sum over every partition.
    Root(T),
    /// The sums of the root's left and right children: the root is `left + right`, element by
    /// element (either side first: addition is commutative, bit for bit).
    Halves(T, T),
}

impl<T: Summand> Reducer<T> {
    /// A reducer of parts of width `len` over `partitions` partitions.
    pub fn new(partitions: u32, len: usize) -> Self {
        Self { partitions, len, held: BTreeMap::new(), sum_root: true }
    }

    /// A reducer that stops one addition short of the root: once both of the root's children
    /// are in it is [`complete`](Self::complete) and [`take_complete`](Self::take_complete)
    /// hands them over, so that the caller can add them in the same pass over memory as
    /// whatever it does with the sum (an aggregator scales it and steps the optimizer with it,
    /// block by block, instead of writing the sum out and reading it back).
    pub fn leaving_root_unsummed(partitions: u32, len: usize) -> Self {
        Self { sum_root: false, ..Self::new(partitions, len) }
    }

    /// Why `span` with a part of width `width` cannot be taken, if it cannot.
    pub fn check(&self, span: Span, width: usize) -> Result<(), ReduceError> {
        if !span.is_node(self.partitions) {
            return Err(ReduceError::NotANode { span, partitions: self.partitions });
        }
        if width != self.len {
            return Err(ReduceError::Length { span, expected: self.len, got: width });
        }
        Ok(())
    }

    /// Whether a held node covers `span` (inserting it would be a duplicate).
    pub fn covers(&self, span: &Span) -> bool {
        self.covering(span).is_some()
    }

    fn covering(&self, span: &Span) -> Option<Span> {
        // Held nodes are disjoint and ordered by `lo`: only the last one starting at or before
        // `span.lo` can cover it.
        let (held, _) = self.held.range(..=Span { lo: span.lo, hi: u32::MAX }).next_back()?;
        held.covers(span).then_some(*held)
    }

    /// Take the sum of `span`'s partitions.
    pub fn insert(&mut self, span: Span, part: T) -> Result<Inserted, ReduceError> {
        self.insert_reusing(span, part, &mut Vec::new())
    }

    /// [`Reducer::insert`], handing every part it no longer needs to `spent` — siblings added
    /// into a sum, smaller nodes a larger one replaced, the part itself when it is a duplicate —
    /// so that the caller can reuse their buffers instead of allocating new ones every step.
    pub fn insert_reusing(&mut self, span: Span, part: T, spent: &mut Vec<T>) -> Result<Inserted, ReduceError> {
        self.check(span, part.width())?;
        if self.covers(&span) {
            spent.push(part);
            return Ok(Inserted::Duplicate);
        }
        // Two nodes of one tree are nested or disjoint: a held node overlapping `span` and not
        // covering it lies inside it. A larger node replaces the smaller ones it covers: its sum
        // of them has the same bits.
        let inside: Vec<Span> =
            self.held.range(Span { lo: span.lo, hi: 0 }..).map(|(h, _)| *h).take_while(|h| h.lo < span.hi).collect();
        for h in inside {
            debug_assert!(span.covers(&h), "tree nodes nest");
            spent.extend(self.held.remove(&h));
        }
        let mut node = span;
        let mut sum = part;
        // Add siblings while both are in (addition is commutative, bit for bit: which side is
        // on the left does not matter; which nodes are added does).
        let root = Span::root(self.partitions);
        while let Some(parent) = node.parent(self.partitions) {
            if parent == root && !self.sum_root {
                break;
            }
            let (left, right) = parent.split().expect("a parent has two children");
            let sibling = if node == left { right } else { left };
            let Some(other) = self.held.remove(&sibling) else { break };
            spent.push(sum.absorb(other));
            node = parent;
        }
        self.held.insert(node, sum);
        Ok(Inserted::Taken)
    }

    /// Add `part` to the held node covering `span`, as if it were new: what a broken
    /// aggregator that applies duplicates does. Exists only so the chaos tests can prove their
    /// checkers catch it. Only with the cargo feature `fault-injection`.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn add_duplicate(&mut self, span: &Span, part: &T) {
        if let Some(held) = self.covering(span) {
            if let Some(sum) = self.held.get_mut(&held) {
                sum.add(part);
            }
        }
    }

    /// The nodes held, left to right (disjoint; none with its sibling).
    pub fn held(&self) -> impl Iterator<Item = &Span> {
        self.held.keys()
    }

    /// The sum of `span` if it is held as one node (a whole owned subtree is complete).
    pub fn get(&self, span: &Span) -> Option<&T> {
        self.held.get(span)
    }

    /// Take the sum of `span` if it is held as one node.
    pub fn take(&mut self, span: &Span) -> Option<T> {
        self.held.remove(span)
    }

    /// The sum over every partition, once every part is in.
    pub fn root(&self) -> Option<&T> {
        self.get(&Span::root(self.partitions))
    }

    /// Take the root's sum, once every part is in (a reducer
    /// [leaving the root unsummed](Self::leaving_root_unsummed) holds it only if it came as
    /// one part: see [`take_complete`](Self::take_complete)).
    pub fn take_root(&mut self) -> Option<T> {
        self.held.remove(&Span::root(self.partitions))
    }

    /// Whether every partition is in: the root is held, or both of its children are.
    pub fn complete(&self) -> bool {
        self.root_halves().is_some_and(|(l, r)| self.held.contains_key(&l) && self.held.contains_key(&r))
            || self.root().is_some()
    }

    /// Take what a complete reducer holds (`None`, and nothing taken, while a part is missing).
    pub fn take_complete(&mut self) -> Option<Complete<T>> {
        if let Some(root) = self.take_root() {
            return Some(Complete::Root(root));
        }
        let (l, r) = self.root_halves().filter(|_| self.complete())?;
        let (left, right) = (self.held.remove(&l)?, self.held.remove(&r)?);
        Some(Complete::Halves(left, right))
    }

    fn root_halves(&self) -> Option<(Span, Span)> {
        Span::root(self.partitions).split()
    }

    /// Drop everything held (a new step).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The tree-order sum of one gradient per partition, computed directly (the reference the
    /// tests hold the reducer to).
    fn tree_sum(gradients: &[Vec<f32>]) -> Vec<f32> {
        fn sum(node: Span, gradients: &[Vec<f32>]) -> Vec<f32> {
            match node.split() {
                None => gradients[node.lo as usize].clone(),
                Some((left, right)) => {
                    let mut out = sum(left, gradients);
                    for (a, b) in out.iter_mut().zip(sum(right, gradients)) {
                        *a += b;
                    }
                    out
                }
            }
        }
        if gradients.is_empty() {
            return Vec::new();
        }
        sum(Span::root(gradients.len() as u32), gradients)
    }

    fn nodes(partitions: u32) -> Vec<Span> {
        fn walk(node: Span, out: &mut Vec<Span>) {
            out.push(node);
            if let Some((l, r)) = node.split() {
                walk(l, out);
                walk(r, out);
            }
        }
        let mut out = Vec::new();
        walk(Span::root(partitions), &mut out);
        out
    }

    #[test]
    fn children_tile_their_parent_with_a_power_of_two_on_the_left() {
        assert_eq!(Span::root(8).split(), Some((Span { lo: 0, hi: 4 }, Span { lo: 4, hi: 8 })));
        assert_eq!(Span::root(6).split(), Some((Span { lo: 0, hi: 4 }, Span { lo: 4, hi: 6 })));
        assert_eq!(Span::root(5).split(), Some((Span { lo: 0, hi: 4 }, Span { lo: 4, hi: 5 })));
        assert_eq!(Span::root(3).split(), Some((Span { lo: 0, hi: 2 }, Span { lo: 2, hi: 3 })));
        assert_eq!(Span::root(1).split(), None);
        for p in 1..=33 {
            let all = nodes(p);
            assert_eq!(all.len() as u32, 2 * p - 1, "a full binary tree over {p} leaves");
            for n in &all {
                assert!(n.is_node(p), "{n} of {p}");
                if let Some((l, r)) = n.split() {
                    assert_eq!((l.lo, l.hi, r.hi), (n.lo, r.lo, n.hi));
                    assert!(l.len().is_power_of_two() && l.len() >= r.len(), "{n}");
                    assert_eq!((l.parent(p), r.parent(p)), (Some(*n), Some(*n)));
                }
            }
            assert_eq!(Span::root(p).parent(p), None);
        }
    }

    #[test]
    fn spans_that_are_not_nodes_are_refused() {
        for bad in [Span { lo: 1, hi: 3 }, Span { lo: 0, hi: 3 }, Span { lo: 6, hi: 9 }, Span { lo: 4, hi: 4 }] {
            assert!(!bad.is_node(8), "{bad}");
            let mut r: Reducer = Reducer::new(8, 2);
            assert!(matches!(r.insert(bad, vec![0.0; 2]), Err(ReduceError::NotANode { .. })), "{bad}");
        }
        let mut r: Reducer = Reducer::new(8, 2);
        assert!(matches!(r.insert(Span::leaf(0), vec![0.0; 3]), Err(ReduceError::Length { .. })));
        assert!(matches!(r.insert(Span { lo: u32::MAX, hi: 0 }, vec![0.0; 2]), Err(ReduceError::NotANode { .. })));
    }

    #[test]
    fn contiguous_owners_keep_subtrees_whole_and_round_robin_owners_do_not() {
        let block = |r: std::ops::Range<u32>| r.collect::<BTreeSet<u32>>();
        assert_eq!(maximal_owned(8, &block(0..4)), vec![Span { lo: 0, hi: 4 }]);
        assert_eq!(maximal_owned(8, &block(4..8)), vec![Span { lo: 4, hi: 8 }]);
        assert_eq!(maximal_owned(8, &block(0..8)), vec![Span::root(8)]);
        assert_eq!(maximal_owned(8, &block(3..6)), vec![Span::leaf(3), Span { lo: 4, hi: 6 }]);
        let odd: BTreeSet<u32> = (0..8).filter(|p| p % 2 == 1).collect();
        assert_eq!(maximal_owned(8, &odd), odd.iter().map(|p| Span::leaf(*p)).collect::<Vec<_>>());
        assert!(maximal_owned(8, &BTreeSet::new()).is_empty());
        assert!(maximal_owned(0, &block(0..2)).is_empty());
    }

    #[test]
    fn duplicates_are_dropped_and_a_larger_node_replaces_the_parts_it_covers() {
        let g = |v: f32| vec![v, -v];
        let mut r: Reducer = Reducer::new(4, 2);
        assert_eq!(r.insert(Span::leaf(0), g(1.0)), Ok(Inserted::Taken));
        assert_eq!(r.insert(Span::leaf(0), g(1.0)), Ok(Inserted::Duplicate));
        // A replacement trainer owning 0..2 sends their sum: it replaces leaf 0.
        assert_eq!(r.insert(Span { lo: 0, hi: 2 }, g(3.0)), Ok(Inserted::Taken));
        assert_eq!(r.held().copied().collect::<Vec<_>>(), vec![Span { lo: 0, hi: 2 }]);
        assert_eq!(r.insert(Span::leaf(1), g(2.0)), Ok(Inserted::Duplicate), "inside a held node");
        assert_eq!(r.insert(Span::leaf(3), g(4.0)), Ok(Inserted::Taken));
        assert_eq!(r.root(), None);
        assert_eq!(r.insert(Span::leaf(2), g(5.0)), Ok(Inserted::Taken));
        assert_eq!(r.root(), Some(&vec![12.0, -12.0]), "(0+1) + (2+3) = 3 + 9");
        assert_eq!(r.take_root(), Some(vec![12.0, -12.0]));
    }

    #[test]
    fn a_reducer_leaving_the_root_unsummed_hands_over_its_halves_or_a_whole_root() {
        let mut r: Reducer = Reducer::leaving_root_unsummed(3, 1);
        r.insert(Span::leaf(2), vec![4.0]).unwrap();
        r.insert(Span::leaf(0), vec![1.0]).unwrap();
        assert!(!r.complete() && r.take_complete().is_none(), "partition 1 is missing");
        r.insert(Span::leaf(1), vec![2.0]).unwrap();
        assert!(r.complete());
        assert_eq!(r.root(), None, "not added here");
        assert_eq!(r.take_complete(), Some(Complete::Halves(vec![3.0], vec![4.0])));
        // A part covering every partition is the root itself.
        r.insert(Span::leaf(0), vec![1.0]).unwrap();
        r.insert(Span::root(3), vec![7.0]).unwrap();
        assert_eq!(r.take_complete(), Some(Complete::Root(vec![7.0])));
        // One partition: the root is a leaf.
        let mut one: Reducer = Reducer::leaving_root_unsummed(1, 1);
        one.insert(Span::leaf(0), vec![5.0]).unwrap();
        assert_eq!(one.take_complete(), Some(Complete::Root(vec![5.0])));
    }

    #[test]
    fn the_parts_a_reducer_no_longer_needs_are_handed_back() {
        let mut r: Reducer = Reducer::new(4, 1);
        let mut spent = Vec::new();
        r.insert_reusing(Span::leaf(0), vec![1.0], &mut spent).unwrap();
        assert!(spent.is_empty(), "held");
        r.insert_reusing(Span::leaf(1), vec![2.0], &mut spent).unwrap();
        assert_eq!(spent, vec![vec![1.0]], "added into its sibling's sum");
        r.insert_reusing(Span::leaf(1), vec![9.0], &mut spent).unwrap();
        assert_eq!(spent.last(), Some(&vec![9.0]), "a duplicate");
        r.insert_reusing(Span::leaf(2), vec![4.0], &mut spent).unwrap();
        r.insert_reusing(Span { lo: 2, hi: 4 }, vec![12.0], &mut spent).unwrap();
        assert!(spent.contains(&vec![4.0]), "replaced by the node covering it");
        assert_eq!(r.root(), Some(&vec![15.0]));
    }

    /// Gradients whose sums depend on the order of additions (values of very different
    /// magnitudes), owned by trainers in any way, arriving in any order, some twice.
    fn setup() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<u32>, Vec<usize>)> {
        (1u32..=12, 1usize..=5).prop_flat_map(|(p, len)| {
            let values = prop::collection::vec(
                prop::collection::vec(
                    prop_oneof![-1e8f32..1e8, -1.0f32..1.0, -1e-8f32..1e-8].prop_map(|v| v * 1.000_001),
                    len,
                ),
                p as usize,
            );
            let owners = prop::collection::vec(0u32..4, p as usize);
            let order = Just((0..(2 * p as usize)).collect::<Vec<usize>>()).prop_shuffle();
            (values, owners, order)
        })
    }

    proptest! {
        /// The promise: the root has the bits of the tree-order sum whatever the ownership
        /// and the arrival order, duplicates included.
        #[test]
        fn the_root_has_the_same_bits_whoever_sends_what_in_any_order((values, owners, order) in setup()) {
            let p = values.len() as u32;
            let len = values[0].len();
            let expected = tree_sum(&values);
            // Each trainer sums its maximal owned nodes in tree order with a reducer of its own.
            let mut sent: Vec<(Span, Vec<f32>)> = Vec::new();
            for t in 0..4 {
                let owned: BTreeSet<u32> = (0..p).filter(|q| owners[*q as usize] == t).collect();
                let mut mine: Reducer = Reducer::new(p, len);
                for q in &owned {
                    mine.insert(Span::leaf(*q), values[*q as usize].clone()).unwrap();
                }
                for span in maximal_owned(p, &owned) {
                    sent.push((span, mine.get(&span).expect("a whole owned node is summed").to_vec()));
                }
            }
            // Every message twice (a retransmission), in a shuffled order.
            let doubled: Vec<&(Span, Vec<f32>)> = sent.iter().chain(sent.iter()).collect();
            let mut agg: Reducer = Reducer::new(p, len);
            // The same parts into a reducer that leaves the root's addition to its caller: it
            // is complete exactly when the other has the root.
            let mut lazy: Reducer = Reducer::leaving_root_unsummed(p, len);
            let arrivals = order.iter().filter(|i| **i < doubled.len()).map(|i| doubled[*i]).chain(sent.iter());
            for (span, v) in arrivals {
                agg.insert(*span, v.clone()).unwrap();
                lazy.insert(*span, v.clone()).unwrap();
                prop_assert_eq!(lazy.complete(), agg.root().is_some(), "after {}", span);
            }
            let root = agg.root().expect("every partition came");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(root), bits(&expected));
            let added = match lazy.take_complete().expect("complete") {
                Complete::Root(root) => root,
                // Right first: the caller may add them either way round.
                Complete::Halves(left, mut right) => {
                    right.add(&left);
                    right
                }
            };
            prop_assert_eq!(bits(&added), bits(&expected));
            prop_assert!(!lazy.complete() && lazy.take_complete().is_none(), "taken");
        }

        /// Garbage spans and lengths are refused with an error, never a panic.
        #[test]
        fn any_span_is_refused_or_taken_without_a_panic(p in 0u32..20, spans in prop::collection::vec((any::<u32>(), any::<u32>(), 0usize..4), 0..20)) {
            let mut r: Reducer = Reducer::new(p, 2);
            for (lo, hi, len) in spans {
                let _ = r.insert(Span { lo: lo % 24, hi: hi % 24 }, vec![1.0; len]);
                let _ = r.insert(Span { lo, hi }, vec![1.0; len]);
            }
        }
    }
}
