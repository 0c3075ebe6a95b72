//! One transfer is one trace across the processes: the real binaries
//! export their spans over OTLP to a collector this test runs, and the
//! spans of one transfer from the coordinator and both participants carry
//! the trace id the client's call named in its `traceparent` (a 2PC
//! transfer, an orchestrated saga, a choreographed transfer whose events
//! carry the trace from participant to participant); with
//! `--trace-sample-ratio`, only the traces chosen are exported, the client's
//! choice first (build the binaries first: `cargo build --release
//! --workspace`).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec};
use tandem::pb;
use tonic::{Request, Response, Status};

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    node: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/gRPC trace collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut kept = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let attribute = |key: &str| {
                resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == key)
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default()
            };
            let (service, node) = (attribute("service.name"), attribute("service.instance.id"));
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    kept.push(Received {
                        service: service.clone(),
                        node: node.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts the collector on a free loopback port; its OTLP endpoint URL.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The spans of `trace_id` received so far.
fn of_trace(collector: &Collector, trace_id: &str) -> Vec<Received> {
    collector.spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect()
}

fn names_on(spans: &[Received], node: &str) -> BTreeSet<String> {
    spans.iter().filter(|s| s.node == node).map(|s| s.name.clone()).collect()
}

/// A cluster of a coordinator and two participants exporting to a
/// collector of this test's, each node started with `--otlp-endpoint` and
/// `extra` flags.
async fn traced_cluster(extra: &[&str]) -> (Cluster, Collector, tempfile::TempDir) {
    // Export every 100 ms instead of the default 5 s (the SDK's standard
    // variable, read by every node this test starts).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = 2;
    spec.accounts_per_participant = 100;
    let mut args = vec!["--otlp-endpoint".to_string(), endpoint];
    args.extend(extra.iter().map(|a| a.to_string()));
    spec.coordinator_args = args.clone();
    spec.participant_args = args;
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    (cluster, collector, dir)
}

/// A trace id of this run's, unique per `n`.
fn new_trace_id(n: u128) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:032x}", (nanos << 8 | n) | 1 << 120)
}

/// A 2PC transfer whose call carries `traceparent` (none when empty); it
/// must commit.
async fn transfer(cluster: &Cluster, from: u64, to: u64, traceparent: &str) {
    let request = pb::TransferRequest { from_account: from, to_account: to, amount: 10, ..Default::default() };
    call(cluster, request, traceparent).await;
}

async fn call(cluster: &Cluster, request: pb::TransferRequest, traceparent: &str) {
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let mut request = Request::new(request);
    if !traceparent.is_empty() {
        request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    }
    let answer = coordinator.transfer(request).await.unwrap().into_inner();
    assert_eq!(answer.outcome, pb::Outcome::Committed as i32, "{answer:?}");
}

/// Waits until the spans of `trace_id` include every step of a two-
/// participant transfer on all three nodes (commits are delivered after the
/// client's answer, and spans are exported in batches), and returns them.
async fn whole_trace(collector: &Collector, trace_id: &str) -> Vec<Received> {
    let names = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };
    let want = [
        ("c1", names(&["transfer", "log staged", "prepare", "commit"])),
        ("p1", names(&["prepare", "durable write", "commit"])),
        ("p2", names(&["prepare", "durable write", "commit"])),
    ];
    wait_for_spans(collector, trace_id, &want).await
}

