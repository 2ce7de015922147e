//! The QUIC layer: a [`Transport`] per node, one connection per pair of nodes, frames on
//! unidirectional streams, events out through one queue.
//!
//! The life of a connection:
//!
//! 1. **TLS**: mutual TLS 1.3 against the cluster CA with ALPN `phalanx/8` ([`tls`](crate::tls)).
//!    A peer TLS refuses is reported as [`TransportEvent::Rejected`] with
//!    [`codes::HANDSHAKE_FAILED`].
//! 2. **Identity**: the peer's node id is the `node-<i>` name of its certificate.
//! 3. **Hello** on the first bidirectional stream ([`Hello`]): both sides send
//!    `{protocol version, node id, incarnation}`; a wrong version or an id other than the
//!    certificate's closes the connection with a reason code and a warning.
//! 4. **One connection per pair**: if both nodes dialled each other, the connection dialled
//!    by the lower id is kept and the other closed with [`codes::DUPLICATE`]. A connection from
//!    another incarnation of a peer supersedes the old one if it comes from the old one's
//!    address or once the old one has been silent for [`TransportConfig::restart_silence_ms`]
//!    (a restart); if the old one is still heard from,
//!    the newcomer is a second process with the same id and is refused with
//!    [`codes::DUPLICATE_IDENTITY`] — the refused side gets
//!    [`TransportEvent::DuplicateIdentity`].
//! 5. [`TransportEvent::PeerUp`], then one [`TransportEvent::Message`] per frame received, then
//!    [`TransportEvent::PeerDown`] once the connection is gone.
//!
//! A frame that breaks a codec rule closes *that* connection with the codec's reason code;
//! every other connection carries on.

mod clients;
pub(crate) mod config;
mod driver;
mod error;
mod hello;
mod inner;
mod link;
mod probe;
#[cfg(feature = "fault-injection")]
mod raw;
mod socket;
mod stats;
mod stream;
mod udp;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

#[cfg(feature = "fault-injection")]
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub use clients::{
    ClientReply, ReplyError, CLIENT_REQUEST_LIMITS, CLIENT_RESPONSE_LIMITS, MAX_CLIENT_CONNECTIONS, MAX_CLIENT_STREAMS,
};
pub use config::{
    TransportConfig, DEFAULT_CONNECTION_WINDOW_BYTES, DEFAULT_EVENT_QUEUE_LEN, DEFAULT_HELLO_TIMEOUT_MS,
    DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_KEEP_ALIVE_MS, DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER, DEFAULT_MAX_UDP_PAYLOAD,
    DEFAULT_RESTART_SILENCE_MS, DEFAULT_STREAM_WINDOW_BYTES, DEFAULT_UDP_BUFFER_BYTES, MAX_HANDSHAKES_PER_ADDRESS,
    MAX_PENDING_HANDSHAKES, UDP_PAYLOAD_RANGE,
};
pub use error::{BindError, ConfigError, ConnectError, SendError};
pub use hello::{Hello, HELLO_LIMITS};
pub use probe::PROBE_WAIT;
#[cfg(feature = "fault-injection")]
pub use raw::{RawSend, RawSendError};
pub use socket::bind_udp;
pub use stats::TransportStats;

use crate::codec::{check_frame_start, PREFIX_BYTES};
use crate::frame::OutFrame;
use crate::{codes, tls};
use inner::Inner;

