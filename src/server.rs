//! What every tandem server shares: logging, graceful shutdown, the
//! standard gRPC health and reflection services, and the one place where
//! servers and channels are made, with their TLS and the role check (see
//! [`crate::tls`] and [`crate::trust`]).

use crate::metrics::RpcMetricsLayer;
use crate::net::Network;
use crate::tls::Security;
use crate::trust::{AuthorizeLayer, Authorizer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::layer::util::{Identity, Stack};

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

/// Longest a TLS handshake may take before the server drops the connection.
pub const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// A tonic server builder with the settings every tandem server uses: TLS
/// with a client certificate required (unless `security` is
/// [`Security::Insecure`]) and `authorizer` in front of every service, so a
/// call that its caller may not make reaches no handler; outside it, the
/// RPC metrics ([`crate::metrics::RpcMetricsLayer`]), which count refused
/// calls too.
pub fn server_builder(
    security: &Security,
    authorizer: Authorizer,
) -> Result<tonic::transport::Server<Stack<AuthorizeLayer, Stack<RpcMetricsLayer, Identity>>>, crate::Error> {
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(4096)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(30));
    if let Security::Mutual(credentials) = security {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&credentials.cert_pem, &credentials.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&credentials.ca_pem))
            .timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS));
        builder = builder
            .tls_config(tls)
            .map_err(|e| crate::Error::InvalidInput(format!("the TLS certificate, key or CA is refused: {e:?}")))?;
    }
    Ok(builder.layer(RpcMetricsLayer).layer(AuthorizeLayer::new(authorizer)))
}

/// How often a channel pings its connection (HTTP/2 PING), and how long it
/// waits for the answer before it drops the connection and dials again on
/// the next call. A connection that went silent (its peer black-holed,
/// paused, or gone without a reset) fails every call on it until this
/// notices: short, so that a link that heals is used again within seconds
/// (the whole-system simulation's `relay-peer-down` scenario measured 5 s
/// of calls timing out after the link healed with the 10 s + 5 s these
/// were before). Idle connections are pinged too: one that died while idle
/// would otherwise fail the first calls after the link heals (the same
/// scenario found that). A PING is a few bytes a second per connection.
pub const KEEPALIVE_INTERVAL_MS: u64 = 1_000;
pub const KEEPALIVE_TIMEOUT_MS: u64 = 2_000;

/// A lazily connecting channel to `url` with the settings every tandem client
/// uses: with [`Security::Mutual`], TLS presenting this process's
/// certificate and trusting only the cluster's CA (the URL must be
/// `https://`); with [`Security::Insecure`], plaintext (`http://`). Each call
/// still carries its own deadline.
pub fn channel(url: &str, security: &Security) -> Result<tonic::transport::Channel, crate::Error> {
    channel_on(url, security, &Network::Tcp)
}

/// [`channel`] whose connections `network` dials (a simulation's network,
/// or the machine's TCP sockets).
pub fn channel_on(
    url: &str,
    security: &Security,
    network: &Network,
) -> Result<tonic::transport::Channel, crate::Error> {
    let scheme = security.scheme();
    if !url.starts_with(&format!("{scheme}://")) {
        return Err(crate::Error::InvalidInput(match security {
            Security::Mutual(_) => format!(
                "{url:?}: links are TLS, so URLs start with https:// (plaintext needs --insecure on every process)"
            ),
            Security::Insecure => format!("{url:?}: with --insecure links are plaintext, so URLs start with http://"),
        }));
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| crate::Error::InvalidInput(format!("{url:?} is not a valid URL: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(500))
        .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
        .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
        .keep_alive_while_idle(true);
    if let Security::Mutual(credentials) = security {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&credentials.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&credentials.cert_pem, &credentials.key_pem))
            .timeout(Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| crate::Error::InvalidInput(format!("{url:?}: the TLS configuration is refused: {e:?}")))?;
    }
    Ok(network.connect_lazy(endpoint))
}

/// What a node's `main` does around its `run`: starts the runtime, then the
/// log and (with `--otlp-endpoint`) the span export inside it (the
/// exporter's channel lives on the runtime), runs `run` to its end, sends
/// the spans still buffered, and turns the result into the exit code: 1
/// for an error `run` returns, 2 for a refused `--otlp-endpoint`. `binary`
/// prefixes the messages and names the service in the traces
/// (`tandem-<binary>`).
pub fn run_node<F>(
    binary: &str,
    worker_threads: Option<usize>,
    log_level: &str,
    node_id: &str,
    trace: &crate::trace::TraceFlags,
    run: F,
) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match runtime(worker_threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{binary}: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let tracing = {
        let _inside = runtime.enter();
        crate::trace::init(log_level, &format!("tandem-{binary}"), node_id, trace)
    };
    let tracing = match tracing {
        Ok(tracing) => tracing,
        Err(error) => {
            eprintln!("{binary}: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run);
    {
        let _inside = runtime.enter();
        tracing.shutdown();
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{binary}: {error}");
            std::process::ExitCode::FAILURE
        }
    }
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
