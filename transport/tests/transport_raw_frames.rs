//! Fault injection (`--features fault-injection`): a member that writes frames exactly as it
//! likes with `Transport::send_raw`, as the chaos harness's rogue member does. Frames it has
//! seen acknowledged are delivered even when the oversized frame it sends next makes the
//! receiver close the connection; the receiver reports that frame as a `BadFrame`.
#![cfg(feature = "fault-injection")]

mod support;

use phalanx_transport::{encode, DecodeError, Limits, TransportEvent};
use support::*;

/// Frames of a round before its oversized frame.
const FRAMES: u32 = 8;

#[tokio::test]
async fn acknowledged_raw_frames_arrive_before_the_oversized_frame_closes_the_connection() {
    init_tracing();
    let dir = cluster(2);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let (rogue, _rogue_events) = node(dir.path(), 1).await;
    rogue.connect(server.local_addr(), Some(0)).await.expect("connect");
    wait_peer_up(&mut server_events, 1).await;

    let limits = Limits::default();
    let sends: Vec<_> = (0..FRAMES)
        .map(|i| {
            let frame = encode(&format!("forged {i}"), &[i as f32], &limits).expect("encode");
            rogue.send_raw(0, frame).expect("handed to the transport")
        })
        .collect();
    for send in sends {
        assert_eq!(send.peer(), 0);
        send.acknowledged().await.expect("acknowledged by node 0");
    }
    // A length prefix one above the receiver's limit, and a few bytes of body.
    let oversized = [&(limits.max_frame_bytes + 1).to_le_bytes()[..], &[0u8; 16]].concat();
    let _ = rogue.send_raw(0, oversized).expect("handed to the transport");

    let (bad, before) =
        wait_for(&mut server_events, "BadFrame", |e| matches!(e, TransportEvent::BadFrame { .. })).await;
    let TransportEvent::BadFrame { peer, code, reason } = bad else { unreachable!() };
    assert_eq!((peer, code), (1, DecodeError::CODE_OVERSIZE), "{reason}");
    // Every acknowledged frame is delivered, before the PeerDown of the closed connection.
    let (_, rest) = wait_for(&mut server_events, "PeerDown", |e| matches!(e, TransportEvent::PeerDown { .. })).await;
    let mut got: Vec<String> = before
        .iter()
        .chain(&rest)
        .filter_map(|e| match e {
            TransportEvent::Message { peer: 1, frame } => {
                Some(phalanx_transport::decode::<String>(&frame.to_vec(), &limits).expect("decode").header)
            }
            _ => None,
        })
        .collect();
    got.sort();
    let want: Vec<String> = (0..FRAMES).map(|i| format!("forged {i}")).collect();
    assert_eq!(got, want);
    assert_eq!(server.stats().bad_frames, 1);
    assert_eq!(server.stats().rejected_with(DecodeError::CODE_OVERSIZE), 1);
    rogue.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_raw_frame_to_a_peer_without_a_connection_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let (rogue, _events) = node(dir.path(), 1).await;
    let e = rogue.send_raw(0, vec![0; 4]).expect_err("no connection to node 0");
    assert!(matches!(e, phalanx_transport::SendError::NotConnected { peer: 0 }), "{e}");
}
