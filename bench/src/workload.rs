//! The bank-transfer workload: which accounts, which amounts, how fast, and
//! what every operation did.
//!
//! Every transfer carries an idempotency key, so that after the run an
//! operation whose outcome the client never learned (the call failed or
//! timed out) can be asked again and get its real outcome: the invariant
//! checker needs every outcome to account for every cent.

/// The response metadata naming the orphan that holds a key (the
/// coordinator's `EARLIER_TXN_METADATA`).
const EARLIER_TXN_METADATA: &str = "tandem-earlier-txn-id";
use crate::scenario::{LoopMode, Protocol, Scenario, Skew};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_client::ParticipantClient;
use tandem::rng::SplitMix64;
use tonic::transport::Channel;

/// Width of one throughput/latency bucket over time.
pub const BUCKET_MS: u64 = 100;
/// Most channels (HTTP/2 connections) the clients share.
pub const CHANNELS_MAX: usize = 8;
/// Clients per channel: the clients share one channel up to this many,
/// as the callers in one gRPC client process share its channel (HTTP/2
/// multiplexes their calls; a server takes some hundreds of streams on one
/// connection at once), and open another per this many beyond. One channel
/// rather than eight for 64 clients: the frames of many calls then go in
/// one read and one write at each end, where eight connections wake their
/// tasks and make their syscalls apart. Measured at 64 clients (`bench run
/// --scenario vs-postgres --cross-share 0.5 --protocol 2pc`, three
/// interleaved runs, 2026-12-03): 1.07 to 1.13 times the throughput of
/// eight channels.
pub const CLIENTS_PER_CHANNEL: usize = 128;

/// What one operation ended as, from the client's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum OpOutcome {
    Committed,
    /// Aborted for lack of funds (expected for overdrafts).
    AbortedInsufficientFunds,
    /// Aborted for another reason (a participant unavailable, ...).
    AbortedOther,
    /// Saga: the credit failed and the debit was refunded.
    Compensated,
    /// Saga: the refund failed; the money is parked in suspense.
    DeadLettered,
    /// The call hit its deadline: outcome unknown until resolved.
    TimedOut,
    /// The call failed (unavailable, ...): outcome unknown until resolved.
    Unknown,
    /// The key belongs to a transaction of a coordinator incarnation whose
    /// log was lost (FAILED_PRECONDITION naming it): the transfer's outcome
    /// is that orphan's, which an operator decides; its id is the entry's
    /// `txn_id`. Unknown until then.
    Orphaned,
    /// Open loop only: not started, too many in flight.
    Dropped,
}

impl OpOutcome {
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            OpOutcome::Committed
                | OpOutcome::AbortedInsufficientFunds
                | OpOutcome::AbortedOther
                | OpOutcome::Compensated
                | OpOutcome::DeadLettered
        )
    }
}

/// One line of the history file.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    pub protocol: Protocol,
    pub client: usize,
    pub key: String,
    pub from: u64,
    pub to: u64,
    pub amount: i64,
    /// Microseconds since the start of the measured run (the intended start
    /// in open loop).
    pub start_us: u64,
    pub end_us: u64,
    pub outcome: OpOutcome,
    pub txn_id: String,
    pub detail: String,
}

/// Chooses accounts and amounts, deterministically from a seed.
pub struct Chooser {
    accounts: u64,
    participants: u64,
    per_participant: u64,
    /// Cumulative weights of the Zipf ranks; empty when uniform.
    zipf_cdf: Vec<f64>,
    amount_min: i64,
    amount_max: i64,
    overdraft_share: f64,
    overdraft_amount: i64,
    /// `None`: both accounts drawn independently (the bench's behaviour
    /// before the knob existed, kept draw for draw).
    cross_share: Option<f64>,
}

impl Chooser {
    pub fn new(scenario: &Scenario) -> Chooser {
        let per_participant = scenario.cluster.accounts_per_participant;
        let participants = scenario.cluster.participants as u64;
        let accounts = per_participant * participants;
        let zipf_cdf = match scenario.workload.skew {
            Skew::Uniform => Vec::new(),
            Skew::Zipf => {
                let mut total = 0.0;
                let mut cdf = Vec::with_capacity(accounts as usize);
                for rank in 1..=accounts {
                    total += 1.0 / (rank as f64).powf(scenario.workload.zipf_exponent);
                    cdf.push(total);
                }
                cdf.iter_mut().for_each(|w| *w /= total);
                cdf
            }
        };
        let total_money = scenario.cluster.initial_balance * accounts as i64;
        Chooser {
            accounts,
            participants,
            per_participant,
            zipf_cdf,
            amount_min: scenario.workload.amount_min,
            amount_max: scenario.workload.amount_max,
            overdraft_share: scenario.workload.overdraft_share,
            overdraft_amount: total_money + 1,
            cross_share: scenario.workload.cross_share,
        }
    }

