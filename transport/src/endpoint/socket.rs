//! The UDP socket under the QUIC endpoint.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a non-blocking UDP socket with kernel send and receive buffers of `buffer_bytes`.
///
/// Kernel defaults (about 208 KiB on Linux) dropped packets during bulk transfers on
/// loopback, which QUIC then has to detect and resend; 4 MiB dropped none. Linux caps the
/// request at `net.core.rmem_max` / `wmem_max` without an error, so a smaller grant is
/// logged as a warning rather than silently accepted.
///
/// ```
/// let socket = phalanx_transport::bind_udp("127.0.0.1:0".parse()?, 1 << 20)?;
/// assert!(socket.local_addr()?.port() != 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer_bytes)?;
    socket.set_send_buffer_size(buffer_bytes)?;
    let (recv, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    if recv < buffer_bytes || send < buffer_bytes {
        tracing::warn!(
            %addr,
            requested_bytes = buffer_bytes,
            recv_bytes = recv,
            send_bytes = send,
            "kernel granted smaller UDP buffers than requested (raise net.core.rmem_max / wmem_max); \
             bulk transfers may lose packets"
        );
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
