//! The participant's driver: gRPC handlers, the store, and the background
//! tasks (decision queries for in-doubt transactions, garbage collection)
//! around the protocol core.
//!
//! Every call goes the same way: convert the request, lock the core, call
//! it, submit its effects to the store while still holding the lock (so the
//! store sees changes in the order memory did), unlock, wait until the
//! effects are durable, answer. Nothing is acknowledged before the store
//! says so.
//!
//! If the store fails (a write or an fsync returns an error: a full disk, a
//! failing device), the node turns NOT_SERVING on its health service at
//! once and every call fails; a failed fsync is never retried as if it had
//! worked. Instead the failed store is closed and reopened, and the core is
//! recovered from what is on disk, exactly as a restart would do it
//! ([`Node::reopen_store`]); until that succeeds (the disk has room again)
//! calls get UNAVAILABLE, and it is tried again with backoff. Then the node
//! is SERVING again, and its in-doubt transactions are resolved as after a
//! restart. No operator is needed.
//!
//! Lock order: `core` before `store` (the slot), before `transfer_waiters`.
//!
//! The core's lock is never poisoned by a request: the core refuses every
//! input it cannot take before changing anything (see its module essay), so
//! nothing a caller sends makes it panic while the lock is held. What could
//! still panic there is an assertion of the core's own invariants, which
//! fires only when this node's memory is already corrupt; then the lock is
//! poisoned and every later call gets INTERNAL (`Error::Fatal`) instead of
//! panicking in turn or being served from a state that disagrees with the
//! disk: the node stops acknowledging, and a restart rebuilds the core from
//! the store ([`Node::core`]). The other locks each guard a map, a set or
//! the store's slot, and nothing under them can panic.

use crate::core::{
    check_batch_len, Ask, Config, Core, Decided, Effects, OnePhaseAnswer, OnePhaseOutcome, Refusal, Stamp,
    StampedRequest, TxnState, Vote, COMMIT_BATCH_MAX, ONE_PHASE_BATCH_MAX, OPS_PER_CALL_MAX, PREPARE_BATCH_MAX,
};
use crate::saga::{Event, EventKind, StepAnswer, StepKind, StepOrder, StepOutcome, StepPhase, Transfer, TransferState};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tandem::domain::{AccountId, Amount, Id, Leg, TxnId};
use tandem::health::Health;
use tandem::net::Network;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_client::ParticipantClient;
use tandem::pb::participant_server::{Participant, ParticipantServer};
use tandem::store::{Disk, Durability, Storage};
use tandem::tls::Security;
use tandem::trust::{Authorizer, Configured};
use tandem::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn, Instrument, Span};

/// Deadline of one decision query to a coordinator.
pub const QUERY_TIMEOUT_MS: u64 = 1_000;
/// How often the in-doubt transactions are looked at.
pub const RESOLVER_TICK_MS: u64 = 50;
/// Most decision queries started per tick.
pub const QUERIES_PER_TICK_MAX: usize = 256;
/// Most decision queries under way to one coordinator at once.
pub const QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX: usize = 64;
/// A coordinator that did not answer a decision query (it timed out or
/// failed to connect) is asked by one query at a time, the next one started
/// at least this long after the last one, at first...
pub const QUERY_PROBE_BACKOFF_INITIAL_MS: u64 = 100;
/// ...doubling up to this. No more than a query's deadline, so that a
/// paused coordinator always has a query waiting for it, which it answers
/// as soon as it runs again.
pub const QUERY_PROBE_BACKOFF_MAX_MS: u64 = QUERY_TIMEOUT_MS;
/// Most transactions listed by ListPrepared.
pub const LIST_PREPARED_MAX: usize = 1_000;
/// Most parked transfers one ListParkedTransfers lists (its default too).
pub const LIST_PARKED_MAX: usize = 1_000;
/// Most prepared transactions a balance read lists (`include_prepared`,
/// for the coordinator's audit); a node holding more answers
/// FAILED_PRECONDITION.
pub const READ_PREPARED_MAX: usize = 100_000;
/// Deadline of one event delivery to a peer.
pub const DELIVERY_TIMEOUT_MS: u64 = 1_000;
/// Longest a StartTransfer waits for a terminal state.
pub const TRANSFER_WAIT_MAX_MS: u32 = 30_000;
/// Most sagas in one ForgetSagas call.
pub const FORGET_SAGAS_MAX: usize = 1_024;
/// Most steps in one SagaStepBatch call.
pub const SAGA_STEP_BATCH_MAX: usize = 1_024;
/// Most events in one DeliverEvents call (received).
pub const DELIVER_EVENTS_MAX: usize = 1_024;
/// Most records one garbage-collection write deletes.
const GC_BATCH_MAX: usize = 10_000;
/// Most saga records (barriers, transfers) deleted in one write of the
/// once-a-second collection.
pub const SAGA_COLLECT_PER_PASS_MAX: usize = 10_000;
/// Most events the relay sends to one peer in one call.
pub const RELAY_BATCH_MAX: usize = 256;
/// Most delivery calls under way to one peer at once (one while it does not
/// answer): so at most this many times [`RELAY_BATCH_MAX`] events per peer
/// are being delivered at once. Events that arrive while every call is
/// busy go together in the next one.
pub const RELAY_CALLS_PER_PEER_MAX: usize = 4;
/// How often the relay looks at the outbox when nothing wakes it.
pub const RELAY_TICK_MS: u64 = 50;
/// After a delivery call that got no answer (none within its deadline, or
/// the peer cannot be reached), the peer gets one call at a time, each
/// started at least this long after the one before, at first...
pub const RELAY_BACKOFF_INITIAL_MS: u64 = 50;
/// ...doubling up to this.
pub const RELAY_BACKOFF_MAX_MS: u64 = 2_000;
/// Events a peer answered but did not apply (it refused them) are offered
/// to it again at most this often; the events behind them do not wait.
pub const RELAY_REFUSED_RETRY_MS: u64 = 2_000;
const _: () = assert!(
    RELAY_BATCH_MAX > 0
        && RELAY_BATCH_MAX <= DELIVER_EVENTS_MAX
        && RELAY_CALLS_PER_PEER_MAX > 0
        && RELAY_BACKOFF_INITIAL_MS > 0
        && RELAY_BACKOFF_INITIAL_MS <= RELAY_BACKOFF_MAX_MS
        && RELAY_REFUSED_RETRY_MS > 0
        // A peer's events in flight at once are never held back by its
        // receiver's bound on how far ahead they may be applied.
        && ((RELAY_BATCH_MAX * RELAY_CALLS_PER_PEER_MAX) as u64) < crate::saga::SEQUENCE_AHEAD_MAX
);
const _: () = assert!(
    QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX > 0
        && QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX <= QUERIES_PER_TICK_MAX
        && QUERY_PROBE_BACKOFF_INITIAL_MS > 0
        && QUERY_PROBE_BACKOFF_INITIAL_MS <= QUERY_PROBE_BACKOFF_MAX_MS
        && QUERY_PROBE_BACKOFF_MAX_MS <= QUERY_TIMEOUT_MS
);
/// How often the store's health is looked at: a failed write turns the
/// node NOT_SERVING within this, and starts its recovery.
pub const STORE_CHECK_MS: u64 = 50;
/// How long after a store failed it is first reopened (a failed disk
/// rarely heals in less; the NOT_SERVING it says meanwhile is seen).
pub const STORE_REOPEN_BACKOFF_INITIAL_MS: u64 = 200;
/// The longest wait between two attempts to reopen a failed store.
pub const STORE_REOPEN_BACKOFF_MAX_MS: u64 = 2_000;
/// A key no record uses: reopening a failed store writes it and deletes it
/// in one fsynced write, to see that the disk takes writes again.
const STORE_PROBE_KEY: &[u8] = b"~probe";
/// The size of that probe write.
const STORE_PROBE_BYTES: usize = 4_096;
/// Outbox events not yet known to be durable for this long get an fsync of
/// their own, so that no event waits for some later write to be relayed.
pub const OUTBOX_SYNC_AFTER_MS: u64 = 200;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: Id,
    /// Where the records are: RocksDB in a directory, or a disk in memory.
    pub disk: Disk,
    /// Coordinator ids and the URLs where they answer decision queries.
    pub coordinators: Vec<(Id, String)>,
    /// Other participants (and possibly this one), for choreographed sagas.
    pub peers: Vec<(Id, String)>,
    pub in_doubt_after_ms: u64,
    pub finished_retention_ms: u64,
    /// How long a choreographed transfer's id is remembered after the
    /// transfer ends (`--idempotency-retention`; default
    /// [`crate::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS`]).
    pub idempotency_retention_ms: u64,
    /// The account ids this node owns (`None`: any).
    pub owned_accounts: Option<std::ops::Range<AccountId>>,
    /// A failed store is reopened only once its filesystem has this many
    /// bytes free, so that a disk that filled up does not make the node
    /// flap between serving and failing.
    pub store_free_min_bytes: u64,
    /// This node's certificate and the cluster's CA, for the server and for
    /// its calls to the coordinators and peers; or `--insecure`.
    pub security: Security,
    /// How its calls reach the coordinators and peers: TCP, or a
    /// simulation's network.
    pub network: Network,
    /// The wall clock read at start (see `Node::now_ms`): the machine's,
    /// or a simulation's.
    pub wall_clock: tandem::clock::WallClock,
}

/// A running participant. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: Id,
    disk: Disk,
    /// What the core is rebuilt with when a failed store is reopened.
    core_config: Config,
    store_free_min_bytes: u64,
    idempotency_retention_ms: u64,
    core: Mutex<Core>,
    /// The open store; `None` while a failed one is being reopened.
    store: RwLock<Option<Arc<dyn Storage>>>,
    coordinators: BTreeMap<Id, CoordinatorClient<Channel>>,
    peers: BTreeMap<Id, ParticipantClient<Channel>>,
    security: Security,
    clock: Instant,
    /// The wall clock (unix ms) when `clock` started: see [`Node::now_ms`].
    clock_origin_ms: u64,
    /// Clients waiting for a choreographed transfer to become terminal.
    transfer_waiters: Mutex<HashMap<Id, Vec<oneshot::Sender<()>>>>,
    /// Wakes the outbox relay when an event was written.
    relay_wake: Notify,
    /// This node's own health, set once it serves (see `run_on`).
    health: std::sync::OnceLock<Arc<Health>>,
}

