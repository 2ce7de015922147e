//! The fault relay with real UDP sockets on loopback: forwarding both ways, partitions,
//! seeded loss, duplication, jitter, strangers, a node that goes down, shutdown, and real
//! QUIC (the Phalanx transport) repairing loss and reordering through it.
//!
//! Waits are bounded receives: a test that expects a datagram waits for it (failing after
//! [`HANG_GUARD`]); a test that expects silence waits [`SILENCE`] and asserts on the relay's
//! counters.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use phalanx::relay::{FaultRelay, LinkFaults, RelayStats};
use phalanx_transport::{
    certs, encode, Limits, NodeIdentity, Transport, TransportConfig, TransportEvent, DEFAULT_UDP_BUFFER_BYTES,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Receiver;

/// Longest wait for something that must happen; only reached if something is broken.
const HANG_GUARD: Duration = Duration::from_secs(10);

/// How long a test listens to conclude that nothing passes.
const SILENCE: Duration = Duration::from_millis(300);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("phalanx=info,phalanx_transport=warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A blocking UDP socket on loopback with large kernel buffers (as the real nodes have), so
/// bursts of a thousand datagrams are not dropped by the kernel.
fn udp_node() -> UdpSocket {
    udp_node_at("127.0.0.1:0".parse().expect("addr"))
}

fn udp_node_at(addr: SocketAddr) -> UdpSocket {
    let socket = phalanx_transport::bind_udp(addr, DEFAULT_UDP_BUFFER_BYTES).expect("bind node socket");
    socket.set_nonblocking(false).expect("blocking");
    socket
}

fn addr_of(socket: &UdpSocket) -> SocketAddr {
    socket.local_addr().expect("local addr")
}

fn send_seq(socket: &UdpSocket, seq: u32, to: SocketAddr) {
    socket.send_to(&seq.to_le_bytes(), to).expect("send");
}

/// The next datagram within `timeout` as (sequence number, sender), or None.
fn recv_seq_within(socket: &UdpSocket, timeout: Duration) -> Option<(u32, SocketAddr)> {
    socket.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = [0u8; 64];
    match socket.recv_from(&mut buf) {
        Ok((4, from)) => Some((u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]), from)),
        Ok((len, from)) => panic!("a {len}-byte datagram from {from}; the tests only send 4"),
        Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        Err(err) => panic!("recv on {}: {err}", addr_of(socket)),
    }
}

/// The next datagram, which must arrive.
fn recv_seq(socket: &UdpSocket) -> (u32, SocketAddr) {
    recv_seq_within(socket, HANG_GUARD).unwrap_or_else(|| panic!("nothing reached {}", addr_of(socket)))
}

fn assert_silent(socket: &UdpSocket) {
    if let Some((seq, from)) = recv_seq_within(socket, SILENCE) {
        panic!("{} received {seq} from {from} through a cut link", addr_of(socket));
    }
}

fn start(nodes: &[&UdpSocket], seed: u64) -> FaultRelay {
    FaultRelay::start(nodes.iter().map(|s| addr_of(s)).collect(), seed).expect("start relay")
}

fn relay_addr(relay: &FaultRelay, from: u32, to: u32) -> SocketAddr {
    relay.addr(from, to).unwrap_or_else(|| panic!("no relay for {from}->{to}"))
}

/// Node `a` sends one datagram to node `b` through `addr(a, b)`, node `b` answers to where
/// it came from; returns that address (the pair's back socket).
fn ping_pong(relay: &FaultRelay, nodes: &[&UdpSocket], a: u32, b: u32, seq: u32) -> SocketAddr {
    let front = relay_addr(relay, a, b);
    send_seq(nodes[a as usize], seq, front);
    let (got, back) = recv_seq(nodes[b as usize]);
    assert_eq!(got, seq);
    send_seq(nodes[b as usize], seq + 1, back);
    assert_eq!(recv_seq(nodes[a as usize]), (seq + 1, front), "the reply comes from the address node {a} dialled");
    back
}