    /// The participant (0-based) that holds `account`.
    pub fn owner(&self, account: u64) -> u64 {
        account / self.per_participant
    }

    fn account(&self, rng: &mut SplitMix64) -> u64 {
        if self.zipf_cdf.is_empty() {
            return rng.below(self.accounts);
        }
        let u = rng.unit();
        let rank = self.zipf_cdf.partition_point(|w| *w < u) as u64;
        let rank = rank.min(self.accounts - 1);
        // Hot ranks are spread over the participants round-robin.
        (rank % self.participants) * self.per_participant + rank / self.participants
    }

    /// (from, to, amount): two different accounts; with a `cross_share`,
    /// on different participants that often.
    pub fn transfer(&self, rng: &mut SplitMix64) -> (u64, u64, i64) {
        let from = self.account(rng);
        let mut to = self.account(rng);
        if let Some(share) = self.cross_share {
            // Keep `to`'s place within its participant (so a hot rank stays
            // hot under Zipf) and move it to the participant the share asks
            // for: any other one, uniformly, or `from`'s own.
            let cross = rng.unit() < share;
            let (home, index) = (self.owner(from), to % self.per_participant);
            let participant = match (cross, self.owner(to) != home) {
                (true, true) | (false, false) => self.owner(to),
                (true, false) => (home + 1 + rng.below(self.participants - 1)) % self.participants,
                (false, true) => home,
            };
            to = participant * self.per_participant + index;
            if to == from {
                // Same participant, same place: the next account there.
                to = home * self.per_participant + (index + 1) % self.per_participant;
            }
            assert_eq!(self.owner(to) != home, cross, "{from} -> {to} must cross: {cross}");
        } else if to == from {
            to = (from + 1) % self.accounts;
        }
        let amount = if self.overdraft_share > 0.0 && rng.unit() < self.overdraft_share {
            self.overdraft_amount
        } else {
            self.amount_min + rng.below((self.amount_max - self.amount_min + 1) as u64) as i64
        };
        (from, to, amount)
    }
}

/// Latency and outcome records of one client, merged at the end. The
/// timeline (per [`BUCKET_MS`]) is built from the merged history once
/// (`run::timeline`): a histogram per bucket in every client was 22 KB
/// times 611 buckets times 64 clients for a 61 s run, 860 MB zeroed as
/// the clients started, which held the bench's runtime for a second and
/// timed its first connect out.
pub struct Recorder {
    pub overall: Histogram<u64>,
    pub outcomes: BTreeMap<OpOutcome, u64>,
    pub history: Vec<HistoryEntry>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid histogram bounds")
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { overall: histogram(), outcomes: BTreeMap::new(), history: Vec::new() }
    }

    pub fn record(&mut self, entry: HistoryEntry) {
        *self.outcomes.entry(entry.outcome).or_default() += 1;
        if entry.outcome == OpOutcome::Committed {
            let latency = (entry.end_us - entry.start_us).max(1);
            self.overall.saturating_record(latency);
        }
        self.history.push(entry);
    }

    pub fn merge(&mut self, other: Recorder) {
        self.overall.add(&other.overall).expect("same bounds");
        for (outcome, count) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += count;
        }
        self.history.extend(other.history);
    }
}

/// Sends one transfer and waits for its terminal outcome: tandem's client
/// over gRPC ([`Client`]), or a baseline's over another system
/// ([`crate::postgres`]). [`drive_with`] runs the same workload over
/// either.
pub trait Transfers: Send + 'static {
    /// Returns the outcome, the transaction or saga id, and a detail for the
    /// history; never panics on a failed call (that is an outcome).
    fn send(
        &mut self,
        protocol: Protocol,
        from: u64,
        to: u64,
        amount: i64,
        key: &str,
        timeout: Duration,
    ) -> impl std::future::Future<Output = (OpOutcome, String, String)> + Send;
}

