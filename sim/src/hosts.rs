//! The simulated cluster: one coordinator and its participants, each a
//! turmoil host running the same `Node` code as the binaries, on a disk in
//! memory that outlives its process (so a crash and a restart read back
//! what the disk kept).

use crate::net;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::clock::WallClock;
use tandem::domain::Id;
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_coordinator::directory::Shard;

/// The coordinator's host name (and node id).
pub const COORDINATOR: &str = "c1";
/// The client host's name.
pub const CLIENT: &str = "client";
/// The participants' host names (and node ids), in order.
pub const PARTICIPANTS: [&str; 3] = ["p1", "p2", "p3"];
/// How long a host whose node failed to open waits before trying again (a
/// supervisor restarting the process).
const REOPEN_AFTER_MS: u64 = 300;

/// Shape of the simulated cluster and the timing its nodes run with:
/// production's settings, scaled down so that a seed's faults outlast the
/// timeouts (and the retries and backoffs run many times).
#[derive(Debug, Clone)]
pub struct Topology {
    /// How many of [`PARTICIPANTS`] run.
    pub participants: usize,
    pub accounts_per_participant: u64,
    pub initial_balance: i64,
    /// How long a participant's finished records and tombstones, and its
    /// inbox's event ids, are kept. Longer than any fault a CI scenario
    /// injects: deduplication within this window is what the participant
    /// promises today (the long-outage work removes the window).
    pub finished_retention_ms: u64,
}

impl Topology {
    pub fn participant_name(&self, i: usize) -> &'static str {
        PARTICIPANTS[i]
    }

    pub fn participant_names(&self) -> Vec<&'static str> {
        PARTICIPANTS[..self.participants].to_vec()
    }

    /// Every node's host name, the coordinator first.
    pub fn node_names(&self) -> Vec<&'static str> {
        std::iter::once(COORDINATOR).chain(self.participant_names()).collect()
    }

    pub fn accounts(&self) -> std::ops::Range<u64> {
        0..self.accounts_per_participant * self.participants as u64
    }

    pub fn total_money(&self) -> i64 {
        self.initial_balance * self.accounts().end as i64
    }

    fn shards(&self) -> Vec<Shard> {
        (0..self.participants)
            .map(|i| {
                let first = i as u64 * self.accounts_per_participant;
                Shard {
                    participant: id(self.participant_name(i)),
                    url: net::url(self.participant_name(i)),
                    first,
                    end: first + self.accounts_per_participant,
                }
            })
            .collect()
    }
}

pub fn id(text: &str) -> Id {
    Id::parse("simulated node name", text).expect("simulated node names are valid ids")
}

/// The disks of the cluster, by host name, in a fixed order.
#[derive(Clone, Default)]
pub struct Disks(pub std::collections::BTreeMap<&'static str, MemoryDisk>);

impl Disks {
    pub fn of(&self, host: &str) -> &MemoryDisk {
        &self.0[host]
    }
}

/// How far each node's wall clock is off the simulation's, in ms (the
/// nemesis jumps them), by host name.
#[derive(Clone, Default)]
pub struct Clocks(pub std::collections::BTreeMap<&'static str, Arc<AtomicI64>>);

impl Clocks {
    pub fn jump(&self, host: &str, by_ms: i64) {
        self.0[host].fetch_add(by_ms, Ordering::Relaxed);
    }

    /// The wall clock `host` reads: the simulation's, plus its offset.
    fn of(&self, host: &str) -> WallClock {
        let offset = self.0[host].clone();
        WallClock::Set(Arc::new(move || {
            let now = turmoil::since_epoch().unwrap_or_default().as_millis() as i64;
            now.saturating_add(offset.load(Ordering::Relaxed)).max(0) as u64
        }))
    }
}

/// Adds the coordinator and the participants to `sim`, each on its disk,
/// each reading its wall clock from `clocks`.
pub fn add_nodes(
    sim: &mut turmoil::Sim<'_>,
    seed: u64,
    topology: &Topology,
    disks: &Disks,
    clocks: &Clocks,
    commit_protocol: tandem_coordinator::core::CommitProtocol,
    one_phase_commit: tandem_coordinator::core::OnePhaseCommit,
) {
    let coordinator = tandem_coordinator::node::NodeConfig {
        node_id: id(COORDINATOR),
        disk: Disk::Memory(disks.of(COORDINATOR).clone()),
        shards: topology.shards(),
        prepare_timeout_ms: 1_000,
        call_timeout_ms: 1_000,
        active_max: 10_000,
        idempotency_retention_ms: 24 * 3_600_000,
        wall_clock: clocks.of(COORDINATOR),
        incarnation_seed: Some(seed),
        saga_step_attempts: 8,
        saga_deadline_ms: 10_000,
        security: Security::Insecure,
        network: net::network(),
        one_phase_commit,
        commit_protocol,
    };
    sim.host(COORDINATOR, move || {
        let config = coordinator.clone();
        async move {
            loop {
                match tandem_coordinator::node::Node::open(config.clone()).await {
                    Ok((node, recovered)) => {
                        node.run_on(net::incoming().await?, recovered, std::future::pending()).await?;
                        return Ok(());
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the coordinator did not open; trying again");
                        tokio::time::sleep(Duration::from_millis(REOPEN_AFTER_MS)).await;
                    }
                }
            }
        }
    });
    let peers: Vec<(Id, String)> = topology.participant_names().iter().map(|name| (id(name), net::url(name))).collect();
    for (i, shard) in topology.shards().into_iter().enumerate() {
        let name = topology.participant_name(i);
        let config = tandem_participant::node::NodeConfig {
            node_id: id(name),
            disk: Disk::Memory(disks.of(name).clone()),
            coordinators: vec![(id(COORDINATOR), net::url(COORDINATOR))],
            peers: peers.clone(),
            in_doubt_after_ms: 500,
            finished_retention_ms: topology.finished_retention_ms,
            idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
            owned_accounts: Some(shard.first..shard.end),
            store_free_min_bytes: 64 * 1024,
            security: Security::Insecure,
            network: net::network(),
            wall_clock: clocks.of(name),
        };
        let config = Arc::new(config);
        sim.host(name, move || {
            let config = config.clone();
            async move {
                loop {
                    match tandem_participant::node::Node::open((*config).clone()) {
                        Ok(node) => {
                            node.run_on(net::incoming().await?, std::future::pending()).await?;
                            return Ok(());
                        }
                        Err(error) => {
                            tracing::warn!(%error, "the participant did not open; trying again");
                            tokio::time::sleep(Duration::from_millis(REOPEN_AFTER_MS)).await;
                        }
                    }
                }
            }
        });
    }
}
