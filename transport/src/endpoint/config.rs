//! Settings of a [`Transport`](crate::Transport).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};

use super::error::ConfigError;
use crate::certs::NodeIdentity;
use crate::Limits;

/// Default [`TransportConfig::keep_alive_ms`]: a ping every 100 ms keeps an idle connection
/// from timing out and lets QUIC notice a dead peer early.
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 100;
/// Default [`TransportConfig::idle_timeout_ms`].
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_000;
/// Default [`TransportConfig::hello_timeout_ms`].
pub const DEFAULT_HELLO_TIMEOUT_MS: u64 = 2_000;
/// Default [`TransportConfig::restart_silence_ms`]: five keep-alive intervals, the default
/// failure timeout of a Phalanx node (which sets it from its own detector).
pub const DEFAULT_RESTART_SILENCE_MS: u64 = 5 * DEFAULT_KEEP_ALIVE_MS;
/// Default [`TransportConfig::udp_buffer_bytes`]: 4 MiB.
pub const DEFAULT_UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// The UDP payloads QUIC allows: at least 1200 bytes (RFC 9000 § 14), at most 65,527 (the
/// largest `max_udp_payload_size` transport parameter).
pub const UDP_PAYLOAD_RANGE: std::ops::RangeInclusive<u16> = 1_200..=65_527;
/// Default [`TransportConfig::max_udp_payload`]: the bound MTU discovery searches up to, the
/// largest QUIC allows (the path decides).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = *UDP_PAYLOAD_RANGE.end();
/// quinn's initial congestion window (RFC 9002: ten 1,472-byte datagrams); a connection
/// starts with room for two MTU probes of [`TransportConfig::max_udp_payload`] on top.
const INITIAL_WINDOW_BYTES: u64 = 14_720;
/// Default [`TransportConfig::stream_window_bytes`]: 16 MiB, more than one aggregator's range
/// of a 4 M-parameter model on one node.
pub const DEFAULT_STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Default [`TransportConfig::connection_window_bytes`]: 64 MiB.
pub const DEFAULT_CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// Default [`TransportConfig::max_inflight_sends_per_peer`].
pub const DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER: usize = 64;
/// Default [`TransportConfig::event_queue_len`].
pub const DEFAULT_EVENT_QUEUE_LEN: usize = 1024;
/// Handshakes (TLS and hello) accepted at once; further connection attempts are refused
/// until one finishes, so a flood of dialers cannot pile up tasks.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Most handshakes (TLS and hello) in progress from one address at once; more are refused
/// with [`codes::OVERLOADED`](crate::codes::OVERLOADED), so one source cannot hold every slot.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 8;

