//! An in-memory network of nodes for the simulation tier and fast tests: [`MemNetwork`] holds
//! N nodes, each with a [`MemTransport`] that implements [`api::Transport`](crate::api::Transport)
//! and delivers the same [`TransportEvent`]s, by the same rules, as the QUIC
//! [`Transport`](crate::Transport) — with faults controlled at run time.
//!
//! ```text
//!            MemNetwork (seed, paused clock) — the handle that injects faults
//!   ┌─────────────────────────────────────────────────────────────────────────────┐
//!   │  node 0 ──link 0→1: loss · duplicate · delay+jitter · cut──► node 1          │
//!   │  (10.0.0.0:7000) ◄──link 1→0: its own faults, cut on its own── (10.0.0.1:7000)│
//!   │  pause / resume · crash / restart · inject raw bytes · stats · trace        │
//!   └─────────────────────────────────────────────────────────────────────────────┘
//!        ▲ send / connect / reject / probe …            │ MemEvents::recv
//!     MemTransport (node 1)         PeerUp · Message · PeerDown · PeerGone · BadFrame · Rejected
//! ```
//!
//! # What it models
//!
//! * **Connections** as QUIC has them: one per pair of nodes, `connect` to a node's fake
//!   address ([`MemNetwork::addr_of`]: `10.0.0.<id>:7000`) succeeds after a round trip when
//!   the link works both ways and yields `PeerUp` on both sides; a dial that cannot complete
//!   (a cut, a paused or absent node) waits for the link to work until the idle timeout and
//!   then fails with [`ConnectError::Handshake`] (`TimedOut`), as QUIC's handshake does.
//!   Dialling a live peer returns at once; two dials at once keep one connection.
//! * **The event contract**: for each peer `PeerUp`, its `Message`s, `PeerDown`, and `PeerUp`
//!   again after a reconnect; frames only between those.
//! * **Framing**: [`send`](MemTransport::send) checks frames exactly as the QUIC transport's
//!   does (same [`SendError`]s); on arrival every stream goes through the QUIC reader's rules
//!   ([`check_frame`](crate::check_frame) and the prefix, version, truncation and trailing-byte
//!   checks before it), and a frame that breaks one closes the connection with the same code,
//!   reported as `BadFrame`, `Rejected` and `PeerDown` at the receiver and `PeerDown` ("closed by
//!   the peer with code …") at the sender. [`MemNetwork::inject`] puts any bytes on a link, as a
//!   rogue member's `send_raw` would.
//! * **Liveness by idle timeout**: an end of a connection that hears nothing from the other
//!   for [`MemConfig::idle_timeout_ms`] (default: the QUIC default) closes with `PeerDown`
//!   ("idle timeout …"). It hears the other while the other end is open, its node runs
//!   unpaused and that direction is not cut — QUIC's keep-alives, which loss does not stop.
//!   So a crashed node is reported down that long after, by each peer; a node that restarts
//!   and dials again first is reported `PeerDown` ("node restarted …") then `PeerUp` at once,
//!   as QUIC reports a restart from the same address.
//! * **Probes** ([`MemTransport::probe`]): the host of a crashed or stopped node refuses a
//!   probe (`PeerGone` at the prober after a round trip), as a live host answers a UDP
//!   datagram to a closed port; a running node, paused or not, answers nothing. Probes and
//!   refusals are lost to cuts and to the links' loss.
//! * **Faults**, per directed link ([`LinkFaults`]): loss and duplication probabilities, a
//!   delay plus uniform jitter (which reorders frames); asymmetric cuts ([`MemNetwork::cut`]:
//!   `a → b` cut while `b → a` works); whole-node pauses (a paused node's incoming frames queue
//!   up and are delivered on [`resume`](MemNetwork::resume), its sends are held and go out then,
//!   its own timers stand still while its peers' run); crashes (the node's ends vanish
//!   without a close; its event stream ends) and restarts (a new incarnation, new handles).
//! * **Bounds**: per directed link at most [`MemConfig::max_inflight_sends_per_peer`] frames and
//!   [`MemConfig::recv_budget_bytes_per_peer`] bytes in flight, counted from `send` until the
//!   receiving caller drops the [`RecvFrame`](crate::RecvFrame) it took from its [`MemEvents`]; a send beyond gets
//!   [`SendError::Busy`], the error the QUIC transport returns when a peer does not keep up.
//!   Other queued events are capped by [`MAX_QUEUED_LIFECYCLE_EVENTS`], the trace by
//!   [`MemConfig::trace_capacity`].
//! * **Determinism**: every random choice comes from one ChaCha8 generator seeded by
//!   [`MemNetwork::new`] (portable across platforms and `rand` versions), every time from
//!   tokio's clock, and all changes happen under one lock, from the caller's call or from one
//!   driver task; no thread, no wall clock. Under `#[tokio::test(start_paused = true)]` (a
//!   current-thread runtime with a paused clock) the same seed and the same calls give the
//!   same [`trace`](MemNetwork::trace), the same events at the same virtual times.
//! * **Counters** of what the network did ([`NetStats`], per link [`LinkStats`]): delivered,
//!   lost, cut, duplicated, reordered, held by pauses, dropped, bad frames, busy.
//!
//! # What it does not model
//!
//! * **No TLS, no certificates**: a node's id is its position in the network. Revocation lists
//!   apply to their `node-<id>` entries only ([`codes::REVOKED`](crate::codes::REVOKED), at
//!   once on live connections and at the handshake); certificate expiry does not exist.
//! * **No congestion or flow control, no bandwidth**: a frame's time on a link is its delay
//!   and jitter whatever its size; back-pressure is the budget above, refused at once
//!   (`Busy`) rather than slowing the sender down as QUIC flow control does.
//! * **No retransmission**: a lost or cut frame is gone, even on a connection that survives
//!   (QUIC would resend it after a short cut). The simulation is harsher than QUIC here on
//!   purpose: the control plane must survive losing any message. Handshakes and close notices
//!   are not subject to loss (QUIC retransmits them); a close notice is lost to a cut.
//! * **No second process with a live member's id** (`DuplicateIdentity`), **no client API**
//!   (`ClientRequest`). `send_when_ready` re-checks the bound every millisecond rather than
//!   being woken when room frees.
//!
//! ```
//! use std::time::Duration;
//! use phalanx_transport::mem::{LinkFaults, MemConfig, MemNetwork};
//! use phalanx_transport::{encode, Limits, TransportEvent};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let network = MemNetwork::new(42, MemConfig::default())?;
//! let (a, _a_events) = network.add_node(0)?;
//! let (_b, mut b_events) = network.add_node(1)?;
//! network.set_link(0, 1, LinkFaults::none().delay(Duration::from_millis(5), Duration::ZERO))?;
//!
//! assert_eq!(a.connect(network.addr_of(1), Some(1)).await?, 1);
//! a.send(1, encode(&"hello", &[], &Limits::default())?)?;
//! assert!(matches!(b_events.recv().await, Some(TransportEvent::PeerUp { peer: 0, .. })));
//! assert!(matches!(b_events.recv().await, Some(TransportEvent::Message { peer: 0, .. })));
//! assert_eq!(network.stats().frames.delivered, 1);
//! # Ok(())
//! # }
//! ```

