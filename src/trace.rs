//! Traces that join the nodes: one transfer is one trace.
//!
//! Every node writes its log with `tracing`; with `--otlp-endpoint URL` it
//! also exports spans over OTLP/gRPC (OpenTelemetry's protocol, to a
//! collector such as the OpenTelemetry Collector, Jaeger or Tempo), through
//! `tracing-opentelemetry`. A transfer's spans on the coordinator and on
//! each participant share one trace id, carried as W3C trace context
//! (`traceparent`, <https://www.w3.org/TR/trace-context/>):
//!
//! - from the client to the coordinator in the call's gRPC metadata (the
//!   `traceparent` entry), as every W3C-aware client sends it; a call
//!   without one starts a new trace at the coordinator;
//! - from the coordinator to a participant in the request itself, one
//!   `trace_parent` field per transaction: the coordinator sends several
//!   transactions in one call (PrepareBatch, CommitBatch, CommitOnePhaseBatch),
//!   so a call's metadata could name only one of them.
//!
//! The spans (names as exported): on the coordinator `transfer` (the
//! client's call), `log commit` / `log staged` / `log abort` / `log intent`
//! (a decision-log write, its fsync included), and one per participant and
//! message: `prepare`, `commit one phase`, `commit`, `abort` (the call, as
//! the coordinator sees it); on a participant, the same names for its
//! handling of each item, and `durable write` under each (the wait for its
//! record's fsync). An orchestrated saga's `transfer` has one span per step
//! on the coordinator and on its participant ([`saga_step_name`]: `saga
//! debit`, `saga credit`, `saga undo debit`, ...), carried the same way (a
//! `trace_parent` per step). A choreographed transfer has no coordinator:
//! the source participant's `choreography debit` hangs under the
//! StartTransfer call's `traceparent`, and each event carries the context
//! of the span that made it (`ChoreographyEvent.trace_parent`, kept with
//! the event in the sender's outbox): the target's `choreography credit`
//! under the debit, the source's `choreography complete` (or `choreography
//! refund`) under the credit.
//!
//! Cost when off: the spans are at DEBUG level under the target
//! [`TARGET`], which the log's filter does not enable at its default level
//! (`info`), so a span is a disabled callsite (a load and a branch); the
//! code that carries contexts checks [`on`] first and does nothing. With
//! `--log-level debug` the spans appear in the log lines too.
//!
//! Sampling: `--trace-sample-ratio R` exports the share R of the traces,
//! decided at the head, before any span exists: a trace the client began
//! keeps the client's choice (its `traceparent`'s sampled flag); for a
//! call without one, the node the call reaches (the coordinator for a
//! transfer, the source participant for a choreographed one) draws it with
//! probability R ([`call_span`]). A trace not chosen has no span at all,
//! anywhere: the call's span is disabled, so no context is carried, and a
//! node opens a span for a message only under a sampled context it
//! carries ([`remote_child`]). So a trace is exported whole or not at all,
//! and one not exported costs what tracing off costs, not the span
//! bookkeeping (measured: at 64 clients, sampling 1% through
//! OpenTelemetry's own sampler, which decides once a span exists, cost
//! about a third of the throughput; see the README's "Traces").
//!
//! A trace context is advisory: a `traceparent` that is malformed or longer
//! than [`TRACE_PARENT_LEN_MAX`] is ignored (the W3C rule), never refused,
//! and tracing never changes what a call does.

use crate::Error;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The `tracing` target of every span that is exported.
pub const TARGET: &str = "tandem::trace";

/// Longest `traceparent` value read (a valid one is 55 characters); a
/// longer one is ignored.
pub const TRACE_PARENT_LEN_MAX: usize = 256;

/// The metadata entry that carries the W3C trace context on a call.
pub const TRACEPARENT: &str = "traceparent";

/// A span's OpenTelemetry context, kept to open its children later.
pub type Context = opentelemetry::Context;

static ON: AtomicBool = AtomicBool::new(false);

/// `--trace-sample-ratio`, as `f64` bits (1.0 until [`init`] sets it).
static SAMPLE_RATIO_BITS: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// Whether this process exports spans (it was started with
/// `--otlp-endpoint`).
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// `--otlp-endpoint`, shared by the nodes.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceFlags {
    /// Export spans over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317 (plaintext; the collector is reached as a
    /// service of the operator's, outside the cluster's CA). One transfer is
    /// one trace across the coordinator and the participants (W3C trace
    /// context); spans are sent in batches every 5 s
    /// (OTEL_BSP_SCHEDULE_DELAY, in ms, changes that). Not given: nothing is
    /// exported and spans cost nothing measurable.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// The share of transfers whose traces are exported, 0 to 1 (1: every
    /// one). A trace the client began keeps the client's choice (the
    /// sampled flag of its traceparent); for the others the node the
    /// client called draws at this ratio, and the other nodes follow. A
    /// trace not chosen has no span at all, so it costs what no export
    /// costs.
    /// Without --otlp-endpoint it has no effect (and is not refused, so
    /// that the configuration --print-config shows reads back).
    #[arg(long, value_name = "RATIO", default_value_t = 1.0, value_parser = parse_sample_ratio)]
    pub trace_sample_ratio: f64,
}

