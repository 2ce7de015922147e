//! The state behind a [`Transport`](crate::Transport) handle: the peer table, the event
//! queue and the counters, and the operations that change them.
//!
//! The peer table sits behind one short-lived `std` mutex, never held across an `.await`.
//! Lifecycle events (`PeerUp`, `PeerDown`) and message deliveries are pushed into the event
//! queue *while* holding it, with queue slots reserved beforehand, so the order of events
//! always matches the order of table changes: a `Message` can never precede its peer's
//! `PeerUp` nor follow its `PeerDown`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "fault-injection")]
use bytes::Bytes;
use quinn::{Connection, ConnectionError};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc::PermitIterator;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::config::TransportConfig;
use super::error::{ConnectError, SendError};
use super::hello::{self, Hello, HelloError};
use super::link::{
    arbitrate, close_connection, closed_by_peer_as_duplicate, closed_by_peer_with, describe_close,
    duplicate_identity_reason, redundant_dial, Candidate, Current, Link, Verdict,
};
use super::stats::{Counters, TransportStats};
use super::{lock, PeerInfo, TransportEvent};
use crate::certs::{client_name_of, node_id_of};
use crate::frame::OutFrame;
use crate::{codes, tls, Limits, Revocations, ALPN, PROTOCOL_VERSION};

/// How long [`Inner::shutdown`] waits for closing connections to drain: enough
/// for the close to reach live peers (a few round trips on a LAN), short enough
/// that a node exits promptly when a peer is dead.
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_millis(250);

pub(crate) struct Inner {
    pub(crate) id: u32,
    /// Node ids `0..members` may connect; `None`: any (see [`TransportConfig::members`]).
    pub(crate) members: Option<u32>,
    pub(crate) incarnation: u64,
    pub(crate) endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    pub(crate) local_addr: SocketAddr,
    pub(crate) limits: Limits,
    pub(crate) hello_timeout: Duration,
    pub(crate) idle_timeout_ms: u64,
    /// See [`TransportConfig::restart_silence_ms`].
    restart_silence: Duration,
    max_inflight_sends: usize,
    pub(crate) recv_budget_bytes: usize,
    peers: Mutex<HashMap<u32, Arc<Link>>>,
    /// Peers with a [`probe`](Self::probe) in flight (at most one each).
    probing: Arc<Mutex<HashSet<u32>>>,
    pub(crate) events: mpsc::Sender<TransportEvent>,
    pub(crate) stats: Arc<Counters>,
    pub(crate) connections: watch::Sender<usize>,
    /// Bumped whenever a link enters the peer table, for callers waiting for a peer.
    table_changes: watch::Sender<()>,
    pub(crate) runtime: tokio::runtime::Handle,
    shutting_down: AtomicBool,
    /// Slots of client connections ([`super::clients::MAX_CLIENT_CONNECTIONS`]).
    pub(crate) clients: Arc<tokio::sync::Semaphore>,
    /// The certificates refused; every connection's task watches it.
    pub(crate) revocations: watch::Sender<Arc<Revocations>>,
}

