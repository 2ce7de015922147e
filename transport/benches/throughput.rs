//! Loopback throughput of `f32` tensor frames: `Transport::send` between two transports, vs
//! raw quinn moving the same bytes with the same TLS and QUIC settings, vs a plain TCP socket.
//!
//! `cargo bench -p phalanx-transport --bench throughput` moves 256 MiB per measurement with
//! 1 MiB and 16 MiB tensors and prints a table. Under `cargo test --benches` (no `--bench`
//! argument) it moves a few MiB only, as a smoke test. For a profiler, `-- ours 16` runs only
//! our path, on 16 MiB tensors.
//!
//! What is timed: from the first send until the receiver holds the last byte; connections
//! are set up before. Next to the rate, the CPU time the process spent over the same span
//! (user + system, `getrusage`) per MB moved: both ends run in this process, so it is what a
//! megabyte costs sender and receiver together — the transport's share of a training step is
//! about that times the megabytes a step moves. Frames are encoded before timing (the codec
//! has its own benchmark in its tests), so this measures the transport alone. Each figure is the best of
//! [`REPETITIONS`] runs.

use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use phalanx_transport::{
    bind_udp, certs, encode, tls, Limits, NodeIdentity, Transport, TransportConfig, TransportEvent,
};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

const MIB: usize = 1024 * 1024;
const REPETITIONS: usize = 5;
/// Repetitions of the smoke run under `cargo test --benches`.
const SMOKE_REPETITIONS: usize = 1;
/// The transport's default in-flight limit, used for raw quinn too.
const IN_FLIGHT: usize = phalanx_transport::DEFAULT_MAX_INFLIGHT_SENDS_PER_PEER;

#[derive(Serialize)]
struct GradientHeader {
    step: u64,
    partition: u32,
}

