//! A UDP fault relay between local nodes: partitions, loss, delay, jitter and duplication
//! for real processes talking real QUIC.
//!
//! `phalanx local` and the chaos harness run every node as its own process on loopback. The
//! machines they run on have no `tc netem` and no iptables (no root, no kernel modules), so
//! the network between those processes cannot be damaged from outside. Instead the harness
//! puts this relay between them: node `i` is told that node `j` lives at
//! [`FaultRelay::addr(i, j)`](FaultRelay::addr), a socket of the relay dedicated to the
//! ordered pair `(i, j)`, which forwards every datagram to node `j`'s real address after
//! applying the faults of the directed link. The nodes' QUIC stacks are untouched: they see
//! lost, late, reordered and duplicated packets exactly as on a bad network, and repair them
//! (or time out) the way they would in production.
//!
//! ```text
//!                               FaultRelay (inside the harness process)
//!      node i                  ┌──────────────────────────────────────────┐                 node j
//!  ┌─────────────┐  dials      │  relay of the ordered pair (i, j)        │             ┌─────────────┐
//!  │ quinn UDP   │────────────▶│ front ──── faults of link i→j ───▶ back  │────────────▶│ quinn UDP   │
//!  │ nodes[i]    │◀────────────│ front ◀─── faults of link j→i ──── back  │◀────────────│ nodes[j]    │
//!  └─────────────┘             │ = addr(i, j)                              │             └─────────────┘
//!                              │                                          │
//!                              │  relay of (j, i): node j dials its front, │
//!                              │  its back talks to nodes[i]               │
//!                              └──────────────────────────────────────────┘
//! ```
//!
//! Both nodes of a pair may dial (the transport keeps one connection per pair), so each
//! ordered pair has its own relay; packets travelling from `i` to `j` get the faults of link
//! `(i, j)` whichever relay carries them. Only datagrams from the expected node address are
//! forwarded (a node restarts on the same port, so nothing is learned); anything else is
//! counted in [`RelayStats::unknown_source`] and dropped.
//!
//! Per packet, in this order ([`LinkFaults::decide`], a pure function of the faults and an
//! RNG, so it is unit-tested without sockets): a cut link drops it; `loss` drops it with that
//! probability; `duplicate` makes a second copy with that probability; each copy waits
//! `delay_ms` plus a uniform `[0, jitter_ms]`. A delayed copy waits on its own timer, so later
//! packets overtake it: jitter reorders.
//!
//! Randomness is reproducible: every socket of the relay draws from its own ChaCha8 stream of
//! the seed given to [`FaultRelay::start`], so datagrams arriving on one socket in the same
//! order meet the same fate run after run.
//!
//! The relay runs on its own thread with its own tokio runtime, so synchronous harness code
//! and async tests use it alike; dropping the [`FaultRelay`] stops the runtime, closes every
//! socket and joins the thread.
//!
//! ```
//! use std::net::UdpSocket;
//! use std::time::Duration;
//! use phalanx::relay::{FaultRelay, LinkFaults};
//!
//! let node0 = UdpSocket::bind("127.0.0.1:0")?;
//! let node1 = UdpSocket::bind("127.0.0.1:0")?;
//! node0.set_read_timeout(Some(Duration::from_secs(5)))?;
//! node1.set_read_timeout(Some(Duration::from_secs(5)))?;
//! let relay = FaultRelay::start(vec![node0.local_addr()?, node1.local_addr()?], 7)?;
//!
//! // Node 0 reaches node 1 through the relay, and node 1's reply comes back the same way.
//! let to_node1 = relay.addr(0, 1).expect("a relay per ordered pair");
//! node0.send_to(b"ping", to_node1)?;
//! let mut buf = [0; 16];
//! let (len, relay_back) = node1.recv_from(&mut buf)?;
//! assert_eq!(&buf[..len], b"ping");
//! node1.send_to(b"pong", relay_back)?;
//! let (len, from) = node0.recv_from(&mut buf)?;
//! assert_eq!((&buf[..len], from), (&b"pong"[..], to_node1));
//!
//! // Damage the network: a lossy, slow link from 0 to 1, then a partition, then all clear.
//! relay.set(0, 1, LinkFaults { loss: 0.1, delay_ms: 20, jitter_ms: 10, ..LinkFaults::default() });
//! relay.partition(&[0]);
//! assert_eq!(relay.faults(1, 0), Some(LinkFaults::CUT));
//! relay.heal();
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::io;
use std::iter;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, watch};

