//! The checkpoint directory: atomic saves, finding the newest complete step, assembling
//! ranges across splits, pruning and scanning.

use super::format::{self, FileKey, FILE_PREFIX, FILE_SUFFIX, TEMP_PREFIX};
use super::verified::{self, Header};
use super::{CheckpointError, RangeCheckpoint};
use crate::model::kernel::{self, KernelFingerprint};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffer between the encoder's small writes and the file.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Room reserved for a file's header (lengths, metadata, ledger) when it is encoded in memory;
/// a larger header only grows the buffer.
const ENCODED_HEADER_ROOM: usize = 4096;

/// One checkpoint directory. See the [module docs](super) for the format and the
/// atomicity argument.
#[derive(Debug)]
pub struct CheckpointStore {
    dir: PathBuf,
    /// Makes temp names unique among concurrent saves of this process.
    temp_seq: AtomicU64,
    /// Fault injection: abort the process between writing and renaming the
    /// checkpoint of this step.
    #[cfg(feature = "fault-injection")]
    crash_before_rename: Option<u64>,
}

/// What [`CheckpointStore::scan`] found about one checkpoint file.
#[derive(Debug)]
pub struct ScannedFile {
    /// The file.
    pub path: PathBuf,
    /// The step, as its name says.
    pub step: u64,
    /// Start of its range, as its name says.
    pub offset: usize,
    /// Length of its range, as its name says.
    pub len: usize,
    /// What a full verification found: a summary of the contents, or why the file is
    /// unusable.
    pub outcome: Result<FileSummary, CheckpointError>,
}

/// The header facts of a verified checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSummary {
    /// Hex SHA-256 of the job config that wrote it.
    pub config_hash: String,
    /// Length of the full parameter vector.
    pub total_len: usize,
    /// Optimizer step counter.
    pub optimizer_t: u64,
    /// Optimizer slot names, in order.
    pub slots: Vec<String>,
}

/// What every file of one step must agree on.
#[derive(PartialEq)]
struct Shared {
    optimizer_t: u64,
    slots: Vec<String>,
    ledger: crate::protocol::Ledger,
    kernel: Option<KernelFingerprint>,
}

/// The part of one verified file that overlaps the requested range.
struct Part {
    /// Absolute index of `params[0]`.
    start: usize,
    params: Vec<f32>,
    slots: Vec<Vec<f32>>,
}

/// A verified file chosen to cover a range.
struct Chosen {
    key: FileKey,
    shared: Shared,
    /// Present when the caller asked for data.
    part: Option<Part>,
}

