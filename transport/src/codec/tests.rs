//! Tests of the codec as its users see it: frames built by `encode` and read back by
//! `decode` and `FrameDecoder`, plus hand-made bad frames for every error.

mod peak_alloc;

use std::time::Instant;

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::*;
use crate::frame::{OutFrame, TensorBytes};
use peak_alloc::largest_allocation_during;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct GradientHeader {
    job: String,
    membership_epoch: u64,
    step: u64,
    partition: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Control {
    Hello { node: u64, name: String },
    Heartbeat(u64),
    Gradient(GradientHeader),
    Bye,
}

/// `Control` as a newer peer might know it: one variant more.
#[derive(Serialize)]
enum ControlWithExtraVariant {
    #[allow(dead_code)]
    Hello {
        node: u64,
        name: String,
    },
    #[allow(dead_code)]
    Heartbeat(u64),
    #[allow(dead_code)]
    Gradient(GradientHeader),
    #[allow(dead_code)]
    Bye,
    Resize {
        partitions: u32,
    },
}

fn gradient() -> GradientHeader {
    GradientHeader { job: "mnist".into(), membership_epoch: 3, step: 1_000_000, partition: 17 }
}

fn bits(tensor: &[f32]) -> Vec<u32> {
    tensor.iter().map(|v| v.to_bits()).collect()
}

fn tensor_of_len(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
}

/// Encodes, then decodes through both `decode` and a `FrameDecoder`, checking they agree.
fn round_trip<H>(header: &H, tensor: &[f32]) -> Frame<H>
where
    H: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let limits = Limits::default();
    let wire = encode(header, tensor, &limits).expect("encode");
    let prefix = u32::from_le_bytes(wire[..PREFIX_BYTES].try_into().expect("4 bytes"));
    assert_eq!(prefix as usize, wire.len() - PREFIX_BYTES, "length prefix");

    let direct: Frame<H> = decode(&wire[PREFIX_BYTES..], &limits).expect("decode");
    let mut decoder = FrameDecoder::new(limits);
    decoder.push(&wire);
    let streamed: Frame<H> = decoder.next_frame().expect("next_frame").expect("a frame");
    assert_eq!(decoder.buffered(), 0);
    assert!(decoder.next_frame::<H>().expect("no error").is_none());

    assert_eq!(&direct.header, header);
    assert_eq!(&streamed.header, header);
    assert_eq!(bits(&direct.tensor), bits(tensor));
    assert_eq!(bits(&streamed.tensor), bits(tensor));
    streamed
}

/// A frame (prefix included) assembled by hand, so its fields can lie.
fn raw_frame(version: u16, header_len: u32, header: &[u8], tensor: &[u8]) -> Vec<u8> {
    let len = ENVELOPE_BYTES + header.len() + tensor.len();
    let mut out = Vec::new();
    out.extend_from_slice(&u32::try_from(len).expect("small frame").to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(tensor);
    out
}

fn bincode_bytes<H: Serialize>(header: &H) -> Vec<u8> {
    bincode::serde::encode_to_vec(header, bincode::config::standard()).expect("encodable")
}

fn header_len_of(header: &[u8]) -> u32 {
    u32::try_from(header.len()).expect("small header")
}

/// The error both decoding paths give for a whole frame (prefix included); checks they agree.
fn decode_error<H: DeserializeOwned + std::fmt::Debug>(wire: &[u8], limits: Limits) -> DecodeError {
    let direct = decode::<H>(&wire[PREFIX_BYTES..], &limits).expect_err("decode must fail");
    let mut decoder = FrameDecoder::new(limits);
    decoder.push(wire);
    let streamed = decoder.next_frame::<H>().expect_err("decoder must fail");
    assert_eq!(direct.reason_code(), streamed.reason_code(), "{direct} vs {streamed}");
    streamed
}

// ---------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_struct_header_with_tensors_of_len_0_1_1000() {
    for n in [0, 1, 1000] {
        let frame = round_trip(&gradient(), &tensor_of_len(n));
        assert_eq!(frame.tensor.len(), n);
    }
}

#[test]
fn round_trip_enum_header_every_variant() {
    let headers = [
        Control::Hello { node: u64::MAX, name: "node-ä-7".into() },
        Control::Heartbeat(0),
        Control::Gradient(gradient()),
        Control::Bye,
    ];
    for header in &headers {
        for n in [0, 1, 1000] {
            round_trip(header, &tensor_of_len(n));
        }
    }
}

