//! How a node's links are made: real TCP sockets (the binaries), or a
//! network that someone else supplies (the whole-system simulation, whose
//! hosts talk over turmoil's simulated sockets).
//!
//! The seam is small on purpose. Outbound, a [`Network`] decides how a
//! channel's connection is dialled; everything above it (tonic's HTTP/2,
//! TLS when configured, deadlines, the role check) is the same code in
//! both cases. Inbound, a node's `run_on` takes any stream of accepted
//! connections; its `run` is that over a TCP listener.
//!
//! Outbound connections on either network are a [`CoalescingStream`]
//! under TLS, so that a call's HEADERS and DATA leave in one write (see
//! there why h2 would send them apart).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream a channel runs over.
pub trait Io: AsyncRead + AsyncWrite + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + 'static> Io for T {}

/// A dialled connection.
pub type BoxedIo = Pin<Box<dyn Io>>;

/// What dialling returns.
pub type Dialing = Pin<Box<dyn Future<Output = io::Result<BoxedIo>> + Send>>;

/// Opens connections on a network that is not the machine's own.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `host:port` (as written in a node's URL). Errors are
    /// the connection's: refused, unreachable, timed out.
    fn dial(&self, host: &str, port: u16) -> Dialing;
}

/// Which network a node's outbound links use.
#[derive(Clone, Default)]
pub enum Network {
    /// The machine's TCP sockets.
    #[default]
    Tcp,
    /// Connections opened by this dialer (a simulation's).
    Dialed(Arc<dyn Dialer>),
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::Tcp => f.write_str("Tcp"),
            Network::Dialed(_) => f.write_str("Dialed"),
        }
    }
}

impl Network {
    /// A lazily connecting channel on `endpoint` over this network.
    pub(crate) fn connect_lazy(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        match self {
            Network::Tcp => {
                endpoint.connect_with_connector_lazy(tower::service_fn(|uri: tonic::transport::Uri| async move {
                    let host = uri
                        .host()
                        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} names no host")))?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
                    let stream = tokio::net::TcpStream::connect((host, port)).await?;
                    stream.set_nodelay(true)?;
                    Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(CoalescingStream::new(stream)))
                }))
            }
            Network::Dialed(dialer) => {
                let dialer = dialer.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: tonic::transport::Uri| {
                    let dialer = dialer.clone();
                    async move {
                        let host = uri.host().ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} names no host"))
                        })?;
                        let port = uri.port_u16().unwrap_or(80);
                        let io = dialer.dial(host, port).await?;
                        Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(CoalescingStream::new(io)))
                    }
                }))
            }
        }
    }
}

/// Most bytes a [`CoalescingStream`] holds before it writes them out
/// whatever the flushes say.
pub const COALESCED_BYTES_MAX: usize = 64 * 1024;

/// A client connection whose flush waits one turn of the runtime, so that
/// what its task's neighbours write in that turn leaves in the same
/// segment.
///
/// Why: h2 holds every new client stream as "pending open" until the
/// connection's task runs, and only then gives it send capacity. So the
/// connection task writes and flushes a call's HEADERS alone; hyper's
/// body task, woken by the capacity, queues the DATA, and the connection
/// task writes and flushes again: two TLS records, two `writev`s and two
/// TCP segments a call, and the server may wake for each (seen with
/// `strace` of the coordinator: 64 bytes, then about 200, for every
/// PrepareBatch). Here the first `poll_flush` that finds bytes buffered
/// wakes its own task and answers `Pending`; the writes and flushes that
/// follow land in the buffer, and the next `poll_flush` writes everything
/// in one `write`. A caller that gets `Pending` from a flush polls it
/// again when woken (the `AsyncWrite` contract); h2's connection task and
/// tokio-rustls's handshake both do.
///
/// Nothing is acknowledged on the strength of a buffered byte: a flush
/// answers `Ready` only once everything is handed to the socket. The
/// buffer is bounded by [`COALESCED_BYTES_MAX`]: a write that would
/// exceed it writes the buffer out first.
pub struct CoalescingStream<S> {
    inner: S,
    out: Vec<u8>,
    /// How much of `out` the socket has taken.
    written: usize,
    /// The last flush found bytes and answered `Pending` without writing.
    flush_deferred: bool,
}

impl<S: AsyncWrite + Unpin> CoalescingStream<S> {
    pub fn new(inner: S) -> CoalescingStream<S> {
        CoalescingStream { inner, out: Vec::new(), written: 0, flush_deferred: false }
    }