#[test]
fn relay_forwards_both_ways_through_each_pairs_sockets() {
    init_tracing();
    let (n0, n1, n2) = (udp_node(), udp_node(), udp_node());
    let nodes = [&n0, &n1, &n2];
    let relay = start(&nodes, 1);

    let mut fronts = std::collections::BTreeSet::new();
    for from in 0..3 {
        for to in 0..3 {
            match relay.addr(from, to) {
                None => assert_eq!(from, to),
                Some(front) => {
                    assert!(front.ip().is_loopback() && front.port() != 0, "{front}");
                    assert!(fronts.insert(front), "{front} serves two pairs");
                }
            }
        }
    }
    assert_eq!(fronts.len(), 6);
    assert_eq!((relay.addr(0, 3), relay.addr(7, 0), relay.addr(u32::MAX, 1)), (None, None, None));

    // Node 0 → node 1 and back, ten times: node 1 sees the pair's back socket, node 0 hears
    // the replies from the address it dialled.
    let front = relay_addr(&relay, 0, 1);
    let mut back = None;
    for seq in 0..10 {
        send_seq(&n0, seq, front);
        let (got, from) = recv_seq(&n1);
        assert_eq!(got, seq);
        assert!(from != addr_of(&n0) && from != front && from.ip().is_loopback(), "{from}");
        assert_eq!(*back.get_or_insert(from), from, "one back socket per pair");
        send_seq(&n1, 100 + seq, from);
        assert_eq!(recv_seq(&n0), (100 + seq, front));
    }
    // The other pairs carry traffic too.
    ping_pong(&relay, &nodes, 1, 0, 200);
    ping_pong(&relay, &nodes, 2, 1, 300);
    ping_pong(&relay, &nodes, 0, 2, 400);
    assert_eq!(relay.stats(), RelayStats { forwarded: 26, ..RelayStats::default() });
}

#[test]
fn a_partition_stops_both_directions_and_heal_restores_them() {
    init_tracing();
    let (n0, n1, n2) = (udp_node(), udp_node(), udp_node());
    let nodes = [&n0, &n1, &n2];
    let relay = start(&nodes, 2);
    let back_01 = ping_pong(&relay, &nodes, 0, 1, 0);
    let back_10 = ping_pong(&relay, &nodes, 1, 0, 10);
    let before = relay.stats();

    relay.partition(&[0]);
    assert_eq!(relay.faults(0, 1), Some(LinkFaults::CUT));
    assert_eq!(relay.faults(2, 0), Some(LinkFaults::CUT));
    assert_eq!(relay.faults(1, 2), Some(LinkFaults::default()), "links within a side are untouched");
    // Every way across: both pairs' fronts and backs, five datagrams each.
    for seq in 0..5 {
        send_seq(&n0, seq, relay_addr(&relay, 0, 1)); // 0 → 1 via pair (0, 1)
        send_seq(&n1, seq, back_01); // 1 → 0 via pair (0, 1)
        send_seq(&n1, seq, relay_addr(&relay, 1, 0)); // 1 → 0 via pair (1, 0)
        send_seq(&n0, seq, back_10); // 0 → 1 via pair (1, 0)
        send_seq(&n2, seq, relay_addr(&relay, 2, 0)); // 2 → 0
    }
    // Within the other side, traffic still flows.
    ping_pong(&relay, &nodes, 1, 2, 20);
    assert_silent(&n0);
    assert_silent(&n1);
    let during = relay.stats();
    assert_eq!(during.dropped, 25, "{during:?}");
    assert_eq!(during.forwarded, before.forwarded + 2, "{during:?}");

    relay.heal();
    assert_eq!(relay.faults(0, 1), Some(LinkFaults::default()));
    assert_eq!(ping_pong(&relay, &nodes, 0, 1, 30), back_01);
    assert_eq!(ping_pong(&relay, &nodes, 1, 0, 40), back_10);
    ping_pong(&relay, &nodes, 0, 2, 50);
    assert_eq!(relay.stats().dropped, 25);
}

