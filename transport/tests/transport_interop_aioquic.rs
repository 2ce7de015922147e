//! Interop with a QUIC stack that is not ours: Python's aioquic connects to a node.
//!
//! * without a client certificate it is refused: never `PeerUp`, nothing delivered;
//! * with node 3's certificate and ALPN `phalanx/8` but junk instead of a hello, or a good
//!   hello then a junk frame, its connection is closed with the codec's reason code;
//! * the node stays healthy: a Rust peer exchanges frames with it afterwards.
//!
//! The test installs aioquic itself, in a virtualenv under the target directory
//! (`target/interop-venv`, reused when present). Without `python3` (or without a working
//! `venv`/`pip`) it fails when `CI=true` and is skipped with a printed reason otherwise.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use phalanx_transport::{codes, DecodeError, TransportEvent, HELLO_LIMITS};
use support::*;

/// The aioquic release the script was written against (checked with `pip index versions`).
const AIOQUIC_VERSION: &str = "1.7.2";

fn venv_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("interop-venv")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aioquic_client.py")
}

fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The venv's python with aioquic installed, creating the venv if needed.
fn interpreter() -> Result<PathBuf, String> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let installed = format!("import aioquic, sys; sys.exit(aioquic.__version__ != '{AIOQUIC_VERSION}')");
    if python.exists() && run(Command::new(&python).args(["-c", &installed])).is_ok() {
        return Ok(python);
    }
    run(Command::new("python3").arg("--version")).map_err(|err| format!("python3 is missing: {err}"))?;
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))
        .map_err(|err| format!("python3 -m venv is missing or failed: {err}"))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("aioquic=={AIOQUIC_VERSION}"),
    ]))
    .map_err(|err| format!("pip install aioquic failed: {err}"))?;
    Ok(python)
}

/// Runs the aioquic client in `mode` against the node at `port`, returning its JSON report.
async fn aioquic(python: &Path, dir: &Path, port: u16, mode: &str) -> serde_json::Value {
    let mut command = Command::new(python);
    command.arg(script()).args(["--port", &port.to_string(), "--mode", mode]).arg("--ca").arg(dir.join("ca.pem"));
    command.args(["--protocol-version", &phalanx_transport::PROTOCOL_VERSION.to_string()]);
    if mode != "no-cert" {
        command.arg("--cert").arg(dir.join("node-3/node.pem")).arg("--key").arg(dir.join("node-3/node.key"));
    }
    let output = tokio::task::spawn_blocking(move || run(&mut command)).await.expect("join").expect("aioquic client");
    let report = serde_json::from_str(output.trim()).unwrap_or_else(|err| panic!("bad report {output:?}: {err}"));
    eprintln!("aioquic {mode}: {report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_clients_are_refused_or_closed_and_the_node_stays_healthy() {
    init_tracing();
    let python = match tokio::task::spawn_blocking(interpreter).await.expect("join") {
        Ok(python) => python,
        Err(reason) if std::env::var("CI").is_ok_and(|ci| ci == "true") => {
            panic!("the aioquic interop test needs python3 with venv and pip in CI: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED aioquic interop test: {reason}");
            return;
        }
    };
    let dir = cluster(4);
    let (server, mut events) = node(dir.path(), 0).await;
    let port = server.local_addr().port();

    // 1. No client certificate: refused by TLS, nothing admitted.
    let report = aioquic(&python, dir.path(), port, "no-cert").await;
    assert_eq!(report["hello_answered"], false, "{report}");
    let (event, before) = wait_for(&mut events, "Rejected", |e| matches!(e, TransportEvent::Rejected { .. })).await;
    assert_only_admitted(&before, None);
    let TransportEvent::Rejected { peer: None, code: codes::HANDSHAKE_FAILED, reason, .. } = &event else {
        panic!("{event:?}")
    };
    assert!(reason.contains("no certificates"), "{reason}");

    // 2. Node 3's certificate, junk instead of the hello: closed with the codec's code.
    let report = aioquic(&python, dir.path(), port, "junk-hello").await;
    let junk_len = u32::from_le_bytes(*b"this");
    assert!(junk_len > HELLO_LIMITS.max_frame_bytes);
    let (peer, before) = wait_rejected(&mut events, DecodeError::CODE_OVERSIZE).await;
    assert_eq!(peer, Some(3));
    assert_only_admitted(&before, None);
    assert_eq!(report["hello_answered"], false, "{report}");
    assert_eq!(report["terminated"]["code"], DecodeError::CODE_OVERSIZE, "{report}");
    assert_eq!(report["terminated"]["application"], true, "{report}");

    // 3. A correct hello (aioquic speaks it: PeerUp), then a frame of the next protocol version: closed.
    let report = aioquic(&python, dir.path(), port, "hello-then-junk").await;
    assert_eq!(report["hello_answered"], true, "{report}");
    assert_eq!(report["terminated"]["code"], DecodeError::CODE_UNSUPPORTED_VERSION, "{report}");
    let before = wait_peer_up(&mut events, 3).await;
    assert_only_admitted(&before, None);
    let (peer, before) = wait_rejected(&mut events, DecodeError::CODE_UNSUPPORTED_VERSION).await;
    assert_eq!(peer, Some(3));
    assert!(!before.iter().any(|e| matches!(e, TransportEvent::Message { .. })), "{before:?}");
    let (down, _) = wait_for(&mut events, "PeerDown", |e| matches!(e, TransportEvent::PeerDown { .. })).await;
    assert!(matches!(down, TransportEvent::PeerDown { peer: 3, .. }), "{down:?}");

    // The node is unharmed.
    let before = healthy_exchange(dir.path(), 1, &server, &mut events).await;
    assert_only_admitted(&before, Some(1));
    let stats = server.stats();
    assert_eq!(stats.rejected_with(codes::HANDSHAKE_FAILED), 1);
    assert_eq!(stats.rejected_with(DecodeError::CODE_OVERSIZE), 1);
    assert_eq!(stats.rejected_with(DecodeError::CODE_UNSUPPORTED_VERSION), 1);
    server.shutdown().await;
}