impl Inner {
    pub(crate) fn new(
        config: &TransportConfig,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        local_addr: SocketAddr,
        events: mpsc::Sender<TransportEvent>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            id: config.identity.id,
            members: config.members,
            incarnation: draw_incarnation(),
            endpoint,
            client_config,
            local_addr,
            limits: config.limits,
            hello_timeout: Duration::from_millis(config.hello_timeout_ms),
            idle_timeout_ms: config.idle_timeout_ms,
            restart_silence: Duration::from_millis(config.restart_silence_ms),
            max_inflight_sends: config.max_inflight_sends_per_peer,
            recv_budget_bytes: config.recv_budget_bytes_per_peer,
            peers: Mutex::new(HashMap::new()),
            probing: Arc::default(),
            events,
            stats: Arc::new(Counters::default()),
            connections: watch::Sender::new(0),
            table_changes: watch::Sender::new(()),
            runtime,
            shutting_down: AtomicBool::new(false),
            clients: Arc::new(tokio::sync::Semaphore::new(super::clients::MAX_CLIENT_CONNECTIONS)),
            revocations: watch::Sender::new(Arc::new(Revocations::default())),
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    fn hello(&self) -> Hello {
        Hello { protocol_version: PROTOCOL_VERSION, node_id: self.id, incarnation: self.incarnation }
    }

    // ---- connection setup -------------------------------------------------------------

    /// Counts `conn` in [`Transport::watch_connections`](crate::Transport::watch_connections)
    /// until it closes.
    pub(crate) fn track(&self, conn: &Connection) {
        self.connections.send_modify(|open| *open += 1);
        let (conn, connections) = (conn.clone(), self.connections.clone());
        self.runtime.spawn(async move {
            conn.closed().await;
            connections.send_modify(|open| *open = open.saturating_sub(1));
        });
    }

    /// The peer's node id from its certificate, after checking the negotiated ALPN; on
    /// failure the close code and reason.
    fn identify(&self, conn: &Connection) -> Result<u32, (u32, String)> {
        let alpn = negotiated_alpn(conn);
        if alpn.as_deref() != Some(ALPN) {
            // rustls already refuses a mismatch; this guards against a peer that negotiated none.
            return Err((codes::HANDSHAKE_FAILED, format!("negotiated ALPN {alpn:?}, expected {ALPN:?}")));
        }
        let certs = conn.peer_identity().and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok());
        if let Some(reason) = certs.as_deref().and_then(|certs| certs.first()).and_then(|cert| self.revoked(cert)) {
            return Err((codes::REVOKED, reason));
        }
        let id = certs.as_deref().and_then(|certs| certs.first()).and_then(|cert| node_id_of(cert));
        let client = || certs.as_deref().and_then(|certs| certs.first()).and_then(|cert| client_name_of(cert));
        match id {
            None => match client() {
                Some(name) => Err((
                    codes::NO_NODE_ID,
                    format!("client certificate client-{name} may use the client API only; it cannot join as a member"),
                )),
                None => Err((codes::NO_NODE_ID, "the certificate names no single node-<id>".to_owned())),
            },
            Some(id) if id == self.id => {
                Err((codes::SELF_CONNECT, format!("the peer presents this node's own id {id}")))
            }
            Some(id) if self.members.is_some_and(|n| id >= n) => {
                let n = self.members.unwrap_or_default();
                Err((codes::NOT_A_MEMBER, format!("node {id} is not a member of this {n}-node cluster (ids 0..{n})")))
            }
            Some(id) => Ok(id),
        }
    }

    /// Why `cert` is refused, if the revocation list names it.
    pub(crate) fn revoked(&self, cert: &[u8]) -> Option<String> {
        let list = self.revocations.borrow().clone();
        list.revoking(cert).map(|entry| format!("the certificate is revoked ({entry} is on the revocation list)"))
    }

    /// Replaces the revocation list; every connection's task checks its peer against it.
    pub(crate) fn set_revocations(&self, list: Revocations) {
        self.revocations.send_replace(Arc::new(list));
    }

    /// Closes a connection that never became a link, and reports it.
    async fn refuse(&self, conn: &Connection, addr: SocketAddr, peer: Option<u32>, code: u32, reason: String) {
        close_connection(conn, code, &reason);
        self.report_rejected(addr, peer, code, reason).await;
    }

    /// Logs, counts and emits a rejection.
    pub(crate) async fn report_rejected(&self, addr: SocketAddr, peer: Option<u32>, code: u32, reason: String) {
        self.log_rejected(addr, peer, code, &reason);
        let _ = self.events.send(TransportEvent::Rejected { addr, peer, code, reason }).await;
    }