/// Sends `count` datagrams 0→1 through a relay with `loss` on link (0, 1) and returns the
/// sequence numbers node 1 received. The end is found without a timeout: the relay handles
/// one socket's datagrams in order, so once a later "fence" datagram arrives every earlier
/// one has been forwarded or dropped. Fences may be lost too, so another is sent each time
/// none arrives within [`SILENCE`].
fn lossy_run(seed: u64, loss: f64, count: u32) -> (Vec<u32>, RelayStats) {
    let (n0, n1) = (udp_node(), udp_node());
    let relay = start(&[&n0, &n1], seed);
    relay.set(0, 1, LinkFaults { loss, ..LinkFaults::default() });
    let front = relay_addr(&relay, 0, 1);
    for seq in 0..count {
        send_seq(&n0, seq, front);
    }
    let mut received = Vec::new();
    let mut fence = count;
    send_seq(&n0, fence, front);
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        assert!(Instant::now() < deadline, "no fence arrived; {} datagrams did", received.len());
        match recv_seq_within(&n1, SILENCE) {
            Some((seq, _)) if seq < count => received.push(seq),
            Some(_) => break,
            None => {
                fence += 1;
                send_seq(&n0, fence, front);
            }
        }
    }
    (received, relay.stats())
}

#[test]
fn seeded_loss_drops_about_its_share_and_the_same_seed_drops_the_same_datagrams() {
    init_tracing();
    let (first, stats) = lossy_run(7, 0.3, 1000);
    // Binomial(1000, 0.7): mean 700, sd ≈ 14.5; 600..800 is ±6.9 sd.
    assert!((600..800).contains(&first.len()), "received {} of 1000 at 30 % loss", first.len());
    assert!(first.windows(2).all(|w| w[0] < w[1]), "no delay, so no reordering");
    assert!(stats.dropped >= 1000 - first.len() as u64, "{stats:?}");
    assert_eq!(stats.duplicated + stats.delayed + stats.unknown_source + stats.send_failed, 0, "{stats:?}");

    let (again, _) = lossy_run(7, 0.3, 1000);
    assert_eq!(first, again, "seed 7 must lose the same datagrams twice");
    let (other, _) = lossy_run(8, 0.3, 1000);
    assert_ne!(first, other, "seed 8 loses other datagrams");
}

#[test]
fn duplicate_one_delivers_every_datagram_twice() {
    init_tracing();
    let (n0, n1) = (udp_node(), udp_node());
    let relay = start(&[&n0, &n1], 3);
    relay.set(0, 1, LinkFaults { duplicate: 1.0, ..LinkFaults::default() });
    let front = relay_addr(&relay, 0, 1);
    for seq in 0..100 {
        send_seq(&n0, seq, front);
    }
    let mut copies = BTreeMap::<u32, u32>::new();
    for _ in 0..200 {
        *copies.entry(recv_seq(&n1).0).or_default() += 1;
    }
    assert_eq!(copies.len(), 100, "{copies:?}");
    assert!(copies.values().all(|&c| c == 2), "{copies:?}");
    assert_silent(&n1);
    assert_eq!(relay.stats(), RelayStats { forwarded: 200, duplicated: 100, ..RelayStats::default() });

    // Only link (0, 1) duplicates: the reverse direction is clean.
    let back = recv_back_addr(&relay, &n0, &n1);
    send_seq(&n1, 7, back);
    assert_eq!(recv_seq(&n0), (7, front));
    assert_silent(&n0);
}

/// The back socket of pair (0, 1), learned from one more datagram 0 → 1 (which may arrive
/// twice on a duplicating link: both copies are read).
fn recv_back_addr(relay: &FaultRelay, n0: &UdpSocket, n1: &UdpSocket) -> SocketAddr {
    send_seq(n0, u32::MAX, relay_addr(relay, 0, 1));
    let (seq, back) = recv_seq(n1);
    assert_eq!(seq, u32::MAX);
    while let Some((seq, _)) = recv_seq_within(n1, Duration::from_millis(50)) {
        assert_eq!(seq, u32::MAX);
    }
    back
}

