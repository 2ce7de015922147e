//! What a node loop needs of a transport, as a trait: the QUIC [`Transport`](crate::Transport)
//! implements it, and so does the in-memory [`MemTransport`](crate::mem::MemTransport) of the
//! simulation tier, so one generic node loop runs over both.
//!
//! ```text
//!                       ┌───────────────────────── api::Transport ─────────────────────────┐
//!   node loop<T> ──────►│ local_addr · connect · send · send_when_ready · reject ·        │
//!        ▲              │ set_revocations · peer_info · shutdown                            │
//!        │              └──────────────┬───────────────────────────────────┬───────────────┘
//!        │                             │                                   │
//!        │                 crate::Transport (QUIC, mTLS)        mem::MemTransport (MemNetwork)
//!        │                             │                                   │
//!        └──── T::Events::recv() ◄─────┴──── TransportEvent ───────────────┘
//! ```
//!
//! The trait covers exactly what `runtime/src/cluster/node.rs` uses of the QUIC transport,
//! with the same signatures, errors and event contract (see [`TransportEvent`]): `PeerUp`,
//! then the peer's `Message`s, then `PeerDown`; frames checked by the codec before they are
//! delivered; a frame that breaks a codec rule closes its connection with the codec's code and
//! is reported as `BadFrame`. How a transport is created is not part of it (QUIC binds a
//! socket with certificates, the in-memory one joins a [`MemNetwork`](crate::mem::MemNetwork)):
//! each constructor returns the transport with its [`Events`].
//!
//! # Why return-position `impl Future + Send` rather than `async fn`
//!
//! A node loop spawns work on the transport — it dials seeds in `tokio::spawn`ed tasks — and
//! is itself spawned, so the futures of a *generic* transport must be `Send`. A plain
//! `async fn` in a public trait cannot promise that (rustc's `async_fn_in_trait` lint), and
//! `#[async_trait]` would box every call. So the async methods are declared as
//! `fn … -> impl Future<Output = …> + Send` (stable since Rust 1.75): implementations may still
//! write `async fn`, callers get `Send` futures, and nothing is boxed. For the same reason the
//! trait requires `Clone + Send + Sync + 'static` (a handle is cloned into spawned tasks) and
//! [`Events`] requires `Send + 'static`.
//!
//! ```
//! use phalanx_transport::api::{Events, Transport};
//! use phalanx_transport::TransportEvent;
//!
//! /// Dials `seed` in a spawned task, as the node loop does, and returns the first peer up.
//! async fn first_peer<T: Transport>(transport: T, mut events: T::Events, seed: std::net::SocketAddr) -> Option<u32> {
//!     let dialler = transport.clone();
//!     tokio::spawn(async move { dialler.connect(seed, None).await });
//!     while let Some(event) = events.recv().await {
//!         if let TransportEvent::PeerUp { peer, .. } = event {
//!             return Some(peer);
//!         }
//!     }
//!     None
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let network = phalanx_transport::mem::MemNetwork::new(7, Default::default())?;
//! let (a, a_events) = network.add_node(0)?;
//! let (_b, _b_events) = network.add_node(1)?;
//! assert_eq!(first_peer(a, a_events, network.addr_of(1)).await, Some(1));
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::mpsc;

use crate::{ConnectError, OutFrame, PeerInfo, Revocations, SendError, TransportEvent};

/// The operations of a node's transport that a node loop uses (see the [module docs](self)).
///
/// Every method has the meaning documented on the QUIC [`Transport`](crate::Transport)'s
/// method of the same name.
pub trait Transport: Clone + Send + Sync + 'static {
    /// The stream of [`TransportEvent`]s the transport's constructor returned with it.
    type Events: Events;

    /// The address peers dial to reach this node.
    fn local_addr(&self) -> SocketAddr;

    /// Dials the node at `addr` (with `expect: Some(id)`, only node `id` is accepted) and
    /// returns its id once the connection is up and `PeerUp` was queued, or at once if a live
    /// connection exists. See [`crate::Transport::connect`].
    fn connect(&self, addr: SocketAddr, expect: Option<u32>) -> impl Future<Output = Result<u32, ConnectError>> + Send;

    /// Sends one whole frame (length prefix included, as [`encode`](crate::encode) or
    /// [`encode_parts`](crate::encode_parts) builds it) to `peer`; `Ok` means queued, not
    /// arrived. See [`crate::Transport::send`].
    fn send(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError>;

    /// Like [`send`](Self::send), but waits while `peer`'s sends are at their bound instead
    /// of returning [`SendError::Busy`]; `Ok` means queued. See
    /// [`crate::Transport::send_when_ready`].
    fn send_when_ready(
        &self,
        peer: u32,
        frame: impl Into<OutFrame>,
    ) -> impl Future<Output = Result<(), SendError>> + Send;

    /// Closes the connection to `peer` for bad input with `code`: `Rejected`, then
    /// `PeerDown`. See [`crate::Transport::reject`].
    fn reject(&self, peer: u32, code: u32, reason: &str);

    /// Asks `peer`'s host whether a process still listens at its address; `PeerGone` follows
    /// if the host says none does. See [`crate::Transport::probe`].
    fn probe(&self, peer: u32);

    /// Replaces the revocation list; live connections of revoked peers close at once with
    /// [`codes::REVOKED`](crate::codes::REVOKED). See [`crate::Transport::set_revocations`].
    fn set_revocations(&self, list: Revocations);

    /// The live connection to `peer`, if any.
    fn peer_info(&self, peer: u32) -> Option<PeerInfo>;

    /// Closes every connection with [`codes::SHUTDOWN`](crate::codes::SHUTDOWN) and stops.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// The receiving end of a transport's events.
///
/// `recv` must be cancel-safe (a node loop polls it in `tokio::select!`): if its future is
/// dropped before it completes, no event is lost.
pub trait Events: Send + 'static {
    /// The next event; `None` once the transport is gone and every event was received.
    fn recv(&mut self) -> impl Future<Output = Option<TransportEvent>> + Send;
}

impl Events for mpsc::Receiver<TransportEvent> {
    fn recv(&mut self) -> impl Future<Output = Option<TransportEvent>> + Send {
        mpsc::Receiver::recv(self)
    }
}

/// The QUIC transport, by delegation to its inherent methods (no behaviour of its own).
impl Transport for crate::Transport {
    type Events = mpsc::Receiver<TransportEvent>;

    fn local_addr(&self) -> SocketAddr {
        crate::Transport::local_addr(self)
    }

    fn connect(&self, addr: SocketAddr, expect: Option<u32>) -> impl Future<Output = Result<u32, ConnectError>> + Send {
        crate::Transport::connect(self, addr, expect)
    }

    fn send(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        crate::Transport::send(self, peer, frame)
    }

    fn send_when_ready(
        &self,
        peer: u32,
        frame: impl Into<OutFrame>,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        crate::Transport::send_when_ready(self, peer, frame.into())
    }

    fn reject(&self, peer: u32, code: u32, reason: &str) {
        crate::Transport::reject(self, peer, code, reason)
    }

    fn probe(&self, peer: u32) {
        crate::Transport::probe(self, peer)
    }

    fn set_revocations(&self, list: Revocations) {
        crate::Transport::set_revocations(self, list)
    }

    fn peer_info(&self, peer: u32) -> Option<PeerInfo> {
        crate::Transport::peer_info(self, peer)
    }

    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        crate::Transport::shutdown(self)
    }
}
