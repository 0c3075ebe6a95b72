//! What only the nodes' counters show: per committed transfer, how many
//! fsyncs, calls, bytes and CPU time the cluster spent, and how full its
//! batches were.
//!
//! The bench reads every node's `/metrics` (see `docs/metrics.md`) just
//! before the clients start and again once they stop, and divides the
//! difference by the transfers committed in between. This is the protocol's
//! efficiency as the R* paper counts it (2PC with presumed abort forces one
//! write at the coordinator and two at each participant per transaction;
//! one-phase commit one at the participant), measured: with group commit
//! and batching under load, one fsync or one call covers many transfers,
//! so the figures fall below that minimum as the load rises.
//!
//! A node restarted during the run starts its counters again at zero: its
//! figures would be wrong, so the whole row is left out and says why.

use serde::Serialize;
use std::time::Duration;
use tandem::cluster::{Cluster, NodeRef};
use tandem::metrics::{parse, scrape, sum, Sample};

/// Calls that are the bench's own observation, not the transfers' work: the
/// health probes, the in-doubt sampler, the audits and their balance reads.
const OBSERVATION_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/tandem.v1.Participant/ListPrepared",
    "/tandem.v1.Coordinator/Audit",
    "/tandem.v1.Participant/ReadBalances",
];

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every node's metrics at one moment, by node name, with the address each
/// was read at (a node restarted since serves on another port).
pub struct Snapshot {
    nodes: Vec<(String, Option<std::net::SocketAddr>, Result<Vec<Sample>, String>)>,
    /// Each node's page as it was read, for the report's directory.
    texts: Vec<(String, String)>,
}

impl Snapshot {
    /// Writes each node's page to `dir/metrics-{prefix}-{node}.prom`.
    pub fn write(&self, dir: &std::path::Path, prefix: &str) -> Result<(), String> {
        for (node, text) in &self.texts {
            let path = dir.join(format!("metrics-{prefix}-{node}.prom"));
            std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// Reads every node's metrics.
pub async fn snapshot(cluster: &mut Cluster) -> Snapshot {
    let who = cluster.operator().clone();
    let (mut nodes, mut texts) = (Vec::new(), Vec::new());
    for node in cluster.nodes() {
        let addr = cluster.node(node).http_addr;
        let samples = match addr {
            Some(addr) => match scrape(&addr.to_string(), &who, SCRAPE_TIMEOUT).await {
                Ok(text) => {
                    let samples = parse(&text);
                    texts.push((node.to_string(), text));
                    Ok(samples)
                }
                Err(e) => Err(format!("{node}: {e}")),
            },
            None => Err(format!("{node} serves no metrics")),
        };
        nodes.push((node.to_string(), addr, samples));
    }
    Snapshot { nodes, texts }
}

/// Per committed transfer, from the counters' differences.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Efficiency {
    /// fsyncs of the coordinator's log, and of every participant's together.
    pub coordinator_fsyncs: f64,
    pub participant_fsyncs: f64,
    /// gRPC calls served by every node, the client's included, the bench's
    /// observation excluded ([`OBSERVATION_METHODS`]).
    pub calls: f64,
    /// Bytes every node's store wrote.
    pub bytes_written: f64,
    /// CPU time, user and system, in microseconds: the coordinator's
    /// process, and every participant's together. With two vCPUs, one
    /// transfer at a time can cost at most about twice its latency.
    pub coordinator_cpu_us: f64,
    pub participant_cpu_us: f64,
    /// Mean operations per store write group, over every node.
    pub store_group_mean: f64,
    /// Mean requests per batch call from the coordinator, by queue.
    pub prepare_batch_mean: f64,
    pub commit_batch_mean: f64,
    pub one_phase_batch_mean: f64,
    pub step_batch_mean: f64,
}

/// The efficiency of the transfers committed between `before` and `after`,
/// or why it cannot be told.
pub fn efficiency(before: &Snapshot, after: &Snapshot, committed: u64) -> Result<Efficiency, String> {
    if committed == 0 {
        return Err("nothing committed".into());
    }
    let delta = |name: &str, with: &[&str], node_is: &dyn Fn(&str) -> bool| -> Result<f64, String> {
        let mut total = 0.0;
        for ((node, addr_before, samples_before), (_, addr_after, samples_after)) in
            before.nodes.iter().zip(&after.nodes)
        {
            if !node_is(node) {
                continue;
            }
            if addr_before != addr_after {
                return Err(format!("{node} restarted during the run (its counters began again)"));
            }
            let samples_before = samples_before.as_ref().map_err(Clone::clone)?;
            let samples_after = samples_after.as_ref().map_err(Clone::clone)?;
            let grown = sum(samples_after, name, with) - sum(samples_before, name, with);
            if grown < 0.0 {
                return Err(format!("{node}'s {name} went down: it restarted"));
            }
            total += grown;
        }
        Ok(total)
    };
    let any = |_: &str| true;
    let coordinator = |node: &str| node == NodeRef::Coordinator.to_string();
    let participant = |node: &str| node != NodeRef::Coordinator.to_string();
    let per = committed as f64;
    let mut calls = delta("tandem_rpc_requests_total", &[], &any)?;
    for method in OBSERVATION_METHODS {
        calls -= delta("tandem_rpc_requests_total", &[&format!("method=\"{method}\"")], &any)?;
    }
    let mean = |sum: f64, count: f64| if count > 0.0 { sum / count } else { 0.0 };
    let batch_mean = |queue: &str| -> Result<f64, String> {
        let label = format!("queue=\"{queue}\"");
        Ok(mean(
            delta("tandem_outbound_batch_size_sum", &[&label], &coordinator)?,
            delta("tandem_outbound_batch_size_count", &[&label], &coordinator)?,
        ))
    };
    let (prepare_batch_mean, commit_batch_mean, one_phase_batch_mean, step_batch_mean) =
        (batch_mean("prepare")?, batch_mean("commit")?, batch_mean("one_phase")?, batch_mean("step")?);
    Ok(Efficiency {
        coordinator_fsyncs: delta("tandem_store_fsyncs_total", &[], &coordinator)? / per,
        participant_fsyncs: delta("tandem_store_fsyncs_total", &[], &participant)? / per,
        calls: calls / per,
        bytes_written: delta("tandem_store_bytes_written_total", &[], &any)? / per,
        coordinator_cpu_us: delta("tandem_process_cpu_seconds", &[], &coordinator)? * 1e6 / per,
        participant_cpu_us: delta("tandem_process_cpu_seconds", &[], &participant)? * 1e6 / per,
        store_group_mean: mean(
            delta("tandem_store_write_group_size_sum", &[], &any)?,
            delta("tandem_store_write_group_size_count", &[], &any)?,
        ),
        prepare_batch_mean,
        commit_batch_mean,
        one_phase_batch_mean,
        step_batch_mean,
    })
}
