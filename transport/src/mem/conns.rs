//! Connections between nodes: the handshake (reachability, identity and revocation checks,
//! taking the place of a connection whose other end is gone), the close of one end (by the
//! node, by a notice from the other end, by the idle timeout) and the silence that drives the
//! idle timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{addr_of, id_of, Conn, End, State, Wire};
use super::stats::TraceEvent;
use crate::{codes, ConnectError, TransportEvent};

/// Longest close reason carried to the peer, as the QUIC transport cuts it to fit a packet.
const MAX_CLOSE_REASON_BYTES: usize = 512;

impl State {
    /// Whether a handshake between `a` and `b` can complete: both run, neither is paused,
    /// and neither direction is cut.
    pub(crate) fn reachable(&self, a: u32, b: u32) -> bool {
        let up = |n: u32| self.running(n).is_some_and(|n| !n.paused);
        a != b && up(a) && up(b) && !self.is_cut(a, b) && !self.is_cut(b, a)
    }

    /// The peer with a live end at `node` that `expect` names, or else that sits at `addr`.
    pub(crate) fn live_peer(&self, node: u32, addr: SocketAddr, expect: Option<u32>) -> Option<u32> {
        let peers = &self.running(node)?.peers;
        match expect {
            Some(id) => peers.contains_key(&id).then_some(id),
            None => id_of(addr).filter(|id| peers.contains_key(id)),
        }
    }

    /// A handshake round trip from `node` to the node at `addr`, if one can complete now.
    pub(crate) fn handshake_rtt(&mut self, node: u32, addr: SocketAddr) -> Option<Duration> {
        let peer = id_of(addr)?;
        if !self.reachable(node, peer) {
            return None;
        }
        Some(self.sample_delay(node, peer) + self.sample_delay(peer, node))
    }

    /// A dial of `node` to itself: refused as the QUIC transport refuses a peer presenting
    /// this node's own id.
    pub(crate) fn refuse_self(&mut self, node: u32, addr: SocketAddr) -> ConnectError {
        let (code, reason) = (codes::SELF_CONNECT, format!("the peer presents this node's own id {node}"));
        self.rejected(node, addr, None, code, &reason);
        ConnectError::Refused { addr, peer: None, code, reason }
    }

    /// Counts, logs and reports a rejection at `node`.
    fn rejected(&mut self, node: u32, addr: SocketAddr, peer: Option<u32>, code: u32, reason: &str) {
        if let Some(n) = self.nodes.get_mut(&node) {
            *n.counters.rejected.entry(code).or_default() += 1;
        }
        tracing::warn!(node, %addr, ?peer, code = format_args!("{code:#x}"), kind = codes::name(code), reason, "connection rejected");
        self.push(node, TransportEvent::Rejected { addr, peer, code, reason: reason.to_owned() }, None);
    }