impl Transfers for Client {
    fn send(
        &mut self,
        protocol: Protocol,
        from: u64,
        to: u64,
        amount: i64,
        key: &str,
        timeout: Duration,
    ) -> impl std::future::Future<Output = (OpOutcome, String, String)> + Send {
        self.transfer(protocol, from, to, amount, key, timeout)
    }
}

/// What one client needs to send a transfer by any protocol: the
/// coordinator, and the participants (choreographed sagas start at the
/// source account's participant).
#[derive(Clone)]
pub struct Client {
    coordinator: CoordinatorClient<Channel>,
    participants: Vec<ParticipantClient<Channel>>,
    accounts_per_participant: u64,
    /// Where protocol `2pc-batch` sends its transfers: TransferBatch calls
    /// shared with the other clients of the same batcher.
    batcher: Option<TransferBatcher>,
}

impl Client {
    pub fn new(coordinator: Channel, participants: Vec<Channel>, accounts_per_participant: u64) -> Client {
        Client {
            coordinator: CoordinatorClient::new(coordinator),
            participants: participants.into_iter().map(ParticipantClient::new).collect(),
            accounts_per_participant,
            batcher: None,
        }
    }

    /// The same client, its `2pc-batch` transfers sent through `batcher`.
    pub fn with_batcher(mut self, batcher: TransferBatcher) -> Client {
        self.batcher = Some(batcher);
        self
    }

    fn owner(&self, account: u64) -> usize {
        (account / self.accounts_per_participant) as usize
    }