#[test]
fn jitter_delivers_everything_and_reorders() {
    init_tracing();
    let (n0, n1) = (udp_node(), udp_node());
    let relay = start(&[&n0, &n1], 4);
    relay.set(0, 1, LinkFaults { jitter_ms: 50, ..LinkFaults::default() });
    let front = relay_addr(&relay, 0, 1);
    let sent = Instant::now();
    for seq in 0..200 {
        send_seq(&n0, seq, front);
    }
    let order: Vec<u32> = (0..200).map(|_| recv_seq(&n1).0).collect();
    let elapsed = sent.elapsed();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>(), "every datagram exactly once");
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(inversions > 0, "200 datagrams with 0..50 ms of jitter arrived in order");
    assert!(elapsed < Duration::from_secs(2), "jitter is at most 50 ms, took {elapsed:?}");
    let stats = relay.stats();
    // A datagram whose jitter draw is 0 is not delayed: 200/51 ≈ 4 expected.
    assert!((180..=200).contains(&stats.delayed), "{stats:?}");
    assert_eq!((stats.forwarded, stats.dropped), (200, 0), "{stats:?}");
    println!("jitter: {inversions} inversions, {elapsed:?}");
}

#[test]
fn datagrams_from_strangers_are_counted_and_never_forwarded() {
    init_tracing();
    let (n0, n1, stranger) = (udp_node(), udp_node(), udp_node());
    let relay = start(&[&n0, &n1], 5);
    let back = ping_pong(&relay, &[&n0, &n1], 0, 1, 0);
    let front = relay_addr(&relay, 0, 1);

    // The stranger writes to both sockets of the pair; then each legitimate node writes to
    // the same socket. A socket is read in order, so when the legitimate datagram arrives
    // the stranger's have been judged: they must not have been forwarded before it.
    for seq in 0..5 {
        send_seq(&stranger, 1_000 + seq, front);
        send_seq(&stranger, 2_000 + seq, back);
    }
    send_seq(&n0, 10, front);
    send_seq(&n1, 20, back);
    assert_eq!(recv_seq(&n1).0, 10);
    assert_eq!(recv_seq(&n0), (20, front));
    assert_eq!(relay.stats(), RelayStats { forwarded: 4, unknown_source: 10, ..RelayStats::default() });
    assert!(recv_seq_within(&stranger, SILENCE).is_none(), "the relay answers no stranger");
}

#[test]
fn a_node_that_goes_down_and_comes_back_on_its_port_is_reached_again() {
    init_tracing();
    let (n0, n1) = (udp_node(), udp_node());
    let n1_addr = addr_of(&n1);
    let relay = start(&[&n0, &n1], 6);
    let front = relay_addr(&relay, 0, 1);
    let back = ping_pong(&relay, &[&n0, &n1], 0, 1, 0);

    // Node 1 dies: the relay's back socket now sends into a closed port (an ICMP port
    // unreachable comes back each time).
    drop(n1);
    for seq in 10..20 {
        send_seq(&n0, seq, front);
    }
    // Silence meanwhile (nothing comes back to node 0) gives the relay time to send them into the closed port.
    assert!(recv_seq_within(&n0, SILENCE).is_none());

    // Node 1 restarts on the same port; both directions work again.
    let n1 = udp_node_at(n1_addr);
    send_seq(&n0, 100, front);
    let mut seen = Vec::new();
    while seen.last() != Some(&100) {
        let (seq, from) = recv_seq(&n1);
        assert_eq!(from, back);
        seen.push(seq);
    }
    send_seq(&n1, 200, back);
    assert_eq!(recv_seq(&n0), (200, front));
    let stats = relay.stats();
    println!("while node 1 was down: {stats:?}, node 1 then received {seen:?}");
    assert_eq!(stats.forwarded + stats.send_failed, 2 + 10 + 2, "{stats:?}");
}