/// Waits until the spans of `trace_id` on each node include the names
/// wanted there, and returns them.
async fn wait_for_spans(collector: &Collector, trace_id: &str, want: &[(&str, BTreeSet<String>)]) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let spans = of_trace(collector, trace_id);
        let complete = want.iter().all(|(node, names)| names_on(&spans, node).is_superset(names));
        if complete {
            return spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the transfer's spans did not all arrive within 30 s; received of its trace: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_sample_ratio_of_zero_only_the_traces_a_client_sampled_are_exported() {
    let (cluster, collector, _dir) = traced_cluster(&["--trace-sample-ratio", "0"]).await;
    // Not sampled: a call without a context (the coordinator chooses, at
    // ratio 0), and one whose client said not sampled (flags 00).
    transfer(&cluster, 3, 170, "").await;
    transfer(&cluster, 4, 180, &format!("00-{}-00f067aa0ba902b7-00", new_trace_id(1))).await;
    // A choreographed transfer without a context: the participant it was
    // started on chooses, at ratio 0, and its peer follows.
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let started = p1
        .start_transfer(pb::StartTransferRequest {
            saga_id: "not-sampled".into(),
            from_account: 6,
            to_account: 185,
            amount: 10,
            target_participant: "p2".into(),
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, pb::TransferState::Completed as i32, "{started:?}");
    // Sampled by its client (flags 01): exported whole, by every node.
    let sampled = new_trace_id(2);
    transfer(&cluster, 5, 190, &format!("00-{sampled}-00f067aa0ba902b7-01")).await;
    whole_trace(&collector, &sampled).await;
    // The others ended earlier, so their spans would have been in the same
    // or earlier batches; give a few more export intervals all the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = collector.spans.lock().unwrap().clone();
    let others: Vec<&Received> = all.iter().filter(|s| s.trace_id != sampled).collect();
    assert!(others.is_empty(), "only the sampled trace is exported: {others:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfers_spans_on_the_coordinator_and_both_participants_share_the_clients_trace_id() {
    let (cluster, collector, _dir) = traced_cluster(&[]).await;
    // The client's own span, as a W3C-aware client names it.
    let trace_id = new_trace_id(0);
    let client_span_id = "00f067aa0ba902b7";
    transfer(&cluster, 1, 150, &format!("00-{trace_id}-{client_span_id}-01")).await;
    // A transfer without a trace context: a trace of its own, not this one.
    transfer(&cluster, 2, 160, "").await;
    let spans = whole_trace(&collector, &trace_id).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !collector.spans.lock().unwrap().iter().any(|s| s.trace_id != trace_id && s.name == "transfer") {
        assert!(tokio::time::Instant::now() < deadline, "the other transfer's span never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Three processes, one trace.
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(["tandem-coordinator", "tandem-participant"]), "{spans:#?}");
    // The coordinator's span of the call is the child of the client's.
    let transfer = spans.iter().find(|s| s.node == "c1" && s.name == "transfer").unwrap();
    assert_eq!(transfer.parent_span_id, client_span_id);
    // Each participant's prepare is the child of the coordinator's prepare
    // to it, which is the child of the transfer.
    let coordinator_prepares: Vec<&Received> = spans.iter().filter(|s| s.node == "c1" && s.name == "prepare").collect();
    assert_eq!(coordinator_prepares.len(), 2, "one prepare per participant: {spans:#?}");
    for prepare in &coordinator_prepares {
        assert_eq!(prepare.parent_span_id, transfer.span_id);
    }
    for node in ["p1", "p2"] {
        let prepare = spans.iter().find(|s| s.node == node && s.name == "prepare").unwrap();
        assert!(
            coordinator_prepares.iter().any(|p| p.span_id == prepare.parent_span_id),
            "{node}'s prepare hangs under a coordinator prepare: {spans:#?}"
        );
        let write = spans.iter().find(|s| s.node == node && s.name == "durable write").unwrap();
        assert!(
            spans.iter().any(|s| s.node == node && s.span_id == write.parent_span_id),
            "{node}'s durable write hangs under one of its own spans: {spans:#?}"
        );
    }
    // A batch of two transfers: the batch call's span under the client's,
    // each transfer a span of its own under it, with its own prepares.
    let batch_trace = new_trace_id(7);
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let item = |from: u64, to: u64| pb::TransferRequest {
        from_account: from,
        to_account: to,
        amount: 10,
        ..Default::default()
    };
    let mut batch = Request::new(pb::TransferBatchRequest { transfers: vec![item(9, 190), item(191, 10)] });
    batch.metadata_mut().insert("traceparent", format!("00-{batch_trace}-{client_span_id}-01").parse().unwrap());
    let answers = coordinator.transfer_batch(batch).await.unwrap().into_inner().results;
    assert!(
        answers.iter().all(|a| a.result.as_ref().is_some_and(|r| r.outcome == pb::Outcome::Committed as i32)),
        "{answers:?}"
    );
    let want = [
        ("c1", BTreeSet::from(["transfer batch".to_string(), "transfer".to_string(), "prepare".to_string()])),
        ("p1", BTreeSet::from(["prepare".to_string()])),
        ("p2", BTreeSet::from(["prepare".to_string()])),
    ];
    let mut batch_spans = wait_for_spans(&collector, &batch_trace, &want).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while batch_spans.iter().filter(|s| s.node == "c1" && s.name == "prepare").count() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "four prepares never arrived: {batch_spans:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        batch_spans = of_trace(&collector, &batch_trace);
    }
    let batch_call = batch_spans.iter().find(|s| s.node == "c1" && s.name == "transfer batch").unwrap();
    assert_eq!(batch_call.parent_span_id, client_span_id);
    let items: Vec<&Received> = batch_spans.iter().filter(|s| s.node == "c1" && s.name == "transfer").collect();
    assert_eq!(items.len(), 2, "a span per transfer of the batch: {batch_spans:#?}");
    for item in &items {
        assert_eq!(item.parent_span_id, batch_call.span_id, "{batch_spans:#?}");
        let prepares =
            batch_spans.iter().filter(|s| s.node == "c1" && s.name == "prepare" && s.parent_span_id == item.span_id);
        assert_eq!(prepares.count(), 2, "each transfer's two prepares hang under its own span: {batch_spans:#?}");
    }

    // An orchestrated saga: each step a span on the coordinator, and the
    // participant's span of it beneath, with its durable write.
    let saga_trace = new_trace_id(3);
    let saga = pb::TransferRequest {
        from_account: 7,
        to_account: 170,
        amount: 10,
        protocol: pb::Protocol::SagaOrchestrated as i32,
        ..Default::default()
    };
    call(&cluster, saga, &format!("00-{saga_trace}-{client_span_id}-01")).await;
    let names = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };
    let want = [
        ("c1", names(&["transfer", "saga debit", "saga credit"])),
        ("p1", names(&["saga debit", "durable write"])),
        ("p2", names(&["saga credit", "durable write"])),
    ];
    let saga_spans = wait_for_spans(&collector, &saga_trace, &want).await;
    let saga_call = saga_spans.iter().find(|s| s.node == "c1" && s.name == "transfer").unwrap();
    assert_eq!(saga_call.parent_span_id, client_span_id);
    for (node, step) in [("p1", "saga debit"), ("p2", "saga credit")] {
        let sent = saga_spans.iter().find(|s| s.node == "c1" && s.name == step).unwrap();
        assert_eq!(sent.parent_span_id, saga_call.span_id, "{step} hangs under the call: {saga_spans:#?}");
        let applied = saga_spans.iter().find(|s| s.node == node && s.name == step).unwrap();
        assert_eq!(applied.parent_span_id, sent.span_id, "{node}'s {step} hangs under the coordinator's");
    }

    // A choreographed transfer: no coordinator; the client calls p1, whose
    // debit event carries the trace through its outbox to p2, and p2's
    // answer carries it back: p1 debits under the client's span, p2
    // credits under p1's debit, p1 completes under p2's credit.
    let choreography_trace = new_trace_id(5);
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let mut start = Request::new(pb::StartTransferRequest {
        saga_id: "traced-choreography".into(),
        from_account: 8,
        to_account: 180,
        amount: 10,
        target_participant: "p2".into(),
        wait_ms: 10_000,
    });
    let traceparent = format!("00-{choreography_trace}-{client_span_id}-01");
    start.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let started = p1.start_transfer(start).await.unwrap().into_inner();
    assert_eq!(started.state, pb::TransferState::Completed as i32, "{started:?}");
    let want = [
        ("p1", names(&["choreography debit", "choreography complete", "durable write"])),
        ("p2", names(&["choreography credit", "durable write"])),
    ];
    let choreography = wait_for_spans(&collector, &choreography_trace, &want).await;
    let span = |node: &str, name: &str| {
        choreography
            .iter()
            .find(|s| s.node == node && s.name == name)
            .unwrap_or_else(|| panic!("{node} {name}: {choreography:#?}"))
            .clone()
    };
    let (debit, credit, complete) =
        (span("p1", "choreography debit"), span("p2", "choreography credit"), span("p1", "choreography complete"));
    assert_eq!(debit.parent_span_id, client_span_id);
    assert_eq!(credit.parent_span_id, debit.span_id, "p2's credit hangs under p1's debit: {choreography:#?}");
    assert_eq!(complete.parent_span_id, credit.span_id, "p1's completion hangs under p2's credit: {choreography:#?}");
    assert!(!choreography.iter().any(|s| s.node == "c1"), "no coordinator takes part: {choreography:#?}");
    for node in ["p1", "p2"] {
        let write = span(node, "durable write");
        assert!(
            choreography.iter().any(|s| s.node == node && s.span_id == write.parent_span_id),
            "{node}'s durable write hangs under one of its own spans: {choreography:#?}"
        );
    }

    // The other transfer's spans are in a trace of their own.
    let all = collector.spans.lock().unwrap().clone();
    let other_traces: BTreeSet<&str> = all
        .iter()
        .filter(|s| {
            ![&trace_id, &saga_trace, &choreography_trace, &batch_trace].contains(&&s.trace_id) && s.name == "transfer"
        })
        .map(|s| s.trace_id.as_str())
        .collect();
    assert_eq!(other_traces.len(), 1, "the transfer without a context started one new trace: {all:#?}");
}
