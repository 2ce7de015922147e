//! The socket quinn sends through: quinn's own, with every GSO batch kept within what one
//! `sendmsg` may carry.
//!
//! With segmentation offload (GSO) quinn hands the socket up to ten packets of the path's MTU
//! at once, to go out in one system call. A UDP send carries at most 65,507 bytes of payload
//! over IPv4, and Linux refuses a larger GSO batch with `EMSGSIZE` — which quinn-udp (0.5)
//! takes for a failed MTU probe and reports as sent, so every packet of the batch is lost and
//! recovered by QUIC's loss detection a round trip later. Quinn does not bound a batch by
//! bytes, so with a path MTU above 6,550 bytes (loopback, jumbo frames) most large transfers
//! would lose most packets. [`GsoBounded`] asks quinn for no more segments than fit (it learns
//! the segment size from the batches it sends), and sends a batch built before that in parts.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Most payload bytes one GSO send may carry: 65,535 − 20 (IPv4 header) − 8 (UDP header).
/// IPv6 allows 20 bytes more; the IPv4 bound holds for both.
pub(crate) const MAX_GSO_BYTES: usize = 65_507;

/// How many segments of `segment_size` bytes one send may carry (at least one).
pub(crate) fn segments_per_send(segment_size: usize) -> usize {
    (MAX_GSO_BYTES / segment_size.max(1)).max(1)
}

/// A quinn socket whose GSO batches stay within [`MAX_GSO_BYTES`] (see the module docs).
pub(crate) struct GsoBounded {
    inner: Arc<dyn AsyncUdpSocket>,
    /// The segment size of the last batch sent; 0 before the first.
    segment_size: AtomicUsize,
}

impl GsoBounded {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self { inner, segment_size: AtomicUsize::new(0) }
    }
}

impl fmt::Debug for GsoBounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsoBounded")
            .field("inner", &self.inner)
            .field("segment_size", &self.segment_size.load(Ordering::Relaxed))
            .finish()
    }
}

impl AsyncUdpSocket for GsoBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(size) = transmit.segment_size.filter(|size| *size < transmit.contents.len()) else {
            return self.inner.try_send(transmit);
        };
        self.segment_size.store(size, Ordering::Relaxed);
        let per_send = segments_per_send(size) * size;
        if transmit.contents.len() <= per_send {
            return self.inner.try_send(transmit);
        }
        // A batch quinn built before this segment size was seen (the path's MTU just grew):
        // in parts. Should a later part find the socket full, quinn retries the whole batch
        // and the receiver drops the packets it already has (QUIC packet numbers are unique).
        for part in transmit.contents.chunks(per_send) {
            let segment_size = (part.len() > size).then_some(size);
            self.inner.try_send(&Transmit { contents: part, segment_size, ..*transmit })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        let inner = self.inner.max_transmit_segments();
        match self.segment_size.load(Ordering::Relaxed) {
            0 => inner,
            size => inner.min(segments_per_send(size)),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_carries_as_many_segments_as_fit_in_one_udp_payload() {
        assert_eq!(segments_per_send(1_452), 45);
        assert_eq!(segments_per_send(6_000), 10);
        assert_eq!(segments_per_send(16_000), 4);
        assert_eq!(segments_per_send(65_527), 1);
        assert_eq!(segments_per_send(0), MAX_GSO_BYTES);
        for size in [1_200, 1_452, 6_551, 9_000, 16_384, 65_507] {
            assert!(segments_per_send(size) * size <= MAX_GSO_BYTES, "{size}");
            assert!((segments_per_send(size) + 1) * size > MAX_GSO_BYTES, "{size}");
        }
    }

    /// Records what reaches the kernel's socket.
    #[derive(Debug, Default)]
    struct Recorder {
        sends: std::sync::Mutex<Vec<(usize, Option<usize>)>>,
    }

    #[derive(Debug)]
    struct Writable;

    impl UdpPoller for Writable {
        fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Box::pin(Writable)
        }
        fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
            self.sends.lock().unwrap().push((transmit.contents.len(), transmit.segment_size));
            Ok(())
        }
        fn poll_recv(&self, _: &mut Context, _: &mut [IoSliceMut<'_>], _: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 9)))
        }
        fn max_transmit_segments(&self) -> usize {
            64
        }
    }

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit { destination: SocketAddr::from(([127, 0, 0, 1], 9)), ecn: None, contents, segment_size, src_ip: None }
    }

    #[test]
    fn a_batch_beyond_one_send_goes_in_parts_and_later_batches_fit() {
        let recorder = Arc::new(Recorder::default());
        let socket = GsoBounded::new(recorder.clone());
        // Before any batch: what the socket underneath allows.
        assert_eq!(socket.max_transmit_segments(), 64);

        // Ten packets of 16,000 bytes and a short last one, built before the size was known:
        // four full packets a send (64,000 bytes), the rest in a last send.
        let bytes = vec![7u8; 10 * 16_000 + 500];
        socket.try_send(&transmit(&bytes, Some(16_000))).unwrap();
        let sends = std::mem::take(&mut *recorder.sends.lock().unwrap());
        assert_eq!(sends, [(64_000, Some(16_000)), (64_000, Some(16_000)), (32_500, Some(16_000))]);
        assert!(sends.iter().all(|(len, _)| *len <= MAX_GSO_BYTES));
        // From now on quinn is asked for batches that fit.
        assert_eq!(socket.max_transmit_segments(), 4);

        // A last part of one packet goes without a segment size; a batch that fits goes whole;
        // a single packet is passed on as it is.
        let bytes = vec![7u8; 5 * 16_000];
        socket.try_send(&transmit(&bytes, Some(16_000))).unwrap();
        socket.try_send(&transmit(&bytes[..48_000], Some(16_000))).unwrap();
        socket.try_send(&transmit(&bytes[..1_200], None)).unwrap();
        let sends = std::mem::take(&mut *recorder.sends.lock().unwrap());
        assert_eq!(sends, [(64_000, Some(16_000)), (16_000, None), (48_000, Some(16_000)), (1_200, None)]);

        // The path shrinks (black-hole detection): more, smaller segments fit again.
        socket.try_send(&transmit(&bytes[..2 * 1_452], Some(1_452))).unwrap();
        assert_eq!(socket.max_transmit_segments(), 45);
    }
}
