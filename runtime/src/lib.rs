//! # Phalanx: distributed training that keeps training when nodes die
//!
//! Phalanx trains machine-learning models with synchronous data parallelism
//! on supervised actors, and makes two promises no elastic trainer makes:
//! every sample of every epoch contributes **exactly once**, and a run that
//! survives failures ends with a model **bit-identical** to the fault-free
//! run — whatever the number of trainers or aggregators.
//!
//! ```text
//!   JobConfig ──▶ PreparedJob::new ──▶ run (actors) ──▶ TrainReport ──▶ write_outputs
//!   (TOML/flags)   data, partitions,    shards, trainers,  params, ledger,   summary.json,
//!                  model, config hash   aggregators,       faults, metric   model.safetensors
//!                                       supervisor ──▶ history.csv (every step, as it is applied)
//! ```
//!
//! A run keeps no per-step or per-epoch record in memory: steps stream to
//! `history.csv`, the exactly-once ledger folds each finished epoch into
//! counts, and the loss curve in the summary is downsampled, so a job of
//! millions of steps costs per step what a short one does.
//!
//! The entry point is [`train`]: give it a [`JobConfig`], get a
//! [`TrainReport`]. Embed it in any tokio program:
//!
//! ```no_run
//! # async fn demo() -> Result<(), phalanx::Error> {
//! let config = phalanx::JobConfig { trainers: 4, ..Default::default() };
//! let (job, report) = phalanx::train(config, |p| println!("step {}/{}", p.step, p.total_steps)).await?;
//! println!("accuracy {:.3}", report.evaluation.metric.value);
//! # let _ = job; Ok(()) }
//! ```
//!
//! ## Your own models and data
//!
//! A job names its model and its dataset; a [`ModelRegistry`] and a
//! [`DataRegistry`] turn the names into a [`Model`] and rows. The built-ins
//! (`linear`, `softmax`, `mlp`; `diabetes`, `iris`, `winequality`,
//! `csv:PATH[:TARGET]`) register themselves; register your own and pass the
//! registries to [`train_with`] (or to a node: [`NodeBuilder::models`],
//! [`NodeBuilder::datasets`]). A model keeps the determinism contract
//! documented on [`Model`]: same inputs, same bits.
//!
//! ```no_run
//! # async fn demo() -> Result<(), phalanx::Error> {
//! use phalanx::{DataRegistry, DataRequest, ModelRegistry, Table};
//!
//! let mut data = DataRegistry::default();
//! data.register("squares", |r: &DataRequest<'_>| {
//!     let rows: Vec<[f32; 1]> = (0..200).map(|i| [i as f32 / 100.0]).collect();
//!     let targets: Vec<f32> = rows.iter().map(|[x]| x * x).collect();
//!     Table::from_rows("squares", vec!["x".into()], &rows, &targets, r.task)
//! })?;
//! let config = phalanx::JobConfig {
//!     model: "mlp".parse()?,
//!     dataset: "squares".parse()?,
//!     task: Some(phalanx::TaskKind::Regression),
//!     ..Default::default()
//! };
//! let (_, report) = phalanx::train_with(config, &ModelRegistry::default(), &data, |_| {}).await?;
//! println!("R² {:.3}", report.evaluation.metric.value);
//! # Ok(()) }
//! ```
//!
//! `examples/examples/custom_model.rs` registers a model of its own and
//! trains it on three node processes, one of them killed.
//!
//! The protocol, its sans-IO cores and the actors live in
//! [`phalanx_actors`]; the wire codec in [`phalanx_transport`].

#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod error;
pub mod job;
pub mod local;
pub mod metrics;
pub mod node;
pub mod output;
pub mod plot;
pub mod predict;
pub mod relay;
pub mod service_relay;

pub use cluster::event::{NodeEvent, NodeEventKind};
pub use config::JobConfig;
pub use error::Error;
pub use job::{model_sha256, params_sha256, Evaluation, Metric, PreparedJob, Registries, TrainReport};
pub use node::{Node, NodeBuilder, NodeHandle};
pub use output::{write_outputs, Summary};
pub use phalanx_actors::actor::Progress;
pub use phalanx_actors::data::{DataError, DataRegistry, DataRequest, DatasetSource, Table, TaskKind};
pub use phalanx_actors::model::{
    Head, Model, ModelConfig, ModelError, ModelKind, ModelName, ModelRegistry, ModelRequest, Targets, TensorInfo,
};

