//! One established connection to a peer, and the rule choosing between two connections to
//! the same peer.
//!
//! The rule ([`arbitrate`]) is a plain function of the two connections' facts so every case
//! is unit-tested without sockets; the endpoint applies its verdict under the peer table's
//! lock.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, VarInt};
use tokio::sync::{watch, Semaphore};

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
    /// The peer's certificate (DER), checked again whenever the revocation list changes.
    pub(crate) cert: Vec<u8>,
    /// When the peer's certificate expires: the connection is closed then.
    pub(crate) not_after: Option<std::time::SystemTime>,
    /// When something last arrived on this connection: its hello, then every complete frame.
    /// The proof that the process behind it still runs (see [`arbitrate`]).
    heard: watch::Sender<Instant>,
    local_close: Mutex<Option<LocalClose>>,
}

impl Link {
    pub(crate) fn new(conn: Connection, peer: u32, dialled_by: u32, incarnation: u64, max_sends: usize) -> Self {
        let addr = conn.remote_address();
        let cert = peer_cert(&conn).unwrap_or_default();
        let not_after = crate::revocation::not_after_of(&cert);
        Self {
            cert,
            not_after,
            conn,
            peer,
            addr,
            dialled_by,
            incarnation,
            sends: Arc::new(Semaphore::new(max_sends)),
            heard: watch::Sender::new(Instant::now()),
            local_close: Mutex::new(None),
        }
    }

    /// Records that a frame just arrived from the peer.
    pub(crate) fn heard_now(&self) {
        self.heard.send_replace(Instant::now());
    }

    /// When something last arrived from the peer on this connection.
    pub(crate) fn last_heard(&self) -> Instant {
        *self.heard.borrow()
    }

    /// Changes with every frame that arrives, for waiting on the peer's next sign of life.
    pub(crate) fn watch_heard(&self) -> watch::Receiver<Instant> {
        self.heard.subscribe()
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

/// The peer's end-entity certificate (DER), if it presented one.
pub(crate) fn peer_cert(conn: &Connection) -> Option<Vec<u8>> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.to_vec())
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
    /// How long nothing has arrived on it (since its hello or its last frame).
    pub(crate) silent: Duration,
    /// The peer's address on it now.
    pub(crate) addr: SocketAddr,
}

impl Current {
    /// The facts about `link` at `now`.
    pub(crate) fn of(link: &Link, now: Instant) -> Self {
        Self {
            dialled_by: link.dialled_by,
            incarnation: link.incarnation,
            live: link.is_live(),
            dropped_as_duplicate: closed_by_peer_as_duplicate(&link.conn),
            silent: now.saturating_duration_since(link.last_heard()),
            addr: link.conn.remote_address(),
        }
    }
}

/// Whether the peer closed `conn` with [`codes::DUPLICATE`].
pub(crate) fn closed_by_peer_as_duplicate(conn: &Connection) -> bool {
    closed_by_peer_with(conn, codes::DUPLICATE).is_some()
}

/// The reason the peer gave if it closed `conn` with `code`.
pub(crate) fn closed_by_peer_with(conn: &Connection, code: u32) -> Option<String> {
    match conn.close_reason() {
        Some(ConnectionError::ApplicationClosed(close)) if close.error_code == VarInt::from_u32(code) => {
            Some(String::from_utf8_lossy(&close.reason).into_owned())
        }
        _ => None,
    }
}

/// The reason sent to a second process presenting the id of a live member.
pub(crate) fn duplicate_identity_reason(peer: u32, member_addr: SocketAddr, member_incarnation: u64) -> String {
    format!(
        "node {peer} is already a live member at {member_addr}, incarnation {member_incarnation:#x}; \
         refusing to join twice"
    )
}

/// The facts about a connection that passed its hello and waits to be taken.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub(crate) dialled_by: u32,
    pub(crate) incarnation: u64,
    /// How long ago it passed its hello.
    pub(crate) waited: Duration,
    /// The peer's address on it.
    pub(crate) addr: SocketAddr,
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
    /// Not decidable yet: the current connection belongs to another incarnation and has not
    /// been silent long enough to count as gone. Wait until something arrives on it (then the
    /// newcomer is a duplicate) or at most this long (then it is gone), and judge again.
    Wait {
        /// The longest wait before judging again.
        at_most: Duration,
    },
}

/// Whether a connection this node dialled, past its TLS handshake but before its hello, is
/// redundant: the peer already has a live connection here from the very address dialled (it
/// dialled this node meanwhile). A dial's first packets are lost when the peer is not
/// listening yet, so its handshake can complete a retransmission later (about a second),
/// when the peer's own connection has been carrying frames for a while; handing the late one
/// to [`arbitrate`] would replace that connection if this node has the lower id (rule 4), and
/// whatever was in flight on it would be lost. Dropped before its hello instead, it was never
/// taken at the peer either — a peer takes a connection only after the dialler's hello — so
/// both ends keep the connection they have. At most one of two crossing dials can be dropped
/// so: this node finds the peer's connection taken only if the peer sent its hello, which it
/// does only if it found no connection of ours, and ours gets no hello now.
///
/// A live connection from another address is left to [`arbitrate`]: a second process with a
/// member's id is told why it is refused there.
pub(crate) fn redundant_dial(current: Option<Current>, dialled: SocketAddr) -> bool {
    current.is_some_and(|current| current.live && current.addr == dialled)
}

