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
//! The [`process`] tier runs scenario files (`chaos-tests/scenarios/*.toml`,
//! `tier = "process"`) against real `phalanx node` processes through
//! [`phalanx::local`]: SIGKILL and SIGSTOP of nodes, restarts, partitions and
//! damaged links through a UDP fault relay, full disks, corrupted
//! checkpoints, a crash between checkpoint write and rename, a second
//! process with a member's identity and a rogue member forging messages; each
//! run is checked by [`invariants::check_process`] against the plain loop's
//! result (and, with a rogue, by [`invariants::forged_rejected`]).
//!
//! The entry points are [`sim::simulate`] for one run,
//! [`campaign::sim_campaign`] for a simulated campaign with its report and
//! [`process::process_campaign`] for the process tier; the
//! `phalanx-chaos` binary wraps them.

#![warn(missing_docs)]

pub mod campaign;
pub mod invariants;
pub mod nodes;
pub mod process;
pub mod report;
pub mod sim;
