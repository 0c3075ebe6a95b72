//! How a node's links are made: real TCP sockets (the binaries), or a
//! network that someone else supplies (the whole-system simulation, whose
//! hosts talk over turmoil's simulated sockets).
//!
//! The seam is small on purpose. Outbound, a [`Network`] decides how a
//! channel's connection is dialled; everything above it (tonic's HTTP/2,
//! TLS when configured, deadlines, the role check) is the same code in
//! both cases. Inbound, a node's `run_on` takes any stream of accepted
//! connections; its `run` is that over a TCP listener.

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
            Network::Tcp => endpoint.connect_lazy(),
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
                        Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(io))
                    }
                }))
            }
        }
    }
}