/// Everything [`Transport::bind`](crate::Transport::bind) needs. Build it with
/// [`TransportConfig::new`] and change the fields that matter.
///
/// ```
/// use phalanx_transport::{certs, NodeIdentity, TransportConfig};
///
/// let dir = tempfile::tempdir()?;
/// certs::generate(dir.path(), 1)?;
/// let mut config = TransportConfig::new(NodeIdentity::load(dir.path(), 0)?, "127.0.0.1:0".parse()?);
/// config.idle_timeout_ms = 1_000;
/// assert_eq!(config.keep_alive_ms, 100);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransportConfig {
    /// This node's id, certificate, key and trusted CA.
    pub identity: NodeIdentity,
    /// The configured cluster: node ids `0..members` may connect, a certificate naming any
    /// other id (signed by the same CA) is refused with [`codes::NOT_A_MEMBER`](crate::codes::NOT_A_MEMBER).
    /// `None` (the default): any id.
    pub members: Option<u32>,
    /// UDP address to listen on (port 0: any free port, see
    /// [`Transport::local_addr`](crate::Transport::local_addr)).
    pub listen: SocketAddr,
    /// Interval of QUIC keep-alive pings; must be below `idle_timeout_ms`.
    pub keep_alive_ms: u64,
    /// A connection from which nothing was heard for this long is closed (QUIC idle
    /// timeout). This is the transport's failure detection: about this long after a peer
    /// dies its `PeerDown` arrives. Sub-second detection needs heartbeats above.
    pub idle_timeout_ms: u64,
    /// A connection whose hello has not completed this long after its TLS handshake is
    /// closed with [`codes::HELLO_FAILED`](crate::codes::HELLO_FAILED).
    pub hello_timeout_ms: u64,
    /// A connection from another incarnation of a peer (a restart, or a second process with
    /// the same id) replaces the peer's live connection only once nothing has arrived on that
    /// connection for this long. If a frame arrives on it first, its process is alive and the
    /// newcomer is refused with
    /// [`codes::DUPLICATE_IDENTITY`](crate::codes::DUPLICATE_IDENTITY). So a live member
    /// is never replaced as long as it sends frames (heartbeats) more often than this; set
    /// it to the caller's failure-detection timeout. A restart that binds the old process's
    /// address again is taken at once (no second process can hold that address while the
    /// first lives); one from another address waits at most this long after the old
    /// process's last frame. At most `idle_timeout_ms`.
    pub restart_silence_ms: u64,
    /// Frame size limits, applied to every frame received and sent.
    pub limits: Limits,
    /// Kernel send and receive buffer of the UDP socket.
    pub udp_buffer_bytes: usize,
    /// The largest UDP payload MTU discovery searches for, and the largest this node accepts
    /// (quinn's `max_udp_payload_size`, advertised to peers). Connections start at 1200 bytes
    /// and probe upwards (quinn's binary search; a lost probe is not congestion, and black-hole
    /// detection falls back), so packets settle at the path's MTU: about 1,450 bytes on
    /// Ethernet, 9,000 on jumbo frames, 65,527 on loopback. 1200 to 65527; defaults to 65527
    /// ([`DEFAULT_MAX_UDP_PAYLOAD`]): the path decides. Lower it only for a path that drops
    /// large datagrams without telling (then every connection first loses a few probes).
    ///
    /// On loopback a 3-node step at 1.2 M parameters took 49.6 ms (104 ms of CPU) with
    /// quinn's bound of 1452, and 31–35 ms (68–75 ms of CPU) with 65527: fewer packets to
    /// encrypt, acknowledge and pass through the kernel. Large packets only pay because the
    /// socket keeps quinn's GSO batches within one UDP send (`endpoint::udp`; without it every
    /// batch above 65,507 bytes is lost), and the initial congestion window leaves room for
    /// the probes (see [`TransportConfig::quic_transport_config`]).
    pub max_udp_payload: u16,
    /// QUIC flow control of one stream (one frame): how many of its bytes a peer may send
    /// ahead of what this node has read ([`DEFAULT_STREAM_WINDOW_BYTES`]). A frame longer than
    /// this pauses for the window's updates, a round trip each, while both ends are busy: with
    /// quinn's 1.25 MB a 1.2 M-parameter step on two nodes (2.4 MB ranges) took 18.4 ms, with
    /// 16 MiB 17.5 ms (medians of 8 interleaved runs; three nodes 24.9 → 23.6 ms). At most
    /// `connection_window_bytes`, and not 0.
    pub stream_window_bytes: u32,
    /// QUIC flow control of a connection: the bytes a peer may have sent on all its streams
    /// ahead of what this node has read ([`DEFAULT_CONNECTION_WINDOW_BYTES`]); also the most
    /// this node keeps unacknowledged towards a peer. This bounds what quinn buffers for a
    /// peer whose frames this node does not read yet (its receive budget spent, its event
    /// queue full): without it, every allowed stream could fill its own window. At least
    /// `stream_window_bytes`.
    pub connection_window_bytes: u32,
    /// Frames being written to one peer at once; [`Transport::send`](crate::Transport::send)
    /// beyond that returns [`SendError::Busy`](crate::SendError::Busy). The peer is also
    /// allowed twice this many concurrent incoming streams.
    pub max_inflight_sends_per_peer: usize,
    /// Bytes of frames from one peer being received, queued as events or held by the receiver
    /// (each [`RecvFrame`](crate::RecvFrame) holds its bytes until dropped or
    /// [`into_vec`](crate::RecvFrame::into_vec)). A peer that sends more waits (QUIC flow
    /// control); must be at least
    /// `limits.max_frame_bytes`. Defaults to twice that.
    pub recv_budget_bytes_per_peer: usize,
    /// Capacity of the event queue returned by [`Transport::bind`](crate::Transport::bind).
    /// A full queue slows the peers down rather than dropping events; at least 2.
    pub event_queue_len: usize,
}

