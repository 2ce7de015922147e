//! The invariants every run must keep, one per file. Each returns `Ok(())`
//! or a one-line description of the violation.

mod bit_identical;
mod clean_exits;
mod completes;
mod exactly_once;
mod no_bad_checkpoint;
mod no_split_brain;
mod replays_identical;

pub use bit_identical::{bit_identical, sha_matches};
pub use clean_exits::clean_exits;
pub use completes::completes;
pub use exactly_once::{exactly_once, ledger_exact};
pub use no_bad_checkpoint::no_bad_checkpoint;
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

/// The real-process tier's checks on a node cluster's `summary.json` (the
/// run completed, or there is no summary): exactly-once, bit-identical, no
/// bad checkpoint loaded, clean exits. The violations, named.
pub fn check_process(summary: &serde_json::Value, expected: &Expected) -> Vec<String> {
    let ledger: phalanx_actors::protocol::Ledger = summary["samples_applied"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let per = e["per_partition"].as_array()?.iter().map(|v| v.as_u64()).collect::<Option<Vec<u64>>>()?;
            Some((e["epoch"].as_u64()?, per))
        })
        .collect();
    let sha = summary["model_sha256"].as_str().unwrap_or("(none)");
    let checks = [
        ("exactly-once", ledger_exact(&ledger, expected)),
        ("bit-identical", sha_matches(sha, expected)),
        ("no-bad-checkpoint", no_bad_checkpoint(summary)),
        ("clean-exits", clean_exits(summary)),
    ];
    checks.into_iter().filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}"))).collect()
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

    fn summary(sha: &str) -> serde_json::Value {
        serde_json::json!({
            "model_sha256": sha,
            "samples_applied": [{ "epoch": 0, "per_partition": [2, 2] }],
            "node_faults": [{ "kind": "corrupt", "node": 1, "checkpoint_step": 280 }],
            "takeovers": [{ "node": 1, "epoch": 2, "restore": 260 }],
            "node_exits": [{ "node": 1, "code": 0, "detail": "exit status: 0" }],
            "panics": [],
        })
    }

    #[test]
    fn the_process_checks_pass_on_a_good_summary_and_each_fails_on_its_own_damage() {
        let sha = "0".repeat(64);
        assert_eq!(check_process(&summary(&sha), &expected()), Vec::<String>::new());
        let mut s = summary(&sha);
        s["samples_applied"][0]["per_partition"] = serde_json::json!([2, 3]);
        assert!(check_process(&s, &expected())[0].starts_with("exactly-once: epoch 0 partition 1"));
        let s = summary(&"1".repeat(64));
        assert!(check_process(&s, &expected())[0].starts_with("bit-identical"));
        let mut s = summary(&sha);
        s["takeovers"][0]["restore"] = 280.into();
        let v = check_process(&s, &expected());
        assert!(v[0].starts_with("no-bad-checkpoint: node 1 took over") && v[0].contains("checkpoint 280"), "{v:?}");
        let mut s = summary(&sha);
        s["panics"] = serde_json::json!(["node 2: panicked at x.rs:1: boom"]);
        assert!(check_process(&s, &expected())[0].contains("a node panicked: node 2"));
        let mut s = summary(&sha);
        s["node_exits"][0] = serde_json::json!({ "node": 1, "code": null, "detail": "signal: 6 (SIGABRT)" });
        assert!(check_process(&s, &expected())[0].contains("node 1 exited badly: signal: 6"));
    }
}
