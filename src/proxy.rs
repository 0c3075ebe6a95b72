//! A TCP proxy on one directed link between two nodes of a local cluster, so
//! that the bench can delay the link or cut it.
//!
//! Why it exists: the failure model has delayed messages and cut links, and
//! the usual tool, `tc netem`, needs root and a kernel module this machine
//! does not have. A proxy in user space needs neither. With
//! `ClusterSpec::proxied_links`, [`crate::cluster::Cluster`] gives every
//! directed link (c1→pi, pi→c1, pi→pj) its own `LinkProxy` and hands the
//! node the proxy's address instead of its peer's, so the link can be broken
//! without touching either process.
//!
//! What it guarantees:
//! - Bytes pass unchanged and in order, in both directions. A half-close
//!   (EOF) on one side is passed on as a half-close; an error on either side
//!   closes both.
//! - With a delay `d` set, every chunk read from one side is written to the
//!   other no earlier than `d` after it was read: a lower bound, scheduling
//!   adds to it. The delay is one way and applies to both directions, so a
//!   request and its answer each pay it: a round trip gains at least `2 d`.
//!   Changing the delay never reorders: a chunk never overtakes one read
//!   before it (after a shorter delay is set, the queue drains in order).
//! - After [`LinkProxy::cut`], every connection open at the time is closed
//!   (both sockets dropped, bytes still queued in the proxy discarded), and
//!   every new connection is accepted and closed at once, until
//!   [`LinkProxy::heal`]. The closing is done by the connections' tasks, so
//!   it completes just after `cut` returns; a chunk read after the cut is
//!   never forwarded. Callers see a closed or reset connection, not
//!   silence: this models a link that fails fast.
//! - After [`LinkProxy::black_hole`], the link is silent instead: open
//!   connections stay open but every byte read from either side from then
//!   on is discarded, and new connections are accepted and never answered
//!   (nothing reaches the upstream). Only the callers' deadlines tell. At
//!   [`LinkProxy::heal`] every connection that lost bytes to the black hole
//!   is closed (its stream is broken) and new ones are forwarded again.
//! - A connection whose upstream refuses (the node is down) is closed at
//!   once; the proxy keeps listening, so a node restarted on the same
//!   address is reachable through the same proxy.
//! - Bounded: at most [`CONNECTIONS_MAX`] connections at once (more are
//!   accepted and closed); each direction of a connection queues at most
//!   [`CHUNKS_QUEUED_MAX`] chunks of at most [`CHUNK_BYTES_MAX`] bytes, and
//!   when its queue is full the proxy stops reading, so TCP flow control
//!   pushes back on the sender; a delay is at most [`DELAY_MAX`].
//! - Dropping the proxy, or [`LinkProxy::stop`], ends its listener and every
//!   connection.
//!
//! What it does not do: lose, duplicate or reorder bytes inside a
//! connection. TCP would not either; seen from above TCP, loss is a delay or
//! a broken connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Most connections a proxy holds at once; more are accepted and closed.
pub const CONNECTIONS_MAX: usize = 1_024;
/// Largest chunk read from a socket in one go.
pub const CHUNK_BYTES_MAX: usize = 16 * 1_024;
/// Most chunks queued in one direction of one connection (waiting for their
/// delay or for the receiver); past it the proxy stops reading.
pub const CHUNKS_QUEUED_MAX: usize = 256;
/// Longest delay a link accepts.
pub const DELAY_MAX: Duration = Duration::from_secs(60);
/// How long a new connection waits for the upstream to accept it.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

const _: () = assert!(CONNECTIONS_MAX > 0 && CHUNK_BYTES_MAX > 0 && CHUNKS_QUEUED_MAX > 0);

/// The control shared by the proxy and its connection tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkState {
    delay: Duration,
    cut: bool,
    black_hole: bool,
    /// Bumped by every `cut`: a connection opened in an earlier epoch ends,
    /// even if `heal` came before its task saw the cut.
    cut_epoch: u64,
}

