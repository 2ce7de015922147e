//! The checkpoint files this process has written or fully verified, so that finding the newest
//! complete step and pruning do not read and hash every kept file again at every call.
//!
//! Pruning keeps the newest few *verified* complete steps (a corrupt newer step must not get the
//! last good one deleted), and it runs every few checkpoints on every node — on a node holding
//! whole checkpoints, once for its own saves and once for the copies it receives. Reading and
//! hashing every kept file each time cost more than the checkpoints themselves: on a 3-node
//! cluster with 1.2 M parameters about eighteen files of 1.6 MB were read and hashed per
//! checkpoint, for three written. Each file is now verified once per process, when it is
//! written (its checksum computed from the state in memory), received (verified before it is
//! written) or first read.
//!
//! **When a memo holds.** A verification holds while the file is the same file: same device,
//! inode, length and modification and change times (nanoseconds). Every save and every kept copy
//! writes a new file and renames it into place, so a replaced file has a new inode and never
//! matches the old entry; anything that writes into a file changes its times. What the memo
//! cannot see is the disk corrupting a file's blocks under an unchanged inode — which a
//! verification at prune time could only have caught if it happened before that prune, and
//! which a restore still catches: [`CheckpointStore::load_range`](super::CheckpointStore::load_range)
//! always reads and verifies the data it restores, and falls back to another copy or step.
//!
//! **Bounded.** At most [`MAX_ENTRIES`] files are remembered; when full the memo starts over
//! (a miss costs one verification, never a wrong answer). Deleted files are forgotten at once.
//! One memo per process: the same directory is read by several views of it (an aggregator's
//! store, the node's copy receiver, a new coordinator's scan), which all benefit.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use super::format::FileKey;
use super::RangeCheckpoint;
use crate::model::kernel::KernelFingerprint;
use crate::protocol::Ledger;

/// Most files remembered (a node keeps a few steps of a few ranges per job: far fewer).
pub(crate) const MAX_ENTRIES: usize = 4096;

/// What a verified file holds, but its tensors.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub(crate) key: FileKey,
    pub(crate) config_hash: String,
    pub(crate) total_len: usize,
    pub(crate) optimizer_t: u64,
    pub(crate) slots: Vec<String>,
    pub(crate) ledger: Ledger,
    pub(crate) kernel: Option<KernelFingerprint>,
}

impl Header {
    pub(crate) fn of(ckpt: &RangeCheckpoint) -> Self {
        Self {
            key: FileKey { step: ckpt.step, offset: ckpt.offset, len: ckpt.params.len() },
            config_hash: ckpt.config_hash.clone(),
            total_len: ckpt.total_len,
            optimizer_t: ckpt.optimizer_t,
            slots: ckpt.optimizer_slots.iter().map(|(name, _)| name.clone()).collect(),
            ledger: ckpt.ledger.clone(),
            kernel: ckpt.kernel,
        }
    }
}

/// Which file a path names now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

type Memo = HashMap<PathBuf, (Stamp, Header)>;

fn memo() -> std::sync::MutexGuard<'static, Memo> {
    static MEMO: OnceLock<Mutex<Memo>> = OnceLock::new();
    MEMO.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner)
}

/// The header of the file at `path` if this process verified that very file.
pub(crate) fn lookup(path: &Path) -> Option<Header> {
    let stamp = Stamp::of(path)?;
    let mut memo = memo();
    match memo.get(path) {
        Some((known, header)) if *known == stamp => Some(header.clone()),
        Some(_) => {
            memo.remove(path);
            None
        }
        None => None,
    }
}

/// Remembers that the file now at `path` holds `header`, whole: call it right after writing or
/// verifying the file.
pub(crate) fn record(path: &Path, header: Header) {
    let Some(stamp) = Stamp::of(path) else { return };
    let mut memo = memo();
    if memo.len() >= MAX_ENTRIES && !memo.contains_key(path) {
        memo.clear();
    }
    memo.insert(path.to_path_buf(), (stamp, header));
}

/// Forgets the file at `path` (deleted).
pub(crate) fn forget(path: &Path) {
    memo().remove(path);
}