impl CheckpointStore {
    /// Opens (creating if needed) the checkpoint directory and removes temporary files
    /// left by a crash between write and rename, logging each.
    ///
    /// Call it before any save of this process: a temp file being written by another
    /// live process in the same directory would be removed too.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CheckpointError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
        let store = CheckpointStore::reader(dir);
        for name in store.file_names()? {
            if name.starts_with(TEMP_PREFIX) {
                let path = store.dir.join(&name);
                tracing::warn!(
                    path = %path.display(),
                    "removing leftover temporary checkpoint file {}",
                    path.display()
                );
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("removing", &path)(e)),
                    _ => {}
                }
            }
        }
        Ok(store)
    }

    /// A view of the existing directory `dir` for reading, listing and
    /// pruning: unlike [`open`](Self::open) it creates nothing and removes no
    /// temporary file, so it is safe beside a live writer (an aggregator saving
    /// in the same directory). A missing directory reads as empty.
    pub fn reader(dir: impl Into<PathBuf>) -> Self {
        CheckpointStore {
            dir: dir.into(),
            temp_seq: AtomicU64::new(0),
            #[cfg(feature = "fault-injection")]
            crash_before_rename: None,
        }
    }

    /// The files (by final name) holding checkpoint `step`, whatever their
    /// range; unverified. Empty when there are none.
    pub fn files_of_step(&self, step: u64) -> Result<Vec<PathBuf>, CheckpointError> {
        let by_step = self.keys_by_step()?;
        Ok(by_step.get(&step).into_iter().flatten().map(|key| self.dir.join(key.file_name())).collect())
    }

    /// Fault injection for chaos tests of whole processes: the save of `step`
    /// writes and fsyncs its temporary file, then aborts the process before the
    /// rename, as a crash at the worst moment would. Only with the cargo feature
    /// `fault-injection`.
    #[cfg(feature = "fault-injection")]
    pub fn with_crash_before_rename(mut self, step: Option<u64>) -> Self {
        self.crash_before_rename = step;
        self
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `ckpt` atomically under its final name and returns that path: once this
    /// returns `Ok`, the file survives a crash or power loss; before, a crash leaves at most
    /// a temporary file, never a partial file under the final name. An existing file of
    /// the same step and range is replaced.
    pub fn save(&self, ckpt: &RangeCheckpoint) -> Result<PathBuf, CheckpointError> {
        let (temp_path, final_path) = self.write_temp(ckpt)?;
        self.install(ckpt, &temp_path, &final_path)?;
        Ok(final_path)
    }

    /// [`save`](Self::save), returning the file's bytes too, for a caller that copies them to
    /// other nodes (encoded once, in memory, then written: no reading the file back).
    pub fn save_keeping_bytes(&self, ckpt: &RangeCheckpoint) -> Result<(PathBuf, Vec<u8>), CheckpointError> {
        let final_path = self.final_path(ckpt)?;
        let tensors = 1 + ckpt.optimizer_slots.len();
        let mut bytes = Vec::with_capacity(ENCODED_HEADER_ROOM + tensors * ckpt.params.len() * 4);
        format::write_checkpoint(&mut bytes, ckpt).map_err(io_err("encoding", &final_path))?;
        let temp_path = self.write_temp_with(&final_path, |out| out.write_all(&bytes))?;
        self.install(ckpt, &temp_path, &final_path)?;
        Ok((final_path, bytes))
    }

    /// Puts a saved temporary file of `ckpt` in place (see [`save`](Self::save)).
    fn install(&self, ckpt: &RangeCheckpoint, temp_path: &Path, final_path: &Path) -> Result<(), CheckpointError> {
        #[cfg(feature = "fault-injection")]
        if self.crash_before_rename == Some(ckpt.step) {
            tracing::error!(path = %temp_path.display(), "injected crash before renaming checkpoint {}", final_path.display());
            eprintln!("injected crash: wrote {} and abort before renaming it", temp_path.display());
            std::process::abort();
        }
        self.rename_into_place(temp_path, final_path)?;
        verified::record(final_path, Header::of(ckpt));
        Ok(())
    }

    /// Renames a durable temporary file to its final name, durably.
    fn rename_into_place(&self, temp_path: &Path, final_path: &Path) -> Result<(), CheckpointError> {
        // rename(2) within one directory is atomic: readers see the old file or the new
        // complete one. It only reaches the disk with the directory's metadata, hence the
        // directory fsync below.
        if let Err(e) = fs::rename(temp_path, final_path) {
            let _ = fs::remove_file(temp_path);
            return Err(io_err("renaming a temporary file to", final_path)(e));
        }
        // Without this fsync a power loss can forget the rename even though we reported
        // the checkpoint durable, and the cluster would roll back further than it agreed.
        self.sync_dir()
    }

    /// Keeps `bytes`, a checkpoint file named `name` that another node wrote: verifies them
    /// fully first (as [`read_file`](Self::read_file) would; nothing is written if they fail),
    /// then writes them atomically and durably as [`save`](Self::save) does. Returns the path.
    pub fn save_copy(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, CheckpointError> {
        let Some(key) = FileKey::parse(name).filter(|key| key.file_name() == name) else {
            return Err(CheckpointError::Corrupt {
                path: self.dir.join(name.replace(['/', '\\'], "_")),
                reason: format!("{name:?} is not a checkpoint file name"),
            });
        };
        let final_path = self.dir.join(key.file_name());
        let header = format::verify(&final_path, bytes)?.header;
        let temp_path = self.write_temp_with(&final_path, |out| out.write_all(bytes))?;
        self.rename_into_place(&temp_path, &final_path)?;
        verified::record(&final_path, header);
        Ok(final_path)
    }

    /// Like [`save`](Self::save) but stops after writing and fsyncing the temporary file,
    /// as a crash between write and rename would. Returns the temporary file's path. For
    /// fault tests: only in tests and with the cargo feature `fault-injection`.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn save_without_rename(&self, ckpt: &RangeCheckpoint) -> Result<PathBuf, CheckpointError> {
        self.write_temp(ckpt).map(|(temp_path, _)| temp_path)
    }

    /// Reads and fully verifies one checkpoint file: safetensors structure, checksum,
    /// version, dtypes, lengths, range bounds and agreement of the name with the contents.
    /// It does not check the config hash or total length: the caller compares those.
    pub fn read_file(path: &Path) -> Result<RangeCheckpoint, CheckpointError> {
        let bytes = fs::read(path).map_err(io_err("reading", path))?;
        format::decode(path, &bytes)
    }

    /// The newest step whose verified files for `config_hash` tile `[0, total_len)`, or
    /// `None`. Unusable files (torn, corrupt, another config or total length, unreadable)
    /// are logged with their reason and skipped, as is a step whose files disagree.
    /// Only the files needed to decide are read, newest step first.
    ///
    /// A file of the job computed with another kernel ([`crate::model::kernel`]) is an
    /// error, [`CheckpointError::KernelMismatch`], not skipped: resuming from an older step
    /// or from scratch would quietly train a model no fault-free run gives.
    pub fn newest_complete(&self, config_hash: &str, total_len: usize) -> Result<Option<u64>, CheckpointError> {
        for (step, keys) in self.keys_by_step()?.iter().rev() {
            if self.is_complete(*step, keys, config_hash, total_len)? {
                return Ok(Some(*step));
            }
        }
        Ok(None)
    }

    /// Assembles the state of `[offset, offset + len)` at `step` from the verified files
    /// of that step, whatever split wrote them. Files are chosen greedily (at each
    /// position the one reaching furthest); unusable ones are logged and replaced by
    /// others if possible. Errors with `Incomplete` naming the first uncovered gap.
    pub fn load_range(
        &self,
        step: u64,
        config_hash: &str,
        total_len: usize,
        offset: usize,
        len: usize,
    ) -> Result<RangeCheckpoint, CheckpointError> {
        let end = offset.checked_add(len).filter(|end| *end <= total_len).ok_or(CheckpointError::RangeOutOfBounds {
            offset,
            len,
            total_len,
        })?;
        let by_step = self.keys_by_step()?;
        let keys = by_step.get(&step).map(Vec::as_slice).unwrap_or_default();
        let query = Query { step, config_hash, total_len, start: offset, end, keep_data: true };
        let chosen = self.resolve(keys, &query)?;

        let mut params = Vec::with_capacity(len);
        let first = chosen.first().expect("resolve returns at least one file");
        let mut slots: Vec<Vec<f32>> = vec![Vec::with_capacity(len); first.shared.slots.len()];
        for file in &chosen {
            let part = file.part.as_ref().expect("parts are kept when asked for");
            // The greedy cover gives files in order, each starting at or before the
            // current position: copy from there to the end of the part.
            let from = offset + params.len() - part.start;
            params.extend_from_slice(&part.params[from..]);
            for (out, values) in slots.iter_mut().zip(&part.slots) {
                out.extend_from_slice(&values[from..]);
            }
        }
        debug_assert_eq!(params.len(), len);
        let Chosen { shared, .. } = chosen.into_iter().next().expect("checked above");
        Ok(RangeCheckpoint {
            step,
            config_hash: config_hash.to_string(),
            total_len,
            offset,
            params,
            optimizer_t: shared.optimizer_t,
            optimizer_slots: shared.slots.into_iter().zip(slots).collect(),
            ledger: shared.ledger,
            kernel: shared.kernel,
        })
    }

    /// Keeps the files of the newest `keep` complete steps (at least one) and of every
    /// newer step, and deletes the checkpoint files of all older steps, whatever their
    /// config. With fewer than `keep` complete steps nothing is deleted. Returns the
    /// deleted paths.
    pub fn prune(&self, config_hash: &str, total_len: usize, keep: usize) -> Result<Vec<PathBuf>, CheckpointError> {
        // Deleting every complete step would leave nothing to recover from.
        let keep = keep.max(1);
        let by_step = self.keys_by_step()?;
        let mut complete = by_step
            .iter()
            .rev()
            .filter(|(step, keys)| self.is_complete(**step, keys, config_hash, total_len).unwrap_or(false));
        let Some((&oldest_kept, _)) = complete.nth(keep - 1) else {
            return Ok(Vec::new());
        };
        let removed = self.remove(by_step.range(..oldest_kept).flat_map(|(_, keys)| keys))?;
        if !removed.is_empty() {
            tracing::debug!(
                dir = %self.dir.display(),
                count = removed.len(),
                oldest_kept,
                "pruned old checkpoint files"
            );
        }
        Ok(removed)
    }

    /// Whether the files of `step` here cover `[offset, offset + len)`, by their names (a file
    /// is named once renamed into place, whole; verifying it is the restore's job).
    pub fn covers(&self, step: u64, offset: usize, len: usize) -> bool {
        let Ok(by_step) = self.keys_by_step() else { return false };
        let Some(keys) = by_step.get(&step) else { return false };
        let end = offset.saturating_add(len);
        let mut reach = offset;
        for key in keys {
            if key.offset <= reach && key.end() > reach {
                reach = key.end();
            }
        }
        reach >= end
    }

    /// Keeps the files of `[offset, offset + len)` of its newest `keep` steps (at least one) and
    /// of every newer step, and deletes this range's files of older steps — except at the
    /// newest `keep` steps whose file names tile the whole vector (a node holding whole
    /// checkpoints keeps them whole; [`prune`](Self::prune) thins those). For a node that holds
    /// only the files of the ranges it runs (aggregators spread over the nodes), where no step
    /// is complete and `prune` deletes nothing. Reads names only. Returns the deleted paths.
    pub fn prune_range(
        &self,
        total_len: usize,
        keep: usize,
        offset: usize,
        len: usize,
    ) -> Result<Vec<PathBuf>, CheckpointError> {
        let keep = keep.max(1);
        let by_step = self.keys_by_step()?;
        let own = |keys: &[FileKey]| keys.iter().any(|k| (k.offset, k.len) == (offset, len));
        let Some(oldest_kept) = by_step.iter().rev().filter(|(_, keys)| own(keys)).nth(keep - 1).map(|(s, _)| *s)
        else {
            return Ok(Vec::new());
        };
        let whole: Vec<u64> =
            by_step.iter().rev().filter(|(_, keys)| tiles(keys, total_len)).take(keep).map(|(s, _)| *s).collect();
        let old = by_step.range(..oldest_kept).filter(|(step, _)| !whole.contains(step));
        self.remove(old.flat_map(|(_, keys)| keys).filter(|k| (k.offset, k.len) == (offset, len)))
    }

    /// Delete the files of `keys` (one already gone counts as deleted by someone else: the
    /// goal is reached), then make the deletions durable so the space is really free after a
    /// crash. Returns the deleted paths.
    fn remove<'k>(&self, keys: impl Iterator<Item = &'k FileKey>) -> Result<Vec<PathBuf>, CheckpointError> {
        let mut removed = Vec::new();
        for key in keys {
            let path = self.dir.join(key.file_name());
            verified::forget(&path);
            match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            }
        }
        if !removed.is_empty() {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// Reports every checkpoint file (by name) with the outcome of a full verification,
    /// sorted by step, offset and length. Reads every file: for diagnostics and tests.
    pub fn scan(&self) -> Result<Vec<ScannedFile>, CheckpointError> {
        let mut out = Vec::new();
        for keys in self.keys_by_step()?.into_values() {
            for key in keys {
                let path = self.dir.join(key.file_name());
                let outcome = Self::read_file(&path).map(|ckpt| FileSummary {
                    config_hash: ckpt.config_hash,
                    total_len: ckpt.total_len,
                    optimizer_t: ckpt.optimizer_t,
                    slots: ckpt.optimizer_slots.into_iter().map(|(n, _)| n).collect(),
                });
                out.push(ScannedFile { path, step: key.step, offset: key.offset, len: key.len, outcome });
            }
        }
        Ok(out)
    }

    /// Validates `ckpt`, writes it to a fresh temporary file and makes that durable.
    /// Returns (temporary path, final path). Removes the temporary file on failure.
    fn write_temp(&self, ckpt: &RangeCheckpoint) -> Result<(PathBuf, PathBuf), CheckpointError> {
        let final_path = self.final_path(ckpt)?;
        let temp_path = self.write_temp_with(&final_path, |out| format::write_checkpoint(out, ckpt))?;
        Ok((temp_path, final_path))
    }

    /// Validates `ckpt` and names its file.
    fn final_path(&self, ckpt: &RangeCheckpoint) -> Result<PathBuf, CheckpointError> {
        format::validate(ckpt).map_err(|reason| CheckpointError::Invalid {
            step: ckpt.step,
            offset: ckpt.offset,
            reason,
        })?;
        let key = FileKey { step: ckpt.step, offset: ckpt.offset, len: ckpt.params.len() };
        Ok(self.dir.join(key.file_name()))
    }

    /// Writes a fresh temporary file beside `final_path` with `write` and makes it durable.
    /// Returns its path. Removes it on failure.
    fn write_temp_with(
        &self,
        final_path: &Path,
        write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> Result<PathBuf, CheckpointError> {
        let final_name = final_path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        // Same directory as the final file, so the rename cannot cross file systems.
        let temp_path = self.dir.join(format!("{TEMP_PREFIX}{final_name}-{}-{seq}", std::process::id()));
        let written = (|| {
            let file = File::create(&temp_path).map_err(io_err("creating", &temp_path))?;
            let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
            write(&mut out).map_err(io_err("writing", &temp_path))?;
            // Flush explicitly: dropping a BufWriter swallows a late write error such as
            // a full disk.
            let file = out.into_inner().map_err(|e| io_err("writing", &temp_path)(e.into_error()))?;
            // fsync the data before the rename: otherwise a power loss can persist the
            // rename but not the contents, leaving a final-named file of zeros.
            file.sync_all().map_err(io_err("syncing", &temp_path))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp_path);
            return Err(e);
        }
        Ok(temp_path)
    }

    fn sync_dir(&self) -> Result<(), CheckpointError> {
        File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io_err("syncing directory", &self.dir))
    }

    /// Every entry name of the directory that is valid UTF-8.
    fn file_names(&self) -> Result<Vec<String>, CheckpointError> {
        let listing = io_err("listing", &self.dir);
        let mut names = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            // A directory that was never created (or was wiped) holds no checkpoint.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            other => other.map_err(&listing)?,
        };
        for entry in entries {
            if let Ok(name) = entry.map_err(&listing)?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// The final-named checkpoint files, grouped by step, each group sorted by range.
    fn keys_by_step(&self) -> Result<BTreeMap<u64, Vec<FileKey>>, CheckpointError> {
        let mut by_step: BTreeMap<u64, Vec<FileKey>> = BTreeMap::new();
        for name in self.file_names()? {
            if !name.starts_with(FILE_PREFIX) || !name.ends_with(FILE_SUFFIX) {
                continue;
            }
            match FileKey::parse(&name) {
                Some(key) => by_step.entry(key.step).or_default().push(key),
                None => tracing::warn!(
                    path = %self.dir.join(&name).display(),
                    "ignoring file with a malformed checkpoint name {name}"
                ),
            }
        }
        for keys in by_step.values_mut() {
            keys.sort_unstable();
        }
        Ok(by_step)
    }

    /// Whether `step` is complete; `Err` only for a file of another kernel.
    fn is_complete(
        &self,
        step: u64,
        keys: &[FileKey],
        config_hash: &str,
        total_len: usize,
    ) -> Result<bool, CheckpointError> {
        let query = Query { step, config_hash, total_len, start: 0, end: total_len, keep_data: false };
        match self.resolve(keys, &query) {
            Ok(_) => Ok(true),
            Err(e @ CheckpointError::KernelMismatch { .. }) => Err(e),
            Err(e @ CheckpointError::Inconsistent { .. }) => {
                tracing::warn!(step, error = %e, "skipping inconsistent checkpoint step: {e}");
                Ok(false)
            }
            Err(e) => {
                tracing::debug!(step, error = %e, "checkpoint step is not complete");
                Ok(false)
            }
        }
    }

    /// Chooses, reads and verifies files of `query.step` (among `keys`) until they cover
    /// `[query.start, query.end)`, replacing unusable files by others where possible.
    /// Returns the chosen files in range order, or `Incomplete` / `Inconsistent`.
    fn resolve(&self, keys: &[FileKey], query: &Query<'_>) -> Result<Vec<Chosen>, CheckpointError> {
        let mut usable: BTreeSet<FileKey> = keys.iter().copied().collect();
        let mut verified: BTreeMap<FileKey, Chosen> = BTreeMap::new();
        'plan: loop {
            let plan = plan_cover(&usable, query.start, query.end).map_err(|(gap_start, gap_end)| {
                CheckpointError::Incomplete { dir: self.dir.clone(), step: query.step, gap_start, gap_end }
            })?;
            for key in &plan {
                if verified.contains_key(key) {
                    continue;
                }
                let path = self.dir.join(key.file_name());
                // A query without data trusts a file this process already verified (see
                // `verified`); one for data reads and verifies what it restores.
                let known = if query.keep_data { None } else { verified::lookup(&path) };
                let outcome = match known {
                    Some(header) => query.accept(&path, header, None),
                    None => {
                        #[cfg(test)]
                        tests::FULL_READS.with(|n| n.set(n.get() + 1));
                        verified::read(&path).map_err(io_err("reading", &path)).and_then(|(bytes, read)| {
                            // Decoded only when the caller needs the data.
                            let (header, ckpt) = if query.keep_data {
                                let ckpt = format::decode(&path, &bytes)?;
                                (Header::of(&ckpt), Some(ckpt))
                            } else {
                                (format::verify(&path, &bytes)?.header, None)
                            };
                            if let Some(read) = read {
                                verified::record_read(&path, read, header.clone());
                            }
                            query.accept(&path, header, ckpt.as_ref())
                        })
                    }
                };
                match outcome {
                    Ok(chosen) => {
                        verified.insert(*key, chosen);
                    }
                    // Not a damaged file another copy can stand in for: the job's state was
                    // computed elsewhere.
                    Err(e @ CheckpointError::KernelMismatch { .. }) => return Err(e),
                    Err(e) => {
                        tracing::warn!(
                            path = %path.display(),
                            error = %e,
                            "skipping checkpoint file {}: {e}",
                            path.display()
                        );
                        usable.remove(key);
                        continue 'plan;
                    }
                }
            }
            let chosen: Vec<Chosen> =
                plan.iter().map(|key| verified.remove(key).expect("every planned file was verified")).collect();
            check_consistent(&self.dir, query.step, &chosen)?;
            return Ok(chosen);
        }
    }
}