impl Default for TraceFlags {
    fn default() -> TraceFlags {
        TraceFlags { otlp_endpoint: None, trace_sample_ratio: 1.0 }
    }
}

/// A ratio from 0 to 1.
fn parse_sample_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1 (0.01 exports one trace in a hundred)")),
    }
}

/// What [`init`] set up: flush it before the process exits, or the last
/// spans are lost.
#[must_use]
pub struct Tracing {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Tracing {
    /// Sends the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("the OTLP exporter did not flush: {error}");
            }
        }
    }
}

/// Installs the process's `tracing` subscriber: the log on stderr at
/// `level` (a filter such as `info` or `tandem_participant=debug`; RUST_LOG
/// overrides it) and, with `flags.otlp_endpoint`, the OTLP export of this
/// module's spans, naming the process `service` (`tandem-coordinator`)
/// and `node` (its id). The export needs a tokio runtime: call this inside
/// one (`Runtime::enter`).
pub fn init(level: &str, service: &str, node: &str, flags: &TraceFlags) -> Result<Tracing, Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_filter(filter);
    let Some(endpoint) = &flags.otlp_endpoint else {
        let _ = tracing_subscriber::registry().with(log).try_init();
        return Ok(Tracing { provider: None });
    };
    if !endpoint.starts_with("http://") {
        return Err(Error::InvalidInput(format!(
            "--otlp-endpoint {endpoint:?}: give http://HOST:PORT (the collector's OTLP/gRPC port, plaintext)"
        )));
    }
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| Error::InvalidInput(format!("--otlp-endpoint {endpoint:?}: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node.to_string()))
        .build();
    // The sampling decision is taken before a span exists ([`call_span`]),
    // so every span that does exist is exported.
    use opentelemetry_sdk::trace::Sampler;
    let sampler = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
    SAMPLE_RATIO_BITS.store(flags.trace_sample_ratio.to_bits(), Ordering::Relaxed);
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("tandem"))
        .with_filter(tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::DEBUG));
    let _ = tracing_subscriber::registry().with(log).with(spans).try_init();
    ON.store(true, Ordering::Relaxed);
    tracing::info!(%endpoint, sample_ratio = flags.trace_sample_ratio, "exporting spans over OTLP");
    Ok(Tracing { provider: Some(provider) })
}

/// A span for one transaction's `name` (a step this module's essay
/// lists), exported under that name.
fn txn_span(name: &str, txn: &str) -> Span {
    tracing::debug_span!(target: TARGET, "tandem", otel.name = name, txn_id = txn)
}

/// The span of a client's call `name` (`transfer`), under the remote
/// context its metadata carried, or a new trace without one; its `txn_id`
/// is recorded once known. Disabled when this process does not export, or
/// the trace is not sampled: the caller's context says it is not, or,
/// without one, the draw at `--trace-sample-ratio` said no.
pub fn call_span(name: &str, traceparent: &str) -> Span {
    if !on() {
        return Span::none();
    }
    let parent = extract(traceparent);
    let sampled = match &parent {
        Some(parent) => is_sampled(parent),
        None => draw(f64::from_bits(SAMPLE_RATIO_BITS.load(Ordering::Relaxed))),
    };
    if !sampled {
        return Span::none();
    }
    let span = tracing::debug_span!(target: TARGET, "tandem", otel.name = name, txn_id = tracing::field::Empty);
    if let Some(parent) = parent {
        let _ = span.set_parent(parent);
    }
    span
}

/// The span of one item of a batch call (a `transfer` of a `transfer
/// batch`): the child of the current span (the call's), sampled with it,
/// so that each item's transaction, with its `txn_id` and every later span
/// of it, hangs apart under the call. Disabled when the call's span is.
pub fn item_span(name: &str) -> Span {
    let call = Span::current();
    if call.is_disabled() {
        return Span::none();
    }
    tracing::debug_span!(target: TARGET, parent: &call, "tandem", otel.name = name, txn_id = tracing::field::Empty)
}

/// Whether a context's span is sampled (its `traceparent`'s flag).
fn is_sampled(context: &opentelemetry::Context) -> bool {
    use opentelemetry::trace::TraceContextExt;
    context.span().span_context().is_sampled()
}

/// True with probability `ratio` (a thread's own xorshift generator,
/// seeded from the clock and the thread: sampling needs no stronger
/// randomness, and no lock).
fn draw(ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let here = &nanos as *const u64 as u64;
            (nanos ^ here.rotate_left(32)) | 1
        });
    }
    let x = STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    });
    // The top 53 bits as a fraction in [0, 1).
    ((x >> 11) as f64 / (1u64 << 53) as f64) < ratio
}

