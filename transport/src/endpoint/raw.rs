//! Fault injection (the cargo feature `fault-injection`): frames written exactly as the
//! caller gives them, for a rogue member that breaks the codec's rules on purpose.
//!
//! A default build has none of this: only the chaos harness and the tests enable the feature.

use std::sync::Arc;

use bytes::Bytes;
use quinn::{Connection, StoppedError};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::link::Link;

/// A frame handed to the transport by [`Transport::send_raw`](crate::Transport::send_raw):
/// await [`acknowledged`](Self::acknowledged) to learn when the peer's QUIC stack holds every
/// byte of it.
#[derive(Debug)]
pub struct RawSend {
    peer: u32,
    done: oneshot::Receiver<Result<(), RawSendError>>,
}

/// Why the peer did not acknowledge a frame of [`Transport::send_raw`](crate::Transport::send_raw).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RawSendError {
    /// The connection ended (or the transport shut down) before every byte was acknowledged;
    /// the peer may or may not have read the frame.
    #[error("node {peer}: the connection ended before the frame was acknowledged: {reason}")]
    Lost {
        /// The peer.
        peer: u32,
        /// How the connection ended.
        reason: String,
    },
    /// The peer stopped reading the stream (QUIC `STOP_SENDING`) with this code.
    #[error("node {peer} stopped the frame's stream with code {code}")]
    Stopped {
        /// The peer.
        peer: u32,
        /// The code it gave.
        code: u64,
    },
}

impl RawSend {
    /// The peer the frame went to.
    pub fn peer(&self) -> u32 {
        self.peer
    }

    /// Resolves once the peer acknowledged every byte and the end of the stream: the frame is
    /// in its QUIC stack, so its reader gets the whole frame even if the connection closes
    /// right after (not necessarily that the peer has processed it).
    pub async fn acknowledged(self) -> Result<(), RawSendError> {
        let peer = self.peer;
        self.done.await.unwrap_or_else(|_| Err(RawSendError::Lost { peer, reason: "the transport stopped".into() }))
    }
}

/// Writes `bytes` on a new stream of `link` in the background, holding `permit` (one of the
/// link's sends in flight) until the peer acknowledged them.
pub(crate) fn spawn(
    runtime: &tokio::runtime::Handle,
    link: Arc<Link>,
    permit: OwnedSemaphorePermit,
    bytes: Bytes,
) -> RawSend {
    let (tx, done) = oneshot::channel();
    let peer = link.peer;
    runtime.spawn(async move {
        let _permit = permit;
        let result = write_and_wait(&link.conn, bytes).await.map_err(|e| match e {
            Outcome::Lost(reason) => RawSendError::Lost { peer, reason },
            Outcome::Stopped(code) => RawSendError::Stopped { peer, code },
        });
        if let Err(e) = &result {
            tracing::debug!(peer, error = %e, "raw frame not acknowledged");
        }
        let _ = tx.send(result);
    });
    RawSend { peer, done }
}

enum Outcome {
    Lost(String),
    Stopped(u64),
}

async fn write_and_wait(conn: &Connection, bytes: Bytes) -> Result<(), Outcome> {
    let mut stream = conn.open_uni().await.map_err(|e| Outcome::Lost(e.to_string()))?;
    stream.write_chunk(bytes).await.map_err(|e| Outcome::Lost(e.to_string()))?;
    // Fails only if the stream was already finished or reset, which nothing here does.
    let _ = stream.finish();
    match stream.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(Outcome::Stopped(code.into_inner())),
        Err(StoppedError::ConnectionLost(e)) => Err(Outcome::Lost(e.to_string())),
        Err(e) => Err(Outcome::Lost(e.to_string())),
    }
}
