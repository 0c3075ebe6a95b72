//! Metrics: what a node counts, and the HTTP endpoint that serves them.
//!
//! Every node records into the `metrics` crate's global recorder; the
//! binaries install a Prometheus recorder ([`install`]) and serve its text
//! at `GET /metrics` on `--http-addr` ([`serve_http`]). Without a recorder
//! (the tests and simulations that run the nodes in process) every
//! `counter!`/`histogram!` is a no-op.
//!
//! The names, their labels and what they count are in one table:
//! `docs/metrics.md`. They follow Prometheus's conventions: a counter ends
//! in `_total`, a duration is in seconds (`_seconds`), a histogram has
//! explicit buckets ([`SECONDS_BUCKETS`], [`SIZE_BUCKETS`]).
//!
//! Bounds. Label values come from configuration (participant names), from
//! fixed lists (RPC methods of the protos, status codes, reasons), never
//! from a request as such: a call to a path no proto declares is counted
//! under `method="other"`, so a caller cannot grow the registry.
//! Histograms keep raw samples until they are summarised: [`install`]
//! spawns the upkeep that summarises them every [`UPKEEP_INTERVAL_MS`], so
//! a node that is never scraped does not grow either.
//!
//! Who may read them. The endpoint is served like every other link: with
//! TLS a caller must present a certificate of the cluster's CA (any role:
//! the metrics hold counts, durations and participant names, no account
//! nor amount); with `--insecure`, plaintext.

use crate::tls::Security;
use crate::Error;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::codegen::http;

/// Buckets of every `_seconds` histogram: 50 µs (an fsync on a fast disk)
/// to 10 s (a call's longest deadline).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of every `_size` histogram (operations in a write group,
/// requests in a batch): powers of two up to the largest batch.
pub const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// How often histograms' raw samples are summarised into their buckets.
pub const UPKEEP_INTERVAL_MS: u64 = 5_000;

/// Most HTTP connections served at once; more wait in the kernel's backlog.
pub const HTTP_CONNECTIONS_MAX: usize = 64;

/// Longest an HTTP connection may stay open (a scrape takes milliseconds).
pub const HTTP_CONNECTION_TIMEOUT_MS: u64 = 30_000;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global recorder (once;
/// later calls return the same handle) and starts its upkeep on the
/// current tokio runtime.
pub fn install() -> Result<PrometheusHandle, Error> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
        .map_err(|e| Error::Fatal(format!("the metrics buckets are refused: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| Error::Fatal(format!("a metrics recorder was installed already: {e}")))?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(UPKEEP_INTERVAL_MS));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The help line of every metric a node records (see `docs/metrics.md`).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("tandem_rpc_requests_total", "gRPC calls served, by method and status code");
    describe_histogram!("tandem_rpc_duration_seconds", Unit::Seconds, "time to answer a gRPC call, by method");
    describe_counter!("tandem_store_writes_total", "write groups the store's writer wrote (one WriteBatch each)");
    describe_counter!("tandem_store_fsyncs_total", "fsyncs of the store's write-ahead log");
    describe_counter!(
        "tandem_store_writes_in_place_total",
        "fsynced writes made by the submitting thread, the store being idle (also in tandem_store_writes_total)"
    );
    describe_counter!("tandem_store_bytes_written_total", "bytes of keys and values the store wrote");
    describe_histogram!("tandem_store_write_group_size", "operations in one write group (one WriteBatch)");
    describe_histogram!("tandem_store_write_seconds", Unit::Seconds, "time to write one group, its fsync included");
    describe_counter!("tandem_transactions_begun_total", "transactions the coordinator began");
    describe_counter!(
        "tandem_transactions_committed_total",
        "transactions committed, by how: one_phase, parallel, classic"
    );
    describe_counter!("tandem_transactions_aborted_total", "transactions aborted, by reason");
    describe_histogram!(
        "tandem_transaction_duration_seconds",
        Unit::Seconds,
        "from a transfer's arrival to its client's answer, by outcome and how it committed"
    );
    describe_histogram!(
        "tandem_decision_write_seconds",
        Unit::Seconds,
        "time to make a coordinator record durable, by record: commit, staged, abort, intent"
    );
    describe_histogram!(
        "tandem_outbound_call_seconds",
        Unit::Seconds,
        "one batch call to a participant (prepare: the votes; commit: the delivery), by participant and queue"
    );
    describe_histogram!("tandem_outbound_batch_size", "requests in one batch call, by participant and queue");
    describe_gauge!("tandem_outbound_queue_depth", "requests waiting for a batch call, by participant and queue");
    describe_gauge!("tandem_transactions_in_flight", "transactions begun and not yet ended at the coordinator");
    describe_counter!("tandem_sagas_finished_total", "orchestrated sagas that ended, by state");
    describe_gauge!(
        "tandem_prepared_transactions",
        "prepared transactions that wait for their decision (in doubt past --in-doubt-after-ms)"
    );
    describe_gauge!(
        "tandem_prepared_oldest_seconds",
        Unit::Seconds,
        "how long the oldest prepared transaction has waited for its decision (0: none)"
    );
    describe_gauge!("tandem_outbox_depth", "choreography events written and not yet delivered");
    describe_gauge!("tandem_dead_letters", "orchestrated sagas in the dead-letter state");
    describe_gauge!("tandem_parked_transfers", "choreographed transfers parked for an operator");
    describe_gauge!("tandem_suspense_balance", "money held in the participant's suspense account");
    describe_gauge!("tandem_store_failed", "1 once the node's store failed a write or an fsync");
    describe_gauge!(
        "tandem_process_cpu_seconds",
        Unit::Seconds,
        "CPU time the process has used since it started (user and system), read at each scrape"
    );
}

/// The path's label: an RPC the protos declare, or `other`.
fn method_label(path: &str) -> &'static str {
    crate::trust::POLICY.iter().find(|(known, _)| *known == path).map(|(known, _)| *known).unwrap_or("other")
}

/// The `tower` layer in front of every gRPC service: counts each call by
/// method and status code, and times it (to the response's headers, which
/// for a unary call is when the handler has answered).
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let response = inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // A unary call that failed answers its status in the headers
            // (trailers-only); one that succeeded, in the trailers: 0.
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|code| code.to_str().ok())
                    .and_then(|code| code.parse::<i32>().ok())
                    .map(|code| tonic::Code::from_i32(code))
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            metrics::counter!("tandem_rpc_requests_total", "method" => method, "code" => code_label(code)).increment(1);
            metrics::histogram!("tandem_rpc_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}

/// A status code's name, as gRPC spells it.
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// What the HTTP endpoint needs: the recorder's handle, and a function that
/// sets the gauges read from the node's state just before each scrape.
#[derive(Clone)]
pub struct HttpState {
    pub handle: PrometheusHandle,
    pub refresh: Arc<dyn Fn() + Send + Sync>,
}

/// CPU time this process has used since it started, user and system
/// together (getrusage), in seconds: what a node costs the machine, which
/// the bench divides by the transfers committed.
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: `usage` is plain old data that getrusage fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

/// The routes every node serves on `--http-addr`: `GET /metrics`.
pub fn router(state: HttpState) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                (state.refresh)();
                if let Some(seconds) = process_cpu_seconds() {
                    metrics::gauge!("tandem_process_cpu_seconds").set(seconds);
                }
                ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.handle.render())
            }
        }),
    )
}