/// What a [`Transport`] reports, in order, through the receiver [`Transport::bind`] returns.
///
/// For each peer: `PeerUp`, then its `Message`s, then `PeerDown`, then possibly `PeerUp`
/// again after a reconnect. Swapping one connection for another to the same running peer
/// (duplicate resolution) is not reported; a restart of the peer is (`PeerDown` then
/// `PeerUp`).
pub enum TransportEvent {
    /// A peer completed TLS and the hello: it is a member and frames can be sent to it.
    PeerUp {
        /// The peer's node id (from its certificate).
        peer: u32,
        /// The peer's UDP address.
        addr: SocketAddr,
    },
    /// The peer's connection is gone: closed by either side, timed out, or superseded by a
    /// connection from the peer's next incarnation. Frames in flight to it are lost.
    PeerDown {
        /// The peer.
        peer: u32,
        /// How the connection ended, for logs.
        reason: String,
    },
    /// The host of a silent peer said that no process listens at the peer's address any more
    /// (an answer to [`Transport::probe`]: the process died, its host is up). The connection
    /// is not closed by it: that is the caller's decision, as it is for silence.
    PeerGone {
        /// The peer.
        peer: u32,
        /// The address that was probed.
        addr: SocketAddr,
    },
    /// One frame from a peer.
    ///
    /// `frame` is the frame's body without the length prefix, with the version, header and
    /// tensor already checked against the envelope rules and the limits
    /// ([`check_frame`](crate::check_frame)); its tensor was read apart, straight into values.
    /// Only the header's content is left unchecked, because only the caller knows its type:
    /// decode it with `frame.decode::<YourHeader>(&limits)` (which takes the values over
    /// without a copy) and, if that fails, call
    /// [`Transport::reject`] with the error's [`reason_code`](crate::DecodeError::reason_code).
    Message {
        /// The sender.
        peer: u32,
        /// The frame body, holding its share of the receive budget until dropped (see
        /// [`RecvFrame`](crate::RecvFrame)).
        frame: crate::RecvFrame,
    },
    /// This node was refused by `peer` because another process with this node's id is
    /// already a live member there ([`codes::DUPLICATE_IDENTITY`]): this process is the
    /// second one. Retrying cannot help while the other runs; the caller should stop. If the
    /// connection had come up, its `PeerDown` follows.
    DuplicateIdentity {
        /// The node that refused this one.
        peer: u32,
        /// Its UDP address.
        addr: SocketAddr,
        /// Its reason: which member holds the id, at which address, which incarnation.
        reason: String,
    },
    /// A connection refused or closed for bad input: a certificate TLS refused, a
    /// certificate naming no node, a wrong version or id in the hello, a broken frame, a
    /// caller's [`Transport::reject`], a duplicate connection, or a second process with a
    /// live member's id ([`codes::DUPLICATE_IDENTITY`]).
    Rejected {
        /// The peer's UDP address.
        addr: SocketAddr,
        /// The peer's node id if its certificate was accepted.
        peer: Option<u32>,
        /// The close code (see [`codes`](crate::codes)).
        code: u32,
        /// Why, for logs.
        reason: String,
    },
    /// A peer's frame broke a codec rule — a length prefix above
    /// [`Limits::max_frame_bytes`](crate::Limits::max_frame_bytes), another protocol version,
    /// a truncated or malformed envelope, bytes after the frame on its stream — so its
    /// connection is closed with `code` (reported as [`Rejected`](Self::Rejected), then
    /// `PeerDown`, once it has ended). One event per bad frame, so that the caller can count
    /// frame-level violations per member; frames the caller cannot decode are the caller's
    /// to count (it calls [`Transport::reject`]).
    BadFrame {
        /// The member that sent it.
        peer: u32,
        /// The codec's close code ([`DecodeError::reason_code`](crate::DecodeError::reason_code),
        /// or [`codes::STREAM_FRAMING`]).
        code: u32,
        /// What was wrong, for logs.
        reason: String,
    },
    /// A request from a client (a connection on
    /// [`CLIENT_ALPN`](crate::tls::CLIENT_ALPN) with a client certificate): one frame body,
    /// checked like a [`Message`](Self::Message)'s, and the stream to answer on.
    ClientRequest {
        /// The client's name (`client-<name>` in its certificate).
        client: String,
        /// Its UDP address.
        addr: SocketAddr,
        /// The request frame's body.
        request: Vec<u8>,
        /// Where the answers go.
        reply: ClientReply,
    },
}

