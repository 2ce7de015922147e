//! Counters of a transport, updated lock-free on the data path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::lock;

/// A snapshot of a transport's counters, from [`Transport::stats`](crate::Transport::stats).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportStats {
    /// Frames received and checked (delivered or dropped).
    pub frames_in: u64,
    /// Bytes of those frames, bodies without the length prefix.
    pub bytes_in: u64,
    /// Frames handed to QUIC by [`Transport::send`](crate::Transport::send).
    pub frames_out: u64,
    /// Bytes of those frames, length prefix included.
    pub bytes_out: u64,
    /// Frames received on a connection that was no longer the peer's current one, or after
    /// the event receiver was dropped, and so not delivered.
    pub frames_dropped: u64,
    /// Sends accepted by [`Transport::send`](crate::Transport::send) whose write then failed
    /// (the connection closed meanwhile).
    pub send_failures: u64,
    /// Frames from members that broke a codec rule (each closed its connection, see
    /// [`TransportEvent::BadFrame`](crate::TransportEvent::BadFrame)).
    pub bad_frames: u64,
    /// Connections refused or closed for bad input, by close code (see [`codes`](crate::codes)
    /// and [`DecodeError::reason_code`](crate::DecodeError::reason_code)).
    pub rejected: BTreeMap<u32, u64>,
    /// Connections a peer closed because it refuses this node itself, by close code: today
    /// only [`codes::DUPLICATE_IDENTITY`](crate::codes::DUPLICATE_IDENTITY) (this process is a
    /// second one with a member's id).
    pub refused_by_peers: BTreeMap<u32, u64>,
    /// QUIC connections open now, whether or not their hello is done.
    pub open_connections: usize,
    /// Peers with a live connection now.
    pub peers: usize,
    /// Packets QUIC declared lost on the peers' live connections (since each opened): on
    /// loopback, a sign of full socket buffers or of sends the kernel refused.
    pub lost_packets: u64,
    /// UDP datagrams sent on the peers' live connections (since each opened).
    pub udp_datagrams_out: u64,
    /// The largest path MTU (UDP payload bytes) MTU discovery reached on a live connection;
    /// 0 without one.
    pub max_path_mtu: u16,
}

/// What the peers' live QUIC connections report (see [`TransportStats::lost_packets`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct QuicCounters {
    pub(crate) lost_packets: u64,
    pub(crate) udp_datagrams_out: u64,
    pub(crate) max_path_mtu: u16,
}

impl QuicCounters {
    pub(crate) fn add(&mut self, stats: &quinn::ConnectionStats) {
        self.lost_packets += stats.path.lost_packets;
        self.udp_datagrams_out += stats.udp_tx.datagrams;
        self.max_path_mtu = self.max_path_mtu.max(stats.path.current_mtu);
    }
}

impl TransportStats {
    /// Connections rejected with `code`.
    pub fn rejected_with(&self, code: u32) -> u64 {
        self.rejected.get(&code).copied().unwrap_or(0)
    }

    /// Connections rejected, all codes.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// The live counters behind [`TransportStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    frames_dropped: AtomicU64,
    send_failures: AtomicU64,
    bad_frames: AtomicU64,
    rejected: Mutex<BTreeMap<u32, u64>>,
    refused_by_peers: Mutex<BTreeMap<u32, u64>>,
}

impl Counters {
    pub(crate) fn received(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self) {
        self.frames_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn send_failed(&self) {
        self.send_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bad_frame(&self) {
        self.bad_frames.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, code: u32) {
        *lock(&self.rejected).entry(code).or_insert(0) += 1;
    }

    pub(crate) fn refused_by_peer(&self, code: u32) {
        *lock(&self.refused_by_peers).entry(code).or_insert(0) += 1;
    }

    pub(crate) fn snapshot(&self, open_connections: usize, peers: usize, quic: QuicCounters) -> TransportStats {
        TransportStats {
            frames_in: self.frames_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            frames_out: self.frames_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            frames_dropped: self.frames_dropped.load(Ordering::Relaxed),
            send_failures: self.send_failures.load(Ordering::Relaxed),
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
            rejected: lock(&self.rejected).clone(),
            refused_by_peers: lock(&self.refused_by_peers).clone(),
            open_connections,
            peers,
            lost_packets: quic.lost_packets,
            udp_datagrams_out: quic.udp_datagrams_out,
            max_path_mtu: quic.max_path_mtu,
        }
    }
}
