//! The server side of client connections: a connection that negotiated
//! [`CLIENT_ALPN`](crate::tls::CLIENT_ALPN) with a client certificate (`client-<name>`)
//! never joins the peer table. Each bidirectional stream it opens carries one request frame;
//! the caller answers on the stream with any number of frames through a [`ClientReply`].
//!
//! Bounded everywhere: at most [`MAX_CLIENT_CONNECTIONS`] client connections per node, at
//! most [`MAX_CLIENT_STREAMS`] requests in flight per connection, a request frame of at most
//! [`CLIENT_REQUEST_LIMITS`], read within the hello timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::inner::Inner;
use super::link::close_connection;
use super::stream::read_frame;
use super::TransportEvent;
use crate::{codes, encode, EncodeError, Limits};

/// Most client connections a node serves at once; more are refused with
/// [`codes::OVERLOADED`].
pub const MAX_CLIENT_CONNECTIONS: usize = 64;

/// Most requests in flight on one client connection (its bidirectional stream limit).
pub const MAX_CLIENT_STREAMS: u32 = 8;

/// Limits of a client's request frame: a job spec or a query, never a tensor of any size.
pub const CLIENT_REQUEST_LIMITS: Limits = Limits { max_frame_bytes: 1 << 20, max_header_bytes: 1 << 20 };

/// Limits of one response frame (a file travels in chunks of at most 1 MiB).
pub const CLIENT_RESPONSE_LIMITS: Limits = Limits { max_frame_bytes: 4 << 20, max_header_bytes: 4 << 20 };

/// The stream a client request arrived on, for its answers. Dropping it ends the answer
/// (the client sees the end of the stream).
pub struct ClientReply {
    send: SendStream,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for ClientReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientReply").finish_non_exhaustive()
    }
}

/// Why an answer could not be sent to a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The answer does not fit [`CLIENT_RESPONSE_LIMITS`] or cannot be serialised.
    #[error("cannot encode the answer: {0}")]
    Encode(#[from] EncodeError),
    /// The client went away or stopped reading.
    #[error("the client is gone: {0}")]
    Gone(#[from] quinn::WriteError),
}

impl ClientReply {
    /// Sends one answer frame (header only) and waits until QUIC took it.
    pub async fn send<H: Serialize + ?Sized>(&mut self, answer: &H) -> Result<(), ReplyError> {
        let frame = encode(answer, &[], &CLIENT_RESPONSE_LIMITS)?;
        self.send.write_all(&frame).await?;
        Ok(())
    }

    /// Ends the answer: the client reads the end of the stream after the last frame.
    pub fn finish(mut self) {
        // Fails only if the stream is already finished or reset.
        let _ = self.send.finish();
    }
}

impl Inner {
    /// A connection on the client ALPN: only a client certificate may use it. Starts its
    /// session and returns at once (the handshake slot is freed).
    pub(crate) async fn accept_client(self: &Arc<Self>, conn: Connection, addr: SocketAddr) {
        let certs = conn
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok());
        let first = certs.as_deref().and_then(|certs| certs.first());
        if let Some(reason) = first.and_then(|cert| self.revoked(cert)) {
            close_connection(&conn, codes::REVOKED, &reason);
            return self.report_rejected(addr, None, codes::REVOKED, reason).await;
        }
        let Some(client) = first.and_then(|cert| crate::certs::client_name_of(cert)) else {
            let reason = match first.and_then(|cert| crate::certs::node_id_of(cert)) {
                Some(id) => format!("node {id}'s certificate on the client API: only client certificates may use it"),
                None => "the certificate names no single client-<name>".to_owned(),
            };
            close_connection(&conn, codes::NOT_A_CLIENT, &reason);
            return self.report_rejected(addr, None, codes::NOT_A_CLIENT, reason).await;
        };
        let Ok(slot) = self.clients.clone().try_acquire_owned() else {
            let reason = format!("more than {MAX_CLIENT_CONNECTIONS} client connections");
            close_connection(&conn, codes::OVERLOADED, &reason);
            return self.report_rejected(addr, None, codes::OVERLOADED, reason).await;
        };
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(MAX_CLIENT_STREAMS));
        tracing::debug!(node = self.id, %addr, client, "client connected");
        let inner = self.clone();
        self.runtime.spawn(async move {
            inner.serve_client(conn, addr, client).await;
            drop(slot);
        });
    }

    /// Reads one request per stream until the connection ends.
    async fn serve_client(self: Arc<Self>, conn: Connection, addr: SocketAddr, client: String) {
        let requests = Arc::new(Semaphore::new(MAX_CLIENT_STREAMS as usize));
        let cert = super::link::peer_cert(&conn).unwrap_or_default();
        let expired = crate::revocation::expired(crate::revocation::not_after_of(&cert));
        tokio::pin!(expired);
        let mut revocations = self.revocations.subscribe();
        // The list may have changed since the handshake checked it.
        revocations.mark_changed();
        loop {
            // Ends when the client closes, or the endpoint closes every connection at shutdown.
            let (send, recv) = tokio::select! {
                accepted = conn.accept_bi() => match accepted {
                    Ok(streams) => streams,
                    Err(_) => break,
                },
                () = &mut expired => {
                    let reason = format!("client {client}'s certificate expired");
                    close_connection(&conn, codes::CERT_EXPIRED, &reason);
                    self.log_rejected(addr, None, codes::CERT_EXPIRED, &reason);
                    break;
                }
                Ok(()) = revocations.changed() => match self.revoked(&cert) {
                    Some(reason) => {
                        let reason = format!("client {client}: {reason}");
                        close_connection(&conn, codes::REVOKED, &reason);
                        self.log_rejected(addr, None, codes::REVOKED, &reason);
                        break;
                    }
                    None => continue,
                },
            };
            // QUIC's stream limit keeps the count at MAX_CLIENT_STREAMS; the semaphore is the
            // same bound for streams whose answer is still being written.
            let Ok(slot) = requests.clone().try_acquire_owned() else {
                let mut send = send;
                let _ = send.reset(VarInt::from_u32(codes::OVERLOADED));
                continue;
            };
            let (inner, conn, client) = (self.clone(), conn.clone(), client.clone());
            self.runtime.spawn(async move { inner.client_request(conn, addr, client, send, recv, slot).await });
        }
    }

    async fn client_request(
        &self,
        conn: Connection,
        addr: SocketAddr,
        client: String,
        send: SendStream,
        mut recv: RecvStream,
        slot: OwnedSemaphorePermit,
    ) {
        let read = tokio::time::timeout(self.hello_timeout, read_frame(&mut recv, &CLIENT_REQUEST_LIMITS, None)).await;
        let frame = match read {
            Ok(Ok(frame)) => frame,
            Ok(Err(err)) => {
                if let Some((code, reason)) = err.violation() {
                    let reason = format!("client {client}: bad request: {reason}");
                    close_connection(&conn, code, &reason);
                    self.report_rejected(addr, None, code, reason).await;
                }
                return;
            }
            Err(_) => {
                let reason = format!("client {client}: no request within the hello timeout");
                close_connection(&conn, codes::HELLO_FAILED, &reason);
                return self.report_rejected(addr, None, codes::HELLO_FAILED, reason).await;
            }
        };
        let request = TransportEvent::ClientRequest {
            client,
            addr,
            request: frame.into_body(),
            reply: ClientReply { send, _slot: slot },
        };
        let _ = self.events.send(request).await;
    }
}
