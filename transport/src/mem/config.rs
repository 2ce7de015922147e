//! Settings of a [`MemNetwork`](super::MemNetwork), the faults of a link, and the network's
//! errors.

use std::net::SocketAddr;
use std::time::Duration;

use crate::endpoint::config::MAX_INFLIGHT_SENDS;
use crate::{Limits, DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER};

/// Default [`MemConfig::trace_capacity`]: entries kept by [`MemNetwork::trace`](super::MemNetwork::trace).
pub const DEFAULT_TRACE_CAPACITY: usize = 4096;
/// Largest [`MemConfig::trace_capacity`].
pub const MAX_TRACE_CAPACITY: usize = 1 << 20;
/// Largest delay plus jitter of a link: one hour, far beyond any idle timeout.
pub const MAX_LINK_DELAY: Duration = Duration::from_secs(3600);
/// Events other than messages (peer up and down, rejections, bad frames) queued for one node
/// that has not received them; beyond this they are dropped and counted in
/// [`NetStats::events_dropped`](super::NetStats::events_dropped). Messages are bounded by
/// the receive budget instead.
pub const MAX_QUEUED_LIFECYCLE_EVENTS: usize = 1 << 16;
/// Port of every node's fake address (see [`MemNetwork::addr_of`](super::MemNetwork::addr_of)).
pub const MEM_PORT: u16 = 7000;
/// Node ids must be below this (they are the low bits of a `10.0.0.0/8` address).
pub const MAX_NODE_ID: u32 = 1 << 24;

/// Settings shared by every node of a [`MemNetwork`](super::MemNetwork), with the QUIC
/// transport's defaults.
///
/// ```
/// use phalanx_transport::mem::MemConfig;
///
/// let mut config = MemConfig::default();
/// config.idle_timeout_ms = 1_000;
/// assert!(config.validate().is_ok());
/// assert_eq!(config.recv_budget_bytes_per_peer, 2 * config.limits.max_frame_bytes as usize);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemConfig {
    /// Frame limits, applied to every frame sent and received (as
    /// [`TransportConfig::limits`](crate::TransportConfig::limits)).
    pub limits: Limits,
    /// A connection end that hears nothing from its peer for this long is closed and reported
    /// `PeerDown` (as [`TransportConfig::idle_timeout_ms`](crate::TransportConfig::idle_timeout_ms));
    /// also how long a `connect` waits for a peer it cannot reach.
    pub idle_timeout_ms: u64,
    /// Frames in flight from one node to another (sent and not yet received by the peer's
    /// caller); a send beyond returns [`SendError::Busy`](crate::SendError::Busy).
    pub max_inflight_sends_per_peer: usize,
    /// Bytes in flight from one node to another, held until the receiving caller drops the
    /// frame it took from its events; a send beyond returns [`SendError::Busy`](crate::SendError::Busy)
    /// (unless nothing is in flight: one frame of the largest size always fits). At least
    /// `limits.max_frame_bytes`.
    pub recv_budget_bytes_per_peer: usize,
    /// Entries kept by [`MemNetwork::trace`](super::MemNetwork::trace) (the oldest go first);
    /// 0 keeps none.
    pub trace_capacity: usize,
}

impl Default for MemConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            limits,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            max_inflight_sends_per_peer: DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER,
            recv_budget_bytes_per_peer: default_recv_budget(&limits),
            trace_capacity: DEFAULT_TRACE_CAPACITY,
        }
    }
}

impl MemConfig {
    /// Sets `limits` and the receive budget that goes with them (twice the frame limit), as
    /// [`TransportConfig::with_limits`](crate::TransportConfig::with_limits) does.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self.recv_budget_bytes_per_peer = default_recv_budget(&limits);
        self
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), MemError> {
        let invalid = |field: &'static str, reason: String| Err(MemError::InvalidConfig { field, reason });
        if self.idle_timeout_ms == 0 || Duration::from_millis(self.idle_timeout_ms) > MAX_LINK_DELAY {
            return invalid("idle_timeout_ms", format!("{} ms is not within 1..=3600000", self.idle_timeout_ms));
        }
        let sends = self.max_inflight_sends_per_peer;
        if sends == 0 || u32::try_from(sends).map_or(true, |n| n > MAX_INFLIGHT_SENDS) {
            return invalid("max_inflight_sends_per_peer", format!("{sends} is not within 1..={MAX_INFLIGHT_SENDS}"));
        }
        if (self.recv_budget_bytes_per_peer as u64) < u64::from(self.limits.max_frame_bytes) {
            return invalid(
                "recv_budget_bytes_per_peer",
                format!(
                    "{} bytes is below the frame limit of {}",
                    self.recv_budget_bytes_per_peer, self.limits.max_frame_bytes
                ),
            );
        }
        if self.trace_capacity > MAX_TRACE_CAPACITY {
            return invalid("trace_capacity", format!("{} is above {MAX_TRACE_CAPACITY}", self.trace_capacity));
        }
        Ok(())
    }
}

