//! The coordinator's driver: gRPC handlers, the decision log, the clients of
//! the participants, and the executor of the core's [`Action`]s.
//!
//! The core decides; this module only carries out. Each action becomes a
//! task (a synced log write, an abort) or a message in a participant's
//! outbound queue (a prepare, a COMMIT), whose result is fed back into the
//! core under its lock, and the actions that come out are executed in turn.
//!
//! Batching. Prepares, one-phase commits, COMMITs and saga steps go to each
//! participant through a [`BatchQueue`] with one call in flight
//! ([`BATCHES_IN_FLIGHT_MAX`]): a message goes out at once (a batch of
//! one) while no call is out, and the messages that pile up meanwhile go
//! out together in one
//! `PrepareBatch`, `CommitOnePhaseBatch`, `CommitBatch` or `SagaStepBatch`
//! call, which the participant applies in one write. The single-message
//! calls stay in the API for other clients. The protocol does not change
//! (each prepare is voted on alone, each COMMIT is redelivered until
//! acknowledged); what changes is the number of calls: at 64 clients on this
//! 2-core machine the gRPC work per transfer was most of the coordinator's
//! CPU, and batching took 2PC from about 5,600 to 8,600–9,700 commits/s.
//! The same holds on the client's side: a client with many transfers at
//! once can send them in one `TransferBatch` call, each run here exactly
//! as a `Transfer` of its own ([`Node::transfer_call`]), all at once on
//! the call's task.
//!
//! Rejected COMMITs. A COMMIT is redelivered from its slot while the
//! participant cannot take it (unreachable, overloaded, its store failed:
//! every COMMIT to it would fail alike). One that the participant answers
//! with a rejection ([`commit_rejected`]: it aborted the transaction, a
//! broken protocol) would get the same answer at once, and
//! [`BATCHES_IN_FLIGHT_MAX`] of them would hold every slot for good: it
//! leaves the slots for a bounded set of undeliverable COMMITs, offered
//! again with a long backoff ([`Node::redeliver_undeliverable`]), and is
//! logged as an error. Its decision stands: it is never taken for an
//! acknowledgement, so the transaction stays committing until the
//! participant takes it (an audit counts its legs there as applied). A rejected
//! batch is split in halves until the COMMITs it rejects are alone, so the
//! others in it are delivered.
//!
//! The audit (see `Coordinator.Audit` in the proto) holds up no decision
//! and no client. It reads every participant's balances and prepared
//! transactions, each in one instant, and its figures are those of the cut
//! where exactly the commits decided before it began are applied:
//!
//! - a commit decided before it began (the core's [`Core::committing`],
//!   snapshotted when it registers) was prepared at every participant
//!   before that, so each read finds it prepared or applied: its prepared
//!   legs are counted as applied;
//! - a commit decided while it reads is applied nowhere until it ends: its
//!   decision is noted by every running audit under the core's lock with
//!   the core's step to committing ([`Node::note_decided_commit`]), and its
//!   COMMITs wait in [`RunningAudits`] until every audit that noted it has
//!   finished (a decision query about it hears PENDING meanwhile). Its
//!   client hears COMMITTED at once; only the release of its reservations
//!   waits, at most one audit's reads ([`AUDIT_READ_TIMEOUT_MS`]). Its
//!   prepared legs are not counted, and its legs not yet prepared at a
//!   participant read before its prepare arrived are missing consistently.
//!   (Counting such a commit as applied, as an earlier version did, was
//!   wrong exactly then: prepared and counted at one participant, not yet
//!   prepared at the other; parallel commit, which decides sooner after
//!   the last vote, made the bench's smoke run show it.)
//!
//! Registering an audit with its snapshot, and noting a decision with the
//! core's step to committing, both happen under the core's lock, so no
//! decision falls between them. Lock order: the core, then `audits`. A
//! participant that does not answer its read in time (paused) fails the
//! audit, never the commits.
//!
//! Readiness. The health service's `""` and `tandem.v1.Coordinator` say
//! only that this process serves. Whether it can reach its participants is
//! [`READY_SERVICE`] and one [`participant_ready_service`] per participant,
//! set by a loop that probes each participant's health with a short
//! deadline (a paused participant holds the connection open and never
//! answers: only the deadline shows it). [`READY_SERVICE`] is also
//! NOT_SERVING while transactions recovered from the log wait for their
//! votes (parallel commit's staged records, prepared again at a restart):
//! the coordinator is still recovering, and refuses audits until they are
//! decided. Once the decision log has failed
//! a write, every one of these is NOT_SERVING for good: the coordinator
//! refuses new work and must be restarted on its data directory (unlike a
//! participant, it does not reopen its store in process yet).
//!
//! Positions, watermarks and incarnations. Every message to a participant
//! carries this coordinator's id and its log's incarnation; a prepare, an
//! abort and a saga step carry their transaction's (or saga's) position; a
//! prepare, a batch of COMMITs and a batch of saga steps carry the low
//! watermark the core gives for that participant when the call goes out
//! (see `core.rs`, `saga.rs`, `watermark.rs`). Ids and positions are handed
//! out under the lock of the core that registers them
//! ([`Node::next_txn_id`]). [`Node::keep_watermarks`] makes the watermarks
//! that rose durable every [`WATERMARK_INTERVAL_MS`], and only then are
//! they sent. Calls to one participant run concurrently (a prepare, a
//! COMMIT and a saga step call may be out at once), so
//! two of them may arrive in another order than they were stamped: a
//! participant keeps the highest watermark it heard.
//!
//! One-phase commits. A request is sent again, with backoff, until its
//! participant answers it ([`Node::send_one_phases`]); when its client's
//! deadline (`prepare_timeout_ms`) passes first, the core is told, and the
//! client hears that the outcome is not known yet. A keyed one's intent is
//! fsynced before its request goes; its outcome is written after its client
//! heard it, with no fsync of its own (see `core.rs`). The audit need not
//! count any: each is applied in one write at one participant.
//!
//! Idempotency keys and finished records expire by time
//! (`idempotency_retention_ms`, by `wall_clock`) and are deleted through an
//! expiry index ([`Node::collect_garbage`]); start-up reads only the meta
//! records, the logged decisions and the sagas.
//!
//! Locks. No panic can happen while one of this module's mutexes is held,
//! except an invariant the watermark bookkeeping asserts (a watermark that
//! would go back: a bug, and the process stops rather than send it): the
//! cores refuse or ignore every input they cannot take (see their essays
//! and the property test), and the other sections under a lock only move
//! values in and out of maps and queues. So a lock is never poisoned, and
//! `expect` on one states that. Order, where one is taken inside another:
//! `keys`, then the 2PC core, then the saga core, then `waiters`. What comes from outside is bounded
//! where it is received: a reason a participant sends back is clipped to
//! `REASON_LEN_MAX` (it ends up in the log's records), and a log record
//! that does not decode is an error naming it (at start: the coordinator
//! does not start; while serving: INTERNAL), never a panic.

use crate::core::{
    AbortReason, Action, ActiveTxn, CommitProtocol, Core, Decision, OnePhaseCommit, OnePhaseResult, Outcome, Phase,
    VoteResult,
};
use crate::directory::{Directory, Shard};
use crate::log;
use crate::saga::{Recovery, SagaAction, SagaCore, SagaId};
use crate::traces::TxnTraces;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::domain::{clip_text, validate_balanced, validate_legs, Id, Leg, TxnId, REASON_LEN_MAX};
use tandem::health::Health;
use tandem::net::Network;
use tandem::pb;
use tandem::pb::coordinator_server::{Coordinator, CoordinatorServer};
use tandem::pb::participant_client::ParticipantClient;
use tandem::store::{Disk, Durability, Storage};
use tandem::tls::Security;
use tandem::trust::{Authorizer, Configured};
use tandem::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn, Instrument, Span};

/// The first wait before a COMMIT is redelivered; it doubles up to the max.
pub const COMMIT_RETRY_INITIAL_MS: u64 = 10;
pub const COMMIT_RETRY_MAX_MS: u64 = 1_000;
/// Most COMMITs rejected by one participant that wait out of the call slots
/// to be offered again; past it, a rejected COMMIT is offered again from
/// its slot (backing off up to [`UNDELIVERABLE_RETRY_MAX_MS`]).
pub const COMMITS_UNDELIVERABLE_MAX: usize = 4_096;
/// The first wait before the COMMITs a participant rejected are offered
/// again; it doubles up to the max while some are still rejected.
pub const UNDELIVERABLE_RETRY_INITIAL_MS: u64 = 1_000;
pub const UNDELIVERABLE_RETRY_MAX_MS: u64 = 60_000;
const _: () = assert!(
    COMMITS_UNDELIVERABLE_MAX > 0
        && COMMIT_RETRY_MAX_MS <= UNDELIVERABLE_RETRY_INITIAL_MS
        && UNDELIVERABLE_RETRY_INITIAL_MS <= UNDELIVERABLE_RETRY_MAX_MS
);
/// How often expired idempotency keys and finished records are collected
/// (each round loops until nothing is due).
pub const GC_INTERVAL_MS: u64 = 1_000;
/// Most expiry index entries read (and records deleted) in one batch.
pub const GC_BATCH_MAX: usize = 4_096;
/// How often the low watermarks that rose are made durable (then sent).
pub const WATERMARK_INTERVAL_MS: u64 = 50;
/// Most COMMITs delivered to one participant in one call (`CommitBatch`).
pub const COMMIT_BATCH_MAX: usize = 1_024;
/// Most prepares sent to one participant in one call (`PrepareBatch`).
pub const PREPARE_BATCH_MAX: usize = 256;
/// How long a prepare that failed waits before it is sent again (a
/// recovered parallel commit's, which only a refusal may abort: see
/// `core.rs`).
pub const PREPARE_RESEND_PAUSE_MS: u64 = 100;
/// Most one-phase commits sent to one participant in one call
/// (`CommitOnePhaseBatch`).
pub const ONE_PHASE_BATCH_MAX: usize = 256;
/// How long a COMMIT waits for a prepare call to the same participant to
/// ride on (`PrepareBatchRequest.commits`) before the commit sender takes
/// it into a `CommitBatch` call of its own. Under load prepares go out
/// continuously and carry every COMMIT, halving the calls and sharing the
/// participant's write; at one client the next transfer's prepare follows
/// within a round trip. The client has its answer already: this delays
/// only when the participant applies the COMMIT (and so when the
/// coordinator forgets the transaction), by at most this and the timer's
/// resolution (1 ms).
pub const COMMIT_LINGER_MS: u64 = 1;
/// Most calls of one kind (prepare, one-phase commit, COMMIT, saga step)
/// in flight to one participant. One: what arrives while a call is out
/// waits for it and goes in the next call, the smart batching of
/// TigerBeetle's and LMAX's pipelines. Fewer calls, each larger, cost less
/// CPU per message on both sides, and at 64 clients on this 2-core machine
/// the nodes and their clients queue for the two vCPUs (172–175% of 200%
/// busy either way): less CPU a message is less of that queueing. Against
/// four, in interleaved runs at
/// 64 clients (2026-12-03), 2PC committed 1.05 and 1.12 times as many
/// transfers a second with the default mix, 1.12 and 1.17 with every
/// transfer crossing (classic 2PC 1.07 and 1.10), orchestrated sagas 1.05
/// and 1.23; two against four and one against two each gained as well
/// (1.09–1.22 in three pairs, 1.04–1.15 in four). Prepares rose from 6.7
/// to 20.2 a call, calls from 1.25 to 1.09 a transfer. A client that
/// batches already (`2pc-batch`) read 0.92–1.02; at 1, 8 and 16 clients
/// the difference stayed within the noise. A call that takes
/// long holds back the next one to that participant only, as four busy
/// slots did: a prepare whose deadline passes while it waits votes NO
/// unsent.
pub const BATCHES_IN_FLIGHT_MAX: usize = 1;
/// Most saga steps sent to one participant in one call (`SagaStepBatch`).
pub const STEP_BATCH_MAX: usize = 256;
/// Most ended sagas in one ForgetSagas call.
pub const FORGET_BATCH_MAX: usize = 1_024;
/// How long ended sagas gather before they are sent in one ForgetSagas.
pub const FORGET_LINGER_MS: u64 = 1_000;
/// The health service name (`grpc.health.v1`) that says whether this
/// coordinator can reach every participant: SERVING when each answered its
/// last probe in time, NOT_SERVING otherwise. `""` and `tandem.v1.Coordinator`
/// stay liveness (this process serves).
/// Most dead letters one ListDeadLetters lists (its default too).
pub const LIST_DEAD_LETTERS_MAX: usize = 1_000;

pub const READY_SERVICE: &str = "tandem.v1.Coordinator.ready";
/// How often each participant's health is probed.
pub const READY_PROBE_INTERVAL_MS: u64 = 500;
/// How long a probe waits for a participant's answer. A paused process
/// accepts the connection and never answers, so only this deadline (enforced
/// here, not only sent) tells it apart from a slow one.
pub const READY_PROBE_TIMEOUT_MS: u64 = 300;
/// How long the audit waits for the participants' balance reads (all at
/// once, at most `call_timeout_ms`), enforced here, so that an audit answers
/// in bounded time even when a participant is paused (accepts the
/// connection, never answers). A participant that does not answer in time
/// fails the audit (UNAVAILABLE, naming it); one with very many accounts
/// may not fit a read of each of them (`include_accounts`) in it, but its
/// totals always fit.
pub const AUDIT_READ_TIMEOUT_MS: u64 = 250;
/// Most commit decisions one audit notes while it reads; past it the audit
/// answers UNAVAILABLE (its reads took far longer than they may).
pub const AUDIT_DECISIONS_MAX: usize = 1_000_000;

/// The audits running, each with the commits decided since it began, whose
/// COMMITs wait for it (see the module essay).
#[derive(Debug, Default)]
pub(crate) struct RunningAudits {
    next: u64,
    /// By audit: the commits decided since it began, or `None` once more
    /// than [`AUDIT_DECISIONS_MAX`] were (that audit then fails).
    running: BTreeMap<u64, Option<HashSet<TxnId>>>,
    /// COMMITs not sent yet: their transaction was decided while an audit
    /// that is still running read. At most [`AUDIT_DECISIONS_MAX`] per
    /// audit and participant of a transaction.
    held: Vec<(TxnId, Id)>,
}

impl RunningAudits {
    fn begin(&mut self) -> u64 {
        self.next += 1;
        self.running.insert(self.next, Some(HashSet::new()));
        self.next
    }

    fn note(&mut self, txn: &TxnId) {
        for noted in self.running.values_mut() {
            match noted {
                Some(set) if set.len() < AUDIT_DECISIONS_MAX => {
                    set.insert(txn.clone());
                }
                _ => *noted = None,
            }
        }
    }

    /// Whether a running audit holds back `txn`'s COMMITs.
    fn holds(&self, txn: &TxnId) -> bool {
        self.running.values().any(|noted| noted.as_ref().is_some_and(|set| set.contains(txn)))
    }

