//! One established connection to a peer, and the rule choosing between two connections to
//! the same peer.
//!
//! The rule ([`arbitrate`]) is a plain function of the two connections' facts so every case
//! is unit-tested without sockets; the endpoint applies its verdict under the peer table's
//! lock.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use quinn::{Connection, ConnectionError, VarInt};
use tokio::sync::Semaphore;

use super::lock;
use crate::codes;

/// Longest close reason sent to a peer; QUIC must fit it into one packet with the rest of
/// the CONNECTION_CLOSE frame.
const MAX_CLOSE_REASON_BYTES: usize = 512;

/// How a connection was closed by this node, recorded by whoever closed it first.
#[derive(Clone, Debug)]
pub(crate) struct LocalClose {
    pub(crate) code: u32,
    pub(crate) reason: String,
    /// Closed for bad input or as a duplicate: reported as
    /// [`TransportEvent::Rejected`](crate::TransportEvent::Rejected).
    pub(crate) rejected: bool,
}

/// A connection that passed the hello.
pub(crate) struct Link {
    pub(crate) conn: Connection,
    pub(crate) peer: u32,
    pub(crate) addr: SocketAddr,
    /// Node id of the side that dialled this connection.
    pub(crate) dialled_by: u32,
    /// The peer's incarnation, from its hello.
    pub(crate) incarnation: u64,
    /// Sends in flight on this connection; a send without a permit is refused as busy.
    pub(crate) sends: Arc<Semaphore>,
    local_close: Mutex<Option<LocalClose>>,
}

impl Link {
    pub(crate) fn new(conn: Connection, peer: u32, dialled_by: u32, incarnation: u64, max_sends: usize) -> Self {
        let addr = conn.remote_address();
        Self {
            conn,
            peer,
            addr,
            dialled_by,
            incarnation,
            sends: Arc::new(Semaphore::new(max_sends)),
            local_close: Mutex::new(None),
        }
    }

    /// Still open (neither side closed it, no timeout).
    pub(crate) fn is_live(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Closes the connection with `code`, recording why; later closes keep the first record.
    /// Returns whether this call closed it.
    pub(crate) fn close(&self, code: u32, reason: &str, rejected: bool) -> bool {
        {
            let mut record = lock(&self.local_close);
            if record.is_some() || !self.is_live() {
                return false;
            }
            *record = Some(LocalClose { code, reason: reason.to_owned(), rejected });
        }
        close_connection(&self.conn, code, reason);
        true
    }

    /// How this node closed the connection, if it did.
    pub(crate) fn local_close(&self) -> Option<LocalClose> {
        lock(&self.local_close).clone()
    }

    /// Human-readable reason the connection ended, for
    /// [`TransportEvent::PeerDown`](crate::TransportEvent::PeerDown).
    pub(crate) fn down_reason(&self, err: &ConnectionError, idle_timeout_ms: u64) -> String {
        if let Some(close) = self.local_close() {
            return format!(
                "closed by this node with code {:#x} ({}): {}",
                close.code,
                codes::name(close.code),
                close.reason
            );
        }
        describe_close(err, idle_timeout_ms)
    }
}

/// Closes `conn` with `code` and a reason cut to what fits in a packet.
pub(crate) fn close_connection(conn: &Connection, code: u32, reason: &str) {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(VarInt::from_u32(code), &reason.as_bytes()[..end]);
}

/// Describes how a connection ended when this node did not close it.
pub(crate) fn describe_close(err: &ConnectionError, idle_timeout_ms: u64) -> String {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX);
            format!(
                "closed by the peer with code {code:#x} ({}): {}",
                codes::name(code),
                String::from_utf8_lossy(&close.reason)
            )
        }
        ConnectionError::TimedOut => format!("idle timeout: nothing heard from the peer for {idle_timeout_ms} ms"),
        other => other.to_string(),
    }
}

/// The facts about the connection a peer already has in the table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Current {
    pub(crate) dialled_by: u32,
    pub(crate) incarnation: u64,
    pub(crate) live: bool,
    /// The peer closed it as a duplicate: it kept another connection to us, which is
    /// expected to arrive (or has arrived) here too.
    pub(crate) dropped_as_duplicate: bool,
}

impl Current {
    pub(crate) fn of(link: &Link) -> Self {
        Self {
            dialled_by: link.dialled_by,
            incarnation: link.incarnation,
            live: link.is_live(),
            dropped_as_duplicate: closed_by_peer_as_duplicate(&link.conn),
        }
    }
}

/// Whether the peer closed `conn` with [`codes::DUPLICATE`].
pub(crate) fn closed_by_peer_as_duplicate(conn: &Connection) -> bool {
    matches!(conn.close_reason(), Some(ConnectionError::ApplicationClosed(close))
        if close.error_code == VarInt::from_u32(codes::DUPLICATE))
}

/// The facts about a connection that just passed its hello.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub(crate) dialled_by: u32,
    pub(crate) incarnation: u64,
}

