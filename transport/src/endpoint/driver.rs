//! The transport's tasks: one accepting connections, one per established connection
//! reading its streams.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};

use super::config::MAX_PENDING_HANDSHAKES;
use super::inner::Inner;
use super::link::Link;
use super::stream::{read_frame, FrameReadError, ReceivedFrame};
use crate::codes;

/// Accepts incoming connections until the endpoint closes, each handshake in its own task.
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    while let Some(incoming) = inner.endpoint.accept().await {
        let addr = incoming.remote_address();
        if inner.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            let reason = format!("more than {MAX_PENDING_HANDSHAKES} handshakes in progress");
            let inner = inner.clone();
            inner.runtime.clone().spawn(async move {
                inner.report_rejected(addr, None, codes::OVERLOADED, reason).await;
            });
            continue;
        };
        let inner = inner.clone();
        inner.runtime.clone().spawn(async move {
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting.await,
                Err(err) => Err(err),
            };
            match connecting {
                Ok(conn) => inner.accept(conn).await,
                Err(err) => {
                    let reason = format!("TLS handshake failed: {err}");
                    inner.report_rejected(addr, None, codes::HANDSHAKE_FAILED, reason).await;
                }
            }
            drop(permit);
        });
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
            inner.stats.received(frame.body.len());
            // The budget permit inside `frame` is released once the body is queued.
            let ReceivedFrame { body, _budget } = frame;
            inner.deliver(link, body).await;
        }
        Ok(Err(err)) => match err.violation() {
            Some((code, reason)) => {
                if link.close(code, &reason, true) {
                    inner.log_rejected(link.addr, Some(link.peer), code, &reason);
                }
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