/// Chooses between a peer's current connection and a new one, so both nodes keep the same
/// single connection without talking about it (a dial [`redundant_dial`] finds redundant
/// never gets here):
///
/// 1. no current, or a dead one: take the new one (silently if the peer closed the old one
///    as a duplicate of this one: the peer never went away);
/// 2. a different incarnation: either the peer restarted or a second process runs with the
///    same id (an operator mistake). The current connection decides:
///    - something arrived on it after the new one passed its hello: the old process runs,
///      so the newcomer is the second process and is refused with
///      [`codes::DUPLICATE_IDENTITY`] (a live member is never replaced);
///    - the new one comes from the old one's very address (a restart binds its port again,
///      which no second process could while the first holds it), or nothing arrived on the
///      old one for `restart_silence`: the old process is gone, the new one supersedes it
///      ([`codes::SUPERSEDED`]);
///    - otherwise: [`Verdict::Wait`] for whichever comes first;
/// 3. both dialled by the same node (two concurrent dials): keep the current one;
/// 4. otherwise both nodes dialled at once: keep the one dialled by the lower node id.
///
/// Rule 4 gives both ends the same answer whatever order they see the two connections in.
/// Rule 2 gives every member the same answer as long as the member process keeps sending
/// (heartbeats) more often than `restart_silence`: each refuses the second process, which
/// then stops, and the member stays the member everywhere.
pub(crate) fn arbitrate(
    local: u32,
    peer: u32,
    current: Option<Current>,
    new: Candidate,
    restart_silence: Duration,
) -> Verdict {
    let Some(current) = current else {
        return Verdict::Insert;
    };
    if !current.live {
        let swap = current.dropped_as_duplicate && current.incarnation == new.incarnation;
        return Verdict::Replace { announce: !swap, close_old_with: None };
    }
    if current.incarnation != new.incarnation {
        if current.silent < new.waited {
            return Verdict::Refuse { code: codes::DUPLICATE_IDENTITY };
        }
        if current.addr == new.addr || current.silent >= restart_silence {
            return Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) };
        }
        return Verdict::Wait { at_most: restart_silence - current.silent };
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
    /// The silence after which an incarnation counts as gone, as a node sets it (its failure
    /// detector's timeout).
    const SILENCE: Duration = Duration::from_millis(500);

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// The address of the member's process (the current connection).
    fn member_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7001))
    }

    /// Another process's address.
    fn other_addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7101))
    }

    fn live(dialled_by: u32) -> Option<Current> {
        Some(Current {
            dialled_by,
            incarnation: INC,
            live: true,
            dropped_as_duplicate: false,
            silent: ms(40),
            addr: member_addr(),
        })
    }

    /// A live current connection of incarnation `INC` silent for `silent_ms`.
    fn silent_for(silent_ms: u64) -> Option<Current> {
        live(1).map(|c| Current { silent: ms(silent_ms), ..c })
    }

    /// Only a live connection from the address dialled makes a late dial redundant.
    #[test]
    fn a_dial_is_redundant_only_beside_a_live_connection_from_the_address_dialled() {
        assert!(!redundant_dial(None, member_addr()), "no connection: the dial is needed");
        assert!(redundant_dial(live(1), member_addr()), "the peer's own connection is live");
        assert!(!redundant_dial(live(1), other_addr()), "another process: arbitrate decides");
        let dead = live(1).map(|c| Current { live: false, ..c });
        assert!(!redundant_dial(dead, member_addr()), "a dead connection is replaced by the dial");
    }

    fn new(dialled_by: u32) -> Candidate {
        Candidate { dialled_by, incarnation: INC, waited: Duration::ZERO, addr: member_addr() }
    }

    /// A connection from another incarnation of node 1, from another address, that passed its
    /// hello `waited_ms` ago.
    fn other_incarnation(waited_ms: u64) -> Candidate {
        Candidate { dialled_by: 1, incarnation: INC + 1, waited: ms(waited_ms), addr: other_addr() }
    }

    fn arbitrate(local: u32, peer: u32, current: Option<Current>, new: Candidate) -> Verdict {
        super::arbitrate(local, peer, current, new, SILENCE)
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
        // The old process died: nothing arrived on its connection for the silence window.
        let old = |dialled_by| live(dialled_by).map(|c| Current { silent: SILENCE, ..c });
        let restarted = Candidate { incarnation: INC + 1, ..other_incarnation(0) };
        assert_eq!(
            arbitrate(1, 9, old(1), restarted),
            Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) }
        );
        let older = Candidate { incarnation: INC - 1, ..other_incarnation(0) };
        assert!(matches!(arbitrate(1, 9, old(9), older), Verdict::Replace { announce: true, .. }));
    }

    #[test]
    fn another_incarnation_waits_while_the_old_one_may_still_answer() {
        // Heard 40 ms ago, the newcomer just arrived: wait out the rest of the window.
        assert_eq!(arbitrate(0, 1, silent_for(40), other_incarnation(0)), Verdict::Wait { at_most: ms(460) });
        // 300 ms later, still nothing from the old one (silent 340 ms, waited 300 ms).
        assert_eq!(arbitrate(0, 1, silent_for(340), other_incarnation(300)), Verdict::Wait { at_most: ms(160) });
    }

    #[test]
    fn another_incarnation_replaces_one_that_stopped_answering() {
        // A restart after SIGKILL: the old connection went silent at the kill.
        assert_eq!(
            arbitrate(0, 1, silent_for(500), other_incarnation(460)),
            Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) }
        );
        // Silent long before the newcomer came: taken at once, without waiting.
        assert_eq!(
            arbitrate(0, 1, silent_for(2_000), other_incarnation(0)),
            Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) }
        );
    }

    #[test]
    fn a_restart_on_the_old_address_takes_over_at_once() {
        // The restarted process bound the port the old one held: the old one is gone, however
        // recently it was heard.
        let restarted = Candidate { addr: member_addr(), ..other_incarnation(0) };
        assert_eq!(
            arbitrate(0, 1, silent_for(10), restarted),
            Verdict::Replace { announce: true, close_old_with: Some(codes::SUPERSEDED) }
        );
        // Unless the old connection spoke after the newcomer's hello: then both run (behind a
        // relay or NAT sharing one address), and the member stays the member.
        let late = Candidate { addr: member_addr(), ..other_incarnation(50) };
        assert_eq!(arbitrate(0, 1, silent_for(10), late), Verdict::Refuse { code: codes::DUPLICATE_IDENTITY });
    }

    #[test]
    fn a_second_process_is_refused_while_the_member_answers() {
        // A heartbeat from the member arrived 20 ms ago, 80 ms after the newcomer's hello.
        assert_eq!(
            arbitrate(0, 1, silent_for(20), other_incarnation(100)),
            Verdict::Refuse { code: codes::DUPLICATE_IDENTITY }
        );
        // However long the newcomer has waited, a member that keeps answering is never replaced.
        assert_eq!(
            arbitrate(2, 1, silent_for(90), other_incarnation(10_000)),
            Verdict::Refuse { code: codes::DUPLICATE_IDENTITY }
        );
        // Whoever dialled which connection.
        let member_dialled_by_us = live(2).map(|c| Current { silent: ms(5), ..c });
        assert_eq!(
            arbitrate(2, 1, member_dialled_by_us, other_incarnation(50)),
            Verdict::Refuse { code: codes::DUPLICATE_IDENTITY }
        );
    }

    #[test]
    fn a_member_connection_newer_than_the_newcomer_refuses_it() {
        // While the newcomer waited, the member's process connected again (same incarnation,
        // a fresh connection): its hello is younger than the newcomer's.
        let fresh = silent_for(0);
        assert_eq!(arbitrate(0, 1, fresh, other_incarnation(30)), Verdict::Refuse { code: codes::DUPLICATE_IDENTITY });
    }

    #[test]
    fn a_dead_member_connection_is_replaced_by_another_incarnation_at_once() {
        let dead = silent_for(10).map(|c| Current { live: false, ..c });
        assert_eq!(
            arbitrate(0, 1, dead, other_incarnation(0)),
            Verdict::Replace { announce: true, close_old_with: None }
        );
    }

    #[test]
    fn a_dead_current_connection_is_replaced_and_announced() {
        let dead = live(0).map(|c| Current { live: false, ..c });
        assert_eq!(arbitrate(0, 1, dead, new(1)), Verdict::Replace { announce: true, close_old_with: None });
    }

    #[test]
    fn a_connection_the_peer_dropped_as_duplicate_is_swapped_silently() {
        // Node 1 dialled first and node 0 saw that connection first, then node 1 dropped it in
        // favour of node 0's: node 0 takes its own connection without a PeerDown.
        let dropped = live(1).map(|c| Current { live: false, dropped_as_duplicate: true, ..c });
        assert_eq!(arbitrate(0, 1, dropped, new(0)), Verdict::Replace { announce: false, close_old_with: None });
        let restarted = Candidate { dialled_by: 0, incarnation: INC + 1, ..new(0) };
        assert!(matches!(arbitrate(0, 1, dropped, restarted), Verdict::Replace { announce: true, .. }));
    }
}
