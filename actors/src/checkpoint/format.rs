//! The bytes of one checkpoint file: naming, encoding, checksum and verification.
//!
//! The encoder writes safetensors itself (8-byte little-endian header length, JSON header
//! padded with spaces to 8 bytes, tensor data) instead of calling `safetensors::serialize`,
//! for two reasons: that serializer puts the metadata in a `HashMap`, so the same state would
//! give different bytes on every save, and it needs the whole file in one buffer. The
//! decoder uses the `safetensors` crate, so everything we write is checked against the
//! reference parser.

use super::verified::Header;
use super::{CheckpointError, RangeCheckpoint};
use crate::protocol::{ClosedEpochs, Ledger};
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

/// The only format version this code writes and reads.
pub(crate) const FORMAT_VERSION: &str = "1";
/// Final file names start with this...
pub(crate) const FILE_PREFIX: &str = "ckpt-";
/// ...and end with this.
pub(crate) const FILE_SUFFIX: &str = ".safetensors";
/// Temporary files start with this, so they never match the final pattern.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Is `name` a temporary checkpoint file (what a crash between write and rename leaves)?
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Name of the parameter tensor.
const PARAMS_TENSOR: &str = "params";
/// Optimizer slot `s` is stored as tensor `opt.s`.
const SLOT_TENSOR_PREFIX: &str = "opt.";
/// Separator of the slot names in the `slots` metadata entry.
const SLOT_SEPARATOR: char = ',';
/// Bytes per stored element.
const F32_BYTES: usize = 4;
/// Bytes of the little-endian header length that opens a safetensors file.
const HEADER_LEN_BYTES: usize = 8;
/// safetensors pads the JSON header so that tensor data starts 8-byte aligned.
const HEADER_ALIGN: usize = 8;
/// Elements converted per chunk while hashing or writing, so that a large range never
/// needs a second full copy as bytes.
#[cfg(not(target_endian = "little"))]
const CHUNK_ELEMS: usize = 16 * 1024;

/// Keys of the `__metadata__` map.
mod key {
    pub const FORMAT_VERSION: &str = "format_version";
    pub const STEP: &str = "step";
    pub const CONFIG_HASH: &str = "config_hash";
    pub const TOTAL_LEN: &str = "total_len";
    pub const OFFSET: &str = "offset";
    pub const LEN: &str = "len";
    pub const OPTIMIZER_T: &str = "optimizer_t";
    pub const SLOTS: &str = "slots";
    pub const LEDGER: &str = "ledger";
    pub const LEDGER_CLOSED: &str = "ledger_closed";
    pub const SHA256: &str = "sha256";
    pub const KERNEL: &str = "kernel";
}

/// What a checkpoint file name says: the step and the range `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileKey {
    /// The checkpointed version.
    pub step: u64,
    /// Start of the range.
    pub offset: usize,
    /// Length of the range.
    pub len: usize,
}

impl FileKey {
    /// End (exclusive) of the range; saturates so a hostile name cannot overflow.
    pub fn end(&self) -> usize {
        self.offset.saturating_add(self.len)
    }

    /// `ckpt-{step:010}-{offset:010}-{len:010}.safetensors`.
    pub fn file_name(&self) -> String {
        format!("{FILE_PREFIX}{:010}-{:010}-{:010}{FILE_SUFFIX}", self.step, self.offset, self.len)
    }

    /// Parses a final file name; only the canonical spelling is accepted, so one
    /// (step, range) has exactly one name.
    pub fn parse(name: &str) -> Option<Self> {
        let body = name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?;
        let mut parts = body.split('-');
        let key = FileKey {
            step: parse_digits(parts.next()?)?,
            offset: parse_digits(parts.next()?)?,
            len: parse_digits(parts.next()?)?,
        };
        (parts.next().is_none() && key.file_name() == name).then_some(key)
    }
}