/// Size of the receive buffer of every relay socket: the largest UDP datagram.
pub const MAX_DATAGRAM_BYTES: usize = 65_535;

/// Most delayed copies waiting on their timers at once; a copy beyond that is dropped (and
/// counted in [`RelayStats::dropped`]) rather than buffered without bound.
pub const MAX_DELAYED_PACKETS: usize = 32_768;

/// Most nodes one relay serves: it opens `2 × n × (n − 1)` sockets.
pub const MAX_NODES: usize = 64;

/// Kernel buffers of every relay socket, as large as the nodes' own (the kernel default of
/// about 208 KiB drops bursts on loopback, which would add loss nobody asked for).
const SOCKET_BUFFER_BYTES: usize = phalanx_transport::DEFAULT_UDP_BUFFER_BYTES;

/// Worker threads of the relay's runtime: forwarding is a syscall or two per packet, and two
/// workers keep one busy pair of nodes from starving the others.
const RUNTIME_WORKERS: usize = 2;

/// Pause after a receive error that is not a stale ICMP report, so a socket that keeps failing
/// does not spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Faults on one directed link: packets travelling from node `a` to node `b`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkFaults {
    /// Drop every packet (a cut link).
    pub cut: bool,
    /// Probability in [0, 1] that a packet is dropped.
    pub loss: f64,
    /// Fixed delay added to every packet, in ms.
    pub delay_ms: u64,
    /// Extra random delay in [0, jitter_ms] per packet (reorders packets).
    pub jitter_ms: u64,
    /// Probability in [0, 1] that a packet is sent twice.
    pub duplicate: f64,
}

/// The fate of one datagram, decided by [`LinkFaults::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not forwarded (a cut link, or lost).
    Drop,
    /// Forwarded once, or twice when `second` is set; each copy leaves after its own delay.
    Forward {
        /// Delay of the first copy.
        first: Duration,
        /// Delay of the duplicate, if the packet is duplicated.
        second: Option<Duration>,
    },
}

impl LinkFaults {
    /// A cut link and nothing else.
    pub const CUT: LinkFaults = LinkFaults { cut: true, loss: 0.0, delay_ms: 0, jitter_ms: 0, duplicate: 0.0 };

    /// True when the link does nothing to packets.
    pub fn is_clean(&self) -> bool {
        *self == LinkFaults::default()
    }

    /// What happens to the next packet on this link.
    ///
    /// Checks in order: cut, loss, duplication, then one delay per copy. The RNG is only drawn
    /// from for the faults that are set (loss > 0, duplicate > 0, jitter > 0), so the same
    /// faults and the same RNG state give the same verdict. Probabilities outside [0, 1] act
    /// as the nearest bound.
    ///
    /// ```
    /// use phalanx::relay::{LinkFaults, Verdict};
    /// use rand::SeedableRng;
    /// use std::time::Duration;
    ///
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    /// assert_eq!(LinkFaults::CUT.decide(&mut rng), Verdict::Drop);
    /// let slow = LinkFaults { delay_ms: 30, duplicate: 1.0, ..LinkFaults::default() };
    /// let twice = Verdict::Forward { first: Duration::from_millis(30), second: Some(Duration::from_millis(30)) };
    /// assert_eq!(slow.decide(&mut rng), twice);
    /// ```
    pub fn decide(&self, rng: &mut impl Rng) -> Verdict {
        if self.cut || chance(self.loss, rng) {
            return Verdict::Drop;
        }
        let duplicated = chance(self.duplicate, rng);
        let first = self.draw_delay(rng);
        let second = duplicated.then(|| self.draw_delay(rng));
        Verdict::Forward { first, second }
    }