// Not derived: a message body can be 256 MiB.
impl fmt::Debug for TransportEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerUp { peer, addr } => f.debug_struct("PeerUp").field("peer", peer).field("addr", addr).finish(),
            Self::PeerDown { peer, reason } => {
                f.debug_struct("PeerDown").field("peer", peer).field("reason", reason).finish()
            }
            Self::PeerGone { peer, addr } => {
                f.debug_struct("PeerGone").field("peer", peer).field("addr", addr).finish()
            }
            Self::Message { peer, frame } => {
                f.debug_struct("Message").field("peer", peer).field("frame_bytes", &frame.len()).finish()
            }
            Self::DuplicateIdentity { peer, addr, reason } => f
                .debug_struct("DuplicateIdentity")
                .field("peer", peer)
                .field("addr", addr)
                .field("reason", reason)
                .finish(),
            Self::BadFrame { peer, code, reason } => f
                .debug_struct("BadFrame")
                .field("peer", peer)
                .field("code", &format_args!("{code:#x} ({})", codes::name(*code)))
                .field("reason", reason)
                .finish(),
            Self::ClientRequest { client, addr, request, .. } => f
                .debug_struct("ClientRequest")
                .field("client", client)
                .field("addr", addr)
                .field("request_bytes", &request.len())
                .finish(),
            Self::Rejected { addr, peer, code, reason } => f
                .debug_struct("Rejected")
                .field("addr", addr)
                .field("peer", peer)
                .field("code", &format_args!("{code:#x} ({})", codes::name(*code)))
                .field("reason", reason)
                .finish(),
        }
    }
}

/// What is known about a connected peer, from [`Transport::peer_info`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's node id.
    pub peer: u32,
    /// The peer's UDP address.
    pub addr: SocketAddr,
    /// The node that dialled the connection in use (this node or the peer).
    pub dialled_by: u32,
    /// The peer's incarnation (changes when it restarts).
    pub incarnation: u64,
    /// QUIC's current round-trip estimate.
    pub rtt: Duration,
}

/// A node's QUIC endpoint: dials and accepts peers, sends frames, reports events.
///
/// Cheap to clone; all clones drive the same endpoint. When the last clone is dropped the
/// endpoint is closed (without waiting); call [`shutdown`](Self::shutdown) to close it and
/// wait until peers were told.
///
/// ```
/// use phalanx_transport::{certs, encode, Limits, NodeIdentity, Transport, TransportConfig, TransportEvent};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// certs::generate(dir.path(), 2)?;
/// let any_port = "127.0.0.1:0".parse()?;
/// let (a, _a_events) = Transport::bind(TransportConfig::new(NodeIdentity::load(dir.path(), 0)?, any_port)).await?;
/// let (b, mut b_events) = Transport::bind(TransportConfig::new(NodeIdentity::load(dir.path(), 1)?, any_port)).await?;
///
/// let peer = a.connect(b.local_addr(), Some(1)).await?;
/// a.send(peer, encode(&"step 7", &[0.5, 1.5], &Limits::default())?)?;
///
/// loop {
///     match b_events.recv().await.expect("b is running") {
///         TransportEvent::PeerUp { peer, .. } => assert_eq!(peer, 0),
///         TransportEvent::Message { peer, frame } => {
///             let (decoded, _budget) = frame.decode::<String>(&Limits::default());
///             let frame = decoded?;
///             assert_eq!((peer, frame.header.as_str(), frame.tensor), (0, "step 7", vec![0.5, 1.5]));
///             break;
///         }
///         other => panic!("unexpected {other:?}"),
///     }
/// }
/// a.shutdown().await;
/// b.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
    /// Shared by the caller's clones only (not by the transport's own tasks), so its drop
    /// marks the moment nobody can use the transport any more.
    _owner: Arc<CloseOnDrop>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("node", &self.inner.id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

/// Closes the endpoint when the last user handle goes away; the transport's background
/// tasks then see every connection end and exit.
struct CloseOnDrop(quinn::Endpoint);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(quinn::VarInt::from_u32(codes::SHUTDOWN), b"transport dropped");
    }
}

impl Transport {
    /// Binds the UDP socket, starts accepting peers and returns the transport with its event
    /// receiver. Must run inside a tokio runtime.
    ///
    /// Keep receiving events: the queue is bounded ([`TransportConfig::event_queue_len`]) and
    /// a full queue stalls reading from peers (which then see QUIC flow control).
    pub async fn bind(config: TransportConfig) -> Result<(Transport, mpsc::Receiver<TransportEvent>), BindError> {
        let node = config.identity.id;
        tls::install_default_provider();
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BindError::NoRuntime { node })?;
        let quic = config.shared_quic_transport_config().map_err(|source| BindError::Config { node, source })?;
        let mut server = tls::quic_server_config(&config.identity)?;
        server.transport_config(quic.clone());
        let mut client = tls::quic_client_config(&config.identity)?;
        client.transport_config(quic);