/// True when this build has the cargo feature `fault-injection`: the in-process fault
/// hooks (`phalanx train --fail`, `phalanx node/local --crash-before-rename`, and those of
/// [`phalanx_actors`]). Off in a default build, which refuses a job or node config that
/// asks for one; faults from outside (signals, the relay, the filesystem) need no feature.
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

/// The version `phalanx --version` prints: the crate version, followed by
/// ` (fault-injection)` in a build with the in-process fault hooks.
pub const VERSION: &str =
    if FAULT_INJECTION { concat!(env!("CARGO_PKG_VERSION"), " (fault-injection)") } else { env!("CARGO_PKG_VERSION") };

/// Refuses an in-process fault (`what`, asked for by `field`) unless the hooks are `built_in`
/// (the caller passes [`FAULT_INJECTION`]; a parameter so that tests see both answers).
pub(crate) fn require_fault_injection(built_in: bool, field: &str, what: &dyn std::fmt::Display) -> Result<(), Error> {
    if built_in {
        return Ok(());
    }
    Err(Error::Field {
        field: field.to_string(),
        reason: format!(
            "{what}: in-process fault injection is not built in (a default build); \
             build with the cargo feature fault-injection"
        ),
    })
}

/// The ndarray the [`Model`] trait speaks (batches are `ArrayView2<f32>`), so
/// that a model of your own uses the same version.
pub use ndarray;

/// Prepare and run a job in this process with the built-in models and data
/// sources; checkpoints go to `config.out/checkpoints` (a temporary directory
/// when `out` is unset).
pub async fn train(config: JobConfig, on_progress: impl FnMut(&Progress)) -> Result<(PreparedJob, TrainReport), Error> {
    train_with(config, &ModelRegistry::default(), &DataRegistry::default(), on_progress).await
}

/// [`train`] with the models and data sources of `models` and `datasets`
/// (see [`PreparedJob::with_registries`]).
pub async fn train_with(
    config: JobConfig,
    models: &ModelRegistry,
    datasets: &DataRegistry,
    on_progress: impl FnMut(&Progress),
) -> Result<(PreparedJob, TrainReport), Error> {
    let job = PreparedJob::with_registries(config, models, datasets)?;
    let (dir, _temp) = match &job.config.out {
        Some(out) => (out.join("checkpoints"), None),
        None => {
            let t = tempfile::tempdir().map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let report = job::run(&job, &dir, job.config.resume, on_progress).await?;
    Ok((job, report))
}

/// What [`tune_allocator`] sets: freed memory up to this much at the top of a heap stays in
/// the process.
pub const ALLOCATOR_TRIM_THRESHOLD: usize = 64 << 20;
/// What [`tune_allocator`] sets: allocations below this come from the heap, not `mmap`.
pub const ALLOCATOR_MMAP_THRESHOLD: usize = 32 << 20;

/// Keep the tensor buffers a training step frees for the next step, instead of handing them
/// back to the kernel and faulting them in again. Returns whether anything was changed.
///
/// glibc's allocator returns a freed block above its trim threshold (128 KiB to start with)
/// to the kernel at once on the worker threads' heaps, and serves blocks above its mmap
/// threshold with a fresh `mmap`: a model's gradient or parameter buffer (300 KiB at 74k
/// parameters, 4.7 MiB at 1.2 M) is then page-faulted in again at every step — at 74k
/// parameters that was half the step time (kernel time in page faults and `madvise`). This
/// raises the trim threshold to [`ALLOCATOR_TRIM_THRESHOLD`] and fixes the mmap threshold
/// at [`ALLOCATOR_MMAP_THRESHOLD`] (`mallopt`; the same as
/// `GLIBC_TUNABLES=glibc.malloc.trim_threshold=…:glibc.malloc.mmap_threshold=…`), at the
/// price of the process keeping up to that much freed memory per heap. `phalanx` calls it
/// first thing; a service embedding the runtime may call it at its start (before it starts
/// threads), or use an allocator that keeps memory anyway. No-op (returns `false`) off
/// glibc.
///
/// In a process that called it, every node hands the memory its heaps keep back to the
/// kernel every [`ALLOCATOR_TRIM_EVERY`] ([`trim_allocator`]), so that a long-lived node's
/// resident memory follows its live heap instead of creeping up with what the allocator
/// keeps.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let as_int = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets allocator parameters; it is called with valid options.
        let tuned = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(ALLOCATOR_TRIM_THRESHOLD)) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(ALLOCATOR_MMAP_THRESHOLD)) == 1
        };
        ALLOCATOR_TUNED.store(tuned, std::sync::atomic::Ordering::Relaxed);
        tuned
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// How often a node of a process that ran [`tune_allocator`] calls [`trim_allocator`].
pub const ALLOCATOR_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

