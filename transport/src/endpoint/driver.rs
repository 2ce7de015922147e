//! The transport's tasks: one accepting connections, one per established connection
//! reading its streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};

use super::config::{MAX_HANDSHAKES_PER_ADDRESS, MAX_PENDING_HANDSHAKES};
use super::inner::Inner;
use super::link::Link;
use super::stream::{read_frame, FrameReadError, ReceivedFrame};
use super::{lock, TransportEvent};
use crate::codes;

/// Accepts incoming connections until the endpoint closes, each handshake in its own task.
///
/// Bounded against floods: an address QUIC has not validated gets a stateless Retry first
/// (so a spoofed source costs one packet and no state); at most [`MAX_PENDING_HANDSHAKES`]
/// handshakes (TLS and hello) are in progress, at most [`MAX_HANDSHAKES_PER_ADDRESS`] of
/// them from one address, each within the hello timeout. Refusals over a limit are counted
/// and reported through [`Refusals`] (at most one log line per second, no task each).
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let per_address: Arc<Mutex<HashMap<SocketAddr, usize>>> = Arc::default();
    let mut refusals = Refusals::default();
    while let Some(incoming) = inner.endpoint.accept().await {
        let addr = incoming.remote_address();
        if inner.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        if !incoming.remote_address_validated() {
            // Stateless: the client must echo the token from its own address to get further.
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            refusals.refused(&inner, addr, format!("more than {MAX_PENDING_HANDSHAKES} handshakes in progress"));
            continue;
        };
        let Some(slot) = AddressSlot::take(&per_address, addr) else {
            incoming.refuse();
            let reason = format!("more than {MAX_HANDSHAKES_PER_ADDRESS} handshakes in progress from {addr}");
            refusals.refused(&inner, addr, reason);
            continue;
        };
        let inner = inner.clone();
        inner.runtime.clone().spawn(async move {
            let connecting = match incoming.accept() {
                Ok(connecting) => tokio::time::timeout(inner.hello_timeout, connecting).await,
                Err(err) => Ok(Err(err)),
            };
            match connecting {
                Ok(Ok(conn)) => {
                    // TLS done; the hello has its own timeout inside.
                    inner.accept(conn).await
                }
                Ok(Err(err)) => {
                    let reason = format!("TLS handshake failed: {err}");
                    inner.report_rejected(addr, None, codes::HANDSHAKE_FAILED, reason).await;
                }
                Err(_) => {
                    let reason = format!("no TLS handshake within {} ms", inner.hello_timeout.as_millis());
                    inner.report_rejected(addr, None, codes::HANDSHAKE_FAILED, reason).await;
                }
            }
            drop((permit, slot));
        });
    }
}

/// One handshake in progress from an address; released when dropped.
struct AddressSlot {
    table: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    addr: SocketAddr,
}

impl AddressSlot {
    fn take(table: &Arc<Mutex<HashMap<SocketAddr, usize>>>, addr: SocketAddr) -> Option<Self> {
        let mut counts = lock(table);
        let count = counts.entry(addr).or_default();
        if *count >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Self { table: table.clone(), addr })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.table);
        if let Some(count) = counts.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.addr);
            }
        }
    }
}

/// Connections refused for load: each counted (in the stats) and offered to the event queue
/// without waiting (dropped if it is full), and logged at most once per
/// [`REFUSAL_LOG_INTERVAL`] with the number refused since the last line.
#[derive(Default)]
struct Refusals {
    last_log: Option<std::time::Instant>,
    unlogged: u64,
}

/// Least time between two log lines about refused connections.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Refusals {
    fn refused(&mut self, inner: &Inner, addr: SocketAddr, reason: String) {
        inner.stats.rejected(codes::OVERLOADED);
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self.last_log.is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_INTERVAL) {
            tracing::warn!(node = inner.id, %addr, refused = self.unlogged, "connections refused: {reason}");
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        let _ = inner.events.try_send(TransportEvent::Rejected { addr, peer: None, code: codes::OVERLOADED, reason });
    }
}

