//! The network's state: nodes and their incarnations, directed links and their faults,
//! connections (two ends each), the event queues of the nodes. Every change happens under one
//! mutex in [`Shared`], from the caller's call or from the driver task, so the order of
//! changes — and with a seeded RNG and tokio's paused clock, everything — is deterministic.
//!
//! A connection has two ends, one per node, each open or closed on its own (as a QUIC
//! connection is, seen from each side): closing one end (a reject, a shutdown, an idle
//! timeout) sends a close notice to the other, which may be lost to a cut, in which case the
//! other end times out in turn.

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::config::{LinkFaults, MemConfig, MemError, MAX_NODE_ID, MAX_QUEUED_LIFECYCLE_EVENTS, MEM_PORT};
use super::stats::{LinkStats, NetStats, TraceEntry, TraceEvent};
use crate::endpoint::lock;
use crate::{codes, PeerInfo, Revocations, TransportEvent, TransportStats};

/// The fake address of node `id`: `10.0.0.0 + id`, port [`MEM_PORT`].
pub(crate) fn addr_of(id: u32) -> SocketAddr {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(base | (id & (MAX_NODE_ID - 1))), MEM_PORT))
}

/// The node id an address names, if it is one of [`addr_of`]'s.
pub(crate) fn id_of(addr: SocketAddr) -> Option<u32> {
    let SocketAddr::V4(v4) = addr else { return None };
    let ip = u32::from(*v4.ip());
    (v4.port() == MEM_PORT && ip >> 24 == 10).then_some(ip & (MAX_NODE_ID - 1))
}

/// What the network handles share: the state, the driver's wake-up, and the driver's timer.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Wakes the driver after a change (a new frame on the wire, a new deadline) and when the
    /// network is dropped.
    pub(crate) wake: Arc<Notify>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Runs `change` on the state, publishes what waiters watch, and wakes the driver.
    pub(crate) fn mutate<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let result = {
            let mut state = self.lock();
            let result = change(&mut state);
            state.publish();
            result
        };
        self.wake.notify_one();
        result
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The driver holds only a weak reference: this lets it see that the network is gone.
        self.wake.notify_one();
    }
}

/// Whether a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Life {
    Running,
    Crashed,
    Stopped,
}

/// One node id of the network and its current incarnation.
pub(crate) struct Node {
    pub(crate) life: Life,
    /// The handle generation of the current incarnation: handles and event streams of older
    /// ones see the node as gone.
    pub(crate) gen: u64,
    pub(crate) incarnation: u64,
    pub(crate) paused: bool,
    /// Items that arrived while paused, delivered in order on resume.
    pub(crate) held_in: VecDeque<Wire>,
    /// Frames sent while paused, put on the wire in order on resume.
    pub(crate) held_out: VecDeque<Wire>,
    /// Peer id → the connection whose end here is open. An end is open exactly while it is
    /// listed here.
    pub(crate) peers: BTreeMap<u32, u64>,
    pub(crate) revocations: Revocations,
    pub(crate) counters: NodeCounters,
}

/// What one incarnation counted, for [`TransportStats`].
#[derive(Default)]
pub(crate) struct NodeCounters {
    pub(crate) frames_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) bytes_out: u64,
    pub(crate) frames_dropped: u64,
    pub(crate) bad_frames: u64,
    pub(crate) rejected: BTreeMap<u32, u64>,
}

/// One directed link: its faults, whether it is cut, what is in flight on it, its counters.
#[derive(Default)]
pub(crate) struct Link {
    pub(crate) faults: Option<LinkFaults>,
    pub(crate) cut: bool,
    pub(crate) in_flight_frames: usize,
    pub(crate) in_flight_bytes: usize,
    pub(crate) next_seq: u64,
    pub(crate) highest_delivered: Option<u64>,
    pub(crate) stats: LinkStats,
}

/// One end of a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct End {
    pub(crate) node: u32,
    pub(crate) incarnation: u64,
    pub(crate) open: bool,
    /// Since when this end hears nothing from the other (`None`: it hears it, or its node is
    /// paused and its timers stand still); it closes `idle_timeout_ms` after.
    pub(crate) silent_since: Option<Instant>,
}

pub(crate) struct Conn {
    pub(crate) ends: [End; 2],
    pub(crate) dialled_by: u32,
}

impl Conn {
    pub(crate) fn end(&self, node: u32) -> Option<&End> {
        self.ends.iter().find(|end| end.node == node)
    }

