//! Running a job across nodes: membership, failure detection, placement.
//!
//! The cores here are sans-IO like the protocol's: the node runtime feeds
//! them heartbeats, views and clock ticks and carries out their commands
//! over the QUIC transport.

pub(crate) mod authority;
pub mod client_api;
pub mod commits;
pub mod event;
pub mod jobs;
pub mod membership;
pub mod node;
pub mod node_job;
pub mod placement;
pub mod registry;
pub mod replication;
pub mod resume;
pub mod runner;
pub mod step_events;
pub mod wire;
