//! The metrics every node serves on `--http-addr`, read as Prometheus would
//! read them, from the real binaries on loopback (build them first:
//! `cargo build --release --workspace`).

use std::time::Duration;
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec, NodeRef};
use tandem::metrics::{parse, scrape, sum, Sample};
use tandem::pb;
use tandem::tls::Security;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

async fn metrics_of(cluster: &mut Cluster, node: NodeRef, who: &Security) -> Vec<Sample> {
    let addr = cluster.node(node).http_addr.expect("every cluster node serves metrics");
    let text = scrape(&addr.to_string(), who, SCRAPE_TIMEOUT).await.expect("the node serves /metrics");
    parse(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_counts_its_transactions_fsyncs_and_calls_and_only_the_clusters_certificates_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = 2;
    spec.accounts_per_participant = 100;
    let mut cluster = Cluster::start(spec).await.expect("the cluster starts");
    let client = cluster.client().clone();
    let mut coordinator = cluster.coordinator_client(&client).unwrap();
    let transfer = |from: u64, to: u64, amount: i64| pb::TransferRequest {
        from_account: from,
        to_account: to,
        amount,
        ..Default::default()
    };
    // Three across both participants (parallel commit), two within p1 (one
    // phase), one refused for want of funds (across).
    for _ in 0..3 {
        let answer = coordinator.transfer(transfer(1, 150, 10)).await.unwrap().into_inner();
        assert_eq!(answer.outcome, pb::Outcome::Committed as i32, "{answer:?}");
    }
    for _ in 0..2 {
        let answer = coordinator.transfer(transfer(2, 3, 10)).await.unwrap().into_inner();
        assert_eq!(answer.outcome, pb::Outcome::Committed as i32, "{answer:?}");
    }
    let refused = coordinator.transfer(transfer(4, 160, 1_000_000)).await.unwrap().into_inner();
    assert_eq!(refused.outcome, pb::Outcome::Aborted as i32, "{refused:?}");
    // A call the client's role may not make: refused, and counted so.
    let mut p1 = cluster.participant_client(0, &client).unwrap();
    let denied = p1.prepare(pb::PrepareRequest::default()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let c1 = metrics_of(&mut cluster, NodeRef::Coordinator, &client).await;
    assert_eq!(sum(&c1, "tandem_transactions_begun_total", &[]), 6.0);
    assert_eq!(sum(&c1, "tandem_transactions_committed_total", &["how=\"parallel\""]), 3.0);
    assert_eq!(sum(&c1, "tandem_transactions_committed_total", &["how=\"one_phase\""]), 2.0);
    assert_eq!(sum(&c1, "tandem_transactions_aborted_total", &["reason=\"insufficient_funds\""]), 1.0);
    assert_eq!(
        sum(&c1, "tandem_transaction_duration_seconds_count", &["outcome=\"committed\""]),
        5.0,
        "every committed transfer is timed"
    );
    assert_eq!(
        sum(&c1, "tandem_rpc_requests_total", &["method=\"/tandem.v1.Coordinator/Transfer\"", "code=\"OK\""]),
        6.0
    );
    // Parallel commit logs a staged record per crossing transfer, fsynced.
    assert!(sum(&c1, "tandem_decision_write_seconds_count", &["record=\"staged\""]) >= 3.0);
    assert!(sum(&c1, "tandem_store_fsyncs_total", &[]) >= 3.0);
    assert!(sum(&c1, "tandem_outbound_batch_size_count", &["participant=\"p2\"", "queue=\"prepare\""]) >= 3.0);

    let p1_metrics = metrics_of(&mut cluster, NodeRef::Participant(0), &client).await;
    assert_eq!(
        sum(
            &p1_metrics,
            "tandem_rpc_requests_total",
            &["method=\"/tandem.v1.Participant/Prepare\"", "code=\"PERMISSION_DENIED\""]
        ),
        1.0
    );
    // Four prepares (three committed, one refused) and two one-phase
    // commits, each made durable by an fsync that may cover several.
    let fsyncs = sum(&p1_metrics, "tandem_store_fsyncs_total", &[]);
    assert!(fsyncs >= 1.0, "p1 fsynced {fsyncs} times");
    // One transfer at a time, a participant finds its store idle and
    // writes in place; a coordinator never does.
    let in_place = sum(&p1_metrics, "tandem_store_writes_in_place_total", &[]);
    assert!(
        in_place >= 1.0 && in_place <= sum(&p1_metrics, "tandem_store_writes_total", &[]),
        "p1 wrote {in_place} in place"
    );
    assert_eq!(sum(&c1, "tandem_store_writes_in_place_total", &[]), 0.0);
    assert!(sum(&p1_metrics, "tandem_store_bytes_written_total", &[]) > 0.0);
    assert_eq!(sum(&p1_metrics, "tandem_prepared_transactions", &[]), 0.0, "nothing is left in doubt");
    assert_eq!(sum(&p1_metrics, "tandem_store_failed", &[]), 0.0);
    // What each process cost the machine: it served calls and fsynced, so
    // it used CPU time, and a later scrape never reads less.
    let p1_cpu = sum(&p1_metrics, "tandem_process_cpu_seconds", &[]);
    assert!(p1_cpu > 0.0, "p1 reports {p1_cpu} s of CPU");
    let c1_cpu = sum(&c1, "tandem_process_cpu_seconds", &[]);
    assert!(c1_cpu > 0.0, "c1 reports {c1_cpu} s of CPU");
    let c1_again = metrics_of(&mut cluster, NodeRef::Coordinator, &client).await;
    assert!(sum(&c1_again, "tandem_process_cpu_seconds", &[]) >= c1_cpu);

    // Without a certificate of the cluster's CA, nothing is read.
    let addr = cluster.node(NodeRef::Coordinator).http_addr.unwrap().to_string();
    let plaintext = scrape(&addr, &Security::Insecure, SCRAPE_TIMEOUT).await;
    assert!(plaintext.is_err(), "a plaintext scrape of a TLS endpoint must fail: {plaintext:?}");
    let stranger =
        tandem::local_ca::LocalCa::new("stranger").unwrap().security(tandem::trust::Role::Operator, "o1").unwrap();
    let refused = scrape(&addr, &stranger, SCRAPE_TIMEOUT).await;
    assert!(refused.is_err(), "a certificate of another CA must be refused: {refused:?}");
}
