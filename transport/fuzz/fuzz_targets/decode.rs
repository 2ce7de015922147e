//! Arbitrary bytes into `FrameDecoder`, in arbitrary chunks: it must never panic, never hold
//! more than one frame plus one push, and stay poisoned after an error. `decode` gets the
//! same bytes as a prefix-less frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phalanx_transport::codec::PREFIX_BYTES;
use phalanx_transport::{decode, Frame, FrameDecoder, Limits};
use serde::Deserialize;

/// A small header enum in the shape of Phalanx's control messages.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
enum Header {
    Hello { node: u64, name: String },
    Heartbeat(u64),
    Gradient { job: String, membership_epoch: u64, step: u64, partition: u32 },
    Bye,
}

/// Small limits so the fuzzer reaches every limit quickly.
const LIMITS: Limits = Limits { max_frame_bytes: 4096, max_header_bytes: 256 };

fn check_frame(frame: &Frame<Header>) {
    assert!(frame.tensor.len() * 4 <= LIMITS.max_frame_bytes as usize);
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the fuzzer also explores how frames are split.
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);

    if let Ok(frame) = decode::<Header>(bytes, &LIMITS) {
        check_frame(&frame);
    }

    let mut decoder = FrameDecoder::new(LIMITS);
    for piece in bytes.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame::<Header>() {
                Ok(Some(frame)) => check_frame(&frame),
                Ok(None) => break,
                Err(err) => {
                    assert_eq!(decoder.buffered(), 0);
                    decoder.push(piece);
                    let again = decoder.next_frame::<Header>().expect_err("poisoned decoder");
                    assert_eq!(again.reason_code(), err.reason_code());
                    return;
                }
            }
        }
        assert!(decoder.buffered() < PREFIX_BYTES + LIMITS.max_frame_bytes as usize);
    }
});
