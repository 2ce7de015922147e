//! A TCP relay between each node and the coordination service, so that a chaos run can cut one
//! node off from the service while it still reaches its peers (QUIC does not pass through it).
//!
//! Every node gets its own loopback port for each of the service's endpoints and joins through
//! those; the relay copies bytes both ways. [`ServiceRelay::cut`] closes the node's live
//! connections and refuses its new ones until [`ServiceRelay::heal`]: to the node the service
//! is gone (its lease or session runs out and it stops), to the service the node is gone (its
//! registration expires and the others carry on without it).
//!
//! ```text
//!  node 0 ──▶ 127.0.0.1:P0 ─┐
//!  node 1 ──▶ 127.0.0.1:P1 ─┼─▶ relay ──▶ etcd / ZooKeeper
//!  node 2 ──▶ 127.0.0.1:P2 ─┘   (cut: node 1's connections closed, new ones refused)
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the relay waits for a connection to the service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Copy buffer per direction of a connection.
const BUFFER_BYTES: usize = 16 * 1024;
/// The most connections one node may hold through the relay at once (a client keeps one or two
/// per endpoint; more are refused).
const MAX_CONNECTIONS_PER_NODE: usize = 64;

/// One node's side of the relay.
struct NodeSide {
    cut: AtomicBool,
    /// Both ends of each live connection, to close them on a cut.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
}

/// The relay: per node and service endpoint, a loopback port.
pub struct ServiceRelay {
    nodes: BTreeMap<u32, Arc<NodeSide>>,
    /// `(node, endpoint index)` → the port the node dials.
    ports: BTreeMap<(u32, usize), u16>,
    stop: Arc<AtomicBool>,
}

impl ServiceRelay {
    /// Relay `nodes` to the service's `endpoints` (`HOST:PORT`).
    pub fn start(nodes: u32, endpoints: &[String]) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut relay = ServiceRelay { nodes: BTreeMap::new(), ports: BTreeMap::new(), stop: stop.clone() };
        for node in 0..nodes {
            let side = Arc::new(NodeSide { cut: AtomicBool::new(false), live: Mutex::new(Vec::new()) });
            relay.nodes.insert(node, side.clone());
            for (i, endpoint) in endpoints.iter().enumerate() {
                let target: SocketAddr = endpoint.parse().map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("service endpoint {endpoint}: {e}"))
                })?;
                let listener = TcpListener::bind("127.0.0.1:0")?;
                relay.ports.insert((node, i), listener.local_addr()?.port());
                let (side, stop) = (side.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("service-relay-{node}-{i}"))
                    .spawn(move || accept(listener, target, side, stop))?;
            }
        }
        Ok(relay)
    }

    /// The endpoints node `node` dials instead of the service's.
    pub fn endpoints(&self, node: u32) -> Vec<String> {
        self.ports.range((node, 0)..=(node, usize::MAX)).map(|(_, port)| format!("127.0.0.1:{port}")).collect()
    }

    /// Cut `node` off from the service: its connections close, new ones are refused.
    pub fn cut(&self, node: u32) {
        if let Some(side) = self.nodes.get(&node) {
            side.cut.store(true, Ordering::SeqCst);
            let live = std::mem::take(&mut *side.live.lock().unwrap_or_else(|e| e.into_inner()));
            for (a, b) in live {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }

    /// Let every node through again.
    pub fn heal(&self) {
        for side in self.nodes.values() {
            side.cut.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for ServiceRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for node in self.nodes.keys().copied().collect::<Vec<_>>() {
            self.cut(node);
        }
        // Wake the accept loops so they see the stop.
        for port in self.ports.values() {
            let _ = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_millis(100));
        }
    }
}

fn accept(listener: TcpListener, target: SocketAddr, side: Arc<NodeSide>, stop: Arc<AtomicBool>) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if side.cut.load(Ordering::SeqCst) {
            // Cut off: the connection is refused the moment it is made.
            drop(client);
            continue;
        }
        let Ok(service) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else { continue };
        let _ = (client.set_nodelay(true), service.set_nodelay(true));
        let (Ok(c2), Ok(s2)) = (client.try_clone(), service.try_clone()) else { continue };
        {
            let mut live = side.live.lock().unwrap_or_else(|e| e.into_inner());
            live.retain(|(a, _)| a.peer_addr().is_ok());
            if live.len() >= MAX_CONNECTIONS_PER_NODE {
                continue;
            }
            match (client.try_clone(), service.try_clone()) {
                (Ok(a), Ok(b)) => live.push((a, b)),
                _ => continue,
            }
        }
        std::thread::spawn(move || copy(client, s2));
        std::thread::spawn(move || copy(service, c2));
    }
}

/// Copy `from` into `to` until either closes; then close both.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut out = stream.try_clone().unwrap();
                    let _ = std::io::copy(&mut &stream, &mut out);
                });
            }
        });
        addr
    }

    fn round_trip(endpoint: &str) -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(endpoint)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"ping")?;
        let mut reply = [0u8; 4];
        s.read_exact(&mut reply)?;
        Ok(reply.to_vec())
    }

    #[test]
    fn a_cut_node_loses_the_service_and_the_others_keep_it() {
        let service = echo();
        let relay = ServiceRelay::start(2, &[service.to_string()]).unwrap();
        let (zero, one) = (relay.endpoints(0)[0].clone(), relay.endpoints(1)[0].clone());
        assert_ne!(zero, one, "each node has its own port");
        assert_eq!(round_trip(&zero).unwrap(), b"ping");
        // A live connection of node 1, then the cut.
        let mut live = TcpStream::connect(&one).unwrap();
        live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        live.write_all(b"ping").unwrap();
        let mut reply = [0u8; 4];
        live.read_exact(&mut reply).unwrap();
        relay.cut(1);
        // Its connection is closed (read returns end of stream or an error, never data).
        let mut byte = [0u8; 1];
        assert!(matches!(live.read(&mut byte), Ok(0) | Err(_)), "the live connection is closed");
        assert!(round_trip(&one).is_err(), "new connections of node 1 are refused");
        assert_eq!(round_trip(&zero).unwrap(), b"ping", "node 0 still reaches the service");
        relay.heal();
        assert_eq!(round_trip(&one).unwrap(), b"ping", "healed");
    }
}
