//! The client commands of the `phalanx` binary: `submit`, `jobs`, `cancel`, `status`.
//!
//! They talk to a long-lived cluster over QUIC with the client certificate that `phalanx
//! certs` writes (`client/client.pem`); see [`phalanx::cluster::client_api`]. Results go to the
//! writer the binary passes (its stdout), progress to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::io::Write;

use anyhow::Context;
use clap::Args;
use phalanx::cluster::client_api::ClusterClient;
use phalanx::cluster::event::NodeEventKind;
use phalanx::cluster::registry::JobState;
use phalanx::Progress;
use phalanx_transport::ClientIdentity;

use crate::{ProgressView, TrainArgs};

/// Where the cluster is and who the client is.
#[derive(Args, Debug)]
pub(crate) struct ClusterArgs {
    /// Addresses of cluster nodes (any of them will do), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "ADDR[,ADDR...]", required = true)]
    cluster: Vec<SocketAddr>,
    /// Certificates directory with client.pem, client.key and ca.pem (see `phalanx certs`).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
}

impl ClusterArgs {
    fn client(&self) -> anyhow::Result<ClusterClient> {
        let identity = ClientIdentity::load(&self.certs).with_context(|| {
            format!(
                "loading the client certificate from {} (`phalanx certs` writes client.pem and client.key)",
                self.certs.display()
            )
        })?;
        Ok(ClusterClient::new(identity, self.cluster.clone())?)
    }
}

/// `phalanx submit --cluster ADDR[,ADDR…] --certs DIR [--wait] [--out DIR] (--config job.toml | train flags)`.
#[derive(Args, Debug)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Wait for the job to end: show its progress, fetch summary.json, model.safetensors,
    /// history.csv and loss.svg into --out, and exit non-zero if it failed.
    #[arg(long)]
    wait: bool,
    /// Give up waiting when no node of the cluster answers for this long (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    patience: u64,
    /// The job: `--config job.toml` and/or the train flags; `--out` is where `--wait` writes
    /// the outputs (default phalanx-out), never sent to the cluster.
    #[command(flatten)]
    job: TrainArgs,
}

/// `phalanx jobs --cluster … --certs DIR [--json]`.
#[derive(Args, Debug)]
pub(crate) struct JobsArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print the registry as JSON (id, spec, state) instead of a table.
    #[arg(long)]
    json: bool,
}

/// `phalanx cancel ID --cluster … --certs DIR`.
#[derive(Args, Debug)]
pub(crate) struct CancelArgs {
    /// The job id (from `phalanx submit` or `phalanx jobs`).
    id: u64,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `phalanx status --cluster … --certs DIR [--json]`.
#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn submit(args: SubmitArgs, stdout: &mut impl Write) -> anyhow::Result<()> {
    let client = args.cluster.client()?;
    let mut spec = args.job.into_config()?;
    // `out` is the client's directory: the cluster writes outputs beside the job's checkpoints.
    let out = spec.out.take().unwrap_or_else(|| PathBuf::from("phalanx-out"));
    let job = client.submit(&spec).await?;
    // The contract: the job id is the first line of stdout.
    writeln!(stdout, "{job}")?;
    if !args.wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut view = ProgressView::new();
    let mut progress = Progress::default();
    let state = client
        .watch(job, Duration::from_secs(args.patience.max(1)), |event| match &event.kind {
            NodeEventKind::Step { step, total_steps, loss, .. }
            | NodeEventKind::Progress { step, total_steps, loss, .. } => {
                progress.step = *step;
                progress.total_steps = *total_steps;
                progress.loss = *loss;
                view.update(&progress, started);
            }
            NodeEventKind::Down { peer, .. } => {
                progress.faults += 1;
                eprintln!("node {peer} is down; the cluster recovers job {job}");
            }
            NodeEventKind::View { epoch, coordinator, members } => {
                eprintln!("view {epoch}: coordinator {coordinator}, members {members:?}");
            }
            _ => {}
        })
        .await;
    view.finish();
    match state? {
        JobState::Finished { model_sha256, .. } => {
            let files = client.fetch_outputs(job, &out).await?;
            writeln!(stdout, "job {job} finished in {:.2}s", started.elapsed().as_secs_f64())?;
            writeln!(stdout, "model_sha256 {model_sha256}")?;
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            writeln!(stdout, "wrote {}", names.join(", "))?;
            Ok(())
        }
        JobState::Failed { error } => anyhow::bail!("job {job} failed: {error}"),
        JobState::Cancelled => anyhow::bail!("job {job} was cancelled"),
        JobState::Queued | JobState::Running => anyhow::bail!("job {job} did not end"),
    }
}

pub(crate) async fn jobs(args: JobsArgs, stdout: &mut impl Write) -> anyhow::Result<()> {
    let jobs = args.cluster.client()?.jobs().await?;
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&jobs)?)?;
        return Ok(());
    }
    writeln!(stdout, "{:>4}  {:<10} {:<10} {:<14} detail", "id", "state", "model", "dataset")?;
    for j in jobs {
        let detail = match &j.state {
            JobState::Finished { model_sha256, .. } => format!("model_sha256 {model_sha256}"),
            JobState::Failed { error } => error.clone(),
            _ => String::new(),
        };
        writeln!(
            stdout,
            "{:>4}  {:<10} {:<10} {:<14} {detail}",
            j.id,
            j.state.name(),
            j.spec.model.to_string(),
            j.spec.dataset.to_string()
        )?;
    }
    Ok(())
}

pub(crate) async fn cancel(args: CancelArgs, stdout: &mut impl Write) -> anyhow::Result<()> {
    args.cluster.client()?.cancel(args.id).await?;
    writeln!(stdout, "cancelling job {}", args.id)?;
    Ok(())
}

pub(crate) async fn status(args: StatusArgs, stdout: &mut impl Write) -> anyhow::Result<()> {
    let status = args.cluster.client()?.status(None).await?;
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&status)?)?;
        return Ok(());
    }
    match (status.epoch, status.coordinator) {
        (Some(epoch), Some(coordinator)) => {
            writeln!(
                stdout,
                "node {} sees view {epoch}: coordinator {coordinator}, {} of {} members up",
                status.node,
                status.members.len(),
                status.configured
            )?;
        }
        _ => {
            writeln!(stdout, "node {} has no view yet (waiting for a majority of {})", status.node, status.configured)?
        }
    }
    for m in &status.members {
        let addr = m.addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        let role = if Some(m.id) == status.coordinator { " (coordinator)" } else { "" };
        writeln!(stdout, "  node {} at {addr}{role}", m.id)?;
    }
    Ok(())
}