    pub(crate) fn end_mut(&mut self, node: u32) -> Option<&mut End> {
        self.ends.iter_mut().find(|end| end.node == node)
    }
}

/// Something on the wire between two nodes.
#[derive(Debug)]
pub(crate) enum Wire {
    /// A stream's bytes: a frame as sent (length prefix included), or raw injected bytes.
    Frame { conn: u64, from: u32, to: u32, seq: u64, bytes: Vec<u8> },
    /// The close of the sender's end, telling the receiver's end to close too.
    Close { conn: u64, from: u32, to: u32, code: u32, reason: String },
    /// A liveness probe from incarnation `gen` of `from` to `to`'s address
    /// ([`MemTransport::probe`](crate::mem::MemTransport::probe)).
    Probe { from: u32, gen: u64, to: u32 },
    /// `from`'s host refusing a probe (no process listens there), back to incarnation `gen`
    /// of `to`: ICMP port unreachable.
    Refused { from: u32, to: u32, gen: u64 },
}

/// An event waiting in a node's queue, with the receive budget it holds.
pub(crate) struct Queued {
    pub(crate) event: TransportEvent,
    /// `(from, to, bytes)` of a message, released when the caller takes it.
    pub(crate) charge: Option<(u32, u32, usize)>,
}

/// The event queue of one incarnation of a node.
pub(crate) struct Inbox {
    pub(crate) events: VecDeque<Queued>,
    /// Events in `events` that are not messages.
    pub(crate) lifecycle: usize,
    /// The node shut down: the queue drains, then the stream ends.
    pub(crate) closed: bool,
    pub(crate) notify: Arc<Notify>,
}

/// What [`State::pop`] found.
pub(crate) enum Popped {
    /// An event, and for a message the budget charge it still holds (`from`, `to`, bytes):
    /// released when the receiver drops the frame.
    Event(TransportEvent, Option<(u32, u32, usize)>),
    /// Nothing yet: wait on this.
    Empty(Arc<Notify>),
    /// The incarnation is gone and its queue drained.
    Gone,
}

pub(crate) struct State {
    pub(crate) config: MemConfig,
    pub(crate) seed: u64,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) start: Instant,
    pub(crate) default_faults: LinkFaults,
    pub(crate) links: BTreeMap<(u32, u32), Link>,
    pub(crate) nodes: BTreeMap<u32, Node>,
    pub(crate) conns: BTreeMap<u64, Conn>,
    pub(crate) next_conn: u64,
    /// Items on the wire by arrival time, then by the order they were put there.
    pub(crate) queue: BTreeMap<(Instant, u64), Wire>,
    pub(crate) next_wire: u64,
    pub(crate) inboxes: BTreeMap<u64, Inbox>,
    next_gen: u64,
    pub(crate) stats: NetStats,
    trace: VecDeque<TraceEntry>,
    /// Bumped whenever reachability may have changed (nodes, pauses, cuts), for dialers.
    pub(crate) changes: watch::Sender<u64>,
    /// Items on the wire, for [`MemNetwork::settled`](super::MemNetwork::settled).
    pub(crate) on_wire: watch::Sender<usize>,
}

