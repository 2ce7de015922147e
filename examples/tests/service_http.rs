//! The service example over real HTTP: it embeds node 0 of a cluster whose
//! nodes 1 and 2 are `phalanx node` processes. A job posted as JSON trains;
//! its server-sent events stream while node 2 is SIGKILLed mid-job; the job
//! finishes with the bits of `phalanx::train`; `/predict` answers from the
//! finished model; `/metrics` counts the steps; a bad spec gets a 400 naming
//! the field.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Bound on any read: a hang fails the test.
const WAIT: Duration = Duration::from_secs(90);

/// A binary built by this workspace's `cargo test` next to the test executable:
/// `target/<profile>/NAME` or `target/<profile>/examples/NAME`.
fn built(name: &str, examples: bool) -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let profile = me.parent().and_then(|deps| deps.parent()).unwrap().to_path_buf();
    let path = if examples { profile.join("examples").join(name) } else { profile.join(name) };
    assert!(path.is_file(), "{} is built by `cargo test --workspace` (or `cargo build -p phalanx`)", path.display());
    path
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<_> = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    sockets.iter().map(|s| s.local_addr().unwrap().port()).collect()
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_posted_over_http_survives_a_killed_peer_and_serves_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, 3).unwrap();
    let ports = free_ports(3);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let seeds = |i: usize| (0..3).filter(|j| *j != i).map(addr).collect::<Vec<_>>().join(",");
    let out = dir.path().join("out");
    let mut children = Killed(Vec::new());
    for i in 1..3 {
        let child = Command::new(built("phalanx", false))
            .args(["node", "--id", &i.to_string(), "--listen", &addr(i), "--seeds", &seeds(i)])
            .arg("--certs")
            .arg(&certs)
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{i}")))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        children.0.push(child);
    }
    let mut service = Command::new(built("service", true))
        .args(["--id", "0", "--listen", &addr(0), "--seeds", &seeds(0), "--http", "127.0.0.1:0"])
        .arg("--certs")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("data-0"))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(service.stdout.take().unwrap()).lines();
    children.0.push(service);
    let first = lines.next().expect("the service prints its address").unwrap();
    let http_addr: SocketAddr = first.trim_start_matches("serving on http://").parse().unwrap();

    let (status, body) = http(http_addr, "GET", "/healthz", "");
    assert_eq!((status, json(&body)["node"].as_u64()), (200, Some(0)));

    // A bad spec is refused by field, before it reaches the cluster.
    let (status, body) = http(http_addr, "POST", "/jobs", r#"{"model": "mlp", "epochz": 3}"#);
    assert!(status == 400 && body.contains("epochz"), "{status} {body}");

    // The job: the answer comes once the cluster (still forming) holds it.
    let spec = r#"{"model": "mlp", "dataset": "winequality", "trainers": 3, "epochs": 400}"#;
    let (status, body) = http(http_addr, "POST", "/jobs", spec);
    assert_eq!(status, 202, "{body}");
    let id = json(&body)["id"].as_u64().unwrap();

    // Server-sent events of the job: kill node 2 once it trains, wait for the end.
    let mut sse = TcpStream::connect(http_addr).unwrap();
    sse.set_read_timeout(Some(WAIT)).unwrap();
    write!(sse, "GET /jobs/{id}/events HTTP/1.1\r\nHost: {http_addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut killed = false;
    let mut finished = None;
    for line in BufReader::new(sse).lines() {
        let line = line.expect("events stream until the job ends");
        let Some(data) = line.strip_prefix("data:") else { continue };
        let event = json(data.trim());
        // `step` if the service's node coordinates the job, else the coordinator's `progress`.
        let progressed = event["event"] == "step" || event["event"] == "progress";
        if !killed && progressed && event["step"].as_u64() >= Some(300) {
            children.0[1].kill().unwrap();
            killed = true;
        }
        if event["event"] == "job_state" && event["state"] == "finished" {
            finished = Some(event);
            break;
        }
        assert_ne!(event["state"], "failed", "{event}");
    }
    let finished = finished.expect("the job finished");
    assert!(killed, "node 2 was killed mid-job");

    let spec_config: phalanx::JobConfig = serde_json::from_str(spec).unwrap();
    let (prepared, reference) = phalanx::train(spec_config, |_| {}).await.unwrap();
    let expected = phalanx::model_sha256(prepared.model.as_ref(), &reference.outcome.params);
    assert_eq!(finished["model_sha256"].as_str(), Some(expected.as_str()));
    let (status, body) = http(http_addr, "GET", &format!("/jobs/{id}"), "");
    let shown = json(&body);
    assert_eq!(
        (status, shown["state"].as_str(), shown["model_sha256"].as_str()),
        (200, Some("finished"), Some(expected.as_str()))
    );

    let rows = r#"{"job": JOB, "rows": [[7.4, 0.7, 0, 1.9, 0.076, 11, 34, 0.9978, 3.51, 0.56, 9.4], [7.8, 0.88, 0, 2.6, 0.098, 25, 67, 0.9968, 3.2, 0.68, 9.8]]}"#
        .replace("JOB", &id.to_string());
    let (status, body) = http(http_addr, "POST", "/predict", &rows);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["predictions"].as_array().map(Vec::len), Some(2), "{body}");
    let (status, body) = http(http_addr, "POST", "/predict", r#"{"job": 999, "rows": [[1]]}"#);
    assert_eq!(status, 409, "{body}");

    let (status, body) = http(http_addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(body.contains("phalanx_steps_applied_total{node=\"0\"}") && body.contains("phalanx_build_info"), "{body}");
    let (_, body) = http(http_addr, "GET", "/jobs", "");
    assert_eq!(json(&body).as_array().map(Vec::len), Some(1));
}