/// `count` frames, each holding a tensor of `tensor_bytes`.
fn frames(tensor_bytes: usize, count: usize) -> Result<Vec<Vec<u8>>> {
    let tensor: Vec<f32> = (0..tensor_bytes / 4).map(|i| i as f32 * 0.5).collect();
    let limits = Limits::default();
    (0..count).map(|step| Ok(encode(&GradientHeader { step: step as u64, partition: 0 }, &tensor, &limits)?)).collect()
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// User + system CPU time of this process so far (every thread).
fn process_cpu() -> Duration {
    // SAFETY: `getrusage` writes the struct it is given and nothing else; a zeroed `rusage`
    // is a valid value of the plain C struct.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut usage), usage)
    };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Wall and CPU time of one measured span.
#[derive(Clone, Copy)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

/// A measured span under way: the wall clock and the process's CPU time at its start.
struct Span {
    wall: Instant,
    cpu: Duration,
}

impl Span {
    fn start() -> Self {
        Self { wall: Instant::now(), cpu: process_cpu() }
    }

    fn end(&self) -> Spent {
        Spent { wall: self.wall.elapsed(), cpu: process_cpu().saturating_sub(self.cpu) }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    node0: NodeIdentity,
    node1: NodeIdentity,
}

impl Setup {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        certs::generate(dir.path(), 2)?;
        let node0 = NodeIdentity::load(dir.path(), 0)?;
        let node1 = NodeIdentity::load(dir.path(), 1)?;
        Ok(Self { _dir: dir, node0, node1 })
    }

    fn config(identity: &NodeIdentity) -> TransportConfig {
        TransportConfig::new(identity.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// `Transport::send_when_ready` from node 1 to node 0; node 0's event receiver takes every
/// `Message`.
async fn ours(setup: &Setup, frames: Vec<Vec<u8>>) -> Result<Spent> {
    let (receiver, mut events) = Transport::bind(Setup::config(&setup.node0)).await?;
    let (sender, _sender_events) = Transport::bind(Setup::config(&setup.node1)).await?;
    let peer = sender.connect(receiver.local_addr(), Some(0)).await?;
    let (count, total): (usize, usize) = (frames.len(), frames.iter().map(|f| f.len() - 4).sum());

    let span = Span::start();
    let sending = {
        let sender = sender.clone();
        tokio::spawn(async move {
            for frame in frames {
                sender.send_when_ready(peer, frame).await?;
            }
            Ok::<_, phalanx_transport::SendError>(())
        })
    };
    let (mut received, mut bytes) = (0, 0);
    while received < count {
        match events.recv().await.ok_or("receiver closed")? {
            TransportEvent::Message { frame, .. } => {
                received += 1;
                bytes += frame.len();
            }
            TransportEvent::PeerUp { .. } => {}
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    let elapsed = span.end();
    sending.await??;
    assert_eq!(bytes, total);
    sender.shutdown().await;
    receiver.shutdown().await;
    Ok(elapsed)
}

/// Two raw quinn endpoints with the transport's TLS and QUIC settings and UDP buffers.
async fn raw_quinn_pair(
    setup: &Setup,
) -> Result<(quinn::Endpoint, quinn::Endpoint, quinn::Connection, quinn::Connection)> {
    let quic = Arc::new(Setup::config(&setup.node0).quic_transport_config()?);
    let buffer = phalanx_transport::DEFAULT_UDP_BUFFER_BYTES;
    let mut server_config = tls::quic_server_config(&setup.node0)?;
    server_config.transport_config(quic.clone());
    let mut client_config = tls::quic_client_config(&setup.node1)?;
    client_config.transport_config(quic);
    let runtime = Arc::new(quinn::TokioRuntime);
    let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        bind_udp(localhost, buffer)?,
        runtime.clone(),
    )?;
    let client = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, bind_udp(localhost, buffer)?, runtime)?;
    let connecting = client.connect_with(client_config, server.local_addr()?, "node-0")?;
    let accepting = async { Ok::<_, Box<dyn Error + Send + Sync>>(server.accept().await.ok_or("no incoming")?.await?) };
    let (client_conn, server_conn) = tokio::join!(connecting, accepting);
    Ok((server, client, server_conn?, client_conn?))
}

/// Raw quinn, one unidirectional stream per frame, as many in flight as the transport allows.
async fn raw_quinn_streams(setup: &Setup, frames: Vec<Vec<u8>>) -> Result<Spent> {
    let (server, client, server_conn, client_conn) = raw_quinn_pair(setup).await?;
    let count = frames.len();
    let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(count);
    let reading = tokio::spawn(async move {
        while let Ok(mut recv) = server_conn.accept_uni().await {
            let done = done_tx.clone();
            tokio::spawn(async move {
                let mut bytes = 0;
                while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                    bytes += chunk.bytes.len();
                }
                let _ = done.send(bytes).await;
            });
        }
    });

    let span = Span::start();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let conn = client_conn.clone();
    let sending = tokio::spawn(async move {
        for frame in frames {
            let permit = slots.clone().acquire_owned().await?;
            let conn = conn.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Ok(mut stream) = conn.open_uni().await {
                    let _ = stream.write_chunk(frame).await;
                    let _ = stream.finish();
                }
            });
        }
        Ok::<_, tokio::sync::AcquireError>(())
    });
    for _ in 0..count {
        done_rx.recv().await.ok_or("reader stopped")?;
    }
    let elapsed = span.end();
    sending.await??;
    client_conn.close(0u32.into(), b"done");
    reading.abort();
    client.wait_idle().await;
    server.close(0u32.into(), b"done");
    Ok(elapsed)
}

/// Raw quinn, every frame back to back on one unidirectional stream.
async fn raw_quinn_one_stream(setup: &Setup, frames: Vec<Vec<u8>>) -> Result<Spent> {
    let (server, client, server_conn, client_conn) = raw_quinn_pair(setup).await?;
    let total: usize = frames.iter().map(Vec::len).sum();
    let frames: Vec<Bytes> = frames.into_iter().map(Bytes::from).collect();
    let span = Span::start();
    let sending = tokio::spawn(async move {
        let mut stream = client_conn.open_uni().await?;
        for frame in frames {
            stream.write_chunk(frame).await?;
        }
        stream.finish()?;
        Ok::<_, Box<dyn Error + Send + Sync>>(client_conn)
    });
    let mut recv = server_conn.accept_uni().await?;
    let mut bytes = 0;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        bytes += chunk.bytes.len();
    }
    let elapsed = span.end();
    assert_eq!(bytes, total);
    let client_conn = sending.await??;
    client_conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    server.close(0u32.into(), b"done");
    Ok(elapsed)
}