    /// Logs and counts a rejection (the event is emitted by whoever owns the connection).
    pub(crate) fn log_rejected(&self, addr: SocketAddr, peer: Option<u32>, code: u32, reason: &str) {
        self.stats.rejected(code);
        let kind = codes::name(code);
        if matches!(code, codes::DUPLICATE | codes::SUPERSEDED) {
            // Expected when nodes dial each other at once or restart: not a fault.
            tracing::debug!(node = self.id, %addr, ?peer, code = format_args!("{code:#x}"), kind, reason, "connection closed");
        } else {
            tracing::warn!(node = self.id, %addr, ?peer, code = format_args!("{code:#x}"), kind, reason, "connection rejected");
        }
    }

    /// Reports a failed hello: a rejection if the peer misbehaved, a debug line if the
    /// connection simply went away.
    async fn hello_failed(&self, conn: &Connection, addr: SocketAddr, peer: u32, err: &HelloError) {
        match err.violation() {
            Some((code, reason)) => self.refuse(conn, addr, Some(peer), code, reason).await,
            None => tracing::debug!(node = self.id, %addr, peer, error = %err, "connection ended during the hello"),
        }
    }

    /// The acceptor's path after TLS: identity, hello, registration.
    pub(crate) async fn accept(self: &Arc<Self>, conn: Connection) {
        let addr = conn.remote_address();
        self.track(&conn);
        if negotiated_alpn(&conn).as_deref() == Some(tls::CLIENT_ALPN) {
            return self.accept_client(conn, addr).await;
        }
        let peer = match self.identify(&conn) {
            Ok(peer) => peer,
            Err((code, reason)) => return self.refuse(&conn, addr, None, code, reason).await,
        };
        let theirs = match tokio::time::timeout(self.hello_timeout, hello::accept(&conn, &self.hello(), peer)).await {
            Ok(Ok(theirs)) => theirs,
            Ok(Err(err)) => return self.hello_failed(&conn, addr, peer, &err).await,
            Err(_) => return self.hello_failed(&conn, addr, peer, &HelloError::TimedOut).await,
        };
        self.establish(conn, peer, peer, theirs.incarnation).await;
    }