    /// Completes a handshake from `node` to the node at `addr` if it still can: `None` if the
    /// peer is not reachable any more (the dialer waits on), else the outcome of the dial.
    pub(crate) fn try_establish(
        &mut self,
        now: Instant,
        node: u32,
        addr: SocketAddr,
        expect: Option<u32>,
    ) -> Option<Result<u32, ConnectError>> {
        let peer = id_of(addr)?;
        if !self.reachable(node, peer) {
            return None;
        }
        if let Some(expected) = expect.filter(|&expected| expected != peer) {
            let (code, reason) = (codes::ID_MISMATCH, format!("dialled node {expected} but node {peer} answered"));
            self.rejected(node, addr, Some(peer), code, &reason);
            return Some(Err(ConnectError::Refused { addr, peer: Some(peer), code, reason }));
        }
        if let Some(entry) = self.nodes[&node].revocations.revoking_node(peer) {
            let reason = format!("node {peer}: the certificate is revoked ({entry} is on the revocation list)");
            self.rejected(node, addr, Some(peer), codes::REVOKED, &reason);
            return Some(Err(ConnectError::Refused { addr, peer: Some(peer), code: codes::REVOKED, reason }));
        }
        if let Some(entry) = self.nodes[&peer].revocations.revoking_node(node) {
            let reason = format!("node {node}: the certificate is revoked ({entry} is on the revocation list)");
            self.rejected(peer, addr_of(node), Some(node), codes::REVOKED, &reason);
            let reason = closed_by_peer(codes::REVOKED, &reason);
            return Some(Err(ConnectError::Lost { addr, peer, reason }));
        }
        if let Some(conn) = self.nodes[&node].peers.get(&peer) {
            if self.conns.get(conn).and_then(|c| c.end(peer)).is_some_and(|end| end.open) {
                // The peer dialled at the same time and its connection is up: one per pair.
                return Some(Ok(peer));
            }
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        for (here, there) in [(node, peer), (peer, node)] {
            let incarnation = self.nodes[&there].incarnation;
            let old = self.nodes.get_mut(&here).and_then(|n| n.peers.insert(there, conn));
            let mut announce = true;
            // A connection whose other end closed (a timeout there) or whose other end was an
            // earlier incarnation: the new one takes its place, as in QUIC.
            let replaced = old.and_then(|old| self.conns.get_mut(&old)).map(|old| {
                if let Some(end) = old.end_mut(here) {
                    end.open = false;
                }
                old.end(there).map_or(0, |end| end.incarnation)
            });
            if let Some(was) = replaced {
                if was == incarnation {
                    // The same process reconnected: a swap of connections, not reported.
                    announce = false;
                } else {
                    let reason = format!("node restarted (incarnation {incarnation:#x} replaced {was:#x})");
                    self.peer_down(now, here, there, reason);
                }
            }
            if announce {
                self.record(now, TraceEvent::PeerUp { node: here, peer: there });
                tracing::debug!(node = here, peer = there, "mem peer up");
                self.push(here, TransportEvent::PeerUp { peer: there, addr: addr_of(there) }, None);
            }
        }
        let end = |n: u32, state: &Self| End {
            node: n,
            incarnation: state.nodes[&n].incarnation,
            open: true,
            silent_since: None,
        };
        let ends = [end(node, self), end(peer, self)];
        self.conns.insert(conn, Conn { ends, dialled_by: node });
        self.stats.connections += 1;
        self.recompute_silence(now);
        Some(Ok(peer))
    }

    fn peer_down(&mut self, now: Instant, node: u32, peer: u32, reason: String) {
        self.record(now, TraceEvent::PeerDown { node, peer });
        tracing::debug!(node, peer, reason, "mem peer down");
        self.push(node, TransportEvent::PeerDown { peer, reason }, None);
    }

    /// Closes the end of `conn` at `node` because the node chose to (reject, disconnect,
    /// shutdown, bad frame, revocation): reported there (`Rejected` first if `rejected`,
    /// then `PeerDown`), and a close notice goes to the other end.
    pub(crate) fn close_local(&mut self, now: Instant, node: u32, conn: u64, code: u32, reason: &str, rejected: bool) {
        let Some(peer) = self.close_end(node, conn) else { return };
        self.stats.closes += 1;
        if rejected {
            self.rejected(node, addr_of(peer), Some(peer), code, reason);
        }
        let down = format!("closed by this node with code {code:#x} ({}): {reason}", codes::name(code));
        self.peer_down(now, node, peer, down);
        if self.conns.get(&conn).and_then(|c| c.end(peer)).is_some_and(|end| end.open) {
            let delay = self.sample_delay(node, peer);
            let reason = cut_reason(reason).to_owned();
            self.schedule(now + delay, Wire::Close { conn, from: node, to: peer, code, reason });
        }
        self.recompute_silence(now);
    }

    /// A close notice from the other end arrived at `node`.
    pub(crate) fn close_remote(&mut self, now: Instant, node: u32, conn: u64, code: u32, reason: &str) {
        let Some(peer) = self.close_end(node, conn) else { return };
        self.peer_down(now, node, peer, closed_by_peer(code, reason));
        self.recompute_silence(now);
    }

    /// The end of `conn` at `node` heard nothing for the idle timeout.
    pub(crate) fn time_out(&mut self, now: Instant, node: u32, conn: u64) {
        let Some(peer) = self.close_end(node, conn) else { return };
        self.stats.idle_timeouts += 1;
        let reason = format!("idle timeout: nothing heard from the peer for {} ms", self.config.idle_timeout_ms);
        self.peer_down(now, node, peer, reason);
        self.recompute_silence(now);
    }

    /// Marks the end of `conn` at `node` closed; returns the peer if it was open.
    fn close_end(&mut self, node: u32, conn: u64) -> Option<u32> {
        let c = self.conns.get_mut(&conn)?;
        let peer = c.ends.iter().find(|end| end.node != node)?.node;
        let end = c.end_mut(node).filter(|end| end.open)?;
        end.open = false;
        let n = self.nodes.get_mut(&node)?;
        if n.peers.get(&peer) == Some(&conn) {
            n.peers.remove(&peer);
        }
        Some(peer)
    }

    /// Sets every open end's silence: an end hears its peer while the peer's end is open, the
    /// peer runs its incarnation unpaused and the link from the peer is not cut (QUIC
    /// keep-alives would get through). A paused node's timers stand still. Forgets
    /// connections closed at both ends.
    pub(crate) fn recompute_silence(&mut self, now: Instant) {
        self.conns.retain(|_, c| c.ends.iter().any(|end| end.open));
        let mut updates = Vec::new();
        for (&id, conn) in &self.conns {
            for (i, end) in conn.ends.iter().enumerate() {
                if !end.open {
                    continue;
                }
                let other = conn.ends[1 - i];
                let paused_here = self.nodes.get(&end.node).is_some_and(|n| n.paused);
                let hearing = other.open
                    && self.running(other.node).is_some_and(|n| n.incarnation == other.incarnation && !n.paused)
                    && !self.is_cut(other.node, end.node);
                let silent_since = if paused_here || hearing { None } else { end.silent_since.or(Some(now)) };
                if silent_since != end.silent_since {
                    updates.push((id, i, silent_since));
                }
            }
        }
        for (id, i, silent_since) in updates {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.ends[i].silent_since = silent_since;
            }
        }
    }

    /// The earliest idle timeout due: when, and which end.
    pub(crate) fn next_idle(&self) -> Option<(Instant, u64, u32)> {
        let idle = self.idle_timeout();
        self.conns
            .iter()
            .flat_map(|(&id, conn)| {
                conn.ends
                    .iter()
                    .filter(|end| end.open)
                    .filter_map(move |end| end.silent_since.map(|since| (since + idle, id, end.node)))
            })
            .min()
    }
}

/// The `PeerDown` reason of an end closed by its peer, as the QUIC transport words it.
fn closed_by_peer(code: u32, reason: &str) -> String {
    format!("closed by the peer with code {code:#x} ({}): {reason}", codes::name(code))
}

/// `reason` cut to what a QUIC close frame carries.
fn cut_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_CLOSE_REASON_BYTES);
        let cut = cut_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON_BYTES && cut.chars().all(|c| c == 'é'));
    }
}