impl Node {
    /// Opens the store and recovers the core from it.
    pub fn open(config: NodeConfig) -> Result<Node, Error> {
        let store = config.disk.open()?;
        // Every record: accounts, transactions, barriers, transfers, inbox,
        // outbox, suspense.
        let records = store.scan_prefix(b"")?;
        let mut coordinators = BTreeMap::new();
        for (id, url) in &config.coordinators {
            coordinators.insert(
                id.clone(),
                CoordinatorClient::new(tandem::server::channel_on(url, &config.security, &config.network)?),
            );
        }
        let mut peers = BTreeMap::new();
        for (id, url) in &config.peers {
            peers.insert(
                id.clone(),
                ParticipantClient::new(tandem::server::channel_on(url, &config.security, &config.network)?),
            );
        }
        let core_config = Config {
            node_id: config.node_id.clone(),
            coordinators: coordinators.keys().cloned().collect(),
            in_doubt_after_ms: config.in_doubt_after_ms,
            finished_retention_ms: config.finished_retention_ms,
            owned_accounts: config.owned_accounts.clone(),
        };
        let clock = Instant::now();
        let clock_origin_ms = config.wall_clock.unix_ms();
        let core = Core::recover(core_config.clone(), records, clock_origin_ms)?;
        info!(
            node = %config.node_id,
            accounts = core.accounts().len(),
            prepared = core.prepared_count(),
            "recovered from {}",
            config.disk
        );
        Ok(Node {
            inner: Arc::new(Inner {
                node_id: config.node_id,
                disk: config.disk,
                core_config,
                store_free_min_bytes: config.store_free_min_bytes,
                idempotency_retention_ms: config.idempotency_retention_ms,
                core: Mutex::new(core),
                store: RwLock::new(Some(store)),
                coordinators,
                peers,
                security: config.security,
                clock,
                clock_origin_ms,
                transfer_waiters: Mutex::new(HashMap::new()),
                relay_wake: Notify::new(),
                health: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The core's clock: monotonic while the process lives (timeouts and
    /// backoff use it), starting from the wall clock at start, so that a
    /// time stored in a record (a prepare's) still means something after a
    /// restart.
    fn now_ms(&self) -> u64 {
        self.inner.clock_origin_ms + self.inner.clock.elapsed().as_millis() as u64
    }

    /// The core, locked; `Error::Fatal` if an invariant assertion panicked
    /// under the lock earlier (see the module documentation: no request
    /// can, so this node's memory is corrupt and it stops acknowledging).
    fn core(&self) -> Result<MutexGuard<'_, Core>, Error> {
        self.inner.core.lock().map_err(|_| {
            Error::Fatal(format!(
                "{}'s core failed an invariant check while changing its state; it acknowledges nothing more until it is restarted from its store",
                self.inner.node_id
            ))
        })
    }

    /// The open store, or UNAVAILABLE once it failed, until it is reopened.
    fn store(&self) -> Result<Arc<dyn Storage>, Error> {
        match self.inner.store.read().expect("store slot lock poisoned").as_ref() {
            Some(store) if !store.has_failed() => Ok(store.clone()),
            _ => Err(Error::Unavailable(format!(
                "the store of {} failed; the node is not serving until it has reopened and recovered it",
                self.inner.node_id
            ))),
        }
    }

    /// Sets the gauges read from this node's state (before each scrape of
    /// its metrics).
    pub fn observe_gauges(&self) {
        metrics::gauge!("tandem_store_failed").set(if self.store_is_healthy() { 0.0 } else { 1.0 });
        let now = self.now_ms();
        let Ok(core) = self.core() else { return };
        metrics::gauge!("tandem_prepared_transactions").set(core.prepared_count() as f64);
        let oldest_ms = core.prepared_at_most(1).first().map(|(_, txn)| now.saturating_sub(txn.prepared_at_ms));
        metrics::gauge!("tandem_prepared_oldest_seconds").set(oldest_ms.unwrap_or(0) as f64 / 1_000.0);
        metrics::gauge!("tandem_outbox_depth").set(core.outbox_len() as f64);
        metrics::gauge!("tandem_parked_transfers").set(core.parked_transfers().len() as f64);
        metrics::gauge!("tandem_suspense_balance").set(core.suspense() as f64);
    }

    /// What failed the store, for health and logs.
    fn store_failure(&self) -> String {
        match self.inner.store.read().expect("store slot lock poisoned").as_ref() {
            Some(store) => store.failure().unwrap_or_else(|| "no failure".into()),
            None => "it is being reopened".into(),
        }
    }

    /// GetHealth's answer (UNAVAILABLE before the node serves).
    pub fn health(&self) -> Result<pb::NodeHealth, Error> {
        let health = self.inner.health.get().ok_or_else(|| Error::Unavailable("not serving yet".into()))?;
        Ok(health.to_pb())
    }

    /// Whether the store is open and has not failed.
    fn store_is_healthy(&self) -> bool {
        self.inner.store.read().expect("store slot lock poisoned").as_ref().is_some_and(|store| !store.has_failed())
    }

    /// Runs `step` on the core and waits until its effects are durable.
    async fn apply<T>(
        &self,
        ops_max: usize,
        step: impl FnOnce(&mut Core, u64) -> Result<(T, Effects), Error>,
    ) -> Result<T, Error> {
        self.apply_traced(&[], ops_max, step).await
    }

    /// [`Node::apply`] for the transactions whose spans are `traced`: each
    /// gets a `durable write` span for the wait for the write's fsync.
    async fn apply_traced<T>(
        &self,
        traced: &[Span],
        ops_max: usize,
        step: impl FnOnce(&mut Core, u64) -> Result<(T, Effects), Error>,
    ) -> Result<T, Error> {
        let now_ms = self.now_ms();
        let (value, written, outbox_written) = {
            let mut core = self.core()?;
            let store = self.store()?;
            store.check_room(ops_max)?;
            let (value, effects) = step(&mut core, now_ms)?;
            let fsynced = effects.durability == Durability::Fsync;
            let written = store.submit(effects.ops, effects.durability)?;
            // Writes complete in order: once this one is fsynced, every
            // outbox event allocated before it is on disk, and may be relayed.
            let outbox_written = (fsynced && core.outbox_awaits_durability()).then(|| core.outbox_end());
            (value, written, outbox_written)
        };
        let _durable_writes: Vec<Span> =
            traced.iter().map(|parent| tandem::trace::child_of("durable write", parent)).collect();
        let durable =
            async move { written.await.unwrap_or_else(|_| Err(Error::Fatal("the writer thread stopped".into()))) };
        let Some(outbox_end) = outbox_written else {
            durable.await?;
            return Ok(value);
        };
        // The relay must learn that the events are durable even if the
        // caller stops waiting (a gRPC call whose client gave up drops this
        // future); otherwise they would wait for some later write. So the
        // rest runs in a task of its own, which a dropped caller does not
        // cancel.
        let node = self.clone();
        tokio::spawn(async move {
            durable.await?;
            node.core()?.mark_outbox_durable(outbox_end);
            node.inner.relay_wake.notify_one();
            Ok::<(), Error>(())
        })
        .await
        .unwrap_or_else(|e| Err(Error::Fatal(format!("the durability wait failed: {e}"))))?;
        Ok(value)
    }

    /// Closes the failed store, reopens it, and rebuilds the core from what
    /// is on disk, exactly as a restart does: memory may hold changes whose
    /// write failed, and a failed fsync says nothing of what reached the
    /// disk, so only a fresh read is trusted. Fails, and is tried again
    /// later, while the filesystem has less than `store_free_min_bytes`
    /// free or the reopened store cannot make a write durable.
    ///
    /// From the moment the failed store is taken out of its slot until the
    /// new one is put in, no call can write (they get UNAVAILABLE), so what
    /// was read from disk is what the new core is built from.
    async fn reopen_store(&self) -> Result<(), Error> {
        let disk = &self.inner.disk;
        let free = disk.free_bytes()?;
        if free < self.inner.store_free_min_bytes {
            return Err(Error::Unavailable(format!(
                "{} has {free} bytes free; the node serves again from {} (--store-free-min-mb)",
                disk, self.inner.store_free_min_bytes
            )));
        }
        let failed = {
            let _core = self.core()?;
            self.inner.store.write().expect("store slot lock poisoned").take()
        };
        if let Some(failed) = failed {
            // Waits for the writer thread, which fails what is queued; the
            // database is closed when its last handle goes, here.
            failed.close();
        }
        let store = disk.open()?;
        let probe = vec![
            tandem::store::Op::Put(STORE_PROBE_KEY.to_vec(), vec![0; STORE_PROBE_BYTES]),
            tandem::store::Op::Delete(STORE_PROBE_KEY.to_vec()),
        ];
        // Records it cannot read keep the node NOT_SERVING (this is tried
        // again), as they would keep a restarted node from starting.
        let recovered = async {
            store.write(probe).await?;
            let records = store.scan_prefix(b"")?;
            Core::recover(self.inner.core_config.clone(), records, self.now_ms())
        }
        .await;
        let recovered = match recovered {
            Ok(recovered) => recovered,
            Err(error) => {
                store.close();
                return Err(error);
            }
        };
        let mut core = self.core()?;
        *core = recovered;
        *self.inner.store.write().expect("store slot lock poisoned") = Some(store);
        info!(
            node = %self.inner.node_id,
            accounts = core.accounts().len(),
            prepared = core.prepared_count(),
            "the store was reopened and the node recovered from {}",
            disk
        );
        Ok(())
    }

    /// Watches the store: from its first failed write the node is
    /// NOT_SERVING, and the store is reopened with backoff until the disk
    /// takes writes again; then the node serves again.
    async fn watch_store(self, health: Arc<Health>) {
        let mut tick = tokio::time::interval(Duration::from_millis(STORE_CHECK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed_since: Option<Instant> = None;
        // What failed the store, as first seen (the reopening closes it).
        let mut failure = String::new();
        let mut backoff_ms = STORE_REOPEN_BACKOFF_INITIAL_MS;
        let mut next_attempt = Instant::now();
        loop {
            tick.tick().await;
            if self.store_is_healthy() {
                continue;
            }
            let since = match failed_since {
                Some(since) => since,
                None => {
                    failure = self.store_failure();
                    tracing::error!(
                        node = %self.inner.node_id,
                        %failure,
                        "the store failed: NOT_SERVING; it will be reopened and recovered as on a restart"
                    );
                    health.set_live(Err(format!("the store failed ({failure}); it is reopened once its disk takes writes again (--store-free-min-mb free), and recovered as on a restart"))).await;
                    next_attempt = Instant::now() + Duration::from_millis(backoff_ms);
                    *failed_since.insert(Instant::now())
                }
            };
            if Instant::now() < next_attempt {
                continue;
            }
            match self.reopen_store().await {
                Ok(()) => {
                    info!(node = %self.inner.node_id, down_ms = since.elapsed().as_millis() as u64, "serving again");
                    failed_since = None;
                    backoff_ms = STORE_REOPEN_BACKOFF_INITIAL_MS;
                    health.set_live(Ok(())).await;
                    self.inner.relay_wake.notify_one();
                }
                Err(error) => {
                    backoff_ms = (backoff_ms * 2).min(STORE_REOPEN_BACKOFF_MAX_MS);
                    next_attempt = Instant::now() + Duration::from_millis(backoff_ms);
                    warn!(node = %self.inner.node_id, %error, retry_in_ms = backoff_ms, "the store cannot be reopened yet");
                    health
                        .set_live(Err(format!(
                            "the store failed ({failure}); it cannot be reopened yet: {error}; next try in {backoff_ms} ms"
                        )))
                        .await;
                }
            }
        }
    }

    /// Releases the store of a node that will not run (it can be opened
    /// again once the node is dropped).
    pub fn close(&self) {
        if let Some(store) = self.inner.store.read().ok().and_then(|store| store.clone()) {
            store.close();
        }
    }

    pub async fn prepare(
        &self,
        txn: TxnId,
        coordinator: Id,
        legs: Vec<Leg>,
        stamp: Stamp,
        traced: &[Span],
    ) -> Result<Vote, Error> {
        self.apply_traced(traced, OPS_PER_CALL_MAX + 1, |core, now| {
            core.prepare_stamped(txn, coordinator, legs, stamp, now)
        })
        .await
    }

    /// A batch of prepares, with the COMMITs riding on it if any
    /// ([`Core::commit_then_prepare_batch`]): the commits' answer and each
    /// prepare's vote, once their one write is durable; `Err` when none could
    /// be judged (the store failed or its queue is full, or the prepares are
    /// too many).
    pub async fn commit_then_prepare_batch(
        &self,
        commits: Option<(&[TxnId], Option<&Id>, Stamp)>,
        prepares: Vec<Result<StampedRequest, Error>>,
        traced: &[Span],
    ) -> Result<(Result<(), Error>, Vec<Result<Vote, Error>>), Error> {
        let commit_ops = commits.as_ref().map_or(0, |(txns, _, _)| txns.len() * OPS_PER_CALL_MAX + 1);
        self.apply_traced(traced, commit_ops + prepares.len() * (OPS_PER_CALL_MAX + 1), |core, now| {
            core.commit_then_prepare_batch(commits, prepares, now)
        })
        .await
    }

    /// A one-phase commit ([`Core::commit_one_phase`]), answered once its
    /// write is durable.
    pub async fn commit_one_phase(
        &self,
        txn: TxnId,
        coordinator: Id,
        legs: Vec<Leg>,
        stamp: Stamp,
        traced: &[Span],
    ) -> Result<OnePhaseAnswer, Error> {
        self.apply_traced(traced, OPS_PER_CALL_MAX + 1, |core, now| {
            core.commit_one_phase(txn, coordinator, legs, stamp, now)
        })
        .await
    }

    /// Each one-phase commit's answer, or why it is malformed, in one write;
    /// `Err` when none could be judged (the store failed or its queue is
    /// full).
    pub async fn commit_one_phase_batch(
        &self,
        requests: Vec<Result<StampedRequest, Error>>,
        traced: &[Span],
    ) -> Result<Vec<Result<OnePhaseAnswer, Error>>, Error> {
        self.apply_traced(traced, requests.len() * (OPS_PER_CALL_MAX + 1), |core, now| {
            core.commit_one_phase_batch(requests, now)
        })
        .await
    }

    /// A batch call's items judged in one write ([`Core::judge_each`]).
    async fn apply_each<I, A>(
        &self,
        traced: &[Span],
        items: Vec<Result<I, Error>>,
        ops_each: usize,
        judge: impl Fn(&mut Core, I, u64) -> Result<(A, Effects), Error>,
    ) -> Result<Vec<Result<A, Error>>, Error> {
        self.apply_traced(traced, items.len() * ops_each, |core, now| Ok(core.judge_each(items, now, judge))).await
    }

    pub async fn commit(&self, txn: &TxnId) -> Result<(), Error> {
        self.apply(OPS_PER_CALL_MAX, |core, now| Ok(((), core.commit(txn, now)?))).await
    }

    pub async fn commit_batch(
        &self,
        txns: &[TxnId],
        coordinator: Option<&Id>,
        stamp: Stamp,
        traced: &[Span],
    ) -> Result<(), Error> {
        // The effects of the commits applied are written even when the
        // answer is an error (see `Core::commit_batch`).
        self.apply_traced(traced, txns.len() * OPS_PER_CALL_MAX + 1, |core, now| {
            Ok(core.commit_batch_stamped(txns, coordinator, stamp, now))
        })
        .await?
    }

    pub async fn abort(&self, txn: &TxnId) -> Result<(), Error> {
        self.apply(OPS_PER_CALL_MAX, |core, now| Ok(((), core.abort(txn, now)?))).await
    }

    /// Serves the participant, health and reflection services on `listener`
    /// until `shutdown` resolves, with the background tasks running; then
    /// stops taking calls, lets the store write what is queued, and returns.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        self.run_on(incoming, shutdown).await
    }

    /// [`Node::run`] on any stream of accepted connections (a simulation's).
    pub async fn run_on<IO, IE>(
        self,
        incoming: impl Stream<Item = Result<IO, IE>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // 2PC and saga calls only from the coordinators this node was
        // configured with, events only from its peers (see tandem::trust).
        let configured = Configured {
            coordinators: self.inner.coordinators.keys().cloned().collect(),
            participants: self.inner.peers.keys().cloned().collect(),
        };
        let authorizer = Authorizer::for_node(&self.inner.security, configured);
        let mut server = tandem::server::server_builder(&self.inner.security, authorizer)?;
        let (health, health_service) = Health::new(tandem::pb::participant_server::SERVICE_NAME, None, "").await;
        let health = Arc::new(health);
        let _ = self.inner.health.set(health.clone());
        let resolver = tokio::spawn(self.clone().resolve_in_doubt());
        let collector = tokio::spawn(self.clone().collect_garbage());
        let relay = tokio::spawn(self.clone().relay_outbox());
        let store_watch = tokio::spawn(self.clone().watch_store(health));
        let result = server
            .add_service(health_service)
            .add_service(tandem::server::reflection_service(tandem::pb::participant_server::SERVICE_NAME))
            .add_service(ParticipantServer::new(self.clone()).max_decoding_message_size(16 * 1024 * 1024))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        resolver.abort();
        collector.abort();
        relay.abort();
        store_watch.abort();
        if let Some(store) = self.inner.store.read().expect("store slot lock poisoned").as_ref() {
            store.close();
        }
        info!(node = %self.inner.node_id, "stopped");
        result.map_err(|e| Error::Unavailable(format!("the server failed: {e}")))
    }

    /// Asks the coordinators about transactions that stayed prepared too
    /// long, with backoff, and applies the decisions they give.
    ///
    /// Bounded: at most [`QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX`] queries
    /// to one coordinator at once, and never two at once about one
    /// transaction; each has a deadline ([`QUERY_TIMEOUT_MS`]). A
    /// coordinator that did not answer one (paused, down, cut off) gets one
    /// query at a time, with backoff ([`CoordinatorLink`]), instead of one
    /// per transaction: its transactions wait without backoffs of their
    /// own growing, and when it answers again, all of them are asked at
    /// once ([`Core::query_again_now`]). A query that got no answer
    /// decides nothing: the transaction stays prepared and is asked about
    /// again.
    async fn resolve_in_doubt(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(RESOLVER_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links: BTreeMap<Id, CoordinatorLink> =
            self.inner.coordinators.keys().map(|id| (id.clone(), CoordinatorLink::default())).collect();
        // The queries under way: the coordinator and transaction of each.
        let mut queries = tokio::task::JoinSet::new();
        let mut asking: HashMap<tokio::task::Id, (Id, TxnId)> = HashMap::new();
        let mut asked: HashSet<TxnId> = HashSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(done) = queries.join_next_with_id(), if !queries.is_empty() => {
                    let (task, answered) = match done {
                        Ok((task, answered)) => (task, answered),
                        Err(error) => {
                            warn!(%error, "a decision query failed");
                            (error.id(), false)
                        }
                    };
                    let (coordinator, txn) = asking.remove(&task).expect("every query is listed");
                    asked.remove(&txn);
                    let link = links.get_mut(&coordinator).expect("queries go to known coordinators");
                    let now = tokio::time::Instant::now();
                    if link.finished(answered, now) {
                        let waiting = self.core().map(|mut core| core.query_again_now(&coordinator, self.now_ms()));
                        info!(%coordinator, ?waiting, "the coordinator answers again; asking about its transactions");
                    } else if !(answered && link.in_flight == 0) {
                        // Look for more due queries at the next tick; at once
                        // only when the last query to an answering coordinator
                        // is done.
                        continue;
                    }
                }
            }
            let now = tokio::time::Instant::now();
            let mut room: BTreeMap<&Id, usize> = links.iter().map(|(id, link)| (id, link.may_start(now))).collect();
            let due = match self.core() {
                Ok(mut core) => core.due_queries_where(self.now_ms(), QUERIES_PER_TICK_MAX, |txn, coordinator| {
                    if asked.contains(txn) {
                        return Ask::NotThis;
                    }
                    match room.get_mut(coordinator) {
                        Some(0) => Ask::NotThisCoordinator,
                        Some(room) => {
                            *room -= 1;
                            Ask::Yes
                        }
                        // Reported below, at the pace of its backoff.
                        None => Ask::Yes,
                    }
                }),
                Err(error) => {
                    warn!(%error, "in-doubt transactions are not resolved");
                    continue;
                }
            };
            for (txn, coordinator) in due {
                let Some(link) = links.get_mut(&coordinator) else {
                    warn!(%txn, %coordinator, "in doubt with a coordinator this node does not know");
                    continue;
                };
                link.started(now);
                let (node, query, to) = (self.clone(), txn.clone(), coordinator.clone());
                let task = queries.spawn(async move { node.query_decision(query, &to).await });
                asked.insert(txn.clone());
                asking.insert(task.id(), (coordinator, txn));
            }
        }
    }

    /// Asks `coordinator` for the decision on `txn` and applies it; `true`
    /// if the coordinator answered (whatever the answer), `false` if it did
    /// not within the deadline or could not be reached. No answer decides
    /// nothing: after voting YES this node never decides alone.
    async fn query_decision(&self, txn: TxnId, coordinator: &Id) -> bool {
        let Some(client) = self.inner.coordinators.get(coordinator) else {
            warn!(%txn, %coordinator, "in doubt with a coordinator this node does not know");
            return false;
        };
        let incarnation = match self.core() {
            Ok(core) => core.txn(&txn).map_or(0, |record| record.incarnation),
            Err(_) => return false,
        };
        let mut request = Request::new(pb::QueryDecisionRequest {
            txn_id: txn.to_string(),
            participant_id: self.inner.node_id.to_string(),
            coordinator_incarnation: incarnation,
        });
        // The header tells the server; the client enforces the deadline itself
        // (a paused coordinator accepts the connection and never answers).
        let timeout = Duration::from_millis(QUERY_TIMEOUT_MS);
        request.set_timeout(timeout);
        let answer = tokio::time::timeout(timeout, client.clone().query_decision(request)).await;
        let decision = match answer {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                // Every answer says which incarnation gave it: one this node
                // has not heard of replaces the current one, and orphans its
                // transactions (they are never asked about again).
                if response.coordinator_incarnation != 0 {
                    let learnt = self
                        .apply(1, |core, _| {
                            let ops = core.learn_incarnation(coordinator, response.coordinator_incarnation)?;
                            Ok(((), Effects::buffered(ops)))
                        })
                        .await;
                    if let Err(error) = learnt {
                        debug!(%txn, %coordinator, %error, "the coordinator's incarnation is not recorded yet");
                        return false;
                    }
                }
                pb::Decision::try_from(response.decision).unwrap_or(pb::Decision::Unspecified)
            }
            Ok(Err(status)) => {
                debug!(%txn, %coordinator, error = %status.message(), "decision query failed; will ask again");
                // The coordinator's own refusal is an answer about this
                // transaction; the rest say it could not answer at all.
                return !matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                        | tonic::Code::ResourceExhausted
                );
            }
            Err(_) => {
                debug!(%txn, %coordinator, "decision query timed out; will ask again");
                return false;
            }
        };
        debug!(%txn, %coordinator, ?decision, "decision query answered");
        // An outcome from another incarnation than the one that prepared it
        // is no answer about it (that one's log is gone).
        let orphaned = self.core().map(|core| core.txn(&txn).is_some_and(|record| core.is_orphan(record)));
        if orphaned.unwrap_or(true) && matches!(decision, pb::Decision::Commit | pb::Decision::Abort) {
            warn!(%txn, %coordinator, ?decision, "an outcome from another incarnation of the coordinator is not applied: the transaction is orphaned");
            return true;
        }
        let applied = match decision {
            pb::Decision::Commit => self.commit(&txn).await,
            pb::Decision::Abort => self.abort(&txn).await,
            // The log that could decide it is gone: it stays prepared, an
            // orphan for an operator, never an ABORT by presumption.
            pb::Decision::UnknownIncarnation => {
                warn!(%txn, %coordinator, "orphaned: the coordinator's incarnation that prepared it is gone; it waits for an operator (ResolveInDoubt)");
                Ok(())
            }
            pb::Decision::Pending | pb::Decision::Unspecified => Ok(()),
        };
        match applied {
            Ok(()) if decision != pb::Decision::Pending => {
                info!(%txn, ?decision, "in-doubt transaction resolved by query")
            }
            Ok(()) => {}
            Err(error @ Error::Unavailable(_)) => debug!(%txn, %error, "the queried decision waits for the store"),
            Err(error) => warn!(%txn, %error, "applying the queried decision failed"),
        }
        true
    }

    async fn collect_garbage(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if !self.store_is_healthy() {
                // The store watch recovers it; nothing to collect meanwhile.
                continue;
            }
            // Again at once while a pass fills its batch: collection keeps
            // up with the write rate, in bounded writes.
            loop {
                let result = self
                    .apply(GC_BATCH_MAX, |core, now| {
                        let effects = core.collect_garbage_at_most(now, GC_BATCH_MAX);
                        Ok((effects.ops.len(), effects))
                    })
                    .await;
                match result {
                    Ok(collected) if collected >= GC_BATCH_MAX => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(error) => {
                        warn!(%error, "garbage collection failed");
                        break;
                    }
                }
            }
            // Saga barriers below their watermark (no wait) and transfers
            // past the idempotency retention.
            let retention_ms = self.inner.idempotency_retention_ms;
            let result = self
                .apply(SAGA_COLLECT_PER_PASS_MAX, |core, now| {
                    Ok(((), core.collect_sagas(now, retention_ms, SAGA_COLLECT_PER_PASS_MAX)))
                })
                .await;
            if let Err(error) = result {
                warn!(%error, "collecting saga records failed");
            }
        }
    }
}

/// The resolver's view of one coordinator: the queries under way to it,
/// and, while it does not answer, when the next query may go. A pure state
/// machine: the resolver tells it what happened and when.
#[derive(Debug, Default)]
struct CoordinatorLink {
    in_flight: usize,
    /// Set when a query got no answer, cleared when one gets an answer.
    silent: Option<Silence>,
}

#[derive(Debug)]
struct Silence {
    /// No query before this.
    next_probe: tokio::time::Instant,
    /// How long after the next query starts the one after it may.
    backoff_ms: u64,
}

impl CoordinatorLink {
    /// How many queries may start now.
    fn may_start(&self, now: tokio::time::Instant) -> usize {
        match &self.silent {
            None => QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX.saturating_sub(self.in_flight),
            Some(silence) if self.in_flight == 0 && now >= silence.next_probe => 1,
            Some(_) => 0,
        }
    }