    fn draw_delay(&self, rng: &mut impl Rng) -> Duration {
        let jitter_ms = if self.jitter_ms > 0 { rng.random_range(0..=self.jitter_ms) } else { 0 };
        Duration::from_millis(self.delay_ms.saturating_add(jitter_ms))
    }
}

/// True with probability `p`; no draw when `p` is not positive (NaN included), so links
/// without that fault leave the RNG alone.
fn chance(p: f64, rng: &mut impl Rng) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// Copies handed to the kernel for their destination (duplicates included).
    pub forwarded: u64,
    /// Packets dropped by a cut link or loss, and copies refused because
    /// [`MAX_DELAYED_PACKETS`] were already waiting.
    pub dropped: u64,
    /// Packets sent twice.
    pub duplicated: u64,
    /// Copies that waited on a timer (a non-zero delay).
    pub delayed: u64,
    /// Datagrams from an address other than the node a socket serves, dropped.
    pub unknown_source: u64,
    /// Copies the kernel refused to send (logged at debug; the relay carries on).
    pub send_failed: u64,
}

/// The counters behind [`RelayStats`], shared by the relay's tasks and its handle.
#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    unknown_source: AtomicU64,
    send_failed: AtomicU64,
    /// Delayed copies waiting on their timers now (bounded by [`MAX_DELAYED_PACKETS`]).
    delayed_in_flight: AtomicUsize,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RelayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            forwarded: get(&self.forwarded),
            dropped: get(&self.dropped),
            duplicated: get(&self.duplicated),
            delayed: get(&self.delayed),
            unknown_source: get(&self.unknown_source),
            send_failed: get(&self.send_failed),
        }
    }
}

/// The faults of every directed link among `nodes` nodes; link `(from, to)` is entry
/// `from * nodes + to`. The diagonal is never used.
#[derive(Clone, Debug, PartialEq)]
struct FaultTable {
    nodes: usize,
    links: Vec<LinkFaults>,
}

impl FaultTable {
    fn new(nodes: usize) -> Self {
        Self { nodes, links: vec![LinkFaults::default(); nodes * nodes] }
    }

    /// The entry of link `(from, to)`; None for a node out of range or `from == to`.
    fn index(&self, from: u32, to: u32) -> Option<usize> {
        let (from, to) = (usize::try_from(from).ok()?, usize::try_from(to).ok()?);
        (from != to && from < self.nodes && to < self.nodes).then_some(from * self.nodes + to)
    }

    fn get(&self, link: usize) -> LinkFaults {
        self.links.get(link).copied().unwrap_or_default()
    }

    fn set(&mut self, from: u32, to: u32, faults: LinkFaults) -> bool {
        match self.index(from, to) {
            Some(link) => {
                self.links[link] = faults;
                true
            }
            None => false,
        }
    }

    fn set_all(&mut self, faults: LinkFaults) {
        self.links.iter_mut().for_each(|link| *link = faults);
    }

    /// Cuts every link with exactly one end in `side`; other links keep their faults.
    fn partition(&mut self, side: &[u32]) {
        let n = self.nodes;
        let in_side = |node: usize| side.iter().any(|&s| usize::try_from(s).is_ok_and(|s| s == node));
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from && in_side(from) != in_side(to)) {
                self.links[from * n + to].cut = true;
            }
        }
    }

    fn heal(&mut self) {
        self.set_all(LinkFaults::default());
    }
}