    /// Keeps the COMMIT of `txn` to `participant` until the audits that
    /// hold it have finished; `false` (nothing kept) when none does.
    fn hold(&mut self, txn: &TxnId, participant: &Id) -> bool {
        if !self.holds(txn) {
            return false;
        }
        self.held.push((txn.clone(), participant.clone()));
        true
    }

    /// Ends `audit`: whether it noted every commit decided while it ran
    /// (`false`: too many), and the COMMITs no running audit holds any
    /// more, to be sent now.
    fn end(&mut self, audit: u64) -> (bool, Vec<(TxnId, Id)>) {
        let complete = matches!(self.running.remove(&audit), Some(Some(_)));
        let (held, released): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.held).into_iter().partition(|(txn, _)| self.holds(txn));
        self.held = held;
        (complete, released)
    }
}

/// An audit's place among the running ones, given back however the audit
/// ends (an early error, a cancelled call): the COMMITs it held go out then.
struct AuditRegistration<'a> {
    node: &'a Node,
    audit: u64,
    ended: bool,
}

impl AuditRegistration<'_> {
    /// Ends the audit and sends the COMMITs it held; an error if more
    /// commits were decided while it read than it could hold back.
    fn finish(&mut self) -> Result<(), Error> {
        self.ended = true;
        let (complete, released) = self.node.inner.audits.lock().expect("audits lock poisoned").end(self.audit);
        self.node.send_released_commits(released);
        if !complete {
            return Err(Error::Unavailable(format!(
                "more than {AUDIT_DECISIONS_MAX} commits were decided while the audit read; retry later"
            )));
        }
        Ok(())
    }
}

impl Drop for AuditRegistration<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let (_, released) = self.node.inner.audits.lock().expect("audits lock poisoned").end(self.audit);
            self.node.send_released_commits(released);
        }
    }
}

/// Counts a decided commit's legs prepared on this participant as applied:
/// posted moves by each leg, a debit's reservation and a credit's incoming
/// amount are released (the figures of the cut where it is committed).
fn count_as_applied(balances: &mut pb::ReadBalancesResponse, legs: &[pb::Leg]) -> Result<(), Error> {
    let overflow = || Error::OutOfRange(format!("{}: a total does not fit an int64", balances.participant_id));
    for leg in legs {
        let held = leg.amount.checked_abs().ok_or_else(overflow)?;
        balances.total_posted = balances.total_posted.checked_add(leg.amount).ok_or_else(overflow)?;
        if leg.amount < 0 {
            balances.total_reserved = balances.total_reserved.checked_sub(held).ok_or_else(overflow)?;
        } else {
            balances.total_incoming = balances.total_incoming.checked_sub(held).ok_or_else(overflow)?;
        }
        // The participant lists its accounts in order.
        if let Ok(i) = balances.accounts.binary_search_by_key(&leg.account, |a| a.account) {
            let account = &mut balances.accounts[i];
            account.posted = account.posted.checked_add(leg.amount).ok_or_else(overflow)?;
            if leg.amount < 0 {
                account.reserved = account.reserved.checked_sub(held).ok_or_else(overflow)?;
            } else {
                account.incoming = account.incoming.checked_sub(held).ok_or_else(overflow)?;
                account.available = account.available.checked_add(held).ok_or_else(overflow)?;
            }
        }
    }
    Ok(())
}

/// The health service name that says whether this coordinator reaches one
/// participant: `tandem.v1.Participant/<participant id>`.
pub fn participant_ready_service(participant: &Id) -> String {
    format!("tandem.v1.Participant/{participant}")
}

/// Most ended sagas waiting to be forgotten by one participant; past it
/// (the participant is down for long) the newest are not queued, and their
/// barriers stay there (a leak, never a double step).
pub const FORGETS_WAITING_MAX: usize = 1_000_000;

/// Messages owed to one participant and not sent yet, of one kind. A task
/// per participant and kind drains it ([`Node::drain`]): a message goes out
/// at once when a call slot is free (there are [`BATCHES_IN_FLIGHT_MAX`]),
/// and those that arrive while every slot is busy go out together in the next
/// call (one call, one write at the participant). So batching costs no
/// latency at low load and saves calls and CPU at high load.
pub(crate) struct BatchQueue<T> {
    /// The messages, oldest first, each with when it was queued.
    waiting: Mutex<std::collections::VecDeque<(Instant, T)>>,
    wake: tokio::sync::Notify,
}

impl<T> Default for BatchQueue<T> {
    fn default() -> Self {
        BatchQueue { waiting: Mutex::default(), wake: tokio::sync::Notify::new() }
    }
}

impl<T> BatchQueue<T> {
    pub(crate) fn push(&self, item: T) {
        self.waiting.lock().expect("batch queue lock poisoned").push_back((Instant::now(), item));
        self.wake.notify_one();
    }

    /// Queues `item` unless `max` are waiting already; says whether it did.
    fn push_bounded(&self, item: T, max: usize) -> bool {
        let mut waiting = self.waiting.lock().expect("batch queue lock poisoned");
        if waiting.len() >= max {
            return false;
        }
        waiting.push_back((Instant::now(), item));
        drop(waiting);
        self.wake.notify_one();
        true
    }

    /// How many messages wait.
    fn len(&self) -> usize {
        self.waiting.lock().expect("batch queue lock poisoned").len()
    }

    /// Up to `max` waiting messages, without waiting.
    fn take(&self, max: usize) -> Vec<T> {
        let mut waiting = self.waiting.lock().expect("batch queue lock poisoned");
        let count = waiting.len().min(max);
        waiting.drain(..count).map(|(_, item)| item).collect()
    }

    /// Up to `max` waiting messages, oldest first, once the oldest of them
    /// has waited `linger` (at once with none); waits for one. The linger
    /// counts from when the oldest message *still waiting* was queued:
    /// while a sender waits, another may take what it waited for (a COMMIT
    /// riding on a prepare), and what was queued after that has its own
    /// linger, not the rest of the first one's. (Counted from the first, at
    /// one client a COMMIT queued just before the linger ended went out
    /// alone, in 9-12% of the transfers, though the next prepare would have
    /// carried it.)
    async fn next_batch(&self, max: usize, linger: Duration) -> Vec<T> {
        loop {
            let due = {
                let mut waiting = self.waiting.lock().expect("batch queue lock poisoned");
                match waiting.front() {
                    None => None,
                    Some((queued_at, _)) if linger.is_zero() || queued_at.elapsed() >= linger => {
                        let count = waiting.len().min(max);
                        return waiting.drain(..count).map(|(_, item)| item).collect();
                    }
                    Some((queued_at, _)) => Some(*queued_at + linger),
                }
            };
            match due {
                Some(due) => tokio::time::sleep_until(due).await,
                // A push between the check and here leaves a permit: no wake-up is lost.
                None => self.wake.notified().await,
            }
        }
    }
}

/// COMMITs one participant rejected, out of the call slots, until it takes
/// them ([`Node::redeliver_undeliverable`]); oldest first (ids sort by age),
/// at most [`COMMITS_UNDELIVERABLE_MAX`].
#[derive(Default)]
struct Undeliverable {
    txns: Mutex<BTreeSet<TxnId>>,
    wake: tokio::sync::Notify,
}

impl Undeliverable {
    fn txns(&self) -> std::sync::MutexGuard<'_, BTreeSet<TxnId>> {
        self.txns.lock().expect("undeliverable lock poisoned")
    }

    /// Sets `txn` aside unless `max` are aside already; says whether it did.
    fn insert_bounded(&self, txn: TxnId, max: usize) -> bool {
        let mut txns = self.txns();
        if txns.len() >= max {
            return false;
        }
        txns.insert(txn);
        drop(txns);
        self.wake.notify_one();
        true
    }

    /// Waits until at least one COMMIT is aside.
    async fn wait_for_one(&self) {
        // A notification between the check and here leaves a permit.
        while self.txns().is_empty() {
            self.wake.notified().await;
        }
    }
}

/// A prepare waiting for its call, and when it stops waiting for a vote.
pub(crate) struct QueuedPrepare {
    txn: TxnId,
    position: u64,
    legs: Vec<Leg>,
    idempotency_key: Option<Id>,
    deadline: Instant,
}

/// A one-phase commit waiting for its call: sent again until its
/// participant answers.
pub(crate) struct QueuedOnePhase {
    txn: TxnId,
    position: u64,
    legs: Vec<Leg>,
    idempotency_key: Option<Id>,
    /// When its client stops waiting: told the outcome is unknown.
    deadline: Instant,
    /// Calls that carried it and got no answer: any of them may have
    /// reached the participant (so only an answer tells the outcome now).
    unanswered: u32,
    /// The wait before it is sent again after a call that got no answer.
    backoff_ms: u64,
}

/// A saga step waiting for its call, and where its answer goes.
pub(crate) struct QueuedStep {
    pub(crate) step: pb::SagaStepRequest,
    pub(crate) deadline: Instant,
    pub(crate) reply: oneshot::Sender<Result<pb::SagaStepResponse, Status>>,
}

/// What the coordinator owes one participant.
#[derive(Default)]
pub(crate) struct Outbound {
    prepares: BatchQueue<QueuedPrepare>,
    /// One-phase commits (each sent again until answered).
    one_phase: BatchQueue<QueuedOnePhase>,
    /// Orchestrated saga steps (each retried by its saga's driver).
    pub(crate) steps: BatchQueue<QueuedStep>,
    commits: BatchQueue<TxnId>,
    /// COMMITs this participant rejected, out of the call slots.
    undeliverable: Undeliverable,
    /// Orchestrated sagas that ended, whose barriers this participant may
    /// forget (see `Participant.ForgetSagas`).
    forgets: BatchQueue<TxnId>,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: Id,
    /// Where the decision log is: RocksDB in a directory, or a disk in memory.
    pub disk: Disk,
    pub shards: Vec<Shard>,
    /// A participant that has not voted within this bound votes NO for it.
    pub prepare_timeout_ms: u64,
    /// Deadline of one COMMIT or ABORT call; an audit's ReadBalances calls
    /// have a shorter one (see [`AUDIT_READ_TIMEOUT_MS`]).
    pub call_timeout_ms: u64,
    /// Most transactions in flight; past it, new ones get RESOURCE_EXHAUSTED.
    pub active_max: usize,
    /// How long an idempotency key's result and a finished transaction's
    /// status record are kept at least, from when they were written (by
    /// `wall_clock`); then they are collected, and a request with the key
    /// is a new one.
    pub idempotency_retention_ms: u64,
    /// The wall clock that dates idempotency keys and finished records.
    pub wall_clock: tandem::clock::WallClock,
    /// Where a new log's incarnation comes from: `None`, the operating
    /// system's randomness (production); `Some(seed)`, the seed and the
    /// wall clock (a simulation: the same seed gives the same ids, and a
    /// log created later gets another incarnation).
    pub incarnation_seed: Option<u64>,
    /// Attempts of one saga action (debit, credit, an operator's release)
    /// before its transient failures count as failure (forward credits,
    /// compensations and parking retry until they succeed).
    pub saga_step_attempts: u32,
    /// How long a saga's action steps are retried, from the first step this
    /// process sent for it; past it, the saga compensates.
    pub saga_deadline_ms: u64,
    /// This node's certificate and the cluster's CA, for the server and for
    /// its calls to the participants; or `--insecure`.
    pub security: Security,
    /// How its calls reach the participants: TCP, or a simulation's network.
    pub network: Network,
    /// Which transactions whose legs all live on one participant are
    /// committed in one phase (`--one-phase-commit`, default auto; see
    /// `core.rs`).
    pub one_phase_commit: OnePhaseCommit,
    /// How a transaction over several participants is committed
    /// (`--commit-protocol`, default parallel; see `core.rs`).
    pub commit_protocol: CommitProtocol,
}

pub(crate) struct Waiter {
    pub(crate) reply: oneshot::Sender<Result<Outcome, Error>>,
    pub(crate) fingerprint: u64,
}

/// A running coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// What a restarted coordinator resumes: logged commits and one-phase
/// intents, and sagas.
pub struct Recovered {
    /// The COMMITs of logged decisions, and the one-phase requests of
    /// logged intents.
    pub commits: Vec<Action>,
    pub sagas: Vec<SagaAction>,
}

pub(crate) struct Inner {
    pub(crate) config: NodeConfig,
    /// This log's incarnation (see `log.rs`).
    pub(crate) incarnation: u64,
    pub(crate) generation: u64,
    pub(crate) next_sequence: AtomicU64,
    pub(crate) core: Mutex<Core>,
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) directory: Directory,
    pub(crate) participants: BTreeMap<Id, ParticipantClient<Channel>>,
    /// Health clients on the same channels, for the readiness probes.
    pub(crate) participant_health: BTreeMap<Id, HealthClient<Channel>>,
    /// This node's own health, set once it serves (see `run_on`).
    pub(crate) health: std::sync::OnceLock<Arc<Health>>,
    pub(crate) outbound: BTreeMap<Id, Arc<Outbound>>,
    pub(crate) waiters: Mutex<HashMap<TxnId, Waiter>>,
    /// Serialises the check of an idempotency key with the start of its
    /// transaction, so two requests with one key cannot both start.
    pub(crate) keys: Mutex<()>,
    /// The audits running, each with the commits decided since it began
    /// (see the module essay; taken after the core's lock).
    pub(crate) audits: Mutex<RunningAudits>,
    pub(crate) sagas: Mutex<SagaCore>,
    /// When each running saga's deadline passes (set by its first step).
    pub(crate) saga_deadlines: Mutex<HashMap<SagaId, Instant>>,
    /// Operators waiting for a dead letter's release.
    pub(crate) resolve_waiters: Mutex<HashMap<SagaId, oneshot::Sender<Result<(), Error>>>>,
    /// Each transaction's trace context while its messages go out (empty
    /// unless this process exports traces).
    pub(crate) traces: TxnTraces,
}

