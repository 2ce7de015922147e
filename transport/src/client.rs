//! The client side of the client API: a connection to one node with a client certificate
//! ([`ClientIdentity`]) on [`CLIENT_ALPN`](crate::tls::CLIENT_ALPN), and requests that each
//! open a bidirectional stream, send one frame and read any number of answer frames.
//!
//! A client is never a member: nodes refuse a client certificate on the member ALPN, and a
//! node certificate on the client ALPN ([`codes::NOT_A_CLIENT`]).

use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, RecvStream};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::certs::{node_id_of, ClientIdentity};
use crate::codec::PREFIX_BYTES;
use crate::endpoint::{CLIENT_REQUEST_LIMITS, CLIENT_RESPONSE_LIMITS};
use crate::tls::{self, TlsError};
use crate::{codes, decode, encode, DecodeError, EncodeError};

/// How often an idle client connection pings the node: a long wait stays open, and a dead
/// node is noticed within [`CLIENT_IDLE_TIMEOUT`] (a node that is alive acknowledges every
/// ping, however busy its training is, since QUIC acknowledges on its own task).
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// A node that acknowledged nothing for this long is gone (killed, cut off); a client that
/// follows a job then asks the other nodes.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a client could not reach a node or get an answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client's identity cannot be used for TLS.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No local UDP socket.
    #[error("cannot bind a UDP socket: {0}")]
    Bind(std::io::Error),
    /// The connection could not be made (unreachable, TLS refused the node's certificate).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The node's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The node closed the connection with a reason (a refused certificate, a bad request).
    #[error("node at {addr} refused the client: {reason}")]
    Refused {
        /// The node's address.
        addr: SocketAddr,
        /// The close code, or `None` if TLS refused.
        code: Option<u32>,
        /// Why.
        reason: String,
    },
    /// The connection ended while waiting for an answer.
    #[error("lost the connection to {addr}: {reason}")]
    Lost {
        /// The node's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The request does not fit the request limits.
    #[error("cannot encode the request: {0}")]
    Encode(#[from] EncodeError),
    /// An answer broke the framing rules or is not of the expected type.
    #[error("bad answer from {addr}: {source}")]
    Answer {
        /// The node's address.
        addr: SocketAddr,
        /// The codec's reason.
        source: DecodeError,
    },
}

/// A connection to one node for client requests.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: Connection,
    node: u32,
    addr: SocketAddr,
}

impl Client {
    /// Connects to the node at `addr` within `timeout`, verifying it against the cluster CA.
    pub async fn connect(identity: &ClientIdentity, addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        tls::install_default_provider();
        let mut config = tls::quic_client_config_for_client(identity)?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(CLIENT_KEEP_ALIVE));
        // 3 s always fits QUIC's idle-timeout encoding.
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(CLIENT_IDLE_TIMEOUT).ok());
        config.transport_config(Arc::new(transport));
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut endpoint = quinn::Endpoint::client(local).map_err(ClientError::Bind)?;
        endpoint.set_default_client_config(config);
        let connect = |reason: String| ClientError::Connect { addr, reason };
        let connecting = endpoint.connect(addr, tls::ANY_NODE_SERVER_NAME).map_err(|e| connect(e.to_string()))?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(connect(e.to_string())),
            Err(_) => return Err(connect(format!("no answer within {} ms", timeout.as_millis()))),
        };
        let node = conn
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().and_then(|cert| node_id_of(cert)))
            .ok_or_else(|| connect("the node's certificate names no node".into()))?;
        Ok(Self { endpoint, conn, node, addr })
    }

    /// The node this client is connected to (from its certificate).
    pub fn node(&self) -> u32 {
        self.node
    }

    /// The node's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `request` on a new stream; the answers arrive through [`Answers::next`].
    pub async fn request<Q: Serialize + ?Sized, A: DeserializeOwned>(
        &self,
        request: &Q,
    ) -> Result<Answers<A>, ClientError> {
        let frame = encode(request, &[], &CLIENT_REQUEST_LIMITS)?;
        self.request_raw(frame).await
    }

    /// Sends an already encoded request frame (length prefix included) on a new stream.
    pub async fn request_raw<A: DeserializeOwned>(&self, frame: Vec<u8>) -> Result<Answers<A>, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
        send.write_all(&frame).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => self.lost(e),
            other => ClientError::Lost { addr: self.addr, reason: other.to_string() },
        })?;
        let _ = send.finish();
        Ok(Answers { recv, conn: self.conn.clone(), addr: self.addr, _answer: PhantomData })
    }

    fn lost(&self, err: ConnectionError) -> ClientError {
        lost(self.addr, &err)
    }

    /// Closes the connection politely and waits (briefly) for the close to leave.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"client done");
        let _ = tokio::time::timeout(Duration::from_millis(250), self.endpoint.wait_idle()).await;
    }
}

/// The answers to one request, in order, until the node ends the stream.
#[derive(Debug)]
pub struct Answers<A> {
    recv: RecvStream,
    conn: Connection,
    addr: SocketAddr,
    _answer: PhantomData<fn() -> A>,
}

impl<A: DeserializeOwned> Answers<A> {
    /// The next answer, `None` once the node ended the stream.
    pub async fn next(&mut self) -> Result<Option<A>, ClientError> {
        let addr = self.addr;
        let bad = |source| ClientError::Answer { addr, source };
        let mut prefix = [0u8; PREFIX_BYTES];
        match self.recv.read_exact(&mut prefix).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(bad(DecodeError::Truncated { needed: PREFIX_BYTES as u64, available: n as u64 }))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(self.read_failed(e)),
        }
        let len = u32::from_le_bytes(prefix);
        if len > CLIENT_RESPONSE_LIMITS.max_frame_bytes {
            return Err(bad(DecodeError::Oversize {
                len: u64::from(len),
                max: CLIENT_RESPONSE_LIMITS.max_frame_bytes,
            }));
        }
        // Within the 4 MiB response limit.
        let mut body = vec![0u8; len as usize];
        match self.recv.read_exact(&mut body).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(bad(DecodeError::Truncated { needed: u64::from(len), available: n as u64 }))
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(self.read_failed(e)),
        }
        let frame = decode::<A>(&body, &CLIENT_RESPONSE_LIMITS).map_err(bad)?;
        Ok(Some(frame.header))
    }

    fn read_failed(&self, err: quinn::ReadError) -> ClientError {
        match err {
            quinn::ReadError::ConnectionLost(e) => lost(self.addr, &e),
            quinn::ReadError::Reset(code) => ClientError::Refused {
                addr: self.addr,
                code: u32::try_from(code.into_inner()).ok(),
                reason: format!(
                    "request dropped (stream reset with code {code}: {})",
                    u32::try_from(code.into_inner()).map_or("application", codes::name)
                ),
            },
            other => match self.conn.close_reason() {
                Some(e) => lost(self.addr, &e),
                None => ClientError::Lost { addr: self.addr, reason: other.to_string() },
            },
        }
    }
}

/// A refusal when the node closed the connection on purpose, else a lost connection.
fn lost(addr: SocketAddr, err: &ConnectionError) -> ClientError {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            let code = u32::try_from(close.error_code.into_inner()).ok();
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            ClientError::Refused { addr, code, reason }
        }
        ConnectionError::ConnectionClosed(close) => {
            ClientError::Refused { addr, code: None, reason: format!("TLS refused the client: {close}") }
        }
        ConnectionError::TransportError(e) => {
            ClientError::Refused { addr, code: None, reason: format!("TLS refused the client: {e}") }
        }
        other => ClientError::Lost { addr, reason: other.to_string() },
    }
}
