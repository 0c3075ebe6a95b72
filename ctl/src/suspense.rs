//! `tandemctl dead-letters list|resolve` and `tandemctl parked
//! list|resolve`: sagas whose refund could not be applied, their money
//! waiting in a participant's suspense account for an operator.
//!
//! A dead letter is an orchestrated saga's (the coordinator lists it: its
//! amount, accounts, and which participant's suspense holds the money); a
//! parked transfer is a choreographed one's (its source participant lists
//! it; the API gives its id, state and reason, not its amount or
//! accounts). Resolving one moves its money from suspense to an account of
//! the participant that holds it: by default the source account, which must
//! be open again. The operator's reason is required and stored with the
//! record, beside the operator's identity from the certificate. A resolve
//! whose answer is not RESOLVED (the account is still closed, ...) is found
//! wrong (exit 1).
//!
//! Both list RPCs take a limit (default and most 1,000, oldest saga first
//! for dead letters, saga id order for parked transfers) and answer the
//! total; `--limit` is passed on, and the count of all is shown.

use crate::nodes::{check_reason, on_each, request, rpc, Nodes, RpcError, UsageError};
use crate::report::Report;
use crate::table::{enum_name, flag, Align, Table};
use crate::txn::SagaRecord;
use serde::Serialize;
use tandem::pb;

/// What ListDeadLetters and ListParkedTransfers give at most.
pub const LIST_LIMIT_MAX: u32 = 1_000;

fn check_limit(limit: u32) -> Result<(), UsageError> {
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(UsageError(format!("--limit {limit}: give 1 to {LIST_LIMIT_MAX}")));
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct DeadLettersView {
    /// Dead letters held by the coordinator (listed: at most --limit).
    pub total: usize,
    pub dead_letters: Vec<SagaRecord>,
    pub findings: Vec<String>,
}

pub async fn list_dead_letters(nodes: &Nodes, limit: u32) -> Result<Report, UsageError> {
    let view = match build_dead_letters(nodes, limit).await? {
        Ok(view) => view,
        Err(error) => return Ok(Report::failed(error)),
    };
    let mut table = Table::new(&[
        ("SAGA", Align::Left),
        ("STATE", Align::Left),
        ("FROM", Align::Right),
        ("TO", Align::Right),
        ("AMOUNT", Align::Right),
        ("SUSPENSE-AT", Align::Left),
        ("PARKED", Align::Left),
        ("REASON", Align::Left),
    ]);
    for d in &view.dead_letters {
        table.row(vec![
            d.saga_id.clone(),
            d.state.clone(),
            d.from_account.to_string(),
            d.to_account.to_string(),
            d.amount.to_string(),
            d.suspense_participant.clone(),
            flag(d.parked),
            d.reason.clone(),
        ]);
    }
    let mut text = if table.is_empty() { "no dead letter\n".to_string() } else { table.render() };
    if view.total > view.dead_letters.len() {
        text.push_str(&format!("\nshowing {} of {} (--limit)\n", view.dead_letters.len(), view.total));
    }
    Ok(Report::new(&view, text, Vec::new(), Vec::new()))
}

/// The coordinator's dead letters, at most `limit` (1 to 1,000), and their
/// total; or the call's error.
pub async fn build_dead_letters(nodes: &Nodes, limit: u32) -> Result<Result<DeadLettersView, RpcError>, UsageError> {
    check_limit(limit)?;
    let node = nodes.coordinator()?;
    let listed =
        match node.coordinator_client().list_dead_letters(nodes.request(pb::ListDeadLettersRequest { limit })).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => return Ok(Err(node.failed(rpc::LIST_DEAD_LETTERS, &status))),
        };
    Ok(Ok(DeadLettersView {
        total: listed.total as usize,
        dead_letters: listed.dead_letters.iter().take(limit as usize).map(SagaRecord::from).collect(),
        findings: Vec::new(),
    }))
}

#[derive(Debug, Serialize)]
pub struct ResolvedDeadLetterView {
    pub saga: SagaRecord,
    pub findings: Vec<String>,
}

pub async fn resolve_dead_letter(
    nodes: &Nodes,
    saga_id: &str,
    to_account: u64,
    reason: &str,
) -> Result<Report, UsageError> {
    let view = match build_resolve_dead_letter(nodes, saga_id, to_account, reason).await? {
        Ok(view) => view,
        Err(error) => return Ok(Report::failed(error)),
    };
    let saga = &view.saga;
    let text = format!(
        "dead letter {}: {} ({} from suspense at {}){}\n",
        saga.saga_id,
        saga.state,
        saga.amount,
        saga.suspense_participant,
        if saga.reason.is_empty() { String::new() } else { format!(": {}", saga.reason) }
    );
    let findings = view.findings.clone();
    Ok(Report::new(&view, text, findings, Vec::new()))
}

/// Asks the coordinator to release a dead letter (ResolveDeadLetter): the
/// saga as it answered (found wrong unless RESOLVED), or the call's error.
pub async fn build_resolve_dead_letter(
    nodes: &Nodes,
    saga_id: &str,
    to_account: u64,
    reason: &str,
) -> Result<Result<ResolvedDeadLetterView, RpcError>, UsageError> {
    tandem::domain::Id::parse("the saga id", saga_id).map_err(|e| UsageError(e.to_string()))?;
    check_reason(reason)?;
    let node = nodes.coordinator()?;
    let request = pb::ResolveDeadLetterRequest { saga_id: saga_id.into(), to_account, reason: reason.into() };
    let saga = match node.coordinator_client().resolve_dead_letter(nodes.request(request)).await {
        Ok(answer) => SagaRecord::from(&answer.into_inner()),
        Err(status) => return Ok(Err(node.failed(rpc::RESOLVE_DEAD_LETTER, &status))),
    };
    let mut findings = Vec::new();
    if saga.state != "resolved" {
        findings.push(format!("dead letter {} is {}, not resolved: {}", saga.saga_id, saga.state, saga.reason));
    }
    Ok(Ok(ResolvedDeadLetterView { saga, findings }))
}