    fn started(&mut self, now: tokio::time::Instant) {
        debug_assert!(self.may_start(now) > 0, "a query started beyond the bound: {self:?}");
        self.in_flight += 1;
        if let Some(silence) = &mut self.silent {
            silence.next_probe = now + Duration::from_millis(silence.backoff_ms);
            silence.backoff_ms = (silence.backoff_ms * 2).min(QUERY_PROBE_BACKOFF_MAX_MS);
        }
    }

    /// A query ended, `answered` or not; `true` if the coordinator answers
    /// again after it did not.
    fn finished(&mut self, answered: bool, now: tokio::time::Instant) -> bool {
        assert!(self.in_flight > 0, "a query ended that was not started: {self:?}");
        self.in_flight -= 1;
        if answered {
            return self.silent.take().is_some();
        }
        if self.silent.is_none() {
            let next_probe = now + Duration::from_millis(QUERY_PROBE_BACKOFF_INITIAL_MS);
            let backoff_ms = (QUERY_PROBE_BACKOFF_INITIAL_MS * 2).min(QUERY_PROBE_BACKOFF_MAX_MS);
            self.silent = Some(Silence { next_probe, backoff_ms });
        }
        false
    }
}

/// The relay's view of one peer: the calls under way to it, where its next
/// batch starts, and, after a call that got no answer, when the next may
/// go. A pure state machine: the relay tells it what happened and when.
#[derive(Debug, Default)]
struct PeerLink {
    in_flight: usize,
    /// The next batch starts at this sequence: the events before it were
    /// offered since the last rewind (those still in the outbox are under
    /// way, or were refused, or could not be forgotten).
    cursor: u64,
    /// After a call that got no answer: one call at a time, none before
    /// this, and how long after the next call starts the one after it may.
    failing: Option<(tokio::time::Instant, u64)>,
    /// The events behind the cursor may be offered again from then on.
    rewind_at: Option<tokio::time::Instant>,
}

impl PeerLink {
    /// How many calls may start now.
    fn calls_free(&self, now: tokio::time::Instant) -> usize {
        match self.failing {
            None => RELAY_CALLS_PER_PEER_MAX.saturating_sub(self.in_flight),
            Some((next_call, _)) => usize::from(self.in_flight == 0 && now >= next_call),
        }
    }

