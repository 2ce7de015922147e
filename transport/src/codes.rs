//! QUIC application close codes of the transport layer (`0x200..0x300`).
//!
//! A connection closed for bad input carries a code telling the peer (and the logs) why.
//! Codes of the frame codec live in `0x100..0x200` (see
//! [`DecodeError::reason_code`](crate::DecodeError::reason_code)); the codes here cover what
//! the transport itself refuses. The caller of [`Transport`](crate::Transport) may use any
//! other code with [`Transport::reject`](crate::Transport::reject) and
//! [`Transport::disconnect`](crate::Transport::disconnect); `0x300` and above are left to it.
//!
//! | code | constant | meaning |
//! |---|---|---|
//! | `0x200` | [`SHUTDOWN`] | the node is shutting down |
//! | `0x201` | [`HANDSHAKE_FAILED`] | TLS refused the peer (no or bad certificate, wrong ALPN); counted and reported, never sent (TLS sends its own alert) |
//! | `0x202` | [`NO_NODE_ID`] | the certificate names no single `node-<i>` |
//! | `0x203` | [`ID_MISMATCH`] | the hello claims another id than the certificate, or the peer is not the node the dialler expected |
//! | `0x204` | [`DUPLICATE`] | a second connection between the same two nodes; the one dialled by the lower id is kept |
//! | `0x205` | [`SUPERSEDED`] | replaced by a connection from another incarnation (a restart) of the same node, after the old connection fell silent |
//! | `0x206` | [`HELLO_FAILED`] | no valid hello within the hello timeout, or its stream broke |
//! | `0x207` | [`STREAM_FRAMING`] | a unidirectional stream carried bytes after its one frame |
//! | `0x208` | [`SELF_CONNECT`] | the peer presents this node's own id |
//! | `0x209` | [`OVERLOADED`] | too many handshakes in progress; try again later |
//! | `0x20a` | [`DUPLICATE_IDENTITY`] | another process with the same node id is already a live member here; the dialler is a second process and must stop |
//! | `0x20b` | [`NOT_A_CLIENT`] | a connection on the client API presents no client certificate (`client-<name>`) |
//! | `0x20c` | [`REVOKED`] | the peer's certificate is on the node's revocation list |
//! | `0x20d` | [`CERT_EXPIRED`] | the peer's certificate expired while its connection was open |
//! | `0x20e` | [`NOT_A_MEMBER`] | the peer's certificate names a node outside the configured cluster |

/// The node is shutting down (the code of [`Transport::shutdown`](crate::Transport::shutdown)).
pub const SHUTDOWN: u32 = 0x200;
/// TLS refused the peer: no client certificate, one not signed by the cluster CA, an expired
/// one, or another ALPN. Only counted and reported in
/// [`TransportEvent::Rejected`](crate::TransportEvent::Rejected); TLS closes with its own alert.
pub const HANDSHAKE_FAILED: u32 = 0x201;
/// The peer's certificate names no single `node-<i>`, so it identifies no node.
pub const NO_NODE_ID: u32 = 0x202;
/// The node id in the hello differs from the certificate's, or the dialled node is not the
/// one the caller expected.
pub const ID_MISMATCH: u32 = 0x203;
/// Both nodes dialled each other (or one dialled twice): this connection is the extra one.
pub const DUPLICATE: u32 = 0x204;
/// The same node connected again with another incarnation (it restarted) while this older
/// connection had fallen silent; this older connection is closed.
pub const SUPERSEDED: u32 = 0x205;
/// The hello did not arrive within the hello timeout, or its stream failed.
pub const HELLO_FAILED: u32 = 0x206;
/// A unidirectional stream held more bytes than its one frame.
pub const STREAM_FRAMING: u32 = 0x207;
/// The peer presents this node's own id.
pub const SELF_CONNECT: u32 = 0x208;
/// Too many handshakes were in progress; the connection attempt was refused.
pub const OVERLOADED: u32 = 0x209;
/// A second process presents a node id whose current connection here is alive and
/// answering: the newcomer is refused rather than allowed to replace the member. The
/// refused process learns it as
/// [`TransportEvent::DuplicateIdentity`](crate::TransportEvent::DuplicateIdentity) and
/// should stop; retrying cannot help while the other process runs.
pub const DUPLICATE_IDENTITY: u32 = 0x20a;

/// A connection on the client API ([`CLIENT_ALPN`](crate::tls::CLIENT_ALPN)) presents a
/// certificate that is not a client's (a node's, or one naming no `client-<name>`).
pub const NOT_A_CLIENT: u32 = 0x20b;

/// The peer's certificate is revoked (see [`Revocations`](crate::Revocations)): refused at the
/// handshake, or its live connection closed when the list changed.
pub const REVOKED: u32 = 0x20c;
/// The peer's certificate passed its `notAfter` while the connection was open.
pub const CERT_EXPIRED: u32 = 0x20d;
/// The peer's certificate names a node id outside the configured cluster
/// ([`TransportConfig::members`](crate::TransportConfig::members)): signed by the cluster's CA,
/// but not one of its members.
pub const NOT_A_MEMBER: u32 = 0x20e;

/// Short name of a transport or codec close code, for log lines and event reasons.
///
/// ```
/// use phalanx_transport::codes;
///
/// assert_eq!(codes::name(codes::DUPLICATE), "duplicate");
/// assert_eq!(codes::name(0x101), "oversize");
/// assert_eq!(codes::name(0x4242), "application");
/// ```
pub fn name(code: u32) -> &'static str {
    use crate::DecodeError as D;
    match code {
        SHUTDOWN => "shutdown",
        HANDSHAKE_FAILED => "handshake failed",
        NO_NODE_ID => "no node id",
        ID_MISMATCH => "id mismatch",
        DUPLICATE => "duplicate",
        SUPERSEDED => "superseded",
        HELLO_FAILED => "hello failed",
        STREAM_FRAMING => "stream framing",
        SELF_CONNECT => "self connect",
        OVERLOADED => "overloaded",
        DUPLICATE_IDENTITY => "duplicate identity",
        NOT_A_CLIENT => "not a client",
        REVOKED => "revoked",
        CERT_EXPIRED => "certificate expired",
        NOT_A_MEMBER => "not a member",
        D::CODE_OVERSIZE => "oversize",
        D::CODE_UNSUPPORTED_VERSION => "unsupported version",
        D::CODE_HEADER_TOO_LARGE => "header too large",
        D::CODE_TRUNCATED => "truncated",
        D::CODE_BAD_TENSOR_LENGTH => "bad tensor length",
        D::CODE_HEADER => "bad header",
        _ => "application",
    }
}
