//! What an operator does for orphans: in-doubt transactions whose
//! coordinator lost its log (a new incarnation answers for it), which no
//! decision query can resolve and the participants never presume aborted.
//!
//! The operator weighs the evidence, as the textbook's heuristic decision
//! asks, in this order, and records why:
//! 1. another participant committed the transaction (its coordinator's
//!    decision was COMMIT: every participant must commit);
//! 2. another participant aborted it (not by an operator): its coordinator
//!    could not have decided COMMIT;
//! 3. its client heard COMMITTED (the decision was durable before that);
//! 4. otherwise abort: no participant committed it and no client heard a
//!    commit, so no one relies on it.
//!
//! Each decision goes to the participant with the operator's certificate
//! (ResolveInDoubt), with that reason, and is listed in the report.

use crate::check::LedgerView;
use crate::workload::{HistoryEntry, OpOutcome};
use tandem::pb;

/// Waits until every transaction still prepared on the participants is an
/// orphan (the others are decided by their coordinator: the workload has
/// stopped), so that the orphans are all known; at most `limit`.
pub async fn wait_for_orphans(view: &LedgerView, limit: std::time::Duration) -> Result<(), String> {
    let began = tokio::time::Instant::now();
    loop {
        let mut undecided = Vec::new();
        for (i, participant) in view.participants.iter().enumerate() {
            match participant.clone().list_prepared(pb::ListPreparedRequest { limit: 0 }).await {
                Ok(listed) => undecided.extend(
                    listed
                        .into_inner()
                        .prepared
                        .into_iter()
                        .filter(|p| !p.orphaned)
                        .map(|p| format!("p{}: {}", i + 1, p.txn_id)),
                ),
                Err(status) => undecided.push(format!("p{}: unreachable ({})", i + 1, status.message())),
            }
        }
        if undecided.is_empty() {
            return Ok(());
        }
        if began.elapsed() > limit {
            return Err(format!(
                "{} prepared transactions are neither decided nor orphaned {} s after the run: {}",
                undecided.len(),
                limit.as_secs(),
                undecided.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Decides every orphan on every participant; returns one line per
/// decision, or why one could not be made.
pub async fn resolve_orphans(view: &LedgerView, history: &[HistoryEntry]) -> Result<Vec<String>, String> {
    let mut decided = Vec::new();
    for (i, participant) in view.participants.iter().enumerate() {
        let listed = participant
            .clone()
            .list_prepared(pb::ListPreparedRequest { limit: 0 })
            .await
            .map_err(|status| format!("p{}: cannot list its in-doubt transactions: {}", i + 1, status.message()))?
            .into_inner();
        for orphan in listed.prepared.into_iter().filter(|p| p.orphaned) {
            let (commit, reason) = weigh(view, history, &orphan.txn_id).await?;
            let request = pb::ResolveInDoubtRequest { txn_id: orphan.txn_id.clone(), commit, reason: reason.clone() };
            participant.clone().resolve_in_doubt(request).await.map_err(|status| {
                format!("p{}: the heuristic decision on {} failed: {}", i + 1, orphan.txn_id, status.message())
            })?;
            decided.push(format!(
                "p{}: orphan {} {}: {reason}",
                i + 1,
                orphan.txn_id,
                if commit { "committed" } else { "aborted" }
            ));
        }
    }
    Ok(decided)
}

/// The decision on `txn` and why (see the module essay).
async fn weigh(view: &LedgerView, history: &[HistoryEntry], txn: &str) -> Result<(bool, String), String> {
    let mut aborted_by = None;
    for (j, participant) in view.participants.iter().enumerate() {
        let record = participant
            .clone()
            .lookup_transaction(pb::LookupTransactionRequest { txn_id: txn.to_string() })
            .await
            .map_err(|status| format!("p{}: cannot look up {txn}: {}", j + 1, status.message()))?
            .into_inner();
        if record.state == pb::RecordState::Committed as i32 {
            return Ok((true, format!("p{} committed it", j + 1)));
        }
        if record.state == pb::RecordState::Aborted as i32 && record.heuristic.is_none() {
            aborted_by = Some(j + 1);
        }
    }
    if let Some(j) = aborted_by {
        return Ok((false, format!("p{j} aborted it, so its coordinator cannot have committed it")));
    }
    if history.iter().any(|entry| entry.txn_id == txn && entry.outcome == OpOutcome::Committed) {
        return Ok((true, "its client heard COMMITTED".into()));
    }
    Ok((false, "no participant committed it and no client heard a commit".into()))
}