#[derive(Debug, Serialize)]
pub struct ParkedView {
    pub participants: Vec<ParticipantParked>,
    pub findings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ParticipantParked {
    pub participant: String,
    /// Parked transfers held (listed: at most --limit).
    pub total: usize,
    pub parked: Vec<TransferView>,
}

#[derive(Debug, Serialize)]
pub struct TransferView {
    pub saga_id: String,
    /// debited, completed, rejected, compensated, dead_lettered, unknown,
    /// resolved.
    pub state: String,
    pub terminal: bool,
    pub reason: String,
}

impl From<&pb::TransferStatus> for TransferView {
    fn from(transfer: &pb::TransferStatus) -> TransferView {
        TransferView {
            saga_id: transfer.saga_id.clone(),
            state: enum_name(
                pb::TransferState::try_from(transfer.state).ok().map(|s| s.as_str_name()),
                "TRANSFER_STATE_",
                transfer.state,
            ),
            terminal: transfer.terminal,
            reason: transfer.reason.clone(),
        }
    }
}

pub async fn list_parked(nodes: &Nodes, limit: u32) -> Result<Report, UsageError> {
    let (view, errors) = build_parked(nodes, limit).await?;
    let mut table = Table::new(&[
        ("PARTICIPANT", Align::Left),
        ("SAGA", Align::Left),
        ("STATE", Align::Left),
        ("REASON", Align::Left),
    ]);
    let mut notes = String::new();
    for p in &view.participants {
        for t in &p.parked {
            table.row(vec![p.participant.clone(), t.saga_id.clone(), t.state.clone(), t.reason.clone()]);
        }
        if p.total > p.parked.len() {
            notes.push_str(&format!("{}: showing {} of {} (--limit)\n", p.participant, p.parked.len(), p.total));
        }
    }
    let mut text = if table.is_empty() { "no parked transfer\n".to_string() } else { table.render() };
    if !notes.is_empty() {
        text.push('\n');
        text.push_str(&notes);
    }
    Ok(Report::new(&view, text, Vec::new(), errors))
}

/// Each participant's parked transfers, at most `limit` (1 to 1,000) each,
/// and their totals; and the calls that failed.
pub async fn build_parked(nodes: &Nodes, limit: u32) -> Result<(ParkedView, Vec<RpcError>), UsageError> {
    check_limit(limit)?;
    let timeout = nodes.timeout;
    let answers = on_each(nodes.participants()?, move |node| async move {
        let answer = node
            .participant_client()
            .list_parked_transfers(request(timeout, pb::ListParkedTransfersRequest { limit }))
            .await
            .map_err(|status| node.failed(rpc::LIST_PARKED_TRANSFERS, &status))?;
        Ok(answer.into_inner())
    })
    .await;
    let mut errors = Vec::new();
    let mut participants = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(parked) => participants.push(ParticipantParked {
                participant: node.name.clone(),
                total: parked.total as usize,
                parked: parked.parked.iter().take(limit as usize).map(TransferView::from).collect(),
            }),
            Err(error) => errors.push(error),
        }
    }
    Ok((ParkedView { participants, findings: Vec::new() }, errors))
}

#[derive(Debug, Serialize)]
pub struct ResolvedParkedView {
    pub participant: String,
    pub transfer: TransferView,
    pub findings: Vec<String>,
}

pub async fn resolve_parked(
    nodes: &Nodes,
    participant: &str,
    saga_id: &str,
    to_account: u64,
    reason: &str,
) -> Result<Report, UsageError> {
    let view = match build_resolve_parked(nodes, participant, saga_id, to_account, reason).await? {
        Ok(view) => view,
        Err(error) => return Ok(Report::failed(error)),
    };
    let transfer = &view.transfer;
    let text = format!(
        "{}: parked transfer {} {}{}\n",
        view.participant,
        transfer.saga_id,
        transfer.state,
        if transfer.reason.is_empty() { String::new() } else { format!(": {}", transfer.reason) }
    );
    let findings = view.findings.clone();
    Ok(Report::new(&view, text, findings, Vec::new()))
}

/// Asks `participant` to release a parked transfer (ResolveParkedTransfer):
/// the transfer as it answered (found wrong unless RESOLVED), or the
/// call's error.
pub async fn build_resolve_parked(
    nodes: &Nodes,
    participant: &str,
    saga_id: &str,
    to_account: u64,
    reason: &str,
) -> Result<Result<ResolvedParkedView, RpcError>, UsageError> {
    tandem::domain::Id::parse("the saga id", saga_id).map_err(|e| UsageError(e.to_string()))?;
    check_reason(reason)?;
    let node = nodes.participant(participant)?;
    let request = pb::ResolveParkedTransferRequest { saga_id: saga_id.into(), to_account, reason: reason.into() };
    let transfer = match node.participant_client().resolve_parked_transfer(nodes.request(request)).await {
        Ok(answer) => TransferView::from(&answer.into_inner()),
        Err(status) => return Ok(Err(node.failed(rpc::RESOLVE_PARKED_TRANSFER, &status))),
    };
    let mut findings = Vec::new();
    if transfer.state != "resolved" {
        findings.push(format!(
            "parked transfer {} is {}, not resolved: {}",
            transfer.saga_id, transfer.state, transfer.reason
        ));
    }
    Ok(Ok(ResolvedParkedView { participant: node.name.clone(), transfer, findings }))
}