/// A span `name` for transaction `txn` whose parent is the remote context
/// `traceparent` (as a request carried it); a disabled span when this
/// process does not export, or the context is absent, malformed or not
/// sampled (the head of the trace chose not to export it).
pub fn remote_child(name: &str, txn: &str, traceparent: &str) -> Span {
    if !on() {
        return Span::none();
    }
    match extract(traceparent) {
        Some(parent) if is_sampled(&parent) => {
            let span = txn_span(name, txn);
            let _ = span.set_parent(parent);
            span
        }
        _ => Span::none(),
    }
}

/// A span `name` for transaction `txn` under `parent` (a context kept from
/// an earlier span); disabled when this process does not export, or the
/// context names no sampled span.
pub fn child(name: &str, txn: &str, parent: &opentelemetry::Context) -> Span {
    if !on() || !is_sampled(parent) {
        return Span::none();
    }
    let span = txn_span(name, txn);
    let _ = span.set_parent(parent.clone());
    span
}

/// A span `name` inside `parent` (a step of its work); disabled when
/// `parent` is.
pub fn child_of(name: &str, parent: &Span) -> Span {
    if !on() || parent.is_none() {
        return Span::none();
    }
    tracing::debug_span!(target: TARGET, parent: parent, "tandem", otel.name = name)
}

/// The context of `span`, to keep for its later children (`None` when
/// this process does not export, or `span` is disabled).
pub fn context(span: &Span) -> Option<opentelemetry::Context> {
    (on() && !span.is_none()).then(|| span.context())
}

/// The W3C `traceparent` value that names `span` as the parent, for a
/// request's `trace_parent` field; empty when this process does not export.
pub fn traceparent(span: &Span) -> String {
    if !on() || span.is_none() {
        return String::new();
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(1);
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// The span name of an orchestrated saga's step (the same on the
/// coordinator and on the participant): `saga debit`, `saga credit`,
/// `saga release`, and `saga undo debit` / `saga undo credit` for a
/// compensation, `saga park debit` for one that parks the money in
/// suspense. Values that are no step give `saga step`.
pub fn saga_step_name(kind: i32, phase: i32) -> &'static str {
    use crate::pb::{StepKind, StepPhase};
    match (StepKind::try_from(kind), StepPhase::try_from(phase)) {
        (Ok(StepKind::Debit), Ok(StepPhase::Action)) => "saga debit",
        (Ok(StepKind::Credit), Ok(StepPhase::Action)) => "saga credit",
        (Ok(StepKind::Release), Ok(StepPhase::Action)) => "saga release",
        (Ok(StepKind::Debit), Ok(StepPhase::Compensation)) => "saga undo debit",
        (Ok(StepKind::Credit), Ok(StepPhase::Compensation)) => "saga undo credit",
        (Ok(StepKind::Debit), Ok(StepPhase::CompensateToSuspense)) => "saga park debit",
        _ => "saga step",
    }
}

/// The `traceparent` entry of a call's metadata ("" if absent or not
/// text).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> &str {
    metadata.get(TRACEPARENT).and_then(|value| value.to_str().ok()).unwrap_or("")
}

/// The remote context a `traceparent` value names, if it is a valid one.
fn extract(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt;
    if traceparent.is_empty() || traceparent.len() > TRACE_PARENT_LEN_MAX {
        return None;
    }
    let carrier: HashMap<String, String> = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_read_and_a_malformed_or_oversized_one_is_ignored() {
        use opentelemetry::trace::TraceContextExt;
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = extract(valid).expect("a valid traceparent");
        assert_eq!(context.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(extract("").is_none());
        assert!(extract("00-zz-00f067aa0ba902b7-01").is_none());
        // All-zero trace id: invalid by the W3C rules.
        assert!(extract("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(extract(&format!("{valid}{}", "x".repeat(TRACE_PARENT_LEN_MAX))).is_none());
    }

    #[test]
    fn the_draw_keeps_about_its_ratio() {
        assert!((0..1_000).all(|_| draw(1.0)));
        assert!(!(0..1_000).any(|_| draw(0.0)));
        let kept = (0..100_000).filter(|_| draw(0.01)).count();
        // 1,000 expected; the odds of leaving this band are below 1e-9.
        assert!((800..1_200).contains(&kept), "{kept} of 100,000 at 0.01");
    }

    #[test]
    fn a_context_carries_its_sampled_flag() {
        let sampled = extract("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let not = extract("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(is_sampled(&sampled));
        assert!(!is_sampled(&not));
    }

    #[test]
    fn without_an_exporter_no_context_is_carried() {
        // This test process never calls `init` with an endpoint.
        assert!(!on());
        let span = remote_child("prepare", "t1", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(span.is_none());
        assert_eq!(traceparent(&span), "");
        assert!(context(&span).is_none());
    }
}