#[test]
fn round_trip_small_header_whose_decoded_size_exceeds_its_wire_size() {
    // Found by proptest: varints and 4-byte UTF-8 make the decoded size outgrow the 50 wire
    // bytes, which once tripped a bincode limit sized by wire bytes alone.
    let header = Control::Hello { node: 0, name: "𐀀¡𐀀𐀀¡𐀀𐀀𐀀 𐀀𐀀𐀀𐀀".into() };
    round_trip(&header, &[]);
    round_trip(&(u128::MAX, [1u128; 32], i128::MIN), &[]);
}

#[test]
fn round_trip_primitive_and_tuple_headers() {
    round_trip(&(), &[1.0]);
    round_trip(&42u8, &[]);
    round_trip(&("tensor".to_string(), 7u64, Some(-1i32)), &tensor_of_len(3));
}

#[test]
fn round_trip_preserves_f32_bits_nan_payloads_negative_zero_subnormals() {
    let tensor = [
        f32::from_bits(0x7fc0_0001), // quiet NaN with a payload
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::from_bits(0xffc1_2345), // negative NaN with a payload
        -0.0,
        0.0,
        f32::from_bits(1),            // smallest subnormal
        -f32::from_bits(0x007f_ffff), // largest negative subnormal
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN,
    ];
    let frame = round_trip(&Control::Bye, &tensor);
    assert_eq!(bits(&frame.tensor), bits(&tensor));
}

#[test]
fn encoded_frame_layout_matches_the_crate_diagram() {
    let limits = Limits::default();
    let header = Control::Heartbeat(9);
    let wire = encode(&header, &[1.0, -2.5], &limits).expect("encode");
    let header_bytes = bincode_bytes(&header);
    let mut expected = raw_frame(PROTOCOL_VERSION, header_len_of(&header_bytes), &header_bytes, &[]);
    expected.extend_from_slice(&1.0f32.to_le_bytes());
    expected.extend_from_slice(&(-2.5f32).to_le_bytes());
    expected[..PREFIX_BYTES].copy_from_slice(&((wire.len() - PREFIX_BYTES) as u32).to_le_bytes());
    assert_eq!(wire, expected);
    assert_eq!(&wire[4..6], &[8, 0], "version 8, little-endian");
}

#[test]
fn encode_into_appends_back_to_back_frames() {
    let limits = Limits::default();
    let mut wire = vec![];
    encode_into(&Control::Heartbeat(1), &[], &limits, &mut wire).expect("first");
    let first_len = wire.len();
    encode_into(&Control::Gradient(gradient()), &[3.0; 5], &limits, &mut wire).expect("second");
    assert_eq!(&wire[..first_len], encode(&Control::Heartbeat(1), &[], &limits).expect("same"));

    let mut decoder = FrameDecoder::new(limits);
    decoder.push(&wire);
    let a = decoder.next_frame::<Control>().expect("ok").expect("first frame");
    let b = decoder.next_frame::<Control>().expect("ok").expect("second frame");
    assert_eq!(a.header, Control::Heartbeat(1));
    assert_eq!(b.header, Control::Gradient(gradient()));
    assert_eq!(b.tensor, [3.0; 5]);
    assert!(decoder.next_frame::<Control>().expect("ok").is_none());
}

// ---------------------------------------------------------------------------------------
// Incremental decoding

fn several_frames() -> (Vec<u8>, Vec<(Control, Vec<f32>)>) {
    let messages = vec![
        (Control::Hello { node: 1, name: "a".into() }, vec![]),
        (Control::Gradient(gradient()), tensor_of_len(1000)),
        (Control::Heartbeat(2), vec![f32::NAN]),
        (Control::Bye, vec![]),
    ];
    let mut wire = Vec::new();
    for (header, tensor) in &messages {
        encode_into(header, tensor, &Limits::default(), &mut wire).expect("encode");
    }
    (wire, messages)
}

/// Pushes `wire` in the given chunks, pulling frames after every push.
fn decode_in_chunks<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    limits: Limits,
) -> Result<Vec<Frame<Control>>, DecodeError> {
    let mut decoder = FrameDecoder::new(limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
    }
    assert_eq!(decoder.buffered(), 0, "bytes left over");
    Ok(frames)
}