    /// Sends one transfer by `protocol` and waits for its terminal outcome
    /// (or `timeout`). Returns the outcome, the transaction or saga id, and a
    /// detail for the history.
    pub async fn transfer(
        &mut self,
        protocol: Protocol,
        from: u64,
        to: u64,
        amount: i64,
        key: &str,
        timeout: Duration,
    ) -> (OpOutcome, String, String) {
        match protocol {
            Protocol::TwoPhaseCommit
            | Protocol::TwoPhaseCommitBatched
            | Protocol::TwoPhaseCommitClassic
            | Protocol::Orchestrated => {
                let mut request = tonic::Request::new(pb::TransferRequest {
                    from_account: from,
                    to_account: to,
                    amount,
                    idempotency_key: key.to_string(),
                    protocol: if protocol == Protocol::Orchestrated {
                        pb::Protocol::SagaOrchestrated
                    } else {
                        pb::Protocol::TwoPhaseCommit
                    } as i32,
                    recovery: pb::Recovery::Backward as i32,
                });
                request.set_timeout(timeout);
                // A batch's item is decided as a Transfer is: a client
                // without a batcher (the checker, asking a key again after
                // the run) sends a `2pc-batch` transfer alone.
                let answered = match (protocol, &self.batcher) {
                    (Protocol::TwoPhaseCommitBatched, Some(batcher)) => {
                        tokio::time::timeout(timeout, batcher.transfer(request.into_inner())).await
                    }
                    _ => tokio::time::timeout(timeout, self.coordinator.transfer(request))
                        .await
                        .map(|answer| answer.map(tonic::Response::into_inner)),
                };
                match answered {
                    Ok(Ok(result)) => {
                        let outcome = match pb::Outcome::try_from(result.outcome) {
                            Ok(pb::Outcome::Committed) => OpOutcome::Committed,
                            Ok(pb::Outcome::Compensated) => OpOutcome::Compensated,
                            Ok(pb::Outcome::DeadLettered) => OpOutcome::DeadLettered,
                            _ if result.abort_reason == pb::AbortReason::InsufficientFunds as i32 => {
                                OpOutcome::AbortedInsufficientFunds
                            }
                            _ => OpOutcome::AbortedOther,
                        };
                        (outcome, result.txn_id, result.reason)
                    }
                    Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                        (OpOutcome::TimedOut, String::new(), status.message().to_string())
                    }
                    Ok(Err(status)) if status.metadata().contains_key(EARLIER_TXN_METADATA) => {
                        let earlier = status
                            .metadata()
                            .get(EARLIER_TXN_METADATA)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        (OpOutcome::Orphaned, earlier, status.message().to_string())
                    }
                    Ok(Err(status)) => {
                        (OpOutcome::Unknown, String::new(), format!("{:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => (OpOutcome::TimedOut, String::new(), "client deadline".into()),
                }
            }
            Protocol::Choreographed => {
                let source = self.owner(from);
                let target = self.owner(to);
                let mut request = tonic::Request::new(pb::StartTransferRequest {
                    saga_id: key.to_string(),
                    from_account: from,
                    to_account: to,
                    amount,
                    target_participant: format!("p{}", target + 1),
                    wait_ms: timeout.as_millis() as u32,
                });
                request.set_timeout(timeout + Duration::from_millis(500));
                let call = self.participants[source].start_transfer(request);
                match tokio::time::timeout(timeout + Duration::from_millis(500), call).await {
                    Ok(Ok(response)) => {
                        let status = response.into_inner();
                        let outcome = match pb::TransferState::try_from(status.state) {
                            Ok(pb::TransferState::Completed) => OpOutcome::Committed,
                            Ok(pb::TransferState::Rejected) if status.reason.contains("available") => {
                                OpOutcome::AbortedInsufficientFunds
                            }
                            Ok(pb::TransferState::Rejected) => OpOutcome::AbortedOther,
                            Ok(pb::TransferState::Compensated) => OpOutcome::Compensated,
                            Ok(pb::TransferState::DeadLettered) => OpOutcome::DeadLettered,
                            _ => OpOutcome::TimedOut,
                        };
                        (outcome, status.saga_id, status.reason)
                    }
                    Ok(Err(status)) => {
                        (OpOutcome::Unknown, String::new(), format!("{:?}: {}", status.code(), status.message()))
                    }
                    Err(_) => (OpOutcome::TimedOut, String::new(), "client deadline".into()),
                }
            }
            Protocol::PostgresLocal | Protocol::PostgresTwoPhase => {
                unreachable!("{protocol} is a baseline: it runs against PostgreSQL, never through tandem's client")
            }
        }
    }
}

/// What the workload needs to reach the cluster.
pub struct Target {
    pub coordinator: Vec<Channel>,
    pub participants: Vec<Channel>,
    pub accounts_per_participant: u64,
    /// One per coordinator channel, for protocol `2pc-batch`.
    pub batchers: Vec<TransferBatcher>,
}

impl Target {
    pub fn new(
        coordinator_url: &str,
        participant_urls: &[String],
        accounts_per_participant: u64,
        clients: usize,
        who: &tandem::tls::Security,
    ) -> Result<Target, tandem::Error> {
        let count = clients.div_ceil(CLIENTS_PER_CHANNEL).clamp(1, CHANNELS_MAX);
        let coordinator =
            (0..count).map(|_| tandem::server::channel(coordinator_url, who)).collect::<Result<_, _>>()?;
        let participants =
            participant_urls.iter().map(|url| tandem::server::channel(url, who)).collect::<Result<_, _>>()?;
        Ok(Target { coordinator, participants, accounts_per_participant, batchers: Vec::new() })
    }

    /// Sends the coordinator's transfers through one [`TransferBatcher`]
    /// per channel, each call with `timeout`. Inside a tokio runtime.
    pub fn batched(mut self, timeout: Duration) -> Target {
        self.batchers =
            self.coordinator.iter().map(|channel| TransferBatcher::start(channel.clone(), timeout)).collect();
        self
    }

    pub fn client(&self, i: usize) -> Client {
        let mut client = Client::new(
            self.coordinator[i % self.coordinator.len()].clone(),
            self.participants.clone(),
            self.accounts_per_participant,
        );
        if !self.batchers.is_empty() {
            client = client.with_batcher(self.batchers[i % self.batchers.len()].clone());
        }
        client
    }
}

/// Most TransferBatch calls one batcher has in flight. While they all wait,
/// the clients' transfers gather, and go in the next call together.
pub const BATCH_CALLS_IN_FLIGHT_MAX: usize = 4;
/// Most transfers one batcher holds waiting for a call (back-pressure on
/// the clients beyond it). The coordinator takes at most 256 a call.
pub const BATCH_QUEUE_MAX: usize = 4_096;
/// Most transfers in one TransferBatch call (the coordinator's
/// `TRANSFER_BATCH_MAX`).
pub const TRANSFER_BATCH_MAX: usize = 256;

/// What a client library that batches does (TigerBeetle's clients do it
/// by default): the concurrent transfers of the clients that share it go
/// to the coordinator in TransferBatch calls, the first at once, the
/// others gathered while [`BATCH_CALLS_IN_FLIGHT_MAX`] calls are out. Each
/// transfer is still decided alone, and each client still waits for its
/// own answer; what it saves is a call per transfer (coordinator.proto,
/// TransferBatch).
#[derive(Clone)]
pub struct TransferBatcher {
    queue: tokio::sync::mpsc::Sender<Batched>,
}

struct Batched {
    request: pb::TransferRequest,
    answer: tokio::sync::oneshot::Sender<Result<pb::TransactionResult, tonic::Status>>,
}

impl TransferBatcher {
    /// Starts the task that sends the batches over `channel`, each call
    /// with `timeout`; it ends when the last clone is dropped.
    pub fn start(channel: Channel, timeout: Duration) -> TransferBatcher {
        let (queue, waiting) = tokio::sync::mpsc::channel(BATCH_QUEUE_MAX);
        tokio::spawn(TransferBatcher::send_batches(waiting, CoordinatorClient::new(channel), timeout));
        TransferBatcher { queue }
    }

    /// Sends `request` in the next batch and waits for its own answer: the
    /// result, or the status Transfer would have answered (with the
    /// `tandem-earlier-txn-id` metadata when the item names one), or the
    /// batch call's own failure.
    pub async fn transfer(&self, request: pb::TransferRequest) -> Result<pb::TransactionResult, tonic::Status> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        if self.queue.send(Batched { request, answer }).await.is_err() {
            return Err(tonic::Status::unavailable("the batcher stopped"));
        }
        answered.await.unwrap_or_else(|_| Err(tonic::Status::unavailable("the batcher dropped the transfer")))
    }

    async fn send_batches(
        mut waiting: tokio::sync::mpsc::Receiver<Batched>,
        client: CoordinatorClient<Channel>,
        timeout: Duration,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCH_CALLS_IN_FLIGHT_MAX));
        while let Some(first) = waiting.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut batch = vec![first];
            while batch.len() < TRANSFER_BATCH_MAX {
                match waiting.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let mut client = client.clone();
            tokio::spawn(async move {
                let (transfers, answers): (Vec<_>, Vec<_>) =
                    batch.into_iter().map(|batched| (batched.request, batched.answer)).unzip();
                let mut request = tonic::Request::new(pb::TransferBatchRequest { transfers });
                request.set_timeout(timeout);
                match client.transfer_batch(request).await {
                    Ok(response) => {
                        let results = response.into_inner().results;
                        if results.len() != answers.len() {
                            let status = tonic::Status::internal(format!(
                                "{} answers to a batch of {} transfers",
                                results.len(),
                                answers.len()
                            ));
                            answers.into_iter().for_each(|answer| drop(answer.send(Err(status.clone()))));
                        } else {
                            for (result, answer) in results.into_iter().zip(answers) {
                                let _ = answer.send(batch_item(result));
                            }
                        }
                    }
                    Err(status) => answers.into_iter().for_each(|answer| drop(answer.send(Err(status.clone())))),
                }
                drop(slot);
            });
        }
    }
}