impl Node {
    /// Opens the decision log, raises the generation, and recovers the
    /// logged commits (their redelivery starts in [`Node::run`]).
    pub async fn open(config: NodeConfig) -> Result<(Node, Recovered), Error> {
        if config.node_id.as_str().len() > log::NODE_ID_LEN_MAX {
            return Err(Error::InvalidInput(format!(
                "the coordinator id has at most {} characters",
                log::NODE_ID_LEN_MAX
            )));
        }
        if config.idempotency_retention_ms == 0 {
            return Err(Error::InvalidInput("the idempotency retention must be positive".into()));
        }
        let directory = Directory::new(config.shards.clone())?;
        let mut participants = BTreeMap::new();
        let mut participant_health = BTreeMap::new();
        for shard in directory.shards() {
            let channel = tandem::server::channel_on(&shard.url, &config.security, &config.network)?;
            participant_health.insert(shard.participant.clone(), HealthClient::new(channel.clone()));
            participants.insert(shard.participant.clone(), ParticipantClient::new(channel));
        }
        let store = config.disk.open()?;
        let generation = match store.get(log::GENERATION_KEY)? {
            Some(bytes) => log::decode_at(log::GENERATION_KEY, &bytes, log::decode_generation)?
                .checked_add(1)
                .ok_or_else(|| Error::Fatal("the generation record is at its largest value".into()))?,
            None => 1,
        };
        if generation > log::GENERATION_MAX {
            return Err(Error::Fatal(format!(
                "the generation record is at {}, the most a position holds; this log can hand out no more ids: start the coordinator on a new data directory",
                generation - 1
            )));
        }
        // A log that has no incarnation (new, or written before logs had
        // one) gets one now, durably, with the generation.
        let incarnation = match store.get(log::INCARNATION_KEY)? {
            Some(bytes) => log::decode_at(log::INCARNATION_KEY, &bytes, log::decode_incarnation)?,
            None => new_incarnation(config.incarnation_seed, &config.wall_clock),
        };
        store
            .write(vec![
                tandem::store::Op::Put(log::GENERATION_KEY.to_vec(), generation.to_le_bytes().to_vec()),
                tandem::store::Op::Put(log::INCARNATION_KEY.to_vec(), incarnation.to_le_bytes().to_vec()),
            ])
            .await?;
        let (mut two_phase_floors, mut saga_floors) = (BTreeMap::new(), BTreeMap::new());
        for (key, value) in store.scan_prefix(log::WATERMARK_PREFIX)? {
            let participant = log::id_from_key(log::WATERMARK_PREFIX, &key)?;
            let (two_phase, sagas) = log::decode_at(&key, &value, log::decode_watermarks)?;
            two_phase_floors.insert(participant.clone(), two_phase);
            saga_floors.insert(participant, sagas);
        }
        let first_position = log::position(generation, 1)?;
        // A participant the directory does not name could never be told (a
        // directory changed under a log that needs it).
        let known = |p: &Id| participants.contains_key(p);
        let logged = read_records(store.as_ref(), log::DECISION_PREFIX, log::decode_commit, known, |record| {
            record.participants.iter().collect()
        })?;
        let intents = read_records(store.as_ref(), log::INTENT_PREFIX, log::decode_intent, known, |record| {
            vec![&record.participant]
        })?;
        let staged = read_records(store.as_ref(), log::STAGED_PREFIX, log::decode_staged, known, |record| {
            record.legs.keys().collect()
        })?;
        let logged_sagas = read_records(store.as_ref(), log::SAGA_PREFIX, log::decode_saga, known, |record| {
            vec![&record.spec.from_participant, &record.spec.to_participant]
        })?;
        let mut core = Core::new(config.active_max);
        core.set_one_phase(config.one_phase_commit);
        core.set_commit_protocol(config.commit_protocol);
        let mut sagas = SagaCore::new(config.active_max);
        core.start_positions(first_position, two_phase_floors);
        sagas.start_positions(first_position, saga_floors);
        info!(
            node = %config.node_id,
            incarnation = %format!("{incarnation:016x}"),
            generation,
            commits_to_finish = logged.len(),
            one_phase_to_resend = intents.len(),
            staged_to_resolve = staged.len(),
            sagas_to_resume = logged_sagas.len(),
            one_phase_commit = ?config.one_phase_commit,
            commit_protocol = ?config.commit_protocol,
            "recovered the decision log"
        );
        let mut commits = core.recover(logged)?;
        commits.extend(core.recover_intents(intents)?);
        commits.extend(core.recover_staged(staged)?);
        let recovered = Recovered { commits, sagas: sagas.recover(logged_sagas) };
        let node = Node {
            inner: Arc::new(Inner {
                incarnation,
                generation,
                next_sequence: AtomicU64::new(1),
                core: Mutex::new(core),
                store,
                directory,
                outbound: participants.keys().map(|p| (p.clone(), Arc::default())).collect(),
                participants,
                participant_health,
                health: std::sync::OnceLock::new(),
                waiters: Mutex::new(HashMap::new()),
                keys: Mutex::new(()),
                audits: Mutex::new(RunningAudits::default()),
                sagas: Mutex::new(sagas),
                saga_deadlines: Mutex::new(HashMap::new()),
                resolve_waiters: Mutex::new(HashMap::new()),
                traces: TxnTraces::default(),
                config,
            }),
        };
        Ok((node, recovered))
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        self.inner.core.lock().expect("core lock poisoned")
    }

    /// Releases the decision log of a node that will not run (it can be
    /// opened again afterwards); [`Node::run`] does it when it stops.
    pub fn close(&self) {
        self.inner.store.close();
    }

    /// This coordinator's log incarnation.
    pub fn incarnation(&self) -> u64 {
        self.inner.incarnation
    }

    /// A new transaction or saga id and its position (see `log.rs`). The
    /// caller holds the lock of the core that registers it, so that no
    /// position is handed out and not yet registered while a watermark is
    /// computed. Fails (and hands out nothing more) once the sequence is
    /// spent: a restart starts a new generation.
    pub(crate) fn next_txn_id(&self) -> Result<(TxnId, u64), Error> {
        let sequence = self.inner.next_sequence.fetch_add(1, Ordering::Relaxed);
        let position = log::position(self.inner.generation, sequence)?;
        let txn = log::txn_id(&self.inner.config.node_id, self.inner.incarnation, self.inner.generation, sequence)?;
        Ok((txn, position))
    }

    /// The expiry time of an idempotency key or a finished record written now.
    pub(crate) fn expires_ms(&self) -> u64 {
        self.inner.config.wall_clock.unix_ms().saturating_add(self.inner.config.idempotency_retention_ms)
    }

    /// The result stored for an idempotency key, unless there is none or it
    /// is past its retention (then a request with the key is a new one).
    pub(crate) fn keyed_result(&self, key: &Id) -> Result<Option<log::KeyedResult>, Error> {
        let record_key = log::key(log::KEY_PREFIX, key);
        let Some(bytes) = self.inner.store.get(&record_key)? else { return Ok(None) };
        let earlier = log::decode_at(&record_key, &bytes, log::decode_keyed)?;
        if earlier.expired(self.inner.config.wall_clock.unix_ms()) {
            debug!(%key, txn = %earlier.txn, "idempotency key past its retention: a new request");
            return Ok(None);
        }
        Ok(Some(earlier))
    }

    /// Registers a new transaction in the core, its id handed out under the
    /// core's lock, with a waiter for its outcome.
    fn begin_transaction(
        &self,
        by_participant: BTreeMap<Id, Vec<Leg>>,
        key: Option<Id>,
        fingerprint: u64,
    ) -> Result<(TxnId, oneshot::Receiver<Result<Outcome, Error>>, Vec<Action>), Error> {
        let mut core = self.core();
        let (txn, position) = self.next_txn_id()?;
        let (reply, outcome) = oneshot::channel();
        self.inner.waiters.lock().expect("waiters lock poisoned").insert(txn.clone(), Waiter { reply, fingerprint });
        match core.begin(txn.clone(), position, by_participant, key) {
            Ok(actions) => Ok((txn, outcome, actions)),
            Err(error) => {
                self.inner.waiters.lock().expect("waiters lock poisoned").remove(&txn);
                Err(error)
            }
        }
    }

    /// Runs one transaction to its outcome. `Err` is bad input or an
    /// unavailable coordinator; a refusal is `Ok(Outcome::Aborted)`.
    pub async fn run_transaction(&self, legs: Vec<Leg>, key: Option<Id>) -> Result<(TxnId, Outcome), Error> {
        let started = Instant::now();
        validate_legs(&legs)?;
        self.refuse_if_store_failed()?;
        validate_balanced(&legs)?;
        let mut by_participant: BTreeMap<Id, Vec<Leg>> = BTreeMap::new();
        for leg in &legs {
            by_participant.entry(self.inner.directory.owner(leg.account)?.clone()).or_default().push(*leg);
        }
        let how = self.commit_path(by_participant.len(), key.is_some());
        let asked = log::Asked::TwoPhaseCommit;
        let fingerprint = log::fingerprint(asked, &legs);
        let (txn, outcome, actions) = match &key {
            Some(key) => {
                let _serialised = self.inner.keys.lock().expect("keys lock poisoned");
                if let Some(earlier) = self.keyed_result(key)? {
                    log::same_request(key, &earlier, asked, &legs)?;
                    return Ok((earlier.txn, earlier.outcome));
                }
                let saga = self.inner.sagas.lock().expect("saga lock poisoned").key_in_flight(key).cloned();
                if let Some(saga) = saga {
                    return Err(Error::Conflict(format!(
                        "a saga with idempotency key {key} is running ({saga}); retry to get its outcome"
                    )));
                }
                // A one-phase transaction with this key whose client heard
                // its outcome, which is being logged: that outcome. A
                // parallel commit with this key whose client heard
                // COMMITTED, not yet ended: COMMITTED.
                let in_memory = {
                    let core = self.core();
                    let answered = core.answered_one_phase(key).map(|(txn, outcome, legs)| log::KeyedResult {
                        txn: txn.clone(),
                        outcome: outcome.clone(),
                        fingerprint: log::fingerprint(asked, legs),
                        expires_ms: u64::MAX,
                    });
                    answered.or_else(|| {
                        core.committed_in_parallel(key).map(|(txn, fingerprint)| log::KeyedResult {
                            txn: txn.clone(),
                            outcome: Outcome::Committed,
                            fingerprint,
                            expires_ms: u64::MAX,
                        })
                    })
                };
                if let Some(earlier) = in_memory {
                    log::same_request(key, &earlier, asked, &legs)?;
                    return Ok((earlier.txn, earlier.outcome));
                }
                self.begin_transaction(by_participant, Some(key.clone()), fingerprint)?
            }
            None => self.begin_transaction(by_participant, None, fingerprint)?,
        };
        metrics::counter!("tandem_transactions_begun_total").increment(1);
        if tandem::trace::on() {
            // The `transfer` span of the call (see the handlers).
            let span = Span::current();
            span.record("txn_id", txn.as_str());
            self.inner.traces.keep(&txn, &span);
        }
        self.execute(actions);
        let outcome =
            outcome.await.unwrap_or_else(|_| Err(Error::Unavailable("the coordinator is stopping".into())))?;
        self.count_outcome(&outcome, how, started);
        Ok((txn, outcome))
    }