fn assert_frames_match(frames: &[Frame<Control>], messages: &[(Control, Vec<f32>)]) {
    assert_eq!(frames.len(), messages.len());
    for (frame, (header, tensor)) in frames.iter().zip(messages) {
        assert_eq!(&frame.header, header);
        assert_eq!(bits(&frame.tensor), bits(tensor));
    }
}

#[test]
fn decoder_accepts_bytes_one_at_a_time() {
    let (wire, messages) = several_frames();
    let frames = decode_in_chunks(wire.chunks(1), Limits::default()).expect("valid stream");
    assert_frames_match(&frames, &messages);
}

#[test]
fn decoder_yields_back_to_back_frames_from_one_push() {
    let (wire, messages) = several_frames();
    let frames = decode_in_chunks([wire.as_slice()], Limits::default()).expect("valid stream");
    assert_frames_match(&frames, &messages);
}

#[test]
fn decoder_waits_for_the_rest_of_a_frame() {
    let wire = encode(&Control::Bye, &[1.0; 10], &Limits::default()).expect("encode");
    let mut decoder = FrameDecoder::new(Limits::default());
    decoder.push(&wire[..wire.len() - 1]);
    assert!(decoder.next_frame::<Control>().expect("no error").is_none());
    assert_eq!(decoder.buffered(), wire.len() - 1);
    let debug = format!("{decoder:?}");
    assert!(debug.contains(&format!("buffered: {}", wire.len() - 1)), "{debug}");
    decoder.push(&wire[wire.len() - 1..]);
    assert!(decoder.next_frame::<Control>().expect("no error").is_some());
}

// ---------------------------------------------------------------------------------------
// Limits and errors

#[test]
fn oversize_prefix_is_rejected_before_any_body_bytes_arrive() {
    let limits = Limits::default();
    let mut decoder = FrameDecoder::new(limits);
    // A 4 GiB frame: only its prefix arrives.
    let ((), peak) = largest_allocation_during(|| decoder.push(&u32::MAX.to_le_bytes()));
    assert!(peak <= 64, "pushing a 4-byte prefix allocated {peak} bytes");
    assert!(decoder.buffered() <= PREFIX_BYTES);
    let err = decoder.next_frame::<Control>().expect_err("oversize");
    assert!(
        matches!(err, DecodeError::Oversize { len, max } if len == u64::from(u32::MAX) && max == limits.max_frame_bytes),
        "{err:?}"
    );
    assert_eq!(decoder.buffered(), 0);

    // The body that follows is dropped, not buffered.
    decoder.push(&vec![0; 1 << 20]);
    assert_eq!(decoder.buffered(), 0);
}

#[test]
fn decoder_is_poisoned_after_an_error_and_repeats_it() {
    let (wire, _) = several_frames();
    let mut bad = wire.clone();
    bad[PREFIX_BYTES] = 1; // first frame's version: the previous one
    let mut decoder = FrameDecoder::new(Limits::default());
    decoder.push(&bad);
    let first = decoder.next_frame::<Control>().expect_err("bad version");
    assert_eq!(decoder.buffered(), 0);
    decoder.push(&wire); // valid bytes do not resynchronise it
    for _ in 0..3 {
        let again = decoder.next_frame::<Control>().expect_err("still poisoned");
        assert_eq!(again.reason_code(), first.reason_code());
        assert_eq!(again.to_string(), first.to_string());
    }
    assert_eq!(decoder.buffered(), 0);
    assert!(decoder.error().is_some());
}

#[test]
fn wrong_version_is_unsupported_version() {
    let header = bincode_bytes(&Control::Bye);
    let wire = raw_frame(1, header_len_of(&header), &header, &[]);
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(matches!(err, DecodeError::UnsupportedVersion { found: 1, supported: PROTOCOL_VERSION }), "{err:?}");
}

#[test]
fn wrong_version_is_refused_from_the_first_six_bytes() {
    let header = bincode_bytes(&Control::Bye);
    let wire = raw_frame(0xBEEF, header_len_of(&header), &header, &[0; 400]);
    let mut decoder = FrameDecoder::new(Limits::default());
    decoder.push(&wire[..PREFIX_BYTES + 2]);
    let err = decoder.next_frame::<Control>().expect_err("foreign version");
    assert!(matches!(err, DecodeError::UnsupportedVersion { found: 0xBEEF, .. }), "{err:?}");
}

