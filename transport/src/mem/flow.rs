//! Frames through the network: sending (budget, pause), the link's faults (cut, loss,
//! duplication, delay and jitter), arrival (pause, closed ends, the receiving rules of
//! [`read_stream`]), and the driver task that moves virtual time forward.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::MemError;
use super::frames::read_stream;
use super::state::{Life, Shared, State, Wire};
use super::stats::TraceEvent;
use crate::codec::PREFIX_BYTES;
use crate::{SendError, TransportEvent};

/// Who hands a frame to the network.
pub(crate) enum Sender {
    /// A node's `send`: the frame was checked as the QUIC transport checks it.
    Node { gen: u64 },
    /// [`MemNetwork::inject`](super::MemNetwork::inject): any bytes, from outside.
    Injected,
}

/// Why the network refused a frame.
pub(crate) enum Refused {
    NotConnected,
    Busy { in_flight: usize },
}

impl Refused {
    pub(crate) fn send_error(self, peer: u32) -> SendError {
        match self {
            Self::NotConnected => SendError::NotConnected { peer },
            Self::Busy { in_flight } => SendError::Busy { peer, in_flight },
        }
    }

    pub(crate) fn mem_error(self, from: u32, to: u32) -> MemError {
        match self {
            Self::NotConnected => MemError::NotConnected { from, to },
            Self::Busy { in_flight } => MemError::Busy { from, to, in_flight },
        }
    }
}