/// A proxy for one directed link: listens on `127.0.0.1:0` and forwards every
/// connection to `upstream`. See the module documentation for what it
/// guarantees.
pub struct LinkProxy {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    state: watch::Sender<LinkState>,
    acceptor: JoinHandle<()>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.upstream)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LinkProxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `upstream`, healed (no
    /// delay, connections allowed). The upstream need not be listening yet:
    /// each connection connects to it when it is accepted.
    pub async fn start(upstream: SocketAddr) -> io::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local_addr = listener.local_addr()?;
        let (state, watcher) =
            watch::channel(LinkState { delay: Duration::ZERO, cut: false, black_hole: false, cut_epoch: 0 });
        let acceptor = tokio::spawn(accept_loop(listener, upstream, watcher));
        Ok(LinkProxy { local_addr, upstream, state, acceptor })
    }

    /// Where nodes connect to use this link.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where this link leads.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Every chunk is forwarded `delay` after it was read, in both
    /// directions, from now on (chunks already queued keep their time).
    /// `Duration::ZERO` forwards at once.
    ///
    /// Panics if `delay` is over [`DELAY_MAX`].
    pub fn set_delay(&self, delay: Duration) {
        assert!(delay <= DELAY_MAX, "a link delay of {delay:?} is over the most, {DELAY_MAX:?}");
        self.state.send_modify(|state| state.delay = delay);
    }

    /// Closes every open connection and refuses new ones (accepts and closes
    /// them) until [`LinkProxy::heal`].
    pub fn cut(&self) {
        self.state.send_modify(|state| {
            state.cut = true;
            state.cut_epoch += 1;
        });
    }

    /// Makes the link silent until [`LinkProxy::heal`]: bytes vanish,
    /// connections stay open, new ones are never answered.
    pub fn black_hole(&self) {
        self.state.send_modify(|state| state.black_hole = true);
    }

    /// No delay, connections allowed. Connections that lost bytes to a
    /// black hole are closed.
    pub fn heal(&self) {
        self.state.send_modify(|state| {
            state.delay = Duration::ZERO;
            state.cut = false;
            if state.black_hole {
                state.black_hole = false;
                state.cut_epoch += 1;
            }
        });
    }

    pub fn is_black_hole(&self) -> bool {
        self.state.borrow().black_hole
    }

    pub fn delay(&self) -> Duration {
        self.state.borrow().delay
    }

    pub fn is_cut(&self) -> bool {
        self.state.borrow().cut
    }

    /// Stops listening and closes every connection. Dropping the proxy does
    /// the same.
    pub fn stop(&self) {
        // Aborting the acceptor drops the listener and its JoinSet, which
        // aborts every connection task and so drops their sockets.
        self.acceptor.abort();
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, state: watch::Receiver<LinkState>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let now = *state.borrow();
                    if now.cut {
                        drop(client);
                        continue;
                    }
                    if connections.len() >= CONNECTIONS_MAX {
                        tracing::warn!(%upstream, "link proxy: {CONNECTIONS_MAX} connections open; closing a new one");
                        drop(client);
                        continue;
                    }
                    let _ = client.set_nodelay(true);
                    connections.spawn(serve(client, upstream, state.clone(), now.cut_epoch));
                }
                Err(error) => {
                    tracing::warn!(%upstream, %error, "link proxy: accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
        debug_assert!(connections.len() <= CONNECTIONS_MAX);
    }
}

