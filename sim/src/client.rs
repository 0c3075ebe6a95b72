//! The simulation's client host: it opens the accounts, runs seeded workers
//! that send transfers by every protocol (retrying with the same
//! idempotency key when they do not learn the outcome) and, where the
//! scenario says so, audits; after the faults heal it runs the bench's own
//! checker over the history (settle, resolve every unknown outcome by its
//! key, then account for every account exactly).

use crate::hosts::{Topology, COORDINATOR};
use crate::{net, History, Scenario};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_client::ParticipantClient;
use tandem::rng::SplitMix64;
use tandem::tls::Security;
use tandem_bench::check::{check_ledger, held, CheckReport, LedgerView};
use tandem_bench::scenario::Protocol;
use tandem_bench::workload::{Client, HistoryEntry, TransferBatcher};
use tonic::transport::Channel;

/// Deadline of one transfer as the client waits for it.
const OP_TIMEOUT_MS: u64 = 2_000;
/// Attempts of one transfer with its key before the client moves on (the
/// checker resolves what is still unknown after the faults heal).
const OP_ATTEMPTS_MAX: u32 = 3;
/// Share of transfers sent twice at once with one key.
const DUPLICATE_PERCENT: u64 = 10;
/// Deadline of one audit.
const AUDIT_TIMEOUT_MS: u64 = 2_000;

/// What the client found.
#[derive(Debug, Default)]
pub struct ClientOutcome {
    pub check: Option<CheckReport>,
    /// Violations seen while running (audits that saw money created or
    /// destroyed, accounts that could not be opened).
    pub violations: Vec<String>,
    pub operations: usize,
    pub entries: Vec<HistoryEntry>,
    /// When the checker found every participant settled.
    pub settled_at: Option<Duration>,
}

pub struct ClientPlan {
    pub seed: u64,
    pub scenario: &'static Scenario,
    pub topology: Topology,
    /// When the nemesis heals everything.
    pub heal_at: Duration,
}

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn channel(host: &str) -> Result<Channel, tandem::Error> {
    tandem::server::channel_on(&net::url(host), &Security::Insecure, &net::network())
}

/// The client host's software.
pub async fn run(plan: Arc<ClientPlan>, history: History, outcome: Arc<Mutex<ClientOutcome>>) -> turmoil::Result {
    let topology = &plan.topology;
    let coordinator = channel(COORDINATOR)?;
    let participant_channels: Vec<Channel> =
        topology.participant_names().iter().map(|name| channel(name)).collect::<Result<_, _>>()?;
    let participants: Vec<ParticipantClient<Channel>> =
        participant_channels.iter().cloned().map(ParticipantClient::new).collect();
    if let Err(why) = open_accounts(topology, &participants).await {
        outcome.lock().expect("outcome lock").violations.push(why);
        return Ok(());
    }
    history.log(now(), "client: accounts opened".into());
    let mut client = Client::new(coordinator.clone(), participant_channels.clone(), topology.accounts_per_participant);
    // Every worker's `2pc-batch` transfers share one batcher, as the
    // clients of one process share a batching client library.
    if plan.scenario.protocols.contains(&Protocol::TwoPhaseCommitBatched) {
        client = client.with_batcher(TransferBatcher::start(coordinator.clone(), Duration::from_millis(OP_TIMEOUT_MS)));
    }
    let mut workers = Vec::new();
    for w in 0..plan.scenario.workers {
        workers.push(tokio::task::spawn_local(worker(
            w,
            plan.clone(),
            client.clone(),
            history.clone(),
            outcome.clone(),
        )));
    }
    let view = LedgerView {
        coordinator: coordinator.clone(),
        participants_as_client: participant_channels.clone(),
        participants: participants.clone(),
        accounts_per_participant: topology.accounts_per_participant,
        accounts: topology.accounts(),
        initial_balance: topology.initial_balance,
        expected_total: topology.total_money(),
    };
    let prober = tokio::task::spawn_local(settled_after_heal(plan.clone(), view.clone()));
    let auditor = plan
        .scenario
        .audits
        .then(|| tokio::task::spawn_local(audit(plan.clone(), coordinator.clone(), history.clone(), outcome.clone())));
    let mut entries = Vec::new();
    for worker in workers {
        entries.extend(worker.await?);
    }
    if let Some(auditor) = auditor {
        auditor.await?;
    }
    history.log(now(), format!("client: {} operations sent; waiting for the faults to heal", entries.len()));
    let heal = plan.heal_at.saturating_sub(now());
    tokio::time::sleep(heal + Duration::from_millis(100)).await;
    let settled_at = prober.await?;
    history.log(now(), format!("client: every participant settled at {settled_at:?}"));
    let report = check_ledger(&view, &mut entries).await;
    for entry in &entries {
        history.log(
            now(),
            format!(
                "final {} {} {}->{} {}: {:?} {} {}",
                entry.key,
                entry.protocol,
                entry.from,
                entry.to,
                entry.amount,
                entry.outcome,
                entry.txn_id,
                entry.detail
            ),
        );
    }
    history.log(
        now(),
        format!(
            "checked: {} committed, {} resolved after the run, settled in {} ms, {} violations",
            report.committed,
            report.resolved_after_run,
            report.settle_ms,
            report.violations.len()
        ),
    );
    let mut outcome = outcome.lock().expect("outcome lock");
    outcome.operations = entries.len();
    outcome.settled_at = settled_at;
    outcome.entries = entries;
    outcome.check = Some(report);
    Ok(())
}

