//! Wire layer of Phalanx: how nodes' messages and tensors travel between them.
//!
//! Phalanx nodes are separate processes that talk over QUIC: one connection per pair of
//! nodes, mutual TLS against the cluster CA (a node's id is the `node-<i>` name in its
//! certificate), negotiated with the ALPN [`ALPN`]. Every connection starts with a
//! [`Hello`] on its first bidirectional stream; after that, every frame (a control message,
//! a gradient, a parameter slice) gets its own unidirectional stream, so a 100 MiB gradient
//! never queues in front of a heartbeat.
//!
//! ```text
//!   node 0                                                         node 3
//!  ┌───────────┐          one QUIC connection (mTLS, phalanx/8)   ┌───────────┐
//!  │ Transport │ ════════════════════════════════════════════════ │ Transport │
//!  │           │  bidi stream 0: Hello{version, id 0} ──►         │           │
//!  │           │                 ◄── Hello{version, id 3}         │           │
//!  │  send() ──┼─ uni stream: [len|frame] ──►  Message{peer: 0} ──┼─► events  │
//!  │  send() ──┼─ uni stream: [len|frame] ──►  Message{peer: 0} ──┼─► events  │
//!  │  events ◄─┼── Message{peer: 3} ◄── [len|frame] :uni stream ──┼── send()  │
//!  └───────────┘                                                  └───────────┘
//! ```
//!
//! The entry point of this crate is [`Transport::bind`]: it takes a [`TransportConfig`]
//! (a [`NodeIdentity`] loaded from the files [`certs::generate`] writes, a listen address,
//! timeouts and [`Limits`]) and returns the [`Transport`] handle with the receiver of its
//! [`TransportEvent`]s. [`Transport::connect`] dials a peer, [`Transport::send`] sends a frame
//! built by [`encode`], and each received frame arrives as [`TransportEvent::Message`] for
//! the caller to [`decode`] with its own header type.
//!
//! A node loop written against the [`api::Transport`] trait runs over this QUIC transport
//! or over [`mem::MemTransport`], an in-memory network of many nodes in one process with
//! seeded faults (loss, duplication, delay and reordering, asymmetric cuts, pauses, crashes
//! and restarts) for the simulation tier and fast tests; see [`mem`] for what it models.
//!
//! Below the transport sits the frame codec: [`encode`] turns a serde header and an `f32`
//! tensor into a frame, and [`FrameDecoder`] / [`decode`] turn bytes back into [`Frame`]s. The
//! codec is sans-IO: it never touches a socket, a task or a clock, so every rule about the
//! wire is tested with plain byte slices and fuzzed without a network. The transport only
//! moves bytes between streams and the codec.
//!
//! What a caller must know:
//!
//! * **No ordering between frames.** Each frame has its own stream, so frames from one peer
//!   may arrive in a different order than they were sent. Put a sequence number (or step,
//!   epoch) in the header if order matters.
//! * **No delivery guarantee.** [`Transport::send`] returns once the frame is queued; a
//!   connection that closes (peer death, duplicate resolution, restart) loses what was in
//!   flight. A peer's frames are delivered between its `PeerUp` and its `PeerDown`.
//! * **Keep draining the events.** The queue is bounded: while it is full, reading from
//!   peers pauses (QUIC flow control slows them down) and new peers wait for their `PeerUp`.
//! * **Back-pressure on sending.** [`Transport::send`] refuses with [`SendError::Busy`] beyond
//!   [`TransportConfig::max_inflight_sends_per_peer`] writes in flight;
//!   [`Transport::send_when_ready`] waits for a slot instead. Both may be called from any
//!   thread: writes run on the runtime `bind` was called on.
//! * **Failure detection is the idle timeout** ([`TransportConfig::idle_timeout_ms`], 3 s by
//!   default): a peer that dies without closing is reported `PeerDown` that long after.
//!   Faster detection needs heartbeats above this layer. A peer that restarts and reconnects
//!   before that is reported `PeerDown` then `PeerUp` with a new
//!   [`PeerInfo::incarnation`]: at once if it dials from its old address, else once its old
//!   connection has been silent for [`TransportConfig::restart_silence_ms`].
//! * **One live process per node id.** A second process presenting the id of a peer whose
//!   connection is still heard from is refused with [`codes::DUPLICATE_IDENTITY`]; it gets
//!   [`TransportEvent::DuplicateIdentity`] and should stop.
//! * **Bad input closes one connection**, never the node: a broken frame, a wrong version or
//!   a hello lying about the node id closes that connection with a reason code
//!   ([`codes`], [`DecodeError::reason_code`]), logged and reported as
//!   [`TransportEvent::Rejected`]; a member's frame that breaks a codec rule is also reported
//!   as [`TransportEvent::BadFrame`], one per frame, for the caller to count.
//!
//! # A frame's bytes
//!
//! ```text
//!  offset 0        4          6               10              10 + h            4 + len
//!         ┌────────┬──────────┬───────────────┬───────────────┬─────────────────┐
//!         │  len   │ version  │ header length │ header        │ tensor          │
//!         │ u32 LE │  u16 LE  │  h: u32 LE    │ bincode 2,    │ n × f32 LE,     │
//!         │        │    = 1   │               │ h bytes       │ raw bytes       │
//!         └────────┴──────────┴───────────────┴───────────────┴─────────────────┘
//!                  └───────────────── len bytes (≤ max_frame_bytes) ────────────┘
//! ```
//!
//! The tensor's length is whatever remains after the header, and must be a multiple of 4.
//! Every length is checked against [`Limits`] before anything is allocated for it; a frame that
//! breaks a rule yields a [`DecodeError`] whose [`DecodeError::reason_code`] is the QUIC
//! application close code for the connection, which is closed rather than resynchronised.
//!
//! # Example
//!
//! ```
//! use phalanx_transport::{encode, FrameDecoder, Limits};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! enum Msg {
//!     Gradient { step: u64, partition: u32 },
//!     Heartbeat,
//! }
//!
//! let limits = Limits::default();
//! let wire = encode(&Msg::Gradient { step: 7, partition: 2 }, &[0.5, -1.0], &limits)?;
//!
//! let mut decoder = FrameDecoder::new(limits);
//! decoder.push(&wire[..3]); // bytes may arrive in any chunks
//! assert!(decoder.next_frame::<Msg>()?.is_none());
//! decoder.push(&wire[3..]);
//! let frame = decoder.next_frame::<Msg>()?.expect("the whole frame was pushed");
//! assert_eq!(frame.header, Msg::Gradient { step: 7, partition: 2 });
//! assert_eq!(frame.tensor, [0.5, -1.0]);
//! assert_eq!(decoder.buffered(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod api;
pub mod certs;
pub mod client;
pub mod codec;
pub mod codes;
mod endpoint;
mod frame;
mod le_tensor;
pub mod mem;
pub mod revocation;
pub mod tls;