#[test]
fn dropping_the_relay_closes_its_sockets() {
    init_tracing();
    let (n0, n1) = (udp_node(), udp_node());
    let relay = start(&[&n0, &n1], 7);
    let fronts = [relay_addr(&relay, 0, 1), relay_addr(&relay, 1, 0)];
    let back = ping_pong(&relay, &[&n0, &n1], 0, 1, 0);
    drop(relay);
    // Drop joined the relay's thread, whose runtime owned the sockets: the ports are free.
    for addr in fronts.into_iter().chain([back]) {
        drop(UdpSocket::bind(addr).unwrap_or_else(|err| panic!("{addr} still bound after drop: {err}")));
    }
}

// ---------------------------------------------------------------------------------------------
// Real QUIC through the relay.

/// The header of the frames exchanged: which node sent it, and its number.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Numbered {
    from: u32,
    seq: u32,
}

/// Frames carry a 256-float tensor (1 KiB: about one QUIC packet each) derived from their
/// number, to check their bytes end to end.
fn tensor(from: u32, seq: u32) -> Vec<f32> {
    (0..256u32).map(|i| f32::from_bits(from.wrapping_mul(0x9e37_79b9) ^ seq.wrapping_mul(2_654_435_761) ^ i)).collect()
}

fn frame(from: u32, seq: u32) -> Vec<u8> {
    encode(&Numbered { from, seq }, &tensor(from, seq), &Limits::default()).expect("encode")
}

/// QUIC idle timeout of the two transports: the partition is detected this long after it
/// starts (the default of 3 s would make the test slow).
const IDLE_TIMEOUT_MS: u64 = 1_000;

async fn quic_node(dir: &Path, id: u32) -> (Transport, Receiver<TransportEvent>) {
    let identity = NodeIdentity::load(dir, id).expect("identity");
    let mut config = TransportConfig::new(identity, "127.0.0.1:0".parse().expect("addr"));
    config.idle_timeout_ms = IDLE_TIMEOUT_MS;
    Transport::bind(config).await.expect("bind transport")
}

async fn next_event(events: &mut Receiver<TransportEvent>, what: &str) -> TransportEvent {
    tokio::time::timeout(HANG_GUARD, events.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("event queue closed waiting for {what}"))
}

async fn wait_peer_up(events: &mut Receiver<TransportEvent>, peer: u32) {
    loop {
        match next_event(events, "PeerUp").await {
            TransportEvent::PeerUp { peer: p, .. } if p == peer => return,
            TransportEvent::Message { .. } | TransportEvent::PeerUp { .. } => {}
            other => panic!("waiting for PeerUp {peer}: {other:?}"),
        }
    }
}