/// Most a participant may take to settle after the faults heal before the
/// probe gives up (the checker then reports what is held).
pub const SETTLE_PROBE_MS_MAX: u64 = 60_000;

/// From the moment the faults heal, polls every participant until none
/// holds anything (the checker's own test, `held`); returns when that first
/// held.
async fn settled_after_heal(plan: Arc<ClientPlan>, view: LedgerView) -> Option<Duration> {
    tokio::time::sleep(plan.heal_at.saturating_sub(now())).await;
    while now() < plan.heal_at + Duration::from_millis(SETTLE_PROBE_MS_MAX) {
        if held(&view).await.is_empty() {
            return Some(now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn open_accounts(topology: &Topology, participants: &[ParticipantClient<Channel>]) -> Result<(), String> {
    for (i, participant) in participants.iter().enumerate() {
        let first = i as u64 * topology.accounts_per_participant;
        let accounts = (first..first + topology.accounts_per_participant)
            .map(|account| pb::NewAccount { account, initial_balance: topology.initial_balance })
            .collect::<Vec<_>>();
        let mut attempts = 0;
        loop {
            let mut request = tonic::Request::new(pb::OpenAccountsRequest { accounts: accounts.clone() });
            request.set_timeout(Duration::from_secs(1));
            match participant.clone().open_accounts(request).await {
                Ok(_) => break,
                Err(status) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!(?status, "opening accounts; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(format!("p{}: the accounts could not be opened: {status}", i + 1)),
            }
        }
    }
    Ok(())
}

/// One client: sequential transfers between random accounts, by a protocol
/// drawn from the scenario's, each retried with its key a few times.
async fn worker(
    w: usize,
    plan: Arc<ClientPlan>,
    mut client: Client,
    history: History,
    outcome_of_run: Arc<Mutex<ClientOutcome>>,
) -> Vec<HistoryEntry> {
    let mut rng = SplitMix64::new(plan.seed.wrapping_mul(0x9e37_79b9).wrapping_add(w as u64 + 1));
    let accounts = plan.topology.accounts().end;
    let protocols = plan.scenario.protocols;
    let mut entries = Vec::new();
    for i in 0..plan.scenario.ops_per_worker {
        if now() >= plan.heal_at {
            break;
        }
        let protocol = protocols[rng.below(protocols.len() as u64) as usize];
        let (from, to) = match plan.scenario.legs {
            Some(legs) => {
                let (source, target) = legs[rng.below(legs.len() as u64) as usize];
                let per = plan.topology.accounts_per_participant;
                let from = source as u64 * per + rng.below(per);
                let mut to = target as u64 * per + rng.below(per);
                if to == from {
                    to = target as u64 * per + (to + 1) % per;
                }
                (from, to)
            }
            None => {
                let from = rng.below(accounts);
                let mut to = rng.below(accounts - 1);
                if to >= from {
                    to += 1;
                }
                (from, to)
            }
        };
        // Up to 60% of an opening balance: some transfers overdraw.
        let amount = 1 + rng.below(plan.topology.initial_balance as u64 * 6 / 10) as i64;
        let key = format!("w{w}-{i}");
        let start = now();
        let mut attempt = 1;
        // Now and then the same request twice at once, as a client that
        // retried too early would: both answers, if definite, must agree.
        let duplicated = rng.chance(DUPLICATE_PERCENT);
        let (outcome, txn_id, detail) = loop {
            let timeout = Duration::from_millis(OP_TIMEOUT_MS);
            let answer = if duplicated && attempt == 1 {
                let mut twin = client.clone();
                let (answer, twin_answer) = tokio::join!(
                    client.transfer(protocol, from, to, amount, &key, timeout),
                    twin.transfer(protocol, from, to, amount, &key, timeout)
                );
                history.log(
                    now(),
                    format!("w{w} {key} duplicate: {:?} {} {}", twin_answer.0, twin_answer.1, twin_answer.2),
                );
                let disagree = (answer.0, &answer.1) != (twin_answer.0, &twin_answer.1);
                if answer.0.is_definite() && twin_answer.0.is_definite() && disagree {
                    outcome_of_run.lock().expect("outcome lock").violations.push(format!(
                        "{key}: one request sent twice at once got two answers: {:?} {} and {:?} {}",
                        answer.0, answer.1, twin_answer.0, twin_answer.1
                    ));
                }
                answer
            } else {
                client.transfer(protocol, from, to, amount, &key, timeout).await
            };
            history.log(
                now(),
                format!(
                    "w{w} {key} {protocol} {from}->{to} {amount} attempt {attempt}: {:?} {} {}",
                    answer.0, answer.1, answer.2
                ),
            );
            if answer.0.is_definite() || attempt >= OP_ATTEMPTS_MAX {
                break answer;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        };
        entries.push(HistoryEntry {
            protocol,
            client: w,
            key,
            from,
            to,
            amount,
            start_us: start.as_micros() as u64,
            end_us: now().as_micros() as u64,
            outcome,
            txn_id,
            detail,
        });
        // Think time that spreads the operations over the fault phase.
        let think_ms_max = plan.heal_at.as_millis() as u64 * 2 / plan.scenario.ops_per_worker.max(1) as u64;
        tokio::time::sleep(Duration::from_millis(rng.below(think_ms_max.max(1)))).await;
    }
    entries
}

/// Audits through the fault phase; under 2PC alone, every audit that
/// answers must see exactly the money the accounts opened with.
async fn audit(plan: Arc<ClientPlan>, coordinator: Channel, history: History, outcome: Arc<Mutex<ClientOutcome>>) {
    let mut rng = SplitMix64::new(plan.seed ^ 0x6175_6469_7400);
    let mut coordinator = CoordinatorClient::new(coordinator);
    let expected = plan.topology.total_money();
    while now() < plan.heal_at {
        let mut request = tonic::Request::new(pb::AuditRequest { include_accounts: false });
        request.set_timeout(Duration::from_millis(AUDIT_TIMEOUT_MS));
        match coordinator.audit(request).await {
            Ok(answer) => {
                let audit = answer.into_inner();
                let seen = audit.total_posted as i128 + audit.total_suspense as i128;
                history
                    .log(now(), format!("audit: {} posted, {} in suspense", audit.total_posted, audit.total_suspense));
                if seen != expected as i128 {
                    outcome.lock().expect("outcome lock").violations.push(format!(
                        "an audit at {:?} saw {} posted and {} in suspense; the accounts opened with {expected}",
                        now(),
                        audit.total_posted,
                        audit.total_suspense
                    ));
                }
            }
            Err(status) => history.log(now(), format!("audit: {:?} {}", status.code(), status.message())),
        }
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
    }
}
