//! What a [`MemNetwork`](super::MemNetwork) did: counters per directed link and for the whole
//! network, and a bounded trace of every frame's fate and every connection change.

use std::fmt;
use std::time::Duration;

/// Counters of one directed link (frames from one node to another), or of all links summed
/// ([`NetStats::frames`]).
///
/// Every frame sent ends in exactly one of `delivered`, `lost`, `cut`, `dropped`,
/// `bad_frames` (or is still in flight); its duplicate copies too, so
/// `sent + duplicated = delivered + lost + cut + dropped + bad_frames + in flight`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Frames accepted by `send` (and injected), before any fault.
    pub sent: u64,
    /// Frames (copies included) handed to the receiver's event queue as a `Message`.
    pub delivered: u64,
    /// Frames lost by the link's loss probability.
    pub lost: u64,
    /// Frames lost because the link was cut when they were sent or due to arrive.
    pub cut: u64,
    /// Extra copies made by the link's duplication probability.
    pub duplicated: u64,
    /// Frames delivered after a frame sent later on the same link.
    pub reordered: u64,
    /// Frames held because their sender (on sending) or receiver (on arrival) was paused;
    /// they move on when it resumes.
    pub held_by_pause: u64,
    /// Frames that arrived after the receiving end of their connection was gone (closed,
    /// timed out, superseded, the node crashed), or whose receiver stopped receiving. (Frames
    /// already queued for a node that then crashed count as delivered.)
    pub dropped: u64,
    /// Frames that broke a codec rule on arrival (each closed its connection).
    pub bad_frames: u64,
    /// Sends refused with [`SendError::Busy`](crate::SendError::Busy).
    pub busy: u64,
}

impl LinkStats {
    pub(crate) fn add(&mut self, other: &LinkStats) {
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.cut += other.cut;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.held_by_pause += other.held_by_pause;
        self.dropped += other.dropped;
        self.bad_frames += other.bad_frames;
        self.busy += other.busy;
    }
}

impl fmt::Display for LinkStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} delivered {} lost {} cut {} duplicated {} reordered {} held-by-pause {} dropped {} bad {} busy {}",
            self.sent,
            self.delivered,
            self.lost,
            self.cut,
            self.duplicated,
            self.reordered,
            self.held_by_pause,
            self.dropped,
            self.bad_frames,
            self.busy
        )
    }
}

/// Counters of a whole [`MemNetwork`](super::MemNetwork), from
/// [`MemNetwork::stats`](super::MemNetwork::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetStats {
    /// Every link's frame counters, summed.
    pub frames: LinkStats,
    /// Connections established.
    pub connections: u64,
    /// Connection ends closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connection ends closed by a node (reject, disconnect, shutdown, bad frame, revocation).
    pub closes: u64,
    /// Nodes crashed.
    pub crashes: u64,
    /// Nodes restarted.
    pub restarts: u64,
    /// Pauses of nodes.
    pub pauses: u64,
    /// Events other than messages dropped because a node left more than
    /// [`MAX_QUEUED_LIFECYCLE_EVENTS`](super::MAX_QUEUED_LIFECYCLE_EVENTS) unreceived.
    pub events_dropped: u64,
    /// Trace entries discarded because the trace was full.
    pub trace_discarded: u64,
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; connections {} idle-timeouts {} closes {} crashes {} restarts {} pauses {}",
            self.frames, self.connections, self.idle_timeouts, self.closes, self.crashes, self.restarts, self.pauses
        )
    }
}

/// One entry of [`MemNetwork::trace`](super::MemNetwork::trace): when (virtual time since the
/// network was created) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// Time since [`MemNetwork::new`](super::MemNetwork::new).
    pub at: Duration,
    /// What happened.
    pub event: TraceEvent,
}

/// What a [`TraceEntry`] records. `seq` numbers the frames of one directed link from 0 in
/// the order they were sent; a duplicate copy has its original's number.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceEvent {
    /// A frame reached the receiver's event queue.
    Delivered {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
        /// Its size, length prefix included.
        bytes: usize,
    },
    /// A frame was lost (loss probability).
    Lost {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
    },
    /// A frame was lost to a cut link.
    Cut {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
    },
    /// A frame was copied (duplication probability).
    Duplicated {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
    },
    /// A frame was held by a pause.
    Held {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
    },
    /// A frame arrived after its connection's receiving end was gone.
    Dropped {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
    },
    /// A frame broke a codec rule and closed its connection with `code`.
    BadFrame {
        /// Sender.
        from: u32,
        /// Receiver.
        to: u32,
        /// The frame's number on the link.
        seq: u64,
        /// The close code.
        code: u32,
    },
    /// `node` reported `peer` up.
    PeerUp {
        /// The node reporting.
        node: u32,
        /// The peer.
        peer: u32,
    },
    /// `node` reported `peer` down.
    PeerDown {
        /// The node reporting.
        node: u32,
        /// The peer.
        peer: u32,
    },
    /// A node crashed.
    Crashed {
        /// The node.
        node: u32,
    },
    /// A node was started again.
    Restarted {
        /// The node.
        node: u32,
    },
    /// A node was paused.
    Paused {
        /// The node.
        node: u32,
    },
    /// A node resumed.
    Resumed {
        /// The node.
        node: u32,
    },
}