/// What to do with a connection that just passed its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The peer had no connection: take this one and report the peer up.
    Insert,
    /// Take this one in place of the current connection.
    Replace {
        /// Report the peer down then up again: the old connection was dead or belonged to an
        /// earlier incarnation, so whatever was in flight on it is lost.
        announce: bool,
        /// Close the old connection with this code (`None`: it is already closed).
        close_old_with: Option<u32>,
    },
    /// Keep the current connection and close this one with `code`.
    Refuse {
        /// The close code.
        code: u32,
    },
}

/// Chooses between a peer's current connection and a new one, so both nodes keep the same
/// single connection without talking about it:
///
/// 1. no current, or a dead one: take the new one (silently if the peer closed the old one
///    as a duplicate of this one: the peer never went away);
/// 2. a different incarnation: the peer restarted, the new one supersedes the old;
/// 3. both dialled by the same node (two concurrent dials): keep the current one;
/// 4. otherwise both nodes dialled at once: keep the one dialled by the lower node id.
///
/// Rule 4 gives both ends the same answer whatever order they see the two connections in.
pub(crate) fn arbitrate(local: u32, peer: u32, current: Option<Current>, new: Candidate) -> Verdict {
    let Some(current) = current else {
        return Verdict::Insert;
    };
    if !current.live {
        let swap = current.dropped_as_duplicate && current.incarnation == new.incarnation;
        return Verdict::Replace { announce: !swap, close_old_with: None };
    }
    if current.incarnation != new.incarnation {
        return Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) };
    }
    if current.dialled_by == new.dialled_by {
        return Verdict::Refuse { code: codes::DUPLICATE };
    }
    if new.dialled_by == local.min(peer) {
        Verdict::Replace { announce: false, close_old_with: Some(codes::DUPLICATE) }
    } else {
        Verdict::Refuse { code: codes::DUPLICATE }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INC: u64 = 77;

    fn live(dialled_by: u32) -> Option<Current> {
        Some(Current { dialled_by, incarnation: INC, live: true, dropped_as_duplicate: false })
    }

    fn new(dialled_by: u32) -> Candidate {
        Candidate { dialled_by, incarnation: INC }
    }

    #[test]
    fn first_connection_is_taken() {
        assert_eq!(arbitrate(0, 1, None, new(0)), Verdict::Insert);
    }

    #[test]
    fn simultaneous_dials_keep_the_lower_ids_connection_on_both_ends() {
        // Node 0 and node 1 dial each other; each end may see either connection first.
        for (local, peer) in [(0, 1), (1, 0)] {
            // Current is node 0's connection, node 1's arrives: refused.
            assert_eq!(arbitrate(local, peer, live(0), new(1)), Verdict::Refuse { code: codes::DUPLICATE });
            // Current is node 1's connection, node 0's arrives: replaces it, no event.
            assert_eq!(
                arbitrate(local, peer, live(1), new(0)),
                Verdict::Replace { announce: false, close_old_with: Some(codes::DUPLICATE) }
            );
        }
    }

    #[test]
    fn a_second_dial_from_the_same_side_is_a_duplicate() {
        assert_eq!(arbitrate(5, 2, live(5), new(5)), Verdict::Refuse { code: codes::DUPLICATE });
        assert_eq!(arbitrate(5, 2, live(2), new(2)), Verdict::Refuse { code: codes::DUPLICATE });
    }

    #[test]
    fn a_restarted_peer_supersedes_its_old_connection_whoever_dialled() {
        let restarted = Candidate { dialled_by: 9, incarnation: INC + 1 };
        assert_eq!(
            arbitrate(1, 9, live(1), restarted),
            Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) }
        );
        let older = Candidate { dialled_by: 9, incarnation: INC - 1 };
        assert!(matches!(arbitrate(1, 9, live(9), older), Verdict::Replace { announce: true, .. }));
    }

    #[test]
    fn a_dead_current_connection_is_replaced_and_announced() {
        let dead = Some(Current { dialled_by: 0, incarnation: INC, live: false, dropped_as_duplicate: false });
        assert_eq!(arbitrate(0, 1, dead, new(1)), Verdict::Replace { announce: true, close_old_with: None });
    }

    #[test]
    fn a_connection_the_peer_dropped_as_duplicate_is_swapped_silently() {
        // Node 1 dialled first and node 0 saw that connection first, then node 1 dropped it in
        // favour of node 0's: node 0 takes its own connection without a PeerDown.
        let dropped = Some(Current { dialled_by: 1, incarnation: INC, live: false, dropped_as_duplicate: true });
        assert_eq!(arbitrate(0, 1, dropped, new(0)), Verdict::Replace { announce: false, close_old_with: None });
        let restarted = Candidate { dialled_by: 0, incarnation: INC + 1 };
        assert!(matches!(arbitrate(0, 1, dropped, restarted), Verdict::Replace { announce: true, .. }));
    }
}