#[test]
fn unknown_enum_variant_in_header_is_header_error() {
    let limits = Limits::default();
    let wire = encode(&ControlWithExtraVariant::Resize { partitions: 8 }, &[], &limits).expect("encode");
    let err = decode_error::<Control>(&wire, limits);
    assert!(matches!(err, DecodeError::Header(_)), "{err:?}");
    assert_eq!(err.reason_code(), DecodeError::CODE_HEADER);
}

#[test]
fn invalid_header_data_is_header_error() {
    // `Hello.name` with invalid UTF-8.
    let mut header = bincode_bytes(&Control::Hello { node: 1, name: "ab".into() });
    let last = header.len() - 1;
    header[last] = 0xFF;
    let wire = raw_frame(PROTOCOL_VERSION, header_len_of(&header), &header, &[]);
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(matches!(err, DecodeError::Header(_)), "{err:?}");
}

#[test]
fn tensor_bytes_not_a_multiple_of_four_is_bad_tensor_length() {
    let header = bincode_bytes(&Control::Bye);
    let wire = raw_frame(PROTOCOL_VERSION, header_len_of(&header), &header, &[0; 5]);
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(matches!(err, DecodeError::BadTensorLength { bytes: 5 }), "{err:?}");
}

#[test]
fn header_length_past_the_frame_end_is_truncated() {
    let header = bincode_bytes(&Control::Bye);
    let wire = raw_frame(PROTOCOL_VERSION, 100, &header, &[]);
    let err = decode_error::<Control>(&wire, Limits::default());
    let available = (ENVELOPE_BYTES + header.len()) as u64;
    assert!(matches!(err, DecodeError::Truncated { needed: 106, available: a } if a == available), "{err:?}");
}

#[test]
fn header_region_shorter_than_its_encoding_is_header_error() {
    let header = bincode_bytes(&Control::Hello { node: 5, name: "abc".into() });
    let wire = raw_frame(PROTOCOL_VERSION, 2, &header[..2], &[]);
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(matches!(err, DecodeError::Header(_)), "{err:?}");
}

#[test]
fn trailing_bytes_in_header_region_are_header_error() {
    let mut header = bincode_bytes(&Control::Heartbeat(3));
    header.push(0);
    let wire = raw_frame(PROTOCOL_VERSION, header_len_of(&header), &header, &[]);
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(err.to_string().contains("trailing"), "{err}");
}

#[test]
fn header_length_over_the_limit_is_header_too_large() {
    let limits = Limits { max_frame_bytes: 1 << 20, max_header_bytes: 8 };
    let header = bincode_bytes(&Control::Hello { node: 1, name: "a long name".into() });
    let wire = raw_frame(PROTOCOL_VERSION, header_len_of(&header), &header, &[]);
    let err = decode_error::<Control>(&wire, limits);
    assert!(matches!(err, DecodeError::HeaderTooLarge { max: 8, .. }), "{err:?}");
}

#[test]
fn frame_shorter_than_the_envelope_is_truncated() {
    let wire = [3, 0, 0, 0, 1, 0, 0];
    let err = decode_error::<Control>(&wire, Limits::default());
    assert!(matches!(err, DecodeError::Truncated { needed: 6, available: 3 }), "{err:?}");
}

#[test]
fn lying_string_length_is_refused_without_allocating_it() {
    // A `String` header whose varint length claims 2^40 bytes (0xFD = u64 follows).
    let mut header = vec![0xFD];
    header.extend_from_slice(&(1u64 << 40).to_le_bytes());
    header.extend_from_slice(b"short");
    let wire = raw_frame(PROTOCOL_VERSION, header_len_of(&header), &header, &[]);
    let (err, peak) = largest_allocation_during(|| decode_error::<String>(&wire, Limits::default()));
    assert!(matches!(err, DecodeError::Header(_)), "{err:?}");
    assert!(peak < 4096, "decoding allocated {peak} bytes");
}