/// Serves `router` on `listener` until the task is dropped: HTTP/1.1 and
/// HTTP/2, over mutual TLS with `security`'s certificate and CA (any
/// certificate of the cluster's CA may read), or plaintext when insecure.
pub async fn serve_http(listener: TcpListener, security: Security, router: axum::Router) -> Result<(), Error> {
    let acceptor = match &security {
        Security::Mutual(credentials) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(credentials)?))),
        Security::Insecure => None,
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let slot = connections.clone().acquire_owned().await.map_err(|_| Error::Fatal("closed".into()))?;
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let serve = async {
                let service = hyper_util::service::TowerToHyperService::new(router);
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let result = match acceptor {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(tls) => builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service).await,
                        Err(error) => {
                            tracing::debug!(%peer, %error, "an HTTP client's TLS handshake failed");
                            return;
                        }
                    },
                    None => builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await,
                };
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "an HTTP connection ended with an error");
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(HTTP_CONNECTION_TIMEOUT_MS), serve).await;
            drop(slot);
        });
    }
}

/// The CA, the certificate chain and the key of `credentials`, as rustls
/// takes them; `side` names the use in errors.
fn rustls_parts(
    credentials: &crate::tls::Credentials,
    side: &str,
) -> Result<
    (rustls::RootCertStore, Vec<rustls_pki_types::CertificateDer<'static>>, rustls_pki_types::PrivateKeyDer<'static>),
    Error,
> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: String| Error::InvalidInput(format!("{side}: {what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&credentials.ca_pem) {
        roots.add(cert.map_err(|e| bad("the CA", e.to_string()))?).map_err(|e| bad("the CA", e.to_string()))?;
    }
    let chain = CertificateDer::pem_slice_iter(&credentials.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("the certificate", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&credentials.key_pem).map_err(|e| bad("the key", e.to_string()))?;
    Ok((roots, chain, key))
}

/// rustls's server configuration for the HTTP endpoint: this node's
/// certificate, and a client certificate of the cluster's CA required.
fn server_tls(credentials: &crate::tls::Credentials) -> Result<rustls::ServerConfig, Error> {
    let side = "the HTTP endpoint's TLS";
    let bad = |e: String| Error::InvalidInput(format!("{side}: {e}"));
    let (roots, chain, key) = rustls_parts(credentials, side)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Largest `/metrics` answer [`scrape`] reads.
pub const SCRAPE_BYTES_MAX: usize = 16 << 20;

/// Reads `GET /metrics` from a node's HTTP endpoint at `addr` (HOST:PORT),
/// presenting `security`'s certificate (HTTP/1.1, one connection per call:
/// for the bench and the tests, not for a hot path).
pub async fn scrape(addr: &str, security: &Security, timeout: Duration) -> Result<String, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unavailable = |e: String| Error::Unavailable(format!("scraping {addr}/metrics: {e}"));
    let read = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| unavailable(e.to_string()))?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let mut answer = Vec::new();
        match security {
            Security::Mutual(credentials) => {
                let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(credentials)?));
                let host = addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr).trim_matches(['[', ']']);
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| Error::InvalidInput(format!("{addr}: {e}")))?;
                let mut tls = connector.connect(name, stream).await.map_err(|e| unavailable(e.to_string()))?;
                tls.write_all(request.as_bytes()).await.map_err(|e| unavailable(e.to_string()))?;
                (&mut tls).take(SCRAPE_BYTES_MAX as u64).read_to_end(&mut answer).await
            }
            Security::Insecure => {
                let mut stream = stream;
                stream.write_all(request.as_bytes()).await.map_err(|e| unavailable(e.to_string()))?;
                (&mut stream).take(SCRAPE_BYTES_MAX as u64).read_to_end(&mut answer).await
            }
        }
        .map_err(|e| unavailable(e.to_string()))?;
        let text = String::from_utf8(answer).map_err(|_| unavailable("the answer is not UTF-8".into()))?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| unavailable("no HTTP header".into()))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(unavailable(head.lines().next().unwrap_or_default().to_string()));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| unavailable(format!("no answer within {timeout:?}")))?
}

/// rustls's client configuration for [`scrape`]: this process's
/// certificate, and the node's checked against the cluster's CA.
fn client_tls(credentials: &crate::tls::Credentials) -> Result<rustls::ClientConfig, Error> {
    let side = "scraping metrics over TLS";
    let bad = |e: String| Error::InvalidInput(format!("{side}: {e}"));
    let (roots, chain, key) = rustls_parts(credentials, side)?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(e.to_string()))
}

/// One sample of a scrape: the metric's name, its labels as written
/// (`method="/tandem.v1.Participant/Prepare",code="OK"`, empty when none),
/// and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (comments skipped; a line
/// that does not parse is skipped too: the bench reads what it knows).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(split) => split,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        samples.push(Sample { name: name.to_string(), labels: labels.to_string(), value });
    }
    samples
}

/// The sum of every sample named `name` whose labels contain each of
/// `with` (as `key="value"`).
pub fn sum(samples: &[Sample], name: &str, with: &[&str]) -> f64 {
    samples.iter().filter(|s| s.name == name && with.iter().all(|w| s.labels.contains(w))).map(|s| s.value).sum()
}

/// The HTTP flag of every node.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HttpFlags {
    /// Address to serve HTTP on (port 0: the kernel picks one): GET
    /// /metrics, Prometheus's text format (the names are in
    /// docs/metrics.md). Over mutual TLS like every link (any certificate
    /// of the cluster's CA may read), plaintext with --insecure. Not given:
    /// no HTTP endpoint, and nothing is recorded.
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,
}

/// What a node's `main` does with [`HttpFlags`]: nothing without
/// `--http-addr`; with it, [`start_http`], and the address bound printed
/// on stdout as `http on ADDR`, before the node prints `listening on`
/// (whoever waits for that line then knows both).
pub async fn serve_if_asked(
    flags: &HttpFlags,
    security: &Security,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), Error> {
    let Some(addr) = flags.http_addr else { return Ok(()) };
    let bound = start_http(addr, security.clone(), refresh).await?;
    tracing::info!(%bound, "serving metrics on HTTP");
    println!("http on {bound}");
    Ok(())
}

/// Installs the recorder, binds `addr` and serves [`router`] there in a
/// task of its own; returns the address bound. `refresh` sets the gauges
/// read from the node's state, before each scrape.
pub async fn start_http(
    addr: std::net::SocketAddr,
    security: Security,
    refresh: Arc<dyn Fn() + Send + Sync>,
) -> Result<std::net::SocketAddr, Error> {
    let handle = install()?;
    let (listener, bound) = crate::server::bind(addr)
        .await
        .map_err(|e| Error::InvalidInput(format!("cannot serve HTTP on {addr}: {e}")))?;
    let routes = router(HttpState { handle, refresh });
    tokio::spawn(async move {
        if let Err(error) = serve_http(listener, security, routes).await {
            tracing::error!(%error, "the HTTP endpoint stopped");
        }
    });
    Ok(bound)
}
