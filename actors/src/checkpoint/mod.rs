//! Durable, verified checkpoints of the aggregators' parameter ranges.
//!
//! The aggregators own the model's flat `f32` parameter vector, split into contiguous
//! ranges (one aggregator per range). Every K steps each aggregator saves its range as
//! one file. When an aggregator dies, all of them roll back to the newest step whose
//! verified files tile `[0, total_len)` and recompute the steps since then:
//!
//! ```text
//!            0           40          70          100 = total_len
//!  step 10   [  range 0  |  range 1  |  range 2  )     complete   -> restorable
//!  step 20   [  range 0  |  range 1  |  missing  )     incomplete -> skipped
//!  step 30   [  range 0  |  corrupt  |  range 2  )     incomplete -> skipped
//!
//!  newest_complete(hash, 100) == Some(10)
//!  load_range(10, hash, 100, 25, 50) assembles [25, 75) from ranges 0, 1 and 2
//! ```
//!
//! A job may resume with another number of aggregators, so [`CheckpointStore::load_range`]
//! assembles any range from whatever verified files of the step cover it.
//!
//! # File format
//!
//! One file per (step, range), named `ckpt-{step:010}-{offset:010}-{len:010}.safetensors`.
//! It is a plain [safetensors](https://github.com/huggingface/safetensors) file, so Python's
//! `safetensors` can read it: 1-D little-endian `F32` tensors `params` and `opt.<slot>` for
//! each optimizer slot (each `len` long, stored in that order), and a `__metadata__` string
//! map:
//!
//! | key              | value                                                          |
//! |------------------|----------------------------------------------------------------|
//! | `format_version` | `1`                                                            |
//! | `step`           | training step of the state                                     |
//! | `config_hash`    | hex SHA-256 of the job config; must match on load              |
//! | `total_len`      | length of the full parameter vector                            |
//! | `offset`, `len`  | this file holds `[offset, offset + len)`                       |
//! | `optimizer_t`    | optimizer step counter                                         |
//! | `slots`          | comma-separated slot names, in order (empty when none)         |
//! | `ledger`         | JSON object: open epoch -> samples applied per partition so far|
//! | `ledger_closed`  | JSON object: finished epochs folded (`epochs`, `exact`,        |
//! |                  | `per_partition`, `lost`, `duplicated`, `first_inexact`); files |
//! |                  | written before epochs were folded lack it                      |
//! | `kernel`         | kernel fingerprint (16 hex digits) of the process that computed|
//! |                  | the state; loading refuses another one (files written before it|
//! |                  | was recorded lack it and load anywhere)                        |
//! | `sha256`         | hex SHA-256 over `key=value\n` of every other entry (sorted by |
//! |                  | key), then the raw bytes of `params`, then of each slot tensor |
//!
//! Reading verifies everything: the safetensors structure, the checksum, the version, the
//! dtypes and lengths, `offset + len <= total_len` and that the file name agrees with the
//! metadata. No content of a file can make a read panic or allocate more than the file's
//! size. The writer is deterministic: the same state always gives the same bytes.
//!
//! A file is verified once per process: finding the newest complete step and pruning trust a
//! file this process wrote, received (a copy from another node is verified before it is
//! written: [`CheckpointStore::save_copy`]) or already read, as long as it is the same file
//! (same inode, length and times); a restore always reads and verifies what it restores. See
//! `verified.rs` for why and what that trusts.
//!
//! # Atomicity
//!
//! [`CheckpointStore::save`] writes a temporary file (`.tmp-<final name>-<pid>-<n>`, which
//! never matches the final pattern) in the same directory, fsyncs it, renames it to its
//! final name and fsyncs the directory. A crash therefore leaves either no file or a
//! complete one under the final name; leftover temporary files are removed by
//! [`CheckpointStore::open`]. Torn or rotten files that slip through anyway (a disk that
//! lies about fsync, a partial copy from another node) fail the checksum and are skipped.
//!
//! # Entry point
//!
//! [`CheckpointStore`], one per checkpoint directory:
//!
//! ```
//! use phalanx_actors::checkpoint::{CheckpointStore, RangeCheckpoint};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let store = CheckpointStore::open(tmp.path().join("checkpoints"))?;
//! let config_hash = "c0ffee".to_string(); // the hex SHA-256 of the job config
//! // Two aggregators save their ranges [0, 2) and [2, 3) of step 10.
//! for (offset, params) in [(0, vec![1.0, 2.0]), (2, vec![3.0])] {
//!     store.save(&RangeCheckpoint {
//!         step: 10,
//!         config_hash: config_hash.clone(),
//!         total_len: 3,
//!         offset,
//!         params,
//!         optimizer_t: 10,
//!         optimizer_slots: vec![],
//!         ledger: [(0, vec![40, 40])].into_iter().collect(),
//!         kernel: Some(phalanx_actors::model::kernel::fingerprint()),
//!     })?;
//! }
//! assert_eq!(store.newest_complete(&config_hash, 3)?, Some(10));
//! // A single aggregator can now restore a range that crosses both files.
//! let restored = store.load_range(10, &config_hash, 3, 1, 2)?;
//! assert_eq!(restored.params, vec![2.0, 3.0]);
//! # Ok(())
//! # }
//! ```