#[test]
fn frames_exactly_at_the_limits_pass_and_one_byte_more_fails() {
    let header = 7u8; // one byte of bincode
    let limits = Limits { max_frame_bytes: (ENVELOPE_BYTES + 1 + 8) as u32, max_header_bytes: 1 };
    let wire = encode(&header, &[1.0, 2.0], &limits).expect("exactly at the limit");
    assert_eq!(decode::<u8>(&wire[PREFIX_BYTES..], &limits).expect("accepted").header, 7);

    let smaller = Limits { max_frame_bytes: limits.max_frame_bytes - 1, ..limits };
    let err = encode(&header, &[1.0, 2.0], &smaller).expect_err("one byte over");
    assert!(matches!(err, EncodeError::Oversize { len: 15, max: 14 }), "{err:?}");
    let err = decode_error::<u8>(&wire, smaller);
    assert!(matches!(err, DecodeError::Oversize { len: 15, max: 14 }), "{err:?}");

    let err = encode(&300u16, &[], &limits).expect_err("two-byte header");
    assert!(matches!(err, EncodeError::HeaderTooLarge { len: 3, max: 1 }), "{err:?}");
}

#[test]
fn encode_refuses_an_oversize_tensor_before_allocating() {
    let limits = Limits { max_frame_bytes: 1024, max_header_bytes: 64 };
    let tensor = vec![0.0f32; 1024];
    let mut out = b"earlier frame".to_vec();
    let (result, peak) = largest_allocation_during(|| encode_into(&Control::Bye, &tensor, &limits, &mut out));
    assert!(matches!(result, Err(EncodeError::Oversize { len: 4102, max: 1024 })), "{result:?}");
    assert_eq!(peak, 0, "refusing allocated");
    assert_eq!(out, b"earlier frame");
}

#[test]
fn encode_refuses_a_too_large_header_and_reports_its_size() {
    let limits = Limits { max_frame_bytes: 1 << 20, max_header_bytes: 16 };
    let header = "x".repeat(100); // 1 length byte + 100 bytes
    let mut out = vec![1, 2, 3];
    let err = encode_into(&header, &[], &limits, &mut out).expect_err("too large");
    assert!(matches!(err, EncodeError::HeaderTooLarge { len: 101, max: 16 }), "{err:?}");
    assert_eq!(out, [1, 2, 3]);
}

#[test]
fn reason_codes_are_stable_and_distinct() {
    let header_error = DecodeError::from(bincode::error::DecodeError::LimitExceeded);
    let cases = [
        (DecodeError::Oversize { len: 1, max: 0 }, 0x101),
        (DecodeError::UnsupportedVersion { found: 0, supported: 1 }, 0x102),
        (DecodeError::HeaderTooLarge { len: 1, max: 0 }, 0x103),
        (DecodeError::Truncated { needed: 6, available: 0 }, 0x104),
        (DecodeError::BadTensorLength { bytes: 1 }, 0x105),
        (header_error, 0x106),
    ];
    for (err, code) in &cases {
        assert_eq!(err.reason_code(), *code, "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
    }
}

#[test]
fn default_limits_are_256_mib_frames_and_64_kib_headers() {
    let limits = Limits::default();
    assert_eq!(limits.max_frame_bytes, 256 * 1024 * 1024);
    assert_eq!(limits.max_header_bytes, 64 * 1024);
    assert_eq!(ALPN, format!("phalanx/{PROTOCOL_VERSION}").as_bytes());
}

/// Throughput check for the tensor path; prints, does not assert (timing on shared CI
/// machines is noise). Run with `cargo test --release -p phalanx-transport -- --nocapture
/// encode_decode_64_mib`.
#[test]
fn encode_decode_64_mib_prints_throughput() {
    const BYTES: usize = 64 * 1024 * 1024;
    let tensor: Vec<f32> = (0..BYTES / 4).map(|i| i as f32 * 1e-3).collect();
    let limits = Limits::default();
    let header = Control::Gradient(gradient());

    // Baseline: what merely copying 64 MiB into fresh memory costs here (page faults included).
    let started = Instant::now();
    let copied = std::hint::black_box(tensor.clone());
    let copy_s = started.elapsed().as_secs_f64();
    drop(copied);

    let started = Instant::now();
    let wire = encode(&header, &tensor, &limits).expect("encode");
    let encode_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let frame: Frame<Control> = decode(&wire[PREFIX_BYTES..], &limits).expect("decode");
    let decode_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut decoder = FrameDecoder::new(limits);
    for chunk in wire.chunks(64 * 1024) {
        decoder.push(chunk);
    }
    let streamed: Frame<Control> = decoder.next_frame().expect("ok").expect("frame");
    let stream_s = started.elapsed().as_secs_f64();

    assert_eq!(frame.tensor.len(), tensor.len());
    assert!(frame.tensor == tensor && streamed.tensor == tensor);
    let mib = (BYTES / (1024 * 1024)) as f64;
    println!(
        "64 MiB tensor: encode {:.1} ms ({:.0} MiB/s), decode {:.1} ms ({:.0} MiB/s), \
         FrameDecoder in 64 KiB pushes {:.1} ms ({:.0} MiB/s), encode+decode {:.1} ms; \
         baseline copy {:.1} ms",
        encode_s * 1e3,
        mib / encode_s,
        decode_s * 1e3,
        mib / decode_s,
        stream_s * 1e3,
        mib / stream_s,
        (encode_s + decode_s) * 1e3,
        copy_s * 1e3,
    );
}

// ---------------------------------------------------------------------------------------
// Properties

fn arb_tensor(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    // Arbitrary bit patterns, so NaN payloads and subnormals are covered.
    prop::collection::vec(any::<u32>().prop_map(f32::from_bits), 0..max_len)
}

fn arb_control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (any::<u64>(), ".{0,16}").prop_map(|(node, name)| Control::Hello { node, name }),
        any::<u64>().prop_map(Control::Heartbeat),
        (".{0,8}", any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(job, membership_epoch, step, partition)| {
            Control::Gradient(GradientHeader { job, membership_epoch, step, partition })
        }),
        Just(Control::Bye),
    ]
}