    /// Counts a transaction's outcome, and times it from its arrival.
    fn count_outcome(&self, outcome: &Outcome, how: &'static str, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        match outcome {
            Outcome::Committed => {
                metrics::counter!("tandem_transactions_committed_total", "how" => how).increment(1);
                metrics::histogram!("tandem_transaction_duration_seconds", "outcome" => "committed", "how" => how)
                    .record(seconds);
            }
            Outcome::Aborted(reason, _)
            | Outcome::Compensated(Some(reason), _)
            | Outcome::DeadLettered(Some(reason), _) => {
                metrics::counter!("tandem_transactions_aborted_total", "reason" => reason.as_str()).increment(1);
                metrics::histogram!("tandem_transaction_duration_seconds", "outcome" => "aborted", "how" => how)
                    .record(seconds);
            }
            Outcome::Compensated(None, _) | Outcome::DeadLettered(None, _) => {}
        }
    }

    /// How a transaction over `participants` participants commits here: a
    /// metric's label.
    fn commit_path(&self, participants: usize, keyed: bool) -> &'static str {
        let config = &self.inner.config;
        if config.one_phase_commit.applies(config.commit_protocol, participants, keyed) {
            "one_phase"
        } else {
            match config.commit_protocol {
                CommitProtocol::Parallel => "parallel",
                CommitProtocol::Classic => "classic",
            }
        }
    }

    /// Carries out the core's actions; results come back into the core.
    fn execute(&self, actions: Vec<Action>) {
        for action in actions {
            debug!(?action, "execute");
            match action {
                Action::SendPrepare { txn, position, participant, legs, idempotency_key, after_failure } => {
                    let node = self.clone();
                    let send = move || {
                        let deadline = Instant::now() + Duration::from_millis(node.inner.config.prepare_timeout_ms);
                        let prepare = QueuedPrepare { txn, position, legs, idempotency_key, deadline };
                        node.outbound(&participant).prepares.push(prepare);
                    };
                    if after_failure {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(PREPARE_RESEND_PAUSE_MS)).await;
                            send();
                        });
                    } else {
                        send();
                    }
                }
                Action::PersistCommit { txn, record } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let fingerprint = node.waiter_fingerprint(&txn);
                        let written = node
                            .write_record(
                                &txn,
                                "commit",
                                log::commit_ops(&txn, &record, fingerprint, node.expires_ms()),
                            )
                            .await;
                        match written {
                            Ok(()) => {
                                let next = {
                                    let mut core = node.core();
                                    node.note_decided_commit(&txn);
                                    core.on_commit_durable(&txn)
                                };
                                node.execute(next);
                            }
                            Err(error) => {
                                // The decision may or may not be on disk: the
                                // client must not hear either outcome. A restart
                                // reads the log and finishes whichever it is.
                                error!(%txn, %error, "writing a commit decision failed; outcome unknown until restart");
                                node.reply(&txn, Err(Error::Unavailable(format!(
                                    "{txn}: the decision log failed ({error}); the outcome is unknown until the coordinator restarts"
                                ))));
                            }
                        }
                    });
                }
                Action::PersistStaged { txn, mut record } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        record.fingerprint = node.waiter_fingerprint(&txn);
                        let written = node.write_record(&txn, "staged", log::staged_ops(&txn, &record)).await;
                        match written {
                            Ok(()) => {
                                let next = {
                                    let mut core = node.core();
                                    let next = core.on_staged_durable(&txn, record.fingerprint);
                                    node.note_decided_commits(&next);
                                    next
                                };
                                node.execute(next);
                            }
                            Err(error) => {
                                // The record may or may not be on disk: if it
                                // is, a restart prepares the transaction again
                                // and decides it. The client must not hear
                                // either outcome.
                                error!(%txn, %error, "writing a staged record failed; outcome unknown until restart");
                                node.reply(&txn, Err(Error::Unavailable(format!(
                                    "{txn}: the decision log failed ({error}); the outcome is unknown until the coordinator restarts"
                                ))));
                            }
                        }
                    });
                }
                Action::PersistStagedAbort { txn, idempotency_key, fingerprint, outcome } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let written = node
                            .write_record(
                                &txn,
                                "abort",
                                log::staged_abort_ops(
                                    &txn,
                                    idempotency_key.as_ref(),
                                    &outcome,
                                    fingerprint,
                                    node.expires_ms(),
                                ),
                            )
                            .await;
                        match written {
                            Ok(()) => {
                                let next = node.core().on_abort_durable(&txn, outcome);
                                node.execute(next);
                            }
                            Err(error) => {
                                error!(%txn, %error, "logging an abort failed; outcome unknown until restart");
                                node.reply(&txn, Err(Error::Unavailable(format!(
                                    "{txn}: the decision log failed ({error}); the outcome is unknown until the coordinator restarts"
                                ))));
                            }
                        }
                    });
                }
                Action::SendCommit { txn, participant } => {
                    // Decided while an audit reads: its COMMIT waits for the
                    // audit (see the module essay).
                    if !self.inner.audits.lock().expect("audits lock poisoned").hold(&txn, &participant) {
                        self.outbound(&participant).commits.push(txn);
                    }
                }
                Action::SendAbort { txn, position, participant } => {
                    let node = self.clone();
                    tokio::spawn(async move { node.send_abort(&txn, position, &participant).await });
                }
                Action::PersistAbort { txn, key, outcome } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let fingerprint = node.waiter_fingerprint(&txn);
                        let written = node
                            .write_record(
                                &txn,
                                "abort",
                                log::abort_ops(&txn, &key, &outcome, fingerprint, node.expires_ms()),
                            )
                            .await;
                        match written {
                            Ok(()) => {
                                let next = node.core().on_abort_durable(&txn, outcome);
                                node.execute(next);
                            }
                            Err(error) => node.reply(&txn, Err(error)),
                        }
                    });
                }
                Action::Reply { txn, outcome } => self.reply(&txn, Ok(outcome)),
                Action::ReplyUnknown { txn, message } => self.reply(&txn, Err(Error::Unavailable(message))),
                Action::PersistIntent { txn, record } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let written = node.write_record(&txn, "intent", log::intent_ops(&txn, &record)).await;
                        match written {
                            Ok(()) => {
                                let next = node.core().on_intent_durable(&txn);
                                node.execute(next);
                            }
                            Err(error) => {
                                // The intent may or may not be on disk: if it
                                // is, a restart sends the request. The client
                                // must not hear either outcome.
                                error!(%txn, %error, "writing a one-phase intent failed; outcome unknown until restart");
                                node.reply(&txn, Err(Error::Unavailable(format!(
                                    "{txn}: the decision log failed ({error}); the outcome is unknown until the coordinator restarts"
                                ))));
                            }
                        }
                    });
                }
                Action::SendOnePhase { txn, position, participant, legs, idempotency_key } => {
                    let deadline = Instant::now() + Duration::from_millis(self.inner.config.prepare_timeout_ms);
                    let request = QueuedOnePhase {
                        txn,
                        position,
                        legs,
                        idempotency_key,
                        deadline,
                        unanswered: 0,
                        backoff_ms: COMMIT_RETRY_INITIAL_MS,
                    };
                    self.outbound(&participant).one_phase.push(request);
                }
                Action::PersistOnePhaseOutcome { txn, idempotency_key, outcome, legs } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        // The fingerprint the request had: every leg is here.
                        let fingerprint = log::fingerprint(log::Asked::TwoPhaseCommit, &legs);
                        // No fsync: the watermark that passes it is written
                        // after it and fsynced before it is sent; until this
                        // write is durable the intent stands (a restart asks
                        // the participant, which still holds the record).
                        let written = log::one_phase_outcome_ops(
                            &txn,
                            idempotency_key.as_ref(),
                            &outcome,
                            fingerprint,
                            node.expires_ms(),
                        )
                        .and_then(|ops| node.inner.store.submit(ops, Durability::Buffered));
                        let result = match written {
                            Ok(wait) => wait.await.unwrap_or_else(|_| Err(Error::Fatal("writer stopped".into()))),
                            Err(error) => Err(error),
                        };
                        match result {
                            Ok(()) => node.core().on_one_phase_logged(&txn),
                            Err(error) => {
                                error!(%txn, %error, "logging a one-phase outcome failed; its key stays in flight, and a restart asks the participant again")
                            }
                        }
                    });
                }
                Action::PersistEnd { txn, idempotency_key, staged } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        // Unsynced: a lost end record only means commits are
                        // redelivered after a restart, and applied once.
                        // Deferred: nobody waits for it, so it rides on the
                        // next write rather than wake the writer (see
                        // `tandem::store::DEFERRED_LINGER_US`).
                        let written = log::end_ops(&txn, idempotency_key, staged, node.expires_ms())
                            .and_then(|ops| node.inner.store.submit(ops, Durability::Deferred));
                        let result = match written {
                            Ok(wait) => wait.await.unwrap_or_else(|_| Err(Error::Fatal("writer stopped".into()))),
                            Err(error) => Err(error),
                        };
                        match result {
                            Ok(()) => {
                                node.inner.traces.forget(&txn);
                                node.core().on_end_durable(&txn)
                            }
                            Err(error) => error!(%txn, %error, "writing an end record failed"),
                        }
                    });
                }
            }
        }
    }

    /// Sets the gauges read from this node's state (before each scrape of
    /// its metrics).
    pub fn observe_gauges(&self) {
        metrics::gauge!("tandem_transactions_in_flight").set(self.core().active_count() as f64);
        metrics::gauge!("tandem_dead_letters").set(self.saga_core().dead_letters().len() as f64);
        metrics::gauge!("tandem_store_failed").set(if self.inner.store.has_failed() { 1.0 } else { 0.0 });
        for (participant, outbound) in &self.inner.outbound {
            let depths = [
                ("prepare", outbound.prepares.len()),
                ("one_phase", outbound.one_phase.len()),
                ("commit", outbound.commits.len()),
                ("step", outbound.steps.len()),
            ];
            for (queue, depth) in depths {
                let labels = [("participant", participant.to_string()), ("queue", queue.to_string())];
                metrics::gauge!("tandem_outbound_queue_depth", &labels).set(depth as f64);
            }
        }
    }

    /// One span `name` per transaction of a batch call, under each one's
    /// trace (none when this process does not export traces).
    fn spans<'a>(&self, name: &str, txns: impl Iterator<Item = &'a TxnId>) -> Vec<Span> {
        if !tandem::trace::on() {
            return Vec::new();
        }
        txns.map(|txn| self.inner.traces.span(name, txn)).collect()
    }

    /// Writes one of `txn`'s records (`record` names it for the metrics and
    /// its span, `log RECORD`) and waits until it is fsynced.
    async fn write_record(
        &self,
        txn: &TxnId,
        record: &'static str,
        ops: Result<Vec<tandem::store::Op>, Error>,
    ) -> Result<(), Error> {
        let ops = ops?;
        let started = Instant::now();
        let span =
            if tandem::trace::on() { self.inner.traces.span(&format!("log {record}"), txn) } else { Span::none() };
        let written = self.inner.store.write(ops).instrument(span).await;
        metrics::histogram!("tandem_decision_write_seconds", "record" => record)
            .record(started.elapsed().as_secs_f64());
        written
    }

    /// A coordinator whose decision log failed a write or an fsync can no
    /// longer make a decision durable: it must not start transactions whose
    /// participants would then hold prepared reservations until a restart.
    pub(crate) fn refuse_if_store_failed(&self) -> Result<(), Error> {
        if self.inner.store.has_failed() {
            return Err(Error::Fatal(format!(
                "the decision log of {} failed a write; it starts nothing until it is restarted",
                self.inner.config.node_id
            )));
        }
        Ok(())
    }

    fn waiter_fingerprint(&self, txn: &TxnId) -> u64 {
        self.inner.waiters.lock().expect("waiters lock poisoned").get(txn).map(|w| w.fingerprint).unwrap_or(0)
    }

    /// Hands a commit decision that just became durable to every running
    /// audit, before its COMMITs go out. Called under the core's lock, with
    /// the core's step to committing (see the module essay).
    fn note_decided_commit(&self, txn: &TxnId) {
        let mut audits = self.inner.audits.lock().expect("audits lock poisoned");
        if !audits.running.is_empty() {
            audits.note(txn);
        }
    }

    /// Sends the COMMITs that the audits held back and no longer hold.
    fn send_released_commits(&self, released: Vec<(TxnId, Id)>) {
        for (txn, participant) in released {
            self.outbound(&participant).commits.push(txn);
        }
    }

    /// [`Node::note_decided_commit`] for every transaction that a step of
    /// the core just committed by parallel commit (its first COMMIT is in
    /// `actions`). Called under the core's lock, with that step.
    fn note_decided_commits(&self, actions: &[Action]) {
        let mut last = None;
        for action in actions {
            if let Action::SendCommit { txn, .. } = action {
                if last != Some(txn) {
                    self.note_decided_commit(txn);
                    last = Some(txn);
                }
            }
        }
    }

    pub(crate) fn reply(&self, txn: &TxnId, result: Result<Outcome, Error>) {
        let waiter = self.inner.waiters.lock().expect("waiters lock poisoned").remove(txn);
        if let Some(waiter) = waiter {
            // A client that went away no longer listens; the outcome stands.
            let _ = waiter.reply.send(result);
        }
    }

    pub(crate) fn client(&self, participant: &Id) -> ParticipantClient<Channel> {
        self.inner.participants.get(participant).expect("the core only names directory participants").clone()
    }

    /// Tells `participant`, later and in a batch, that `saga` ended.
    pub(crate) fn forget_saga_later(&self, participant: &Id, saga: &TxnId) {
        if !self.outbound(participant).forgets.push_bounded(saga.clone(), FORGETS_WAITING_MAX) {
            warn!(%participant, %saga, "too many ended sagas wait to be forgotten; this one's barriers stay");
        }
    }

    pub(crate) fn outbound(&self, participant: &Id) -> &Outbound {
        self.inner.outbound.get(participant).expect("the core only names directory participants")
    }

    /// Drains one of `participant`'s queues for as long as the node runs:
    /// a batch goes out as soon as one of [`BATCHES_IN_FLIGHT_MAX`] call
    /// slots is free, handled by `send` in a task of its own. With a
    /// `linger`, a batch goes once its oldest message has waited that long,
    /// and what another sender took meanwhile (COMMITs riding on prepares)
    /// is not sent here.
    async fn drain<T, Fut>(
        self,
        participant: Id,
        queue_name: &'static str,
        queue: fn(&Outbound) -> &BatchQueue<T>,
        batch_max: usize,
        linger: Duration,
        send: fn(Node, Id, Vec<T>) -> Fut,
    ) where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let outbound = self.inner.outbound[&participant].clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT_MAX));
        let labels = [("participant", participant.to_string()), ("queue", queue_name.to_string())];
        let batch_size = metrics::histogram!("tandem_outbound_batch_size", &labels);
        let call_seconds = metrics::histogram!("tandem_outbound_call_seconds", &labels);
        loop {
            let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
            let batch = queue(&outbound).next_batch(batch_max, linger).await;
            batch_size.record(batch.len() as f64);
            let sending = send(self.clone(), participant.clone(), batch);
            let call_seconds = call_seconds.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                sending.await;
                call_seconds.record(started.elapsed().as_secs_f64());
                drop(slot);
            });
        }
    }

    /// Sends a batch of prepares in one call and feeds each vote to the
    /// core. A prepare whose deadline passed while it waited for a call
    /// slot is not sent: it votes NO at once, like a prepare that did not
    /// answer in time; a failed call is a NO from each of them.
    async fn send_prepares(self, participant: Id, batch: Vec<QueuedPrepare>) {
        let now = Instant::now();
        let (late, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.deadline <= now);
        let mut votes: Vec<(TxnId, VoteResult)> = late
            .into_iter()
            .map(|p| {
                let why = format!("{participant}: the prepare waited past its deadline for a call slot");
                (p.txn, VoteResult::No(AbortReason::ParticipantUnavailable, why))
            })
            .collect();
        // Oldest first: the first deadline is the earliest.
        if let Some(timeout) = batch.first().map(|p| p.deadline - now) {
            let coordinator_id = self.inner.config.node_id.to_string();
            // Read now: every prepare in the batch holds it back already.
            let low_watermark = self.core().watermark(&participant);
            let spans = self.spans("prepare", batch.iter().map(|p| &p.txn));
            let prepares = batch
                .iter()
                .enumerate()
                .map(|(i, p)| pb::PrepareRequest {
                    txn_id: p.txn.to_string(),
                    coordinator_id: coordinator_id.clone(),
                    legs: p.legs.iter().copied().map(pb::Leg::from).collect(),
                    coordinator_incarnation: self.inner.incarnation,
                    position: p.position,
                    low_watermark,
                    idempotency_key: p.idempotency_key.as_ref().map(Id::to_string).unwrap_or_default(),
                    trace_parent: spans.get(i).map(tandem::trace::traceparent).unwrap_or_default(),
                })
                .collect();
            // The COMMITs this participant is owed ride along: one call, one
            // write there for both (see COMMIT_LINGER_MS).
            let outbound = self.outbound(&participant);
            let commits = outbound.commits.take(COMMIT_BATCH_MAX);
            let riding = (!commits.is_empty()).then(|| {
                let spans = self.spans("commit", commits.iter());
                pb::DecisionBatchRequest {
                    txn_ids: commits.iter().map(|t| t.to_string()).collect(),
                    coordinator_id: coordinator_id.clone(),
                    coordinator_incarnation: self.inner.incarnation,
                    low_watermark,
                    trace_parents: spans.iter().map(tandem::trace::traceparent).collect(),
                }
            });
            let mut client = self.client(&participant);
            let request = pb::PrepareBatchRequest { prepares, commits: riding };
            let answered = timed_call(timeout, client.prepare_batch(request)).await;
            let commits_taken = match &answered {
                Ok(response) if response.commits_refused_code == 0 => true,
                Ok(response) => {
                    debug!(
                        %participant,
                        count = commits.len(),
                        code = response.commits_refused_code,
                        error = %clip_text(&response.commits_refused_reason, REASON_LEN_MAX),
                        "COMMITs riding on prepares refused; delivering them by CommitBatch"
                    );
                    false
                }
                Err(_) => false,
            };
            if commits_taken {
                for txn in &commits {
                    let next = self.core().on_commit_acked(txn, &participant);
                    self.execute(next);
                }
            } else {
                // Not acknowledged: the commit sender delivers them (again,
                // if this call applied them: a COMMIT is applied once).
                commits.into_iter().for_each(|txn| outbound.commits.push(txn));
            }
            match answers_for(&batch, answered.map(|r| r.votes)) {
                Ok(answers) => {
                    for (prepare, answer) in batch.into_iter().zip(answers) {
                        votes.push((prepare.txn, vote_from_pb(&participant, answer)));
                    }
                }
                Err(status) => {
                    let why = format!(
                        "{participant} failed the prepare: {:?} {}",
                        status.code(),
                        clip_text(status.message(), REASON_LEN_MAX)
                    );
                    let no =
                        |p: QueuedPrepare| (p.txn, VoteResult::No(AbortReason::ParticipantUnavailable, why.clone()));
                    votes.extend(batch.into_iter().map(no));
                }
            }
        }
        for (txn, vote) in votes {
            debug!(%txn, %participant, ?vote, "vote");
            let next = {
                let mut core = self.core();
                let next = core.on_vote(&txn, &participant, vote);
                // A parallel commit is committed by its last YES.
                self.note_decided_commits(&next);
                next
            };
            self.execute(next);
        }
    }

    /// Sends a batch of one-phase commits in one call and feeds each answer
    /// to the core. A request is sent again, with backoff, until its
    /// participant answers it: an unanswered call may have been applied,
    /// and only the participant's answer (its first one, to a duplicate)
    /// tells. Once a request's client deadline has passed, the core is told
    /// ([`Core::on_one_phase_overdue`]): its client hears that the outcome
    /// is unknown. A call refused as a whole before the participant ran it
    /// ([`refused_before_running`]) refuses its requests that no earlier
    /// call could have delivered.
    async fn send_one_phases(self, participant: Id, batch: Vec<QueuedOnePhase>) {
        let now = Instant::now();
        self.tell_overdue(&batch, now);
        let timeout = batch
            .iter()
            .map(|request| request.deadline)
            .filter(|deadline| *deadline > now)
            .min()
            .map_or(Duration::from_millis(self.inner.config.call_timeout_ms), |deadline| deadline - now);
        let coordinator_id = self.inner.config.node_id.to_string();
        // Read now: every request in the batch holds it back already.
        let low_watermark = self.core().watermark(&participant);
        let spans = self.spans("commit one phase", batch.iter().map(|request| &request.txn));
        let requests = batch
            .iter()
            .enumerate()
            .map(|(i, request)| pb::OnePhaseRequest {
                txn_id: request.txn.to_string(),
                coordinator_id: coordinator_id.clone(),
                legs: request.legs.iter().copied().map(pb::Leg::from).collect(),
                coordinator_incarnation: self.inner.incarnation,
                position: request.position,
                low_watermark,
                idempotency_key: request.idempotency_key.as_ref().map(Id::to_string).unwrap_or_default(),
                trace_parent: spans.get(i).map(tandem::trace::traceparent).unwrap_or_default(),
            })
            .collect();
        let mut client = self.client(&participant);
        let answered = timed_call(timeout, client.commit_one_phase_batch(pb::OnePhaseBatchRequest { requests })).await;
        let mut results: Vec<(TxnId, OnePhaseResult)> = Vec::new();
        let mut again: Vec<QueuedOnePhase> = Vec::new();
        match answers_for(&batch, answered.map(|r| r.answers)) {
            Ok(answers) => {
                for (request, answer) in batch.into_iter().zip(answers) {
                    match one_phase_from_pb(&participant, answer) {
                        Some(result) => results.push((request.txn, result)),
                        None => again.push(request),
                    }
                }
            }
            Err(status) => {
                let why = clip_text(status.message(), REASON_LEN_MAX);
                for request in batch {
                    if refused_before_running(&status) && request.unanswered == 0 {
                        let why = format!("{participant} refused the one-phase commit: {:?} {why}", status.code());
                        results.push((request.txn, OnePhaseResult::Refused(AbortReason::Refused, why)));
                    } else {
                        again.push(request);
                    }
                }
                if !again.is_empty() {
                    debug!(%participant, code = ?status.code(), error = %why, count = again.len(), "one-phase commits not answered; sending them again");
                }
            }
        }
        for (txn, result) in results {
            debug!(%txn, %participant, ?result, "one-phase answer");
            let next = self.core().on_one_phase_answer(&txn, &participant, result);
            self.execute(next);
        }
        if again.is_empty() {
            return;
        }
        let now = Instant::now();
        self.tell_overdue(&again, now);
        // Again after the shortest backoff, but no later than the next
        // client deadline (so that its client is told in time).
        let mut wait = again.iter().map(|request| Duration::from_millis(request.backoff_ms)).min().unwrap_or_default();
        if let Some(deadline) = again.iter().map(|request| request.deadline).filter(|deadline| *deadline > now).min() {
            wait = wait.min(deadline - now);
        }
        for request in &mut again {
            request.unanswered += 1;
            request.backoff_ms = (request.backoff_ms * 2).min(COMMIT_RETRY_MAX_MS);
        }
        let node = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let outbound = node.outbound(&participant);
            for request in again {
                outbound.one_phase.push(request);
            }
        });
    }

    /// Tells the core about the one-phase requests whose client deadline has
    /// passed (it answers each client once).
    fn tell_overdue(&self, requests: &[QueuedOnePhase], now: Instant) {
        for request in requests.iter().filter(|request| request.deadline <= now) {
            let next = self.core().on_one_phase_overdue(&request.txn);
            self.execute(next);
        }
    }

    /// Sends a batch of saga steps in one call and hands each its answer. A
    /// step whose deadline passed in the queue is not sent (its caller
    /// stopped waiting); when no answer comes in time, the callers time out
    /// and retry.
    async fn send_steps(self, participant: Id, batch: Vec<QueuedStep>) {
        let now = Instant::now();
        let batch: Vec<QueuedStep> = batch.into_iter().filter(|s| s.deadline > now).collect();
        let Some(timeout) = batch.first().map(|s| s.deadline - now) else { return };
        let (mut steps, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|s| (s.step, s.reply)).unzip();
        // Read now: every saga with a step in the batch holds it back already.
        let low_watermark = self.inner.sagas.lock().expect("saga lock poisoned").watermark(&participant);
        steps.iter_mut().for_each(|step| step.low_watermark = low_watermark);
        let mut client = self.client(&participant);
        let answered = timed_call(timeout, client.saga_step_batch(pb::SagaStepBatchRequest { steps })).await;
        match answers_for(&replies, answered.map(|r| r.results)) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let answer = match result.response {
                        Some(response) => Ok(response),
                        None => Err(Status::new(tonic::Code::from(result.error_code), result.error)),
                    };
                    let _ = reply.send(answer);
                }
            }
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {}
            Err(status) => replies.into_iter().for_each(|reply| drop(reply.send(Err(status.clone())))),
        }
    }

    /// Delivers a batch of COMMITs in one call, redelivered until the
    /// participant answers it, then feeds each acknowledgement to the core.
    /// A batch the participant rejects ([`commit_rejected`]; the whole batch
    /// is refused for one COMMIT it rejects) is split in halves, each
    /// delivered in turn, down to the rejected COMMITs alone: those leave
    /// the slot ([`Node::set_aside`]), and the others are delivered.
    async fn send_commits(self, participant: Id, batch: Vec<TxnId>) {
        // Parts still to deliver; the last is next, so they go oldest first.
        let mut parts = vec![batch];
        while let Some(mut part) = parts.pop() {
            let delivered = self
                .call_until_answered("commit", &participant, COMMIT_RETRY_MAX_MS, commit_rejected, |timeout| {
                    self.commit_call(&participant, &part, timeout)
                })
                .await;
            match delivered {
                Ok(()) => {
                    for txn in &part {
                        let next = self.core().on_commit_acked(txn, &participant);
                        self.execute(next);
                    }
                }
                Err(status) if part.len() > 1 => {
                    warn!(
                        %participant,
                        count = part.len(),
                        code = ?status.code(),
                        error = %clip_text(status.message(), REASON_LEN_MAX),
                        "commit batch rejected; splitting it to deliver the COMMITs it does not reject"
                    );
                    let second = part.split_off(part.len() / 2);
                    parts.push(second);
                    parts.push(part);
                }
                Err(status) => {
                    let txn = part.pop().expect("a part holds at least one COMMIT");
                    self.set_aside(&participant, txn, &status).await;
                }
            }
        }
    }

    /// Takes a COMMIT that `participant` rejected out of the call slots, into
    /// its undeliverable set. When the set is full, the COMMIT is offered
    /// again from here (so it keeps its slot) until the participant takes it.
    async fn set_aside(&self, participant: &Id, txn: TxnId, status: &Status) {
        let why = clip_text(status.message(), REASON_LEN_MAX);
        let code = status.code();
        if self.outbound(participant).undeliverable.insert_bounded(txn.clone(), COMMITS_UNDELIVERABLE_MAX) {
            error!(
                %txn, %participant, ?code, error = %why,
                "the participant rejected a COMMIT; the decision stands, and it is offered again every {UNDELIVERABLE_RETRY_INITIAL_MS} to {UNDELIVERABLE_RETRY_MAX_MS} ms until taken"
            );
            return;
        }
        error!(
            %txn, %participant, ?code, error = %why,
            "the participant rejected a COMMIT, and {COMMITS_UNDELIVERABLE_MAX} of its rejected COMMITs wait already; this one is offered again from its call slot"
        );
        let alone = std::slice::from_ref(&txn);
        let delivered = self
            .call_until_answered(
                "rejected commit",
                participant,
                UNDELIVERABLE_RETRY_MAX_MS,
                |_| false,
                |timeout| self.commit_call(participant, alone, timeout),
            )
            .await;
        if delivered.is_ok() {
            let next = self.core().on_commit_acked(&txn, participant);
            self.execute(next);
        }
    }

    /// Offers the COMMITs `participant` rejected again, each alone, out of
    /// the call slots, for as long as the node runs: every
    /// [`UNDELIVERABLE_RETRY_INITIAL_MS`], doubling up to
    /// [`UNDELIVERABLE_RETRY_MAX_MS`] while some are still rejected. One
    /// that the participant takes is acknowledged to the core like any
    /// other. A failure that is not a rejection (the participant is
    /// unreachable) ends the round; the next one starts over.
    async fn redeliver_undeliverable(self, participant: Id) {
        let outbound = self.inner.outbound[&participant].clone();
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut backoff_ms = UNDELIVERABLE_RETRY_INITIAL_MS;
        loop {
            outbound.undeliverable.wait_for_one().await;
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            let aside: Vec<TxnId> = outbound.undeliverable.txns().iter().cloned().collect();
            for txn in &aside {
                match self.commit_call(&participant, std::slice::from_ref(txn), timeout).await {
                    Ok(()) => {
                        outbound.undeliverable.txns().remove(txn);
                        info!(%txn, %participant, "a COMMIT the participant had rejected is delivered");
                        let next = self.core().on_commit_acked(txn, &participant);
                        self.execute(next);
                    }
                    Err(status) if commit_rejected(&status) => {
                        debug!(%txn, %participant, error = %status.message(), "COMMIT rejected again")
                    }
                    Err(status) => {
                        debug!(%participant, error = %status.message(), "rejected COMMITs not offered: the participant does not answer");
                        break;
                    }
                }
            }
            let waiting = outbound.undeliverable.txns().len();
            if waiting == 0 {
                backoff_ms = UNDELIVERABLE_RETRY_INITIAL_MS;
                continue;
            }
            backoff_ms = (backoff_ms * 2).min(UNDELIVERABLE_RETRY_MAX_MS);
            error!(
                %participant,
                waiting,
                "COMMITs the participant rejected are still undelivered (their decisions stand); offered again in {backoff_ms} ms"
            );
        }
    }

    async fn commit_call(&self, participant: &Id, txns: &[TxnId], timeout: Duration) -> Result<(), Status> {
        let spans = self.spans("commit", txns.iter());
        let request = pb::DecisionBatchRequest {
            txn_ids: txns.iter().map(|t| t.to_string()).collect(),
            coordinator_id: self.inner.config.node_id.to_string(),
            coordinator_incarnation: self.inner.incarnation,
            low_watermark: self.core().watermark(participant),
            trace_parents: spans.iter().map(tandem::trace::traceparent).collect(),
        };
        timed_call(timeout, self.client(participant).commit_batch(request)).await.map(drop)
    }

    /// Tells `participant` which sagas ended, every [`FORGET_LINGER_MS`]
    /// what gathered in one call, once an fsync has made the sagas' ends
    /// durable here (a saga whose end a crash could undo would be redone,
    /// and would need its barriers).
    async fn send_forgets(self, participant: Id) {
        let outbound = self.inner.outbound[&participant].clone();
        loop {
            let batch = outbound.forgets.next_batch(FORGET_BATCH_MAX, Duration::from_millis(FORGET_LINGER_MS)).await;
            if let Err(error) = self.inner.store.sync().await {
                warn!(%error, "the saga log cannot be synced; ended sagas are not forgotten");
                continue;
            }
            let saga_ids: Vec<String> = batch.iter().map(|s| s.to_string()).collect();
            let forgotten = self
                .call_until_answered(
                    "forget sagas",
                    &participant,
                    5 * COMMIT_RETRY_MAX_MS,
                    |status| status.code() == tonic::Code::InvalidArgument,
                    |timeout| {
                        let mut client = self.client(&participant);
                        let request = pb::ForgetSagasRequest { saga_ids: saga_ids.clone() };
                        async move { timed_call(timeout, client.forget_sagas(request)).await }
                    },
                )
                .await;
            match forgotten {
                Ok(answer) => {
                    debug!(%participant, sagas = batch.len(), marked = answer.barriers_marked, "ended sagas forgotten")
                }
                Err(status) => {
                    error!(%participant, error = %status.message(), "ForgetSagas refused; these barriers stay")
                }
            }
        }
    }

    /// Calls `call` (with the call timeout) until it answers, backing off
    /// from [`COMMIT_RETRY_INITIAL_MS`] to `backoff_max_ms`, unless `stop`
    /// says an error is final. The first failure is logged; so is a success
    /// that took retries.
    async fn call_until_answered<T, Fut>(
        &self,
        what: &str,
        participant: &Id,
        backoff_max_ms: u64,
        stop: impl Fn(&Status) -> bool,
        mut call: impl FnMut(Duration) -> Fut,
    ) -> Result<T, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut backoff_ms = COMMIT_RETRY_INITIAL_MS;
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            match call(timeout).await {
                Ok(answer) => {
                    if attempts > 1 {
                        info!(%participant, attempts, "{what} delivered after retries");
                    }
                    return Ok(answer);
                }
                Err(status) if stop(&status) => return Err(status),
                Err(status) if attempts == 1 => {
                    warn!(%participant, code = ?status.code(), error = %status.message(), "{what} not acknowledged; will redeliver")
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
            backoff_ms = (backoff_ms * 2).min(backoff_max_ms);
        }
    }

    async fn send_abort(&self, txn: &TxnId, position: u64, participant: &Id) {
        let timeout = Duration::from_millis(self.inner.config.call_timeout_ms);
        let mut client = self.client(participant);
        let span = self.inner.traces.span("abort", txn);
        let request = pb::DecisionRequest {
            txn_id: txn.to_string(),
            coordinator_id: self.inner.config.node_id.to_string(),
            coordinator_incarnation: self.inner.incarnation,
            position,
            trace_parent: tandem::trace::traceparent(&span),
        };
        if let Err(status) = timed_call(timeout, client.abort(request)).instrument(span).await {
            debug!(%txn, %participant, error = %status.message(), "abort not delivered; the participant will ask");
        }
    }

    /// The decision for a participant's query.
    ///
    /// A finished transaction (its end record written) is answered ABORT
    /// even if it committed: the end record follows the last participant's
    /// acknowledgement, and a participant acknowledges only once its commit
    /// is durable, so no participant can legitimately be in doubt about it.
    /// One that asks holds a stale duplicate of the prepare, prepared anew
    /// after it forgot the original; COMMIT would apply the transfer twice.
    ///
    /// `asked_incarnation` is the incarnation the participant says the
    /// transaction was prepared under (0: it does not say); one of another
    /// incarnation is never answered from this log (see
    /// [`crate::core::other_incarnation`]).
    pub fn decision(&self, txn: &TxnId, asked_incarnation: u64) -> Result<Decision, Error> {
        let carried = log::incarnation_of(&self.inner.config.node_id, txn);
        if let Some(other) = crate::core::other_incarnation(self.inner.incarnation, asked_incarnation, carried) {
            warn!(
                %txn,
                incarnation = %format!("{other:016x}"),
                own = %format!("{:016x}", self.inner.incarnation),
                "a participant asked about a transaction of another incarnation of this coordinator (its log is gone): its decision is unknown here, never presumed ABORT"
            );
            return Ok(Decision::UnknownIncarnation);
        }
        {
            let core = self.core();
            if let Some(decision) = core.query(txn) {
                // A commit whose COMMITs an audit holds back is not told to
                // a participant that asks either, until the audit ends.
                if decision == Decision::Commit && self.inner.audits.lock().expect("audits lock poisoned").holds(txn) {
                    return Ok(Decision::Pending);
                }
                return Ok(decision);
            }
        }
        if self.inner.store.get(&log::key(log::DECISION_PREFIX, txn))?.is_some() {
            return Ok(Decision::Commit);
        }
        let finished_key = log::key(log::FINISHED_PREFIX, txn);
        if let Some(bytes) = self.inner.store.get(&finished_key)? {
            if log::decode_at(&finished_key, &bytes, log::decode_finished)?.committed() {
                warn!(%txn, "a participant asked about a transaction whose commit every participant acknowledged: a stale duplicate prepare; answering ABORT");
            }
        }
        Ok(Decision::Abort)
    }

    /// Serves the coordinator, health and reflection services on `listener`
    /// until `shutdown` resolves, after resuming `recovered` actions.
    pub async fn run(
        self,
        listener: TcpListener,
        recovered: Recovered,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        self.run_on(incoming, recovered, shutdown).await
    }

    /// [`Node::run`] on any stream of accepted connections (a simulation's).
    pub async fn run_on<IO, IE>(
        self,
        incoming: impl Stream<Item = Result<IO, IE>>,
        recovered: Recovered,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Decision queries only from the participants of the directory (see
        // tandem::trust); no coordinator calls another.
        let configured = Configured {
            coordinators: Default::default(),
            participants: self.inner.directory.shards().map(|shard| shard.participant.clone()).collect(),
        };
        let mut server = tandem::server::server_builder(
            &self.inner.config.security,
            Authorizer::for_node(&self.inner.config.security, configured),
        )?;
        self.execute(recovered.commits);
        self.execute_saga(recovered.sagas);
        // Not ready until the first probes have answered.
        let (health, health_service) = Health::new(
            tandem::pb::coordinator_server::SERVICE_NAME,
            Some(READY_SERVICE),
            "its participants have not answered a probe yet",
        )
        .await;
        for participant in self.inner.participant_health.keys() {
            health
                .reporter()
                .set_service_status(participant_ready_service(participant), ServingStatus::NotServing)
                .await;
        }
        let health = Arc::new(health);
        let _ = self.inner.health.set(health.clone());
        let prober = tokio::spawn(self.clone().probe_participants(health));
        let collector = tokio::spawn(self.clone().collect_garbage());
        let watermarks = tokio::spawn(self.clone().keep_watermarks());
        let senders: Vec<_> = self
            .inner
            .outbound
            .keys()
            .flat_map(|participant| {
                let p = || participant.clone();
                [
                    tokio::spawn(self.clone().drain(
                        p(),
                        "prepare",
                        |o| &o.prepares,
                        PREPARE_BATCH_MAX,
                        Duration::ZERO,
                        Node::send_prepares,
                    )),
                    tokio::spawn(self.clone().drain(
                        p(),
                        "one_phase",
                        |o| &o.one_phase,
                        ONE_PHASE_BATCH_MAX,
                        Duration::ZERO,
                        Node::send_one_phases,
                    )),
                    tokio::spawn(self.clone().drain(
                        p(),
                        "commit",
                        |o| &o.commits,
                        COMMIT_BATCH_MAX,
                        Duration::from_millis(COMMIT_LINGER_MS),
                        Node::send_commits,
                    )),
                    tokio::spawn(self.clone().redeliver_undeliverable(p())),
                    tokio::spawn(self.clone().drain(
                        p(),
                        "step",
                        |o| &o.steps,
                        STEP_BATCH_MAX,
                        Duration::ZERO,
                        Node::send_steps,
                    )),
                    tokio::spawn(self.clone().send_forgets(p())),
                ]
            })
            .collect();
        let result = server
            .add_service(health_service)
            .add_service(tandem::server::reflection_service(tandem::pb::coordinator_server::SERVICE_NAME))
            .add_service(CoordinatorServer::new(self.clone()).max_encoding_message_size(64 * 1024 * 1024))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        prober.abort();
        collector.abort();
        watermarks.abort();
        senders.iter().for_each(|sender| sender.abort());
        self.inner.store.close();
        info!(node = %self.inner.config.node_id, in_flight = self.core().active_count(), "stopped");
        result.map_err(|e| Error::Unavailable(format!("the server failed: {e}")))
    }

    /// Every [`READY_PROBE_INTERVAL_MS`], asks each participant's health
    /// (`tandem.v1.Participant`) with a [`READY_PROBE_TIMEOUT_MS`] deadline,
    /// all at once, and reports the answers as this coordinator's readiness:
    /// [`participant_ready_service`] per participant, [`READY_SERVICE`] for
    /// all of them. A status is set (and logged) only when it changes.
    async fn probe_participants(self, health: Arc<Health>) {
        let timeout = Duration::from_millis(READY_PROBE_TIMEOUT_MS);
        let mut tick = tokio::time::interval(Duration::from_millis(READY_PROBE_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reachable: BTreeMap<Id, bool> = BTreeMap::new();
        let mut log_failure_reported = false;
        let mut recovering_reported = false;
        loop {
            tick.tick().await;
            let probes: Vec<_> = self
                .inner
                .participant_health
                .iter()
                .map(|(participant, client)| {
                    let mut client = client.clone();
                    let participant = participant.clone();
                    tokio::spawn(async move {
                        let mut request = Request::new(HealthCheckRequest {
                            service: tandem::pb::participant_server::SERVICE_NAME.to_string(),
                        });
                        request.set_timeout(timeout);
                        use tonic_health::pb::health_check_response::ServingStatus as Answer;
                        let answer = match timed_call(timeout, client.check(request)).await {
                            Ok(answer) if answer.status == Answer::Serving as i32 => Ok(()),
                            Ok(answer) => Err(format!("its health is {:?}", Answer::try_from(answer.status))),
                            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
                        };
                        (participant, answer)
                    })
                })
                .collect();
            let log_failure = self.inner.store.failure();
            if let Some(failure) = log_failure.as_ref().filter(|_| !log_failure_reported) {
                let reason = format!(
                    "the decision log failed ({failure}): it acknowledges nothing more; restart this coordinator on its data directory"
                );
                error!("{reason}: NOT_SERVING");
                health.set_live(Err(reason)).await;
                log_failure_reported = true;
            }
            // Transactions recovered from the log whose votes are not all
            // in (parallel commit): until they are decided, the coordinator
            // is still recovering, and an audit is refused.
            let recovering = self.core().recovered_undecided();
            if (recovering > 0) != recovering_reported {
                match recovering {
                    0 => info!("every recovered transaction is decided"),
                    n => info!(recovering = n, "recovered transactions wait for their votes: not ready until decided"),
                }
                recovering_reported = recovering > 0;
            }
            let mut not_ready = Vec::new();
            if log_failure.is_some() {
                not_ready.push("its decision log failed".to_string());
            }
            if recovering > 0 {
                not_ready.push(format!("{recovering} transactions recovered from its log wait for their votes"));
            }
            for probe in probes {
                let Ok((participant, answer)) = probe.await else {
                    not_ready.push("a probe of a participant failed".to_string());
                    continue;
                };
                if let Err(error) = &answer {
                    not_ready.push(format!("participant {participant} does not answer as serving ({error})"));
                }
                if reachable.get(&participant) == Some(&answer.is_ok()) {
                    continue;
                }
                let status = match &answer {
                    Ok(()) => {
                        info!(%participant, "participant reachable; ready");
                        ServingStatus::Serving
                    }
                    Err(error) => {
                        warn!(%participant, %error, "participant unreachable; not ready");
                        ServingStatus::NotServing
                    }
                };
                health.reporter().set_service_status(participant_ready_service(&participant), status).await;
                reachable.insert(participant, answer.is_ok());
            }
            health.set_ready(if not_ready.is_empty() { Ok(()) } else { Err(not_ready.join("; ")) }).await;
        }
    }

    /// GetHealth's answer (UNAVAILABLE before the node serves).
    pub fn health(&self) -> Result<pb::NodeHealth, Error> {
        let health = self.inner.health.get().ok_or_else(|| Error::Unavailable("not serving yet".into()))?;
        Ok(health.to_pb())
    }

    /// Every [`WATERMARK_INTERVAL_MS`], makes the low watermarks that rose
    /// durable (one Lazy write: it rides on the next fsync), then tells the
    /// cores, which send them from then on. So a watermark is in the log
    /// before any participant hears it, and a restart never sends a lower
    /// one (see `watermark.rs`).
    async fn keep_watermarks(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(WATERMARK_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.raise_watermarks().await {
                warn!(%error, "the low watermarks could not be logged; they are not raised");
            }
        }
    }

    /// One round of [`Node::keep_watermarks`]; says whether any rose.
    pub(crate) async fn raise_watermarks(&self) -> Result<bool, Error> {
        // Lock order: the 2PC core, then the saga core.
        let (two_phase, sagas, rows) = {
            let core = self.core();
            let saga_core = self.inner.sagas.lock().expect("saga lock poisoned");
            let two_phase = core.watermarks_due();
            let sagas = saga_core.watermarks_due();
            let mut rows: BTreeMap<Id, (u64, u64)> = BTreeMap::new();
            for participant in two_phase.iter().chain(&sagas).map(|(participant, _)| participant) {
                rows.insert(participant.clone(), (core.watermark(participant), saga_core.watermark(participant)));
            }
            for (participant, watermark) in &two_phase {
                rows.get_mut(participant).expect("a row per participant").0 = *watermark;
            }
            for (participant, watermark) in &sagas {
                rows.get_mut(participant).expect("a row per participant").1 = *watermark;
            }
            (two_phase, sagas, rows)
        };
        if rows.is_empty() {
            return Ok(false);
        }
        let ops = rows
            .iter()
            .map(|(participant, (two_phase, sagas))| {
                tandem::store::Op::Put(
                    log::key(log::WATERMARK_PREFIX, participant),
                    log::encode_watermarks(*two_phase, *sagas),
                )
            })
            .collect();
        let written = self.inner.store.submit(ops, Durability::Lazy)?;
        written.await.unwrap_or_else(|_| Err(Error::Fatal("the writer stopped".into())))?;
        self.core().on_watermarks_durable(&two_phase);
        self.inner.sagas.lock().expect("saga lock poisoned").on_watermarks_durable(&sagas);
        debug!(?two_phase, ?sagas, "low watermarks raised");
        Ok(true)
    }

    /// Every [`GC_INTERVAL_MS`], deletes the idempotency keys and finished
    /// records past their retention, reading the expiry index (`x/`, in
    /// order of expiry) in batches of [`GC_BATCH_MAX`] until nothing more
    /// is due: so it keeps up with any write rate, and reads (beyond what
    /// is due) at most one batch a round.
    async fn collect_garbage(self) {
        let mut tick = tokio::time::interval(Duration::from_millis(GC_INTERVAL_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match self.collect_due().await {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(error) => {
                        warn!(%error, "garbage collection failed; trying again later");
                        break;
                    }
                }
            }
        }
    }

    /// Deletes one batch of due records; says whether more may be due.
    pub(crate) async fn collect_due(&self) -> Result<bool, Error> {
        let now_ms = self.inner.config.wall_clock.unix_ms();
        let entries = self.inner.store.scan_prefix_first(log::EXPIRY_PREFIX, GC_BATCH_MAX)?;
        let read = entries.len();
        let mut ops = Vec::new();
        let mut due = 0;
        // A key in use by a request that has started (or a rewrite of its
        // record racing with this delete) must not lose its record: the
        // check and the deletes are made under the lock that serialises
        // requests with keys, and submitted before it is released.
        let _serialised = self.inner.keys.lock().expect("keys lock poisoned");
        for (index_key, _) in &entries {
            let (expires_ms, record_key) = match log::parse_expiry_key(index_key) {
                Ok(parsed) => parsed,
                Err(error) => {
                    // It indexes nothing that can be read: it goes, a
                    // record it may have named stays (a leak, not a guess).
                    error!(%error, "an expiry index entry does not parse; dropped");
                    due += 1;
                    ops.push(tandem::store::Op::Delete(index_key.clone()));
                    continue;
                }
            };
            if expires_ms > now_ms {
                break;
            }
            due += 1;
            ops.push(tandem::store::Op::Delete(index_key.clone()));
            let Some(bytes) = self.inner.store.get(record_key)? else { continue };
            // The record's own expiry says whether this entry is its latest.
            let record_expiry = if record_key.starts_with(log::KEY_PREFIX) {
                let in_flight = log::id_from_key(log::KEY_PREFIX, record_key).map(|key| {
                    self.core().key_in_flight(&key).is_some()
                        || self.inner.sagas.lock().expect("saga lock poisoned").key_in_flight(&key).is_some()
                });
                match in_flight {
                    Ok(true) => continue,
                    Ok(false) => log::decode_at(record_key, &bytes, log::decode_keyed).map(|keyed| keyed.expires_ms),
                    Err(error) => Err(error),
                }
            } else if record_key.starts_with(log::FINISHED_PREFIX) {
                log::decode_at(record_key, &bytes, log::decode_finished).map(|finished| finished.expires_ms)
            } else {
                error!(key = %tandem::codec::show_key(index_key), "an expiry index entry for a record that expires not; dropped");
                continue;
            };
            match record_expiry {
                Ok(record_expiry) if record_expiry != 0 && record_expiry <= now_ms => {
                    ops.push(tandem::store::Op::Delete(record_key.to_vec()))
                }
                Ok(_) => {}
                // Never a guess: the record stays, and says it is corrupt
                // to whoever reads it.
                Err(error) => error!(%error, "a record the expiry index names does not decode; it stays"),
            }
        }
        if ops.is_empty() {
            return Ok(false);
        }
        let removed = ops.len();
        let written = self.inner.store.submit(ops, Durability::Buffered)?;
        drop(_serialised);
        written.await.unwrap_or_else(|_| Err(Error::Fatal("the writer stopped".into())))?;
        debug!(removed, "expired idempotency keys and finished records collected");
        Ok(due == read && read == GC_BATCH_MAX)
    }

    async fn audit(&self, include_accounts: bool) -> Result<pb::AuditResponse, Error> {
        // Registered with the snapshot of the committing transactions under
        // the core's lock: every commit decided after it is noted for it.
        let (audit, decided) = {
            let core = self.core();
            // A parallel commit prepared again after a restart may have been
            // committed before it, and applied at some participant: until
            // its participants have voted again, no cut counts it right.
            let undecided = core.recovered_undecided();
            if undecided > 0 {
                return Err(Error::Unavailable(format!(
                    "{undecided} transactions recovered from the log are being prepared again to learn their outcome; the audit would not be exact until they are decided (retry later)"
                )));
            }
            let audit = self.inner.audits.lock().expect("audits lock poisoned").begin();
            (audit, core.committing().map(|txn| txn.to_string()).collect::<HashSet<String>>())
        };
        let mut registered = AuditRegistration { node: self, audit, ended: false };
        // Every read has the same short deadline, so the audit answers in
        // bounded time whatever the participants do.
        let read_timeout = Duration::from_millis(self.inner.config.call_timeout_ms.min(AUDIT_READ_TIMEOUT_MS));
        let read_deadline = tokio::time::Instant::now() + read_timeout;
        let reads: Vec<_> = self
            .inner
            .participants
            .iter()
            .map(|(id, client)| {
                let mut client = client.clone();
                let id = id.clone();
                let mut request = Request::new(pb::ReadBalancesRequest { include_accounts, include_prepared: true });
                request.set_timeout(read_timeout);
                tokio::spawn(async move {
                    match tokio::time::timeout_at(read_deadline, client.read_balances(request)).await {
                        Ok(Ok(response)) => Ok(response.into_inner()),
                        // A total that does not fit is an answer, not an outage.
                        Ok(Err(status)) if status.code() == tonic::Code::OutOfRange => {
                            Err(Error::OutOfRange(format!("{id}: {}", status.message())))
                        }
                        // The client's own deadline (the grpc-timeout sent)
                        // may end the call a moment before ours does.
                        Ok(Err(status))
                            if matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) =>
                        {
                            Err(Error::Unavailable(format!(
                                "{id} did not answer within {} ms",
                                read_timeout.as_millis()
                            )))
                        }
                        Ok(Err(status)) => Err(Error::Unavailable(format!("{id}: {}", status.message()))),
                        Err(_) => Err(Error::Unavailable(format!(
                            "{id} did not answer within {} ms",
                            read_timeout.as_millis()
                        ))),
                    }
                })
            })
            .collect();
        let mut results = Vec::with_capacity(reads.len());
        for read in reads {
            results.push(read.await.unwrap_or_else(|e| Err(Error::Unavailable(format!("a balance read failed: {e}")))));
        }
        // The commits decided while it read were applied nowhere (their
        // COMMITs waited): not counted. Theirs go out now.
        registered.finish()?;
        // Every participant that could not be read is named, so that one
        // failed audit says which are unreachable.
        let unread: Vec<String> = results
            .iter()
            .filter_map(|result| match result {
                Err(Error::Unavailable(why)) => Some(why.clone()),
                _ => None,
            })
            .collect();
        if !unread.is_empty() {
            return Err(Error::Unavailable(format!(
                "the audit could not read every participant's balances (retry later): {}",
                unread.join("; ")
            )));
        }
        // Summed exactly: a total that does not fit its int64 field is
        // OUT_OF_RANGE, never a wrapped figure (see `Coordinator.Audit`).
        let mut response = pb::AuditResponse::default();
        let mut posted = tandem::domain::Total::default();
        let (mut reserved, mut suspense, mut heuristic_excess) = (posted, posted, posted);
        let mut in_flight = HashSet::new();
        let results = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        // An orphan (its incarnation's log is lost) may be committed on
        // another participant, and nothing here knows it: no exact total
        // until an operator decides the orphans.
        let orphans: Vec<String> = results
            .iter()
            .flat_map(|b| {
                b.prepared.iter().filter(|p| p.orphaned).map(move |p| format!("{} on {}", p.txn_id, b.participant_id))
            })
            .collect();
        if !orphans.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} orphaned transactions (their coordinator incarnation's log is lost) are held, and one may be committed elsewhere: no exact total until an operator decides them (ResolveInDoubt); {}",
                orphans.len(),
                orphans.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        for mut balances in results {
            for prepared in std::mem::take(&mut balances.prepared) {
                if decided.contains(prepared.txn_id.as_str()) {
                    count_as_applied(&mut balances, &prepared.legs)?;
                    in_flight.insert(prepared.txn_id);
                }
            }
            posted.add(balances.total_posted);
            reserved.add(balances.total_reserved);
            suspense.add(balances.suspense);
            heuristic_excess.add(balances.heuristic_excess);
            response.account_count += balances.account_count;
            response.participants.push(balances);
        }
        response.total_posted = posted.to_amount("the total_posted over every participant")?;
        response.total_reserved = reserved.to_amount("the total_reserved over every participant")?;
        response.total_suspense = suspense.to_amount("the total_suspense over every participant")?;
        response.total_heuristic_excess =
            heuristic_excess.to_amount("the total_heuristic_excess over every participant")?;
        response.commits_in_flight = in_flight.len() as u64;
        Ok(response)
    }

    pub fn status(&self, txn: &TxnId) -> Result<pb::TransactionStatus, Error> {
        let mut status = pb::TransactionStatus { txn_id: txn.to_string(), ..Default::default() };
        if let Some(saga) = self.saga_status_by_id(txn) {
            status.state = if saga.state == pb::SagaState::DeadLettered as i32 {
                pb::TransactionState::Aborted
            } else {
                pb::TransactionState::Preparing
            } as i32;
            status.detail =
                format!("orchestrated saga: {}", if saga.reason.is_empty() { "running" } else { &saga.reason });
            status.saga = Some(saga);
            return Ok(status);
        }
        if let Some(active) = self.core().get(txn) {
            active_status(active, &mut status);
            return Ok(status);
        }
        let state = if self.inner.store.get(&log::key(log::DECISION_PREFIX, txn))?.is_some() {
            pb::TransactionState::Committing
        } else {
            let finished_key = log::key(log::FINISHED_PREFIX, txn);
            match self.inner.store.get(&finished_key)? {
                Some(bytes) => {
                    let finished = log::decode_at(&finished_key, &bytes, log::decode_finished)?;
                    status.detail = match finished.resolution.as_str() {
                        "" => format!("finished as {:?}", finished.outcome),
                        resolution => format!("finished as {:?}: {resolution}", finished.outcome),
                    };
                    if finished.committed() {
                        pb::TransactionState::Committed
                    } else {
                        pb::TransactionState::Aborted
                    }
                }
                None => {
                    status.detail = "no record: never committed (presumed abort), finished and forgotten, or a one-phase transaction without an idempotency key whose client heard its outcome".into();
                    pb::TransactionState::Unknown
                }
            }
        };
        status.state = state as i32;
        Ok(status)
    }
}

/// An outcome as the client hears it. Every outcome is an answer, not an
/// error status: an account that its participant does not have is a
/// refusal learned by asking it (ABORTED, or COMPENSATED when the saga's
/// credit found it), like insufficient funds; only bad input found before
/// anything was asked (an account in no participant's range) is an error.
pub(crate) fn result_to_pb(txn: &TxnId, outcome: Outcome) -> pb::TransactionResult {
    let (outcome, abort_reason, reason) = match outcome {
        Outcome::Committed => (pb::Outcome::Committed, None, String::new()),
        Outcome::Aborted(reason, message) => (pb::Outcome::Aborted, Some(reason), message),
        Outcome::Compensated(cause, message) => (pb::Outcome::Compensated, cause, message),
        Outcome::DeadLettered(cause, message) => (pb::Outcome::DeadLettered, cause, message),
    };
    let abort_reason = match abort_reason {
        None => pb::AbortReason::Unspecified,
        Some(AbortReason::InsufficientFunds) => pb::AbortReason::InsufficientFunds,
        Some(AbortReason::BalanceOverflow) => pb::AbortReason::BalanceOverflow,
        Some(AbortReason::UnknownAccount) => pb::AbortReason::UnknownAccount,
        Some(AbortReason::ParticipantUnavailable) => pb::AbortReason::ParticipantUnavailable,
        Some(AbortReason::Refused) => pb::AbortReason::Refused,
        Some(AbortReason::KeyOfLostIncarnation) => pb::AbortReason::KeyOfLostIncarnation,
    };
    pb::TransactionResult {
        txn_id: txn.to_string(),
        outcome: outcome as i32,
        abort_reason: abort_reason as i32,
        reason,
    }
}

/// The client's answer: the outcome, or, for a key an earlier incarnation
/// used (coordinator.proto, Transfer), FAILED_PRECONDITION naming the
/// earlier transaction in the message and the `tandem-earlier-txn-id`
/// metadata.
fn answer(txn: &TxnId, outcome: Outcome) -> Result<Response<pb::TransactionResult>, Status> {
    if let Outcome::Aborted(AbortReason::KeyOfLostIncarnation, earlier) = &outcome {
        let mut status = Status::failed_precondition(format!(
            "the idempotency key belongs to {earlier}, a transaction of an earlier incarnation of this coordinator whose log was lost; a participant still holds it (orphaned, or decided by an operator: see ListPrepared and LookupTransaction there), and this transfer's fate is that transaction's ({txn} moved nothing)"
        ));
        if let Ok(value) = earlier.parse() {
            status.metadata_mut().insert(EARLIER_TXN_METADATA, value);
        }
        return Err(status);
    }
    Ok(Response::new(result_to_pb(txn, outcome)))
}

/// The response metadata that names the earlier transaction of a key (see
/// [`answer`]).
pub const EARLIER_TXN_METADATA: &str = "tandem-earlier-txn-id";

/// Most transfers in one TransferBatch call (coordinator.proto).
pub const TRANSFER_BATCH_MAX: usize = 256;

/// Runs every future at once on this task and returns their outputs in
/// order. Every pending one is polled on each wake, not only the one whose
/// waker fired: for at most [`TRANSFER_BATCH_MAX`] futures, each waiting on
/// a channel, less work than a task each.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Why a participant refused (a prepare or a saga step), as a transaction's
/// abort reason: the refusals a client can act on keep their name, the
/// others are [`AbortReason::Refused`] (the message says which).
pub(crate) fn abort_reason_from_pb(refusal: i32) -> AbortReason {
    match pb::Refusal::try_from(refusal) {
        Ok(pb::Refusal::InsufficientFunds) => AbortReason::InsufficientFunds,
        Ok(pb::Refusal::BalanceOverflow) => AbortReason::BalanceOverflow,
        Ok(pb::Refusal::UnknownAccount) => AbortReason::UnknownAccount,
        _ => AbortReason::Refused,
    }
}

fn optional_key(text: &str) -> Result<Option<Id>, Error> {
    if text.is_empty() {
        Ok(None)
    } else {
        Id::parse("idempotency_key", text).map(Some)
    }
}

impl Node {
    /// Transfer, inside its `transfer` span.
    async fn transfer_call(&self, request: pb::TransferRequest) -> Result<Response<pb::TransactionResult>, Status> {
        let legs = tandem::domain::transfer_legs(request.from_account, request.to_account, request.amount)?;
        let key = optional_key(&request.idempotency_key)?;
        let (txn, outcome) = match pb::Protocol::try_from(request.protocol) {
            Ok(pb::Protocol::TwoPhaseCommit) => self.run_transaction(legs.to_vec(), key).await?,
            Ok(pb::Protocol::SagaOrchestrated) => {
                let recovery = match pb::Recovery::try_from(request.recovery) {
                    Ok(pb::Recovery::Backward) => Recovery::Backward,
                    Ok(pb::Recovery::Forward) => Recovery::Forward,
                    Err(_) => return Err(Status::invalid_argument(format!("unknown recovery {}", request.recovery))),
                };
                self.run_saga(request.from_account, request.to_account, request.amount, recovery, key).await?
            }
            Err(_) => return Err(Status::invalid_argument(format!("unknown protocol {}", request.protocol))),
        };
        answer(&txn, outcome)
    }

    /// TransferBatch, inside its `transfer batch` span: every transfer at
    /// once, each as [`Node::transfer_call`] runs it, answered in order.
    async fn transfer_batch_call(
        &self,
        request: pb::TransferBatchRequest,
    ) -> Result<Response<pb::TransferBatchResponse>, Status> {
        let transfers = request.transfers;
        if transfers.is_empty() || transfers.len() > TRANSFER_BATCH_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch holds 1 to {TRANSFER_BATCH_MAX} transfers, not {}",
                transfers.len()
            )));
        }
        // Each transfer under a span of its own, the call's child (see
        // `tandem::trace::item_span`).
        let answers = join_all(
            transfers
                .into_iter()
                .map(|transfer| self.transfer_call(transfer).instrument(tandem::trace::item_span("transfer")))
                .collect(),
        )
        .await;
        let results = answers
            .into_iter()
            .map(|answer| match answer {
                Ok(response) => pb::TransferBatchResult { result: Some(response.into_inner()), ..Default::default() },
                Err(status) => pb::TransferBatchResult {
                    result: None,
                    status_code: status.code() as i32,
                    status_message: status.message().to_string(),
                    earlier_txn_id: status
                        .metadata()
                        .get(EARLIER_TXN_METADATA)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                },
            })
            .collect();
        Ok(Response::new(pb::TransferBatchResponse { results }))
    }

    /// Execute, inside its `execute` span.
    async fn execute_call(&self, request: pb::ExecuteRequest) -> Result<Response<pb::TransactionResult>, Status> {
        let legs: Vec<Leg> = request.legs.iter().map(Leg::from).collect();
        let key = optional_key(&request.idempotency_key)?;
        let (txn, outcome) = self.run_transaction(legs, key).await?;
        answer(&txn, outcome)
    }
}

