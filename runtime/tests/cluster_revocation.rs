//! A node's revocation list, reloaded from its config file on SIGHUP: two real `phalanx node`
//! processes are members; node-1 is added to node 0's `revoked` and node 0 gets SIGHUP; node
//! 0 closes node 1's connection at once and refuses it from then on; removing the entry and
//! another SIGHUP lets node 1 back in.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<_> = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    sockets.iter().map(|s| s.local_addr().unwrap().port()).collect()
}

fn wait_for(events: &mpsc::Receiver<Value>, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(v) if pred(&v) => return v,
            Ok(v) => seen.push(v),
            Err(_) => panic!("timed out waiting for {what}; saw {seen:?}"),
        }
    }
}

#[test]
fn sighup_reloads_the_revocation_list_and_closes_a_revoked_member_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let ok = Command::new(env!("CARGO_BIN_EXE_phalanx"))
        .args(["certs", "--dir", certs.to_str().unwrap(), "--nodes", "2"])
        .status()
        .unwrap();
    assert!(ok.success());
    let ports = free_ports(2);
    let config = |revoked: &str| {
        format!(
            "id = 0\nlisten = \"127.0.0.1:{}\"\ncerts = {:?}\nseeds = [\"127.0.0.1:{}\"]\nrevoked = [{revoked}]\n",
            ports[0],
            certs.to_str().unwrap(),
            ports[1]
        )
    };
    let config_path = dir.path().join("node-0.toml");
    std::fs::write(&config_path, config("")).unwrap();

    let (tx, events) = mpsc::channel();
    let spawn = |args: Vec<String>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_phalanx"))
            .arg("node")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Node(child)
    };
    let node0 = spawn(vec!["--config".into(), config_path.to_str().unwrap().into()]);
    let _node1 = spawn(
        [
            "--id",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", ports[1]),
            "--certs",
            certs.to_str().unwrap(),
            "--seeds",
            &format!("127.0.0.1:{}", ports[0]),
        ]
        .map(String::from)
        .to_vec(),
    );
    wait_for(&events, "node 0 to see node 1", |v| v["event"] == "peer_up" && v["node"] == 0 && v["peer"] == 1);

    let hangup = |child: &Node| {
        let ok = Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status().unwrap();
        assert!(ok.success());
    };
    std::fs::write(&config_path, config("\"node-1\"")).unwrap();
    hangup(&node0);
    // (A swap of duplicate connections made at start-up may be reported first, as a
    // `peer_down` with code 0x204, when the replacement's hello is slow on a loaded machine.)
    let down = wait_for(&events, "node 0 to close node 1 as revoked", |v| {
        v["event"] == "peer_down"
            && v["node"] == 0
            && v["peer"] == 1
            && !v["reason"].as_str().unwrap_or("").contains("(duplicate)")
    });
    let reason = down["reason"].as_str().unwrap();
    assert!(reason.contains("revoked") && reason.contains("node-1 is on the revocation list"), "{down}");
    // Node 1 keeps dialling and is refused at the handshake.
    let refused =
        wait_for(&events, "a refused redial", |v| v["event"] == "rejected" && v["node"] == 0 && v["code"] == 0x20c);
    assert!(refused["reason"].as_str().unwrap().contains("revoked"), "{refused}");

    // The entry removed and SIGHUP again: node 1 is let back in.
    std::fs::write(&config_path, config("")).unwrap();
    hangup(&node0);
    wait_for(&events, "node 1 back", |v| v["event"] == "peer_up" && v["node"] == 0 && v["peer"] == 1);
}