/// The faults of one directed link (frames from one node to another), applied to each frame
/// when it is sent. The default is a perfect link: nothing lost or duplicated, no delay.
///
/// ```
/// use std::time::Duration;
/// use phalanx_transport::mem::LinkFaults;
///
/// let flaky = LinkFaults::default().loss(0.1).duplicate(0.05).delay(Duration::from_millis(2), Duration::from_millis(8));
/// assert_eq!(flaky.jitter, Duration::from_millis(8));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct LinkFaults {
    /// Probability that a frame is lost (never delivered), in `0.0..=1.0`.
    pub loss: f64,
    /// Probability that a frame is delivered twice (the copy with its own delay), in
    /// `0.0..=1.0`.
    pub duplicate: f64,
    /// Least time a frame spends on the link.
    pub delay: Duration,
    /// Extra time, drawn uniformly in `0..=jitter` per frame; frames sent in a row overtake
    /// each other when it exceeds the time between them.
    pub jitter: Duration,
}

impl LinkFaults {
    /// A perfect link.
    pub fn none() -> Self {
        Self::default()
    }

    /// With loss probability `p`.
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// With duplication probability `p`.
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// With a `delay` plus up to `jitter`.
    pub fn delay(mut self, delay: Duration, jitter: Duration) -> Self {
        self.delay = delay;
        self.jitter = jitter;
        self
    }

    /// Checks the faults of `link` (`None`: the default of every link).
    pub(crate) fn validate(&self, link: Option<(u32, u32)>) -> Result<(), MemError> {
        for (field, value) in [("loss", self.loss), ("duplicate", self.duplicate)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(MemError::Probability { link, field, value });
            }
        }
        if self.delay.saturating_add(self.jitter) > MAX_LINK_DELAY {
            return Err(MemError::Delay { link, delay: self.delay, jitter: self.jitter });
        }
        Ok(())
    }
}

/// Why a [`MemNetwork`](super::MemNetwork) operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// [`MemNetwork::new`](super::MemNetwork::new) was called outside a tokio runtime.
    #[error("MemNetwork::new must run inside a tokio runtime")]
    NoRuntime,
    /// A setting of the [`MemConfig`] is out of range.
    #[error("invalid MemConfig field {field}: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A node id too large for a fake address.
    #[error("node {node}: ids must be below {MAX_NODE_ID}")]
    NodeIdTooLarge {
        /// The id.
        node: u32,
    },
    /// The node is already running (a second process with its id is not modelled).
    #[error("node {node} is already running at {addr}")]
    NodeRunning {
        /// The node.
        node: u32,
        /// Its address.
        addr: SocketAddr,
    },
    /// The node was never added.
    #[error("node {node} is not part of the network")]
    UnknownNode {
        /// The node.
        node: u32,
    },
    /// The node crashed or shut down.
    #[error("node {node} is not running")]
    NodeNotRunning {
        /// The node.
        node: u32,
    },
    /// A probability outside `0.0..=1.0`.
    #[error("{}: {field} probability {value} is not within 0..=1", link_name(*link))]
    Probability {
        /// The link (sending node, receiving node); `None` for the default of every link.
        link: Option<(u32, u32)>,
        /// `loss` or `duplicate`.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// A delay plus jitter above [`MAX_LINK_DELAY`].
    #[error("{}: delay {delay:?} plus jitter {jitter:?} exceeds {MAX_LINK_DELAY:?}", link_name(*link))]
    Delay {
        /// The link (sending node, receiving node); `None` for the default of every link.
        link: Option<(u32, u32)>,
        /// The delay given.
        delay: Duration,
        /// The jitter given.
        jitter: Duration,
    },
    /// The link from `from` to `to` has as many frames or bytes in flight as the
    /// [`MemConfig`] allows.
    #[error("link {from}->{to}: {in_flight} frames in flight already")]
    Busy {
        /// Sending node.
        from: u32,
        /// Receiving node.
        to: u32,
        /// Frames in flight on the link.
        in_flight: usize,
    },
    /// [`MemNetwork::inject`](super::MemNetwork::inject) needs a connection from `from` to `to`.
    #[error("node {from} has no connection to node {to}")]
    NotConnected {
        /// Sending node.
        from: u32,
        /// Receiving node.
        to: u32,
    },
}

fn default_recv_budget(limits: &Limits) -> usize {
    usize::try_from(u64::from(limits.max_frame_bytes).saturating_mul(2)).unwrap_or(usize::MAX)
}

fn link_name(link: Option<(u32, u32)>) -> String {
    match link {
        Some((from, to)) => format!("link {from}->{to}"),
        None => "default link".to_owned(),
    }
}