/// Relays datagrams between local nodes through damaged links. See the [module docs](self).
pub struct FaultRelay {
    nodes: Vec<SocketAddr>,
    /// `fronts[from * n + to]` is [`FaultRelay::addr`]`(from, to)`.
    fronts: Vec<Option<SocketAddr>>,
    faults: watch::Sender<FaultTable>,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FaultRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultRelay").field("nodes", &self.nodes).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl FaultRelay {
    /// Relays for the nodes at `nodes` (node i listens on `nodes[i]`): one socket pair per ordered
    /// pair (i, j), i != j. Randomness (loss, jitter, duplication) comes from a ChaCha8 RNG seeded
    /// with `seed`. Runs on its own thread with its own tokio runtime (the harness is synchronous
    /// code), so it works whether or not the caller is inside a tokio runtime.
    ///
    /// Relay sockets are bound on the loopback address of the family of the node they talk to,
    /// on ports the kernel picks. Fails if `nodes` has more than [`MAX_NODES`] entries, or if
    /// a socket, the runtime or the thread cannot be created; the error names the link.
    pub fn start(nodes: Vec<SocketAddr>, seed: u64) -> io::Result<FaultRelay> {
        let n = nodes.len();
        if n > MAX_NODES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fault relay: {n} nodes, at most {MAX_NODES} are supported"),
            ));
        }
        let mut fronts = vec![None; n * n];
        let mut pairs = Vec::with_capacity(n * n.saturating_sub(1));
        for (i, &node_i) in nodes.iter().enumerate() {
            for (j, &node_j) in nodes.iter().enumerate().filter(|&(j, _)| j != i) {
                let link = i * n + j;
                let (front, front_addr) = bind(node_i, i, j, "front")?;
                let (back, back_addr) = bind(node_j, i, j, "back")?;
                tracing::debug!(from = i, to = j, %front_addr, %back_addr, "fault relay: pair bound");
                fronts[link] = Some(front_addr);
                let (id_i, id_j) = (node_id(i), node_id(j));
                let stream = 2 * link as u64;
                pairs.push(PairPlan {
                    front,
                    back,
                    // Packets node i sends to the front travel i → j.
                    inbound: LegSpec { from: id_i, to: id_j, expect: node_i, dest: node_j, link, stream },
                    // Packets node j sends to the back travel j → i.
                    outbound: LegSpec {
                        from: id_j,
                        to: id_i,
                        expect: node_j,
                        dest: node_i,
                        link: j * n + i,
                        stream: stream + 1,
                    },
                });
            }
        }

        let (faults, faults_rx) = watch::channel(FaultTable::new(n));
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let serve_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name("fault-relay".into())
            .spawn(move || serve(pairs, seed, faults_rx, serve_counters, stop_rx, ready_tx))
            .map_err(|err| io::Error::new(err.kind(), format!("fault relay: spawning its thread: {err}")))?;
        let started = ready_rx.recv().unwrap_or_else(|_| {
            Err(io::Error::other("fault relay: its thread ended before reporting whether it started"))
        });
        let relay = FaultRelay { nodes, fronts, faults, counters, stop: Some(stop), thread: Some(thread) };
        // On failure, dropping `relay` joins the thread, which has already returned.
        started.map(|()| relay)
    }

    /// The address node `from` must dial to reach node `to` (panics are not allowed: return
    /// Option, None for from == to or out of range).
    pub fn addr(&self, from: u32, to: u32) -> Option<SocketAddr> {
        let link = self.faults.borrow().index(from, to)?;
        self.fronts.get(link).copied().flatten()
    }

    /// The real addresses of the nodes, as given to [`start`](Self::start).
    pub fn nodes(&self) -> &[SocketAddr] {
        &self.nodes
    }

    /// The faults of the directed link from→to; None for from == to or out of range.
    pub fn faults(&self, from: u32, to: u32) -> Option<LinkFaults> {
        let table = self.faults.borrow();
        table.index(from, to).map(|link| table.get(link))
    }

    /// Set the faults of the directed link from→to (replaces the previous setting).
    ///
    /// A link that does not exist (from == to, or a node out of range) is logged at warn and
    /// ignored.
    pub fn set(&self, from: u32, to: u32, faults: LinkFaults) {
        let mut known = true;
        self.faults.send_modify(|table| known = table.set(from, to, faults));
        if !known {
            tracing::warn!(from, to, nodes = self.nodes.len(), "fault relay: no such link; faults ignored");
        }
    }

    /// Set the same faults on every directed link.
    pub fn set_all(&self, faults: LinkFaults) {
        self.faults.send_modify(|table| table.set_all(faults));
    }

    /// Cut every link between `side` and the other nodes, both directions (a partition);
    /// links within each side are left as they are.
    ///
    /// Only `cut` is set on the links crossing the partition: their loss, delay, jitter and
    /// duplication stay as they were ([`heal`](Self::heal) clears them all). Ids out of range
    /// are ignored.
    pub fn partition(&self, side: &[u32]) {
        self.faults.send_modify(|table| table.partition(side));
    }

    /// Clear every fault on every link.
    pub fn heal(&self) {
        self.faults.send_modify(FaultTable::heal);
    }

    /// Counters since start.
    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }
}

