//! The simulated network as tandem's nodes see it: turmoil's sockets behind
//! the seam of [`tandem::net`]. Outbound, a [`Dialer`] that connects with
//! turmoil; inbound, a stream of accepted turmoil connections for a node's
//! `run_on`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tandem::net::{BoxedIo, Dialer, Dialing, Network};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::ReceiverStream;

/// The port every simulated node serves on (each host has its own address).
pub const PORT: u16 = 7000;

/// Connections accepted but not yet taken by the server.
const ACCEPT_QUEUE_MAX: usize = 64;

/// Dials with turmoil's TCP.
struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    fn dial(&self, host: &str, port: u16) -> Dialing {
        let host = host.to_string();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::pin(stream) as BoxedIo)
        })
    }
}

/// The network a simulated node's channels use.
pub fn network() -> Network {
    Network::Dialed(std::sync::Arc::new(TurmoilDialer))
}

/// `http://NAME:PORT`: a simulated node's URL.
pub fn url(host: &str) -> String {
    format!("http://{host}:{PORT}")
}

/// One accepted connection, as tonic's server takes it.
pub struct Accepted(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Accepted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Listens on [`PORT`] of the current host and yields what it accepts.
pub async fn incoming() -> io::Result<ReceiverStream<io::Result<Accepted>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let (accepted, stream) = tokio::sync::mpsc::channel(ACCEPT_QUEUE_MAX);
    tokio::task::spawn_local(async move {
        loop {
            let connection = listener.accept().await.map(|(stream, _)| Accepted(stream));
            if accepted.send(connection).await.is_err() {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(stream))
}