mod config;
mod conns;
mod flow;
mod frames;
mod state;
mod stats;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use config::{
    LinkFaults, MemConfig, MemError, DEFAULT_TRACE_CAPACITY, MAX_LINK_DELAY, MAX_NODE_ID, MAX_QUEUED_LIFECYCLE_EVENTS,
    MAX_TRACE_CAPACITY, MEM_PORT,
};
pub use stats::{LinkStats, NetStats, TraceEntry, TraceEvent};

use crate::endpoint::check_outgoing;
use crate::{ConnectError, Limits, OutFrame, PeerInfo, Revocations, SendError, TransportEvent, TransportStats};
use flow::Sender;
use state::{Popped, Shared, State};

/// An in-memory network of nodes and the handle that controls its faults (see the
/// [module docs](self)). Cheap to clone; all clones control the same network.
#[derive(Clone)]
pub struct MemNetwork {
    shared: Arc<Shared>,
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("MemNetwork")
            .field("seed", &state.seed)
            .field("nodes", &state.nodes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MemNetwork {
    /// An empty network whose random choices all come from `seed`. Must run inside a tokio
    /// runtime: it spawns the one task that moves frames and timers along (it ends when every
    /// handle of the network is dropped).
    pub fn new(seed: u64, config: MemConfig) -> Result<Self, MemError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| MemError::NoRuntime)?;
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared { state: Mutex::new(State::new(seed, config)), wake: wake.clone() });
        runtime.spawn(flow::drive(Arc::downgrade(&shared), wake));
        Ok(Self { shared })
    }

    /// The seed the network was created with, for reports.
    pub fn seed(&self) -> u64 {
        self.shared.lock().seed
    }

    /// The settings every node uses.
    pub fn config(&self) -> MemConfig {
        self.shared.lock().config.clone()
    }

    /// The fake address of node `id` (`10.0.0.<id>:7000` for ids below 256; ids are the low
    /// 24 bits of a `10.0.0.0/8` address).
    pub fn addr_of(&self, id: u32) -> SocketAddr {
        state::addr_of(id)
    }

    /// Virtual time since the network was created.
    pub fn elapsed(&self) -> Duration {
        let start = self.shared.lock().start;
        Instant::now().saturating_duration_since(start)
    }

    /// Starts node `id` (its first incarnation) and returns its transport and events, as
    /// [`Transport::bind`](crate::Transport::bind) does.
    pub fn add_node(&self, id: u32) -> Result<(MemTransport, MemEvents), MemError> {
        self.start(id, false)
    }

    /// Starts a new incarnation of node `id`, which crashed or shut down: new handles (the old
    /// ones stay dead), a new [`PeerInfo::incarnation`], no connections yet, no revocations.
    pub fn restart(&self, id: u32) -> Result<(MemTransport, MemEvents), MemError> {
        self.start(id, true)
    }

    fn start(&self, id: u32, restart: bool) -> Result<(MemTransport, MemEvents), MemError> {
        let (gen, incarnation, limits) = self.shared.mutate(|state| {
            state.start(Instant::now(), id, restart).map(|(gen, incarnation)| (gen, incarnation, state.config.limits))
        })?;
        let transport = MemTransport { shared: self.shared.clone(), node: id, gen, incarnation, limits };
        let events = MemEvents { shared: self.shared.clone(), node: id, gen };
        Ok((transport, events))
    }

    /// Kills node `id`'s process: its connections vanish without a close (each peer reports
    /// `PeerDown` after its idle timeout, or at once when the node restarts and dials it), what
    /// was queued for it is lost, its event stream ends and its handles go dead.
    pub fn crash(&self, id: u32) -> Result<(), MemError> {
        self.shared.mutate(|state| state.crash(Instant::now(), id))
    }

    /// Stops node `id` as SIGSTOP would: frames reaching it wait until it resumes, frames it
    /// sends wait too, nothing it could do goes out (no keep-alive either, so its peers'
    /// idle timers run, while its own stand still). Pausing a paused node does nothing.
    pub fn pause(&self, id: u32) -> Result<(), MemError> {
        self.shared.mutate(|state| state.pause(Instant::now(), id))
    }

    /// Resumes a paused node: what it sent goes on the wire and what reached it is delivered,
    /// each in order, as of now.
    pub fn resume(&self, id: u32) -> Result<(), MemError> {
        self.shared.mutate(|state| state.resume(Instant::now(), id))
    }

    /// Sets the faults of every link without faults of its own.
    pub fn set_default_link(&self, faults: LinkFaults) -> Result<(), MemError> {
        faults.validate(None)?;
        self.shared.mutate(|state| state.default_faults = faults);
        Ok(())
    }

    /// Sets the faults of the link from `from` to `to` (the other direction keeps its own).
    /// They apply to frames sent from now on.
    pub fn set_link(&self, from: u32, to: u32, faults: LinkFaults) -> Result<(), MemError> {
        self.shared.mutate(|state| state.set_link(from, to, faults))
    }

    /// Cuts the link from `from` to `to`: frames on it (sent, or due to arrive) are lost, and
    /// `to` stops hearing `from` (its idle timer runs). The other direction is untouched.
    pub fn cut(&self, from: u32, to: u32) {
        self.shared.mutate(|state| state.set_cut(Instant::now(), from, to, true));
    }

    /// Restores the link from `from` to `to`.
    pub fn heal(&self, from: u32, to: u32) {
        self.shared.mutate(|state| state.set_cut(Instant::now(), from, to, false));
    }

    /// Cuts both directions between `id` and every node added so far.
    pub fn isolate(&self, id: u32) {
        self.shared.mutate(|state| {
            let now = Instant::now();
            let others: Vec<u32> = state.nodes.keys().copied().filter(|&other| other != id).collect();
            for other in others {
                state.set_cut(now, id, other, true);
                state.set_cut(now, other, id, true);
            }
        });
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        self.shared.mutate(|state| state.heal_all(Instant::now()));
    }

    /// Puts `bytes` on the connection from `from` to `to` as one stream, exactly as given (as
    /// a rogue member's `send_raw` does): an oversized prefix, a foreign version or trailing
    /// bytes make `to` close the connection with the codec's code. Subject to the link's
    /// faults and budget like any frame.
    pub fn inject(&self, from: u32, to: u32, bytes: Vec<u8>) -> Result<(), MemError> {
        self.shared.mutate(|state| {
            if !state.nodes.contains_key(&from) {
                return Err(MemError::UnknownNode { node: from });
            }
            state.send(Instant::now(), from, Sender::Injected, to, bytes).map_err(|refused| refused.mem_error(from, to))
        })
    }

    /// What the network did, all links summed.
    pub fn stats(&self) -> NetStats {
        self.shared.lock().net_stats()
    }

    /// What the network did on the link from `from` to `to`.
    pub fn link_stats(&self, from: u32, to: u32) -> LinkStats {
        self.shared.lock().links.get(&(from, to)).map(|link| link.stats).unwrap_or_default()
    }

    /// The last [`MemConfig::trace_capacity`] things the network did, oldest first: every
    /// frame's fate and every `PeerUp` / `PeerDown`, crash, restart and pause, with virtual
    /// times. Two runs with the same seed and the same calls have the same trace.
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.shared.lock().trace()
    }

    /// Returns once nothing is on the wire (every frame sent so far was delivered, lost,
    /// dropped, or is held by a pause). Under a paused clock this moves virtual time to the
    /// last arrival.
    pub async fn settled(&self) {
        let mut on_wire = self.shared.lock().on_wire.subscribe();
        // The sender lives as long as the network, which `self` keeps alive.
        let _ = on_wire.wait_for(|&n| n == 0).await;
    }
}