impl State {
    /// Hands `bytes` (a whole stream: prefix and frame) from `from` to `to` on their
    /// connection. Held while `from` is paused; on the wire at once otherwise.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        from: u32,
        sender: Sender,
        to: u32,
        bytes: Vec<u8>,
    ) -> Result<(), Refused> {
        let alive = match sender {
            Sender::Node { gen } => self.alive(from, gen),
            Sender::Injected => self.running(from).is_some(),
        };
        let conn = match self.nodes.get(&from).and_then(|n| n.peers.get(&to)) {
            Some(&conn) if alive => conn,
            _ => return Err(Refused::NotConnected),
        };
        let len = bytes.len();
        if !self.has_room(from, to, len) {
            let link = self.link(from, to);
            link.stats.busy += 1;
            return Err(Refused::Busy { in_flight: link.in_flight_frames });
        }
        self.charge(from, to, len);
        let link = self.link(from, to);
        let seq = link.next_seq;
        link.next_seq += 1;
        link.stats.sent += 1;
        let node = self.nodes.get_mut(&from).expect("checked running");
        node.counters.frames_out += 1;
        node.counters.bytes_out += len as u64;
        let wire = Wire::Frame { conn, from, to, seq, bytes };
        if node.paused {
            node.held_out.push_back(wire);
            self.link(from, to).stats.held_by_pause += 1;
            self.record(now, TraceEvent::Held { from, to, seq });
        } else {
            self.transmit(now, wire);
        }
        Ok(())
    }

    /// Puts a frame on its link as of `now`: the cut and loss decide whether it travels, the
    /// delay and jitter when it arrives, the duplication whether a copy follows.
    pub(crate) fn transmit(&mut self, now: Instant, wire: Wire) {
        let Wire::Frame { conn, from, to, seq, bytes } = wire else {
            return self.schedule(now, wire);
        };
        let len = bytes.len();
        if self.is_cut(from, to) {
            self.release(from, to, len);
            self.link(from, to).stats.cut += 1;
            return self.record(now, TraceEvent::Cut { from, to, seq });
        }
        let faults = self.faults(from, to);
        if faults.loss > 0.0 && self.rng.random::<f64>() < faults.loss {
            self.release(from, to, len);
            self.link(from, to).stats.lost += 1;
            return self.record(now, TraceEvent::Lost { from, to, seq });
        }
        let delay = self.sample_delay(from, to);
        let copy = faults.duplicate > 0.0 && self.rng.random::<f64>() < faults.duplicate;
        let copy = (copy && self.has_room(from, to, len)).then(|| bytes.clone());
        self.schedule(now + delay, Wire::Frame { conn, from, to, seq, bytes });
        if let Some(bytes) = copy {
            self.charge(from, to, len);
            self.link(from, to).stats.duplicated += 1;
            self.record(now, TraceEvent::Duplicated { from, to, seq });
            let delay = self.sample_delay(from, to);
            self.schedule(now + delay, Wire::Frame { conn, from, to, seq, bytes });
        }
    }

    /// A frame's time on the link from `from` to `to`: its delay plus a draw of its jitter.
    pub(crate) fn sample_delay(&mut self, from: u32, to: u32) -> Duration {
        let faults = self.faults(from, to);
        let jitter = u64::try_from(faults.jitter.as_nanos()).unwrap_or(u64::MAX);
        let extra = if jitter == 0 { 0 } else { self.rng.random_range(0..=jitter) };
        faults.delay + Duration::from_nanos(extra)
    }

    /// Puts `wire` on the wire, to arrive at `at`.
    pub(crate) fn schedule(&mut self, at: Instant, wire: Wire) {
        let key = (at, self.next_wire);
        self.next_wire += 1;
        self.queue.insert(key, wire);
    }

    /// A liveness probe from incarnation `gen` of `from` to `peer`'s address: it travels as
    /// a frame does (a cut or a loss stops it); see [`Self::arrive`] for the answer.
    pub(crate) fn probe(&mut self, now: Instant, from: u32, gen: u64, peer: u32) {
        let connected = self.nodes.get(&from).is_some_and(|n| !n.paused && n.peers.contains_key(&peer));
        if !self.alive(from, gen) || !connected || !self.travels(from, peer) {
            return;
        }
        let delay = self.sample_delay(from, peer);
        self.schedule(now + delay, Wire::Probe { from, gen, to: peer });
    }

    /// Whether an unreliable datagram (a probe or its answer) gets through from `from` to
    /// `to` now: not cut, not lost.
    fn travels(&mut self, from: u32, to: u32) -> bool {
        if self.is_cut(from, to) {
            return false;
        }
        let loss = self.faults(from, to).loss;
        loss <= 0.0 || self.rng.random::<f64>() >= loss
    }

    /// An item reaches its receiver at `now`.
    pub(crate) fn arrive(&mut self, now: Instant, wire: Wire) {
        let to = match &wire {
            Wire::Frame { to, .. } | Wire::Close { to, .. } | Wire::Refused { to, .. } => *to,
            // A running process drops the probe, paused or not (its socket still takes it);
            // the host of a crashed or stopped one refuses it.
            Wire::Probe { from, gen, to } => {
                if self.running(*to).is_none() && self.travels(*to, *from) {
                    let delay = self.sample_delay(*to, *from);
                    self.schedule(now + delay, Wire::Refused { from: *to, to: *from, gen: *gen });
                }
                return;
            }
        };
        let Some(node) = self.nodes.get_mut(&to).filter(|n| n.life == Life::Running) else {
            return self.discard(now, wire);
        };
        if node.paused {
            let frame = match &wire {
                Wire::Frame { from, to, seq, .. } => Some((*from, *to, *seq)),
                Wire::Close { .. } | Wire::Probe { .. } | Wire::Refused { .. } => None,
            };
            node.held_in.push_back(wire);
            if let Some((from, to, seq)) = frame {
                self.link(from, to).stats.held_by_pause += 1;
                self.record(now, TraceEvent::Held { from, to, seq });
            }
            return;
        }
        match wire {
            Wire::Refused { from, to, gen } => {
                if self.alive(to, gen) {
                    self.push(to, TransportEvent::PeerGone { peer: from, addr: super::state::addr_of(from) }, None);
                }
            }
            Wire::Probe { .. } => {}
            Wire::Close { conn, from, to, code, reason } => {
                // A close lost to a cut leaves the end to its idle timeout.
                if !self.is_cut(from, to) {
                    self.close_remote(now, to, conn, code, &reason);
                }
            }
            Wire::Frame { conn, from, to, seq, bytes } => {
                let open = self.conns.get(&conn).and_then(|c| c.end(to)).is_some_and(|end| end.open);
                if !open {
                    return self.discard(now, Wire::Frame { conn, from, to, seq, bytes });
                }
                let len = bytes.len();
                if self.is_cut(from, to) {
                    self.release(from, to, len);
                    self.link(from, to).stats.cut += 1;
                    return self.record(now, TraceEvent::Cut { from, to, seq });
                }
                self.receive(now, conn, from, to, seq, bytes);
            }
        }
    }

    /// Applies the receiving rules to a frame that reached an open end, then delivers it or
    /// closes the connection as the QUIC transport does (`BadFrame`, `Rejected`, `PeerDown`).
    fn receive(&mut self, now: Instant, conn: u64, from: u32, to: u32, seq: u64, mut bytes: Vec<u8>) {
        let len = bytes.len();
        let limits = self.config.limits;
        if let Err(violation) = read_stream(&bytes, &limits) {
            self.release(from, to, len);
            self.link(from, to).stats.bad_frames += 1;
            if let Some(node) = self.nodes.get_mut(&to) {
                node.counters.bad_frames += 1;
            }
            self.record(now, TraceEvent::BadFrame { from, to, seq, code: violation.code });
            let event = TransportEvent::BadFrame { peer: from, code: violation.code, reason: violation.reason.clone() };
            self.push(to, event, None);
            return self.close_local(now, to, conn, violation.code, &violation.reason, true);
        }
        if !self.receiving(to) {
            // Nobody takes this node's events any more (its receiver was dropped).
            return self.discard(now, Wire::Frame { conn, from, to, seq, bytes });
        }
        bytes.drain(..PREFIX_BYTES);
        let link = self.link(from, to);
        if link.highest_delivered.is_some_and(|highest| seq < highest) {
            link.stats.reordered += 1;
        }
        link.highest_delivered = Some(link.highest_delivered.map_or(seq, |highest| highest.max(seq)));
        link.stats.delivered += 1;
        if let Some(node) = self.nodes.get_mut(&to) {
            node.counters.frames_in += 1;
            node.counters.bytes_in += bytes.len() as u64;
        }
        self.record(now, TraceEvent::Delivered { from, to, seq, bytes: len });
        self.push(
            to,
            TransportEvent::Message { peer: from, frame: crate::RecvFrame::new(bytes) },
            Some((from, to, len)),
        );
    }

    /// An item whose receiving end is gone: a frame counts as dropped.
    pub(crate) fn discard(&mut self, now: Instant, wire: Wire) {
        if let Wire::Frame { from, to, seq, bytes, .. } = wire {
            self.release(from, to, bytes.len());
            self.link(from, to).stats.dropped += 1;
            if let Some(node) = self.nodes.get_mut(&to) {
                node.counters.frames_dropped += 1;
            }
            self.record(now, TraceEvent::Dropped { from, to, seq });
        }
    }

    /// Handles everything due by `now` in time order: arrivals (in the order they were put on
    /// the wire when due at the same instant) before idle timeouts due at the same instant.
    pub(crate) fn advance(&mut self, now: Instant) {
        loop {
            let arrival = self.queue.first_key_value().map(|(&(at, _), _)| at).filter(|&at| at <= now);
            let idle = self.next_idle().filter(|&(at, ..)| at <= now);
            match (arrival, idle) {
                (Some(at), idle) if idle.is_none_or(|(due, ..)| at <= due) => {
                    let (_, wire) = self.queue.pop_first().expect("an arrival is due");
                    self.arrive(at, wire);
                }
                (_, Some((at, conn, node))) => self.time_out(at, node, conn),
                _ => break,
            }
        }
    }

    /// When the driver must act next.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let arrival = self.queue.first_key_value().map(|(&(at, _), _)| at);
        let idle = self.next_idle().map(|(at, ..)| at);
        arrival.into_iter().chain(idle).min()
    }
}

/// The network's one task: sleeps until the next arrival or idle timeout (tokio's clock, so
/// a paused clock jumps straight there), handles what is due, and goes back to sleep; woken
/// early by every change. Ends once every handle of the network is dropped.
pub(crate) async fn drive(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else { return };
            let mut state = shared.lock();
            state.advance(Instant::now());
            state.publish();
            state.next_deadline()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    biased;
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
