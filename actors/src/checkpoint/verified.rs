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
use std::fs::File;
use std::io::{self, Read};
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
        std::fs::metadata(path).ok().map(|m| Self::of_metadata(&m))
    }

    fn of_metadata(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The bytes of the file at `path`, and which file they were read from: `None` when the file
/// changed while it was read (its stamp before and after differ), so that what is verified from
/// these bytes is remembered only for the file they came from (see [`record_read`]).
pub(crate) fn read(path: &Path) -> io::Result<(Vec<u8>, Option<ReadStamp>)> {
    let mut file = File::open(path)?;
    let before = Stamp::of_metadata(&file.metadata()?);
    let mut bytes = Vec::with_capacity(usize::try_from(before.len).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    let after = Stamp::of_metadata(&file.metadata()?);
    Ok((bytes, (before == after).then_some(ReadStamp(after))))
}

/// Which file a [`read`] read, unchanged while it was read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadStamp(Stamp);

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

/// Remembers that the file now at `path` holds `header`, whole: call it right after this process
/// wrote the file and renamed it into place (a file read to be verified goes through
/// [`record_read`]).
pub(crate) fn record(path: &Path, header: Header) {
    if let Some(stamp) = Stamp::of(path) {
        insert(path, stamp, header);
    }
}

fn insert(path: &Path, stamp: Stamp, header: Header) {
    let mut memo = memo();
    if memo.len() >= MAX_ENTRIES && !memo.contains_key(path) {
        memo.clear();
    }
    memo.insert(path.to_path_buf(), (stamp, header));
}

/// Remembers that the file [`read`] read at `path` holds `header`, whole — unless the path now
/// names another file (replaced since), whose contents nobody verified.
pub(crate) fn record_read(path: &Path, read: ReadStamp, header: Header) {
    if Stamp::of(path) == Some(read.0) {
        insert(path, read.0, header);
    }
}

/// Forgets the file at `path` (deleted).
pub(crate) fn forget(path: &Path) {
    memo().remove(path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn header(step: u64) -> Header {
        Header {
            key: FileKey { step, offset: 0, len: 4 },
            config_hash: "h".into(),
            total_len: 4,
            optimizer_t: step,
            slots: Vec::new(),
            ledger: Ledger::default(),
            kernel: None,
        }
    }

    /// Replaces the file at `path` the way every writer here does: a new file renamed over it.
    fn replace(path: &Path, contents: &[u8]) {
        let temp = path.with_extension("tmp");
        std::fs::write(&temp, contents).unwrap();
        std::fs::rename(&temp, path).unwrap();
    }

    #[test]
    fn what_was_read_is_remembered_only_for_the_file_it_was_read_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ckpt");
        replace(&path, b"first");

        let (bytes, stamp) = read(&path).unwrap();
        assert_eq!(bytes, b"first");
        let stamp = stamp.expect("nothing wrote the file while it was read");
        record_read(&path, stamp, header(1));
        assert_eq!(lookup(&path).map(|h| h.key.step), Some(1));

        // Read, then replaced before the verification is recorded: the new file is not vouched for.
        let (_, stamp) = read(&path).unwrap();
        replace(&path, b"second");
        record_read(&path, stamp.unwrap(), header(2));
        assert!(lookup(&path).is_none(), "a replaced file is never taken for the one verified");

        // A write in place (same inode) changes the stamp too.
        record(&path, header(3));
        assert_eq!(lookup(&path).map(|h| h.key.step), Some(3));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"!").unwrap();
        assert!(lookup(&path).is_none());
    }
}