impl TransportConfig {
    /// A config with the defaults above for `identity` listening on `listen`.
    pub fn new(identity: NodeIdentity, listen: SocketAddr) -> Self {
        let limits = Limits::default();
        Self {
            identity,
            members: None,
            listen,
            keep_alive_ms: DEFAULT_KEEP_ALIVE_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            hello_timeout_ms: DEFAULT_HELLO_TIMEOUT_MS,
            restart_silence_ms: DEFAULT_RESTART_SILENCE_MS,
            limits,
            udp_buffer_bytes: DEFAULT_UDP_BUFFER_BYTES,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            stream_window_bytes: DEFAULT_STREAM_WINDOW_BYTES,
            connection_window_bytes: DEFAULT_CONNECTION_WINDOW_BYTES,
            max_inflight_sends_per_peer: DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER,
            recv_budget_bytes_per_peer: default_recv_budget(&limits),
            event_queue_len: DEFAULT_EVENT_QUEUE_LEN,
        }
    }

    /// Sets `limits` and the receive budget that goes with them (twice the frame limit).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self.recv_budget_bytes_per_peer = default_recv_budget(&limits);
        self
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (keep_alive_ms, idle_timeout_ms) = (self.keep_alive_ms, self.idle_timeout_ms);
        if keep_alive_ms == 0 || keep_alive_ms >= idle_timeout_ms {
            return Err(ConfigError::KeepAlive { keep_alive_ms, idle_timeout_ms });
        }
        if IdleTimeout::try_from(Duration::from_millis(idle_timeout_ms)).is_err() {
            return Err(ConfigError::IdleTimeoutTooLarge { idle_timeout_ms });
        }
        if self.hello_timeout_ms == 0 {
            return Err(ConfigError::ZeroHelloTimeout);
        }
        let restart_silence_ms = self.restart_silence_ms;
        if restart_silence_ms == 0 || restart_silence_ms > idle_timeout_ms {
            return Err(ConfigError::RestartSilence { restart_silence_ms, idle_timeout_ms });
        }
        if !UDP_PAYLOAD_RANGE.contains(&self.max_udp_payload) {
            return Err(ConfigError::UdpPayload { max_udp_payload: self.max_udp_payload });
        }
        let (stream_window_bytes, connection_window_bytes) = (self.stream_window_bytes, self.connection_window_bytes);
        if stream_window_bytes == 0 || stream_window_bytes > connection_window_bytes {
            return Err(ConfigError::FlowWindows { stream_window_bytes, connection_window_bytes });
        }
        let max_frame_bytes = self.limits.max_frame_bytes;
        if (self.recv_budget_bytes_per_peer as u64) < u64::from(max_frame_bytes) {
            return Err(ConfigError::RecvBudgetBelowFrameLimit {
                recv_budget_bytes_per_peer: self.recv_budget_bytes_per_peer,
                max_frame_bytes,
            });
        }
        let sends = self.max_inflight_sends_per_peer;
        if sends == 0 || u32::try_from(sends).map_or(true, |n| n > MAX_INFLIGHT_SENDS) {
            return Err(ConfigError::InflightSends { max_inflight_sends_per_peer: sends });
        }
        if self.event_queue_len < 2 {
            return Err(ConfigError::EventQueueTooShort { event_queue_len: self.event_queue_len });
        }
        Ok(())
    }

    /// The QUIC transport parameters these settings imply: keep-alive, idle timeout and
    /// stream limits. Public so benchmarks can run raw quinn with the same parameters.
    pub fn quic_transport_config(&self) -> Result<quinn::TransportConfig, ConfigError> {
        self.validate()?;
        let idle_timeout_ms = self.idle_timeout_ms;
        let idle = IdleTimeout::try_from(Duration::from_millis(idle_timeout_ms))
            .map_err(|_| ConfigError::IdleTimeoutTooLarge { idle_timeout_ms })?;
        let uni_streams = u32::try_from(self.max_inflight_sends_per_peer.saturating_mul(2)).unwrap_or(u32::MAX);
        let mut quic = quinn::TransportConfig::default();
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        quic.mtu_discovery_config(Some(mtu));
        // Room for MTU probes beside the first flight. With quinn's 14,720-byte initial window
        // two probes of a large path fill it, and quinn holds a CONNECTION_CLOSE back behind
        // congestion control while stream data is pending: a connection closed then (the
        // duplicate of a simultaneous dial, a refused hello) never told the peer, whose next
        // packets met a stateless reset instead ("reset by peer"), or nothing at all.
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(INITIAL_WINDOW_BYTES + 2 * u64::from(self.max_udp_payload));
        quic.congestion_controller_factory(Arc::new(cubic));
        quic.keep_alive_interval(Some(Duration::from_millis(self.keep_alive_ms)))
            .max_idle_timeout(Some(idle))
            .stream_receive_window(VarInt::from_u32(self.stream_window_bytes))
            .receive_window(VarInt::from_u32(self.connection_window_bytes))
            .send_window(u64::from(self.connection_window_bytes))
            .max_concurrent_uni_streams(VarInt::from_u32(uni_streams))
            // The hello is the only bidirectional stream either side opens.
            .max_concurrent_bidi_streams(VarInt::from_u32(1));
        Ok(quic)
    }

    pub(crate) fn shared_quic_transport_config(&self) -> Result<Arc<quinn::TransportConfig>, ConfigError> {
        self.quic_transport_config().map(Arc::new)
    }
}