mod cadence;
mod format;
mod store;
mod verified;

pub use cadence::CheckpointCadence;
pub use format::{is_temp_name, FileKey};
pub use store::{CheckpointStore, FileSummary, ScannedFile};

/// Complete checkpoints kept on disk (by aggregators and by the nodes keeping
/// copies); older ones are pruned.
pub const CHECKPOINTS_KEPT: usize = 3;

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use crate::model::kernel::KernelFingerprint;
use crate::protocol::Ledger;

/// The state of one parameter range at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeCheckpoint {
    /// Training step of this state: the parameters are `θ_step`.
    pub step: u64,
    /// Hex SHA-256 of the job config; loading checks that it matches.
    pub config_hash: String,
    /// Length of the full parameter vector.
    pub total_len: usize,
    /// This range is `[offset, offset + params.len())`.
    pub offset: usize,
    /// The parameters of this range.
    pub params: Vec<f32>,
    /// Optimizer step counter.
    pub optimizer_t: u64,
    /// Optimizer state per slot, e.g. `[("m", ..), ("v", ..)]`, each as long as `params`.
    pub optimizer_slots: Vec<(String, Vec<f32>)>,
    /// Samples applied per partition: open epochs by row, finished epochs
    /// folded (identical in every range's file).
    pub ledger: Ledger,
    /// The kernel fingerprint of the process that computed this state
    /// ([`crate::model::kernel`]); `None` in files written before it was recorded.
    /// Loading refuses a file of another kernel: resuming there would not give the bits.
    pub kernel: Option<KernelFingerprint>,
}

impl RangeCheckpoint {
    /// The parameter indices this checkpoint holds: `offset..offset + params.len()`.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset.saturating_add(self.params.len())
    }
}