impl Drop for FaultRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the runtime is already gone: nothing to stop.
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("fault relay: its thread panicked");
            }
        }
    }
}

/// Node index `i` as the `u32` id the API uses (`i < MAX_NODES`, so it always fits).
fn node_id(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// Binds a relay socket on the loopback address of `peer`'s family, with large buffers.
fn bind(peer: SocketAddr, i: usize, j: usize, side: &str) -> io::Result<(std::net::UdpSocket, SocketAddr)> {
    let ip = match peer.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let context = |err: io::Error| io::Error::new(err.kind(), format!("fault relay {i}->{j}: {side} socket: {err}"));
    let socket = phalanx_transport::bind_udp(SocketAddr::new(ip, 0), SOCKET_BUFFER_BYTES).map_err(context)?;
    let addr = socket.local_addr().map_err(context)?;
    Ok((socket, addr))
}

/// One direction of one pair's relay: where its packets come from and go.
#[derive(Clone, Copy, Debug)]
struct LegSpec {
    /// Node the packets come from (for logs).
    from: u32,
    /// Node the packets go to (for logs).
    to: u32,
    /// Only datagrams from this address are forwarded.
    expect: SocketAddr,
    /// Where they are forwarded.
    dest: SocketAddr,
    /// Entry of the directed link in the [`FaultTable`].
    link: usize,
    /// ChaCha8 stream of this leg's RNG.
    stream: u64,
}

/// One ordered pair's sockets before they are registered with the relay's runtime.
struct PairPlan {
    front: std::net::UdpSocket,
    back: std::net::UdpSocket,
    /// Reads the front socket, forwards from the back one.
    inbound: LegSpec,
    /// Reads the back socket, forwards from the front one.
    outbound: LegSpec,
}

/// Body of the relay thread: builds the runtime, starts one task per leg, reports through
/// `ready`, then runs until `stop` fires or its sender is dropped. Dropping the runtime at the
/// end cancels every task (delayed copies included) and closes every socket.
fn serve(
    pairs: Vec<PairPlan>,
    seed: u64,
    faults: watch::Receiver<FaultTable>,
    counters: Arc<Counters>,
    stop: oneshot::Receiver<()>,
    ready: std_mpsc::Sender<io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("fault-relay-worker")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(io::Error::new(err.kind(), format!("fault relay: building its runtime: {err}"))));
            return;
        }
    };
    let started = {
        let _context = runtime.enter();
        spawn_legs(pairs, seed, &faults, &counters)
    };
    let failed = started.is_err();
    // The caller waits for this report; if it is gone there is nobody to serve.
    if ready.send(started).is_err() || failed {
        return;
    }
    runtime.block_on(async {
        // Ok (stop sent) and Err (the handle vanished without Drop) both mean: stop.
        let _ = stop.await;
    });
}

