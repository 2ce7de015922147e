//! The errors of the `phalanx` crate.

use std::path::PathBuf;

use phalanx_actors::actor::JobRunError;
use phalanx_actors::checkpoint::CheckpointError;
use phalanx_actors::data::DataError;
use phalanx_actors::model::ModelError;

/// Everything that can stop a job from being built, run or written out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file (or text) does not parse.
    #[error("config{}: {reason}", file.as_ref().map(|f| format!(" {}", f.display())).unwrap_or_default())]
    Config {
        /// The file, when read from one.
        file: Option<PathBuf>,
        /// What is wrong, with line and field.
        reason: String,
    },
    /// A config field has a value that cannot work.
    #[error("invalid value for `{field}`: {reason}")]
    Field {
        /// The field (same name in TOML and as a flag).
        field: String,
        /// Why.
        reason: String,
    },
    /// The job names a model that the registry of whoever runs it does not have. A node wraps
    /// it with its id.
    #[error("invalid value for `model`: no model named {model:?} here (known: {})", known.join(", "))]
    UnknownModel {
        /// The model the job names.
        model: String,
        /// The models the registry has, sorted.
        known: Vec<String>,
    },
    /// The job names a data source that the registry of whoever runs it does not have. A node
    /// wraps it with its id.
    #[error("invalid value for `dataset`: no data source named {dataset:?} here (known: {known})")]
    UnknownDataset {
        /// The source's registry name.
        dataset: String,
        /// The sources the registry has, with their forms (`csv:PATH[:TARGET]`), sorted.
        known: String,
    },
    /// The data could not be loaded or split.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model spec is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Resuming found nothing to resume from.
    #[error("nothing to resume: no complete checkpoint for this job in {dir}")]
    NoCheckpoint {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// The job failed while running.
    #[error(transparent)]
    Job(#[from] JobRunError),
    /// The job's actors could not be started.
    #[error("cannot start the job: {0}")]
    Spawn(String),
    /// A file could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A model or checkpoint file is not what it should be.
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another process with this node's id is already a live member: a member refused this
    /// one ([`codes::DUPLICATE_IDENTITY`](phalanx_transport::codes::DUPLICATE_IDENTITY)).
    /// Fatal: this process is the second one, and retrying cannot help while the other runs.
    #[error("{reason} (node {node} refused by node {by} at {addr})")]
    DuplicateIdentity {
        /// This node's id, the one used twice.
        node: u32,
        /// The member that refused this process.
        by: u32,
        /// That member's address.
        addr: std::net::SocketAddr,
        /// Its reason: where the live member with this id runs, and its incarnation.
        reason: String,
    },
    /// The coordination service refused this node or cannot be used (a second live process
    /// with this id, a bad `--coordination`).
    #[error(transparent)]
    Coordination(#[from] crate::cluster::coordination::CoordinationError),
    /// A job could not be submitted (no coordinator, queue full, no answer).
    #[error("cannot submit the job: {0}")]
    Submit(String),
    /// An output could not be encoded.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
}
