//! The invariants every run must keep, one per file. Each returns `Ok(())`
//! or a one-line description of the violation.

mod bit_identical;
mod clean_exits;
mod completes;
mod exactly_once;
mod forged_rejected;
mod no_bad_checkpoint;
mod no_false_detection;
mod no_split_brain;
mod replays_identical;

pub use bit_identical::{bit_identical, sha_matches};
pub use clean_exits::clean_exits;
pub use completes::completes;
pub use exactly_once::{exactly_once, ledger_exact};
pub use forged_rejected::{forged_rejected, read_events, tally, ForgedCount, OVERSIZED_FRAME};
pub use no_bad_checkpoint::no_bad_checkpoint;
pub use no_false_detection::no_false_detection;
pub use no_split_brain::no_split_brain;
pub use replays_identical::replays_identical;

use crate::sim::SimOutcome;

/// What the checkers compare a run against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// `model_sha256` of the fault-free final parameters, as a summary publishes it (over the
    /// model's tensors in order, [`phalanx::model_sha256`]).
    pub model_sha256: String,
    /// SHA-256 of the fault-free final flat parameter vector as it is ([`phalanx::params_sha256`]),
    /// what an in-process run's parameters are checked against.
    pub params_sha256: String,
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
    let sha = summary["model_sha256"].as_str().unwrap_or("(none)");
    let checks = [
        ("exactly-once", summary_ledger(&summary["samples_applied"]).and_then(|l| ledger_exact(&l, expected))),
        ("bit-identical", sha_matches(sha, &expected.model_sha256)),
        ("no-bad-checkpoint", no_bad_checkpoint(summary)),
        ("clean-exits", clean_exits(summary)),
    ];
    checks.into_iter().filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}"))).collect()
}

/// The ledger a node cluster's `summary.json` reports in `samples_applied`
/// (the exactly-once verdict folded over the epochs), as the aggregators
/// folded it.
fn summary_ledger(applied: &serde_json::Value) -> Result<phalanx_actors::protocol::Ledger, String> {
    let count = |field: &str| applied[field].as_u64().ok_or_else(|| format!("samples_applied.{field} is missing"));
    let counts =
        |v: &serde_json::Value| v.as_array()?.iter().map(serde_json::Value::as_u64).collect::<Option<Vec<u64>>>();
    let first_inexact = match &applied["first_failing"] {
        serde_json::Value::Null => None,
        e => Some((
            e["epoch"].as_u64().ok_or("samples_applied.first_failing.epoch is missing")?,
            counts(&e["per_partition"]).ok_or("samples_applied.first_failing.per_partition is missing")?,
        )),
    };
    Ok(phalanx_actors::protocol::Ledger {
        open: Default::default(),
        closed: phalanx_actors::protocol::ClosedEpochs {
            epochs: count("epochs")?,
            exact: count("exactly_once_epochs")?,
            per_partition: counts(&applied["per_partition"]).ok_or("samples_applied.per_partition is missing")?,
            lost: count("lost")?,
            duplicated: count("duplicated")?,
            first_inexact,
        },
    })
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
        Expected { model_sha256: "0".repeat(64), params_sha256: "0".repeat(64), partition_sizes: vec![2, 2], epochs: 1 }
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
            "samples_applied": {
                "epochs": 1, "exactly_once_epochs": 1, "exactly_once": true, "total": 4, "per_partition": [2, 2],
                "lost": 0, "duplicated": 0, "first_failing": null,
            },
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
        s["samples_applied"]["exactly_once_epochs"] = 0.into();
        s["samples_applied"]["first_failing"] =
            serde_json::json!({ "epoch": 0, "total": 5, "per_partition": [2, 3], "exactly_once": false });
        assert!(check_process(&s, &expected())[0].starts_with("exactly-once: epoch 0 partition 1"));
        // Aggregators that judged every epoch against wrong sizes: the totals give them away.
        let mut s = summary(&sha);
        s["samples_applied"]["per_partition"] = serde_json::json!([2, 3]);
        let v = check_process(&s, &expected());
        assert!(v[0].starts_with("exactly-once: samples applied per partition"), "{v:?}");
        let mut s = summary(&sha);
        s["samples_applied"]["lost"] = 1.into();
        assert!(check_process(&s, &expected())[0].contains("1 samples lost"));
        let mut s = summary(&sha);
        s["samples_applied"] = serde_json::json!([{ "epoch": 0, "per_partition": [2, 2] }]);
        assert!(check_process(&s, &expected())[0].contains("samples_applied.epochs is missing"));
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
