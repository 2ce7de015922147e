//! Running a job across nodes: membership, failure detection, placement.
//!
//! The cores here are sans-IO like the protocol's: the node runtime feeds
//! them heartbeats, views and clock ticks and carries out their commands
//! over the QUIC transport.

pub(crate) mod authority;
pub mod client_api;
pub mod command;
pub mod commits;
pub mod coordination;
pub mod event;
pub mod jobs;
pub mod membership;
pub mod node;
pub mod node_config;
pub mod node_job;
pub mod placement;
pub mod registry;
pub mod rejections;
pub mod replication;
pub(crate) mod restore_gate;
pub mod resume;
#[cfg(feature = "fault-injection")]
pub mod rogue;
pub mod runner;
pub mod step_events;
pub mod wire;

/// A default build has no rogue member: this stand-in for `rogue::Trigger` is never
/// signalled and forges nothing (a config asking for a rogue is refused before it is made).
#[cfg(not(feature = "fault-injection"))]
pub(crate) mod rogue {
    use super::event::Emitter;
    use super::jobs::Jobs;
    use super::membership::View;
    use super::node_config::NodeConfig;
    use crate::error::Error;

    pub(crate) struct Trigger;

    impl Trigger {
        pub(crate) fn new(_: &NodeConfig, _: &Emitter, _: &phalanx_transport::Transport) -> Result<Self, Error> {
            Ok(Self)
        }

        pub(crate) fn none(_: &NodeConfig) -> Result<Self, Error> {
            Ok(Self)
        }

        pub(crate) async fn signalled(&mut self) {
            std::future::pending::<()>().await
        }

        pub(crate) fn round(&mut self, _: Option<&View>, _: &mut Jobs) {}
    }
}
