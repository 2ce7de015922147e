//! The in-memory network (`phalanx_transport::mem`): the QUIC transport's event contract, the
//! same framing rules and close codes, each fault doing what it says (asserted on the events
//! and the counters), determinism from the seed, and one generic node loop over both
//! transports with the same result.
//!
//! Every test but the last runs on tokio's paused clock: virtual time jumps to the network's
//! next deadline, so a 3 s idle timeout costs nothing and times are exact. The
//! `tokio::time::sleep`s below only move that virtual clock to where a scenario acts next;
//! nothing waits on them for an outcome.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use phalanx_transport::api::{self, Events as _};
use phalanx_transport::codec::PREFIX_BYTES;
use phalanx_transport::mem::{LinkFaults, MemConfig, MemError, MemEvents, MemNetwork, NetStats, TraceEntry};
use phalanx_transport::{
    codes, decode, encode, ConnectError, DecodeError, Limits, Revocations, Revoked, SendError, TransportEvent,
    DEFAULT_IDLE_TIMEOUT_MS, PROTOCOL_VERSION,
};
use serde::{Deserialize, Serialize};

/// Longest virtual wait for one event; reached only if the network lost it.
const GUARD: Duration = Duration::from_secs(600);
const IDLE: Duration = Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS);

fn frame(text: &str) -> Vec<u8> {
    encode(&text, &[], &Limits::default()).expect("encode")
}

fn text(frame: &phalanx_transport::RecvFrame) -> String {
    decode::<String>(&frame.to_vec(), &Limits::default()).expect("decode").header
}

fn network(seed: u64) -> MemNetwork {
    MemNetwork::new(seed, MemConfig::default()).expect("network")
}

async fn next(events: &mut MemEvents) -> TransportEvent {
    tokio::time::timeout(GUARD, events.recv()).await.expect("an event in time").expect("the stream is open")
}

/// Every event queued now.
fn drain(events: &mut MemEvents) -> Vec<TransportEvent> {
    std::iter::from_fn(|| events.try_recv()).collect()
}

/// The texts of the messages among `events`, from `peer`.
fn texts(events: &[TransportEvent], peer: u32) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            TransportEvent::Message { peer: p, frame } if *p == peer => Some(text(frame)),
            _ => None,
        })
        .collect()
}

/// An event without its address or message body: comparable across runs and transports.
fn describe(event: &TransportEvent) -> String {
    match event {
        TransportEvent::PeerUp { peer, .. } => format!("up {peer}"),
        TransportEvent::PeerDown { peer, reason } => format!("down {peer}: {reason}"),
        TransportEvent::Message { peer, frame } => format!("message {peer}: {}", text(frame)),
        TransportEvent::BadFrame { peer, code, .. } => format!("bad frame {peer}: {code:#x}"),
        TransportEvent::Rejected { peer, code, .. } => format!("rejected {peer:?}: {code:#x}"),
        other => format!("{other:?}"),
    }
}