/// Byte streams a hostile or broken peer might send: pure noise, or noise behind a
/// plausible envelope so the header and tensor rules get exercised too.
fn arb_hostile_stream(limits: Limits) -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 0..2048);
    let behind_envelope =
        (0..=limits.max_frame_bytes + 16, 0..=limits.max_header_bytes + 16, prop::collection::vec(any::<u8>(), 0..512))
            .prop_map(|(len, header_len, rest)| {
                let mut out = len.to_le_bytes().to_vec();
                out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                out.extend_from_slice(&header_len.to_le_bytes());
                out.extend_from_slice(&rest);
                out
            });
    let valid_then_noise =
        (prop::collection::vec((arb_control(), arb_tensor(8)), 1..4), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(move |(messages, noise)| {
                let mut out = Vec::new();
                for (header, tensor) in &messages {
                    // A message too big for the small limits is simply left out.
                    let _ = encode_into(header, tensor, &limits, &mut out);
                }
                out.extend_from_slice(&noise);
                out
            });
    prop_oneof![noise, behind_envelope, valid_then_noise]
}

const SMALL_LIMITS: Limits = Limits { max_frame_bytes: 256, max_header_bytes: 64 };
const MAX_CHUNK: usize = 64;

#[test]
fn a_frame_of_parts_checks_like_one_buffer_and_refuses_what_encode_refuses() {
    let limits = Limits { max_frame_bytes: 1024, max_header_bytes: 64 };
    let frame = encode_parts(&gradient(), vec![TensorBytes::owned(vec![1.0; 10])], &limits).expect("encode");
    assert_eq!(frame.head().len() + 40, frame.len());
    let body_len = u64::try_from(frame.len() - PREFIX_BYTES).expect("fits");
    check_frame_start(&frame.head()[PREFIX_BYTES..], body_len, &limits).expect("a valid frame");
    // One byte more in the tensor's count than it holds: not a whole number of f32s.
    assert!(matches!(
        check_frame_start(&frame.head()[PREFIX_BYTES..], body_len + 1, &limits),
        Err(DecodeError::BadTensorLength { .. })
    ));
    let too_big =
        encode_parts(&gradient(), vec![TensorBytes::owned(vec![0.0; 200]), TensorBytes::owned(vec![0.0; 60])], &limits);
    assert!(matches!(too_big, Err(EncodeError::Oversize { len: 1046, max: 1024 })), "{too_big:?}");
    let header = "x".repeat(100);
    let err = encode_parts(&header, Vec::new(), &limits).expect_err("too large");
    assert!(matches!(err, EncodeError::HeaderTooLarge { len: 101, max: 64 }), "{err:?}");
}

#[test]
fn a_one_buffer_out_frame_gives_its_buffer_back() {
    let wire = encode(&gradient(), &[1.0, 2.0], &Limits::default()).expect("encode");
    let frame = OutFrame::from(wire.clone());
    assert_eq!((frame.len(), frame.head()), (wire.len(), &wire[..]));
    assert_eq!(frame.clone().into_vec(), wire);
    let ptr = wire.as_ptr();
    let back = OutFrame::from(wire).into_vec();
    assert_eq!(back.as_ptr(), ptr, "copied");
}