    /// Whether the events behind the cursor may be offered again now (none
    /// of them is under way).
    fn may_rewind(&self, now: tokio::time::Instant) -> bool {
        self.in_flight == 0 && self.cursor > 0 && self.rewind_at.is_none_or(|at| now >= at)
    }

    fn rewound(&mut self, now: tokio::time::Instant) {
        self.cursor = 0;
        self.rewind_at = Some(now + Duration::from_millis(RELAY_REFUSED_RETRY_MS));
    }

    /// A call started with the events from `first` to `last`.
    fn started(&mut self, first: u64, last: u64, now: tokio::time::Instant) {
        assert!(
            self.calls_free(now) > 0 && self.cursor <= first && first <= last,
            "a call beyond the bound or behind the cursor ({first}..={last}): {self:?}"
        );
        self.in_flight += 1;
        self.cursor = last + 1;
        if let Some((next_call, backoff_ms)) = &mut self.failing {
            *next_call = now + Duration::from_millis(*backoff_ms);
            *backoff_ms = (*backoff_ms * 2).min(RELAY_BACKOFF_MAX_MS);
        }
    }

    /// The call that started at `first` ended, answered or not. With no
    /// answer, its events are offered again, after a backoff.
    fn finished(&mut self, first: u64, answered: bool, now: tokio::time::Instant) {
        assert!(self.in_flight > 0, "a call ended that was not started: {self:?}");
        self.in_flight -= 1;
        if answered {
            self.failing = None;
            return;
        }
        self.cursor = self.cursor.min(first);
        if self.failing.is_none() {
            let next_call = now + Duration::from_millis(RELAY_BACKOFF_INITIAL_MS);
            self.failing = Some((next_call, (RELAY_BACKOFF_INITIAL_MS * 2).min(RELAY_BACKOFF_MAX_MS)));
        }
    }
}

impl Node {
    /// Delivers outbox events to their peers, at least once: an event is
    /// forgotten only after the peer acknowledged it (and the peer
    /// acknowledges only once the event's effects and the record of its
    /// number are durable). A crash between the acknowledgement and the
    /// forgetting redelivers the event, however much later; the peer
    /// recognises its number (see `saga.rs`, "Deduplication with no time
    /// window"). An event is sent only once the write that put it in the
    /// outbox, with its number, is durable.
    ///
    /// Each peer has its own pace ([`PeerLink`]): at most
    /// [`RELAY_CALLS_PER_PEER_MAX`] calls under way to it, each with its
    /// next [`RELAY_BATCH_MAX`] events in outbox order (taken from the
    /// outbox's per-peer index, [`Core::outbox_batch`], so a pass costs what
    /// it sends, however long the outbox), each with a deadline
    /// ([`DELIVERY_TIMEOUT_MS`]). After a call that got no answer, one call
    /// at a time, with backoff up to [`RELAY_BACKOFF_MAX_MS`], until one is
    /// answered. A peer that is down or silent holds up its own events
    /// only. Events a peer answered but refused stay in the outbox and are
    /// offered again every [`RELAY_REFUSED_RETRY_MS`], without holding up
    /// the events behind them.
    async fn relay_outbox(self) {
        let mut links: BTreeMap<Id, PeerLink> = BTreeMap::new();
        let mut calls = tokio::task::JoinSet::new();
        // The calls under way: the peer of each, and its first event.
        let mut calling: HashMap<tokio::task::Id, (Id, u64)> = HashMap::new();
        let mut awaiting_durability_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.inner.relay_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(RELAY_TICK_MS)) => {}
                Some(done) = calls.join_next_with_id(), if !calls.is_empty() => {
                    let (task, answered) = match done {
                        Ok((task, answered)) => (task, answered),
                        Err(error) => {
                            warn!(%error, "a delivery call failed");
                            (error.id(), false)
                        }
                    };
                    let (peer, first) = calling.remove(&task).expect("every call is listed");
                    let link = links.get_mut(&peer).expect("calls go to listed peers");
                    link.finished(first, answered, tokio::time::Instant::now());
                }
            }
            let now = tokio::time::Instant::now();
            // What to send, read under the core's lock; the links change
            // after it is released.
            let (plans, awaits_durability) = match self.core() {
                Ok(core) => {
                    let mut plans = Vec::new();
                    for destination in core.outbox_destinations() {
                        let link = links.entry(destination.clone()).or_default();
                        // As many calls as the peer may take now, each with
                        // the events after the last one's.
                        let (mut from, mut rewind, mut batches) = (link.cursor, false, Vec::new());
                        for _ in 0..link.calls_free(now) {
                            let mut batch = core.outbox_batch(&destination, from, RELAY_BATCH_MAX);
                            if batch.is_empty() && batches.is_empty() && link.may_rewind(now) {
                                // Only events offered before are left: those
                                // the peer refused (or not forgotten).
                                rewind = true;
                                batch = core.outbox_batch(&destination, 0, RELAY_BATCH_MAX);
                            }
                            let Some((last, _)) = batch.last() else { break };
                            from = last + 1;
                            batches.push(batch);
                        }
                        plans.push((destination, rewind, batches));
                    }
                    (plans, core.outbox_awaits_durability())
                }
                Err(error) => {
                    warn!(%error, "the outbox is not relayed");
                    continue;
                }
            };
            // Events whose write was never seen fsynced (its fsync was a lazy
            // one, or the task that should have said so is gone) get an fsync
            // of their own after a while, so that no event waits for some
            // later write to be relayed.
            match awaiting_durability_since {
                Some(since)
                    if awaits_durability
                        && now.duration_since(since) >= Duration::from_millis(OUTBOX_SYNC_AFTER_MS) =>
                {
                    awaiting_durability_since = None;
                    let node = self.clone();
                    tokio::spawn(async move {
                        let synced = node
                            .apply(0, |_, _| Ok(((), Effects { ops: Vec::new(), durability: Durability::Fsync })))
                            .await;
                        if let Err(error) = synced {
                            debug!(%error, "the outbox sync failed; it is tried again");
                        }
                    });
                }
                Some(_) if awaits_durability => {}
                _ => awaiting_durability_since = awaits_durability.then_some(now),
            }
            for (destination, rewind, batches) in plans {
                let link = links.get_mut(&destination).expect("listed above");
                if rewind {
                    link.rewound(now);
                }
                for batch in batches {
                    let (first, last) = (batch[0].0, batch[batch.len() - 1].0);
                    link.started(first, last, now);
                    let node = self.clone();
                    let task = calls.spawn(async move {
                        let Some(delivered) = node.deliver(&batch).await else { return false };
                        if !delivered.is_empty() {
                            tandem::crash::point("relay-delivered");
                            let forgotten = node
                                .apply(delivered.len(), |core, _| Ok(((), core.outbox_delivered(&delivered))))
                                .await;
                            if let Err(error) = forgotten {
                                warn!(%error, "could not forget delivered events; they will be redelivered");
                            }
                        }
                        true
                    });
                    calling.insert(task.id(), (destination.clone(), first));
                }
            }
        }
    }

    /// Delivers events to one peer in one call (`DeliverEvents`); returns
    /// the sequences of those it applied (now or before), or `None` if the
    /// peer did not answer within the deadline, could not be reached, or
    /// answered something other than a result per event.
    async fn deliver(&self, batch: &[(u64, Event)]) -> Option<Vec<u64>> {
        let destination = batch[0].1.destination();
        let Some(peer) = self.inner.peers.get(destination) else {
            warn!(%destination, "no peer by that name; its events wait");
            return None;
        };
        let events = batch.iter().map(|(_, event)| event_to_pb(event)).collect();
        let mut request = Request::new(pb::DeliverEventsRequest { events });
        request.set_timeout(Duration::from_millis(DELIVERY_TIMEOUT_MS));
        match tokio::time::timeout(Duration::from_millis(DELIVERY_TIMEOUT_MS), peer.clone().deliver_events(request))
            .await
        {
            Ok(Ok(response)) if response.get_ref().results.len() == batch.len() => Some(
                batch
                    .iter()
                    .zip(response.into_inner().results)
                    .filter_map(|((seq, event), result)| {
                        if !result.delivered {
                            debug!(event = %event.id, error = %result.error, "event not delivered; will retry");
                        }
                        result.delivered.then_some(*seq)
                    })
                    .collect(),
            ),
            Ok(Ok(_)) => {
                warn!(%destination, "a peer answered a different number of results; the events will be redelivered");
                None
            }
            Ok(Err(status)) => {
                debug!(%destination, count = batch.len(), error = %status.message(), "events not delivered; will retry");
                None
            }
            Err(_) => {
                debug!(%destination, count = batch.len(), "delivery timed out; will retry");
                None
            }
        }
    }

    fn notify_terminal(&self, saga: &Id) {
        let waiters = self.inner.transfer_waiters.lock().expect("waiters lock poisoned").remove(saga);
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(());
        }
    }

    fn transfer_status(&self, saga: &Id) -> Result<pb::TransferStatus, Error> {
        let core = self.core()?;
        Ok(transfer_to_pb(saga, core.transfer(saga)))
    }
}