#[tonic::async_trait]
impl Coordinator for Node {
    async fn transfer(&self, request: Request<pb::TransferRequest>) -> Result<Response<pb::TransactionResult>, Status> {
        let span = tandem::trace::call_span("transfer", tandem::trace::from_metadata(request.metadata()));
        self.transfer_call(request.into_inner()).instrument(span).await
    }

    async fn transfer_batch(
        &self,
        request: Request<pb::TransferBatchRequest>,
    ) -> Result<Response<pb::TransferBatchResponse>, Status> {
        let span = tandem::trace::call_span("transfer batch", tandem::trace::from_metadata(request.metadata()));
        self.transfer_batch_call(request.into_inner()).instrument(span).await
    }

    async fn execute(&self, request: Request<pb::ExecuteRequest>) -> Result<Response<pb::TransactionResult>, Status> {
        let span = tandem::trace::call_span("execute", tandem::trace::from_metadata(request.metadata()));
        self.execute_call(request.into_inner()).instrument(span).await
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionStatus>, Status> {
        let txn = Id::parse("txn_id", &request.into_inner().txn_id)?;
        Ok(Response::new(self.status(&txn)?))
    }

    async fn query_decision(
        &self,
        request: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        let request = request.into_inner();
        let txn = Id::parse("txn_id", &request.txn_id)?;
        let participant = Id::parse("participant_id", &request.participant_id)?;
        let decision = self.decision(&txn, request.coordinator_incarnation)?;
        debug!(%txn, %participant, ?decision, "decision query");
        let decision = match decision {
            Decision::Commit => pb::Decision::Commit,
            Decision::Abort => pb::Decision::Abort,
            Decision::Pending => pb::Decision::Pending,
            Decision::UnknownIncarnation => pb::Decision::UnknownIncarnation,
        };
        Ok(Response::new(pb::QueryDecisionResponse {
            decision: decision as i32,
            coordinator_incarnation: self.inner.incarnation,
        }))
    }

    async fn get_health(&self, _request: Request<pb::GetHealthRequest>) -> Result<Response<pb::NodeHealth>, Status> {
        Ok(Response::new(self.health()?))
    }

    async fn audit(&self, request: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        Ok(Response::new(Node::audit(self, request.into_inner().include_accounts).await?))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let limit = match request.into_inner().limit as usize {
            0 => LIST_DEAD_LETTERS_MAX,
            n => n.min(LIST_DEAD_LETTERS_MAX),
        };
        let (dead_letters, total) = self.dead_letters(limit);
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters, total }))
    }

    async fn resolve_dead_letter(
        &self,
        request: Request<pb::ResolveDeadLetterRequest>,
    ) -> Result<Response<pb::SagaStatus>, Status> {
        let decision = tandem::trust::operator_decision(request.extensions(), &request.get_ref().reason)?;
        let request = request.into_inner();
        let saga = Id::parse("saga_id", &request.saga_id)?;
        Ok(Response::new(self.resolve_dead_letter(&saga, request.to_account, decision).await?))
    }
}