        let listen = config.listen;
        let socket_error = |source| BindError::Socket { node, addr: listen, source };
        let socket = bind_udp(listen, config.udp_buffer_bytes).map_err(socket_error)?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // What peers may send this node: as large as the packets it searches for itself.
        endpoint_config.max_udp_payload_size(config.max_udp_payload).map_err(|_| BindError::Config {
            node,
            source: ConfigError::UdpPayload { max_udp_payload: config.max_udp_payload },
        })?;
        let quic_runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let socket = quic_runtime.wrap_udp_socket(socket).map_err(socket_error)?;
        let socket = Arc::new(udp::GsoBounded::new(socket));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(endpoint_config, Some(server), socket, quic_runtime)
            .map_err(socket_error)?;
        let local_addr = endpoint.local_addr().map_err(socket_error)?;

        let (events, receiver) = mpsc::channel(config.event_queue_len);
        let inner = Arc::new(Inner::new(&config, endpoint.clone(), client, local_addr, events, runtime.clone()));
        runtime.spawn(driver::accept_loop(inner.clone()));
        tracing::info!(node, %local_addr, incarnation = inner.incarnation, "transport bound");
        Ok((Transport { inner, _owner: Arc::new(CloseOnDrop(endpoint)) }, receiver))
    }

    /// The UDP address peers dial to reach this node.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's id (from its certificate).
    pub fn node_id(&self) -> u32 {
        self.inner.id
    }

    /// A random number drawn at [`bind`](Self::bind); peers see a new one when this node
    /// restarts ([`Hello::incarnation`]).
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// Dials the node at `addr` and returns its id, learned from its certificate.
    ///
    /// With `expect: Some(id)` the server must present node `id`'s certificate (TLS checks the
    /// name); with `None` any cluster node is accepted. Idempotent: if a live connection to
    /// that node (or that address) exists, it is reused and nothing is dialled. Returns once
    /// the hello is done and [`TransportEvent::PeerUp`] was queued, or the peer was already up.
    ///
    /// If both nodes dial each other at once, both calls succeed and the nodes keep one of
    /// the two connections (see [`codes::DUPLICATE`]). A dial whose handshake ends after the
    /// peer's own connection from that address was taken (its first packets were lost because
    /// the peer was not listening yet, so it completes a retransmission later) is dropped
    /// before its hello and returns the peer: the connection in use is never replaced by it.
    pub async fn connect(&self, addr: SocketAddr, expect: Option<u32>) -> Result<u32, ConnectError> {
        self.inner.connect(addr, expect).await
    }

    /// Sends one frame to `peer` on a new unidirectional stream.
    ///
    /// `frame` is a whole frame as [`encode`](crate::encode) builds it, length prefix
    /// included, or an [`OutFrame`] from [`encode_parts`](crate::encode_parts), whose tensor
    /// buffers go to QUIC without a copy; it is checked (prefix and envelope) before anything
    /// is sent. The write runs in the background, so this returns at once: `Ok` means the
    /// frame was queued, not that it arrived. At most [`TransportConfig::max_inflight_sends_per_peer`] writes per peer
    /// run at once; beyond that the frame is refused with [`SendError::Busy`] instead of
    /// being buffered without bound.
    ///
    /// Frames do not overtake each other's bytes but they may overtake each other: each has
    /// its own stream, so two frames sent in a row can arrive in either order.
    pub fn send(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        let frame = frame.into();
        self.check_outgoing(peer, &frame)?;
        self.inner.send(peer, frame)
    }

    /// Like [`send`](Self::send), but when [`TransportConfig::max_inflight_sends_per_peer`]
    /// writes are already running, waits for one to finish instead of returning
    /// [`SendError::Busy`]. The frame is queued when this returns `Ok`.
    ///
    /// For bulk producers (gradients, parameter slices) that should slow down to the pace
    /// of the network rather than handle `Busy` themselves.
    pub async fn send_when_ready(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        let frame = frame.into();
        self.check_outgoing(peer, &frame)?;
        self.inner.send_when_ready(peer, frame).await
    }

    /// Fault injection (the cargo feature `fault-injection`; a rogue member in the chaos
    /// harness): writes `bytes` to `peer` on a new unidirectional stream exactly as given,
    /// without the checks of [`send`](Self::send), so a frame may break any codec rule (an
    /// oversized length prefix, say, which makes the peer close the connection).
    ///
    /// Like [`send`](Self::send) it returns once the bytes are queued (`Ok`: handed to the
    /// transport) and refuses with [`SendError::Busy`] beyond
    /// [`TransportConfig::max_inflight_sends_per_peer`] writes in flight; the returned
    /// [`RawSend`] tells when the peer's QUIC stack has acknowledged every byte.
    #[cfg(feature = "fault-injection")]
    pub fn send_raw(&self, peer: u32, bytes: Vec<u8>) -> Result<RawSend, SendError> {
        self.inner.send_raw(peer, Bytes::from(bytes))
    }

    /// Ids of the peers with a live connection, ascending.
    pub fn peers(&self) -> Vec<u32> {
        self.inner.peers()
    }

    /// The connection in use to `peer`, if one is live.
    pub fn peer_info(&self, peer: u32) -> Option<PeerInfo> {
        self.inner.peer_info(peer)
    }

    /// Asks the host of `peer`'s live connection whether a process still listens at the
    /// peer's address: a datagram the peer's QUIC stack would drop, from a socket of its own;
    /// if the host refuses it (ICMP port unreachable) within
    /// [`PROBE_WAIT`], [`TransportEvent::PeerGone`] follows. No answer, no
    /// event (see the module `probe`'s docs for what each means). For a peer being probed
    /// already, or without a connection, it does nothing.
    pub fn probe(&self, peer: u32) {
        self.inner.probe(peer);
    }

    /// Closes the connection to `peer` with `code` and `reason` (a normal close, not a
    /// rejection). Its [`TransportEvent::PeerDown`] follows. Does nothing if it is not
    /// connected.
    pub fn disconnect(&self, peer: u32, code: u32, reason: &str) {
        self.inner.close_peer(peer, code, reason, false);
    }

    /// Closes the connection to `peer` because its input is bad (typically: a frame whose
    /// header the caller could not decode, with the error's
    /// [`reason_code`](crate::DecodeError::reason_code)). Logged as a warning, counted in
    /// [`TransportStats::rejected`], reported as [`TransportEvent::Rejected`] followed by
    /// [`TransportEvent::PeerDown`]. Does nothing if it is not connected.
    pub fn reject(&self, peer: u32, code: u32, reason: &str) {
        self.inner.close_peer(peer, code, reason, true);
    }

    /// Replaces the list of revoked certificates: handshakes presenting one are refused from
    /// now on, and live connections (members and clients) presenting one are closed at once
    /// with [`codes::REVOKED`].
    pub fn set_revocations(&self, list: crate::Revocations) {
        self.inner.set_revocations(list);
    }

    /// Closes every connection with [`codes::SHUTDOWN`], stops accepting and waits until the
    /// peers were told (QUIC's `wait_idle`). Call it before the process exits.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await;
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        self.inner.stats()
    }

    /// The number of open QUIC connections (hello done or not), updated as they open and
    /// close: await a count with [`watch::Receiver::wait_for`] instead of polling.
    pub fn watch_connections(&self) -> watch::Receiver<usize> {
        self.inner.connections.subscribe()
    }

    fn check_outgoing(&self, peer: u32, frame: &OutFrame) -> Result<(), SendError> {
        check_outgoing(peer, frame, &self.inner.limits)
    }
}

/// The checks [`Transport::send`] applies to a frame before anything is sent: the length
/// prefix counts the bytes after it, and the body passes [`check_frame`]. Shared with the
/// in-memory transport ([`crate::mem`]) so both refuse exactly the same frames.
pub(crate) fn check_outgoing(peer: u32, frame: &OutFrame, limits: &crate::Limits) -> Result<(), SendError> {
    let head = frame.head();
    let (prefix, start) = head.split_at_checked(PREFIX_BYTES).unwrap_or((&[], head));
    let prefix = <[u8; PREFIX_BYTES]>::try_from(prefix).map(u32::from_le_bytes).unwrap_or(0);
    let body_bytes = frame.len() - (head.len() - start.len());
    if prefix as usize != body_bytes || head.len() < PREFIX_BYTES {
        return Err(SendError::LengthMismatch { peer, prefix, body_bytes });
    }
    check_frame_start(start, body_bytes as u64, limits).map_err(|source| SendError::InvalidFrame { peer, source })
}

/// Locks a mutex whose holders never leave the data half-updated, so a poisoned lock (a
/// panic elsewhere while holding it) is still safe to use.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
