//! # phalanx-actors: the training protocol of Phalanx and its actors
//!
//! Phalanx trains a model with synchronous, deterministic data parallelism
//! and survives failures without changing a single bit of the result. This
//! crate holds everything that decides the math and the recovery:
//!
//! * [`data`] — datasets (built-in or CSV), the fixed split into P
//!   partitions, and the batch each partition feeds at each step (a pure
//!   function of `(seed, partition, epoch, step)`);
//! * [`model`] and [`optim`] — models with analytic gradients on ndarray and
//!   elementwise optimizers, all deterministic;
//! * [`protocol`] — the messages and the **sans-IO cores**: plain state
//!   machines that take an event and return what to send, checkpoint, spawn
//!   or time. Every rule (when a step is complete, what is a duplicate, what
//!   to replay) lives here and is unit-tested event by event;
//! * [`actor`] — ractor actors that each own one core and carry out its
//!   commands, with an OTP-style supervisor;
//! * [`checkpoint`] — atomic, checksummed safetensors checkpoints;
//! * [`faults`] — fault injection for tests and demos: the hooks exist only
//!   with the cargo feature `fault-injection` (off by default; the chaos
//!   harness and the tests enable it).
//!
//! ```text
//!   ShardActor(p) ──Batch(p,s)──▶ TrainerActor ──Gradient(s, subtree) ranges──▶ AggregatorActor(r)
//!                                      ▲                                     │ Σ_p in tree order,
//!                                      └────────────── Params θ_{s+1} ───────┘ optimizer, checkpoint
//! ```
//!
//! The entry point is [`actor::spawn_job`], given a [`actor::JobContext`];
//! the `phalanx` crate builds that context from a config and is what most
//! users embed.

#![warn(missing_docs)]

pub mod actor;
pub mod checkpoint;
pub mod clock;
pub mod data;
pub mod faults;
pub mod model;
pub mod net;
pub mod optim;
pub mod protocol;