/// A plain TCP socket on loopback, every frame back to back.
async fn tcp(frames: Vec<Vec<u8>>) -> Result<Spent> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let total: usize = frames.iter().map(Vec::len).sum();
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (mut client, (mut server, _)) = (client?, accepted?);
    client.set_nodelay(true)?;
    let span = Span::start();
    let sending = tokio::spawn(async move {
        for frame in frames {
            client.write_all(&frame).await?;
        }
        client.shutdown().await
    });
    let mut buf = vec![0u8; MIB];
    let mut bytes = 0;
    while bytes < total {
        match server.read(&mut buf).await? {
            0 => break,
            n => bytes += n,
        }
    }
    let elapsed = span.end();
    sending.await??;
    assert_eq!(bytes, total);
    Ok(elapsed)
}

/// The paths compared, in table order.
const PATHS: [&str; 4] = [
    "Transport::send (ours)",
    "raw quinn, one stream per frame",
    "raw quinn, one stream for all frames",
    "TCP (tokio, loopback)",
];

/// One run of path `index` on fresh frames.
async fn run_path(index: usize, setup: &Setup, frames: Vec<Vec<u8>>) -> Result<Spent> {
    match index {
        0 => ours(setup, frames).await,
        1 => raw_quinn_streams(setup, frames).await,
        2 => raw_quinn_one_stream(setup, frames).await,
        _ => tcp(frames).await,
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then only a smoke run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|arg| arg == "--bench");
    // Any other argument selects tensor sizes in MiB ("16"), and `ours` our path alone (its
    // ratio columns then read "-"), for profiling one case: `perf record … throughput --bench ours 1`.
    let only_ours = args.iter().any(|arg| arg == "ours");
    let chosen: Vec<usize> = args.iter().filter_map(|arg| arg.parse::<usize>().ok()).map(|mib| mib * MIB).collect();
    let (mut tensor_sizes, total_bytes) = if full { (vec![MIB, 16 * MIB], 256 * MIB) } else { (vec![MIB], 8 * MIB) };
    if !chosen.is_empty() {
        tensor_sizes = chosen;
    }
    let repetitions = if full { REPETITIONS } else { SMOKE_REPETITIONS };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let setup = Setup::new()?;
        println!(
            "loopback throughput, {} MiB of f32 tensor frames per run, best of {repetitions} (paths interleaved)",
            total_bytes / MIB
        );
        println!(
            "{:<10} {:<38} {:>10} {:>14} {:>10} {:>14}",
            "tensor", "path", "MB/s", "vs raw quinn", "vs TCP", "CPU ms per MB"
        );
        for tensor_bytes in tensor_sizes {
            let count = (total_bytes / tensor_bytes).max(1);
            let moved = frames(tensor_bytes, 1)?[0].len() * count;
            // Interleaved so that a slow moment of the machine hits every path alike. The
            // fastest run of each path is kept, with the CPU time of that same run.
            let mut best: [Option<Spent>; PATHS.len()] = [None; PATHS.len()];
            for _ in 0..repetitions {
                for (index, best) in best.iter_mut().enumerate().take(if only_ours { 1 } else { PATHS.len() }) {
                    let spent = run_path(index, &setup, frames(tensor_bytes, count)?).await?;
                    if best.is_none_or(|b| spent.wall < b.wall) {
                        *best = Some(spent);
                    }
                }
            }
            let rate = |spent: Spent| mb_per_s(moved, spent.wall);
            let cpu_per_mb = |spent: Spent| spent.cpu.as_secs_f64() * 1e3 / (moved as f64 / 1e6);
            let ratio = |r: f64, base: Option<Spent>| base.map_or("-".to_owned(), |b| format!("{:.2}", r / rate(b)));
            let label = format!("{} MiB", tensor_bytes / MIB);
            for (path, spent) in PATHS.iter().zip(best) {
                let Some(spent) = spent else { continue };
                let rate = rate(spent);
                println!(
                    "{label:<10} {path:<38} {rate:>10.0} {:>14} {:>10} {:>14.3}",
                    ratio(rate, best[1]),
                    ratio(rate, best[3]),
                    cpu_per_mb(spent)
                );
            }
        }
        Ok(())
    })
}