/// One node's transport on a [`MemNetwork`]: what [`Transport`](crate::Transport) is for QUIC,
/// with the same methods, errors and events (see the [module docs](self) for the
/// differences). Cheap to clone. Once its node crashes or shuts down, a handle is dead:
/// sends fail with [`SendError::NotConnected`] and connects with
/// [`ConnectError::ShuttingDown`]; [`MemNetwork::restart`] returns new handles.
#[derive(Clone)]
pub struct MemTransport {
    shared: Arc<Shared>,
    node: u32,
    gen: u64,
    incarnation: u64,
    limits: Limits,
}

impl fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemTransport")
            .field("node", &self.node)
            .field("incarnation", &format_args!("{:#x}", self.incarnation))
            .finish_non_exhaustive()
    }
}

impl MemTransport {
    /// The node's fake address.
    pub fn local_addr(&self) -> SocketAddr {
        state::addr_of(self.node)
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.node
    }

    /// This incarnation's number (a draw of the network's RNG; a restart draws another).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Dials the node at `addr`; see [`Transport::connect`](crate::Transport::connect) and the
    /// [module docs](self). Waits (in virtual time) for a round trip of the two links' delays,
    /// or for the link to work, at most the idle timeout.
    pub async fn connect(&self, addr: SocketAddr, expect: Option<u32>) -> Result<u32, ConnectError> {
        let node = self.node;
        let (mut changes, deadline) = {
            let mut state = self.shared.lock();
            if !state.alive(node, self.gen) {
                return Err(ConnectError::ShuttingDown { node });
            }
            if expect == Some(node) {
                return Err(ConnectError::SelfConnect { node });
            }
            if addr == self.local_addr() {
                return Err(state.refuse_self(node, addr));
            }
            if let Some(peer) = state.live_peer(node, addr, expect) {
                return Ok(peer);
            }
            (state.changes.subscribe(), Instant::now() + state.idle_timeout())
        };
        let timed_out = || ConnectError::Handshake { addr, source: quinn::ConnectionError::TimedOut };
        loop {
            changes.borrow_and_update();
            let rtt = self.shared.mutate(|state| {
                if state.alive(node, self.gen) {
                    Ok(state.handshake_rtt(node, addr))
                } else {
                    Err(ConnectError::ShuttingDown { node })
                }
            })?;
            if let Some(rtt) = rtt {
                if Instant::now() + rtt > deadline {
                    tokio::time::sleep_until(deadline).await;
                    return Err(timed_out());
                }
                tokio::time::sleep(rtt).await;
                let outcome = self.shared.mutate(|state| {
                    if state.alive(node, self.gen) {
                        state.try_establish(Instant::now(), node, addr, expect)
                    } else {
                        Some(Err(ConnectError::ShuttingDown { node }))
                    }
                });
                if let Some(outcome) = outcome {
                    return outcome;
                }
                // The link broke during the handshake: wait for it again.
                continue;
            }
            tokio::select! {
                biased;
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(ConnectError::ShuttingDown { node });
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
            }
        }
    }