fn parse_digits<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Checks what `save` must refuse to write; the reader applies the same rules.
pub(crate) fn validate(ckpt: &RangeCheckpoint) -> Result<(), String> {
    check_config_hash(&ckpt.config_hash)?;
    let len = ckpt.params.len();
    match ckpt.offset.checked_add(len) {
        Some(end) if end <= ckpt.total_len => {}
        _ => {
            return Err(format!(
                "range [{}, {} + {len}) exceeds total length {}",
                ckpt.offset, ckpt.offset, ckpt.total_len
            ))
        }
    }
    let mut seen = BTreeSet::new();
    for (name, values) in &ckpt.optimizer_slots {
        check_slot_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(format!("optimizer slot {name:?} appears twice"));
        }
        if values.len() != len {
            return Err(format!("optimizer slot {name:?} has {} values, params have {len}", values.len()));
        }
    }
    Ok(())
}

/// The hash ends up in `key=value\n` lines of the checksum input, so it must not contain
/// line breaks; we accept any printable ASCII (hex in practice).
fn check_config_hash(hash: &str) -> Result<(), String> {
    if hash.is_empty() || !hash.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("config hash {hash:?} is not printable ASCII"));
    }
    Ok(())
}

/// Slot names become tensor names and a comma list: keep them to a safe alphabet.
fn check_slot_name(name: &str) -> Result<(), String> {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    if name.is_empty() || !name.bytes().all(ok_char) {
        return Err(format!("optimizer slot name {name:?} is not made of [A-Za-z0-9_.-]"));
    }
    Ok(())
}

/// The tensors of a checkpoint in checksum and storage order: params, then each slot.
fn tensors(ckpt: &RangeCheckpoint) -> Vec<(String, &[f32])> {
    let mut out = vec![(PARAMS_TENSOR.to_string(), ckpt.params.as_slice())];
    for (name, values) in &ckpt.optimizer_slots {
        out.push((format!("{SLOT_TENSOR_PREFIX}{name}"), values.as_slice()));
    }
    out
}

/// Feeds `values` as little-endian bytes to `sink`: on a little-endian machine (every target
/// Phalanx ships for) the values' own bytes, in one piece and without a copy.
#[cfg(target_endian = "little")]
fn for_each_le_chunk<E>(values: &[f32], mut sink: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
    sink(zerocopy::IntoBytes::as_bytes(values))
}

/// Feeds `values` as little-endian bytes to `sink`, a chunk at a time.
#[cfg(not(target_endian = "little"))]
fn for_each_le_chunk<E>(values: &[f32], mut sink: impl FnMut(&[u8]) -> Result<(), E>) -> Result<(), E> {
    let mut buf = Vec::with_capacity(CHUNK_ELEMS.min(values.len()) * F32_BYTES);
    for chunk in values.chunks(CHUNK_ELEMS) {
        buf.clear();
        for value in chunk {
            buf.extend_from_slice(&value.to_le_bytes());
        }
        sink(&buf)?;
    }
    Ok(())
}

/// A hasher primed with the canonical encoding of the metadata: `key=value\n` for every
/// entry except `sha256`, in key order. The tensor bytes follow.
fn metadata_hasher<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> Sha256 {
    let mut hasher = Sha256::new();
    for (k, v) in entries.filter(|(k, _)| *k != key::SHA256) {
        hasher.update(k.as_bytes());
        hasher.update(b"=");
        hasher.update(v.as_bytes());
        hasher.update(b"\n");
    }
    hasher
}

/// The metadata map of a checkpoint, including its checksum.
fn metadata(ckpt: &RangeCheckpoint) -> BTreeMap<&'static str, String> {
    let slots: Vec<&str> = ckpt.optimizer_slots.iter().map(|(n, _)| n.as_str()).collect();
    let mut meta = BTreeMap::from([
        (key::FORMAT_VERSION, FORMAT_VERSION.to_string()),
        (key::STEP, ckpt.step.to_string()),
        (key::CONFIG_HASH, ckpt.config_hash.clone()),
        (key::TOTAL_LEN, ckpt.total_len.to_string()),
        (key::OFFSET, ckpt.offset.to_string()),
        (key::LEN, ckpt.params.len().to_string()),
        (key::OPTIMIZER_T, ckpt.optimizer_t.to_string()),
        (key::SLOTS, slots.join(&SLOT_SEPARATOR.to_string())),
        (key::LEDGER, ledger_json(&ckpt.ledger.open)),
        (key::LEDGER_CLOSED, serde_json::to_string(&ckpt.ledger.closed).expect("plain counts serialize to JSON")),
    ]);
    if let Some(kernel) = ckpt.kernel {
        meta.insert(key::KERNEL, kernel.to_string());
    }
    let mut hasher = metadata_hasher(meta.iter().map(|(k, v)| (*k, v.as_str())));
    for (_, values) in tensors(ckpt) {
        let Ok(()) = for_each_le_chunk(values, |bytes| {
            hasher.update(bytes);
            Ok::<(), Infallible>(())
        });
    }
    meta.insert(key::SHA256, hex::encode(hasher.finalize()));
    meta
}