static ALLOCATOR_TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`tune_allocator`] changed this process's allocator.
pub fn allocator_tuned() -> bool {
    ALLOCATOR_TUNED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Hand the free memory of every heap back to the kernel (glibc's `malloc_trim(0)`: the
/// free top of each heap, and whole free pages inside them). What [`tune_allocator`] lets
/// the heaps keep between steps is faulted in again by the next step, once per call: a
/// node calls it every [`ALLOCATOR_TRIM_EVERY`], on the blocking pool. The call walks the
/// heaps' free chunks under their locks: 0.9–5.3 ms on a heap that had freed eight 4.7 MB
/// buffers and 100,000 small blocks (this machine), so a thread allocating meanwhile may
/// wait that long, once per interval. Without it a node's resident memory crept up by 1–3 MiB over 80,000 steps while
/// its live heap stayed flat (heaptrack). Returns whether memory was released; no-op
/// (`false`) off glibc.
pub fn trim_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free memory of the allocator's own heaps.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Report panics as `tracing` warnings instead of the default stderr dump.
///
/// Actor panics are failures the supervisors handle (injected faults are
/// panics on purpose), so a program that embeds Phalanx may prefer them as
/// log lines. Replaces the process-wide panic hook.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        tracing::warn!("panicked{location}: {msg}");
    }));
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_allocator_takes_the_thresholds() {
        assert!(super::tune_allocator(), "mallopt refused the thresholds");
        assert!(super::allocator_tuned());
    }

    /// A freed buffer below the mmap threshold stays in the heap (the trim threshold is far
    /// above it) until `trim_allocator` hands it back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_hands_back_what_the_tuned_heap_kept() {
        fn resident_kb() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        assert!(super::tune_allocator());
        let buffer = vec![1u8; 16 << 20];
        // A block in use after the buffer, so the freed buffer sits inside the heap, not at
        // its top: a step's freed tensors look like that, with the next step's allocations
        // after them. (A thread arena's top is never handed back by malloc_trim, only the
        // main arena's.) A block may come from a free chunk before the buffer (freed by
        // earlier tests in this arena), so blocks are taken until one lies after it.
        let end = buffer.as_ptr() as usize + buffer.len();
        let mut pins: Vec<Vec<u8>> = Vec::new();
        while !pins.iter().any(|pin| pin.as_ptr() as usize >= end) {
            assert!(pins.len() < 1024, "no block after the buffer in 1024 blocks of 64 KiB");
            pins.push(vec![2u8; 64 << 10]);
        }
        assert_eq!(buffer.iter().map(|b| u64::from(*b)).sum::<u64>(), 16 << 20);
        drop(buffer);
        let kept = resident_kb();
        assert!(super::trim_allocator(), "nothing was released");
        let trimmed = resident_kb();
        assert!(pins.iter().all(|pin| pin[(64 << 10) - 1] == 2));
        // 16 MiB were freed; other tests' threads may hold a few MiB meanwhile.
        assert!(trimmed + 8 * 1024 <= kept, "resident {kept} kB before the trim, {trimmed} kB after");
    }

    use super::*;

    #[test]
    fn a_build_without_the_hooks_refuses_a_fault_naming_the_field_and_the_feature() {
        let e = require_fault_injection(false, "fail", &"trainer:1@20").unwrap_err().to_string();
        assert!(e.contains("fail") && e.contains("trainer:1@20") && e.contains("feature fault-injection"), "{e}");
        assert!(require_fault_injection(true, "fail", &"trainer:1@20").is_ok());
    }

    #[test]
    fn the_version_says_whether_the_hooks_are_built_in() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(VERSION.ends_with("(fault-injection)"), cfg!(feature = "fault-injection"));
    }
}