    /// Sends one frame to `peer`; see [`Transport::send`](crate::Transport::send). Checked as
    /// the QUIC transport checks it, then refused with [`SendError::Busy`] if the link's
    /// budget is spent, else on its way (or held, if this node is paused).
    pub fn send(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        let frame = frame.into();
        check_outgoing(peer, &frame, &self.limits)?;
        // The in-memory network delivers one buffer per frame (a copy when the tensor was
        // held apart).
        let frame = frame.into_vec();
        self.shared
            .mutate(|state| state.send(Instant::now(), self.node, Sender::Node { gen: self.gen }, peer, frame))
            .map_err(|refused| refused.send_error(peer))
    }

    /// Like [`send`](Self::send), but while the link to `peer` is at its bound (where `send`
    /// returns [`SendError::Busy`]) it waits — re-checking every millisecond of tokio's clock,
    /// so virtual time under a paused clock — until the receiver has taken enough frames.
    /// Any other refusal returns at once.
    pub async fn send_when_ready(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        let frame = frame.into();
        check_outgoing(peer, &frame, &self.limits)?;
        let frame = frame.into_vec();
        let len = frame.len();
        let mut frame = Some(frame);
        loop {
            let sent = self.shared.mutate(|state| {
                state.has_room(self.node, peer, len).then(|| {
                    let frame = frame.take().expect("taken once");
                    state.send(Instant::now(), self.node, Sender::Node { gen: self.gen }, peer, frame)
                })
            });
            match sent {
                Some(result) => return result.map_err(|refused| refused.send_error(peer)),
                None => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }

    /// Ids of the peers with an open connection here, ascending.
    pub fn peers(&self) -> Vec<u32> {
        self.shared.lock().peers(self.node, self.gen)
    }

    /// The connection to `peer`, if open here (its `rtt` is the two links' base delays).
    pub fn peer_info(&self, peer: u32) -> Option<PeerInfo> {
        self.shared.lock().peer_info(self.node, self.gen, peer)
    }

    /// Closes the connection to `peer` for bad input: `Rejected` then `PeerDown` here,
    /// `PeerDown` at the peer once the close reaches it. Does nothing if not connected.
    pub fn reject(&self, peer: u32, code: u32, reason: &str) {
        self.close(peer, code, reason, true);
    }

    /// Asks whether a process still listens at `peer`'s address, as the QUIC transport's
    /// [`probe`](crate::Transport::probe) does: the probe travels the link `self → peer` (a
    /// cut or a loss stops it); if `peer` crashed or stopped, its host's refusal travels
    /// back and arrives as `PeerGone`. A running peer, paused or not, answers nothing. Only
    /// for a peer with an open connection here.
    pub fn probe(&self, peer: u32) {
        self.shared.mutate(|state| state.probe(Instant::now(), self.node, self.gen, peer));
    }

    /// Closes the connection to `peer` normally: `PeerDown` on both sides, no `Rejected`.
    pub fn disconnect(&self, peer: u32, code: u32, reason: &str) {
        self.close(peer, code, reason, false);
    }

    fn close(&self, peer: u32, code: u32, reason: &str, rejected: bool) {
        self.shared.mutate(|state| {
            let conn = state.nodes.get(&self.node).and_then(|n| n.peers.get(&peer)).copied();
            if let Some(conn) = conn.filter(|_| state.alive(self.node, self.gen)) {
                state.close_local(Instant::now(), self.node, conn, code, reason, rejected);
            }
        });
    }

    /// Replaces the revocation list: its `node-<id>` entries are refused at the handshake
    /// from now on, and their live connections closed at once with
    /// [`codes::REVOKED`](crate::codes::REVOKED).
    pub fn set_revocations(&self, list: Revocations) {
        self.shared.mutate(|state| state.set_revocations(Instant::now(), self.node, self.gen, list));
    }

    /// Closes every connection with [`codes::SHUTDOWN`](crate::codes::SHUTDOWN) (their
    /// `PeerDown`s are the last events of this node's stream) and stops the node; it can be
    /// started again with [`MemNetwork::restart`].
    pub async fn shutdown(&self) {
        self.shared.mutate(|state| state.shutdown(Instant::now(), self.node, self.gen));
    }

    /// This incarnation's counters (zero once a later incarnation runs).
    pub fn stats(&self) -> TransportStats {
        self.shared.lock().transport_stats(self.node, self.gen)
    }
}

/// The events of one incarnation of a node, in the order the network produced them; what the
/// receiver of [`Transport::bind`](crate::Transport::bind) is for QUIC.
///
/// A message holds its link's receive budget until it is received here. The stream ends
/// (`None`) once the node crashed, or shut down and every event was received. Dropping it
/// discards what was queued and whatever arrives later.
pub struct MemEvents {
    shared: Arc<Shared>,
    node: u32,
    gen: u64,
}

impl fmt::Debug for MemEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemEvents").field("node", &self.node).finish_non_exhaustive()
    }
}