fn transfer_to_pb(saga: &Id, transfer: Option<&Transfer>) -> pb::TransferStatus {
    let (state, reason) = match transfer.map(|t| &t.state) {
        None => (pb::TransferState::Unknown, String::new()),
        Some(TransferState::Debited) => (pb::TransferState::Debited, String::new()),
        Some(TransferState::Completed) => (pb::TransferState::Completed, String::new()),
        Some(TransferState::Rejected(r)) => (pb::TransferState::Rejected, r.clone()),
        Some(TransferState::Compensated(r)) => (pb::TransferState::Compensated, r.clone()),
        Some(TransferState::DeadLettered(r)) => (pb::TransferState::DeadLettered, r.clone()),
        Some(TransferState::Resolved(r)) => (pb::TransferState::Resolved, r.clone()),
    };
    pb::TransferStatus {
        saga_id: saga.to_string(),
        state: state as i32,
        reason,
        terminal: transfer.is_some_and(|t| t.state.is_terminal()),
    }
}

pub fn event_to_pb(event: &Event) -> pb::ChoreographyEvent {
    pb::ChoreographyEvent {
        version: event.version,
        event_id: event.id.clone(),
        kind: match event.kind {
            EventKind::TransferDebited => pb::EventKind::TransferDebited,
            EventKind::TransferCredited => pb::EventKind::TransferCredited,
            EventKind::TransferRejected => pb::EventKind::TransferRejected,
        } as i32,
        saga_id: event.saga.to_string(),
        from_account: event.from,
        to_account: event.to,
        amount: event.amount,
        source_participant: event.source.to_string(),
        target_participant: event.target.to_string(),
        reason: event.reason.clone(),
        sequence: event.seq,
        trace_parent: event.trace_parent.clone(),
    }
}

/// Reads an event of any schema version whose kind this node knows, and
/// checks it as the core will ([`Event::check`]: ids, amount, reason
/// length).
pub fn event_from_pb(event: &pb::ChoreographyEvent) -> Result<Event, Error> {
    let kind = match pb::EventKind::try_from(event.kind) {
        Ok(pb::EventKind::TransferDebited) => EventKind::TransferDebited,
        Ok(pb::EventKind::TransferCredited) => EventKind::TransferCredited,
        Ok(pb::EventKind::TransferRejected) => EventKind::TransferRejected,
        _ => {
            return Err(Error::InvalidInput(format!(
                "event {} has kind {} (version {}), which this node does not know",
                event.event_id, event.kind, event.version
            )))
        }
    };
    let event = Event {
        version: event.version,
        id: event.event_id.clone(),
        kind,
        saga: Id::parse("saga_id", &event.saga_id)?,
        from: event.from_account,
        to: event.to_account,
        amount: event.amount,
        source: Id::parse("source_participant", &event.source_participant)?,
        target: Id::parse("target_participant", &event.target_participant)?,
        reason: event.reason.clone(),
        seq: event.sequence,
        // Advisory: an oversized one is dropped, never refused.
        trace_parent: if event.trace_parent.len() <= tandem::trace::TRACE_PARENT_LEN_MAX {
            event.trace_parent.clone()
        } else {
            String::new()
        },
    };
    event.check()?;
    Ok(event)
}

/// A numbered event is taken only from the peer that numbered it (the
/// caller's certificate names it, when the node checks certificates): one
/// peer must not be able to mark another's numbers as applied here.
fn sent_by_caller(event: Event, caller: Option<&Id>) -> Result<Event, Error> {
    match caller {
        Some(caller) if event.seq != 0 && event.sender() != caller => Err(Error::InvalidInput(format!(
            "event {} is numbered by {}, but {caller} sent it; a peer delivers only its own events",
            event.id,
            event.sender()
        ))),
        _ => Ok(event),
    }
}

/// One span per event received, named by what it makes this node do
/// (`choreography credit` for a debit, `choreography complete` for a
/// credit, `choreography refund` for a rejection), under the context the
/// event carried; each event then carries its span's context instead, so
/// the answer the core writes for a debit hangs under it. None when this
/// process does not export traces.
fn event_spans(events: &mut [Result<Event, Error>]) -> Vec<Span> {
    if !tandem::trace::on() {
        return Vec::new();
    }
    let mut spans = Vec::with_capacity(events.len());
    for event in events.iter_mut().flatten() {
        let name = match event.kind {
            EventKind::TransferDebited => "choreography credit",
            EventKind::TransferCredited => "choreography complete",
            EventKind::TransferRejected => "choreography refund",
        };
        let span = tandem::trace::remote_child(name, event.saga.as_str(), &event.trace_parent);
        event.trace_parent = tandem::trace::traceparent(&span);
        spans.push(span);
    }
    spans
}

/// One span `name` per item of a batch call, each under the trace context
/// its item carried (none when this process does not export traces).
fn item_spans<'a>(name: &str, items: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<Span> {
    if !tandem::trace::on() {
        return Vec::new();
    }
    items.map(|(txn, trace_parent)| tandem::trace::remote_child(name, txn, trace_parent)).collect()
}

/// A span per saga step, under the coordinator's span of it (none when
/// this process does not export).
fn step_spans(steps: &[pb::SagaStepRequest]) -> Vec<Span> {
    if !tandem::trace::on() {
        return Vec::new();
    }
    steps
        .iter()
        .map(|step| {
            let name = tandem::trace::saga_step_name(step.kind, step.phase);
            tandem::trace::remote_child(name, &step.saga_id, &step.trace_parent)
        })
        .collect()
}

fn parse_prepare(request: &pb::PrepareRequest) -> Result<StampedRequest, Error> {
    parse_stamped(
        &request.txn_id,
        &request.coordinator_id,
        &request.legs,
        request.coordinator_incarnation,
        request.position,
        request.low_watermark,
        &request.idempotency_key,
    )
}

fn parse_one_phase(request: &pb::OnePhaseRequest) -> Result<StampedRequest, Error> {
    parse_stamped(
        &request.txn_id,
        &request.coordinator_id,
        &request.legs,
        request.coordinator_incarnation,
        request.position,
        request.low_watermark,
        &request.idempotency_key,
    )
}

/// The fields a Prepare and a one-phase commit share, parsed.
fn parse_stamped(
    txn_id: &str,
    coordinator_id: &str,
    legs: &[pb::Leg],
    incarnation: u64,
    position: u64,
    low_watermark: u64,
    idempotency_key: &str,
) -> Result<StampedRequest, Error> {
    Ok((
        Id::parse("txn_id", txn_id)?,
        Id::parse("coordinator_id", coordinator_id)?,
        legs.iter().map(Leg::from).collect(),
        Stamp {
            incarnation,
            position,
            low_watermark,
            idempotency_key: match idempotency_key {
                "" => None,
                key => Some(Id::parse("idempotency_key", key)?),
            },
        },
    ))
}

fn one_phase_to_pb(answer: OnePhaseAnswer) -> pb::OnePhaseResponse {
    let duplicate = answer.duplicate;
    match answer.outcome {
        OnePhaseOutcome::Committed => pb::OnePhaseResponse {
            outcome: pb::OnePhaseOutcome::Committed as i32,
            duplicate,
            ..Default::default()
        },
        // The refusal's text is the earlier transaction's id (see the refusal).
        OnePhaseOutcome::Refused(Refusal::KeyOfLostIncarnation, earlier) => pb::OnePhaseResponse {
            outcome: pb::OnePhaseOutcome::Refused as i32,
            refusal: pb::Refusal::KeyOfLostIncarnation as i32,
            reason: format!(
                "the idempotency key is held here by {earlier}, a transaction of an earlier incarnation of the coordinator (orphaned, or decided by an operator)"
            ),
            earlier_txn_id: earlier,
            duplicate,
        },
        OnePhaseOutcome::Refused(refusal, reason) => pb::OnePhaseResponse {
            outcome: pb::OnePhaseOutcome::Refused as i32,
            refusal: refusal_to_pb(refusal) as i32,
            reason,
            earlier_txn_id: String::new(),
            duplicate,
        },
    }
}

/// The coordinator a decision names, if it names one.
fn parse_optional_coordinator(text: &str) -> Result<Option<Id>, Error> {
    if text.is_empty() {
        return Ok(None);
    }
    Id::parse("coordinator_id", text).map(Some)
}

type ParsedStep = (Id, StepKind, StepPhase, AccountId, Amount, Option<StepOrder>);

fn parse_step(request: pb::SagaStepRequest) -> Result<ParsedStep, Error> {
    let saga = Id::parse("saga_id", &request.saga_id)?;
    let kind = match pb::StepKind::try_from(request.kind) {
        Ok(pb::StepKind::Debit) => StepKind::Debit,
        Ok(pb::StepKind::Credit) => StepKind::Credit,
        Ok(pb::StepKind::Release) => StepKind::Release,
        _ => return Err(Error::InvalidInput(format!("unknown step kind {}", request.kind))),
    };
    let phase = match pb::StepPhase::try_from(request.phase) {
        Ok(pb::StepPhase::Action) => StepPhase::Action,
        Ok(pb::StepPhase::Compensation) => StepPhase::Compensation,
        Ok(pb::StepPhase::CompensateToSuspense) => StepPhase::CompensateToSuspense,
        _ => return Err(Error::InvalidInput(format!("unknown step phase {}", request.phase))),
    };
    // What the step says of its orchestrator (empty: an older coordinator).
    let order = if request.coordinator_id.is_empty() {
        None
    } else {
        Some(StepOrder {
            coordinator: Id::parse("coordinator_id", &request.coordinator_id)?,
            incarnation: request.coordinator_incarnation,
            position: request.position,
            low_watermark: request.low_watermark,
        })
    };
    Ok((saga, kind, phase, request.account, request.amount, order))
}