/// Upper bound of [`TransportConfig::max_inflight_sends_per_peer`], so the peer's stream
/// limit (twice as many) stays a small QUIC varint.
pub(crate) const MAX_INFLIGHT_SENDS: u32 = 1 << 16;

fn default_recv_budget(limits: &Limits) -> usize {
    usize::try_from(u64::from(limits.max_frame_bytes).saturating_mul(2)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults for node 0 of a fresh cluster (the directory holds its certificates).
    fn config() -> (tempfile::TempDir, TransportConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::certs::generate(dir.path(), 1).expect("certs");
        let identity = NodeIdentity::load(dir.path(), 0).expect("identity");
        (dir, TransportConfig::new(identity, "127.0.0.1:0".parse().expect("addr")))
    }

    #[test]
    fn mtu_discovery_searches_up_to_the_configured_udp_payload() {
        let (_dir, mut config) = config();
        let quic = format!("{:?}", config.quic_transport_config().expect("valid"));
        assert!(quic.contains("upper_bound: 65527"), "{quic}");
        config.max_udp_payload = 1_452;
        let quic = format!("{:?}", config.quic_transport_config().expect("valid"));
        assert!(quic.contains("upper_bound: 1452"), "{quic}");
        // Outside QUIC's range: refused with the field's value, not left to quinn to panic on.
        for bad in [0, 1_199, 65_528] {
            config.max_udp_payload = bad;
            let err = config.quic_transport_config().expect_err("out of range");
            assert!(err.to_string().contains(&format!("max UDP payload of {bad} bytes")), "{err}");
        }
    }

    #[test]
    fn flow_control_windows_reach_quinn_and_are_checked() {
        let (_dir, mut config) = config();
        let quic = format!("{:?}", config.quic_transport_config().expect("valid"));
        assert!(quic.contains(&format!("stream_receive_window: {DEFAULT_STREAM_WINDOW_BYTES}")), "{quic}");
        assert!(quic.contains(&format!("receive_window: {DEFAULT_CONNECTION_WINDOW_BYTES}")), "{quic}");
        assert!(quic.contains(&format!("send_window: {DEFAULT_CONNECTION_WINDOW_BYTES}")), "{quic}");
        (config.stream_window_bytes, config.connection_window_bytes) = (1 << 20, 1 << 20);
        let quic = format!("{:?}", config.quic_transport_config().expect("equal windows are valid"));
        assert!(quic.contains("stream_receive_window: 1048576"), "{quic}");
        for (stream, connection) in [(0, 1 << 20), ((1 << 20) + 1, 1 << 20)] {
            (config.stream_window_bytes, config.connection_window_bytes) = (stream, connection);
            let err = config.quic_transport_config().expect_err("a stream window of 0 or above the connection's");
            let text = err.to_string();
            assert!(text.contains(&format!("stream window of {stream} bytes")), "{text}");
            assert!(text.contains(&format!("connection window of {connection}")), "{text}");
        }
    }
}
