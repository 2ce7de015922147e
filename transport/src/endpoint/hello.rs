//! The application hello: the first exchange on every connection, on its first bidirectional
//! stream, before the peer counts as a member.
//!
//! TLS 1.3 lets a client's `connect()` succeed before the server has checked the client's
//! certificate, so the TLS handshake alone does not prove anything to the dialler. The hello
//! does: the dialler sends its [`Hello`] and waits for the acceptor's, which the acceptor only
//! sends after the whole handshake (client certificate included) and the dialler's hello
//! were accepted.

use quinn::{Connection, ConnectionError, WriteError};
use serde::{Deserialize, Serialize};

use super::stream::{read_frame, FrameReadError};
use crate::{codes, decode, encode, DecodeError, EncodeError, Limits, PROTOCOL_VERSION};

/// Limits of the hello stream: a hello is a few bytes, so anything bigger is refused early.
pub const HELLO_LIMITS: Limits = Limits { max_frame_bytes: 256, max_header_bytes: 64 };

/// What each side of a new connection says first, as the header of a frame (no tensor) on
/// the connection's first bidirectional stream; the dialler sends first.
///
/// On the wire it is an ordinary frame, so the frame envelope carries the protocol version
/// too; both must be [`PROTOCOL_VERSION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version.
    pub protocol_version: u16,
    /// The sender's node id; must equal the id its certificate names.
    pub node_id: u32,
    /// A random number drawn when the sender's transport was bound: a new value from the same
    /// node id means the node restarted.
    pub incarnation: u64,
}

impl Hello {
    /// The hello frame, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode(self, &[], &HELLO_LIMITS)
    }
}

/// Why the hello exchange failed.
#[derive(Debug)]
pub(crate) enum HelloError {
    /// The peer's hello stream broke a framing rule, or the connection ended during it.
    Read(FrameReadError),
    /// The hello frame's header is not a [`Hello`].
    Invalid(DecodeError),
    /// The hello carries a tensor; a hello never does.
    UnexpectedTensor,
    /// The peer speaks another protocol version.
    Version(u16),
    /// The hello claims an id other than the certificate's.
    IdMismatch { claimed: u32, certified: u32 },
    /// No hello within the hello timeout.
    TimedOut,
    /// The connection ended (or was closed by the peer) while opening or writing the stream.
    Lost(ConnectionError),
    /// Our hello could not be written for another reason.
    Write(WriteError),
    /// Our own hello could not be encoded (a bug, reported rather than panicking).
    Encode(EncodeError),
}

impl HelloError {
    /// Close code and reason when the failure is the peer's fault; `None` when the connection
    /// merely went away (for example the peer closed it as a duplicate).
    pub(crate) fn violation(&self) -> Option<(u32, String)> {
        match self {
            Self::Read(err) => err.violation().map(|(code, reason)| (code, format!("bad hello: {reason}"))),
            Self::Invalid(err) => Some((err.reason_code(), format!("bad hello: {err}"))),
            Self::UnexpectedTensor => Some((codes::HELLO_FAILED, "bad hello: it carries a tensor".to_owned())),
            Self::Version(found) => Some((
                DecodeError::CODE_UNSUPPORTED_VERSION,
                format!("hello speaks protocol version {found}, this node speaks {PROTOCOL_VERSION}"),
            )),
            Self::IdMismatch { claimed, certified } => Some((
                codes::ID_MISMATCH,
                format!("hello claims node id {claimed} but the certificate names node {certified}"),
            )),
            Self::TimedOut => Some((codes::HELLO_FAILED, "no hello within the hello timeout".to_owned())),
            Self::Lost(_) | Self::Write(_) | Self::Encode(_) => None,
        }
    }
}

impl std::fmt::Display for HelloError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.violation(), self) {
            (Some((_, reason)), _) => f.write_str(&reason),
            (None, Self::Read(err)) => write!(f, "hello stream failed: {err}"),
            (None, Self::Lost(err)) => write!(f, "connection lost: {err}"),
            (None, Self::Write(err)) => write!(f, "cannot write the hello: {err}"),
            (None, Self::Encode(err)) => write!(f, "cannot encode the hello: {err}"),
            (None, other) => write!(f, "hello failed: {other:?}"),
        }
    }
}