    /// [`Transport::connect`](crate::Transport::connect).
    pub(crate) async fn connect(self: &Arc<Self>, addr: SocketAddr, expect: Option<u32>) -> Result<u32, ConnectError> {
        let node = self.id;
        if self.is_shutting_down() {
            return Err(ConnectError::ShuttingDown { node });
        }
        if expect == Some(node) {
            return Err(ConnectError::SelfConnect { node });
        }
        if let Some(peer) = self.live_peer(addr, expect) {
            return Ok(peer);
        }
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), addr, &tls::server_name(expect))
            .map_err(|source| ConnectError::Start { addr, source })?;
        let conn = connecting.await.map_err(|source| ConnectError::Handshake { addr, source })?;
        self.track(&conn);
        let refused = |peer, code, reason| ConnectError::Refused { addr, peer, code, reason };

        let peer = match self.identify(&conn) {
            Ok(peer) => peer,
            Err((code, reason)) => {
                self.refuse(&conn, addr, None, code, reason.clone()).await;
                return Err(refused(None, code, reason));
            }
        };
        if let Some(expected) = expect.filter(|&expected| expected != peer) {
            // TLS already checked the name node-<expected>; only a certificate naming several
            // nodes could get here, and node_id_of refuses those. Checked all the same.
            let (code, reason) = (codes::ID_MISMATCH, format!("dialled node {expected} but node {peer} answered"));
            self.refuse(&conn, addr, Some(peer), code, reason.clone()).await;
            return Err(refused(Some(peer), code, reason));
        }

        let current = lock(&self.peers).get(&peer).map(|link| Current::of(link, Instant::now()));
        if redundant_dial(current, conn.remote_address()) {
            // Its first packets were lost (the peer was not listening yet) and the peer dialled
            // this node meanwhile: keep that connection and drop this one before its hello.
            tracing::debug!(node, peer, %addr, "a late dial is dropped: the connection the peer dialled is kept");
            close_connection(&conn, codes::DUPLICATE, "already connected: the connection the peer dialled is kept");
            return Ok(peer);
        }
        let theirs = match tokio::time::timeout(self.hello_timeout, hello::dial(&conn, &self.hello(), peer)).await {
            Ok(Ok(theirs)) => theirs,
            Ok(Err(err)) if closed_by_peer_as_duplicate(&conn) => {
                // Both nodes dialled at once and the peer already kept the other connection,
                // closing this one before its hello reached us. That connection is (or is
                // about to be) registered here too: wait for it rather than fail.
                tracing::debug!(node, peer, error = %err, "dialled a duplicate; waiting for the kept connection");
                return match tokio::time::timeout(self.hello_timeout, self.wait_for_peer(peer)).await {
                    Ok(()) => Ok(peer),
                    Err(_) => Err(self.dial_hello_failed(&conn, addr, peer, err).await),
                };
            }
            Ok(Err(err)) => return Err(self.dial_hello_failed(&conn, addr, peer, err).await),
            Err(_) => return Err(self.dial_hello_failed(&conn, addr, peer, HelloError::TimedOut).await),
        };
        if self.establish(conn, peer, node, theirs.incarnation).await {
            Ok(peer)
        } else if self.is_shutting_down() {
            Err(ConnectError::ShuttingDown { node })
        } else {
            let reason = format!("node {peer}'s certificate was revoked during the handshake");
            Err(ConnectError::Refused { addr, peer: Some(peer), code: codes::REVOKED, reason })
        }
    }

    async fn dial_hello_failed(&self, conn: &Connection, addr: SocketAddr, peer: u32, err: HelloError) -> ConnectError {
        if let Some(reason) = closed_by_peer_with(conn, codes::DUPLICATE_IDENTITY) {
            self.refused_as_duplicate(peer, addr, reason.clone()).await;
            return ConnectError::DuplicateIdentity { addr, peer, reason };
        }
        self.hello_failed(conn, addr, peer, &err).await;
        match err.violation() {
            Some((code, reason)) => ConnectError::Refused { addr, peer: Some(peer), code, reason },
            None => {
                let reason = match conn.close_reason() {
                    Some(closed) => describe_close(&closed, self.idle_timeout_ms),
                    None => err.to_string(),
                };
                ConnectError::Lost { addr, peer, reason }
            }
        }
    }

    /// Returns once `peer` has a live link.
    async fn wait_for_peer(&self, peer: u32) {
        let mut changes = self.table_changes.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` exists.
        let _ = changes.wait_for(|_| self.live_link(peer).is_some()).await;
    }

    /// A live peer matching `expect`, or else reached at `addr`.
    fn live_peer(&self, addr: SocketAddr, expect: Option<u32>) -> Option<u32> {
        let peers = lock(&self.peers);
        match expect {
            Some(id) => peers.get(&id).filter(|link| link.is_live()).map(|link| link.peer),
            None => peers.values().find(|link| link.addr == addr && link.is_live()).map(|link| link.peer),
        }
    }

    /// Registers a connection that passed its hello, applying [`arbitrate`], and starts its
    /// driver if it was taken. Returns whether the peer now has a live connection (this one or
    /// the one it lost to).
    ///
    /// A connection from another incarnation of a peer whose connection may still be alive
    /// waits here (at most [`TransportConfig::restart_silence_ms`]) for the old connection to
    /// speak (the newcomer is then refused as a second process) or to stay silent (the
    /// newcomer is a restart and takes over).
    async fn establish(self: &Arc<Self>, conn: Connection, peer: u32, dialled_by: u32, incarnation: u64) -> bool {
        let link = Arc::new(Link::new(conn, peer, dialled_by, incarnation, self.max_inflight_sends));
        // Revoked while this connection was in its hello (its certificate was checked before).
        if let Some(reason) = self.revoked(&link.cert) {
            let reason = format!("node {peer}: {reason}");
            link.close(codes::REVOKED, &reason, true);
            self.report_rejected(link.addr, Some(peer), codes::REVOKED, reason).await;
            return false;
        }
        let arrived = Instant::now();
        let (taken, displaced) = loop {
            // Two slots: a restart is announced as PeerDown + PeerUp. None if the receiver is gone.
            let slots = self.events.reserve_many(2).await.ok();
            match self.arbitrate_and_apply(&link, arrived, slots) {
                Applied::Done { taken, displaced } => break (taken, displaced),
                Applied::ShuttingDown => {
                    link.close(codes::SHUTDOWN, "transport is shutting down", false);
                    return false;
                }
                Applied::Wait { current, at_most } => {
                    let mut heard = current.watch_heard();
                    tokio::select! {
                        _ = heard.changed() => {}
                        _ = current.conn.closed() => {}
                        _ = link.conn.closed() => {}
                        _ = tokio::time::sleep(at_most) => {}
                    }
                    if !link.is_live() {
                        tracing::debug!(node = self.id, peer, addr = %link.addr, "a connection closed while its incarnation was judged");
                        return self.live_link(peer).is_some();
                    }
                }
            }
        };
        if let Some((loser, code, reason)) = displaced {
            self.log_rejected(loser.addr, Some(peer), code, &reason);
            loser.close(code, &reason, true);
            if !taken {
                // A refused link has no driver to report it.
                let _ = self
                    .events
                    .send(TransportEvent::Rejected { addr: loser.addr, peer: Some(peer), code, reason })
                    .await;
            }
        }
        if taken {
            self.table_changes.send_replace(());
            tracing::info!(node = self.id, peer, addr = %link.addr, dialled_by, "peer up");
            self.runtime.spawn(super::driver::drive(self.clone(), link));
        }
        taken || self.live_link(peer).is_some()
    }

    /// One round of [`establish`](Self::establish) under the peer table's lock: judges `link`
    /// against the peer's current connection and applies the verdict, emitting `PeerUp` /
    /// `PeerDown` through `slots` so their order matches the table's.
    fn arbitrate_and_apply(
        &self,
        link: &Arc<Link>,
        arrived: Instant,
        mut slots: Option<PermitIterator<'_, TransportEvent>>,
    ) -> Applied {
        let mut emit = |event| {
            if let Some(permit) = slots.as_mut().and_then(|slots| slots.next()) {
                permit.send(event);
            }
        };
        let (peer, incarnation) = (link.peer, link.incarnation);
        let mut peers = lock(&self.peers);
        if self.is_shutting_down() {
            return Applied::ShuttingDown;
        }
        let now = Instant::now();
        let current = peers.get(&peer).cloned();
        let facts = current.as_deref().map(|current| Current::of(current, now));
        let candidate = Candidate {
            dialled_by: link.dialled_by,
            incarnation,
            waited: now.saturating_duration_since(arrived),
            addr: link.conn.remote_address(),
        };
        match arbitrate(self.id, peer, facts, candidate, self.restart_silence) {
            Verdict::Insert => {
                peers.insert(peer, link.clone());
                emit(TransportEvent::PeerUp { peer, addr: link.addr });
                Applied::Done { taken: true, displaced: None }
            }
            Verdict::Replace { announce, close_old_with } => {
                let old = peers.insert(peer, link.clone());
                if announce {
                    let reason = match &old {
                        Some(old) if close_old_with.is_some() => {
                            format!("node restarted (incarnation {:#x} replaced {:#x})", incarnation, old.incarnation)
                        }
                        Some(old) => old.conn.close_reason().map_or_else(
                            || "connection replaced".to_owned(),
                            |err| old.down_reason(&err, self.idle_timeout_ms),
                        ),
                        None => "connection replaced".to_owned(),
                    };
                    emit(TransportEvent::PeerDown { peer, reason });
                    emit(TransportEvent::PeerUp { peer, addr: link.addr });
                }
                let displaced = old.zip(close_old_with).map(|(old, code)| {
                    let reason = match code {
                        codes::DUPLICATE => {
                            format!("duplicate connection between nodes {} and {peer}; the other one is kept", self.id)
                        }
                        _ => format!(
                            "node {peer} connected again from incarnation {incarnation:#x} at {} after this \
                             connection (incarnation {:#x} at {}) was silent for {} ms",
                            link.addr,
                            old.incarnation,
                            old.addr,
                            now.saturating_duration_since(old.last_heard()).as_millis()
                        ),
                    };
                    (old, code, reason)
                });
                Applied::Done { taken: true, displaced }
            }
            Verdict::Refuse { code } => {
                let reason = match (code, &current) {
                    (codes::DUPLICATE_IDENTITY, Some(member)) => {
                        duplicate_identity_reason(peer, member.addr, member.incarnation)
                    }
                    _ => format!("duplicate connection between nodes {} and {peer}; the other one is kept", self.id),
                };
                Applied::Done { taken: false, displaced: Some((link.clone(), code, reason)) }
            }
            Verdict::Wait { at_most } => match current {
                Some(current) => Applied::Wait { current, at_most },
                // arbitrate only waits on a current connection; judge again at once.
                None => Applied::Wait { current: link.clone(), at_most: Duration::ZERO },
            },
        }
    }

    /// Counts, logs and reports that `peer` refused this node as a second process with a
    /// member's id.
    async fn refused_as_duplicate(&self, peer: u32, addr: SocketAddr, reason: String) {
        self.stats.refused_by_peer(codes::DUPLICATE_IDENTITY);
        tracing::error!(node = self.id, peer, %addr, reason, "refused: another process with this node's id is a live member");
        let _ = self.events.send(TransportEvent::DuplicateIdentity { peer, addr, reason }).await;
    }

    // ---- events from a link's driver --------------------------------------------------

    /// Hands a received frame to the caller if `link`'s peer incarnation is still the current
    /// one; otherwise the frame is dropped, since its `PeerDown` was already reported.
    pub(crate) async fn deliver(&self, link: &Link, frame: crate::RecvFrame) {
        let Ok(permit) = self.events.reserve().await else {
            self.stats.dropped();
            return;
        };
        let peers = lock(&self.peers);
        if peers.get(&link.peer).is_some_and(|current| current.incarnation == link.incarnation) {
            permit.send(TransportEvent::Message { peer: link.peer, frame });
        } else {
            self.stats.dropped();
        }
    }

    /// Called by a link's driver once its connection ended and every frame read from it was
    /// handled: reports a local rejection, and the peer down if this was its current link.
    pub(crate) async fn link_down(&self, link: &Arc<Link>, end: &ConnectionError) {
        if let Some(reason) = closed_by_peer_with(&link.conn, codes::DUPLICATE_IDENTITY) {
            self.refused_as_duplicate(link.peer, link.addr, reason).await;
        }
        // Set when the peer's certificate was revoked while this link waited for its
        // replacement: the replacement is refused at its hello, and the peer is down for that.
        let mut revoked = None;
        if closed_by_peer_as_duplicate(&link.conn) {
            // The peer kept another connection to us and will not come back on this one; that
            // one is still in its hello here. Give it the hello timeout to take this link's
            // place, so a mere swap of connections is not reported as the peer going down —
            // unless the peer's certificate is revoked meanwhile: then no replacement can come,
            // and the peer is reported down at once, for that reason.
            let mut changes = self.table_changes.subscribe();
            let replaced =
                |_: &()| !lock(&self.peers).get(&link.peer).is_some_and(|current| Arc::ptr_eq(current, link));
            let mut revocations = self.revocations.subscribe();
            revocations.mark_changed();
            let revocation = async {
                loop {
                    if revocations.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                    if let Some(reason) = self.revoked(&link.cert) {
                        return reason;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(self.hello_timeout, changes.wait_for(replaced)) => {}
                reason = revocation => revoked = Some(reason),
            }
        }
        if let Some(close) = link.local_close().filter(|close| close.rejected) {
            let event = TransportEvent::Rejected {
                addr: link.addr,
                peer: Some(link.peer),
                code: close.code,
                reason: close.reason,
            };
            let _ = self.events.send(event).await;
        }
        let permit = self.events.reserve().await.ok();
        let mut peers = lock(&self.peers);
        if peers.get(&link.peer).is_some_and(|current| Arc::ptr_eq(current, link)) {
            peers.remove(&link.peer);
            let reason = match revoked {
                Some(reason) => {
                    format!("node {}: {reason} (its connection had been closed by the peer as a duplicate)", link.peer)
                }
                None => link.down_reason(end, self.idle_timeout_ms),
            };
            tracing::info!(node = self.id, peer = link.peer, reason, "peer down");
            if let Some(permit) = permit {
                permit.send(TransportEvent::PeerDown { peer: link.peer, reason });
            }
        }
    }

    // ---- caller operations ------------------------------------------------------------

    fn live_link(&self, peer: u32) -> Option<Arc<Link>> {
        lock(&self.peers).get(&peer).filter(|link| link.is_live()).cloned()
    }

    pub(crate) fn send(&self, peer: u32, frame: OutFrame) -> Result<(), SendError> {
        let link = self.live_link(peer).ok_or(SendError::NotConnected { peer })?;
        let permit = link
            .sends
            .clone()
            .try_acquire_owned()
            .map_err(|_| SendError::Busy { peer, in_flight: self.max_inflight_sends })?;
        self.spawn_write(link, permit, frame);
        Ok(())
    }

    pub(crate) async fn send_when_ready(&self, peer: u32, frame: OutFrame) -> Result<(), SendError> {
        let link = self.live_link(peer).ok_or(SendError::NotConnected { peer })?;
        let permit = tokio::select! {
            permit = link.sends.clone().acquire_owned() => permit.map_err(|_| SendError::NotConnected { peer })?,
            // Waiting for a slot on a connection that died would wait forever.
            _ = link.conn.closed() => return Err(SendError::NotConnected { peer }),
        };
        self.spawn_write(link, permit, frame);
        Ok(())
    }

    /// Fault injection: see [`Transport::send_raw`](crate::Transport::send_raw).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn send_raw(&self, peer: u32, bytes: Bytes) -> Result<super::raw::RawSend, SendError> {
        let link = self.live_link(peer).ok_or(SendError::NotConnected { peer })?;
        let permit = link
            .sends
            .clone()
            .try_acquire_owned()
            .map_err(|_| SendError::Busy { peer, in_flight: self.max_inflight_sends })?;
        Ok(super::raw::spawn(&self.runtime, link, permit, bytes))
    }

    /// A peer's frame broke a codec rule: one [`TransportEvent::BadFrame`] (waiting for room
    /// in the queue, like a message).
    pub(crate) async fn bad_frame(&self, link: &Link, code: u32, reason: String) {
        self.stats.bad_frame();
        let _ = self.events.send(TransportEvent::BadFrame { peer: link.peer, code, reason }).await;
    }

    fn spawn_write(&self, link: Arc<Link>, permit: OwnedSemaphorePermit, frame: OutFrame) {
        let (stats, node) = (self.stats.clone(), self.id);
        self.runtime.spawn(async move {
            let _permit = permit;
            let bytes = frame.len();
            match write_frame(&link.conn, frame).await {
                Ok(()) => stats.sent(bytes),
                Err(err) => {
                    stats.send_failed();
                    tracing::debug!(node, peer = link.peer, bytes, error = %err, "send failed");
                }
            }
        });
    }

    pub(crate) fn peers(&self) -> Vec<u32> {
        let mut ids: Vec<u32> =
            lock(&self.peers).values().filter(|link| link.is_live()).map(|link| link.peer).collect();
        ids.sort_unstable();
        ids
    }

    pub(crate) fn peer_info(&self, peer: u32) -> Option<PeerInfo> {
        self.live_link(peer).map(|link| PeerInfo {
            peer,
            addr: link.addr,
            dialled_by: link.dialled_by,
            incarnation: link.incarnation,
            rtt: link.conn.rtt(),
        })
    }

    pub(crate) fn probe(&self, peer: u32) {
        let Some(addr) = self.live_link(peer).map(|link| link.addr) else {
            return;
        };
        if !lock(&self.probing).insert(peer) {
            return;
        }
        let (probing, events, me) = (self.probing.clone(), self.events.clone(), self.id);
        self.runtime.spawn(async move {
            let closed = super::probe::port_closed(addr, super::probe::PROBE_WAIT).await;
            lock(&probing).remove(&peer);
            match closed {
                Ok(true) => {
                    tracing::debug!(node = me, peer, %addr, "no process listens at the peer's address any more");
                    // A full queue: the caller is behind, and its failure timeout still applies.
                    let _ = events.try_send(TransportEvent::PeerGone { peer, addr });
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(node = me, peer, %addr, "could not probe the peer: {e}"),
            }
        });
    }

    pub(crate) fn close_peer(&self, peer: u32, code: u32, reason: &str, rejected: bool) {
        let Some(link) = self.live_link(peer) else {
            return;
        };
        if link.close(code, reason, rejected) {
            if rejected {
                self.log_rejected(link.addr, Some(peer), code, reason);
            } else {
                tracing::info!(node = self.id, peer, code = format_args!("{code:#x}"), reason, "disconnecting");
            }
        }
    }

    pub(crate) async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let links: Vec<Arc<Link>> = lock(&self.peers).values().cloned().collect();
        for link in links {
            link.close(codes::SHUTDOWN, "node shutting down", false);
        }
        self.endpoint.close(quinn::VarInt::from_u32(codes::SHUTDOWN), b"node shutting down");
        // Live peers get the close at once; a connection to a peer that died keeps
        // retransmitting its close with a backed-off timer for seconds, so the wait
        // for the endpoint to go idle is bounded.
        if tokio::time::timeout(SHUTDOWN_DRAIN, self.endpoint.wait_idle()).await.is_err() {
            tracing::debug!(node = self.id, "connections still draining after {SHUTDOWN_DRAIN:?}; closing anyway");
        }
        tracing::info!(node = self.id, "transport shut down");
    }

    pub(crate) fn stats(&self) -> TransportStats {
        let mut quic = super::stats::QuicCounters::default();
        let mut peers = 0;
        for link in lock(&self.peers).values().filter(|link| link.is_live()) {
            peers += 1;
            quic.add(&link.conn.stats());
        }
        self.stats.snapshot(*self.connections.borrow(), peers, quic)
    }
}

/// What one round of [`Inner::establish`] came to.
enum Applied {
    /// The verdict was applied: whether the new link was taken, and the link to close (the
    /// old one it replaced, or the new one if refused) with its code and reason.
    Done { taken: bool, displaced: Option<(Arc<Link>, u32, String)> },
    /// Judge again once `current` speaks or closes, or after `at_most`.
    Wait { current: Arc<Link>, at_most: Duration },
    /// The transport is shutting down; the new link is not taken.
    ShuttingDown,
}

/// The QUIC stream priority of a [`background`](OutFrame::background) frame; every other
/// frame's stream has quinn's default, 0. quinn sends the streams of the highest priority with
/// bytes waiting first (round robin among equals).
const BACKGROUND_PRIORITY: i32 = -1;

/// Writes one frame on a new unidirectional stream. Its chunks (`Bytes`: the head, then the
/// tensor's buffers) go to quinn without being copied or joined.
async fn write_frame(conn: &Connection, frame: OutFrame) -> Result<(), WriteFrameError> {
    let mut stream = conn.open_uni().await?;
    if frame.is_background() {
        // Fails only on a stream already closed, which the write below then reports.
        let _ = stream.set_priority(BACKGROUND_PRIORITY);
    }
    stream.write_all_chunks(&mut frame.into_chunks()).await?;
    // Fails only if the stream was already finished or reset, which nothing here does.
    let _ = stream.finish();
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum WriteFrameError {
    #[error("cannot open a stream: {0}")]
    Open(#[from] ConnectionError),
    #[error("cannot write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// A random incarnation number; the time is a fallback should the system RNG fail.
/// The ALPN protocol the handshake settled on.
fn negotiated_alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
}

fn draw_incarnation() -> u64 {
    let mut bytes = [0u8; 8];
    if tls::provider().secure_random.fill(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}