fn ledger_json(ledger: &BTreeMap<u64, Vec<u64>>) -> String {
    // A map with integer keys and integer lists always serializes; keys become strings.
    serde_json::to_string(ledger).expect("ledger serializes to JSON")
}

/// One entry of the safetensors JSON header. Serialized through `BTreeMap`s and a struct
/// with fixed field order so the header bytes are deterministic.
#[derive(Serialize)]
#[serde(untagged)]
enum HeaderEntry<'a> {
    Metadata(&'a BTreeMap<&'static str, String>),
    Tensor { dtype: &'static str, shape: [usize; 1], data_offsets: [usize; 2] },
}

/// Writes `ckpt` as a safetensors file to `out`. The caller has run [`validate`].
pub(crate) fn write_checkpoint(out: &mut impl Write, ckpt: &RangeCheckpoint) -> io::Result<()> {
    let meta = metadata(ckpt);
    let tensors = tensors(ckpt);
    let mut header = BTreeMap::from([("__metadata__".to_string(), HeaderEntry::Metadata(&meta))]);
    let mut start = 0;
    for (name, values) in &tensors {
        let end = start + values.len() * F32_BYTES;
        let entry = HeaderEntry::Tensor { dtype: "F32", shape: [values.len()], data_offsets: [start, end] };
        header.insert(name.clone(), entry);
        start = end;
    }
    let mut header_bytes = serde_json::to_vec(&header).map_err(io::Error::other)?;
    header_bytes.resize(header_bytes.len().next_multiple_of(HEADER_ALIGN), b' ');
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    for (_, values) in &tensors {
        for_each_le_chunk(values, |bytes| out.write_all(bytes))?;
    }
    Ok(())
}

/// Parses and fully verifies the bytes of the checkpoint file at `path`.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<RangeCheckpoint, CheckpointError> {
    let Verified { header, tensors } = verify(path, bytes)?;
    let mut values = tensors
        .into_iter()
        .map(|bytes| bytes.chunks_exact(F32_BYTES).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    let params = values.next().unwrap_or_default();
    Ok(RangeCheckpoint {
        step: header.key.step,
        config_hash: header.config_hash,
        total_len: header.total_len,
        offset: header.key.offset,
        params,
        optimizer_t: header.optimizer_t,
        optimizer_slots: header.slots.into_iter().zip(values).collect(),
        ledger: header.ledger,
        kernel: header.kernel,
    })
}

/// A fully verified checkpoint file: its header, and the bytes of its tensors (`params`, then
/// each optimizer slot), each checked to be `len` little-endian `f32`.
pub(crate) struct Verified<'a> {
    pub(crate) header: Header,
    tensors: Vec<&'a [u8]>,
}