impl From<WriteError> for HelloError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::ConnectionLost(err) => Self::Lost(err),
            other => Self::Write(other),
        }
    }
}

/// The dialler's side: open the stream, send our hello, read and check the acceptor's.
pub(crate) async fn dial(conn: &Connection, ours: &Hello, certified: u32) -> Result<Hello, HelloError> {
    let bytes = ours.encode().map_err(HelloError::Encode)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(HelloError::Lost)?;
    send.write_all(&bytes).await?;
    // Only fails if the stream was already finished or reset, which nothing here does.
    let _ = send.finish();
    let frame = read_frame(&mut recv, &HELLO_LIMITS, None).await.map_err(HelloError::Read)?;
    check(&frame.into_body(), certified)
}

/// The acceptor's side: take the dialler's stream, read and check its hello, answer with ours.
pub(crate) async fn accept(conn: &Connection, ours: &Hello, certified: u32) -> Result<Hello, HelloError> {
    let bytes = ours.encode().map_err(HelloError::Encode)?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(HelloError::Lost)?;
    let frame = read_frame(&mut recv, &HELLO_LIMITS, None).await.map_err(HelloError::Read)?;
    let theirs = check(&frame.into_body(), certified)?;
    send.write_all(&bytes).await?;
    let _ = send.finish();
    Ok(theirs)
}

/// Checks a hello frame body against the id the peer's certificate names.
pub(crate) fn check(body: &[u8], certified: u32) -> Result<Hello, HelloError> {
    let frame = decode::<Hello>(body, &HELLO_LIMITS).map_err(HelloError::Invalid)?;
    let hello = frame.header;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(HelloError::Version(hello.protocol_version));
    }
    if !frame.tensor.is_empty() {
        return Err(HelloError::UnexpectedTensor);
    }
    if hello.node_id != certified {
        return Err(HelloError::IdMismatch { claimed: hello.node_id, certified });
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PREFIX_BYTES;

    fn body(hello: &Hello) -> Vec<u8> {
        hello.encode().expect("encodable")[PREFIX_BYTES..].to_vec()
    }

    #[test]
    fn a_matching_hello_passes() {
        let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: 3, incarnation: u64::MAX };
        assert_eq!(check(&body(&hello), 3).expect("valid"), hello);
    }

    #[test]
    fn a_hello_claiming_another_id_is_refused() {
        let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: 5, incarnation: 1 };
        let err = check(&body(&hello), 3).unwrap_err();
        assert_eq!(err.violation().map(|(code, _)| code), Some(codes::ID_MISMATCH));
    }

    #[test]
    fn a_hello_of_another_version_is_refused_either_way() {
        let hello = Hello { protocol_version: PROTOCOL_VERSION + 1, node_id: 3, incarnation: 1 };
        let err = check(&body(&hello), 3).unwrap_err();
        assert_eq!(err.violation().map(|(code, _)| code), Some(DecodeError::CODE_UNSUPPORTED_VERSION));

        let good = Hello { protocol_version: PROTOCOL_VERSION, node_id: 3, incarnation: 1 };
        let mut envelope_v1 = body(&good);
        envelope_v1[0] = 1;
        let err = check(&envelope_v1, 3).unwrap_err();
        assert_eq!(err.violation().map(|(code, _)| code), Some(DecodeError::CODE_UNSUPPORTED_VERSION));
    }

    #[test]
    fn garbage_is_refused_with_the_codec_code() {
        // This version, a 3-byte header, and garbage where the header should be.
        let mut garbage = PROTOCOL_VERSION.to_le_bytes().to_vec();
        garbage.extend_from_slice(b"\x03\x00\x00\x00\xff\xff\xff");
        let err = check(&garbage, 3).unwrap_err();
        assert_eq!(err.violation().map(|(code, _)| code), Some(DecodeError::CODE_HEADER));
    }
}