impl MemEvents {
    /// The next event, waiting for one; `None` once the stream ended. Cancel-safe: an event
    /// is taken only when this returns it.
    pub async fn recv(&mut self) -> Option<TransportEvent> {
        loop {
            let notify = match self.pop() {
                Popped::Event(event, charge) => return Some(self.holding(event, charge)),
                Popped::Gone => return None,
                Popped::Empty(notify) => notify,
            };
            // A push after the look above stored a permit in `notify`: no wake-up is missed.
            notify.notified().await;
        }
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Option<TransportEvent> {
        match self.pop() {
            Popped::Event(event, charge) => Some(self.holding(event, charge)),
            Popped::Gone | Popped::Empty(_) => None,
        }
    }

    fn pop(&self) -> Popped {
        // Taking an event changes no deadline: the driver need not wake.
        self.shared.lock().pop(self.gen)
    }

    /// A message's frame holds its link's charge until the receiver drops it (the lock is
    /// not held here: dropping a frame takes it).
    fn holding(&self, event: TransportEvent, charge: Option<(u32, u32, usize)>) -> TransportEvent {
        match (event, charge) {
            (TransportEvent::Message { peer, frame }, Some((from, to, bytes))) => {
                let (body, _) = frame.into_parts();
                let charge = LinkCharge { shared: Arc::downgrade(&self.shared), from, to, bytes };
                TransportEvent::Message {
                    peer,
                    frame: crate::RecvFrame::with_budget(
                        body,
                        crate::LeTensor::default(),
                        crate::ReceiveBudget::of(charge),
                    ),
                }
            }
            (event, _) => event,
        }
    }
}

/// A received frame's bytes on its link's budget, released when the frame is dropped.
struct LinkCharge {
    shared: std::sync::Weak<Shared>,
    from: u32,
    to: u32,
    bytes: usize,
}

impl Drop for LinkCharge {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.mutate(|state| state.release(self.from, self.to, self.bytes));
        }
    }
}