/// Moves the paused clock on by `ms`.
async fn advance(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn peer_up_on_both_sides_then_messages_in_order_then_peer_down_and_up_again() {
    let net = network(1);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    assert_eq!(a.local_addr(), "10.0.0.0:7000".parse::<SocketAddr>().unwrap());

    assert_eq!(a.connect(net.addr_of(1), Some(1)).await.expect("connect"), 1);
    // Queued before connect returned, as with QUIC.
    match a_events.try_recv() {
        Some(TransportEvent::PeerUp { peer: 1, addr }) => assert_eq!(addr, net.addr_of(1)),
        other => panic!("expected PeerUp from 1, got {other:?}"),
    }
    assert!(matches!(next(&mut b_events).await, TransportEvent::PeerUp { peer: 0, .. }));
    let (a_info, b_info) = (a.peer_info(1).expect("a knows b"), b.peer_info(0).expect("b knows a"));
    assert_eq!((a_info.dialled_by, b_info.dialled_by), (0, 0));
    assert_eq!((a_info.incarnation, b_info.incarnation), (b.incarnation(), a.incarnation()));
    assert_eq!((a.peers(), b.peers()), (vec![1], vec![0]));

    for i in 0..5 {
        a.send(1, frame(&format!("m{i}"))).expect("send");
    }
    net.settled().await;
    let got = drain(&mut b_events);
    assert_eq!(texts(&got, 0), ["m0", "m1", "m2", "m3", "m4"], "{got:?}");

    // Dialling a live peer, either way, reuses the connection and reports nothing.
    assert_eq!(a.connect(net.addr_of(1), None).await.expect("again"), 1);
    assert_eq!(b.connect(net.addr_of(0), Some(0)).await.expect("back"), 0);
    net.settled().await;
    assert!(drain(&mut a_events).is_empty() && drain(&mut b_events).is_empty());
    assert_eq!(net.stats().connections, 1);

    // A shutdown: PeerDown on both sides with the shutdown code; a's stream ends.
    a.shutdown().await;
    let TransportEvent::PeerDown { peer: 1, reason } = next(&mut a_events).await else { panic!("a: PeerDown") };
    assert!(reason.starts_with("closed by this node with code 0x200"), "{reason}");
    assert!(a_events.recv().await.is_none());
    let TransportEvent::PeerDown { peer: 0, reason } = next(&mut b_events).await else { panic!("b: PeerDown") };
    assert!(reason.starts_with("closed by the peer with code 0x200 (shutdown)"), "{reason}");
    assert!(matches!(a.send(1, frame("late")), Err(SendError::NotConnected { peer: 1 })));
    assert!(matches!(a.connect(net.addr_of(1), None).await, Err(ConnectError::ShuttingDown { node: 0 })));

    // Back as a new incarnation: PeerUp again, frames flow again.
    let (a2, mut a2_events) = net.restart(0).expect("restart");
    assert_ne!(a2.incarnation(), a.incarnation());
    assert_eq!(a2.connect(b.local_addr(), Some(1)).await.expect("reconnect"), 1);
    assert!(matches!(next(&mut a2_events).await, TransportEvent::PeerUp { peer: 1, .. }));
    assert!(matches!(next(&mut b_events).await, TransportEvent::PeerUp { peer: 0, .. }));
    assert_eq!(b.peer_info(0).expect("b knows a2").incarnation, a2.incarnation());
    b.send(0, frame("welcome back")).expect("send");
    assert_eq!(texts(&[next(&mut a2_events).await], 1), ["welcome back"]);
    assert_eq!(net.stats().connections, 2);
}

#[tokio::test(start_paused = true)]
async fn two_nodes_dialling_each_other_at_once_keep_one_connection() {
    let net = network(2);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    net.set_default_link(LinkFaults::none().delay(Duration::from_millis(5), Duration::from_millis(5))).expect("set");
    let (ab, ba) = tokio::join!(a.connect(net.addr_of(1), None), b.connect(net.addr_of(0), None));
    assert_eq!((ab.expect("a dials"), ba.expect("b dials")), (1, 0));
    net.settled().await;
    let (a_seen, b_seen) = (drain(&mut a_events), drain(&mut b_events));
    assert_eq!(a_seen.iter().map(describe).collect::<Vec<_>>(), ["up 1"]);
    assert_eq!(b_seen.iter().map(describe).collect::<Vec<_>>(), ["up 0"]);
    assert_eq!(net.stats().connections, 1);
}

/// A run with every fault at once: three nodes, lossy, duplicating, jittery links, a crash
/// and a restart. Returns the network's trace, what each node saw (with virtual times) and
/// the counters.
async fn faulty_run(seed: u64) -> (Vec<TraceEntry>, Vec<(Duration, u32, String)>, NetStats) {
    let net = network(seed);
    let faults = LinkFaults::none().loss(0.2).duplicate(0.2).delay(Duration::from_millis(1), Duration::from_millis(20));
    net.set_default_link(faults).expect("faults");
    let (mut nodes, mut events): (Vec<_>, Vec<_>) = (0..3).map(|id| net.add_node(id).expect("node")).unzip();
    nodes[0].connect(net.addr_of(1), Some(1)).await.expect("0-1");
    nodes[0].connect(net.addr_of(2), Some(2)).await.expect("0-2");
    nodes[1].connect(net.addr_of(2), Some(2)).await.expect("1-2");
    let mut seen = Vec::new();
    for round in 0..10 {
        if round == 4 {
            net.crash(2).expect("crash");
        }
        if round == 6 {
            let (t, e) = net.restart(2).expect("restart");
            (nodes[2], events[2]) = (t, e);
            nodes[2].connect(net.addr_of(0), Some(0)).await.expect("2-0");
        }
        for i in 0..10 {
            for (from, to) in [(0, 1), (0, 2), (1, 2), (2, 0)] {
                let _ = nodes[from].send(to, frame(&format!("{from}->{to} #{round}.{i}")));
            }
        }
        net.settled().await;
        for (id, stream) in events.iter_mut().enumerate() {
            for event in drain(stream) {
                seen.push((net.elapsed(), id as u32, describe(&event)));
            }
        }
    }
    (net.trace(), seen, net.stats())
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_delivery_trace() {
    let (trace, seen, stats) = faulty_run(7).await;
    let (again_trace, again_seen, again_stats) = faulty_run(7).await;
    assert!(trace.len() > 300, "a trace of every frame: {}", trace.len());
    assert_eq!(trace, again_trace, "seed 7, run twice");
    assert_eq!(seen, again_seen);
    assert_eq!(stats, again_stats);
    // Every fault of the run happened, and left its mark in the counters.
    let f = stats.frames;
    for (counter, value) in
        [("lost", f.lost), ("duplicated", f.duplicated), ("reordered", f.reordered), ("dropped", f.dropped)]
    {
        assert!(value > 0, "{counter} is 0: {stats}");
    }
    assert_eq!(f.sent + f.duplicated, f.delivered + f.lost + f.cut + f.dropped + f.bad_frames, "{stats}");
    assert_eq!((stats.crashes, stats.restarts), (1, 1));
    let (other_trace, ..) = faulty_run(8).await;
    assert_ne!(trace, other_trace, "another seed, another run");
}

#[tokio::test(start_paused = true)]
async fn loss_drops_frames_on_one_direction_only_and_counts_them() {
    let net = network(3);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    net.set_link(0, 1, LinkFaults::none().loss(1.0)).expect("loss");
    for i in 0..20 {
        a.send(1, frame(&format!("lost {i}"))).expect("a send is accepted even if the link loses it");
        b.send(0, frame(&format!("kept {i}"))).expect("send");
    }
    net.settled().await;
    assert!(texts(&drain(&mut b_events), 0).is_empty());
    assert_eq!(texts(&drain(&mut a_events), 1).len(), 20);
    let lossy = net.link_stats(0, 1);
    assert_eq!((lossy.sent, lossy.lost, lossy.delivered), (20, 20, 0));
    assert_eq!(net.link_stats(1, 0).delivered, 20);

    net.set_link(0, 1, LinkFaults::none().loss(0.5)).expect("half");
    let mut arrived = 0;
    // In batches that the in-flight limit (64 frames until b takes them) lets through.
    for batch in 0..4 {
        for i in 0..50 {
            a.send(1, frame(&format!("maybe {batch}.{i}"))).expect("send");
        }
        net.settled().await;
        arrived += texts(&drain(&mut b_events), 0).len() as u64;
    }
    let lossy = net.link_stats(0, 1);
    assert_eq!(lossy.lost - 20 + arrived, 200, "{lossy}");
    assert!((50..150).contains(&arrived), "half of 200 arrive, give or take: {arrived}");
    assert!(matches!(
        net.set_link(0, 1, LinkFaults::none().loss(1.5)),
        Err(MemError::Probability { link: Some((0, 1)), field: "loss", .. })
    ));
    let err = net.set_default_link(LinkFaults::none().duplicate(-0.1)).expect_err("a negative probability");
    assert_eq!(err.to_string(), "default link: duplicate probability -0.1 is not within 0..=1");
}

#[tokio::test(start_paused = true)]
async fn duplication_delivers_frames_twice_and_counts_the_copies() {
    let net = network(4);
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let (_b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    net.set_link(0, 1, LinkFaults::none().duplicate(1.0)).expect("duplicate");
    for i in 0..10 {
        a.send(1, frame(&format!("d{i}"))).expect("send");
    }
    net.settled().await;
    let mut got = texts(&drain(&mut b_events), 0);
    got.sort();
    let mut want: Vec<String> = (0..10).flat_map(|i| [format!("d{i}"), format!("d{i}")]).collect();
    want.sort();
    assert_eq!(got, want);
    let stats = net.link_stats(0, 1);
    assert_eq!((stats.sent, stats.duplicated, stats.delivered), (10, 10, 20));
}

#[tokio::test(start_paused = true)]
async fn jitter_reorders_frames_and_the_counter_says_how_often() {
    let net = network(5);
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let (_b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    net.set_link(0, 1, LinkFaults::none().delay(Duration::from_millis(1), Duration::from_millis(50))).expect("jitter");
    for i in 0..50 {
        a.send(1, frame(&i.to_string())).expect("send");
    }
    net.settled().await;
    let order: Vec<u64> = texts(&drain(&mut b_events), 0).iter().map(|t| t.parse().expect("a number")).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "each frame exactly once");
    assert_ne!(order, sorted, "reordered");
    let behind =
        order.iter().scan(0, |highest, &n| Some(std::mem::replace(highest, n.max(*highest)) > n)).filter(|b| *b);
    assert_eq!(net.link_stats(0, 1).reordered, behind.count() as u64);
    // The other direction keeps its own (perfect) link.
    assert_eq!(net.link_stats(1, 0), Default::default());
}

#[tokio::test(start_paused = true)]
async fn an_asymmetric_cut_loses_one_direction_and_ends_in_idle_timeouts() {
    let net = network(6);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    next(&mut a_events).await;
    next(&mut b_events).await;

    net.cut(0, 1);
    let cut_at = net.elapsed();
    for i in 0..5 {
        a.send(1, frame(&format!("into the void {i}"))).expect("send");
        b.send(0, frame(&format!("gets through {i}"))).expect("send");
    }
    net.settled().await;
    assert!(drain(&mut b_events).is_empty());
    assert_eq!(texts(&drain(&mut a_events), 1).len(), 5);
    assert_eq!((net.link_stats(0, 1).cut, net.link_stats(1, 0).delivered), (5, 5));

    // b hears nothing from a: its idle timer runs out first. a still hears b until b's end
    // is gone, then its own runs out.
    let TransportEvent::PeerDown { peer: 0, reason } = next(&mut b_events).await else { panic!("b: PeerDown") };
    assert!(reason.starts_with("idle timeout"), "{reason}");
    assert_eq!(net.elapsed() - cut_at, IDLE);
    let TransportEvent::PeerDown { peer: 1, reason } = next(&mut a_events).await else { panic!("a: PeerDown") };
    assert!(reason.starts_with("idle timeout"), "{reason}");
    assert_eq!(net.elapsed() - cut_at, IDLE * 2);
    assert_eq!(net.stats().idle_timeouts, 2);

    // A dial across the cut times out like a QUIC handshake...
    let dialled_at = net.elapsed();
    match b.connect(net.addr_of(0), Some(0)).await {
        Err(ConnectError::Handshake { source: quinn::ConnectionError::TimedOut, .. }) => {}
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert_eq!(net.elapsed() - dialled_at, IDLE);
    // ...and one that is still waiting when the link heals completes.
    let dial = tokio::spawn({
        let b = b.clone();
        let addr = net.addr_of(0);
        async move { b.connect(addr, Some(0)).await }
    });
    advance(500).await;
    net.heal(0, 1);
    assert_eq!(dial.await.expect("dial task").expect("connect after the heal"), 0);
    assert!(matches!(next(&mut a_events).await, TransportEvent::PeerUp { peer: 1, .. }));
    assert!(matches!(next(&mut b_events).await, TransportEvent::PeerUp { peer: 0, .. }));
}

#[tokio::test(start_paused = true)]
async fn a_cut_shorter_than_the_idle_timeout_keeps_the_connection() {
    let net = network(7);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (_b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    net.settled().await;
    drain(&mut a_events);
    drain(&mut b_events);

    net.isolate(0);
    advance(DEFAULT_IDLE_TIMEOUT_MS - 1).await;
    net.heal_all();
    a.send(1, frame("after the cut")).expect("send");
    advance(3 * DEFAULT_IDLE_TIMEOUT_MS).await;
    assert_eq!(texts(&drain(&mut b_events), 0), ["after the cut"]);
    assert!(drain(&mut a_events).is_empty(), "no PeerDown");
    assert_eq!(net.stats().idle_timeouts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dial_waits_for_a_node_that_starts_later_and_times_out_on_one_that_never_does() {
    let net = network(8);
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let dial = tokio::spawn({
        let a = a.clone();
        let addr = net.addr_of(5);
        async move { a.connect(addr, None).await }
    });
    advance(1_000).await;
    let (_late, mut late_events) = net.add_node(5).expect("node 5");
    assert_eq!(dial.await.expect("dial task").expect("connected once node 5 runs"), 5);
    assert!(matches!(next(&mut late_events).await, TransportEvent::PeerUp { peer: 0, .. }));

    let dialled_at = net.elapsed();
    match a.connect(net.addr_of(6), None).await {
        Err(ConnectError::Handshake { source: quinn::ConnectionError::TimedOut, .. }) => {}
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert_eq!(net.elapsed() - dialled_at, IDLE);
}

#[tokio::test(start_paused = true)]
async fn a_paused_node_gets_its_frames_on_resume_and_its_sends_are_held() {
    let net = network(9);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    next(&mut a_events).await;
    next(&mut b_events).await;

    net.pause(1).expect("pause");
    for i in 0..5 {
        a.send(1, frame(&format!("to b {i}"))).expect("send");
    }
    for i in 0..3 {
        b.send(0, frame(&format!("from b {i}"))).expect("a paused node's send is held, not refused");
    }
    net.settled().await;
    assert!(drain(&mut b_events).is_empty() && drain(&mut a_events).is_empty());
    assert_eq!((net.link_stats(0, 1).held_by_pause, net.link_stats(1, 0).held_by_pause), (5, 3));
    assert_eq!(net.stats().frames.delivered, 0);

    net.resume(1).expect("resume");
    net.settled().await;
    assert_eq!(texts(&drain(&mut b_events), 0), ["to b 0", "to b 1", "to b 2", "to b 3", "to b 4"]);
    assert_eq!(texts(&drain(&mut a_events), 1), ["from b 0", "from b 1", "from b 2"]);

    // Paused past the idle timeout: a gives up on b; b, whose timers stood still, only
    // notices once it resumes and hears nothing, an idle timeout later.
    net.pause(1).expect("pause again");
    let paused_at = net.elapsed();
    let TransportEvent::PeerDown { peer: 1, reason } = next(&mut a_events).await else { panic!("a: PeerDown") };
    assert!(reason.starts_with("idle timeout"), "{reason}");
    assert_eq!(net.elapsed() - paused_at, IDLE);
    advance(10_000).await;
    assert!(drain(&mut b_events).is_empty(), "a paused node's timers stand still");
    net.resume(1).expect("resume");
    let resumed_at = net.elapsed();
    let TransportEvent::PeerDown { peer: 0, reason } = next(&mut b_events).await else { panic!("b: PeerDown") };
    assert!(reason.starts_with("idle timeout"), "{reason}");
    assert_eq!(net.elapsed() - resumed_at, IDLE);
    assert_eq!(net.stats().pauses, 2);
}

/// A probe of a crashed node is refused by its host (`PeerGone` after a round trip), long
/// before the idle timeout; a paused node, a running one or one behind a cut answers nothing.
#[tokio::test(start_paused = true)]
async fn a_probe_of_a_crashed_node_is_refused_and_one_of_a_paused_or_cut_off_node_is_not() {
    let net = network(11);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (_b, _b_events) = net.add_node(1).expect("node 1");
    let (_c, _c_events) = net.add_node(2).expect("node 2");
    a.connect(net.addr_of(1), Some(1)).await.expect("0-1");
    a.connect(net.addr_of(2), Some(2)).await.expect("0-2");
    net.settled().await;
    drain(&mut a_events);

    // Running, then paused: the probe is dropped by the process (its socket takes it).
    a.probe(1);
    net.settled().await;
    net.pause(1).expect("pause");
    a.probe(1);
    net.settled().await;
    assert!(drain(&mut a_events).is_empty());
    net.resume(1).expect("resume");

    // Crashed: refused after a round trip.
    net.crash(1).expect("crash");
    let crashed_at = net.elapsed();
    a.probe(1);
    let TransportEvent::PeerGone { peer: 1, addr } = next(&mut a_events).await else { panic!("a: PeerGone") };
    assert_eq!(addr, net.addr_of(1));
    assert!(net.elapsed() - crashed_at < IDLE, "answered before the idle timeout");

    // Crashed behind a cut: the refusal cannot come back.
    net.cut(2, 0);
    net.crash(2).expect("crash");
    a.probe(2);
    net.settled().await;
    assert!(drain(&mut a_events).iter().all(|e| !matches!(e, TransportEvent::PeerGone { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_crashed_node_is_reported_down_and_comes_back_as_a_new_incarnation() {
    let net = network(10);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    let (c, mut c_events) = net.add_node(2).expect("node 2");
    a.connect(net.addr_of(1), Some(1)).await.expect("0-1");
    a.connect(net.addr_of(2), Some(2)).await.expect("0-2");
    net.settled().await;
    drain(&mut a_events);
    drain(&mut c_events);

    // Crashed: its stream ends at once, its handles are dead, its peers notice after their
    // idle timeout (nothing closes the connection).
    b.send(0, frame("in flight when b dies")).expect("send");
    net.crash(1).expect("crash");
    let crashed_at = net.elapsed();
    assert!(b_events.recv().await.is_none());
    assert!(matches!(b.send(0, frame("from the grave")), Err(SendError::NotConnected { .. })));
    assert!(matches!(b.connect(net.addr_of(0), None).await, Err(ConnectError::ShuttingDown { node: 1 })));
    assert!(matches!(net.crash(1), Err(MemError::NodeNotRunning { node: 1 })));
    let TransportEvent::Message { peer: 1, .. } = next(&mut a_events).await else { panic!("the frame on the wire") };
    let TransportEvent::PeerDown { peer: 1, reason } = next(&mut a_events).await else { panic!("a: PeerDown") };
    assert!(reason.starts_with("idle timeout"), "{reason}");
    assert_eq!(net.elapsed() - crashed_at, IDLE);

    let (b2, mut b2_events) = net.restart(1).expect("restart");
    assert!(matches!(net.add_node(1), Err(MemError::NodeRunning { node: 1, .. })));
    assert_ne!(b2.incarnation(), b.incarnation());
    b2.connect(net.addr_of(0), Some(0)).await.expect("b2 dials a");
    assert!(matches!(next(&mut a_events).await, TransportEvent::PeerUp { peer: 1, .. }));
    assert!(matches!(next(&mut b2_events).await, TransportEvent::PeerUp { peer: 0, .. }));
    assert_eq!(a.peer_info(1).expect("b2").incarnation, b2.incarnation());

    // A node that restarts and dials before its peers time out supersedes its old
    // connection at once: PeerDown then PeerUp, as QUIC reports a restart.
    net.crash(2).expect("crash 2");
    let (c2, _c2_events) = net.restart(2).expect("restart 2");
    let restarted_at = net.elapsed();
    c2.connect(net.addr_of(0), Some(0)).await.expect("c2 dials a");
    let TransportEvent::PeerDown { peer: 2, reason } = next(&mut a_events).await else { panic!("a: PeerDown 2") };
    assert!(reason.starts_with("node restarted"), "{reason}");
    assert!(matches!(next(&mut a_events).await, TransportEvent::PeerUp { peer: 2, .. }));
    assert!(net.elapsed() - restarted_at < IDLE);
    drop(c);
    let stats = net.stats();
    assert_eq!((stats.crashes, stats.restarts), (2, 2));
}

/// A member sends `bytes` on its connection; what each side sees.
async fn bad_stream(bytes: Vec<u8>) -> (Vec<String>, Vec<String>, u64) {
    let net = network(11);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    let (c, _c_events) = net.add_node(2).expect("node 2");
    a.connect(net.addr_of(1), Some(1)).await.expect("0-1");
    c.connect(net.addr_of(1), Some(1)).await.expect("2-1");
    a.send(1, frame("good")).expect("send");
    net.inject(0, 1, bytes).expect("inject");
    net.settled().await;
    let seen_by_b = drain(&mut b_events).iter().map(describe).collect();
    let seen_by_a = drain(&mut a_events).iter().map(describe).collect();
    // Only that connection closed.
    assert_eq!(b.peers(), [2]);
    assert_eq!(b.stats().bad_frames, 1);
    (seen_by_b, seen_by_a, net.stats().frames.bad_frames)
}

#[tokio::test(start_paused = true)]
async fn a_bad_frame_closes_that_link_with_the_codec_code_and_a_bad_frame_event() {
    let limits = Limits::default();
    let good = frame("fine");
    let oversized = [&(limits.max_frame_bytes + 1).to_le_bytes()[..], &[0u8; 16]].concat();
    let mut foreign = good.clone();
    foreign[PREFIX_BYTES..PREFIX_BYTES + 2].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    let trailing = [&good[..], &[0]].concat();
    let truncated = good[..good.len() - 1].to_vec();
    for (bytes, code) in [
        (oversized, DecodeError::CODE_OVERSIZE),
        (foreign, DecodeError::CODE_UNSUPPORTED_VERSION),
        (trailing, codes::STREAM_FRAMING),
        (truncated, DecodeError::CODE_TRUNCATED),
    ] {
        let (b_saw, a_saw, bad_frames) = bad_stream(bytes).await;
        let name = codes::name(code);
        assert_eq!(b_saw.len(), 6, "{b_saw:?}");
        assert_eq!(b_saw[..2], ["up 0", "up 2"]);
        assert_eq!(b_saw[2], "message 0: good", "frames before the bad one are delivered first");
        assert_eq!(b_saw[3..5], [format!("bad frame 0: {code:#x}"), format!("rejected Some(0): {code:#x}")]);
        assert!(
            b_saw[5].starts_with(&format!("down 0: closed by this node with code {code:#x} ({name})")),
            "{b_saw:?}"
        );
        assert_eq!(a_saw.len(), 2, "{a_saw:?}");
        assert!(a_saw[1].starts_with(&format!("down 1: closed by the peer with code {code:#x} ({name})")), "{a_saw:?}");
        assert_eq!(bad_frames, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn send_refuses_what_the_quic_transport_refuses() {
    let limits = Limits { max_frame_bytes: 1024, ..Limits::default() };
    let mut config = MemConfig::default().with_limits(limits);
    config.recv_budget_bytes_per_peer = 2048;
    let net = MemNetwork::new(12, config).expect("network");
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let (_b, _b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");

    let mut wrong_prefix = frame("x");
    wrong_prefix[0] += 1;
    assert!(matches!(a.send(1, wrong_prefix), Err(SendError::LengthMismatch { peer: 1, .. })));
    let too_big = encode(&"big", &[0.0; 300], &Limits::default()).expect("encode");
    match a.send(1, too_big) {
        Err(SendError::InvalidFrame { peer: 1, source }) => {
            assert_eq!(source.reason_code(), DecodeError::CODE_OVERSIZE)
        }
        other => panic!("expected InvalidFrame, got {other:?}"),
    }
    assert!(matches!(a.send(7, frame("nobody")), Err(SendError::NotConnected { peer: 7 })));
    assert!(matches!(
        a.connect(net.addr_of(0), None).await,
        Err(ConnectError::Refused { code: codes::SELF_CONNECT, .. })
    ));
    assert!(matches!(a.connect(net.addr_of(0), Some(0)).await, Err(ConnectError::SelfConnect { node: 0 })));
    assert!(matches!(
        a.connect(net.addr_of(1), Some(5)).await,
        Err(ConnectError::Refused { peer: Some(1), code: codes::ID_MISMATCH, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_receive_budget_refuses_sends_with_busy_until_the_receiver_is_done_with_frames() {
    let limits = Limits { max_frame_bytes: 1024, ..Limits::default() };
    let mut config = MemConfig::default().with_limits(limits);
    config.recv_budget_bytes_per_peer = 2048;
    let net = MemNetwork::new(13, config).expect("network");
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let (_b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    let block = encode(&"block", &[0.0; 150], &limits).expect("encode");
    assert!((600..700).contains(&block.len()));

    // Three fit in 2048 bytes; they stay charged while b has not received them.
    for _ in 0..3 {
        a.send(1, block.clone()).expect("within the budget");
    }
    net.settled().await;
    assert!(matches!(a.send(1, block.clone()), Err(SendError::Busy { peer: 1, in_flight: 3 })));
    assert_eq!(net.link_stats(0, 1).busy, 1);
    assert!(matches!(next(&mut b_events).await, TransportEvent::PeerUp { peer: 0, .. }));
    let held = next(&mut b_events).await;
    assert!(matches!(&held, TransportEvent::Message { peer: 0, frame } if frame.holds_budget()), "{held:?}");
    // Taken but not done with: still charged.
    assert!(matches!(a.send(1, block.clone()), Err(SendError::Busy { peer: 1, in_flight: 3 })));
    drop(held);
    a.send(1, block.clone()).expect("room again once b dropped it");
    net.settled().await;

    // A node that drops its event stream takes nothing: what it held is released, what
    // arrives later is dropped, and the sender is never stuck on a budget nobody frees.
    drop(b_events);
    for _ in 0..10 {
        a.send(1, block.clone()).expect("nothing stays charged");
        net.settled().await;
    }
    let stats = net.link_stats(0, 1);
    assert_eq!((stats.delivered, stats.dropped), (4, 10), "{stats}");

    // The frame count is bounded too.
    let mut config = MemConfig::default();
    config.max_inflight_sends_per_peer = 2;
    let net = MemNetwork::new(14, config).expect("network");
    let (a, _a_events) = net.add_node(0).expect("node 0");
    let (_b, _b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    a.send(1, frame("1")).expect("1");
    a.send(1, frame("2")).expect("2");
    assert!(matches!(a.send(1, frame("3")), Err(SendError::Busy { peer: 1, in_flight: 2 })));
    let mut config = MemConfig::default();
    config.recv_budget_bytes_per_peer = 10;
    assert!(matches!(
        MemNetwork::new(1, config),
        Err(MemError::InvalidConfig { field: "recv_budget_bytes_per_peer", .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn reject_and_revocation_close_the_connection_as_with_quic() {
    let net = network(15);
    let (a, mut a_events) = net.add_node(0).expect("node 0");
    let (b, mut b_events) = net.add_node(1).expect("node 1");
    a.connect(net.addr_of(1), Some(1)).await.expect("connect");
    net.settled().await;
    drain(&mut a_events);
    drain(&mut b_events);

    b.reject(0, 0x300, "undecodable header");
    net.settled().await;
    let b_saw: Vec<String> = drain(&mut b_events).iter().map(describe).collect();
    assert_eq!(
        b_saw,
        ["rejected Some(0): 0x300", "down 0: closed by this node with code 0x300 (application): undecodable header"]
    );
    let a_saw: Vec<String> = drain(&mut a_events).iter().map(describe).collect();
    assert_eq!(a_saw, ["down 1: closed by the peer with code 0x300 (application): undecodable header"]);
    assert_eq!(b.stats().rejected_with(0x300), 1);

    // Revoking node 0 closes its live connection at once and refuses it from then on.
    a.connect(net.addr_of(1), Some(1)).await.expect("reconnect");
    net.settled().await;
    drain(&mut a_events);
    drain(&mut b_events);
    b.set_revocations(Revocations::new([Revoked::Node(0)]));
    net.settled().await;
    let b_saw: Vec<String> = drain(&mut b_events).iter().map(describe).collect();
    assert_eq!(b_saw[0], "rejected Some(0): 0x20c");
    assert!(matches!(next(&mut a_events).await, TransportEvent::PeerDown { peer: 1, .. }));
    match a.connect(net.addr_of(1), Some(1)).await {
        Err(ConnectError::Lost { peer: 1, reason, .. }) => assert!(reason.contains("0x20c (revoked)"), "{reason}"),
        other => panic!("expected the revoked node to be refused, got {other:?}"),
    }
}

// ---- one node loop, two transports ----------------------------------------------------

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Ping(u32),
    Pong(u32),
}

/// A node loop in miniature, written against `api::Transport` only: it dials in a spawned
/// task (as the runtime's node loop dials seeds), plays `rounds` of ping-pong, then the
/// dialler sends a frame the other cannot decode, which rejects it with the decoder's code.
/// Returns what it saw.
async fn ping_pong<T: api::Transport>(
    transport: T,
    mut events: T::Events,
    dial: Option<SocketAddr>,
    rounds: u32,
) -> Vec<String> {
    let limits = Limits::default();
    transport.set_revocations(Revocations::default());
    if let Some(addr) = dial {
        let dialler = transport.clone();
        tokio::spawn(async move { dialler.connect(addr, None).await });
    }
    let send = |peer: u32, msg: &Msg| transport.send(peer, encode(msg, &[], &limits).expect("encode")).expect("send");
    let mut log = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            TransportEvent::PeerUp { peer, .. } => {
                let info = transport.peer_info(peer).expect("a live peer");
                log.push(format!("up {peer}, dialled by {}", info.dialled_by));
                if dial.is_some() {
                    send(peer, &Msg::Ping(0));
                }
            }
            TransportEvent::Message { peer, frame } => match frame.decode::<Msg>(&limits).0 {
                Ok(frame) => {
                    log.push(format!("{:?} from {peer}", frame.header));
                    match frame.header {
                        Msg::Ping(n) => send(peer, &Msg::Pong(n)),
                        Msg::Pong(n) if n + 1 < rounds => send(peer, &Msg::Ping(n + 1)),
                        Msg::Pong(_) => {
                            let garbage = encode(&"not a Msg", &[], &limits).expect("encode");
                            transport.send(peer, garbage).expect("send");
                        }
                    }
                }
                Err(e) => {
                    log.push(format!("undecodable from {peer}: {:#x}", e.reason_code()));
                    transport.reject(peer, e.reason_code(), &e.to_string());
                }
            },
            TransportEvent::PeerDown { peer, reason } => {
                log.push(format!("down {peer}: {reason}"));
                break;
            }
            other => log.push(describe(&other)),
        }
    }
    transport.shutdown().await;
    log
}

async fn run_pair<T: api::Transport>(a: (T, T::Events), b: (T, T::Events), rounds: u32) -> (Vec<String>, Vec<String>) {
    let addr = b.0.local_addr();
    let listener = tokio::spawn(ping_pong(b.0, b.1, None, rounds));
    let dialler = tokio::spawn(ping_pong(a.0, a.1, Some(addr), rounds));
    let run = async { (dialler.await.expect("dialler"), listener.await.expect("listener")) };
    tokio::time::timeout(support::HANG_GUARD, run).await.expect("both loops end")
}

#[tokio::test]
async fn one_generic_node_loop_runs_over_quic_and_mem_with_the_same_result() {
    support::init_tracing();
    const ROUNDS: u32 = 5;
    let dir = support::cluster(2);
    let quic = run_pair(support::node(dir.path(), 0).await, support::node(dir.path(), 1).await, ROUNDS).await;

    let net = network(16);
    let mem = run_pair(net.add_node(0).expect("node 0"), net.add_node(1).expect("node 1"), ROUNDS).await;

    assert_eq!(mem, quic);
    let (dialler, listener) = mem;
    assert_eq!(dialler.len(), ROUNDS as usize + 2, "{dialler:?}");
    assert_eq!(dialler[0], "up 1, dialled by 0");
    assert!(dialler[ROUNDS as usize + 1].starts_with("down 1: closed by the peer with code 0x106 (bad header)"));
    assert_eq!(listener[0], "up 0, dialled by 0");
    assert_eq!(listener[ROUNDS as usize + 1], "undecodable from 0: 0x106");
    assert_eq!(listener[ROUNDS as usize + 2], "rejected Some(0): 0x106");
    assert!(listener[ROUNDS as usize + 3].starts_with("down 0: closed by this node with code 0x106"));
}