/// One proxied connection, opened in cut epoch `epoch`: ends when both
/// directions have ended, when either fails, or at the next cut.
async fn serve(client: TcpStream, upstream: SocketAddr, state: watch::Receiver<LinkState>, epoch: u64) {
    let mut cut_watcher = state.clone();
    // Completes at the next cut, or when the proxy is gone.
    let cut = async move {
        let _ = cut_watcher.wait_for(|s| s.cut_epoch != epoch).await;
    };
    tokio::pin!(cut);
    if state.borrow().black_hole {
        // Accepted into the black hole: held open, never answered, closed at
        // the heal (which moves the epoch on).
        cut.await;
        drop(client);
        return;
    }
    let upstream = tokio::select! {
        connected = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)) => match connected {
            Ok(Ok(stream)) => stream,
            // The upstream is down: closing the client's connection says so.
            _ => return,
        },
        _ = &mut cut => return,
    };
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let forward = pipe(client_read, upstream_write, state.clone(), epoch);
    let backward = pipe(upstream_read, client_write, state, epoch);
    tokio::pin!(forward, backward);
    let (mut forward_done, mut backward_done) = (false, false);
    while !(forward_done && backward_done) {
        tokio::select! {
            result = &mut forward, if !forward_done => match result {
                Ok(()) => forward_done = true,
                Err(_) => return,
            },
            result = &mut backward, if !backward_done => match result {
                Ok(()) => backward_done = true,
                Err(_) => return,
            },
            _ = &mut cut => return,
        }
    }
}

fn severed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the link was cut")
}