/// What a caller of `resolve` asks for.
struct Query<'a> {
    step: u64,
    config_hash: &'a str,
    total_len: usize,
    start: usize,
    end: usize,
    /// Keep the overlapping data of each file (for `load_range`), not just its header.
    keep_data: bool,
}

impl Query<'_> {
    /// Checks a verified file (its header; its data when the caller asked for data) against
    /// the job and keeps what the caller needs of it.
    fn accept(&self, path: &Path, header: Header, ckpt: Option<&RangeCheckpoint>) -> Result<Chosen, CheckpointError> {
        if header.config_hash != self.config_hash {
            return Err(CheckpointError::ConfigMismatch {
                path: path.to_path_buf(),
                expected: self.config_hash.to_string(),
                found: header.config_hash,
            });
        }
        if header.total_len != self.total_len {
            return Err(CheckpointError::TotalLenMismatch {
                path: path.to_path_buf(),
                expected: self.total_len,
                found: header.total_len,
            });
        }
        if let Some(found) = header.kernel.filter(|found| *found != kernel::fingerprint()) {
            return Err(CheckpointError::KernelMismatch {
                path: path.to_path_buf(),
                expected: kernel::fingerprint(),
                found,
                description: kernel::description(),
            });
        }
        let key = header.key;
        let part = match (self.keep_data, ckpt) {
            (false, _) => None,
            (true, Some(ckpt)) => {
                // Overlap of the file's range with the query, relative to the file.
                let from = self.start.clamp(key.offset, key.end()) - key.offset;
                let to = self.end.clamp(key.offset, key.end()) - key.offset;
                Some(Part {
                    start: key.offset + from,
                    params: ckpt.params[from..to].to_vec(),
                    slots: ckpt.optimizer_slots.iter().map(|(_, values)| values[from..to].to_vec()).collect(),
                })
            }
            (true, None) => unreachable!("data queries always read the file"),
        };
        Ok(Chosen {
            key,
            shared: Shared {
                optimizer_t: header.optimizer_t,
                slots: header.slots,
                ledger: header.ledger,
                kernel: header.kernel,
            },
            part,
        })
    }
}

