//! In-process fault injection: make a named actor panic at a given step.
//!
//! A fault is written as a [`FaultSpec`] such as `trainer:2@40`,
//! `shard:1@10`, `aggregator@55` (index 0 when omitted). Each spec fires
//! once by default; `x3` fires three times and `x*` at every attempt (a
//! *poison* step, used to show that the restart budget escalates instead of
//! looping forever).
//!
//! Only the spec, plain data, is in every build, so that a job's config reads
//! and travels the same whatever the build. What makes an actor panic, the
//! `FaultPlan` the actors consult, exists only with the cargo feature
//! `fault-injection`, which the chaos harness and the tests enable and a
//! default build of `phalanx` does not: there a job that names a fault is
//! refused when it is validated.
//!
//! The remaining counts are shared atomics rather than actor state on
//! purpose: the actor that fires a fault dies with it, and its replacement
//! must see that the fault already fired.

use std::fmt;
use std::str::FromStr;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicU32, Ordering};
#[cfg(feature = "fault-injection")]
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::protocol::{ActorKey, Role};

/// True when this build has the cargo feature `fault-injection`: the hooks
/// that make actors panic, a checkpoint save abort before its rename and an
/// aggregator count duplicates. A default build has none of them.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// Count meaning "fire at every attempt".
#[cfg(feature = "fault-injection")]
const ALWAYS: u32 = u32::MAX;

/// One injected fault: `role:index@step[xN|x*]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FaultSpec {
    /// Which actor.
    pub actor: ActorKey,
    /// The global step at which it fails.
    pub step: u64,
    /// How many times it fails there (`None` = every time).
    pub times: Option<u32>,
}

/// A fault spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad fault spec '{spec}': {reason} (expected ROLE[:INDEX]@STEP[xN|x*], ROLE one of trainer, shard, aggregator)"
)]
pub struct FaultSpecError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| FaultSpecError { spec: s.to_string(), reason: reason.to_string() };
        let (who, when) = s.trim().split_once('@').ok_or_else(|| err("missing '@STEP'"))?;
        let (role, index) = match who.split_once(':') {
            Some((r, i)) => (r, i.parse::<u32>().map_err(|_| err("INDEX is not a non-negative integer"))?),
            None => (who, 0),
        };
        let role = match role {
            "trainer" => Role::Trainer,
            "shard" => Role::Shard,
            "aggregator" => Role::Aggregator,
            _ => return Err(err("unknown ROLE")),
        };
        let (step, times) = match when.split_once('x') {
            Some((st, "*")) => (st, None),
            Some((st, n)) => {
                let n = n.parse::<u32>().map_err(|_| err("the count after 'x' is not a positive integer or '*'"))?;
                if n == 0 {
                    return Err(err("the count after 'x' must be at least 1"));
                }
                (st, Some(n))
            }
            None => (when, Some(1)),
        };
        let step = step.parse::<u64>().map_err(|_| err("STEP is not a non-negative integer"))?;
        Ok(FaultSpec { actor: ActorKey { role, index }, step, times })
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.actor.role, self.actor.index, self.step)?;
        match self.times {
            Some(1) => Ok(()),
            Some(n) => write!(f, "x{n}"),
            None => write!(f, "x*"),
        }
    }
}

impl TryFrom<String> for FaultSpec {
    type Error = FaultSpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<FaultSpec> for String {
    fn from(f: FaultSpec) -> String {
        f.to_string()
    }
}

/// The faults of a job and how often each may still fire. Cheap to clone.
/// Only with the cargo feature `fault-injection`.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    faults: Arc<[(FaultSpec, AtomicU32)]>,
}

#[cfg(feature = "fault-injection")]
impl FaultPlan {
    /// A plan with these faults.
    pub fn new(specs: impl IntoIterator<Item = FaultSpec>) -> Self {
        let faults: Vec<(FaultSpec, AtomicU32)> =
            specs.into_iter().map(|s| (s, AtomicU32::new(s.times.unwrap_or(ALWAYS)))).collect();
        Self { faults: faults.into() }
    }

    /// The specs.
    pub fn specs(&self) -> impl Iterator<Item = &FaultSpec> {
        self.faults.iter().map(|(s, _)| s)
    }

    /// Should `actor` fail now, at `step`? Consumes one firing.
    pub fn trip(&self, actor: ActorKey, step: u64) -> Option<FaultSpec> {
        for (spec, left) in self.faults.iter() {
            if spec.actor != actor || spec.step != step {
                continue;
            }
            let fired = left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                    0 => None,
                    ALWAYS => Some(ALWAYS),
                    n => Some(n - 1),
                })
                .is_ok();
            if fired {
                return Some(*spec);
            }
        }
        None
    }

    /// Panic if `actor` has a fault due at `step`. Used by the actors; the
    /// panic is caught by ractor and reported to the supervisor.
    pub fn maybe_panic(&self, actor: ActorKey, step: u64) {
        if let Some(spec) = self.trip(actor, step) {
            panic!("injected fault {spec}: {actor} at step {step}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_with_and_without_index_and_count() {
        let f: FaultSpec = "trainer:2@40".parse().unwrap();
        assert_eq!(f, FaultSpec { actor: ActorKey::trainer(2), step: 40, times: Some(1) });
        let f: FaultSpec = "aggregator@55".parse().unwrap();
        assert_eq!(f.actor, ActorKey::aggregator(0));
        let f: FaultSpec = "shard:1@10x*".parse().unwrap();
        assert_eq!(f.times, None);
        assert_eq!(f.to_string(), "shard:1@10x*");
        assert_eq!("shard:1@10x3".parse::<FaultSpec>().unwrap().times, Some(3));
    }

    #[test]
    fn bad_fault_specs_name_the_problem() {
        for (spec, needle) in [
            ("trainer:2", "missing '@STEP'"),
            ("worker:1@3", "unknown ROLE"),
            ("trainer:a@3", "INDEX"),
            ("trainer:1@z", "STEP"),
            ("trainer:1@3x0", "at least 1"),
        ] {
            let e = spec.parse::<FaultSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
            assert!(e.contains(spec), "{e}");
        }
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn a_fault_fires_exactly_as_often_as_asked() {
        let plan = FaultPlan::new(["trainer:1@5x2".parse().unwrap(), "shard:0@1x*".parse().unwrap()]);
        let t = ActorKey::trainer(1);
        assert!(plan.trip(t, 4).is_none());
        assert!(plan.trip(t, 5).is_some());
        assert!(plan.trip(t, 5).is_some());
        assert!(plan.trip(t, 5).is_none());
        for _ in 0..100 {
            assert!(plan.trip(ActorKey::shard(0), 1).is_some());
        }
        assert!(plan.trip(ActorKey::shard(1), 1).is_none());
    }
}
