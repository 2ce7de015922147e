//! The invariants every run must keep, one per file. Each returns `Ok(())`
//! or a one-line description of the violation.

mod bit_identical;
mod completes;
mod exactly_once;
mod no_split_brain;
mod replays_identical;

pub use bit_identical::bit_identical;
pub use completes::completes;
pub use exactly_once::exactly_once;
pub use no_split_brain::no_split_brain;
pub use replays_identical::replays_identical;

use crate::sim::SimOutcome;

/// What the checkers compare a run against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// SHA-256 of the fault-free final parameters.
    pub model_sha256: String,
    /// Samples per partition (every epoch must apply exactly these).
    pub partition_sizes: Vec<u64>,
    /// Epochs of the job.
    pub epochs: u32,
}

/// A checker: `Ok` or what is wrong.
pub type Check = fn(&SimOutcome, &Expected) -> Result<(), String>;

/// Every checker with its name, in the order they run.
pub const ALL: [(&str, Check); 5] = [
    ("completes", completes),
    ("exactly-once", exactly_once),
    ("bit-identical", bit_identical),
    ("replays-identical", replays_identical),
    ("no-split-brain", no_split_brain),
];

/// Run every checker; the violations, named.
pub fn check_all(outcome: &SimOutcome, expected: &Expected) -> Vec<String> {
    ALL.iter().filter_map(|(name, check)| check(outcome, expected).err().map(|e| format!("{name}: {e}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimOutcome, SimStats};

    /// `((range, step), [(generation, digest letter)])`.
    type Commits<'a> = Vec<((u32, u64), Vec<(u64, &'a str)>)>;

    fn outcome(commits: Commits<'_>) -> SimOutcome {
        SimOutcome {
            seed: 0,
            result: None,
            commits: commits
                .into_iter()
                .map(|(k, v)| (k, v.into_iter().map(|(g, d)| (g, d.repeat(16))).collect()))
                .collect(),
            stats: SimStats::default(),
            trace_digest: String::new(),
            faults: Vec::new(),
            losses: Default::default(),
        }
    }

    fn expected() -> Expected {
        Expected { model_sha256: "0".repeat(64), partition_sizes: vec![2, 2], epochs: 1 }
    }

    #[test]
    fn replays_identical_fails_when_a_recomputed_step_differs() {
        let ok = outcome(vec![((0, 3), vec![(0, "a"), (1, "a")])]);
        assert!(replays_identical(&ok, &expected()).is_ok());
        let bad = outcome(vec![((0, 3), vec![(0, "a"), (1, "b")])]);
        let e = replays_identical(&bad, &expected()).unwrap_err();
        assert!(e.contains("range 0 step 3"), "{e}");
    }

    #[test]
    fn no_split_brain_fails_when_one_generation_commits_a_step_twice() {
        let ok = outcome(vec![((1, 5), vec![(0, "a"), (1, "a")])]);
        assert!(no_split_brain(&ok, &expected()).is_ok());
        let bad = outcome(vec![((1, 5), vec![(2, "a"), (2, "a")])]);
        let e = no_split_brain(&bad, &expected()).unwrap_err();
        assert!(e.contains("generation 2"), "{e}");
    }

    #[test]
    fn exactly_once_and_bit_identical_fail_on_a_wrong_result() {
        let mut o = outcome(vec![]);
        o.result = Some(Ok((vec![1.0], [(0, vec![2, 3])].into_iter().collect())));
        let e = exactly_once(&o, &expected()).unwrap_err();
        assert!(e.contains("partition 1") && e.contains("duplicated"), "{e}");
        assert!(bit_identical(&o, &expected()).is_err());
        o.result = Some(Ok((vec![1.0], [(0, vec![2, 1])].into_iter().collect())));
        assert!(exactly_once(&o, &expected()).unwrap_err().contains("lost"));
    }

    #[test]
    fn completes_fails_on_a_job_error() {
        let mut o = outcome(vec![]);
        o.result = Some(Err(phalanx_actors::protocol::JobError::LedgerMismatch { range: 1 }));
        assert!(completes(&o, &expected()).unwrap_err().contains("the job failed"));
    }
}