/// Verifies the bytes of the checkpoint file at `path` as [`decode`] does, without decoding
/// the tensors.
pub(crate) fn verify<'a>(path: &Path, bytes: &'a [u8]) -> Result<Verified<'a>, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { path: path.to_path_buf(), reason };
    // `read_metadata` validates the header against the buffer: tensor offsets contiguous,
    // sizes matching shape × dtype, data ending exactly at the end of the file.
    let (header_len, st_meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(format!("not a valid safetensors file: {e}")))?;
    let data = HEADER_LEN_BYTES
        .checked_add(header_len)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| corrupt("header longer than the file".into()))?;
    let meta: BTreeMap<&str, &str> = st_meta
        .metadata()
        .as_ref()
        .ok_or_else(|| corrupt("no __metadata__ in the header".into()))?
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let field =
        |name: &str| meta.get(name).copied().ok_or_else(|| corrupt(format!("metadata field {name} is missing")));

    // The version decides how the rest is laid out, so it comes first.
    let version = field(key::FORMAT_VERSION)?;
    if version != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedVersion { path: path.to_path_buf(), version: version.to_string() });
    }

    // Checksum before interpreting any other field: a flipped bit should be reported
    // as what it is, not as whatever field it happened to garble.
    let slots = parse_slots(field(key::SLOTS)?).map_err(corrupt)?;
    let tensor_names: Vec<String> = std::iter::once(PARAMS_TENSOR.to_string())
        .chain(slots.iter().map(|s| format!("{SLOT_TENSOR_PREFIX}{s}")))
        .collect();
    if st_meta.tensors().len() != tensor_names.len() {
        return Err(corrupt(format!(
            "holds {} tensors, expected {} (params and slots {:?})",
            st_meta.tensors().len(),
            tensor_names.len(),
            slots
        )));
    }
    let mut tensor_data = Vec::with_capacity(tensor_names.len());
    for name in &tensor_names {
        let info = st_meta.info(name).ok_or_else(|| corrupt(format!("tensor {name} is missing")))?;
        let bytes = tensor_bytes(data, info).ok_or_else(|| corrupt(format!("tensor {name} lies outside the data")))?;
        tensor_data.push((name, info, bytes));
    }
    let mut hasher = metadata_hasher(meta.iter().map(|(k, v)| (*k, *v)));
    for (_, _, bytes) in &tensor_data {
        hasher.update(bytes);
    }
    if hex::encode(hasher.finalize()) != field(key::SHA256)? {
        return Err(CheckpointError::ChecksumMismatch { path: path.to_path_buf() });
    }

    let number = |name: &str| -> Result<u64, CheckpointError> {
        let text = field(name)?;
        parse_digits(text).ok_or_else(|| corrupt(format!("metadata field {name} is not a number: {text:?}")))
    };
    let index = |name: &str| -> Result<usize, CheckpointError> {
        usize::try_from(number(name)?).map_err(|_| corrupt(format!("metadata field {name} does not fit in usize")))
    };
    let step = number(key::STEP)?;
    let optimizer_t = number(key::OPTIMIZER_T)?;
    let total_len = index(key::TOTAL_LEN)?;
    let offset = index(key::OFFSET)?;
    let len = index(key::LEN)?;
    let config_hash = field(key::CONFIG_HASH)?;
    check_config_hash(config_hash).map_err(corrupt)?;
    let open: BTreeMap<u64, Vec<u64>> =
        serde_json::from_str(field(key::LEDGER)?).map_err(|e| corrupt(format!("ledger is not valid JSON: {e}")))?;
    // Files written before finished epochs were folded have no `ledger_closed`.
    let closed: ClosedEpochs = match meta.get(key::LEDGER_CLOSED) {
        Some(text) => {
            serde_json::from_str(text).map_err(|e| corrupt(format!("ledger_closed is not valid ledger JSON: {e}")))?
        }
        None => ClosedEpochs::default(),
    };
    let ledger = Ledger { open, closed };
    // Files written before the kernel was recorded have no `kernel`.
    let kernel = meta.get(key::KERNEL).map(|text| text.parse()).transpose().map_err(corrupt)?;
    if offset.checked_add(len).is_none_or(|end| end > total_len) {
        return Err(corrupt(format!("range [{offset}, {offset} + {len}) exceeds total length {total_len}")));
    }
    let in_name = path.file_name().and_then(|n| n.to_str()).and_then(FileKey::parse);
    let in_meta = FileKey { step, offset, len };
    if in_name != Some(in_meta) {
        return Err(corrupt(format!("file name does not match its metadata (expected name {})", in_meta.file_name())));
    }

    let mut tensors = Vec::with_capacity(tensor_data.len());
    for (name, info, bytes) in tensor_data {
        if info.dtype != Dtype::F32 {
            return Err(corrupt(format!("tensor {name} has dtype {:?}, expected F32", info.dtype)));
        }
        if info.shape != [len] || bytes.len() / F32_BYTES != len {
            return Err(corrupt(format!("tensor {name} has shape {:?}, expected [{len}]", info.shape)));
        }
        // The length was checked against the file's real size above.
        tensors.push(bytes);
    }
    let header =
        Header { key: in_meta, config_hash: config_hash.to_string(), total_len, optimizer_t, slots, ledger, kernel };
    Ok(Verified { header, tensors })
}