proptest! {
    /// However a tensor is cut into buffers, shared or owned, the frame's bytes are
    /// [`encode`]'s for the whole tensor.
    #[test]
    fn prop_a_frame_of_parts_is_byte_for_byte_the_one_buffer_frame(
        header in arb_control(),
        tensor in arb_tensor(300),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        mode in 0..3u8,
    ) {
        let limits = Limits::default();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(tensor.len() + 1)).collect();
        cuts.push(0);
        cuts.push(tensor.len());
        cuts.sort_unstable();
        // Each part owned, each in a buffer of its own shared, or all ranges of one shared buffer
        // (a trainer's gradient sum cut into its aggregators' ranges).
        let whole = std::sync::Arc::new(tensor.clone());
        let parts = cuts
            .windows(2)
            .map(|w| match mode {
                0 => TensorBytes::owned(tensor[w[0]..w[1]].to_vec()),
                1 => TensorBytes::shared(std::sync::Arc::new(tensor[w[0]..w[1]].to_vec())),
                _ => TensorBytes::shared_range(whole.clone(), w[0]..w[1]),
            })
            .collect();
        let frame = encode_parts(&header, parts, &limits).expect("encode parts");
        let wire = encode(&header, &tensor, &limits).expect("encode");
        prop_assert_eq!(frame.len(), wire.len());
        prop_assert_eq!(frame.to_vec(), wire);
    }

    #[test]
    fn prop_round_trip_arbitrary_headers_and_tensor_bits(
        header in arb_control(),
        tensor in arb_tensor(300),
    ) {
        round_trip(&header, &tensor);
    }

    #[test]
    fn prop_decoder_yields_the_same_frames_for_any_chunking(
        messages in prop::collection::vec((arb_control(), arb_tensor(40)), 1..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let mut wire = Vec::new();
        for (header, tensor) in &messages {
            encode_into(header, tensor, &Limits::default(), &mut wire).expect("encode");
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        cuts.push(0);
        cuts.push(wire.len());
        cuts.sort_unstable();
        let chunks = cuts.windows(2).map(|w| &wire[w[0]..w[1]]);
        let frames = decode_in_chunks(chunks, Limits::default()).expect("valid stream");
        assert_frames_match(&frames, &messages);
    }

    /// Hostile bytes never panic the decoder and never make it allocate beyond what the
    /// (small) limits allow. (`Control` has no sequences: serde lets a lying sequence length
    /// preallocate up to 1 MiB on its own.)
    #[test]
    fn prop_arbitrary_bytes_never_panic_and_stay_within_limits(
        stream in arb_hostile_stream(SMALL_LIMITS),
        chunk in 1..=MAX_CHUNK,
    ) {
        let limits = SMALL_LIMITS;
        let mut decoder = FrameDecoder::new(limits);
        let (first_error, peak) = largest_allocation_during(|| {
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                loop {
                    match decoder.next_frame::<Control>() {
                        Ok(Some(frame)) => {
                            assert!(frame.tensor.len() * 4 <= limits.max_frame_bytes as usize)
                        }
                        Ok(None) => break,
                        Err(err) => return Some(err),
                    }
                }
                assert!(decoder.buffered() < PREFIX_BYTES + limits.max_frame_bytes as usize);
            }
            None
        });
        // The buffer (one frame plus one push, grown by doubling) or a lying `String` length,
        // which bincode's limit caps at `claim_limit` of the largest header region.
        let buffer_bound = 2 * (PREFIX_BYTES + limits.max_frame_bytes as usize + MAX_CHUNK);
        let bound = buffer_bound.max(header::claim_limit(limits.max_header_bytes as usize));
        prop_assert!(peak <= bound, "largest allocation {} > {}", peak, bound);
        if let Some(err) = first_error {
            prop_assert_eq!(decoder.buffered(), 0);
            let again = decoder.next_frame::<Control>().expect_err("poisoned");
            prop_assert_eq!(again.reason_code(), err.reason_code());
        }
    }

    /// Flipping one byte of a valid frame gives an error or a frame, never a panic; a flip
    /// inside the tensor changes only that tensor element.
    #[test]
    fn prop_mutating_one_byte_gives_an_error_or_a_frame(
        header in arb_control(),
        tensor in arb_tensor(16),
        at in any::<prop::sample::Index>(),
        flip in 1..=u8::MAX,
    ) {
        let limits = Limits::default();
        let mut wire = encode(&header, &tensor, &limits).expect("encode");
        let at = at.index(wire.len());
        wire[at] ^= flip;

        let _ = decode::<Control>(&wire[PREFIX_BYTES..], &limits);
        let mut decoder = FrameDecoder::new(limits);
        decoder.push(&wire);
        let result = decoder.next_frame::<Control>();
        let tensor_start = wire.len() - tensor.len() * 4;
        if at >= tensor_start {
            let frame = result.expect("tensor bytes are opaque").expect("complete frame");
            prop_assert_eq!(frame.header, header);
            let changed = (at - tensor_start) / 4;
            for (i, (got, sent)) in frame.tensor.iter().zip(&tensor).enumerate() {
                prop_assert_eq!(got.to_bits() == sent.to_bits(), i != changed);
            }
        }
    }
}