/// Copies `from` to `to` through a bounded queue of chunks, each written no
/// earlier than its due time. Returns `Ok` after EOF on `from` has been
/// passed on as a shutdown of `to`, with every chunk written.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    state: watch::Receiver<LinkState>,
    epoch: u64,
) -> io::Result<()> {
    let (queue, mut queued) = mpsc::channel::<(Option<Instant>, Vec<u8>)>(CHUNKS_QUEUED_MAX);
    let reader_state = state.clone();
    let read = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES_MAX];
        loop {
            let n = from.read(&mut buffer).await?;
            if n == 0 {
                // EOF: dropping `queue` lets the writer drain and shut down.
                return Ok::<(), io::Error>(());
            }
            let now = *reader_state.borrow();
            if now.cut_epoch != epoch {
                return Err(severed());
            }
            if now.black_hole {
                continue;
            }
            let due = (!now.delay.is_zero()).then(|| Instant::now() + now.delay);
            if queue.send((due, buffer[..n].to_vec())).await.is_err() {
                // The writer has ended; it reports why.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = queued.recv().await {
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
            if state.borrow().cut_epoch != epoch {
                return Err(severed());
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::pin!(read, write);
    let mut read_done = false;
    loop {
        tokio::select! {
            result = &mut read, if !read_done => {
                result?;
                read_done = true;
            }
            result = &mut write => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generous guard so that a broken proxy fails the test instead of
    /// hanging it; not a claim about speed.
    const GUARD: Duration = Duration::from_secs(10);

    /// An echo server on 127.0.0.1:0: writes back what it reads, and closes
    /// its side after EOF.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                    let _ = write.shutdown().await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut answer = vec![0u8; message.len()];
        tokio::time::timeout(GUARD, stream.read_exact(&mut answer)).await.expect("the echo came back")?;
        Ok(answer)
    }

    /// True if the connection is closed: a read returns 0 bytes or an error.
    async fn is_closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(GUARD, stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("the connection stayed open"),
        }
    }

    #[tokio::test]
    async fn bytes_pass_through_unchanged_and_eof_is_passed_on() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        // More than one chunk and every byte value, over a few connections at
        // once.
        let message: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut tasks = JoinSet::new();
        for _ in 0..4 {
            let message = message.clone();
            let addr = proxy.local_addr();
            tasks.spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut read, mut write) = stream.into_split();
                let writer = tokio::spawn(async move {
                    write.write_all(&message).await.unwrap();
                    write.shutdown().await.unwrap();
                });
                let mut echoed = Vec::new();
                tokio::time::timeout(GUARD, read.read_to_end(&mut echoed)).await.expect("EOF came back").unwrap();
                writer.await.unwrap();
                echoed
            });
        }
        while let Some(echoed) = tasks.join_next().await {
            assert!(echoed.unwrap() == message, "the bytes came back changed");
        }
    }

    #[tokio::test]
    async fn a_delay_holds_every_chunk_in_both_directions_and_keeps_order() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"warm").await.unwrap(), b"warm");
        let delay = Duration::from_millis(100);
        proxy.set_delay(delay);
        assert_eq!(proxy.delay(), delay);
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"ping").await.unwrap(), b"ping");
        let elapsed = started.elapsed();
        // Forward and back: the delay is paid twice. A lower bound only.
        assert!(elapsed >= 2 * delay, "a round trip took {elapsed:?} with a one-way delay of {delay:?}");
        // Healing while chunks are queued does not reorder them.
        let (mut read, mut write) = stream.into_split();
        write.write_all(b"first ").await.unwrap();
        // Time for the proxy to read and queue it; if it has not, the order
        // is still checked.
        tokio::time::sleep(Duration::from_millis(20)).await;
        proxy.heal();
        write.write_all(b"second").await.unwrap();
        let mut answer = [0u8; 12];
        tokio::time::timeout(GUARD, read.read_exact(&mut answer)).await.unwrap().unwrap();
        assert_eq!(&answer, b"first second");
    }

    #[tokio::test]
    async fn a_cut_closes_open_connections_and_refuses_new_ones_until_healed() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");

        proxy.cut();
        assert!(proxy.is_cut());
        assert!(is_closed(&mut open).await, "an open connection is closed by the cut");
        // The kernel completes the handshake; the proxy then closes it.
        if let Ok(mut refused) = TcpStream::connect(proxy.local_addr()).await {
            let _ = refused.write_all(b"hello?").await;
            assert!(is_closed(&mut refused).await, "a new connection is closed while the link is cut");
        }

        proxy.heal();
        assert!(!proxy.is_cut());
        let mut healed = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"after").await.unwrap(), b"after");
    }

    #[tokio::test]
    async fn a_black_hole_keeps_connections_open_and_silent_until_healed() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"before").await.unwrap(), b"before");
        // What "silent" means here: no answer and no close within this long,
        // where the echo answers in microseconds.
        let silence = Duration::from_millis(300);
        let mut buffer = [0u8; 16];

        proxy.black_hole();
        assert!(proxy.is_black_hole());
        open.write_all(b"lost").await.unwrap();
        assert!(tokio::time::timeout(silence, open.read(&mut buffer)).await.is_err(), "an open connection goes silent");
        let mut held = TcpStream::connect(proxy.local_addr()).await.unwrap();
        held.write_all(b"hello?").await.unwrap();
        assert!(tokio::time::timeout(silence, held.read(&mut buffer)).await.is_err(), "a new one is never answered");

        proxy.heal();
        assert!(!proxy.is_black_hole());
        assert!(is_closed(&mut open).await, "a connection that lost bytes is closed at the heal");
        assert!(is_closed(&mut held).await, "so is one held by the black hole");
        let mut healed = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"after").await.unwrap(), b"after");
    }

    #[tokio::test]
    async fn a_cut_and_heal_before_the_connection_runs_still_closes_it() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut open = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut open, b"x").await.unwrap(), b"x");
        // On this single-threaded runtime no proxy task runs in between.
        proxy.cut();
        proxy.heal();
        assert!(is_closed(&mut open).await, "the cut epoch outlives the heal");
    }

    #[tokio::test]
    async fn a_down_upstream_closes_the_connection_and_a_restarted_one_is_reached() {
        // Find a free port, then leave it with nothing listening.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstream: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let proxy = LinkProxy::start(upstream).await.unwrap();
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(is_closed(&mut stream).await, "nothing upstream: the connection is closed");

        let listener = TcpListener::bind(upstream).await.unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (mut read, mut write) = socket.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"back").await.unwrap(), b"back");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections_and_its_listener() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let addr = proxy.local_addr();
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert_eq!(round_trip(&mut open, b"x").await.unwrap(), b"x");
        drop(proxy);
        assert!(is_closed(&mut open).await, "an open connection is closed when the proxy is dropped");
        if let Ok(mut late) = TcpStream::connect(addr).await {
            assert!(is_closed(&mut late).await, "nothing serves the address after the drop");
        }
    }
}
