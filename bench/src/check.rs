//! The invariant checker, run after the workload stops and the faults heal.
//!
//! 1. Settle: wait until no participant holds a prepared transfer, a
//!    reservation or an incoming credit (2PC in-doubt transactions resolve
//!    by the participants' decision queries).
//! 2. Resolve: every operation whose outcome the client did not learn is
//!    sent again with its idempotency key until it has a definite outcome.
//! 3. Account: each account's posted balance must equal its initial balance
//!    plus every committed transfer, exactly. That one equation checks money
//!    conservation, all-or-nothing per transaction (a half-applied transfer
//!    leaves one side off), nothing applied twice, and every acknowledged
//!    commit applied; a dead-lettered saga's money must be in its source
//!    participant's suspense account. Nothing may be reserved or in flight,
//!    and no available balance negative.
//!
//! Heuristic decisions (an operator decided an in-doubt transaction in its
//! coordinator's place) are listed in the report. A heuristic-mixed one
//! (the coordinator later delivered the other outcome) leaves its accounts
//! off by its legs: the checker reconciles them with the participants'
//! heuristic excess and lists the hazard, so money stays accounted for and
//! the hazard shows instead of failing as a silent half commit.
//!
//! A violation names the account or node and what is wrong, and for an
//! account that is off, the transfers on it that moved exactly the
//! difference: the likely culprits.

use crate::workload::{Client, HistoryEntry, OpOutcome};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tandem::cluster::Cluster;
use tandem::pb;
use tandem::pb::participant_client::ParticipantClient;
use tokio::time::Instant;
use tonic::transport::Channel;

/// What the checker reads: the nodes of a cluster (real processes or a
/// simulation's hosts) and the ledger they opened with.
#[derive(Clone)]
pub struct LedgerView {
    /// The coordinator, as a client may call it (transfers, lookups).
    pub coordinator: Channel,
    /// Every participant in order (p1 first), as an operator may call it
    /// (balances, what is held).
    pub participants: Vec<ParticipantClient<Channel>>,
    /// The same participants as a client may call them (choreographed
    /// transfers are started, and their outcomes learnt, there).
    pub participants_as_client: Vec<Channel>,
    pub accounts_per_participant: u64,
    /// Every account opened, each with `initial_balance`.
    pub accounts: std::ops::Range<u64>,
    pub initial_balance: i64,
    pub expected_total: i64,
}

impl LedgerView {
    /// The view of a local cluster, over its client's and operator's
    /// certificates.
    pub fn of(cluster: &Cluster) -> Result<LedgerView, tandem::Error> {
        Ok(LedgerView {
            coordinator: tandem::server::channel(&cluster.coordinator.url(), cluster.client())?,
            participants: (0..cluster.participants.len())
                .map(|i| cluster.participant_client(i, cluster.operator()))
                .collect::<Result<_, _>>()?,
            participants_as_client: cluster
                .participants
                .iter()
                .map(|p| tandem::server::channel(&p.url(), cluster.client()))
                .collect::<Result<_, _>>()?,
            accounts_per_participant: cluster.spec.accounts_per_participant,
            accounts: cluster.accounts(),
            initial_balance: cluster.spec.initial_balance,
            expected_total: cluster.spec.total_money(),
        })
    }