/// One item of a TransferBatch answer as Transfer would have answered it.
fn batch_item(item: pb::TransferBatchResult) -> Result<pb::TransactionResult, tonic::Status> {
    match (item.status_code, item.result) {
        (0, Some(result)) => Ok(result),
        (0, None) => Err(tonic::Status::internal("a batch item with neither a result nor a status")),
        (code, _) => {
            let mut status = tonic::Status::new(tonic::Code::from_i32(code), item.status_message);
            if !item.earlier_txn_id.is_empty() {
                if let Ok(earlier) = item.earlier_txn_id.parse() {
                    status.metadata_mut().insert(EARLIER_TXN_METADATA, earlier);
                }
            }
            Err(status)
        }
    }
}

/// Drives the workload for the scenario's duration and returns the merged
/// records. `start` is the instant the measured run began (fault times count
/// from it).
pub async fn drive(
    scenario: &Scenario,
    protocol: Protocol,
    target: &Target,
    start: Instant,
    progress: Arc<AtomicUsize>,
) -> Recorder {
    drive_with(scenario, protocol, |i| target.client(i), start, progress).await
}

/// [`drive`] over any [`Transfers`]: `client_for(i)` gives client `i` of the
/// closed loop (0..clients), or the sender of the open loop's `i`th
/// transfer. The same seed gives every protocol the same transfers.
pub async fn drive_with<C: Transfers>(
    scenario: &Scenario,
    protocol: Protocol,
    client_for: impl Fn(usize) -> C,
    start: Instant,
    progress: Arc<AtomicUsize>,
) -> Recorder {
    let duration = Duration::from_secs_f64(scenario.duration_s);
    let deadline = start + duration;
    let chooser = Arc::new(Chooser::new(scenario));
    let timeout = Duration::from_millis(scenario.workload.call_timeout_ms);
    let key_prefix = format!("{}-{}", protocol, scenario.seed);
    let mut merged = Recorder::new();
    match scenario.workload.mode {
        LoopMode::Closed => {
            let tasks: Vec<_> = (0..scenario.workload.clients)
                .map(|c| {
                    let mut client = client_for(c);
                    let chooser = chooser.clone();
                    let progress = progress.clone();
                    let key_prefix = key_prefix.clone();
                    let mut rng = SplitMix64::new(scenario.seed.wrapping_mul(1_000_003).wrapping_add(c as u64));
                    tokio::spawn(async move {
                        let mut recorder = Recorder::new();
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            n += 1;
                            let (from, to, amount) = chooser.transfer(&mut rng);
                            let key = format!("{key_prefix}-{c}-{n}");
                            let began = Instant::now();
                            let (outcome, txn_id, detail) =
                                client.send(protocol, from, to, amount, &key, timeout).await;
                            let ended = Instant::now();
                            let entry = HistoryEntry {
                                protocol,
                                client: c,
                                key,
                                from,
                                to,
                                amount,
                                start_us: began.duration_since(start).as_micros() as u64,
                                end_us: ended.duration_since(start).as_micros() as u64,
                                outcome,
                                txn_id,
                                detail,
                            };
                            recorder.record(entry);
                            progress.fetch_add(1, Ordering::Relaxed);
                            if !outcome.is_definite() {
                                // Do not spin against a node that is down.
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        recorder
                    })
                })
                .collect();
            for task in tasks {
                merged.merge(task.await.expect("a client task panicked"));
            }
        }
        LoopMode::Open => {
            let interval = Duration::from_secs_f64(1.0 / scenario.workload.rate_per_s);
            let in_flight = Arc::new(AtomicUsize::new(0));
            let finished = Arc::new(Mutex::new(Recorder::new()));
            let mut rng = SplitMix64::new(scenario.seed);
            let mut n = 0u64;
            let mut tasks = Vec::new();
            let stopped = Arc::new(AtomicBool::new(false));
            loop {
                let intended = start + interval.mul_f64(n as f64);
                if intended >= deadline {
                    break;
                }
                tokio::time::sleep_until(intended.into()).await;
                n += 1;
                let (from, to, amount) = chooser.transfer(&mut rng);
                let key = format!("{key_prefix}-open-{n}");
                let start_us = intended.duration_since(start).as_micros() as u64;
                if in_flight.load(Ordering::Relaxed) >= scenario.workload.in_flight_max {
                    let entry = HistoryEntry {
                        protocol,
                        client: 0,
                        key,
                        from,
                        to,
                        amount,
                        start_us,
                        end_us: start_us,
                        outcome: OpOutcome::Dropped,
                        txn_id: String::new(),
                        detail: "too many in flight".into(),
                    };
                    finished.lock().unwrap().record(entry);
                    continue;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let mut client = client_for(n as usize);
                let (in_flight, finished, progress, _stopped) =
                    (in_flight.clone(), finished.clone(), progress.clone(), stopped.clone());
                tasks.push(tokio::spawn(async move {
                    let (outcome, txn_id, detail) = client.send(protocol, from, to, amount, &key, timeout).await;
                    let end_us = start.elapsed().as_micros() as u64;
                    let entry = HistoryEntry {
                        protocol,
                        client: 0,
                        key,
                        from,
                        to,
                        amount,
                        start_us,
                        end_us,
                        outcome,
                        txn_id,
                        detail,
                    };
                    finished.lock().unwrap().record(entry);
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    progress.fetch_add(1, Ordering::Relaxed);
                }));
            }
            stopped.store(true, Ordering::Relaxed);
            for task in tasks {
                let _ = task.await;
            }
            let recorder = std::mem::replace(&mut *finished.lock().unwrap(), Recorder::new());
            merged.merge(recorder);
        }
    }
    merged.history.sort_by_key(|e| (e.start_us, e.client));
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chooser_is_seeded_picks_two_accounts_and_honours_the_overdraft_share() {
        let mut scenario = Scenario::default();
        scenario.cluster.accounts_per_participant = 50;
        scenario.workload.overdraft_share = 0.25;
        let chooser = Chooser::new(&scenario);
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        let mut overdrafts = 0;
        for _ in 0..4_000 {
            let t = chooser.transfer(&mut a);
            assert_eq!(t, chooser.transfer(&mut b));
            assert!(t.0 != t.1 && t.0 < 100 && t.1 < 100);
            if t.2 > 100 {
                overdrafts += 1;
                assert!(t.2 > scenario.cluster.initial_balance * 100);
            } else {
                assert!((1..=100).contains(&t.2));
            }
        }
        assert!((800..1_200).contains(&overdrafts), "{overdrafts}");
    }

    /// The chooser as it was before `cross_share`: an unset share must keep
    /// every seed's transfers exactly as they were.
    fn legacy_transfer(chooser: &Chooser, rng: &mut SplitMix64) -> (u64, u64, i64) {
        let from = chooser.account(rng);
        let mut to = chooser.account(rng);
        if to == from {
            to = (from + 1) % chooser.accounts;
        }
        let amount = if chooser.overdraft_share > 0.0 && rng.unit() < chooser.overdraft_share {
            chooser.overdraft_amount
        } else {
            chooser.amount_min + rng.below((chooser.amount_max - chooser.amount_min + 1) as u64) as i64
        };
        (from, to, amount)
    }

    #[test]
    fn the_cross_share_sets_how_many_transfers_cross_participants_and_unset_keeps_the_old_draws() {
        for skew in [Skew::Uniform, Skew::Zipf] {
            let mut scenario = Scenario::default();
            scenario.cluster.participants = 3;
            scenario.cluster.accounts_per_participant = 40;
            scenario.workload.skew = skew;
            scenario.workload.overdraft_share = 0.1;
            let chooser = Chooser::new(&scenario);
            let (mut a, mut b) = (SplitMix64::new(9), SplitMix64::new(9));
            let mut crossing = 0;
            for _ in 0..3_000 {
                let t = chooser.transfer(&mut a);
                assert_eq!(t, legacy_transfer(&chooser, &mut b), "{skew:?}: unset must draw as before");
                crossing += (chooser.owner(t.0) != chooser.owner(t.1)) as u32;
            }
            if skew == Skew::Uniform {
                // Independent draws over three participants: about 2/3 cross.
                assert!((1_850..2_150).contains(&crossing), "{crossing}");
            }

            for (share, expected) in [(0.0, 0..1), (1.0, 3_000..3_001), (0.3, 800..1_000)] {
                scenario.workload.cross_share = Some(share);
                let chooser = Chooser::new(&scenario);
                let (mut a, mut b) = (SplitMix64::new(5), SplitMix64::new(5));
                let mut crossing = 0;
                let mut targets = std::collections::BTreeSet::new();
                for _ in 0..3_000 {
                    let t = chooser.transfer(&mut a);
                    assert_eq!(t, chooser.transfer(&mut b), "seeded");
                    assert!(t.0 != t.1 && t.0 < 120 && t.1 < 120, "{t:?}");
                    crossing += (chooser.owner(t.0) != chooser.owner(t.1)) as u32;
                    targets.insert(t.1);
                }
                assert!(expected.contains(&crossing), "{skew:?} cross_share {share}: {crossing} of 3000 crossed");
                if skew == Skew::Uniform {
                    assert!(targets.len() > 100, "targets stay spread: {}", targets.len());
                }
            }
        }
    }

    #[test]
    fn zipf_makes_some_accounts_hot() {
        let mut scenario = Scenario::default();
        scenario.cluster.accounts_per_participant = 500;
        scenario.workload.skew = Skew::Zipf;
        scenario.workload.zipf_exponent = 1.2;
        let chooser = Chooser::new(&scenario);
        let mut rng = SplitMix64::new(3);
        let mut counts = vec![0u32; 1_000];
        for _ in 0..20_000 {
            counts[chooser.account(&mut rng) as usize] += 1;
        }
        // The hottest rank (account 0) and the second (first of p2).
        assert!(counts[0] > 2_000, "{}", counts[0]);
        assert!(counts[500] > 700, "{}", counts[500]);
        assert!(counts[499] < 50);
    }
}