/// A random nonzero incarnation for a new log: from the process's random
/// hashing keys (seeded by the operating system), the time and the pid; or,
/// given a seed, from the seed and the wall clock (see
/// [`NodeConfig::incarnation_seed`]).
fn new_incarnation(seed: Option<u64>, wall_clock: &tandem::clock::WallClock) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    if let Some(seed) = seed {
        let mut rng = tandem::rng::SplitMix64::new(seed ^ wall_clock.unix_ms());
        return rng.next_u64().max(1);
    }
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        hasher.write_u128(now.as_nanos());
        hasher.write_u32(std::process::id());
        let incarnation = hasher.finish();
        if incarnation != 0 {
            return incarnation;
        }
    }
}

/// The error of a log record naming a participant the directory does not.
/// Every record under `prefix`, decoded, with the id its key ends with;
/// fails on the first that does not decode or names a participant that is
/// not `known` (see [`unknown_participant`]).
fn read_records<R>(
    store: &dyn Storage,
    prefix: &[u8],
    decode: fn(&[u8]) -> Result<R, Error>,
    known: impl Fn(&Id) -> bool,
    participants_of: impl Fn(&R) -> Vec<&Id>,
) -> Result<Vec<(Id, R)>, Error> {
    store
        .scan_prefix(prefix)?
        .into_iter()
        .map(|(key, value)| {
            let id = log::id_from_key(prefix, &key)?;
            let record = log::decode_at(&key, &value, decode)?;
            if let Some(unknown) = participants_of(&record).into_iter().find(|p| !known(p)) {
                return Err(unknown_participant(&key, unknown));
            }
            Ok((id, record))
        })
        .collect()
}

