//! Asking a silent peer's host whether a process still listens at the peer's address.
//!
//! A process killed by a signal or a crash sends nothing: QUIC has no close to send, so its
//! peers only learn of the death from the silence (a failure timeout of heartbeats, or QUIC's
//! idle timeout). Its host, though, is alive and answers a UDP datagram to the dead
//! process's port with ICMP "port unreachable", which a *connected* UDP socket reports as
//! `ECONNREFUSED` on its next receive. [`Transport::probe`](crate::Transport::probe) sends
//! such a datagram (one zero byte: a QUIC endpoint drops it as a packet whose fixed bit is
//! unset, RFC 9000 §17.2–17.3) from a fresh socket connected to the peer's address and
//! reports [`TransportEvent::PeerGone`](crate::TransportEvent::PeerGone) if the refusal comes
//! back within [`PROBE_WAIT`].
//!
//! What an answer means, and what no answer means:
//! - **Refused**: no process listened at that address when the probe arrived. Proof enough
//!   on a host that is up; an on-path attacker could forge the ICMP message, which is why
//!   the caller should only act on it for a peer that is silent anyway.
//! - **Nothing** (the usual case for a live peer): the peer is alive, paused (its socket
//!   still queues datagrams), its host or the network is down, or ICMP is filtered. The
//!   caller's failure timeout decides then.
//!
//! Bounded: at most one probe per peer at a time, each with its own socket for at most
//! [`PROBE_WAIT`].

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

/// How long a probe waits for the peer's host to refuse it. Loopback and LAN answers take
/// well under a millisecond.
pub const PROBE_WAIT: Duration = Duration::from_millis(200);

/// The probe's payload: a QUIC endpoint discards it (fixed bit unset).
const PROBE: [u8; 1] = [0];

/// Whether the host at `addr` refused a datagram to it within `wait`: `Ok(true)` when it
/// did (no process listens there), `Ok(false)` when nothing came back, `Err` when the probe
/// could not be sent at all (no local socket, no route).
pub async fn port_closed(addr: SocketAddr, wait: Duration) -> io::Result<bool> {
    let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    match socket.send(&PROBE).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(true),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
        Ok(Err(e)) => Err(e),
        // Anything the address sent back is a sign of life; so is silence (see the module docs).
        Ok(Ok(_)) | Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_refused_and_a_bound_one_is_not() {
        let live = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (live_addr, dead_addr) = (live.local_addr().expect("addr"), dead.local_addr().expect("addr"));
        drop(dead);
        assert!(port_closed(dead_addr, PROBE_WAIT).await.expect("probe"), "{dead_addr} has no socket");
        assert!(!port_closed(live_addr, Duration::from_millis(50)).await.expect("probe"), "{live_addr} is bound");
        let mut buf = [0u8; 8];
        let (n, _) = live.recv_from(&mut buf).expect("the probe arrived");
        assert_eq!(&buf[..n], &PROBE);
    }
}