impl State {
    pub(crate) fn new(seed: u64, config: MemConfig) -> Self {
        Self {
            config,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            start: Instant::now(),
            default_faults: LinkFaults::default(),
            links: BTreeMap::new(),
            nodes: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            queue: BTreeMap::new(),
            next_wire: 0,
            inboxes: BTreeMap::new(),
            next_gen: 0,
            stats: NetStats::default(),
            trace: VecDeque::new(),
            changes: watch::Sender::new(0),
            on_wire: watch::Sender::new(0),
        }
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.config.idle_timeout_ms)
    }

    /// Publishes the number of items on the wire to [`State::on_wire`]'s watchers.
    pub(crate) fn publish(&mut self) {
        let on_wire = self.queue.len();
        self.on_wire.send_if_modified(|n| std::mem::replace(n, on_wire) != on_wire);
    }

    pub(crate) fn reachability_changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn record(&mut self, at: Instant, event: TraceEvent) {
        let capacity = self.config.trace_capacity;
        if capacity == 0 {
            return;
        }
        if self.trace.len() >= capacity {
            self.trace.pop_front();
            self.stats.trace_discarded += 1;
        }
        self.trace.push_back(TraceEntry { at: at.saturating_duration_since(self.start), event });
    }

    pub(crate) fn trace(&self) -> Vec<TraceEntry> {
        self.trace.iter().cloned().collect()
    }

    pub(crate) fn link(&mut self, from: u32, to: u32) -> &mut Link {
        self.links.entry((from, to)).or_default()
    }

    pub(crate) fn faults(&self, from: u32, to: u32) -> LinkFaults {
        self.links.get(&(from, to)).and_then(|link| link.faults).unwrap_or(self.default_faults)
    }

    pub(crate) fn is_cut(&self, from: u32, to: u32) -> bool {
        self.links.get(&(from, to)).is_some_and(|link| link.cut)
    }

    pub(crate) fn running(&self, node: u32) -> Option<&Node> {
        self.nodes.get(&node).filter(|n| n.life == Life::Running)
    }

    /// Whether `gen` is the running incarnation of `node`.
    pub(crate) fn alive(&self, node: u32, gen: u64) -> bool {
        self.running(node).is_some_and(|n| n.gen == gen)
    }

    pub(crate) fn running_mut(&mut self, node: u32) -> Result<&mut Node, MemError> {
        match self.nodes.get_mut(&node) {
            None => Err(MemError::UnknownNode { node }),
            Some(n) if n.life != Life::Running => Err(MemError::NodeNotRunning { node }),
            Some(n) => Ok(n),
        }
    }

    /// A frame's journey ended without delivery: its bytes no longer count against the link.
    pub(crate) fn release(&mut self, from: u32, to: u32, bytes: usize) {
        let link = self.link(from, to);
        link.in_flight_frames = link.in_flight_frames.saturating_sub(1);
        link.in_flight_bytes = link.in_flight_bytes.saturating_sub(bytes);
    }

    /// Whether one more frame of `bytes` fits on the link from `from` to `to`.
    pub(crate) fn has_room(&self, from: u32, to: u32, bytes: usize) -> bool {
        let Some(link) = self.links.get(&(from, to)) else { return true };
        link.in_flight_frames < self.config.max_inflight_sends_per_peer
            && (link.in_flight_frames == 0
                || link.in_flight_bytes.saturating_add(bytes) <= self.config.recv_budget_bytes_per_peer)
    }

    pub(crate) fn charge(&mut self, from: u32, to: u32, bytes: usize) {
        let link = self.link(from, to);
        link.in_flight_frames += 1;
        link.in_flight_bytes = link.in_flight_bytes.saturating_add(bytes);
    }

    /// Queues `event` for `node`'s current incarnation. A message's `charge` is released when
    /// the caller drops the frame it took, or now if nobody will take it.
    pub(crate) fn push(&mut self, node: u32, event: TransportEvent, charge: Option<(u32, u32, usize)>) {
        let gen = self.nodes.get(&node).map(|n| n.gen);
        let is_message = matches!(event, TransportEvent::Message { .. });
        let inbox = gen.and_then(|gen| self.inboxes.get_mut(&gen)).filter(|inbox| !inbox.closed);
        match inbox {
            Some(inbox) if is_message || inbox.lifecycle < MAX_QUEUED_LIFECYCLE_EVENTS => {
                inbox.lifecycle += usize::from(!is_message);
                inbox.events.push_back(Queued { event, charge });
                inbox.notify.notify_one();
            }
            Some(_) => {
                self.stats.events_dropped += 1;
                tracing::warn!(node, ?event, "event dropped: {MAX_QUEUED_LIFECYCLE_EVENTS} events are waiting already");
            }
            None => {
                // Only lifecycle events get here: a frame is discarded before it is counted
                // delivered to a node without a receiver (`receiving`).
                if let Some((from, to, bytes)) = charge {
                    self.release(from, to, bytes);
                }
            }
        }
    }

    /// Whether `node`'s current incarnation has a receiver for its events.
    pub(crate) fn receiving(&self, node: u32) -> bool {
        let gen = self.nodes.get(&node).map(|n| n.gen);
        gen.and_then(|gen| self.inboxes.get(&gen)).is_some_and(|inbox| !inbox.closed)
    }

    /// Takes the next event of incarnation `gen`.
    pub(crate) fn pop(&mut self, gen: u64) -> Popped {
        let Some(inbox) = self.inboxes.get_mut(&gen) else { return Popped::Gone };
        match inbox.events.pop_front() {
            Some(Queued { event, charge }) => {
                if charge.is_none() {
                    inbox.lifecycle = inbox.lifecycle.saturating_sub(1);
                }
                Popped::Event(event, charge)
            }
            None if inbox.closed => {
                self.inboxes.remove(&gen);
                Popped::Gone
            }
            None => Popped::Empty(inbox.notify.clone()),
        }
    }

    /// Discards the queue of incarnation `gen` (its receiver is gone, or it crashed). Its
    /// messages were counted delivered already; their budget is released.
    pub(crate) fn drop_inbox(&mut self, gen: u64) {
        let Some(inbox) = self.inboxes.remove(&gen) else { return };
        inbox.notify.notify_one();
        for queued in inbox.events {
            if let Some((from, to, bytes)) = queued.charge {
                self.release(from, to, bytes);
            }
        }
    }

    // ---- nodes ------------------------------------------------------------------------

    /// Starts an incarnation of `node`: its first (`restart: false`) or a later one.
    pub(crate) fn start(&mut self, now: Instant, node: u32, restart: bool) -> Result<(u64, u64), MemError> {
        if node >= MAX_NODE_ID {
            return Err(MemError::NodeIdTooLarge { node });
        }
        match self.nodes.get(&node) {
            Some(n) if n.life == Life::Running => return Err(MemError::NodeRunning { node, addr: addr_of(node) }),
            None if restart => return Err(MemError::UnknownNode { node }),
            _ => {}
        }
        let (gen, incarnation) = (self.next_gen, self.rng.random::<u64>());
        self.next_gen += 1;
        self.inboxes.insert(
            gen,
            Inbox { events: VecDeque::new(), lifecycle: 0, closed: false, notify: Arc::new(Notify::new()) },
        );
        let previous = self.nodes.insert(
            node,
            Node {
                life: Life::Running,
                gen,
                incarnation,
                paused: false,
                held_in: VecDeque::new(),
                held_out: VecDeque::new(),
                peers: BTreeMap::new(),
                revocations: Revocations::default(),
                counters: NodeCounters::default(),
            },
        );
        if previous.is_some() {
            self.stats.restarts += 1;
            self.record(now, TraceEvent::Restarted { node });
        }
        tracing::debug!(node, incarnation = format_args!("{incarnation:#x}"), restart, "mem node started");
        self.reachability_changed();
        Ok((gen, incarnation))
    }

    /// The process of `node` dies: its ends vanish without a word (its peers time out), what
    /// it held is lost, its event stream ends.
    pub(crate) fn crash(&mut self, now: Instant, node: u32) -> Result<(), MemError> {
        let n = self.running_mut(node)?;
        n.life = Life::Crashed;
        n.paused = false;
        let gen = n.gen;
        let peers = std::mem::take(&mut n.peers);
        let held: Vec<Wire> = n.held_in.drain(..).chain(n.held_out.drain(..)).collect();
        for conn in peers.values() {
            if let Some(end) = self.conns.get_mut(conn).and_then(|c| c.end_mut(node)) {
                end.open = false;
            }
        }
        for wire in held {
            self.discard(now, wire);
        }
        self.drop_inbox(gen);
        self.stats.crashes += 1;
        self.record(now, TraceEvent::Crashed { node });
        tracing::debug!(node, "mem node crashed");
        self.recompute_silence(now);
        self.reachability_changed();
        Ok(())
    }

    /// A graceful stop of incarnation `gen`: every connection closed with
    /// [`codes::SHUTDOWN`], the event stream drains and ends.
    pub(crate) fn shutdown(&mut self, now: Instant, node: u32, gen: u64) {
        if !self.alive(node, gen) {
            return;
        }
        let peers: Vec<(u32, u64)> = self.nodes[&node].peers.iter().map(|(p, c)| (*p, *c)).collect();
        for (_, conn) in peers {
            self.close_local(now, node, conn, codes::SHUTDOWN, "node shutting down", false);
        }
        let n = self.nodes.get_mut(&node).expect("checked alive");
        n.life = Life::Stopped;
        n.paused = false;
        let held: Vec<Wire> = n.held_in.drain(..).chain(n.held_out.drain(..)).collect();
        for wire in held {
            self.discard(now, wire);
        }
        if let Some(inbox) = self.inboxes.get_mut(&gen) {
            inbox.closed = true;
            inbox.notify.notify_one();
        }
        self.recompute_silence(now);
        self.reachability_changed();
    }

    pub(crate) fn pause(&mut self, now: Instant, node: u32) -> Result<(), MemError> {
        let n = self.running_mut(node)?;
        if n.paused {
            return Ok(());
        }
        n.paused = true;
        self.stats.pauses += 1;
        self.record(now, TraceEvent::Paused { node });
        self.recompute_silence(now);
        self.reachability_changed();
        Ok(())
    }

    /// Ends a pause: what the node sent goes on the wire, what arrived is delivered, both in
    /// order, as of now.
    pub(crate) fn resume(&mut self, now: Instant, node: u32) -> Result<(), MemError> {
        let n = self.running_mut(node)?;
        if !n.paused {
            return Ok(());
        }
        n.paused = false;
        let outgoing: Vec<Wire> = n.held_out.drain(..).collect();
        let incoming: Vec<Wire> = n.held_in.drain(..).collect();
        self.record(now, TraceEvent::Resumed { node });
        for wire in outgoing {
            self.transmit(now, wire);
        }
        for wire in incoming {
            self.arrive(now, wire);
        }
        self.recompute_silence(now);
        self.reachability_changed();
        Ok(())
    }

    pub(crate) fn set_revocations(&mut self, now: Instant, node: u32, gen: u64, list: Revocations) {
        if !self.alive(node, gen) {
            return;
        }
        let revoked: Vec<(u64, String)> = self.nodes[&node]
            .peers
            .iter()
            .filter_map(|(&peer, &conn)| {
                list.revoking_node(peer).map(|entry| {
                    (conn, format!("node {peer}: the certificate is revoked ({entry} is on the revocation list)"))
                })
            })
            .collect();
        self.nodes.get_mut(&node).expect("checked alive").revocations = list;
        for (conn, reason) in revoked {
            self.close_local(now, node, conn, codes::REVOKED, &reason, true);
        }
    }

    pub(crate) fn set_link(&mut self, from: u32, to: u32, faults: LinkFaults) -> Result<(), MemError> {
        faults.validate(Some((from, to)))?;
        self.link(from, to).faults = Some(faults);
        Ok(())
    }

    pub(crate) fn set_cut(&mut self, now: Instant, from: u32, to: u32, cut: bool) {
        self.link(from, to).cut = cut;
        self.recompute_silence(now);
        self.reachability_changed();
    }

    pub(crate) fn heal_all(&mut self, now: Instant) {
        for link in self.links.values_mut() {
            link.cut = false;
        }
        self.recompute_silence(now);
        self.reachability_changed();
    }

    // ---- queries ----------------------------------------------------------------------

    pub(crate) fn peers(&self, node: u32, gen: u64) -> Vec<u32> {
        if !self.alive(node, gen) {
            return Vec::new();
        }
        self.nodes[&node].peers.keys().copied().collect()
    }

    pub(crate) fn peer_info(&self, node: u32, gen: u64, peer: u32) -> Option<PeerInfo> {
        if !self.alive(node, gen) {
            return None;
        }
        let conn = self.conns.get(self.nodes[&node].peers.get(&peer)?)?;
        let rtt = self.faults(node, peer).delay + self.faults(peer, node).delay;
        Some(PeerInfo {
            peer,
            addr: addr_of(peer),
            dialled_by: conn.dialled_by,
            incarnation: conn.end(peer)?.incarnation,
            rtt,
        })
    }

    pub(crate) fn transport_stats(&self, node: u32, gen: u64) -> TransportStats {
        let Some(n) = self.nodes.get(&node).filter(|n| n.gen == gen) else { return TransportStats::default() };
        let c = &n.counters;
        TransportStats {
            frames_in: c.frames_in,
            bytes_in: c.bytes_in,
            frames_out: c.frames_out,
            bytes_out: c.bytes_out,
            frames_dropped: c.frames_dropped,
            send_failures: 0,
            bad_frames: c.bad_frames,
            rejected: c.rejected.clone(),
            refused_by_peers: BTreeMap::new(),
            open_connections: n.peers.len(),
            peers: n.peers.len(),
            // No packets on an in-memory link: a frame is delivered whole or not at all.
            lost_packets: 0,
            udp_datagrams_out: 0,
            max_path_mtu: 0,
        }
    }

    pub(crate) fn net_stats(&self) -> NetStats {
        let mut stats = self.stats;
        stats.frames = LinkStats::default();
        for link in self.links.values() {
            stats.frames.add(&link.stats);
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_their_node() {
        assert_eq!(addr_of(3).to_string(), "10.0.0.3:7000");
        assert_eq!(addr_of(300).to_string(), "10.0.1.44:7000");
        for id in [0, 1, 255, 256, MAX_NODE_ID - 1] {
            assert_eq!(id_of(addr_of(id)), Some(id));
        }
        assert_eq!(id_of("10.0.0.3:7001".parse().unwrap()), None);
        assert_eq!(id_of("127.0.0.1:7000".parse().unwrap()), None);
    }
}