impl Drop for MemEvents {
    fn drop(&mut self) {
        self.shared.lock().drop_inbox(self.gen);
    }
}

impl crate::api::Events for MemEvents {
    fn recv(&mut self) -> impl Future<Output = Option<TransportEvent>> + Send {
        MemEvents::recv(self)
    }
}

impl crate::api::Transport for MemTransport {
    type Events = MemEvents;

    fn local_addr(&self) -> SocketAddr {
        MemTransport::local_addr(self)
    }

    fn connect(&self, addr: SocketAddr, expect: Option<u32>) -> impl Future<Output = Result<u32, ConnectError>> + Send {
        MemTransport::connect(self, addr, expect)
    }

    fn send(&self, peer: u32, frame: impl Into<OutFrame>) -> Result<(), SendError> {
        MemTransport::send(self, peer, frame)
    }

    fn send_when_ready(
        &self,
        peer: u32,
        frame: impl Into<OutFrame>,
    ) -> impl Future<Output = Result<(), SendError>> + Send {
        MemTransport::send_when_ready(self, peer, frame.into())
    }

    fn reject(&self, peer: u32, code: u32, reason: &str) {
        MemTransport::reject(self, peer, code, reason)
    }

    fn probe(&self, peer: u32) {
        MemTransport::probe(self, peer)
    }

    fn set_revocations(&self, list: Revocations) {
        MemTransport::set_revocations(self, list)
    }

    fn peer_info(&self, peer: u32) -> Option<PeerInfo> {
        MemTransport::peer_info(self, peer)
    }

    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        MemTransport::shutdown(self)
    }
}