fn unknown_participant(key: &[u8], participant: &Id) -> Error {
    Error::Fatal(format!(
        "the log record {:?} names participant {participant}, which is not in the directory (--participant); start the coordinator with the directory its log was written with",
        tandem::codec::show_key(key)
    ))
}

/// A participant's answer to one prepare, as the core takes it.
fn vote_from_pb(participant: &Id, response: pb::PrepareResponse) -> VoteResult {
    match pb::Vote::try_from(response.vote) {
        Ok(pb::Vote::Yes) => VoteResult::Yes,
        // The outcome's text is the earlier transaction's id (see
        // AbortReason::KeyOfLostIncarnation); a participant that names none
        // is an ordinary refusal.
        _ if response.refusal == pb::Refusal::KeyOfLostIncarnation as i32 => {
            match Id::parse("earlier_txn_id", &response.earlier_txn_id) {
                Ok(earlier) => VoteResult::No(AbortReason::KeyOfLostIncarnation, earlier.to_string()),
                Err(error) => VoteResult::No(AbortReason::Refused, format!("{participant}: {error}")),
            }
        }
        _ => VoteResult::No(
            abort_reason_from_pb(response.refusal),
            format!("{participant}: {}", clip_text(&response.reason, REASON_LEN_MAX)),
        ),
    }
}

