//! # phalanx-chaos: fault campaigns for Phalanx
//!
//! Phalanx promises exactly-once sample accounting and a final model
//! bit-identical to the fault-free run whatever fails. This crate tries hard
//! to break that promise.
//!
//! The [`sim`] tier runs the real protocol cores — [`phalanx_actors::protocol::TrainerCore`],
//! `AggregatorCore`, `ShardCore` and the supervisor's `JobCore` — in one
//! thread over a simulated network and a virtual clock. A seed chooses
//! crashes, restarts, partitions (an actor cut off from all others for a
//! while), message drops, duplicates, delays and reorderings; a
//! safety phase under faults is followed by a liveness phase after healing.
//! The same seed replays the same run exactly, so a failing seed is a
//! reproducible bug report.
//!
//! ```text
//!  seed ─▶ fault plan ─▶ event queue (virtual ms) ─▶ cores ─▶ commands ─▶ lossy network ─┐
//!                              ▲                                                          │
//!                              └──────────────────────────────────────────────────────────┘
//!  end ─▶ invariants: completes · exactly-once · bit-identical · replays identical · no split brain
//! ```
//!
//! The entry points are [`sim::simulate`] for one run and
//! [`campaign::sim_campaign`] for a campaign with its report; the
//! `phalanx-chaos` binary wraps them.

#![warn(missing_docs)]

pub mod campaign;
pub mod invariants;
pub mod process;
pub mod report;
pub mod sim;
