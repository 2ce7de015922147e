//! A received frame, holding its share of the receive budget until the receiver is done
//! with it.
//!
//! Each peer's frames are bounded in bytes from the moment their reading starts
//! ([`TransportConfig::recv_budget_bytes_per_peer`](crate::TransportConfig::recv_budget_bytes_per_peer)):
//! a peer whose frames pile up unread — queued for the node loop, waiting to be decoded — stops
//! being read, and QUIC's flow control then slows it down, instead of the receiver's memory
//! growing. A [`RecvFrame`] carries that share: it goes back when the frame is dropped, or when
//! [`into_vec`](RecvFrame::into_vec) hands the bytes on (the receiver has taken them over:
//! decoded, or copied elsewhere). [`into_parts`](RecvFrame::into_parts) keeps the share apart,
//! for a receiver that decodes elsewhere and gives it back after.

use std::fmt;
use std::ops::Deref;

/// A share of a receive budget, given back when dropped.
pub struct ReceiveBudget(Option<Box<dyn Send + Sync>>);

impl ReceiveBudget {
    /// A share of nothing (a frame built outside a transport).
    pub fn none() -> Self {
        Self(None)
    }

    pub(crate) fn of(guard: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(guard)))
    }

    /// Whether it holds a share of a budget.
    pub fn is_held(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for ReceiveBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_held() { "ReceiveBudget(held)" } else { "ReceiveBudget(none)" })
    }
}

/// The body of a received frame (its length prefix removed) and its receive-budget share.
/// Reads as a byte slice.
pub struct RecvFrame {
    bytes: Vec<u8>,
    budget: ReceiveBudget,
}

impl RecvFrame {
    /// A frame of `bytes` that holds no budget (tests, frames a node hands itself).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, budget: ReceiveBudget::none() }
    }

    pub(crate) fn with_budget(bytes: Vec<u8>, budget: ReceiveBudget) -> Self {
        Self { bytes, budget }
    }

    /// The bytes; the budget share goes back now.
    pub fn into_vec(self) -> Vec<u8> {
        self.bytes
    }

    /// The bytes and the budget share apart (drop the share once done with the bytes).
    pub fn into_parts(self) -> (Vec<u8>, ReceiveBudget) {
        (self.bytes, self.budget)
    }

    /// Whether it still holds a share of a receive budget.
    pub fn holds_budget(&self) -> bool {
        self.budget.is_held()
    }
}

impl Deref for RecvFrame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl AsRef<[u8]> for RecvFrame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl PartialEq<[u8]> for RecvFrame {
    fn eq(&self, other: &[u8]) -> bool {
        self.bytes == other
    }
}

impl PartialEq<Vec<u8>> for RecvFrame {
    fn eq(&self, other: &Vec<u8>) -> bool {
        &self.bytes == other
    }
}

impl PartialEq<RecvFrame> for Vec<u8> {
    fn eq(&self, other: &RecvFrame) -> bool {
        self == &other.bytes
    }
}

impl fmt::Debug for RecvFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvFrame").field("bytes", &self.bytes.len()).field("budget", &self.budget).finish()
    }
}
