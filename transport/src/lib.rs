//! Wire layer of Phalanx: how nodes' messages and tensors travel between them.
//!
//! Phalanx nodes talk over QUIC, one connection per pair of nodes, negotiated with the ALPN
//! [`ALPN`]. Control messages (hello, heartbeats, placement, acknowledgements) travel on
//! bidirectional streams; every tensor (a gradient, a parameter slice) gets its own
//! unidirectional stream, so a 100 MiB gradient never queues in front of a heartbeat.
//! Whatever the stream, its bytes are a sequence of *frames*.
//!
//! The entry point of this crate is, for now, the frame codec: [`encode`] turns a serde header
//! and an `f32` tensor into a frame, and [`FrameDecoder`] turns bytes, pushed in whatever chunks
//! the stream delivers them, back into [`Frame`]s. The codec is sans-IO: it never touches a
//! socket, a task or a clock, so every rule about the wire is tested with plain byte slices
//! and fuzzed without a network. The QUIC endpoints, mutual TLS and peer connections will live
//! in this crate too and will only move bytes between streams and the codec.
//!
//! # A frame's bytes
//!
//! ```text
//!  offset 0        4          6               10              10 + h            4 + len
//!         ┌────────┬──────────┬───────────────┬───────────────┬─────────────────┐
//!         │  len   │ version  │ header length │ header        │ tensor          │
//!         │ u32 LE │  u16 LE  │  h: u32 LE    │ bincode 2,    │ n × f32 LE,     │
//!         │        │    = 1   │               │ h bytes       │ raw bytes       │
//!         └────────┴──────────┴───────────────┴───────────────┴─────────────────┘
//!                  └───────────────── len bytes (≤ max_frame_bytes) ────────────┘
//! ```
//!
//! The tensor's length is whatever remains after the header, and must be a multiple of 4.
//! Every length is checked against [`Limits`] before anything is allocated for it; a frame that
//! breaks a rule yields a [`DecodeError`] whose [`DecodeError::reason_code`] is the QUIC
//! application close code for the connection, which is closed rather than resynchronised.
//!
//! # Example
//!
//! ```
//! use phalanx_transport::{encode, FrameDecoder, Limits};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! enum Msg {
//!     Gradient { step: u64, partition: u32 },
//!     Heartbeat,
//! }
//!
//! let limits = Limits::default();
//! let wire = encode(&Msg::Gradient { step: 7, partition: 2 }, &[0.5, -1.0], &limits)?;
//!
//! let mut decoder = FrameDecoder::new(limits);
//! decoder.push(&wire[..3]); // bytes may arrive in any chunks
//! assert!(decoder.next_frame::<Msg>()?.is_none());
//! decoder.push(&wire[3..]);
//! let frame = decoder.next_frame::<Msg>()?.expect("the whole frame was pushed");
//! assert_eq!(frame.header, Msg::Gradient { step: 7, partition: 2 });
//! assert_eq!(frame.tensor, [0.5, -1.0]);
//! assert_eq!(decoder.buffered(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod codec;

pub use codec::{
    decode, encode, encode_into, DecodeError, EncodeError, Frame, FrameDecoder, Limits, ALPN, PROTOCOL_VERSION,
};