/// Receives `count` frames from `peer` and returns their numbers in arrival order; checks
/// every tensor bit for bit. A PeerDown or a rejection fails the test.
async fn collect(events: &mut Receiver<TransportEvent>, peer: u32, count: usize) -> Vec<u32> {
    let limits = Limits::default();
    let mut seqs = Vec::with_capacity(count);
    while seqs.len() < count {
        match next_event(events, "a frame").await {
            TransportEvent::Message { peer: p, frame } => {
                assert_eq!(p, peer);
                let decoded = frame.decode::<Numbered>(&limits).0.expect("decode");
                assert_eq!(decoded.header.from, peer);
                let expected = tensor(peer, decoded.header.seq);
                let same = decoded.tensor.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && decoded.tensor.len() == expected.len(), "frame {} damaged", decoded.header.seq);
                seqs.push(decoded.header.seq);
            }
            other => panic!("while receiving frames from {peer}: {other:?}"),
        }
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_through_the_relay_repairs_loss_and_reordering_and_a_partition_takes_the_peer_down() {
    init_tracing();
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    certs::generate(dir.path(), 2).expect("certificates");
    let (a, mut a_events) = quic_node(dir.path(), 0).await;
    let (b, mut b_events) = quic_node(dir.path(), 1).await;
    // Started (and later dropped) inside a tokio runtime: the relay has its own.
    let relay = FaultRelay::start(vec![a.local_addr(), b.local_addr()], 42).expect("relay");

    assert_eq!(a.connect(relay_addr(&relay, 0, 1), Some(1)).await.expect("connect through the relay"), 1);
    wait_peer_up(&mut a_events, 1).await;
    wait_peer_up(&mut b_events, 0).await;
    assert_ne!(b.peer_info(0).expect("b knows a").addr, a.local_addr(), "b sees the relay, not a");

    // Phase 1: a bad network. QUIC must deliver every frame exactly once and intact.
    relay.set_all(LinkFaults { loss: 0.1, jitter_ms: 20, duplicate: 0.1, ..LinkFaults::default() });
    const FRAMES: u32 = 200;
    let send_all = |t: &Transport, from: u32, to: u32| {
        let t = t.clone();
        tokio::spawn(async move {
            for seq in 0..FRAMES {
                t.send_when_ready(to, frame(from, seq)).await.expect("send");
            }
        })
    };
    let (to_b, to_a) = (send_all(&a, 0, 1), send_all(&b, 1, 0));
    let (at_b, at_a) =
        tokio::join!(collect(&mut b_events, 0, FRAMES as usize), collect(&mut a_events, 1, FRAMES as usize));
    to_b.await.expect("sender a");
    to_a.await.expect("sender b");
    for (name, seqs) in [("a → b", &at_b), ("b → a", &at_a)] {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..FRAMES).collect::<Vec<_>>(), "{name}: every frame exactly once");
    }
    let faulty = relay.stats();
    assert!(faulty.dropped > 0 && faulty.duplicated > 0 && faulty.delayed > 0, "{faulty:?}");
    assert_eq!(faulty.unknown_source, 0, "{faulty:?}");
    let exchanged = started.elapsed();

    // Phase 2: a partition. The frame sent during it never arrives; both sides report the
    // peer down after the idle timeout.
    relay.heal();
    relay.partition(&[0]);
    let cut_at = Instant::now();
    a.send(1, frame(0, 10_000)).expect("queued while the connection is still up");
    match next_event(&mut b_events, "PeerDown at b").await {
        TransportEvent::PeerDown { peer: 0, reason } => assert!(reason.contains("idle"), "{reason}"),
        other => panic!("b got {other:?} during the partition"),
    }
    match next_event(&mut a_events, "PeerDown at a").await {
        TransportEvent::PeerDown { peer: 1, .. } => {}
        other => panic!("a got {other:?} during the partition"),
    }
    let detected = cut_at.elapsed();
    assert!(detected >= Duration::from_millis(IDLE_TIMEOUT_MS / 2), "down after {detected:?}");
    let partitioned = relay.stats();
    assert!(partitioned.dropped > faulty.dropped, "{partitioned:?}");

    // Phase 3: heal; a new dial through the same relay brings the pair back.
    relay.heal();
    assert_eq!(a.connect(relay_addr(&relay, 0, 1), Some(1)).await.expect("reconnect"), 1);
    wait_peer_up(&mut a_events, 1).await;
    wait_peer_up(&mut b_events, 0).await;
    a.send(1, frame(0, 20_000)).expect("send after heal");
    b.send(0, frame(1, 20_001)).expect("send after heal");
    assert_eq!(collect(&mut b_events, 0, 1).await, [20_000], "the frame sent during the partition stayed lost");
    assert_eq!(collect(&mut a_events, 1, 1).await, [20_001]);

    a.shutdown().await;
    b.shutdown().await;
    drop(relay);
    println!(
        "quic: exchange {exchanged:?}, partition detected after {detected:?}, total {:?}; relay {partitioned:?}",
        started.elapsed()
    );
}