/// Reads a link's unidirectional streams, one task per stream so a small frame never waits
/// behind a large one, and hands complete frames over in the order they complete.
///
/// Back-pressure: while the event queue is full this task waits in
/// [`Inner::deliver`], stops accepting streams, and the peer's stream limit stops it; the
/// bytes already being read are bounded by the receive budget.
pub(crate) async fn drive(inner: Arc<Inner>, link: Arc<Link>) {
    let budget = Arc::new(Semaphore::new(inner.recv_budget_bytes.min(Semaphore::MAX_PERMITS)));
    let mut readers = JoinSet::new();
    let mut revocations = inner.revocations.subscribe();
    // Checked once at the start too: the list may have changed while this connection was in
    // its hello, after its certificate was checked.
    revocations.mark_changed();
    let expired = crate::revocation::expired(link.not_after);
    tokio::pin!(expired);
    let mut refused = false;
    let end = loop {
        tokio::select! {
            () = &mut expired, if !refused => {
                refused = true;
                let reason = format!("node {}'s certificate expired", link.peer);
                if link.close(codes::CERT_EXPIRED, &reason, true) {
                    inner.log_rejected(link.addr, Some(link.peer), codes::CERT_EXPIRED, &reason);
                }
            }
            Ok(()) = revocations.changed(), if !refused => {
                if let Some(reason) = inner.revoked(&link.cert) {
                    refused = true;
                    let reason = format!("node {}: {reason}", link.peer);
                    if link.close(codes::REVOKED, &reason, true) {
                        inner.log_rejected(link.addr, Some(link.peer), codes::REVOKED, &reason);
                    }
                }
            }
            accepted = link.conn.accept_uni() => match accepted {
                Ok(mut recv) => {
                    let (limits, budget, link) = (inner.limits, budget.clone(), link.clone());
                    readers.spawn(async move {
                        let read = read_frame(&mut recv, &limits, Some(&budget)).await;
                        // Marked as soon as the frame is read, not when the caller takes it:
                        // the peer's liveness must not depend on how busy this node is.
                        if read.is_ok() {
                            link.heard_now();
                        }
                        read
                    });
                }
                Err(end) => break end,
            },
            Some(done) = readers.join_next(), if !readers.is_empty() => handle(&inner, &link, done).await,
        }
    };
    // Frames read completely before the end are still delivered, before the PeerDown.
    while let Some(done) = readers.join_next().await {
        handle(&inner, &link, done).await;
    }
    inner.link_down(&link, &end).await;
}

async fn handle(inner: &Inner, link: &Link, done: Result<Result<ReceivedFrame, FrameReadError>, JoinError>) {
    match done {
        Ok(Ok(frame)) => {
            // The budget permit goes with the body: released when the receiver drops it.
            let ReceivedFrame { head, tensor, _budget } = frame;
            inner.stats.received(head.len() + tensor.byte_len());
            let budget = _budget.map_or_else(crate::ReceiveBudget::none, crate::ReceiveBudget::of);
            inner.deliver(link, crate::RecvFrame::with_budget(head, tensor, budget)).await;
        }
        Ok(Err(err)) => match err.violation() {
            Some((code, reason)) => {
                if link.close(code, &reason, true) {
                    inner.log_rejected(link.addr, Some(link.peer), code, &reason);
                }
                // Every bad frame is reported, not only the one that closed the connection:
                // the caller counts violations per member.
                inner.bad_frame(link, code, reason).await;
            }
            None => tracing::debug!(node = inner.id, peer = link.peer, error = %err, "stream ended without a frame"),
        },
        Err(err) => {
            // A panic in a reader is a bug in this crate, never the peer's input; the
            // connection is closed rather than left with a stream nobody reads.
            tracing::error!(node = inner.id, peer = link.peer, error = %err, "frame reader failed");
            link.close(codes::STREAM_FRAMING, "internal error while reading a frame", false);
        }
    }
}