    fn client(&self) -> Client {
        Client::new(self.coordinator.clone(), self.participants_as_client.clone(), self.accounts_per_participant)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub violations: Vec<String>,
    /// Operations whose outcome was learned only after the run.
    pub resolved_after_run: u64,
    pub committed: u64,
    pub settle_ms: u64,
    pub total_posted: i64,
    pub total_suspense: i64,
    pub expected_total: i64,
    /// Every heuristic decision found, one line each (heuristic-mixed ones
    /// say so).
    pub heuristic: Vec<String>,
    /// The participants' heuristic excess, summed (see ReadBalances).
    pub heuristic_excess: i64,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Deadline of one participant's balance read while settling.
const HELD_READ_TIMEOUT_MS: u64 = 2_000;

/// What each participant still holds (prepared transfers, reservations,
/// incoming credits, choreographed transfers in flight, undelivered
/// events), one line per participant that holds something or cannot be
/// read: empty once the cluster is quiet.
pub async fn held(view: &LedgerView) -> Vec<String> {
    let mut held = Vec::new();
    for (i, client) in view.participants.iter().enumerate() {
        let mut request =
            tonic::Request::new(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false });
        request.set_timeout(Duration::from_millis(HELD_READ_TIMEOUT_MS));
        match client.clone().read_balances(request).await {
            Ok(balances) => {
                let b = balances.into_inner();
                if b.prepared_count > 0
                    || b.total_reserved != 0
                    || b.total_incoming != 0
                    || b.transfers_in_flight > 0
                    || b.outbox_pending > 0
                {
                    held.push(format!(
                        "{}: {} prepared, {} reserved, {} incoming, {} choreographed transfers in flight, {} events undelivered",
                        b.participant_id,
                        b.prepared_count,
                        b.total_reserved,
                        b.total_incoming,
                        b.transfers_in_flight,
                        b.outbox_pending
                    ));
                }
            }
            Err(status) => held.push(format!("p{}: unreachable ({})", i + 1, status.message())),
        }
    }
    held
}

/// Waits until every participant is quiet; returns what is still held if not.
async fn settle(view: &LedgerView, limit: Duration) -> Result<Duration, String> {
    let began = Instant::now();
    loop {
        let held = held(view).await;
        if held.is_empty() {
            return Ok(began.elapsed());
        }
        if began.elapsed() > limit {
            return Err(held.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The transactions that most likely broke an account that is `off` from
/// what the history says: those on it that moved exactly that much (a
/// transfer applied on one side only, twice, or not at all), the ones whose
/// outcome was learned after the run first.
pub(crate) fn suspects(history: &[HistoryEntry], account: u64, off: i64) -> String {
    let mut on_account: Vec<&HistoryEntry> = history
        .iter()
        .filter(|e| (e.from == account || e.to == account) && e.amount == off.abs() && e.outcome != OpOutcome::Dropped)
        .collect();
    on_account.sort_by_key(|e| !e.detail.starts_with("resolved after the run"));
    if on_account.is_empty() {
        return format!(" (off by {off}; no transfer on it moved exactly that)");
    }
    let listed: Vec<String> = on_account
        .iter()
        .take(5)
        .map(|e| format!("{} {} {:?} (txn {}, {} -> {})", e.protocol, e.key, e.outcome, e.txn_id, e.from, e.to))
        .collect();
    format!(" (off by {off}; transfers on it that moved exactly that: {})", listed.join(", "))
}

/// What the participants hold of `txn` once decided: committed on any of
/// them, or aborted where it is known; `None` while still prepared, or
/// unknown everywhere.
async fn orphan_fate(view: &LedgerView, txn: &str) -> Option<OpOutcome> {
    let mut fate = None;
    for participant in &view.participants {
        let request = pb::LookupTransactionRequest { txn_id: txn.to_string() };
        let record = participant.clone().lookup_transaction(request).await.ok()?.into_inner();
        match pb::RecordState::try_from(record.state) {
            Ok(pb::RecordState::Committed) => return Some(OpOutcome::Committed),
            Ok(pb::RecordState::Aborted) => fate = Some(OpOutcome::AbortedOther),
            Ok(pb::RecordState::Prepared) => return None,
            _ => {}
        }
    }
    fate
}

/// Checks the cluster against the history of every client operation (of
/// any protocols: each entry says which).
pub async fn check(cluster: &Cluster, history: &mut [HistoryEntry]) -> CheckReport {
    match LedgerView::of(cluster) {
        Ok(view) => check_ledger(&view, history).await,
        Err(error) => CheckReport {
            expected_total: cluster.spec.total_money(),
            violations: vec![format!("cannot reach the cluster: {error}")],
            ..Default::default()
        },
    }
}

/// [`check`] over any view of a cluster (a simulation's included).
pub async fn check_ledger(view: &LedgerView, history: &mut [HistoryEntry]) -> CheckReport {
    let mut report = CheckReport { expected_total: view.expected_total, ..Default::default() };
    match settle(view, Duration::from_secs(30)).await {
        Ok(took) => report.settle_ms = took.as_millis() as u64,
        Err(held) => report.violations.push(format!("not settled 30 s after the run: {held}")),
    }
    let mut client = view.client();
    // Resolve unknown outcomes by asking again with the same key.
    let deadline = Instant::now() + Duration::from_secs(60);
    for entry in history.iter_mut() {
        if entry.outcome.is_definite() || entry.outcome == OpOutcome::Dropped {
            continue;
        }
        report.resolved_after_run += 1;
        loop {
            let (outcome, txn_id, detail) = client
                .transfer(entry.protocol, entry.from, entry.to, entry.amount, &entry.key, Duration::from_secs(5))
                .await;
            if outcome.is_definite() {
                entry.detail = format!("resolved after the run as {outcome:?} ({txn_id}); first: {}", entry.detail);
                entry.outcome = outcome;
                entry.txn_id = txn_id;
                break;
            }
            // The key is an orphan's (its coordinator lost its log): the
            // transfer's fate is the orphan's, as the participants decided it.
            if outcome == OpOutcome::Orphaned {
                if let Some(fate) = orphan_fate(view, &txn_id).await {
                    entry.detail = format!(
                        "resolved after the run as the orphan {txn_id}'s fate, {fate:?}; first: {}",
                        entry.detail
                    );
                    entry.outcome = fate;
                    entry.txn_id = txn_id;
                    break;
                }
            }
            if Instant::now() > deadline {
                report.violations.push(format!("{}: no definite outcome after the run: {detail}", entry.key));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if let Err(held) = settle(view, Duration::from_secs(30)).await {
        report.violations.push(format!("not settled after resolving outcomes: {held}"));
    }
    let accounts = view.accounts.clone();
    let mut expected: BTreeMap<u64, i64> = accounts.clone().map(|a| (a, view.initial_balance)).collect();
    let mut expected_suspense = vec![0i64; view.participants.len()];
    for entry in history.iter() {
        match entry.outcome {
            OpOutcome::Committed => {
                report.committed += 1;
                *expected.get_mut(&entry.from).expect("a known account") -= entry.amount;
                *expected.get_mut(&entry.to).expect("a known account") += entry.amount;
            }
            // The debit stands; its money waits in the source's suspense.
            OpOutcome::DeadLettered => {
                *expected.get_mut(&entry.from).expect("a known account") -= entry.amount;
                expected_suspense[(entry.from / view.accounts_per_participant) as usize] += entry.amount;
            }
            _ => {}
        }
    }
    // Heuristic decisions: listed; a mixed one's legs left its accounts
    // off by what the participant reports as its excess.
    for (i, participant) in view.participants.iter().enumerate() {
        let listed = match participant.clone().list_prepared(pb::ListPreparedRequest { limit: 0 }).await {
            Ok(listed) => listed.into_inner(),
            Err(status) => {
                report.violations.push(format!("p{}: cannot list its decisions: {}", i + 1, status.message()));
                continue;
            }
        };
        for decision in listed.heuristic {
            let mixed = decision.state == pb::HeuristicState::Mixed as i32;
            report.heuristic.push(format!(
                "p{}: {} {} by an operator ({}){}",
                i + 1,
                decision.txn_id,
                if decision.committed { "committed" } else { "aborted" },
                decision.reason,
                if mixed { "; HEURISTIC MIXED: its coordinator delivered the other outcome" } else { "" }
            ));
            if mixed {
                for leg in decision.legs {
                    let excess = if decision.committed { leg.amount } else { -leg.amount };
                    if let Some(want) = expected.get_mut(&leg.account) {
                        *want += excess;
                    }
                }
            }
        }
    }
    let mut seen = 0u64;
    for (i, participant) in view.participants.iter().enumerate() {
        let mut participant = participant.clone();
        let balances = match participant
            .read_balances(pb::ReadBalancesRequest { include_accounts: true, include_prepared: false })
            .await
        {
            Ok(b) => b.into_inner(),
            Err(status) => {
                report.violations.push(format!("p{}: cannot read balances: {}", i + 1, status.message()));
                continue;
            }
        };
        report.total_posted += balances.total_posted;
        report.total_suspense += balances.suspense;
        report.heuristic_excess += balances.heuristic_excess;
        if balances.suspense != expected_suspense[i] {
            report.violations.push(format!(
                "{}: suspense holds {} but the dead-lettered transfers say {}",
                balances.participant_id, balances.suspense, expected_suspense[i]
            ));
        }
        for balance in &balances.accounts {
            seen += 1;
            let want = expected.get(&balance.account).copied();
            if want != Some(balance.posted) && report.violations.len() < 50 {
                let suspects = suspects(history, balance.account, balance.posted - want.unwrap_or(0));
                report.violations.push(format!(
                    "account {} on {}: posted {} but the committed transfers say {:?}{suspects}",
                    balance.account, balances.participant_id, balance.posted, want
                ));
            }
            if balance.available < 0 || balance.reserved != 0 {
                report.violations.push(format!(
                    "account {} on {}: available {}, reserved {}",
                    balance.account, balances.participant_id, balance.available, balance.reserved
                ));
            }
        }
    }
    if seen != accounts.end - accounts.start {
        report.violations.push(format!("{} accounts exist, {} were read", accounts.end - accounts.start, seen));
    }
    // Money parked in suspense by a dead letter is still the bank's money.
    // So is what heuristic-mixed decisions left in the wrong accounts.
    if report.total_posted + report.total_suspense - report.heuristic_excess != report.expected_total {
        report.violations.push(format!(
            "money not conserved: {} posted + {} in suspense - {} heuristic excess, {} expected",
            report.total_posted, report.total_suspense, report.heuristic_excess, report.expected_total
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Protocol;

    fn entry(key: &str, from: u64, to: u64, amount: i64, outcome: OpOutcome, detail: &str) -> HistoryEntry {
        HistoryEntry {
            protocol: Protocol::TwoPhaseCommit,
            client: 0,
            key: key.into(),
            from,
            to,
            amount,
            start_us: 0,
            end_us: 1,
            outcome,
            txn_id: format!("c1-{key}"),
            detail: detail.into(),
        }
    }

    #[test]
    fn an_account_that_is_off_names_the_transfers_that_moved_exactly_the_difference() {
        let history = vec![
            entry("a", 1, 2, 100, OpOutcome::Committed, ""),
            entry("b", 3, 1, 70, OpOutcome::Committed, ""),
            entry("c", 1, 4, 70, OpOutcome::Committed, "resolved after the run as Committed"),
            entry("d", 5, 6, 70, OpOutcome::Committed, ""),
        ];
        let named = suspects(&history, 1, -70);
        assert!(named.contains("off by -70"), "{named}");
        let (b, c) = (named.find(" b ").expect("b is named"), named.find(" c ").expect("c is named"));
        assert!(c < b, "the one resolved after the run comes first: {named}");
        assert!(!named.contains(" a ") && !named.contains(" d "), "{named}");
        assert!(suspects(&history, 1, 13).contains("no transfer on it moved exactly that"));
    }
}