    /// Hands everything buffered to the socket.
    fn poll_write_out(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        while self.written < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Room for `wanted` more bytes, writing the buffer out if it is full.
    fn poll_room(&mut self, cx: &mut std::task::Context<'_>, wanted: usize) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if self.out.len() + wanted > COALESCED_BYTES_MAX && self.written < self.out.len() {
            std::task::ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(COALESCED_BYTES_MAX.saturating_sub(self.out.len()).min(wanted)))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescingStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescingStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if buf.is_empty() {
            return std::task::Poll::Ready(Ok(0));
        }
        let room = std::task::ready!(self.poll_room(cx, buf.len()))?;
        self.out.extend_from_slice(&buf[..room]);
        std::task::Poll::Ready(Ok(room))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return std::task::Poll::Ready(Ok(0));
        }
        let mut room = std::task::ready!(self.poll_room(cx, total))?;
        let mut taken = 0;
        for buf in bufs {
            let part = buf.len().min(room);
            self.out.extend_from_slice(&buf[..part]);
            taken += part;
            room -= part;
            if room == 0 {
                break;
            }
        }
        std::task::Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        if self.written == self.out.len() {
            self.flush_deferred = false;
            return Poll::Ready(Ok(()));
        }
        if !self.flush_deferred {
            self.flush_deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(self.poll_write_out(cx))?;
        self.flush_deferred = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::ready!(self.poll_write_out(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod coalescing_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use tokio::io::AsyncReadExt;

    /// A waker that counts its wakes.
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn connected_pair() -> (CoalescingStream<tokio::net::TcpStream>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialing = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dialing, listener.accept());
        (CoalescingStream::new(dialed.unwrap()), accepted.unwrap().0)
    }

    /// Reads what has arrived at `peer` without waiting.
    fn arrived(peer: &tokio::net::TcpStream) -> Vec<u8> {
        let mut buf = vec![0u8; 2 * COALESCED_BYTES_MAX];
        match peer.try_read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("reading the peer: {e}"),
        }
    }

    #[tokio::test]
    async fn a_flush_waits_one_turn_and_then_sends_what_was_written_meanwhile_in_one_write() {
        let (mut stream, peer) = connected_pair().await;
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);

        assert!(matches!(Pin::new(&mut stream).poll_write(&mut cx, b"HEADERS"), Poll::Ready(Ok(7))));
        // The first flush holds the bytes back and wakes its task to come again.
        assert!(Pin::new(&mut stream).poll_flush(&mut cx).is_pending());
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(arrived(&peer).is_empty(), "nothing leaves before the second flush");

        assert!(matches!(Pin::new(&mut stream).poll_write(&mut cx, b"+DATA"), Poll::Ready(Ok(5))));
        assert!(matches!(Pin::new(&mut stream).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        let mut got = Vec::new();
        let mut peer = peer;
        while got.len() < 12 {
            let mut buf = [0u8; 64];
            let n = peer.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"HEADERS+DATA");

        // A flush with nothing buffered is done at once, and wakes no one.
        assert!(matches!(Pin::new(&mut stream).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_buffer_never_holds_more_than_its_bound() {
        let (mut stream, mut peer) = connected_pair().await;
        let reading = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.map(|_| got.len())
        });
        let big = vec![7u8; COALESCED_BYTES_MAX + 100];

        // One write takes at most the bound.
        let n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write(cx, &big)).await.unwrap();
        assert_eq!(n, COALESCED_BYTES_MAX);
        assert_eq!(stream.out.len(), COALESCED_BYTES_MAX);
        // The next write finds the buffer full: it hands it to the socket
        // first and keeps only its own bytes.
        let n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write(cx, &big[..100])).await.unwrap();
        assert_eq!(n, 100);
        assert_eq!(stream.out.len(), 100);
        let vectored = [io::IoSlice::new(&big[..10]), io::IoSlice::new(&big)];
        let n = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &vectored)).await.unwrap();
        assert!(n > 0 && n <= COALESCED_BYTES_MAX, "{n}");
        assert!(stream.out.len() <= COALESCED_BYTES_MAX);

        // Shutting down sends everything still buffered.
        let sent = COALESCED_BYTES_MAX + 100 + n;
        std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await.unwrap();
        assert_eq!(reading.await.unwrap().unwrap(), sent);
    }
}
