//! What every tandem server shares: logging, graceful shutdown, and the
//! standard gRPC health and reflection services.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Installs a `tracing` subscriber that writes to stderr at `level` (a
/// `tracing` filter such as `info` or `tandem_participant=debug`), unless
/// `RUST_LOG` says otherwise.
pub fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// Resolves when the process receives SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("received Ctrl-C; shutting down"),
        _ = terminate => tracing::info!("received SIGTERM; shutting down"),
    }
}

/// Binds `addr` and returns the listener with the address it got (the port
/// is chosen by the kernel when `addr` has port 0).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// The server reflection service (v1) of a node that serves `service` (a
/// full name such as `tandem.v1.Participant`): it lists that service, health
/// and reflection, and answers a file with its imports (see
/// [`crate::reflection`]).
pub fn reflection_service(
    service: &str,
) -> tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<crate::reflection::Reflection> {
    crate::reflection::Reflection::for_service(service).into_server()
}

/// A tonic server builder with the settings every tandem server uses.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(4096)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(30))
}

/// A lazily connecting channel to `url` with the settings every tandem client
/// uses. Each call still carries its own deadline.
pub fn channel(url: &str) -> Result<tonic::transport::Channel, crate::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| crate::Error::InvalidInput(format!("{url:?} is not a valid URL: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(endpoint.connect_lazy())
}

/// A multi-threaded tokio runtime with `worker_threads` workers (default:
/// one per core).
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads.max(1));
    }
    builder.enable_all().build()
}