/// Why a checkpoint operation failed. Every message names the file, or the directory and
/// step, it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An operating-system call on a checkpoint file or directory failed.
    #[error("checkpoint i/o failed while {op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "writing" or "renaming".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file is not a well-formed checkpoint: not safetensors, a missing or malformed
    /// field, a wrong dtype or length, or a name that disagrees with its contents.
    #[error("corrupt checkpoint file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored SHA-256 does not match the contents: a torn write or bit rot.
    #[error("checksum mismatch in checkpoint file {path}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
    },
    /// The file was written in a format version this code does not read.
    #[error("unsupported checkpoint format version {version:?} in {path}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version the file declares.
        version: String,
    },
    /// The file belongs to another job config.
    #[error("checkpoint file {path} has config hash {found}, expected {expected}")]
    ConfigMismatch {
        /// The file.
        path: PathBuf,
        /// The config hash asked for.
        expected: String,
        /// The config hash in the file.
        found: String,
    },
    /// The file was computed by a process whose maths gives other bits than this one's:
    /// resuming from it here would not give the fault-free run's model.
    #[error(
        "checkpoint file {path} was computed with kernel {found}, but this machine's maths has kernel {expected} \
         ({description}): resuming here would not give the job's bits; resume on a machine of the kind that wrote it"
    )]
    KernelMismatch {
        /// The file.
        path: PathBuf,
        /// This process's fingerprint.
        expected: KernelFingerprint,
        /// The file's.
        found: KernelFingerprint,
        /// What decides the kernel here ([`crate::model::kernel::description`]).
        description: &'static str,
    },
    /// The file's parameter vector has another total length than the job's.
    #[error("checkpoint file {path} has total length {found}, expected {expected}")]
    TotalLenMismatch {
        /// The file.
        path: PathBuf,
        /// The total length asked for.
        expected: usize,
        /// The total length in the file.
        found: usize,
    },
    /// Files of one step disagree on state that every range must share (optimizer counter,
    /// slot names, sample ledger).
    #[error("checkpoint file {path} disagrees with the other files of step {step}: {reason}")]
    Inconsistent {
        /// The file that disagrees with the first file used for the step.
        path: PathBuf,
        /// The step.
        step: u64,
        /// What differs.
        reason: String,
    },
    /// No verified files of the step cover the requested range.
    #[error(
        "checkpoint step {step} in {dir} is incomplete: \
         [{gap_start}, {gap_end}) is not covered by a valid file"
    )]
    Incomplete {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The step.
        step: u64,
        /// First index of the first uncovered gap.
        gap_start: usize,
        /// End (exclusive) of the first uncovered gap.
        gap_end: usize,
    },
    /// The requested range does not lie inside the parameter vector.
    #[error("range [{offset}, {offset} + {len}) lies outside the parameter vector of length {total_len}")]
    RangeOutOfBounds {
        /// Start of the requested range.
        offset: usize,
        /// Length of the requested range.
        len: usize,
        /// Length of the parameter vector.
        total_len: usize,
    },
    /// The checkpoint given to `save` is malformed (a caller bug), so nothing was written.
    #[error("invalid checkpoint for step {step} at offset {offset}: {reason}")]
    Invalid {
        /// The step of the checkpoint.
        step: u64,
        /// The offset of its range.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl CheckpointError {
    /// True when the same call may succeed later without anyone fixing a file or the code:
    /// a full disk or quota (prune, then retry), an interrupted or timed-out call. Corrupt
    /// files, mismatches and missing steps are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            CheckpointError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::ResourceBusy
                    | io::ErrorKind::OutOfMemory
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_step() {
        let err = CheckpointError::ChecksumMismatch {
            path: PathBuf::from("/ck/ckpt-0000000010-0000000000-0000000005.safetensors"),
        };
        assert_eq!(
            err.to_string(),
            "checksum mismatch in checkpoint file \
             /ck/ckpt-0000000010-0000000000-0000000005.safetensors"
        );
        let err = CheckpointError::Incomplete { dir: PathBuf::from("/ck"), step: 20, gap_start: 70, gap_end: 100 };
        assert_eq!(
            err.to_string(),
            "checkpoint step 20 in /ck is incomplete: [70, 100) is not covered by a valid file"
        );
    }

    #[test]
    fn only_transient_io_errors_are_retryable() {
        let io_err =
            |kind| CheckpointError::Io { op: "writing", path: PathBuf::from("/ck/x"), source: io::Error::from(kind) };
        assert!(io_err(io::ErrorKind::StorageFull).is_retryable());
        assert!(!io_err(io::ErrorKind::PermissionDenied).is_retryable());
        let corrupt = CheckpointError::Corrupt { path: PathBuf::from("/ck/x"), reason: "bad".into() };
        assert!(!corrupt.is_retryable());
    }

    #[test]
    fn range_is_offset_plus_params_len() {
        let ckpt = RangeCheckpoint {
            step: 1,
            config_hash: "ab".into(),
            total_len: 10,
            offset: 4,
            params: vec![0.0; 3],
            optimizer_t: 1,
            optimizer_slots: vec![],
            ledger: Ledger::new(),
            kernel: None,
        };
        assert_eq!(ckpt.range(), 4..7);
    }
}
