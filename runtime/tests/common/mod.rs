//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod wide;

use std::time::Duration;

use phalanx::{JobConfig, PreparedJob, TrainReport};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

/// Run the `phalanx` binary: (success, stdout, stderr).
pub fn phalanx_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("run phalanx");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `model_sha256 …` line a run printed.
pub fn printed_sha(stdout: &str) -> String {
    stdout.lines().find_map(|l| l.strip_prefix("model_sha256 ")).expect("a model_sha256 line").to_string()
}

/// A bound on any single job in the tests: a hang fails the test instead of CI.
pub const JOB_BOUND: Duration = Duration::from_secs(120);

/// A small job of each model family on a real dataset.
pub fn job(model: ModelKind) -> JobConfig {
    let (dataset, epochs) = match model {
        ModelKind::Linear => (DatasetSource::Diabetes, 10),
        ModelKind::Softmax => (DatasetSource::Iris, 10),
        ModelKind::Mlp => (DatasetSource::Winequality, 3),
    };
    JobConfig {
        model: model.into(),
        dataset,
        epochs: Some(epochs),
        checkpoint_every: 10,
        checkpoint_min_interval_ms: 0,
        seed: 7,
        ..JobConfig::default()
    }
}

/// Prepare and run a job on actors, with a temporary checkpoint directory.
pub async fn run(config: JobConfig) -> Result<(PreparedJob, TrainReport), phalanx::Error> {
    let dir = tempfile::tempdir().expect("temp dir");
    run_in(config, dir.path(), false).await
}

/// Prepare and run a job checkpointing into `dir`.
pub async fn run_in(
    config: JobConfig,
    dir: &std::path::Path,
    resume: bool,
) -> Result<(PreparedJob, TrainReport), phalanx::Error> {
    let job = PreparedJob::new(config)?;
    let report = tokio::time::timeout(JOB_BOUND, phalanx::job::run(&job, dir, resume, |_| {}))
        .await
        .expect("job finished within the bound")?;
    Ok((job, report))
}

/// SHA-256 of the final parameters.
pub fn sha(report: &TrainReport) -> String {
    phalanx::params_sha256(&report.outcome.params)
}

/// Every partition applied exactly its size in every epoch.
pub fn assert_exactly_once(job: &PreparedJob, report: &TrainReport) {
    let sizes = job.partitions.sizes();
    let epochs = u64::from(job.schedule.epochs);
    let ledger = &report.outcome.ledger;
    assert_eq!(ledger.epochs(), epochs, "one ledger entry per epoch");
    // Finished epochs are folded into counts by the aggregators, each compared with the sizes.
    assert_eq!(ledger.first_inexact(&sizes), None, "an epoch's samples applied per partition vs partition sizes");
    assert!(ledger.is_exact(&sizes, epochs), "every epoch applied exactly once: {ledger:?}");
    let totals: Vec<u64> = sizes.iter().map(|s| s * epochs).collect();
    assert_eq!(ledger.closed.per_partition, totals, "samples applied per partition over all epochs");
}

/// The first event of an embedded node's stream that `want` accepts, within
/// `bound` (a hang fails the test).
pub async fn wait_for_event(
    events: &mut (impl tokio_stream::Stream<Item = phalanx::NodeEvent> + Unpin),
    bound: Duration,
    want: impl Fn(&phalanx::NodeEvent) -> bool,
) -> phalanx::NodeEvent {
    use tokio_stream::StreamExt;
    tokio::time::timeout(bound, async {
        while let Some(e) = events.next().await {
            if want(&e) {
                return e;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("event within the bound")
}

/// Free loopback UDP ports (bound, read, released).
pub fn free_udp_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<_> = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    sockets.iter().map(|s| s.local_addr().unwrap().port()).collect()
}

/// `GET /metrics` of a node over a plain TCP connection: the body, after a
/// `200` status line.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics server");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the series `series` (name and labels, exactly as exposed)
/// in a Prometheus text exposition; `None` when absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A user data source for registry tests: `rows` rows of `y = 2a − b + 0.5`, plus `noise` ×
/// a uniform draw in [−0.5, 0.5), each row a function of its index (so every node loads the
/// same table).
pub fn plane(
    rows: u64,
    noise: f32,
    request: &phalanx::DataRequest<'_>,
) -> Result<phalanx::Table, phalanx_actors::data::DataError> {
    let unit = |i: u64| (phalanx_actors::data::splitmix64(i) >> 40) as f32 / 16_777_216.0 - 0.5;
    let features: Vec<[f32; 2]> = (0..rows).map(|i| [4.0 * unit(3 * i), 4.0 * unit(3 * i + 1)]).collect();
    let targets: Vec<f32> =
        features.iter().enumerate().map(|(i, [a, b])| 2.0 * a - b + 0.5 + noise * unit(3 * i as u64 + 2)).collect();
    phalanx::Table::from_rows("plane", vec!["a".into(), "b".into()], &features, &targets, request.task)
}

/// Three nodes embedded in this process on loopback, with new certificates, ports and data
/// directories under `dir` and their outputs in `dir/out`; `configure` adds to each builder.
pub async fn embedded_cluster(
    dir: &std::path::Path,
    configure: impl Fn(phalanx::NodeBuilder) -> phalanx::NodeBuilder,
) -> Vec<phalanx::NodeHandle> {
    let certs = dir.join("certs");
    phalanx_transport::certs::generate(&certs, 3).unwrap();
    let ports = free_udp_ports(3);
    let addr = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let mut nodes = Vec::new();
    for i in 0..3u32 {
        let seeds = (0..3).filter(|j| *j != i as usize).map(addr).collect();
        let builder = phalanx::Node::builder()
            .id(i)
            .listen(addr(i as usize))
            .seeds(seeds)
            .certs_dir(&certs)
            .data_dir(dir.join(format!("data-{i}")))
            .out(dir.join("out"));
        nodes.push(configure(builder).start().await.expect("node starts"));
    }
    nodes
}
