//! The commit invariants, checked on recorded commits in both test tiers.
//!
//! A coordinator *commits* a step when one of its aggregators applies it (the
//! parameters of its range move to the next version). Every commit can be
//! recorded (`commit` events, see [`NodeConfig::record_commits`](super::node_config::NodeConfig::record_commits)):
//! the coordinator, the generation it runs in, the range, the step, a hash of
//! the range's parameters after it, and the time. Two rules hold for any run:
//!
//! 1. **No two coordinators commit at the same time**: the commit intervals
//!    (first to last commit) of different coordination terms never overlap —
//!    what the leases of [`Membership::lease`](super::membership::Membership::lease) guarantee.
//! 2. **One lineage**: every `(range, step)` has exactly one parameter hash,
//!    however often it was committed (a replay after a rollback commits it
//!    again, bit for bit).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One recorded commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The node that committed (the host of the aggregator: the coordinator, or with spread
    /// ranges any node).
    pub node: u32,
    /// The generation the aggregator ran in (`epoch << 32 | node << 20 | n`: the
    /// coordination term is its top 44 bits).
    pub generation: u64,
    /// The parameter range.
    pub range: u32,
    /// The step applied (the range is now at version `step`).
    pub step: u64,
    /// Hash of the range's parameters after the step.
    pub hash: String,
    /// When, in microseconds of one clock shared by every recorder (one machine).
    pub t_us: u64,
}

impl Commit {
    /// The coordination term the commit belongs to: the coordinator and the epoch it took over
    /// in, both from the generation its supervisor issued — not the committing node, which is
    /// the host of the range (another node than the coordinator when ranges are spread).
    pub fn term(&self) -> (u32, u64) {
        (((self.generation >> 20) & 0xfff) as u32, self.generation >> 32)
    }
}

/// The hash of a range's parameters in a [`Commit`]: 16 hex digits from the values' bits.
///
/// It tells apart the parameters two commits of one step hold (rule 2), nothing adversarial,
/// and it runs at every step of a coordinator that records commits: four independent
/// multiply-xor lanes over the bits of eight values at a time (about 0.3 ms for 1.2 M
/// parameters, where a byte-wise FNV-1a took about 6 ms — as long as the step itself).
pub fn digest(params: &[f32]) -> String {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [0xcbf2_9ce4_8422_2325u64, 0x8422_2325_cbf2_9ce4, 0x0100_0000_01b3, params.len() as u64];
    let mix = |h: u64, a: f32, b: f32| {
        let word = u64::from(a.to_bits()) | (u64::from(b.to_bits()) << 32);
        (h ^ word).wrapping_mul(K).rotate_left(31)
    };
    let mut chunks = params.chunks_exact(8);
    for c in &mut chunks {
        for (lane, pair) in lanes.iter_mut().zip(c.chunks_exact(2)) {
            *lane = mix(*lane, pair[0], pair[1]);
        }
    }
    for (i, v) in chunks.remainder().iter().enumerate() {
        lanes[i % 4] = mix(lanes[i % 4], *v, f32::from_bits(i as u32));
    }
    let hash = lanes.iter().fold(0u64, |h, lane| (h ^ lane).wrapping_mul(K).rotate_left(27));
    format!("{hash:016x}")
}

/// Every violation of the two rules in `commits`, described for a report.
pub fn check(commits: &[Commit]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut intervals: BTreeMap<(u32, u64), (u64, u64)> = BTreeMap::new();
    for c in commits {
        let span = intervals.entry(c.term()).or_insert((c.t_us, c.t_us));
        span.0 = span.0.min(c.t_us);
        span.1 = span.1.max(c.t_us);
    }
    let terms: Vec<_> = intervals.iter().collect();
    for (i, (a, (a_from, a_to))) in terms.iter().enumerate() {
        for (b, (b_from, b_to)) in &terms[i + 1..] {
            if a_from <= b_to && b_from <= a_to {
                violations.push(format!(
                    "two coordinators committed at once: node {} (term of epoch {}) from {a_from} to {a_to} µs, \
                     node {} (term of epoch {}) from {b_from} to {b_to} µs",
                    a.0, a.1, b.0, b.1
                ));
            }
        }
    }
    let mut hashes: BTreeMap<(u32, u64), BTreeSet<&str>> = BTreeMap::new();
    for c in commits {
        hashes.entry((c.range, c.step)).or_default().insert(&c.hash);
    }
    for ((range, step), set) in hashes {
        if set.len() > 1 {
            violations.push(format!(
                "range {range} step {step} was committed with {} different parameters: {set:?}",
                set.len()
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(node: u32, epoch: u64, step: u64, hash: &str, t_us: u64) -> Commit {
        Commit { node, generation: (epoch << 32) | (u64::from(node) << 20), range: 0, step, hash: hash.into(), t_us }
    }

    #[test]
    fn a_takeover_after_the_last_commit_is_fine() {
        let run =
            [commit(0, 1, 1, "a", 10), commit(0, 1, 2, "b", 20), commit(1, 2, 2, "b", 30), commit(1, 2, 3, "c", 40)];
        assert!(check(&run).is_empty(), "{:?}", check(&run));
    }

    #[test]
    fn overlapping_terms_and_forked_steps_are_caught() {
        let run = [commit(0, 1, 1, "a", 10), commit(1, 2, 2, "b", 15), commit(0, 1, 2, "x", 20)];
        let v = check(&run);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("two coordinators committed at once"), "{v:?}");
        assert!(v[1].contains("range 0 step 2"), "{v:?}");
    }

    #[test]
    fn the_digest_tells_parameters_apart() {
        let params: Vec<f32> = (0..1003).map(|i| i as f32 * 0.25).collect();
        let base = digest(&params);
        assert_eq!(base, digest(&params.clone()), "deterministic");
        assert_eq!(base.len(), 16);
        // One bit anywhere — in a full chunk or in the remainder — changes it, as do order and length.
        for i in [0, 7, 500, 1000, 1002] {
            let mut changed = params.clone();
            changed[i] = f32::from_bits(changed[i].to_bits() ^ 1);
            assert_ne!(digest(&changed), base, "bit flip at {i}");
        }
        let mut swapped = params.clone();
        swapped.swap(1, 2);
        assert_ne!(digest(&swapped), base, "order");
        assert_ne!(digest(&params[..1002]), base, "length");
        assert_ne!(digest(&[0.0; 8]), digest(&[0.0; 16]), "zeros of two lengths");
    }

    #[test]
    fn the_same_node_in_two_terms_is_two_coordinators() {
        let run = [commit(0, 1, 1, "a", 10), commit(0, 3, 1, "a", 15), commit(0, 1, 2, "b", 20)];
        assert_eq!(check(&run).len(), 1);
    }
}