/// A participant's answer to one one-phase commit, as the core takes it;
/// `None` for an answer that says no outcome (a participant newer than
/// this coordinator): the request is sent again.
fn one_phase_from_pb(participant: &Id, response: pb::OnePhaseResponse) -> Option<OnePhaseResult> {
    match pb::OnePhaseOutcome::try_from(response.outcome) {
        Ok(pb::OnePhaseOutcome::Committed) => Some(OnePhaseResult::Committed),
        Ok(pb::OnePhaseOutcome::Refused) => {
            let vote = pb::PrepareResponse {
                vote: pb::Vote::No as i32,
                refusal: response.refusal,
                reason: response.reason,
                earlier_txn_id: response.earlier_txn_id,
            };
            match vote_from_pb(participant, vote) {
                VoteResult::No(reason, message) => Some(OnePhaseResult::Refused(reason, message)),
                VoteResult::Yes => None,
            }
        }
        _ => {
            warn!(%participant, outcome = response.outcome, "a one-phase answer with an outcome this coordinator does not know; sending it again");
            None
        }
    }
}

/// Whether a call failed before the participant ran it, whatever it held:
/// the request was malformed as a whole, the service or method is not
/// there (an older participant), or the caller is not trusted. A request
/// that no earlier call could have delivered was then not applied.
/// Every other failure (unreachable, a deadline, overloaded, its store
/// failed) says nothing of what was applied.
fn refused_before_running(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::Unimplemented
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
    )
}

/// One call with a deadline enforced here (the `grpc-timeout` header only
/// tells the server): the answer, the status it failed with, or
/// DEADLINE_EXCEEDED.
async fn timed_call<T>(
    timeout: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => answer.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {} ms", timeout.as_millis()))),
    }
}

/// Whether a participant's answer to a COMMIT rejects it: an answer about
/// the request, not the participant (INVALID_ARGUMENT, FAILED_PRECONDITION,
/// NOT_FOUND, ALREADY_EXISTS, OUT_OF_RANGE; see [`Error`]'s classes). A
/// participant answers so for a transaction it aborted (a broken protocol)
/// or a request it cannot take, and would answer the same at once. The
/// others (retryable: unreachable, overloaded, a deadline; fatal: its store
/// failed, until it reopens it; not trusted) are about the participant:
/// every COMMIT to it would fail alike, and is redelivered. Nothing a
/// participant answers for a COMMIT it applied, or had applied (a
/// duplicate, a forgotten one), is an error.
fn commit_rejected(status: &Status) -> bool {
    let error = Error::from(status.clone());
    !error.is_retryable() && !matches!(error, Error::Fatal(_))
}

/// A batch call's answers, one per item sent, or why they cannot be used.
fn answers_for<I, A>(sent: &[I], answers: Result<Vec<A>, Status>) -> Result<Vec<A>, Status> {
    let answers = answers?;
    if answers.len() != sent.len() {
        return Err(Status::internal(format!("{} answers for {} items", answers.len(), sent.len())));
    }
    Ok(answers)
}

/// What GetTransaction says of a transaction this coordinator still holds.
fn active_status(active: &ActiveTxn, status: &mut pb::TransactionStatus) {
    let state = match &active.phase {
        Phase::Preparing { waiting } => {
            status.detail = format!("waiting for the votes of {waiting:?}");
            pb::TransactionState::Preparing
        }
        Phase::Deciding => {
            status.detail = "every participant voted YES; the decision is being logged".into();
            pb::TransactionState::Preparing
        }
        Phase::Committing { pending } if pending.is_empty() => {
            // COMMITTED as the proto defines it: every participant
            // acknowledged. The transaction stays here until its end
            // record is written (deferred: up to
            // `tandem::store::DEFERRED_LINGER_US`).
            status.detail = "every participant acknowledged; its end record is being logged".into();
            pb::TransactionState::Committed
        }
        Phase::Committing { pending } => {
            status.pending_participants = pending.iter().map(|p| p.to_string()).collect();
            status.detail = "committed; waiting for acknowledgements".into();
            pb::TransactionState::Committing
        }
        Phase::Staging { waiting, .. } => {
            status.detail = if waiting.is_empty() {
                "parallel commit: every participant voted YES; its staged record is being logged".into()
            } else {
                format!("parallel commit: waiting for the votes of {waiting:?}")
            };
            pb::TransactionState::Preparing
        }
        Phase::Aborting | Phase::AbortingUnstaged { .. } => pb::TransactionState::Aborted,
        Phase::Intending { .. } => {
            status.detail = "one-phase: its intent is being logged".into();
            pb::TransactionState::Preparing
        }
        Phase::OnePhase { .. } => {
            status.pending_participants = active.participants.iter().map(|p| p.to_string()).collect();
            status.detail = "one-phase: waiting for its participant's answer".into();
            pb::TransactionState::Preparing
        }
        Phase::OnePhaseLogging { outcome, .. } => {
            status.detail = format!("one-phase: answered {outcome:?}; its outcome is being logged");
            if *outcome == Outcome::Committed {
                pb::TransactionState::Committed
            } else {
                pb::TransactionState::Aborted
            }
        }
    };
    status.state = state as i32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_every_participant_acknowledged_is_committed_while_its_end_record_is_written() {
        let p = |id: &str| Id::parse("participant", id).unwrap();
        let mut active = ActiveTxn {
            position: 1,
            participants: vec![p("p1"), p("p2")],
            idempotency_key: None,
            phase: Phase::Committing { pending: [p("p2")].into_iter().collect() },
            staged: Some(7),
            recovered: false,
        };
        let mut status = pb::TransactionStatus::default();
        active_status(&active, &mut status);
        assert_eq!(status.state, pb::TransactionState::Committing as i32);
        assert_eq!(status.pending_participants, ["p2"]);
        // The last acknowledgement: COMMITTED, as the proto defines it, though
        // the coordinator holds the transaction until its end record is written.
        active.phase = Phase::Committing { pending: BTreeSet::new() };
        let mut status = pb::TransactionStatus::default();
        active_status(&active, &mut status);
        assert_eq!(status.state, pb::TransactionState::Committed as i32, "{status:?}");
        assert!(status.pending_participants.is_empty());
        assert!(status.detail.contains("every participant acknowledged"), "{}", status.detail);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_waits_for_its_oldest_message_not_for_one_another_sender_took() {
        let queue = Arc::new(BatchQueue::<u32>::default());
        let linger = Duration::from_millis(COMMIT_LINGER_MS);
        let began = Instant::now();
        let drainer = tokio::spawn({
            let queue = queue.clone();
            async move {
                let batch = queue.next_batch(16, linger).await;
                (batch, began.elapsed())
            }
        });
        queue.push(1);
        tokio::time::sleep(linger / 2).await;
        // Another sender (a prepare) takes the first message mid-linger ...
        assert_eq!(queue.take(16), vec![1]);
        tokio::time::sleep(linger / 4).await;
        // ... and the one queued after it lingers from its own arrival.
        queue.push(2);
        let pushed_at = began.elapsed();
        let (batch, sent_at) = drainer.await.unwrap();
        assert_eq!(batch, vec![2]);
        assert!(sent_at >= pushed_at + linger, "sent {sent_at:?} after the start, pushed at {pushed_at:?}");
        // Nothing taken meanwhile: the batch goes once the oldest has lingered.
        queue.push(3);
        let pushed_at = Instant::now();
        tokio::time::sleep(linger / 2).await;
        queue.push(4);
        assert_eq!(queue.next_batch(16, linger).await, vec![3, 4]);
        assert_eq!(pushed_at.elapsed(), linger);
    }

    fn txn() -> TxnId {
        Id::parse("txn", "c1-000001-000000000001").unwrap()
    }

    #[test]
    fn an_account_its_participant_does_not_have_is_an_aborted_outcome_not_an_error_status() {
        let outcome = Outcome::Aborted(AbortReason::UnknownAccount, "p2: account 19 does not exist on p2".into());
        let result = result_to_pb(&txn(), outcome);
        assert_eq!(result.outcome, pb::Outcome::Aborted as i32);
        assert_eq!(result.abort_reason, pb::AbortReason::UnknownAccount as i32);
        assert!(result.reason.contains("account 19 does not exist"), "{}", result.reason);
    }

    #[test]
    fn a_saga_that_turned_back_says_why_in_its_abort_reason() {
        for (outcome, expected) in [
            (
                Outcome::Compensated(Some(AbortReason::InsufficientFunds), "refunded".into()),
                (pb::Outcome::Compensated, pb::AbortReason::InsufficientFunds),
            ),
            (
                Outcome::Compensated(Some(AbortReason::UnknownAccount), "refunded".into()),
                (pb::Outcome::Compensated, pb::AbortReason::UnknownAccount),
            ),
            (
                Outcome::Compensated(Some(AbortReason::ParticipantUnavailable), "deadline".into()),
                (pb::Outcome::Compensated, pb::AbortReason::ParticipantUnavailable),
            ),
            (
                Outcome::DeadLettered(Some(AbortReason::BalanceOverflow), "parked".into()),
                (pb::Outcome::DeadLettered, pb::AbortReason::BalanceOverflow),
            ),
            (
                Outcome::DeadLettered(Some(AbortReason::Refused), "parked".into()),
                (pb::Outcome::DeadLettered, pb::AbortReason::Refused),
            ),
            (Outcome::Compensated(None, "resumed".into()), (pb::Outcome::Compensated, pb::AbortReason::Unspecified)),
            (Outcome::Committed, (pb::Outcome::Committed, pb::AbortReason::Unspecified)),
        ] {
            let result = result_to_pb(&txn(), outcome.clone());
            assert_eq!((result.outcome, result.abort_reason), (expected.0 as i32, expected.1 as i32), "{outcome:?}");
        }
    }

    #[test]
    fn a_refusal_keeps_its_name_when_a_client_can_act_on_it() {
        for (refusal, expected) in [
            (pb::Refusal::InsufficientFunds, AbortReason::InsufficientFunds),
            (pb::Refusal::BalanceOverflow, AbortReason::BalanceOverflow),
            (pb::Refusal::UnknownAccount, AbortReason::UnknownAccount),
            (pb::Refusal::AccountClosed, AbortReason::Refused),
            (pb::Refusal::Unspecified, AbortReason::Refused),
        ] {
            assert_eq!(abort_reason_from_pb(refusal as i32), expected, "{refusal:?}");
        }
        assert_eq!(abort_reason_from_pb(999), AbortReason::Refused, "a refusal this coordinator does not know");
    }
}