/// Every file of a step must carry the same optimizer counter, slots and ledger; if not,
/// the step was written by diverging aggregators and must not be restored.
fn check_consistent(dir: &Path, step: u64, chosen: &[Chosen]) -> Result<(), CheckpointError> {
    let Some((first, rest)) = chosen.split_first() else {
        return Ok(());
    };
    for other in rest {
        let a = &first.shared;
        let b = &other.shared;
        let reason = if a.optimizer_t != b.optimizer_t {
            format!("optimizer_t {} != {}", b.optimizer_t, a.optimizer_t)
        } else if a.slots != b.slots {
            format!("optimizer slots {:?} != {:?}", b.slots, a.slots)
        } else if a.ledger != b.ledger {
            "the sample ledger differs".to_string()
        } else {
            continue;
        };
        return Err(CheckpointError::Inconsistent {
            path: dir.join(other.key.file_name()),
            step,
            reason: format!("{reason} (compared with {})", first.key.file_name()),
        });
    }
    Ok(())
}

/// Greedy cover of `[start, end)` by the ranges of `keys` (all of one step): at each
/// position take the file reaching furthest. Deterministic, and minimal in file count.
/// An empty range still needs one file touching `start`, to learn the shared state.
/// `Err` holds the first gap.
fn plan_cover(keys: &BTreeSet<FileKey>, start: usize, end: usize) -> Result<Vec<FileKey>, (usize, usize)> {
    if start == end {
        return keys.iter().find(|k| k.offset <= start && start <= k.end()).map(|k| vec![*k]).ok_or((start, end));
    }
    let mut plan = Vec::new();
    let mut pos = start;
    while pos < end {
        let best = keys.iter().filter(|k| k.offset <= pos && pos < k.end()).max_by_key(|k| k.end());
        let Some(best) = best else {
            let gap_end = keys.iter().map(|k| k.offset).filter(|o| *o > pos).min().map_or(end, |o| o.min(end));
            return Err((pos, gap_end));
        };
        plan.push(*best);
        pos = best.end();
    }
    Ok(plan)
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl Fn(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io { op, path: path.to_path_buf(), source }
}

/// The names `keys` (sorted) cover `[0, total_len)`.
fn tiles(keys: &[FileKey], total_len: usize) -> bool {
    let mut reach = 0;
    for key in keys {
        if key.offset > reach {
            return false;
        }
        reach = reach.max(key.end());
    }
    reach >= total_len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::format::tests::{assert_bitwise_eq, sample};
    use proptest::prelude::*;

    const HASH: &str = "a1b2c3";

    fn store() -> (tempfile::TempDir, CheckpointStore) {
        let tmp = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(tmp.path().join("ckpt")).unwrap();
        (tmp, store)
    }

    /// Saves `step` split at `bounds` (e.g. [0, 40, 70, 100]); returns the paths.
    fn save_split(store: &CheckpointStore, step: u64, bounds: &[usize], slots: &[&str]) -> Vec<PathBuf> {
        let total = *bounds.last().unwrap();
        bounds.windows(2).map(|w| store.save(&sample(step, total, w[0], w[1] - w[0], slots)).unwrap()).collect()
    }

    thread_local! {
        /// Files `resolve` read and verified on this thread (tests run on their own threads).
        pub(super) static FULL_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn full_reads() -> u64 {
        FULL_READS.with(std::cell::Cell::get)
    }

    fn flip_last_byte(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        fs::write(path, bytes).unwrap();
    }

    fn names(store: &CheckpointStore) -> Vec<String> {
        let mut names = store.file_names().unwrap();
        names.sort();
        names
    }

    #[test]
    fn save_then_read_file_is_bitwise_equal_with_zero_one_and_two_slots() {
        let (_tmp, store) = store();
        for (step, slots) in [(1, &[][..]), (2, &["m"]), (3, &["m", "v"])] {
            let ckpt = sample(step, 100, 30, 40, slots);
            let path = store.save(&ckpt).unwrap();
            assert_eq!(
                path.file_name().unwrap().to_str().unwrap(),
                format!("ckpt-{step:010}-0000000030-0000000040.safetensors")
            );
            assert_bitwise_eq(&ckpt, &CheckpointStore::read_file(&path).unwrap());
        }
    }

    #[test]
    fn saved_file_is_valid_safetensors() {
        let (_tmp, store) = store();
        let ckpt = sample(1, 10, 0, 10, &["m"]);
        let bytes = fs::read(store.save(&ckpt).unwrap()).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let expected: Vec<u8> = ckpt.params.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(st.tensor("params").unwrap().data(), expected.as_slice());
    }

    #[test]
    fn save_replaces_a_file_of_the_same_step_and_range() {
        let (_tmp, store) = store();
        let mut ckpt = sample(1, 10, 0, 10, &[]);
        store.save(&ckpt).unwrap();
        ckpt.params[0] = 42.0;
        let path = store.save(&ckpt).unwrap();
        assert_eq!(CheckpointStore::read_file(&path).unwrap().params[0], 42.0);
        assert_eq!(names(&store).len(), 1);
    }

    #[test]
    fn save_rejects_an_invalid_checkpoint_and_writes_nothing() {
        let (_tmp, store) = store();
        let mut ckpt = sample(1, 10, 0, 10, &["m"]);
        ckpt.optimizer_slots[0].1.pop();
        let err = store.save(&ckpt).unwrap_err();
        assert!(matches!(err, CheckpointError::Invalid { step: 1, .. }), "{err}");
        assert!(names(&store).is_empty());
    }

    #[test]
    fn save_without_rename_leaves_only_a_temp_file_that_open_removes() {
        let (_tmp, store) = store();
        let temp = store.save_without_rename(&sample(10, 10, 0, 10, &["m"])).unwrap();
        let listed = names(&store);
        assert_eq!(listed.len(), 1);
        assert!(listed[0].starts_with(".tmp-ckpt-0000000010-"), "{listed:?}");
        assert_eq!(temp.file_name().unwrap().to_str().unwrap(), listed[0]);
        assert!(FileKey::parse(&listed[0]).is_none());
        assert_eq!(store.newest_complete(HASH, 10).unwrap(), None);
        assert!(store.scan().unwrap().is_empty());

        let reopened = CheckpointStore::open(store.dir()).unwrap();
        assert!(names(&reopened).is_empty());
        assert!(!temp.exists());
    }

    #[test]
    fn a_crash_before_rename_keeps_the_previous_complete_step() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 5, 10], &[]);
        store.save(&sample(20, 10, 0, 5, &[])).unwrap();
        store.save_without_rename(&sample(20, 10, 5, 5, &[])).unwrap();
        assert_eq!(store.newest_complete(HASH, 10).unwrap(), Some(10));
    }

    #[test]
    fn newest_complete_skips_missing_and_corrupt_ranges() {
        let (_tmp, store) = store();
        let bounds = [0, 40, 70, 100];
        save_split(&store, 10, &bounds, &["m", "v"]);
        let step20 = save_split(&store, 20, &bounds, &["m", "v"]);
        fs::remove_file(&step20[2]).unwrap();
        let step30 = save_split(&store, 30, &bounds, &["m", "v"]);
        flip_last_byte(&step30[1]);
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(10));
    }

    #[test]
    fn files_this_process_wrote_or_verified_are_not_read_again_until_restored() {
        let (_tmp, store) = store();
        let bounds = [0, 40, 70, 100];
        for step in [10, 20, 30, 40] {
            save_split(&store, step, &bounds, &["m"]);
        }
        // A file this process did not write (as after a restart): read and verified once.
        let foreign = store.save(&sample(50, 100, 0, 100, &["m"])).unwrap();
        verified::forget(&foreign);
        let reads = full_reads();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(50));
        assert_eq!(full_reads() - reads, 1, "only the file this process had not verified is read");
        let reads = full_reads();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(50));
        let pruned = store.prune(HASH, 100, 2).unwrap();
        assert_eq!(pruned.len(), 9, "steps 10, 20 and 30 go");
        assert_eq!(full_reads() - reads, 0, "pruning trusts what this process verified");
        // A restore reads and verifies every file it restores from.
        let reads = full_reads();
        store.load_range(40, HASH, 100, 0, 100).unwrap();
        assert_eq!(full_reads() - reads, 3);
        // A file written over in place is verified again (and found corrupt).
        flip_last_byte(&foreign);
        let reads = full_reads();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(40));
        assert_eq!(full_reads() - reads, 1);
    }

    #[test]
    fn save_keeping_bytes_returns_the_bytes_save_writes() {
        let (_tmp, store) = store();
        let (_other_tmp, other) = super::tests::store();
        let ckpt = sample(5, 100, 20, 50, &["m", "v"]);
        let (path, bytes) = store.save_keeping_bytes(&ckpt).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(fs::read(other.save(&ckpt).unwrap()).unwrap(), bytes);
        assert_bitwise_eq(&ckpt, &CheckpointStore::read_file(&path).unwrap());
        let err = store.save_keeping_bytes(&sample(6, 10, 5, 50, &[])).unwrap_err();
        assert!(matches!(err, CheckpointError::Invalid { step: 6, offset: 5, .. }), "{err}");
    }

    #[test]
    fn a_copy_is_verified_before_it_is_written() {
        let (_tmp, store) = store();
        let (_src_tmp, src) = super::tests::store();
        let path = src.save(&sample(7, 100, 0, 100, &["m"])).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let bytes = fs::read(&path).unwrap();
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 0x01;
        let err = store.save_copy(&name, &bad).unwrap_err();
        assert!(matches!(err, CheckpointError::ChecksumMismatch { .. }), "{err}");
        let err = store.save_copy(&bytes.len().to_string(), &bytes).unwrap_err();
        assert!(err.to_string().contains("is not a checkpoint file name"), "{err}");
        let other = FileKey { step: 8, offset: 0, len: 100 }.file_name();
        let err = store.save_copy(&other, &bytes).unwrap_err();
        assert!(err.to_string().contains("does not match its metadata"), "{err}");
        assert!(names(&store).is_empty(), "nothing is written for a bad copy: {:?}", names(&store));

        let kept = store.save_copy(&name, &bytes).unwrap();
        assert_eq!(fs::read(&kept).unwrap(), bytes);
        assert_eq!(names(&store), vec![name]);
        let reads = full_reads();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(7));
        assert_eq!(full_reads() - reads, 0, "verified when it arrived");
    }

    #[test]
    fn newest_complete_skips_other_configs_and_total_lengths() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 50, 100], &[]);
        for offset in [0, 50] {
            let mut other = sample(20, 100, offset, 50, &[]);
            other.config_hash = "ffff".into();
            store.save(&other).unwrap();
        }
        save_split(&store, 30, &[0, 50, 110], &[]);
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(10));
        assert_eq!(store.newest_complete("ffff", 100).unwrap(), Some(20));
        assert_eq!(store.newest_complete(HASH, 110).unwrap(), Some(30));
        assert_eq!(store.newest_complete("0000", 100).unwrap(), None);
    }

    /// A step computed with another kernel is an error naming the file and both kernels, not a
    /// step to skip (resuming from step 10 or from scratch would give other bits); files that
    /// predate the kernel record load anywhere, and pruning goes on past a foreign step.
    #[test]
    fn a_step_of_another_kernel_is_an_error_not_skipped() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 50, 100], &[]);
        let here = kernel::fingerprint();
        let foreign = KernelFingerprint(here.0 ^ 0x8000_0000_0000_0001);
        let mut paths = Vec::new();
        for offset in [0, 50] {
            let mut other = sample(20, 100, offset, 50, &[]);
            other.kernel = Some(foreign);
            paths.push(store.save(&other).unwrap());
        }
        match store.newest_complete(HASH, 100).unwrap_err() {
            CheckpointError::KernelMismatch { path, expected, found, .. } => {
                assert!(paths.contains(&path), "{}", path.display());
                assert_eq!((expected, found), (here, foreign));
            }
            other => panic!("expected a kernel mismatch, got {other}"),
        }
        let text = store.load_range(20, HASH, 100, 0, 100).unwrap_err().to_string();
        assert!(text.contains(&foreign.to_string()) && text.contains(&here.to_string()), "{text}");
        // Files without a kernel (written before it was recorded) are this machine's to load.
        for offset in [0, 50] {
            let mut old = sample(30, 100, offset, 50, &[]);
            old.kernel = None;
            store.save(&old).unwrap();
        }
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(30));
        assert_eq!(store.load_range(30, HASH, 100, 0, 100).unwrap().kernel, None);
        assert_eq!(store.load_range(10, HASH, 100, 0, 100).unwrap().kernel, Some(here));
    }

    #[test]
    fn newest_complete_is_none_in_an_empty_directory() {
        let (_tmp, store) = store();
        fs::write(store.dir().join("notes.txt"), b"x").unwrap();
        fs::write(store.dir().join("ckpt-1-2-3.safetensors"), b"x").unwrap();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), None);
    }

    #[test]
    fn a_corrupt_file_is_replaced_by_files_of_another_split() {
        let (_tmp, store) = store();
        let three = save_split(&store, 10, &[0, 40, 70, 100], &["m"]);
        save_split(&store, 10, &[0, 50, 100], &["m"]);
        flip_last_byte(&three[1]);
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(10));
        let whole = store.load_range(10, HASH, 100, 0, 100).unwrap();
        assert_bitwise_eq(&whole, &sample(10, 100, 0, 100, &["m"]));
    }

    #[test]
    fn load_range_assembles_across_a_different_split() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 40, 70, 100], &["m", "v"]);
        for (offset, len) in [(0, 100), (25, 50), (40, 30), (39, 2), (99, 1), (70, 0), (0, 0), (100, 0)] {
            let got = store.load_range(10, HASH, 100, offset, len).unwrap();
            assert_bitwise_eq(&got, &sample(10, 100, offset, len, &["m", "v"]));
        }
    }

    #[test]
    fn load_range_with_a_gap_is_incomplete_naming_step_and_gap() {
        let (_tmp, store) = store();
        let paths = save_split(&store, 10, &[0, 40, 70, 100], &[]);
        fs::remove_file(&paths[1]).unwrap();
        let err = store.load_range(10, HASH, 100, 30, 50).unwrap_err();
        assert!(matches!(err, CheckpointError::Incomplete { step: 10, gap_start: 40, gap_end: 70, .. }), "{err}");
        assert!(err.to_string().contains("step 10"), "{err}");
        assert!(store.load_range(10, HASH, 100, 0, 40).is_ok());
        let err = store.load_range(11, HASH, 100, 0, 40).unwrap_err();
        assert!(matches!(err, CheckpointError::Incomplete { step: 11, gap_start: 0, gap_end: 40, .. }));
        flip_last_byte(&paths[2]);
        let err = store.load_range(10, HASH, 100, 70, 30).unwrap_err();
        assert!(matches!(err, CheckpointError::Incomplete { gap_start: 70, gap_end: 100, .. }));
    }

    #[test]
    fn load_range_outside_the_vector_is_an_error() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 100], &[]);
        for (offset, len) in [(90, 11), (usize::MAX, 2)] {
            let err = store.load_range(10, HASH, 100, offset, len).unwrap_err();
            assert!(matches!(err, CheckpointError::RangeOutOfBounds { .. }), "{err}");
        }
    }

    #[test]
    fn files_that_disagree_make_the_step_inconsistent() {
        let (_tmp, store) = store();
        save_split(&store, 10, &[0, 50, 100], &[]);
        store.save(&sample(20, 100, 0, 50, &[])).unwrap();
        let mut diverged = sample(20, 100, 50, 50, &[]);
        diverged.ledger.open.insert(9, vec![1]);
        store.save(&diverged).unwrap();
        assert_eq!(store.newest_complete(HASH, 100).unwrap(), Some(10));
        let err = store.load_range(20, HASH, 100, 0, 100).unwrap_err();
        assert!(matches!(err, CheckpointError::Inconsistent { step: 20, .. }), "{err}");
        assert!(err.to_string().contains("ckpt-0000000020-0000000050"), "{err}");
        // Each half alone is still loadable.
        assert!(store.load_range(20, HASH, 100, 50, 50).is_ok());
    }

    #[test]
    fn prune_keeps_the_newest_n_complete_steps_and_anything_newer() {
        let (_tmp, store) = store();
        let bounds = [0, 30, 60];
        for step in [10, 20, 30, 40, 50] {
            save_split(&store, step, &bounds, &["m"]);
        }
        let step30 = store.dir().join("ckpt-0000000030-0000000030-0000000030.safetensors");
        flip_last_byte(&step30);
        fs::remove_file(store.dir().join("ckpt-0000000050-0000000000-0000000030.safetensors")).unwrap();
        let steps = |store: &CheckpointStore| {
            let mut s: Vec<u64> = store.scan().unwrap().iter().map(|f| f.step).collect();
            s.dedup();
            s
        };

        // Complete: 10, 20, 40. Keep 5 -> fewer exist, nothing goes.
        assert!(store.prune(HASH, 60, 5).unwrap().is_empty());
        assert_eq!(steps(&store), [10, 20, 30, 40, 50]);
        // Keep 2 -> 40 and 20 stay, with the newer 30 and 50.
        let removed = store.prune(HASH, 60, 2).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(steps(&store), [20, 30, 40, 50]);
        // Keep 0 is treated as 1: the newest complete step always survives.
        store.prune(HASH, 60, 0).unwrap();
        assert_eq!(steps(&store), [40, 50]);
        assert_eq!(store.newest_complete(HASH, 60).unwrap(), Some(40));
    }

    /// A node with only its own range's files (ranges spread over the nodes) keeps the newest
    /// few of them; a node that also holds whole checkpoints keeps those whole.
    #[test]
    fn prune_range_bounds_a_ranges_own_files_and_spares_whole_checkpoints() {
        let (_tmp, store) = store();
        for step in [10, 20, 30, 40, 50] {
            store.save(&sample(step, 60, 30, 30, &["m"])).unwrap();
        }
        assert!(store.prune(HASH, 60, 2).unwrap().is_empty(), "no step is complete: prune deletes nothing");
        let steps = |store: &CheckpointStore| {
            let mut s: Vec<(u64, usize)> = store.scan().unwrap().iter().map(|f| (f.step, f.offset)).collect();
            s.sort_unstable();
            s
        };
        assert_eq!(store.prune_range(60, 2, 30, 30).unwrap().len(), 3);
        assert_eq!(steps(&store), [(40, 30), (50, 30)]);
        // Step 20 is whole here (a copy of range 0 came too) and newer than others' cut: kept.
        store.save(&sample(20, 60, 30, 30, &["m"])).unwrap();
        store.save(&sample(20, 60, 0, 30, &["m"])).unwrap();
        store.save(&sample(5, 60, 30, 30, &["m"])).unwrap();
        assert_eq!(store.prune_range(60, 2, 30, 30).unwrap().len(), 1, "step 5 goes");
        assert_eq!(steps(&store), [(20, 0), (20, 30), (40, 30), (50, 30)]);
        // Another range's files are not this range's to prune.
        assert!(store.prune_range(60, 1, 0, 30).unwrap().is_empty());
    }

    #[test]
    fn scan_reports_every_file_with_its_outcome() {
        let (_tmp, store) = store();
        let paths = save_split(&store, 10, &[0, 4, 10], &["m"]);
        flip_last_byte(&paths[1]);
        let scanned = store.scan().unwrap();
        assert_eq!(scanned.len(), 2);
        assert_eq!((scanned[0].step, scanned[0].offset, scanned[0].len), (10, 0, 4));
        assert_eq!(
            scanned[0].outcome.as_ref().unwrap(),
            &FileSummary { config_hash: HASH.into(), total_len: 10, optimizer_t: 20, slots: vec!["m".into()] }
        );
        assert_eq!(scanned[1].path, paths[1]);
        assert!(matches!(scanned[1].outcome, Err(CheckpointError::ChecksumMismatch { .. })));
    }

    #[test]
    fn read_file_rejects_flipped_bytes_and_truncation_on_disk() {
        let (_tmp, store) = store();
        let ckpt = sample(10, 100, 30, 40, &["m", "v"]);
        let path = store.save(&ckpt).unwrap();
        let good = fs::read(&path).unwrap();
        // Length prefix, JSON header start, middle of the header, first and last tensor bytes.
        for pos in [0, 3, 8, 9, good.len() / 4, good.len() - 40 * 12, good.len() - 1] {
            let mut bad = good.clone();
            bad[pos] ^= 0x04;
            fs::write(&path, &bad).unwrap();
            let err = CheckpointStore::read_file(&path).unwrap_err();
            assert!(
                matches!(err, CheckpointError::ChecksumMismatch { .. } | CheckpointError::Corrupt { .. }),
                "byte {pos}: {err}"
            );
            assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
        }
        fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(CheckpointStore::read_file(&path).is_err());
        fs::write(&path, &good).unwrap();
        assert_bitwise_eq(&ckpt, &CheckpointStore::read_file(&path).unwrap());
    }

    #[test]
    fn read_file_of_a_missing_file_is_an_io_error_naming_it() {
        let (_tmp, store) = store();
        let path = store.dir().join("ckpt-0000000001-0000000000-0000000001.safetensors");
        let err = CheckpointStore::read_file(&path).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    }

    #[test]
    fn plan_cover_is_greedy_and_reports_the_first_gap() {
        let key = |offset, len| FileKey { step: 1, offset, len };
        let keys: BTreeSet<FileKey> = [key(0, 10), key(0, 4), key(4, 8), key(12, 3), key(20, 5)].into();
        assert_eq!(plan_cover(&keys, 0, 15), Ok(vec![key(0, 10), key(4, 8), key(12, 3)]));
        assert_eq!(plan_cover(&keys, 5, 12), Ok(vec![key(4, 8)]));
        assert_eq!(plan_cover(&keys, 0, 25), Err((15, 20)));
        assert_eq!(plan_cover(&keys, 21, 30), Err((25, 30)));
        assert_eq!(plan_cover(&keys, 17, 17), Err((17, 17)));
        assert_eq!(plan_cover(&keys, 15, 15), Ok(vec![key(12, 3)]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn any_range_loads_from_any_split(
            cuts in proptest::collection::btree_set(1usize..64, 0..6),
            a in 0usize..=64,
            b in 0usize..=64,
        ) {
            let (_tmp, store) = store();
            let mut bounds = vec![0];
            bounds.extend(cuts);
            bounds.push(64);
            save_split(&store, 5, &bounds, &["m"]);
            prop_assert_eq!(store.newest_complete(HASH, 64).unwrap(), Some(5));
            let (lo, hi) = (a.min(b), a.max(b));
            let got = store.load_range(5, HASH, 64, lo, hi - lo).unwrap();
            assert_bitwise_eq(&got, &sample(5, 64, lo, hi - lo, &["m"]));
        }
    }
}