/// Registers every socket with the current runtime and spawns a task per leg.
fn spawn_legs(
    pairs: Vec<PairPlan>,
    seed: u64,
    faults: &watch::Receiver<FaultTable>,
    counters: &Arc<Counters>,
) -> io::Result<()> {
    let register = |socket: std::net::UdpSocket| {
        UdpSocket::from_std(socket).map(Arc::new).map_err(|err| {
            io::Error::new(err.kind(), format!("fault relay: registering a socket with its runtime: {err}"))
        })
    };
    for PairPlan { front, back, inbound, outbound } in pairs {
        let (front, back) = (register(front)?, register(back)?);
        for (spec, recv, send) in [(inbound, front.clone(), back.clone()), (outbound, back, front)] {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(spec.stream);
            let leg = Leg { spec, recv, send, rng, faults: faults.clone(), counters: counters.clone() };
            tokio::spawn(leg.run());
        }
    }
    Ok(())
}

/// One direction of one pair's relay: owns its RNG, reads one socket, forwards from the other.
struct Leg {
    spec: LegSpec,
    recv: Arc<UdpSocket>,
    send: Arc<UdpSocket>,
    rng: ChaCha8Rng,
    faults: watch::Receiver<FaultTable>,
    counters: Arc<Counters>,
}

impl Leg {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
        loop {
            let (len, source) = match self.recv.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(err) => {
                    self.recv_failed(err).await;
                    continue;
                }
            };
            let LegSpec { from, to, expect, link, .. } = self.spec;
            if source != expect {
                Counters::bump(&self.counters.unknown_source);
                tracing::debug!(from, to, %source, %expect, "fault relay: datagram from an unknown source dropped");
                continue;
            }
            // Copied out so the table's lock is not held across an await.
            let faults = self.faults.borrow().get(link);
            match faults.decide(&mut self.rng) {
                Verdict::Drop => Counters::bump(&self.counters.dropped),
                Verdict::Forward { first, second } => {
                    if second.is_some() {
                        Counters::bump(&self.counters.duplicated);
                    }
                    for delay in iter::once(first).chain(second) {
                        self.forward(&buf[..len], delay).await;
                    }
                }
            }
        }
    }

    /// Sends one copy now, or after `delay` on a timer task so later packets overtake it.
    async fn forward(&self, datagram: &[u8], delay: Duration) {
        if delay.is_zero() {
            send(&self.send, datagram, &self.spec, &self.counters).await;
            return;
        }
        let waiting = self.counters.delayed_in_flight.fetch_add(1, Ordering::Relaxed);
        if waiting >= MAX_DELAYED_PACKETS {
            self.counters.delayed_in_flight.fetch_sub(1, Ordering::Relaxed);
            Counters::bump(&self.counters.dropped);
            tracing::debug!(
                from = self.spec.from,
                to = self.spec.to,
                max = MAX_DELAYED_PACKETS,
                "fault relay: too many delayed packets; copy dropped"
            );
            return;
        }
        Counters::bump(&self.counters.delayed);
        let (socket, counters, datagram) = (self.send.clone(), self.counters.clone(), datagram.to_vec());
        let spec = self.spec;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            send(&socket, &datagram, &spec, &counters).await;
            counters.delayed_in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// A receive error never stops the leg. On Linux an unconnected UDP socket only sees ICMP
    /// errors (port unreachable from a node that is down) with `IP_RECVERR`, but other systems
    /// report them on the next receive as ConnectionRefused/Reset: those are stale news about
    /// an earlier send and are skipped at once. Anything else is retried after a short pause.
    async fn recv_failed(&self, err: io::Error) {
        let LegSpec { from, to, .. } = self.spec;
        match err.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
                tracing::debug!(from, to, %err, "fault relay: receive reported an earlier send's failure; ignored");
            }
            _ => {
                tracing::debug!(from, to, %err, "fault relay: receive failed; retrying");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Sends one copy to the leg's destination; a failure is counted and logged, never fatal.
///
/// Counted as forwarded *before* the send, so whoever receives the copy already sees it in
/// [`FaultRelay::stats`]; a failed send moves it to `send_failed`.
async fn send(socket: &UdpSocket, datagram: &[u8], spec: &LegSpec, counters: &Counters) {
    Counters::bump(&counters.forwarded);
    if let Err(err) = socket.send_to(datagram, spec.dest).await {
        counters.forwarded.fetch_sub(1, Ordering::Relaxed);
        Counters::bump(&counters.send_failed);
        tracing::debug!(from = spec.from, to = spec.to, dest = %spec.dest, %err, "fault relay: send failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn clean_links_forward_at_once_without_drawing() {
        let mut drawn = rng(3);
        let untouched = drawn.clone();
        assert_eq!(LinkFaults::default().decide(&mut drawn), Verdict::Forward { first: Duration::ZERO, second: None });
        assert_eq!(drawn, untouched, "a clean link must leave the RNG alone");
        assert!(LinkFaults::default().is_clean());
        assert!(!LinkFaults::CUT.is_clean());
    }

    #[test]
    fn a_cut_wins_over_everything_else() {
        let faults = LinkFaults { cut: true, duplicate: 1.0, delay_ms: 5, ..LinkFaults::default() };
        let mut r = rng(1);
        assert!((0..100).all(|_| faults.decide(&mut r) == Verdict::Drop));
    }

    #[test]
    fn loss_and_duplicate_are_probabilities_clamped_to_0_and_1() {
        let mut r = rng(2);
        let all_lost = LinkFaults { loss: 1.0, ..LinkFaults::default() };
        assert!((0..100).all(|_| all_lost.decide(&mut r) == Verdict::Drop));
        let beyond = LinkFaults { loss: -0.5, duplicate: 7.0, ..LinkFaults::default() };
        let twice = Verdict::Forward { first: Duration::ZERO, second: Some(Duration::ZERO) };
        assert!((0..100).all(|_| beyond.decide(&mut r) == twice));
        let nan = LinkFaults { loss: f64::NAN, duplicate: f64::NAN, ..LinkFaults::default() };
        assert_eq!(nan.decide(&mut r), Verdict::Forward { first: Duration::ZERO, second: None });
    }

    #[test]
    fn loss_rate_matches_its_probability_and_replays_with_the_seed() {
        let faults = LinkFaults { loss: 0.3, ..LinkFaults::default() };
        let fates = |seed| {
            let mut r = rng(seed);
            (0..10_000).map(|_| faults.decide(&mut r) == Verdict::Drop).collect::<Vec<_>>()
        };
        let first = fates(11);
        let lost = first.iter().filter(|&&d| d).count();
        // Binomial(10 000, 0.3): sd ≈ 46; ±300 is more than 6 sd.
        assert!((2_700..3_300).contains(&lost), "lost {lost} of 10000 at p=0.3");
        assert_eq!(first, fates(11), "same seed, same fates");
        assert_ne!(first, fates(12), "another seed, other fates");
    }

    #[test]
    fn delays_are_the_fixed_delay_plus_a_jitter_within_bounds() {
        let faults = LinkFaults { delay_ms: 10, jitter_ms: 20, duplicate: 0.5, ..LinkFaults::default() };
        let mut r = rng(4);
        let mut seen = std::collections::BTreeSet::new();
        let mut duplicates = 0;
        for _ in 0..2_000 {
            let Verdict::Forward { first, second } = faults.decide(&mut r) else { panic!("nothing drops here") };
            duplicates += usize::from(second.is_some());
            for delay in iter::once(first).chain(second) {
                assert!((10..=30).contains(&delay.as_millis()), "{delay:?}");
                seen.insert(delay.as_millis());
            }
        }
        assert_eq!(seen.len(), 21, "every delay in 10..=30 ms occurs: {seen:?}");
        assert!((800..1_200).contains(&duplicates), "{duplicates} duplicates of 2000 at p=0.5");
        let huge = LinkFaults { delay_ms: u64::MAX, jitter_ms: 5, ..LinkFaults::default() };
        assert!(
            matches!(huge.decide(&mut r), Verdict::Forward { first, .. } if first == Duration::from_millis(u64::MAX))
        );
    }

    #[test]
    fn the_table_knows_only_links_between_distinct_nodes() {
        let mut table = FaultTable::new(3);
        assert_eq!(table.index(0, 1), Some(1));
        assert_eq!(table.index(2, 1), Some(7));
        assert_eq!(table.index(1, 1), None);
        assert_eq!(table.index(3, 0), None);
        assert_eq!(table.index(0, u32::MAX), None);
        assert!(!table.set(1, 1, LinkFaults::CUT));
        assert!(!table.set(0, 3, LinkFaults::CUT));
        assert_eq!(table, FaultTable::new(3));
        assert!(table.set(2, 0, LinkFaults::CUT));
        assert_eq!(table.get(6), LinkFaults::CUT);
        assert_eq!(table.get(2), LinkFaults::default(), "the reverse link is separate");
    }

    #[test]
    fn a_partition_cuts_only_the_links_that_cross_it_and_keeps_other_faults() {
        let mut table = FaultTable::new(4);
        let lossy = LinkFaults { loss: 0.2, ..LinkFaults::default() };
        table.set_all(lossy);
        table.partition(&[0, 2, 99]);
        for from in 0..4u32 {
            for to in (0..4u32).filter(|&to| to != from) {
                let link = table.index(from, to).expect("link");
                let crosses = (from % 2 == 0) != (to % 2 == 0);
                assert_eq!(table.get(link), LinkFaults { cut: crosses, ..lossy }, "{from}->{to}");
            }
        }
        table.heal();
        assert!(table.links.iter().all(LinkFaults::is_clean));
        table.partition(&[]);
        assert!(table.links.iter().all(LinkFaults::is_clean), "one empty side: nothing crosses");
    }

    #[test]
    fn the_handle_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<FaultRelay>();
    }

    /// Threads of this process whose name starts with `fault-relay` (Linux only).
    #[cfg(target_os = "linux")]
    fn relay_threads() -> usize {
        let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("fault-relay"))
            .count()
    }

    // The only test of this crate's unit tests that starts relays, so nobody else's relay
    // threads are counted.
    #[test]
    fn start_refuses_too_many_nodes_and_drop_joins_every_thread() {
        let many = vec!["127.0.0.1:9".parse().expect("addr"); MAX_NODES + 1];
        let err = FaultRelay::start(many, 0).expect_err("too many");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("65 nodes"), "{err}");

        let empty = FaultRelay::start(Vec::new(), 0).expect("no nodes, no sockets");
        assert_eq!(empty.addr(0, 1), None);
        assert_eq!(empty.stats(), RelayStats::default());
        drop(empty);

        let nodes = vec!["127.0.0.1:9".parse().expect("addr"), "[::1]:9".parse().expect("addr")];
        let relay = FaultRelay::start(nodes, 0).expect("two nodes");
        let (to_v6, to_v4) = (relay.addr(0, 1).expect("0->1"), relay.addr(1, 0).expect("1->0"));
        assert!(to_v6.is_ipv4() && to_v4.is_ipv6(), "a front socket has its dialer's family");
        #[cfg(target_os = "linux")]
        assert_eq!(relay_threads(), 1 + RUNTIME_WORKERS);
        drop(relay);
        #[cfg(target_os = "linux")]
        assert_eq!(relay_threads(), 0, "drop joins the relay thread and its runtime's workers");
    }
}
