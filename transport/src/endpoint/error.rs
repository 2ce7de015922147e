//! Errors of the transport's operations, one enum per operation.

use std::io;
use std::net::SocketAddr;

use crate::tls::TlsError;
use crate::DecodeError;

/// Settings of a [`TransportConfig`](crate::TransportConfig) that do not fit together.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The keep-alive interval is zero or not below the idle timeout, so idle connections
    /// would time out between pings.
    #[error("keep-alive of {keep_alive_ms} ms must be positive and below the idle timeout of {idle_timeout_ms} ms")]
    KeepAlive {
        /// The keep-alive interval.
        keep_alive_ms: u64,
        /// The idle timeout.
        idle_timeout_ms: u64,
    },
    /// The idle timeout does not fit QUIC's encoding.
    #[error("idle timeout of {idle_timeout_ms} ms is too large for QUIC")]
    IdleTimeoutTooLarge {
        /// The idle timeout.
        idle_timeout_ms: u64,
    },
    /// A zero hello timeout would refuse every peer.
    #[error("hello timeout must be positive")]
    ZeroHelloTimeout,
    /// The restart silence is zero (every restart would look like a duplicate, or the
    /// reverse) or above the idle timeout (the old connection is closed before it ends).
    #[error("restart silence of {restart_silence_ms} ms must be positive and at most the idle timeout of {idle_timeout_ms} ms")]
    RestartSilence {
        /// The restart silence.
        restart_silence_ms: u64,
        /// The idle timeout.
        idle_timeout_ms: u64,
    },
    /// The largest UDP payload is outside what QUIC allows
    /// ([`UDP_PAYLOAD_RANGE`](crate::UDP_PAYLOAD_RANGE)).
    #[error("max UDP payload of {max_udp_payload} bytes must be between 1200 and 65527")]
    UdpPayload {
        /// The configured payload.
        max_udp_payload: u16,
    },
    /// A flow-control window of 0 (nothing could ever be sent), or a stream's above the
    /// connection's (it could never be used).
    #[error("stream window of {stream_window_bytes} bytes must be positive and at most the connection window of {connection_window_bytes}")]
    FlowWindows {
        /// The stream's window.
        stream_window_bytes: u32,
        /// The connection's window.
        connection_window_bytes: u32,
    },
    /// The receive budget cannot hold one frame of the largest allowed size.
    #[error("receive budget of {recv_budget_bytes_per_peer} bytes is below the frame limit of {max_frame_bytes}")]
    RecvBudgetBelowFrameLimit {
        /// The budget.
        recv_budget_bytes_per_peer: usize,
        /// The frame limit.
        max_frame_bytes: u32,
    },
    /// The in-flight send limit is zero or above 65536.
    #[error("in-flight sends per peer must be within 1..=65536, not {max_inflight_sends_per_peer}")]
    InflightSends {
        /// The limit.
        max_inflight_sends_per_peer: usize,
    },
    /// The event queue must hold at least 2 events (a restart is reported as two at once).
    #[error("event queue of {event_queue_len} is too short; at least 2")]
    EventQueueTooShort {
        /// The capacity.
        event_queue_len: usize,
    },
}

/// Why [`Transport::bind`](crate::Transport::bind) failed. All are fatal for this config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// The settings do not fit together.
    #[error("node {node}: invalid transport config: {source}")]
    Config {
        /// The local node.
        node: u32,
        /// What is wrong.
        source: ConfigError,
    },
    /// The TLS configuration could not be built from the node identity.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be created or bound.
    #[error("node {node}: cannot bind UDP socket on {addr}: {source}")]
    Socket {
        /// The local node.
        node: u32,
        /// The listen address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// `bind` was called outside a tokio runtime.
    #[error("node {node}: Transport::bind must run inside a tokio runtime")]
    NoRuntime {
        /// The local node.
        node: u32,
    },
}

/// Why [`Transport::connect`](crate::Transport::connect) failed.
///
/// [`is_retryable`](Self::is_retryable) tells a network failure (dial again later) from a
/// refusal that will repeat.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport is shutting down.
    #[error("node {node}: transport is shutting down")]
    ShuttingDown {
        /// The local node.
        node: u32,
    },
    /// The caller asked to connect to this node itself.
    #[error("node {node}: cannot connect to itself")]
    SelfConnect {
        /// The local node.
        node: u32,
    },
    /// quinn refused to start the connection (for example an unroutable address).
    #[error("cannot dial {addr}: {source}")]
    Start {
        /// The address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The QUIC or TLS handshake failed: nothing answered in time, or the server's
    /// certificate is not a cluster certificate for the expected node.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// Another process with this node's id is already a live member at the peer, which
    /// closed the connection with [`codes::DUPLICATE_IDENTITY`](crate::codes::DUPLICATE_IDENTITY).
    /// Fatal for this process: it is the second one.
    #[error("node {peer} at {addr} refused this node: {reason}")]
    DuplicateIdentity {
        /// The address dialled.
        addr: SocketAddr,
        /// The node that refused.
        peer: u32,
        /// The peer's reason (which member holds the id, where, which incarnation).
        reason: String,
    },
    /// The connection closed during the hello: the peer refused this node (its certificate,
    /// its hello) or went away.
    #[error("connection to node {peer} at {addr} lost during the hello: {reason}")]
    Lost {
        /// The address dialled.
        addr: SocketAddr,
        /// The node the certificate named.
        peer: u32,
        /// How it ended.
        reason: String,
    },
    /// This node refused the peer (bad identity, wrong node, bad hello) and closed the
    /// connection with `code`.
    #[error("refused {addr} with code {code:#x}: {reason}")]
    Refused {
        /// The address dialled.
        addr: SocketAddr,
        /// The node the certificate named, if any.
        peer: Option<u32>,
        /// The close code (see [`codes`](crate::codes)).
        code: u32,
        /// Why.
        reason: String,
    },
}

impl ConnectError {
    /// Whether dialling again later may succeed (the peer may be starting or unreachable for
    /// now); `false` for refusals that will repeat and for shutdown.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Handshake { .. } | Self::Lost { .. })
    }
}

/// Why [`Transport::send`](crate::Transport::send) refused a frame. Nothing was sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// There is no live connection to the peer.
    #[error("no connection to node {peer}")]
    NotConnected {
        /// The peer.
        peer: u32,
    },
    /// As many frames as allowed are already being written to the peer; retry after some
    /// complete (back-pressure, not failure).
    #[error("node {peer} has {in_flight} sends in flight already")]
    Busy {
        /// The peer.
        peer: u32,
        /// The limit reached.
        in_flight: usize,
    },
    /// The length prefix does not count the bytes after it (use [`encode`](crate::encode)).
    #[error("frame for node {peer}: prefix says {prefix} bytes, {body_bytes} follow it")]
    LengthMismatch {
        /// The peer.
        peer: u32,
        /// The prefix value (0 if the frame is shorter than a prefix).
        prefix: u32,
        /// Bytes after the prefix.
        body_bytes: usize,
    },
    /// The frame's envelope is one the receiver refuses: oversize, another version, a bad
    /// header or tensor length (use [`encode`](crate::encode) with the same limits).
    #[error("not a valid frame for node {peer}: {source}")]
    InvalidFrame {
        /// The peer.
        peer: u32,
        /// What is wrong, as the receiver would report it.
        source: DecodeError,
    },
}