fn step_answer_to_pb(answer: StepAnswer) -> pb::SagaStepResponse {
    let (outcome, refusal, reason) = match answer.outcome {
        StepOutcome::Applied => (pb::StepOutcome::Applied, None, String::new()),
        StepOutcome::Refused(refusal, reason) => (pb::StepOutcome::Refused, refusal, reason),
        StepOutcome::EmptyCompensation => (pb::StepOutcome::EmptyCompensation, None, String::new()),
        StepOutcome::HangingIgnored => (pb::StepOutcome::HangingIgnored, None, String::new()),
    };
    let refusal = refusal.map_or(pb::Refusal::Unspecified, refusal_to_pb);
    pb::SagaStepResponse { outcome: outcome as i32, reason, duplicate: answer.duplicate, refusal: refusal as i32 }
}

/// A `DecisionBatchRequest`'s ids, coordinator and stamp (for CommitBatch,
/// and for the COMMITs riding on a PrepareBatch).
fn parse_decision_batch(request: &pb::DecisionBatchRequest) -> Result<(Vec<TxnId>, Option<Id>, Stamp), Error> {
    check_batch_len("txn_ids", request.txn_ids.len(), COMMIT_BATCH_MAX)?;
    let txns = request.txn_ids.iter().map(|id| Id::parse("txn_ids", id)).collect::<Result<Vec<_>, _>>()?;
    let coordinator = parse_optional_coordinator(&request.coordinator_id)?;
    let stamp = Stamp {
        incarnation: request.coordinator_incarnation,
        position: 0,
        low_watermark: request.low_watermark,
        idempotency_key: None,
    };
    Ok((txns, coordinator, stamp))
}

/// A `commit` span per id of a `DecisionBatchRequest` that carries one
/// context per id; none for a mismatched list (ignored, never refused).
fn decision_spans(request: &pb::DecisionBatchRequest) -> Vec<Span> {
    if request.trace_parents.len() == request.txn_ids.len() {
        item_spans("commit", request.txn_ids.iter().zip(&request.trace_parents))
    } else {
        Vec::new()
    }
}

/// A PrepareBatch's votes; a malformed prepare's is NO with
/// REFUSAL_INVALID_REQUEST and the reason.
fn votes_to_pb(votes: Vec<Result<Vote, Error>>) -> Vec<pb::PrepareResponse> {
    votes
        .into_iter()
        .map(|vote| match vote {
            Ok(vote) => vote_to_pb(vote),
            Err(error) => pb::PrepareResponse {
                vote: pb::Vote::No as i32,
                refusal: pb::Refusal::InvalidRequest as i32,
                reason: error.to_string(),
                earlier_txn_id: String::new(),
            },
        })
        .collect()
}

fn vote_to_pb(vote: Vote) -> pb::PrepareResponse {
    match vote {
        Vote::Yes => pb::PrepareResponse {
            vote: pb::Vote::Yes as i32,
            refusal: 0,
            reason: String::new(),
            earlier_txn_id: String::new(),
        },
        // The vote's text is the earlier transaction's id (see the refusal).
        Vote::No(Refusal::KeyOfLostIncarnation, earlier) => pb::PrepareResponse {
            vote: pb::Vote::No as i32,
            refusal: pb::Refusal::KeyOfLostIncarnation as i32,
            reason: format!(
                "the idempotency key is held here by {earlier}, a transaction of an earlier incarnation of the coordinator (orphaned, or decided by an operator)"
            ),
            earlier_txn_id: earlier,
        },
        Vote::No(refusal, reason) => pb::PrepareResponse {
            vote: pb::Vote::No as i32,
            refusal: refusal_to_pb(refusal) as i32,
            reason,
            earlier_txn_id: String::new(),
        },
    }
}

fn refusal_to_pb(refusal: Refusal) -> pb::Refusal {
    match refusal {
        Refusal::InsufficientFunds => pb::Refusal::InsufficientFunds,
        Refusal::UnknownAccount => pb::Refusal::UnknownAccount,
        Refusal::BalanceOverflow => pb::Refusal::BalanceOverflow,
        Refusal::AlreadyAborted => pb::Refusal::AlreadyAborted,
        Refusal::UnknownCoordinator => pb::Refusal::UnknownCoordinator,
        Refusal::ConflictingPrepare => pb::Refusal::ConflictingPrepare,
        Refusal::AccountClosed => pb::Refusal::AccountClosed,
        Refusal::Late => pb::Refusal::Late,
        Refusal::KeyOfLostIncarnation => pb::Refusal::KeyOfLostIncarnation,
        Refusal::ProtocolMismatch => pb::Refusal::ProtocolMismatch,
    }
}

fn prepared_to_pb(core: &Core, id: &TxnId, txn: &crate::core::Txn, now_ms: u64) -> pb::PreparedTransfer {
    pb::PreparedTransfer {
        txn_id: id.to_string(),
        coordinator_id: txn.coordinator.to_string(),
        legs: txn.legs.iter().copied().map(pb::Leg::from).collect(),
        prepared_for_ms: now_ms.saturating_sub(txn.prepared_at_ms),
        orphaned: core.is_orphan(txn),
        coordinator_incarnation: txn.incarnation,
        position: txn.position,
    }
}

fn heuristic_to_pb(id: &TxnId, txn: &crate::core::Txn, now_ms: u64) -> pb::HeuristicDecision {
    let heuristic = txn.heuristic.as_ref();
    let state = match heuristic {
        Some(h) if h.mixed() => pb::HeuristicState::Mixed,
        Some(h) if h.coordinator_said.is_some() => pb::HeuristicState::Confirmed,
        _ => pb::HeuristicState::Decided,
    };
    pb::HeuristicDecision {
        txn_id: id.to_string(),
        coordinator_id: txn.coordinator.to_string(),
        coordinator_incarnation: txn.incarnation,
        committed: heuristic.is_some_and(|h| h.applied == Decided::Commit),
        reason: heuristic.map(|h| h.reason.clone()).unwrap_or_default(),
        state: state as i32,
        legs: txn.legs.iter().copied().map(pb::Leg::from).collect(),
        decided_ms_ago: now_ms.saturating_sub(heuristic.map_or(now_ms, |h| h.at_ms)),
    }
}

fn balance_to_pb(account: AccountId, balance: &crate::core::Account) -> pb::Balance {
    pb::Balance {
        account,
        posted: balance.posted,
        reserved: balance.reserved,
        incoming: balance.incoming,
        available: balance.available(),
        closed: balance.closed,
    }
}