fn tensor_bytes<'a>(data: &'a [u8], info: &TensorInfo) -> Option<&'a [u8]> {
    let (start, end) = info.data_offsets;
    data.get(start..end)
}

fn parse_slots(list: &str) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = BTreeSet::new();
    let mut slots = Vec::new();
    for name in list.split(SLOT_SEPARATOR) {
        check_slot_name(name)?;
        if !seen.insert(name) {
            return Err(format!("optimizer slot {name:?} appears twice"));
        }
        slots.push(name.to_string());
    }
    Ok(slots)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::kernel::KernelFingerprint;
    use proptest::prelude::*;
    use std::path::PathBuf;

    /// A checkpoint whose values include NaN payloads, -0.0, subnormals and infinities,
    /// so equality must be bitwise to pass.
    pub(crate) fn sample(step: u64, total_len: usize, offset: usize, len: usize, slots: &[&str]) -> RangeCheckpoint {
        let value = |salt: u32, i: usize| -> f32 {
            let i = (offset + i) as u32;
            match i % 7 {
                0 => f32::from_bits(0x7fc0_0001 ^ salt),
                1 => -0.0,
                2 => f32::from_bits(1 + salt),
                3 => f32::INFINITY,
                _ => (i as f32) * 0.25 + salt as f32 + step as f32,
            }
        };
        RangeCheckpoint {
            step,
            config_hash: "a1b2c3".into(),
            total_len,
            offset,
            params: (0..len).map(|i| value(0, i)).collect(),
            optimizer_t: step * 2,
            optimizer_slots: slots
                .iter()
                .enumerate()
                .map(|(s, name)| (name.to_string(), (0..len).map(|i| value(s as u32 + 1, i)).collect()))
                .collect(),
            ledger: [(0, vec![step * 8, step * 8]), (1, vec![3, 0])].into_iter().collect(),
            kernel: Some(crate::model::kernel::fingerprint()),
        }
    }

    /// Bitwise equality: `PartialEq` on f32 fails on NaN and ignores the sign of zero.
    pub(crate) fn assert_bitwise_eq(a: &RangeCheckpoint, b: &RangeCheckpoint) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.params), bits(&b.params), "params differ");
        assert_eq!(a.optimizer_slots.len(), b.optimizer_slots.len());
        for ((na, va), (nb, vb)) in a.optimizer_slots.iter().zip(&b.optimizer_slots) {
            assert_eq!(na, nb);
            assert_eq!(bits(va), bits(vb), "slot {na} differs");
        }
        assert_eq!(
            (a.step, &a.config_hash, a.total_len, a.offset, a.optimizer_t, &a.ledger, a.kernel),
            (b.step, &b.config_hash, b.total_len, b.offset, b.optimizer_t, &b.ledger, b.kernel)
        );
    }

    fn encode(ckpt: &RangeCheckpoint) -> Vec<u8> {
        validate(ckpt).unwrap();
        let mut bytes = Vec::new();
        write_checkpoint(&mut bytes, ckpt).unwrap();
        bytes
    }

    fn path_of(ckpt: &RangeCheckpoint) -> PathBuf {
        let key = FileKey { step: ckpt.step, offset: ckpt.offset, len: ckpt.params.len() };
        PathBuf::from("/ck").join(key.file_name())
    }

    #[test]
    fn round_trip_is_bitwise_with_zero_one_and_two_slots() {
        for slots in [&[][..], &["m"], &["m", "v"]] {
            let ckpt = sample(10, 100, 30, 40, slots);
            let back = decode(&path_of(&ckpt), &encode(&ckpt)).unwrap();
            assert_bitwise_eq(&ckpt, &back);
        }
    }

    #[test]
    fn round_trip_of_an_empty_range() {
        let ckpt = sample(3, 0, 0, 0, &["m"]);
        let back = decode(&path_of(&ckpt), &encode(&ckpt)).unwrap();
        assert_bitwise_eq(&ckpt, &back);
    }

    #[test]
    fn encoding_is_deterministic() {
        let ckpt = sample(10, 100, 30, 40, &["m", "v"]);
        assert_eq!(encode(&ckpt), encode(&ckpt));
    }

    #[test]
    fn file_is_valid_safetensors_with_params_bytes() {
        let ckpt = sample(10, 100, 30, 40, &["m", "v"]);
        let bytes = encode(&ckpt);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort_unstable();
        assert_eq!(names, ["opt.m", "opt.v", "params"]);
        let params = st.tensor("params").unwrap();
        assert_eq!(params.dtype(), Dtype::F32);
        assert_eq!(params.shape(), [40]);
        let expected: Vec<u8> = ckpt.params.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(params.data(), expected.as_slice());
        let (header_len, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header_len % HEADER_ALIGN, 0, "data must start 8-byte aligned");
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format_version"], "1");
        assert_eq!(meta["slots"], "m,v");
        assert_eq!(meta["len"], "40");
        assert_eq!(meta["ledger"], r#"{"0":[80,80],"1":[3,0]}"#);
    }

    #[test]
    fn file_names_are_canonical() {
        let key = FileKey { step: 20, offset: 0, len: 34 };
        assert_eq!(key.file_name(), "ckpt-0000000020-0000000000-0000000034.safetensors");
        assert_eq!(FileKey::parse(&key.file_name()), Some(key));
        let big = FileKey { step: u64::MAX, offset: 12_345_678_901, len: 1 };
        assert_eq!(FileKey::parse(&big.file_name()), Some(big));
        for bad in [
            "ckpt-20-0-34.safetensors",
            "ckpt-0000000020-0000000000-0000000034.safetensors.tmp",
            "ckpt-0000000020-0000000000-+000000034.safetensors",
            "ckpt-0000000020-0000000000-0000000034-1.safetensors",
            ".tmp-ckpt-0000000020-0000000000-0000000034.safetensors-77-0",
            "ckpt-00000000200000000000-0000000034.safetensors",
        ] {
            assert_eq!(FileKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let ckpt = sample(10, 100, 30, 9, &["m", "v"]);
        let bytes = encode(&ckpt);
        let path = path_of(&ckpt);
        // Every position: the length prefix, the JSON header (keys, values, the checksum,
        // padding) and the tensor bytes.
        for pos in 0..bytes.len() {
            for mask in [0x01u8, 0x20, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[pos] ^= mask;
                match decode(&path, &bad) {
                    Err(
                        CheckpointError::ChecksumMismatch { .. }
                        | CheckpointError::Corrupt { .. }
                        | CheckpointError::UnsupportedVersion { .. },
                    ) => {}
                    // (A flip that kept the JSON equivalent, a padding space turned into a
                    // tab, could pass with identical data; none of these masks does that.)
                    Ok(_) => panic!("byte {pos} mask {mask:#x}: accepted"),
                    Err(other) => panic!("byte {pos} mask {mask:#x}: unexpected {other}"),
                }
            }
        }
    }

    #[test]
    fn flips_in_the_tensor_bytes_are_checksum_mismatches() {
        let ckpt = sample(10, 100, 30, 9, &["m"]);
        let bytes = encode(&ckpt);
        let data_len = 2 * 9 * F32_BYTES;
        for pos in bytes.len() - data_len..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            assert!(matches!(decode(&path_of(&ckpt), &bad), Err(CheckpointError::ChecksumMismatch { .. })));
        }
    }

    #[test]
    fn truncated_files_are_errors() {
        let ckpt = sample(10, 100, 30, 9, &["m"]);
        let bytes = encode(&ckpt);
        for cut in 0..bytes.len() {
            assert!(decode(&path_of(&ckpt), &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&path_of(&ckpt), &longer).is_err());
    }

    #[test]
    fn a_file_under_another_name_is_corrupt() {
        let ckpt = sample(10, 100, 30, 9, &[]);
        let bytes = encode(&ckpt);
        let mut other = ckpt.clone();
        other.step = 11;
        let err = decode(&path_of(&other), &bytes).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("ckpt-0000000011"), "{err}");
        let err = decode(Path::new("/ck/renamed.safetensors"), &bytes).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    }

    /// Writes a file with the given metadata and tensors through the reference
    /// `safetensors` serializer, with a correct checksum unless `sha256` is given.
    fn craft(meta: &[(&str, &str)], tensors: &[(&str, Dtype, Vec<usize>, &[u8])]) -> Vec<u8> {
        let mut meta: BTreeMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !meta.contains_key(key::SHA256) {
            let mut hasher = metadata_hasher(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            for (_, _, _, bytes) in tensors {
                hasher.update(bytes);
            }
            meta.insert(key::SHA256.into(), hex::encode(hasher.finalize()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes);
                (name.to_string(), view.unwrap())
            })
            .collect();
        let views: Vec<(&String, &safetensors::tensor::TensorView<'_>)> = views.iter().map(|(n, v)| (n, v)).collect();
        safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap()
    }

    const NAME: &str = "/ck/ckpt-0000000005-0000000002-0000000002.safetensors";

    fn base_meta() -> Vec<(&'static str, &'static str)> {
        vec![
            ("format_version", "1"),
            ("step", "5"),
            ("config_hash", "ab"),
            ("total_len", "4"),
            ("offset", "2"),
            ("len", "2"),
            ("optimizer_t", "5"),
            ("slots", ""),
            ("ledger", "{}"),
        ]
    }

    fn with(meta: &[(&'static str, &'static str)], k: &str, v: &'static str) -> Vec<(&'static str, &'static str)> {
        meta.iter().map(|&(mk, mv)| if mk == k { (mk, v) } else { (mk, mv) }).collect()
    }

    const EIGHT: [u8; 8] = [0, 0, 128, 63, 0, 0, 0, 64];

    #[test]
    fn files_from_the_reference_serializer_are_read() {
        let bytes = craft(&base_meta(), &[("params", Dtype::F32, vec![2], &EIGHT)]);
        let back = decode(Path::new(NAME), &bytes).unwrap();
        assert_eq!(back.params, vec![1.0, 2.0]);
        // Written before finished epochs were folded: no `ledger_closed`.
        assert_eq!(back.ledger, Ledger::new());
        // Written before the kernel was recorded: no `kernel`.
        assert_eq!(back.kernel, None);
        let mut with_kernel = base_meta();
        with_kernel.push(("kernel", "00000000000000ff"));
        let back = decode(Path::new(NAME), &craft(&with_kernel, &[("params", Dtype::F32, vec![2], &EIGHT)])).unwrap();
        assert_eq!(back.kernel, Some(KernelFingerprint(0xff)));
    }

    #[test]
    fn header_field_errors_are_reported() {
        let t = |dtype, shape: Vec<usize>| vec![("params", dtype, shape, &EIGHT[..])];
        let err = |meta: &[(&str, &str)], tensors: &[(&str, Dtype, Vec<usize>, &[u8])]| {
            decode(Path::new(NAME), &craft(meta, tensors)).unwrap_err()
        };
        let base = base_meta();
        let f32s = t(Dtype::F32, vec![2]);
        assert!(matches!(
            err(&with(&base, "format_version", "2"), &f32s),
            CheckpointError::UnsupportedVersion { version, .. } if version == "2"
        ));
        let mut wrong_sum = base.clone();
        wrong_sum.push(("sha256", "00"));
        assert!(matches!(err(&wrong_sum, &f32s), CheckpointError::ChecksumMismatch { .. }));
        let corrupt = |e: CheckpointError, what: &str| match e {
            CheckpointError::Corrupt { reason, path } => {
                assert!(reason.contains(what), "{reason:?} lacks {what:?}");
                assert_eq!(path, Path::new(NAME));
            }
            other => panic!("expected corrupt ({what}), got {other}"),
        };
        corrupt(err(&base, &t(Dtype::I32, vec![2])), "dtype");
        corrupt(err(&base, &t(Dtype::F32, vec![1, 2])), "shape");
        corrupt(err(&with(&base, "len", "1"), &f32s), "file name does not match");
        corrupt(err(&with(&base, "total_len", "3"), &f32s), "exceeds total length");
        corrupt(err(&with(&base, "step", "-5"), &f32s), "not a number");
        corrupt(err(&with(&base, "ledger", "{"), &f32s), "ledger");
        let mut closed = base.clone();
        closed.push(("ledger_closed", r#"{"epochs":"two"}"#));
        corrupt(err(&closed, &f32s), "ledger_closed");
        let mut kernel = base.clone();
        kernel.push(("kernel", "avx2"));
        corrupt(err(&kernel, &f32s), "kernel fingerprint \"avx2\"");
        corrupt(err(&with(&base, "slots", "m"), &f32s), "tensors");
        corrupt(err(&with(&base, "slots", "m,m"), &f32s), "twice");
        corrupt(err(&base[1..], &f32s), "format_version is missing");
        let extra = [f32s[0].clone(), ("opt.m", Dtype::F32, vec![2], &EIGHT[..])];
        corrupt(err(&base, &extra), "tensors");
        corrupt(err(&base, &[("weights", Dtype::F32, vec![2], &EIGHT[..])]), "params is missing");
    }

    #[test]
    fn huge_declared_sizes_are_rejected_without_allocating() {
        // A header length of u64::MAX, then a header that declares a tensor of 2^61
        // elements: both must fail on the real file size.
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(decode(Path::new(NAME), &bytes).is_err());
        let header = br#"{"params":{"dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&EIGHT);
        assert!(decode(Path::new(NAME), &bytes).is_err());
    }

    #[test]
    fn save_side_validation_rejects_malformed_checkpoints() {
        let good = sample(1, 10, 2, 4, &["m"]);
        assert!(validate(&good).is_ok());
        let mut bad = good.clone();
        bad.optimizer_slots[0].1.pop();
        assert!(validate(&bad).unwrap_err().contains("has 3 values"));
        let mut bad = good.clone();
        bad.total_len = 5;
        assert!(validate(&bad).unwrap_err().contains("exceeds"));
        let mut bad = good.clone();
        bad.optimizer_slots[0].0 = "m,v".into();
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad.optimizer_slots.push(bad.optimizer_slots[0].clone());
        assert!(validate(&bad).unwrap_err().contains("twice"));
        let mut bad = good;
        bad.config_hash = "ab\nstep=3".into();
        assert!(validate(&bad).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            prop_assert!(decode(Path::new(NAME), &bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_after_a_plausible_prefix_are_an_error(
            header_len in 0u64..4096,
            rest in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut bytes = header_len.to_le_bytes().to_vec();
            bytes.push(b'{');
            bytes.extend_from_slice(&rest);
            prop_assert!(decode(Path::new(NAME), &bytes).is_err());
        }

        #[test]
        fn mutated_files_never_decode_to_other_data(
            slots in 0usize..3,
            len in 0usize..20,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let names = ["m", "v"];
            let ckpt = sample(7, 64, 3, len, &names[..slots]);
            let mut bytes = encode(&ckpt);
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok(back) = decode(&path_of(&ckpt), &bytes) {
                assert_bitwise_eq(&ckpt, &back);
            }
        }

        #[test]
        fn round_trip_of_arbitrary_values(
            params in proptest::collection::vec(any::<u32>(), 0..64),
            step in any::<u64>(),
            optimizer_t in any::<u64>(),
            ledger in proptest::collection::btree_map(any::<u64>(), proptest::collection::vec(any::<u64>(), 0..4), 0..4),
            closed in any::<u64>(),
        ) {
            let len = params.len();
            let ckpt = RangeCheckpoint {
                step,
                config_hash: "ff".into(),
                total_len: len + 5,
                offset: 5,
                params: params.iter().map(|b| f32::from_bits(*b)).collect(),
                optimizer_t,
                optimizer_slots: vec![("m".into(), params.iter().map(|b| f32::from_bits(!b)).collect())],
                ledger: Ledger {
                    open: ledger,
                    closed: ClosedEpochs {
                        epochs: closed,
                        exact: closed / 2,
                        per_partition: vec![closed, 1],
                        lost: closed % 7,
                        duplicated: 1,
                        first_inexact: Some((closed / 3, vec![closed % 5, 2])),
                    },
                },
                kernel: (step % 2 == 0).then_some(KernelFingerprint(optimizer_t)),
            };
            let back = decode(&path_of(&ckpt), &encode(&ckpt)).unwrap();
            assert_bitwise_eq(&ckpt, &back);
        }
    }
}