pub use certs::{CertError, ClientIdentity, NodeIdentity};
pub use client::{Answers, Client, ClientError};
pub use codec::{
    check_frame, decode, encode, encode_into, encode_parts, DecodeError, EncodeError, Frame, FrameDecoder, Limits,
    ALPN, PROTOCOL_VERSION,
};
pub use endpoint::{
    bind_udp, BindError, ClientReply, ConfigError, ConnectError, Hello, PeerInfo, ReplyError, SendError, Transport,
    TransportConfig, TransportEvent, TransportStats, CLIENT_REQUEST_LIMITS, CLIENT_RESPONSE_LIMITS,
    DEFAULT_CONNECTION_WINDOW_BYTES, DEFAULT_EVENT_QUEUE_LEN, DEFAULT_HELLO_TIMEOUT_MS, DEFAULT_IDLE_TIMEOUT_MS,
    DEFAULT_KEEP_ALIVE_MS, DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER, DEFAULT_MAX_UDP_PAYLOAD, DEFAULT_RESTART_SILENCE_MS,
    DEFAULT_STREAM_WINDOW_BYTES, DEFAULT_UDP_BUFFER_BYTES, HELLO_LIMITS, MAX_CLIENT_CONNECTIONS, MAX_CLIENT_STREAMS,
    MAX_HANDSHAKES_PER_ADDRESS, MAX_PENDING_HANDSHAKES, PROBE_WAIT, UDP_PAYLOAD_RANGE,
};
#[cfg(feature = "fault-injection")]
pub use endpoint::{RawSend, RawSendError};
pub use frame::{OutFrame, ReceiveBudget, RecvFrame, TensorBytes};
pub use le_tensor::LeTensor;
pub use revocation::{Revocations, Revoked};