#[tonic::async_trait]
impl Participant for Node {
    async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        let span = tandem::trace::remote_child("prepare", &request.txn_id, &request.trace_parent);
        let (txn, coordinator, legs, stamp) = parse_prepare(&request)?;
        debug!(%txn, %coordinator, ?legs, ?stamp, "prepare received");
        let vote = Node::prepare(self, txn.clone(), coordinator, legs, stamp, std::slice::from_ref(&span))
            .instrument(span.clone())
            .await?;
        debug!(%txn, ?vote, "prepare answered");
        Ok(Response::new(vote_to_pb(vote)))
    }

    async fn prepare_batch(
        &self,
        request: Request<pb::PrepareBatchRequest>,
    ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
        let pb::PrepareBatchRequest { prepares, commits } = request.into_inner();
        check_batch_len("prepares", prepares.len(), PREPARE_BATCH_MAX)?;
        let parsed: Vec<Result<StampedRequest, Error>> = prepares.iter().map(parse_prepare).collect();
        let mut spans = item_spans("prepare", prepares.iter().map(|p| (&p.txn_id, &p.trace_parent)));
        let count = parsed.len();
        // A malformed commit list refuses the commits, not the prepares.
        let (riding, malformed) = match commits.as_ref().map(parse_decision_batch) {
            None => (None, None),
            Some(Ok(riding)) => (Some(riding), None),
            Some(Err(error)) => (None, Some(error)),
        };
        if let Some(commits) = &commits {
            spans.extend(decision_spans(commits));
        }
        let riding = riding.as_ref().map(|(txns, coordinator, stamp)| (&txns[..], coordinator.as_ref(), stamp.clone()));
        let (committed, votes) = Node::commit_then_prepare_batch(self, riding, parsed, &spans).await?;
        let mut response = pb::PrepareBatchResponse { votes: votes_to_pb(votes), ..Default::default() };
        match malformed.map_or(committed, Err) {
            Ok(()) if commits.is_some() => tandem::crash::point("commit-applied"),
            Ok(()) => {}
            Err(error) => {
                let status = Status::from(error);
                debug!(code = ?status.code(), error = %status.message(), "commits riding on prepares refused");
                response.commits_refused_code = status.code() as i32;
                response.commits_refused_reason = status.message().to_string();
            }
        }
        debug!(count, "prepare batch answered");
        Ok(Response::new(response))
    }

    async fn commit_one_phase(
        &self,
        request: Request<pb::OnePhaseRequest>,
    ) -> Result<Response<pb::OnePhaseResponse>, Status> {
        let request = request.into_inner();
        let span = tandem::trace::remote_child("commit one phase", &request.txn_id, &request.trace_parent);
        let (txn, coordinator, legs, stamp) = parse_one_phase(&request)?;
        debug!(%txn, %coordinator, ?legs, ?stamp, "one-phase commit received");
        let answer = Node::commit_one_phase(self, txn.clone(), coordinator, legs, stamp, std::slice::from_ref(&span))
            .instrument(span.clone())
            .await?;
        tandem::crash::point("one-phase-applied");
        debug!(%txn, ?answer, "one-phase commit answered");
        Ok(Response::new(one_phase_to_pb(answer)))
    }

    async fn commit_one_phase_batch(
        &self,
        request: Request<pb::OnePhaseBatchRequest>,
    ) -> Result<Response<pb::OnePhaseBatchResponse>, Status> {
        let requests = request.into_inner().requests;
        check_batch_len("requests", requests.len(), ONE_PHASE_BATCH_MAX)?;
        let parsed: Vec<Result<StampedRequest, Error>> = requests.iter().map(parse_one_phase).collect();
        let spans = item_spans("commit one phase", requests.iter().map(|r| (&r.txn_id, &r.trace_parent)));
        let count = parsed.len();
        let answers = Node::commit_one_phase_batch(self, parsed, &spans)
            .await?
            .into_iter()
            .map(|answer| match answer {
                Ok(answer) => one_phase_to_pb(answer),
                Err(error) => pb::OnePhaseResponse {
                    outcome: pb::OnePhaseOutcome::Refused as i32,
                    refusal: pb::Refusal::InvalidRequest as i32,
                    reason: error.to_string(),
                    ..Default::default()
                },
            })
            .collect();
        tandem::crash::point("one-phase-applied");
        debug!(count, "one-phase batch answered");
        Ok(Response::new(pb::OnePhaseBatchResponse { answers }))
    }

    async fn commit(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
        let request = request.into_inner();
        let span = tandem::trace::remote_child("commit", &request.txn_id, &request.trace_parent);
        let txn = Id::parse("txn_id", &request.txn_id)?;
        Node::commit(self, &txn).instrument(span).await?;
        tandem::crash::point("commit-applied");
        debug!(%txn, "commit acknowledged");
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn commit_batch(
        &self,
        request: Request<pb::DecisionBatchRequest>,
    ) -> Result<Response<pb::DecisionResponse>, Status> {
        let request = request.into_inner();
        let (txns, coordinator, stamp) = parse_decision_batch(&request)?;
        let spans = decision_spans(&request);
        Node::commit_batch(self, &txns, coordinator.as_ref(), stamp, &spans).await?;
        tandem::crash::point("commit-applied");
        debug!(count = txns.len(), first = ?txns.first(), "commit batch acknowledged");
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn abort(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
        let request = request.into_inner();
        let span = tandem::trace::remote_child("abort", &request.txn_id, &request.trace_parent);
        let txn = Id::parse("txn_id", &request.txn_id)?;
        let coordinator = parse_optional_coordinator(&request.coordinator_id)?;
        let stamp = Stamp {
            incarnation: request.coordinator_incarnation,
            position: request.position,
            low_watermark: 0,
            idempotency_key: None,
        };
        self.apply_traced(std::slice::from_ref(&span), OPS_PER_CALL_MAX + 1, |core, now| {
            Ok(((), core.abort_stamped(&txn, coordinator.as_ref(), stamp, now)?))
        })
        .instrument(span.clone())
        .await?;
        debug!(%txn, "abort acknowledged");
        Ok(Response::new(pb::DecisionResponse {}))
    }

    async fn open_accounts(
        &self,
        request: Request<pb::OpenAccountsRequest>,
    ) -> Result<Response<pb::OpenAccountsResponse>, Status> {
        let accounts: Vec<(AccountId, Amount)> =
            request.into_inner().accounts.iter().map(|a| (a.account, a.initial_balance)).collect();
        let count = accounts.len();
        self.apply(count, |core, _| Ok(((), core.open_accounts(&accounts)?))).await?;
        info!(count, "accounts opened");
        Ok(Response::new(pb::OpenAccountsResponse { opened: count as u32 }))
    }

    async fn get_balance(&self, request: Request<pb::GetBalanceRequest>) -> Result<Response<pb::Balance>, Status> {
        let account = request.into_inner().account;
        let balance = self.core()?.account(account)?;
        Ok(Response::new(balance_to_pb(account, &balance)))
    }

    async fn read_balances(
        &self,
        request: Request<pb::ReadBalancesRequest>,
    ) -> Result<Response<pb::ReadBalancesResponse>, Status> {
        let request = request.into_inner();
        let include_accounts = request.include_accounts;
        let now = self.now_ms();
        let core = self.core()?;
        if request.include_prepared && core.prepared_count() > READ_PREPARED_MAX {
            return Err(Error::FailedPrecondition(format!(
                "{} holds {} prepared transactions; a balance read lists at most {READ_PREPARED_MAX}",
                self.inner.node_id,
                core.prepared_count()
            ))
            .into());
        }
        let mut response = pb::ReadBalancesResponse {
            participant_id: self.inner.node_id.to_string(),
            account_count: core.accounts().len() as u64,
            prepared_count: core.prepared_count() as u64,
            suspense: core.suspense(),
            transfers_in_flight: core.transfers_in_flight() as u64,
            outbox_pending: core.outbox_len() as u64,
            saga_barriers: core.barrier_count() as u64,
            orphaned_count: core.orphan_count() as u64,
            heuristic_mixed_count: core
                .heuristic_decisions()
                .iter()
                .filter(|(_, txn)| txn.heuristic.as_ref().is_some_and(|h| h.mixed()))
                .count() as u64,
            ..Default::default()
        };
        let excess = core.heuristic_excess();
        response.heuristic_excess = crate::core::heuristic::excess_total(&excess).ok_or_else(|| {
            Error::OutOfRange(format!(
                "the heuristic_excess of {} is {}, beyond an int64",
                self.inner.node_id,
                excess.values().sum::<i128>()
            ))
        })?;
        // Summed exactly: a total that does not fit its int64 field is
        // OUT_OF_RANGE, never a wrapped figure (see `ReadBalances`).
        let mut posted = tandem::domain::Total::default();
        let (mut reserved, mut incoming) = (posted, posted);
        for (id, account) in core.accounts() {
            posted.add(account.posted);
            reserved.add(account.reserved);
            incoming.add(account.incoming);
            if include_accounts {
                response.accounts.push(balance_to_pb(*id, account));
            }
        }
        let node = &self.inner.node_id;
        response.total_posted = posted.to_amount(format_args!("the total_posted of {node}"))?;
        response.total_reserved = reserved.to_amount(format_args!("the total_reserved of {node}"))?;
        response.total_incoming = incoming.to_amount(format_args!("the total_incoming of {node}"))?;
        // Under the same lock as the balances: one instant.
        if request.include_prepared {
            response.prepared =
                core.prepared().into_iter().map(|(id, txn)| prepared_to_pb(&core, id, txn, now)).collect();
        }
        Ok(Response::new(response))
    }

    async fn list_prepared(
        &self,
        request: Request<pb::ListPreparedRequest>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
        let limit = match request.into_inner().limit as usize {
            0 => LIST_PREPARED_MAX,
            n => n.min(LIST_PREPARED_MAX),
        };
        let now = self.now_ms();
        let core = self.core()?;
        let total = core.prepared_count() as u64;
        let prepared = core
            .prepared_at_most(limit)
            .into_iter()
            .map(|(id, txn)| {
                debug_assert_eq!(txn.state, TxnState::Prepared);
                prepared_to_pb(&core, id, txn, now)
            })
            .collect();
        let heuristic =
            core.heuristic_decisions().into_iter().take(limit).map(|(id, txn)| heuristic_to_pb(id, txn, now)).collect();
        Ok(Response::new(pb::ListPreparedResponse {
            prepared,
            total,
            longest_in_doubt_ms: core.longest_in_doubt_ms,
            orphaned: core.orphan_count() as u64,
            heuristic,
        }))
    }

    async fn get_health(&self, _request: Request<pb::GetHealthRequest>) -> Result<Response<pb::NodeHealth>, Status> {
        Ok(Response::new(self.health()?))
    }

    async fn lookup_transaction(
        &self,
        request: Request<pb::LookupTransactionRequest>,
    ) -> Result<Response<pb::TransactionRecord>, Status> {
        let txn = Id::parse("txn_id", &request.into_inner().txn_id)?;
        let now = self.now_ms();
        let core = self.core()?;
        let Some(record) = core.txn(&txn) else {
            return Ok(Response::new(pb::TransactionRecord {
                txn_id: txn.to_string(),
                state: pb::RecordState::Unknown as i32,
                ..Default::default()
            }));
        };
        let state = match record.state {
            TxnState::Prepared => pb::RecordState::Prepared,
            TxnState::Committed => pb::RecordState::Committed,
            TxnState::Aborted => pb::RecordState::Aborted,
        };
        Ok(Response::new(pb::TransactionRecord {
            txn_id: txn.to_string(),
            state: state as i32,
            coordinator_id: record.coordinator.to_string(),
            coordinator_incarnation: record.incarnation,
            position: record.position,
            orphaned: core.is_orphan(record),
            heuristic: record.heuristic.as_ref().map(|_| heuristic_to_pb(&txn, record, now)),
            one_phase: record.one_phase.is_some(),
        }))
    }

    async fn resolve_in_doubt(
        &self,
        request: Request<pb::ResolveInDoubtRequest>,
    ) -> Result<Response<pb::HeuristicDecision>, Status> {
        let request = request.into_inner();
        let txn = Id::parse("txn_id", &request.txn_id)?;
        tandem::domain::check_text_len("reason", &request.reason, tandem::domain::REASON_STORED_LEN_MAX)?;
        let decided = if request.commit { Decided::Commit } else { Decided::Abort };
        self.apply(OPS_PER_CALL_MAX, |core, now| {
            Ok(((), core.resolve_heuristically(&txn, decided, &request.reason, now)?))
        })
        .await?;
        let now = self.now_ms();
        let core = self.core()?;
        let record =
            core.txn(&txn).ok_or_else(|| Error::Fatal(format!("{txn} vanished after its heuristic decision")))?;
        Ok(Response::new(heuristic_to_pb(&txn, record, now)))
    }

    async fn set_account_closed(
        &self,
        request: Request<pb::SetAccountClosedRequest>,
    ) -> Result<Response<pb::Balance>, Status> {
        let request = request.into_inner();
        let account = self.apply(1, |core, _| core.set_closed(request.account, request.closed)).await?;
        info!(account = request.account, closed = request.closed, "account closed flag set");
        Ok(Response::new(balance_to_pb(request.account, &account)))
    }

    async fn saga_step(&self, request: Request<pb::SagaStepRequest>) -> Result<Response<pb::SagaStepResponse>, Status> {
        let request = request.into_inner();
        let spans = step_spans(std::slice::from_ref(&request));
        let step = parse_step(request)?;
        let saga = step.0.clone();
        let answer = self
            .apply_traced(&spans, 4, |core, now| {
                let (saga, kind, phase, account, amount, order) = step;
                core.saga_step_ordered(saga, kind, phase, account, amount, order, now)
            })
            .await?;
        tandem::crash::point("saga-step-written");
        debug!(%saga, ?answer, "saga step answered");
        Ok(Response::new(step_answer_to_pb(answer)))
    }

    async fn saga_step_batch(
        &self,
        request: Request<pb::SagaStepBatchRequest>,
    ) -> Result<Response<pb::SagaStepBatchResponse>, Status> {
        let steps = request.into_inner().steps;
        check_batch_len("steps", steps.len(), SAGA_STEP_BATCH_MAX)?;
        let count = steps.len();
        let spans = step_spans(&steps);
        let parsed: Vec<Result<ParsedStep, Error>> = steps.into_iter().map(parse_step).collect();
        let answers = self
            .apply_each(&spans, parsed, 4, |core, (saga, kind, phase, account, amount, order), now| {
                core.saga_step_ordered(saga, kind, phase, account, amount, order, now)
            })
            .await?;
        tandem::crash::point("saga-step-written");
        let results = answers
            .into_iter()
            .map(|answer| match answer.map_err(Status::from) {
                Ok(answer) => pb::SagaStepResult {
                    response: Some(step_answer_to_pb(answer)),
                    error_code: 0,
                    error: String::new(),
                },
                Err(status) => pb::SagaStepResult {
                    response: None,
                    error_code: status.code() as i32,
                    error: status.message().to_string(),
                },
            })
            .collect();
        debug!(count, "saga step batch answered");
        Ok(Response::new(pb::SagaStepBatchResponse { results }))
    }

    async fn list_parked_transfers(
        &self,
        request: Request<pb::ListParkedTransfersRequest>,
    ) -> Result<Response<pb::ListParkedTransfersResponse>, Status> {
        let limit = match request.into_inner().limit as usize {
            0 => LIST_PARKED_MAX,
            n => n.min(LIST_PARKED_MAX),
        };
        let core = self.core()?;
        let all = core.parked_transfers();
        let parked = all.iter().take(limit).map(|(saga, t)| transfer_to_pb(saga, Some(t))).collect();
        Ok(Response::new(pb::ListParkedTransfersResponse { parked, total: all.len() as u64 }))
    }

    async fn resolve_parked_transfer(
        &self,
        request: Request<pb::ResolveParkedTransferRequest>,
    ) -> Result<Response<pb::TransferStatus>, Status> {
        let decision = tandem::trust::operator_decision(request.extensions(), &request.get_ref().reason)?;
        let request = request.into_inner();
        let saga = Id::parse("saga_id", &request.saga_id)?;
        let to = (request.to_account != 0).then_some(request.to_account);
        let resolved = self.apply(3, |core, now| core.resolve_parked_transfer(&saga, to, &decision, now)).await?;
        info!(%saga, %decision, "parked transfer resolved by an operator");
        Ok(Response::new(transfer_to_pb(&saga, Some(&resolved))))
    }

    async fn forget_sagas(
        &self,
        request: Request<pb::ForgetSagasRequest>,
    ) -> Result<Response<pb::ForgetSagasResponse>, Status> {
        let ids = request.into_inner().saga_ids;
        check_batch_len("saga_ids", ids.len(), FORGET_SAGAS_MAX)?;
        let sagas = ids.iter().map(|id| Id::parse("saga_ids", id)).collect::<Result<Vec<_>, _>>()?;
        let marked = self.apply(sagas.len() * 3, |core, now| Ok(core.forget_sagas(&sagas, now))).await?;
        debug!(sagas = sagas.len(), marked, "sagas forgotten");
        Ok(Response::new(pb::ForgetSagasResponse { barriers_marked: marked }))
    }

    async fn start_transfer(
        &self,
        request: Request<pb::StartTransferRequest>,
    ) -> Result<Response<pb::TransferStatus>, Status> {
        // The client's call is the head of the trace (no coordinator): it
        // samples here, as the coordinator does for a Transfer.
        let span = tandem::trace::call_span("choreography debit", tandem::trace::from_metadata(request.metadata()));
        span.record("txn_id", request.get_ref().saga_id.as_str());
        let request = request.into_inner();
        let saga = Id::parse("saga_id", &request.saga_id)?;
        let target = Id::parse("target_participant", &request.target_participant)?;
        if !self.inner.peers.contains_key(&target) {
            return Err(Status::invalid_argument(format!(
                "participant {target} is not a peer of {} (--peer)",
                self.inner.node_id
            )));
        }
        let trace_parent = tandem::trace::traceparent(&span);
        let transfer = self
            .apply_traced(std::slice::from_ref(&span), OPS_PER_CALL_MAX, |core, now| {
                let (from, to, amount) = (request.from_account, request.to_account, request.amount);
                core.start_transfer(saga.clone(), from, to, amount, target, trace_parent, now)
            })
            .instrument(span.clone())
            .await?;
        self.inner.relay_wake.notify_one();
        debug!(%saga, state = ?transfer.state, "transfer started");
        let wait_ms = request.wait_ms.min(TRANSFER_WAIT_MAX_MS);
        if wait_ms > 0 && !transfer.state.is_terminal() {
            // Checked and registered under the core lock, so the terminal
            // state cannot slip in between.
            let waiting = {
                let core = self.core()?;
                if core.transfer(&saga).is_some_and(|t| t.state.is_terminal()) {
                    None
                } else {
                    let (notify, notified) = oneshot::channel();
                    self.inner
                        .transfer_waiters
                        .lock()
                        .expect("waiters lock poisoned")
                        .entry(saga.clone())
                        .or_default()
                        .push(notify);
                    Some(notified)
                }
            };
            if let Some(notified) = waiting {
                let _ = tokio::time::timeout(Duration::from_millis(wait_ms as u64), notified).await;
            }
        }
        Ok(Response::new(self.transfer_status(&saga)?))
    }

    async fn get_transfer_status(
        &self,
        request: Request<pb::GetTransferStatusRequest>,
    ) -> Result<Response<pb::TransferStatus>, Status> {
        let saga = Id::parse("saga_id", &request.into_inner().saga_id)?;
        Ok(Response::new(self.transfer_status(&saga)?))
    }

    async fn deliver_events(
        &self,
        request: Request<pb::DeliverEventsRequest>,
    ) -> Result<Response<pb::DeliverEventsResponse>, Status> {
        let caller = request.extensions().get::<tandem::trust::Caller>().map(|caller| caller.name.clone());
        let events = request.into_inner().events;
        check_batch_len("events", events.len(), DELIVER_EVENTS_MAX)?;
        let count = events.len();
        let mut parsed: Vec<Result<Event, Error>> =
            events.iter().map(|event| event_from_pb(event).and_then(|e| sent_by_caller(e, caller.as_ref()))).collect();
        let spans = event_spans(&mut parsed);
        let applied = self.apply_each(&spans, parsed, 4, |core, event, now| core.deliver_event(event, now)).await?;
        let results = applied
            .into_iter()
            .map(|applied| match applied {
                Ok((duplicate, finished)) => {
                    if let Some(saga) = finished {
                        self.notify_terminal(&saga);
                    }
                    pb::DeliverEventResult { delivered: true, duplicate, error: String::new() }
                }
                Err(error) => pb::DeliverEventResult { delivered: false, duplicate: false, error: error.to_string() },
            })
            .collect();
        debug!(count, "events received");
        self.inner.relay_wake.notify_one();
        Ok(Response::new(pb::DeliverEventsResponse { results }))
    }

    async fn deliver_event(
        &self,
        request: Request<pb::ChoreographyEvent>,
    ) -> Result<Response<pb::DeliverEventResponse>, Status> {
        let caller = request.extensions().get::<tandem::trust::Caller>().map(|caller| caller.name.clone());
        let mut event = [sent_by_caller(event_from_pb(&request.into_inner())?, caller.as_ref())];
        let spans = event_spans(&mut event);
        let [event] = event;
        let event = event?;
        let id = event.id.clone();
        let (duplicate, finished) = self.apply_traced(&spans, 4, |core, now| core.deliver_event(event, now)).await?;
        debug!(event = %id, duplicate, "event received");
        if let Some(saga) = finished {
            self.notify_terminal(&saga);
        }
        self.inner.relay_wake.notify_one();
        Ok(Response::new(pb::DeliverEventResponse { duplicate }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn step_request(coordinator_id: &str, incarnation: u64) -> pb::SagaStepRequest {
        pb::SagaStepRequest {
            saga_id: "s1".into(),
            kind: pb::StepKind::Debit as i32,
            phase: pb::StepPhase::Action as i32,
            account: 1,
            amount: 5,
            coordinator_id: coordinator_id.into(),
            coordinator_incarnation: incarnation,
            position: 3,
            low_watermark: 2,
            trace_parent: String::new(),
        }
    }

    #[test]
    fn a_step_carries_its_order_when_it_names_a_coordinator_and_none_when_it_does_not() {
        let (.., order) = parse_step(step_request("c1", 7)).unwrap();
        let c1 = Id::parse("c", "c1").unwrap();
        assert_eq!(order, Some(StepOrder { coordinator: c1, incarnation: 7, position: 3, low_watermark: 2 }));
        let (.., order) = parse_step(step_request("", 0)).unwrap();
        assert_eq!(order, None, "an older coordinator: today's rules");
        assert!(matches!(parse_step(step_request("not an id", 7)), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn a_numbered_event_is_taken_only_from_the_peer_that_numbered_it() {
        let event = |seq| Event {
            version: 1,
            id: "s1:debited".into(),
            kind: EventKind::TransferDebited,
            saga: Id::parse("s", "s1").unwrap(),
            from: 1,
            to: 2,
            amount: 5,
            source: Id::parse("p", "p1").unwrap(),
            target: Id::parse("p", "p2").unwrap(),
            reason: String::new(),
            seq,
            trace_parent: String::new(),
        };
        let (p1, p3) = (Id::parse("p", "p1").unwrap(), Id::parse("p", "p3").unwrap());
        assert!(sent_by_caller(event(1), Some(&p1)).is_ok());
        assert!(sent_by_caller(event(1), None).is_ok(), "no certificates checked (--insecure)");
        let refused = sent_by_caller(event(1), Some(&p3)).unwrap_err();
        assert!(matches!(&refused, Error::InvalidInput(m) if m.contains("p3") && m.contains("p1")), "{refused:?}");
        assert!(sent_by_caller(event(0), Some(&p3)).is_ok(), "an unnumbered event keeps the old rules");
    }

    /// The whole milliseconds from `now` until `may` says yes.
    fn wait_ms(now: Instant, may: impl Fn(Instant) -> bool) -> u64 {
        (0..=u64::MAX).find(|wait| may(now + ms(*wait))).unwrap()
    }

    #[test]
    fn a_silent_coordinator_gets_one_query_at_a_time_with_a_capped_backoff_and_all_when_it_answers() {
        let mut now = Instant::now();
        let mut link = CoordinatorLink::default();
        assert_eq!(link.may_start(now), QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX);
        for _ in 0..QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX {
            link.started(now);
        }
        assert_eq!(link.may_start(now), 0, "the bound");
        // They time out: no query while any is under way, then one at a time.
        now += ms(QUERY_TIMEOUT_MS);
        for _ in 1..QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX {
            assert!(!link.finished(false, now));
            assert_eq!(link.may_start(now + ms(10 * QUERY_TIMEOUT_MS)), 0, "queries still under way");
        }
        assert!(!link.finished(false, now));
        // It refuses at once (down): probes spaced by a doubling backoff, capped.
        let mut gaps = Vec::new();
        for _ in 0..7 {
            let gap = wait_ms(now, |at| link.may_start(at) > 0);
            gaps.push(gap);
            now += ms(gap);
            assert_eq!(link.may_start(now), 1);
            link.started(now);
            assert_eq!(link.may_start(now + ms(10 * QUERY_TIMEOUT_MS)), 0, "one at a time");
            assert!(!link.finished(false, now));
        }
        assert_eq!(gaps, [100, 200, 400, 800, 1_000, 1_000, 1_000]);
        // Paused instead: each probe lasts its deadline, and the next one
        // may go at once, so one always waits for the coordinator.
        link.started(now);
        now += ms(QUERY_TIMEOUT_MS);
        assert!(!link.finished(false, now));
        assert_eq!(link.may_start(now), 1);
        // It answers: no longer silent, the whole bound again.
        link.started(now);
        assert!(link.finished(true, now), "it answers again");
        assert_eq!(link.may_start(now), QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX);
        link.started(now);
        assert!(!link.finished(true, now), "an answer from an answering coordinator is no news");
    }

    #[test]
    fn a_peer_gets_bounded_calls_one_at_a_time_with_backoff_when_silent_and_refused_events_again_at_a_pace() {
        let mut now = Instant::now();
        let mut link = PeerLink::default();
        assert!(!link.may_rewind(now), "nothing offered yet");
        // Calls take the events after the last call's, up to the bound.
        for call in 0..RELAY_CALLS_PER_PEER_MAX as u64 {
            assert_eq!(link.calls_free(now), RELAY_CALLS_PER_PEER_MAX - call as usize);
            assert_eq!(link.cursor, call * 10);
            link.started(call * 10, call * 10 + 9, now);
        }
        assert_eq!(link.calls_free(now), 0, "the bound");
        assert!(!link.may_rewind(now), "not while calls are under way");
        link.finished(0, true, now);
        assert_eq!((link.calls_free(now), link.cursor), (1, RELAY_CALLS_PER_PEER_MAX as u64 * 10));
        // One gets no answer: its events are offered again, one call at a
        // time once every call is done, after a doubling backoff, capped.
        link.finished(10, false, now);
        assert_eq!(link.cursor, 10);
        assert_eq!(link.calls_free(now + ms(10 * RELAY_BACKOFF_MAX_MS)), 0, "calls still under way");
        for call in 2..RELAY_CALLS_PER_PEER_MAX as u64 {
            link.finished(call * 10, false, now);
        }
        let mut gaps = Vec::new();
        for _ in 0..7 {
            let gap = wait_ms(now, |at| link.calls_free(at) > 0);
            gaps.push(gap);
            now += ms(gap);
            assert_eq!((link.calls_free(now), link.cursor), (1, 10));
            link.started(10, 19, now);
            assert_eq!(link.calls_free(now + ms(10 * RELAY_BACKOFF_MAX_MS)), 0, "one call at a time");
            link.finished(10, false, now);
        }
        assert_eq!(gaps, [50, 100, 200, 400, 800, 1_600, 2_000]);
        // An answer ends the backoff: the whole bound again.
        now += ms(RELAY_BACKOFF_MAX_MS);
        link.started(10, 19, now);
        link.finished(10, true, now);
        assert_eq!((link.calls_free(now), link.cursor), (RELAY_CALLS_PER_PEER_MAX, 20));
        // Events left behind the cursor (refused) are offered again, then
        // not before the retry time.
        assert!(link.may_rewind(now));
        link.rewound(now);
        assert_eq!(link.cursor, 0);
        link.started(3, 29, now);
        link.finished(3, true, now);
        assert!(!link.may_rewind(now + ms(RELAY_REFUSED_RETRY_MS - 1)));
        assert!(link.may_rewind(now + ms(RELAY_REFUSED_RETRY_MS)));
    }
}