/// A frame's tensor read apart, in chunks cut anywhere (a value split between two chunks
/// included), decodes to the same header and the same bits as the whole frame: NaN payloads,
/// signed zeros and subnormals too.
#[test]
fn a_tensor_read_apart_in_any_chunks_decodes_as_the_whole_frame() {
    let limits = Limits::default();
    let header = Control::Heartbeat(7);
    let tensor: Vec<f32> = [f32::from_bits(0x7fc0_1234), -0.0, f32::MIN_POSITIVE / 3.0, 1.5, f32::INFINITY]
        .into_iter()
        .chain((0..1000).map(|i| i as f32 * 0.25 - 3.0))
        .collect();
    let wire = encode(&header, &tensor, &limits).expect("encode");
    let body = &wire[PREFIX_BYTES..];
    let whole = decode::<Control>(body, &limits).expect("decode");
    let head_len = body.len() - tensor.len() * F32_BYTES;
    let (head, bytes) = body.split_at(head_len);
    for cut in [1, 2, 3, 4, 5, 7, 64, 1499, bytes.len()] {
        let mut assembler = TensorAssembler::with_bytes(bytes.len());
        for chunk in bytes.chunks(cut) {
            assembler.push(chunk);
        }
        assert_eq!(assembler.bytes(), bytes.len());
        let values = assembler.finish().expect("whole values");
        let parts = decode_parts::<Control>(head, values, &limits).expect("decode parts");
        assert_eq!(parts.header, whole.header, "chunks of {cut}");
        let same = parts.tensor.iter().zip(&whole.tensor).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same && parts.tensor.len() == whole.tensor.len(), "chunks of {cut}: the bits differ");
    }
}

/// An assembler that took a part of a value reports the bytes it took instead of values.
#[test]
fn a_tensor_ending_inside_a_value_is_refused() {
    let mut assembler = TensorAssembler::with_bytes(8);
    assembler.push(&[1, 2, 3, 4, 5, 6]);
    assert_eq!(assembler.bytes(), 6);
    assert_eq!(assembler.finish(), Err(6));
}

/// `decode_parts` applies every rule `decode` does to the head, and refuses a head that runs
/// into the tensor (its values would be shifted).
#[test]
fn decoding_parts_checks_the_head_like_the_whole_frame() {
    let limits = Limits::default();
    let wire = encode(&Control::Bye, &[1.0, 2.0], &limits).expect("encode");
    let body = &wire[PREFIX_BYTES..];
    let head = &body[..body.len() - 8];
    assert!(decode_parts::<Control>(head, vec![1.0, 2.0], &limits).is_ok());
    let mut foreign = head.to_vec();
    foreign[0] = 9;
    let err = decode_parts::<Control>(&foreign, vec![1.0], &limits).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedVersion { found: 9, .. }), "{err:?}");
    let mut longer = head.to_vec();
    longer.extend_from_slice(&1.0f32.to_le_bytes());
    let err = decode_parts::<Control>(&longer, vec![2.0], &limits).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }), "{err:?}");
    let small = Limits { max_frame_bytes: head.len() as u32 + 4, ..limits };
    let err = decode_parts::<Control>(head, vec![1.0, 2.0], &small).unwrap_err();
    assert!(matches!(err, DecodeError::Oversize { .. }), "{err:?}");
}
