//! `tandemctl txn get ID`: one transaction as the coordinator and every
//! participant know it, side by side: the evidence an operator weighs
//! before deciding an in-doubt transaction by hand.
//!
//! The coordinator's GetTransaction says what was decided (UNKNOWN: no
//! record, which under presumed abort means aborted, or finished and
//! collected); each participant's LookupTransaction says what it holds
//! (UNKNOWN: never prepared there, or finished and collected). A
//! participant's record of a finished transaction goes once the
//! coordinator's watermark passes it, so an old transaction shows UNKNOWN
//! everywhere: that is not a fault.
//!
//! A choreographed transfer has no coordinator: its id is a saga id, and
//! the participant it started on keeps its state (GetTransferStatus). So
//! each participant is asked that too, and the ones that know the id are
//! shown beside the rest (a parked one waits for `tandemctl parked
//! resolve`; that is shown, not a finding, as a dead letter is).
//!
//! Found wrong (exit 1): participants that disagree (one committed, one
//! aborted), a participant that disagrees with the coordinator's decision,
//! an orphaned record, a heuristic-mixed decision.

use crate::nodes::{on_each, rpc, Nodes, RpcError, UsageError};
use crate::report::Report;
use crate::table::{age, enum_name, flag, Align, Table};
use serde::Serialize;
use tandem::pb;

#[derive(Debug, Serialize)]
pub struct TxnView {
    pub txn_id: String,
    pub coordinator: Option<CoordinatorRecord>,
    pub participants: Vec<ParticipantRecord>,
    /// The participants where a choreographed transfer of this id started
    /// (none when the id is no choreographed transfer's).
    pub choreographed: Vec<ChoreographedRecord>,
    pub findings: Vec<String>,
}

/// A choreographed transfer as the participant it started on knows it.
#[derive(Debug, Serialize)]
pub struct ChoreographedRecord {
    pub participant: String,
    /// debited, completed, rejected, compensated, dead_lettered, resolved.
    pub state: String,
    pub reason: String,
    pub terminal: bool,
}

#[derive(Debug, Serialize)]
pub struct CoordinatorRecord {
    /// preparing, committing, committed, aborted, unknown.
    pub state: String,
    pub pending_participants: Vec<String>,
    pub detail: String,
    /// Set when the id is an orchestrated saga's.
    pub saga: Option<SagaRecord>,
}

#[derive(Debug, Serialize)]
pub struct SagaRecord {
    pub saga_id: String,
    pub state: String,
    pub from_account: u64,
    pub to_account: u64,
    pub amount: i64,
    pub reason: String,
    pub suspense_participant: String,
    pub parked: bool,
}

impl From<&pb::SagaStatus> for SagaRecord {
    fn from(saga: &pb::SagaStatus) -> SagaRecord {
        SagaRecord {
            saga_id: saga.saga_id.clone(),
            state: enum_name(
                pb::SagaState::try_from(saga.state).ok().map(|s| s.as_str_name()),
                "SAGA_STATE_",
                saga.state,
            ),
            from_account: saga.from_account,
            to_account: saga.to_account,
            amount: saga.amount,
            reason: saga.reason.clone(),
            suspense_participant: saga.suspense_participant.clone(),
            parked: saga.parked,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ParticipantRecord {
    pub participant: String,
    /// unknown, prepared, committed, aborted.
    pub state: String,
    pub coordinator_id: String,
    /// 16 hex digits; empty when not known.
    pub coordinator_incarnation: String,
    pub position: u64,
    pub orphaned: bool,
    pub one_phase: bool,
    pub heuristic: Option<HeuristicRecord>,
}

#[derive(Debug, Serialize)]
pub struct HeuristicRecord {
    /// What the operator applied.
    pub committed: bool,
    /// decided, confirmed, mixed.
    pub state: String,
    pub reason: String,
    pub decided_ms_ago: u64,
}

impl From<&pb::HeuristicDecision> for HeuristicRecord {
    fn from(decision: &pb::HeuristicDecision) -> HeuristicRecord {
        HeuristicRecord {
            committed: decision.committed,
            state: heuristic_state(decision.state),
            reason: decision.reason.clone(),
            decided_ms_ago: decision.decided_ms_ago,
        }
    }
}

pub fn heuristic_state(state: i32) -> String {
    enum_name(pb::HeuristicState::try_from(state).ok().map(|s| s.as_str_name()), "HEURISTIC_STATE_", state)
}

pub fn incarnation(incarnation: u64) -> String {
    if incarnation == 0 {
        String::new()
    } else {
        format!("{incarnation:016x}")
    }
}

pub async fn get(nodes: &Nodes, txn_id: &str) -> Result<Report, UsageError> {
    let (view, errors) = build(nodes, txn_id).await?;
    let text = render(&view);
    let findings = view.findings.clone();
    Ok(Report::new(&view, text, findings, errors))
}

/// The view `txn get` prints (the console's lookup shows it too), and the
/// calls that failed.
pub async fn build(nodes: &Nodes, txn_id: &str) -> Result<(TxnView, Vec<RpcError>), UsageError> {
    tandem::domain::Id::parse("the transaction id", txn_id).map_err(|e| UsageError(e.to_string()))?;
    if nodes.coordinator_if_given().is_none() && nodes.participants.is_empty() {
        return Err(UsageError(
            "txn get asks the coordinator and the participants: give --coordinator URL and --participant NAME=URL"
                .into(),
        ));
    }
    let timeout = nodes.timeout;
    let mut errors = Vec::new();
    let mut findings = Vec::new();
    let id = txn_id.to_string();
    let lookups = on_each(&nodes.participants, move |node| {
        let id = id.clone();
        async move {
            let answer = node
                .participant_client()
                .lookup_transaction(crate::nodes::request(timeout, pb::LookupTransactionRequest { txn_id: id }))
                .await
                .map_err(|status| node.failed(rpc::LOOKUP_TRANSACTION, &status))?;
            Ok(answer.into_inner())
        }
    });
    let id = txn_id.to_string();
    let transfers = on_each(&nodes.participants, move |node| {
        let id = id.clone();
        async move {
            let answer = node
                .participant_client()
                .get_transfer_status(crate::nodes::request(timeout, pb::GetTransferStatusRequest { saga_id: id }))
                .await
                .map_err(|status| node.failed(rpc::GET_TRANSFER_STATUS, &status))?;
            Ok(answer.into_inner())
        }
    });
    let coordinator = match nodes.coordinator_if_given() {
        None => None,
        Some(node) => {
            match node
                .coordinator_client()
                .get_transaction(nodes.request(pb::GetTransactionRequest { txn_id: txn_id.to_string() }))
                .await
            {
                Ok(answer) => {
                    let status = answer.into_inner();
                    Some(CoordinatorRecord {
                        state: enum_name(
                            pb::TransactionState::try_from(status.state).ok().map(|s| s.as_str_name()),
                            "TRANSACTION_STATE_",
                            status.state,
                        ),
                        pending_participants: status.pending_participants,
                        detail: status.detail,
                        saga: status.saga.as_ref().map(SagaRecord::from),
                    })
                }
                Err(status) => {
                    errors.push(node.failed(rpc::GET_TRANSACTION, &status));
                    None
                }
            }
        }
    };
    let mut participants = Vec::new();
    for (node, answer) in lookups.await {
        match answer {
            Ok(record) => participants.push(ParticipantRecord {
                participant: node.name.clone(),
                state: enum_name(
                    pb::RecordState::try_from(record.state).ok().map(|s| s.as_str_name()),
                    "RECORD_STATE_",
                    record.state,
                ),
                coordinator_id: record.coordinator_id,
                coordinator_incarnation: incarnation(record.coordinator_incarnation),
                position: record.position,
                orphaned: record.orphaned,
                one_phase: record.one_phase,
                heuristic: record.heuristic.as_ref().map(HeuristicRecord::from),
            }),
            Err(error) => errors.push(error),
        }
    }
    let mut choreographed = Vec::new();
    for (node, answer) in transfers.await {
        match answer {
            Ok(status) if status.state != pb::TransferState::Unknown as i32 => {
                choreographed.push(ChoreographedRecord {
                    participant: node.name.clone(),
                    state: enum_name(
                        pb::TransferState::try_from(status.state).ok().map(|s| s.as_str_name()),
                        "TRANSFER_STATE_",
                        status.state,
                    ),
                    reason: status.reason,
                    terminal: status.terminal,
                })
            }
            Ok(_) => {}
            // A node that failed both calls is named once, with the first.
            Err(error) => {
                if !errors.iter().any(|e| e.node == error.node && e.code == error.code) {
                    errors.push(error)
                }
            }
        }
    }

    let holds = |state: &str| -> Vec<&str> {
        participants.iter().filter(|p| p.state == state).map(|p| p.participant.as_str()).collect()
    };
    let committed = holds("committed");
    let aborted = holds("aborted");
    if !committed.is_empty() && !aborted.is_empty() {
        findings.push(format!(
            "the participants disagree: committed on {}, aborted on {}",
            committed.join(", "),
            aborted.join(", ")
        ));
    }
    if let Some(c) = &coordinator {
        let decided_commit = c.state == "committed" || c.state == "committing";
        if decided_commit && !aborted.is_empty() {
            findings.push(format!("the coordinator decided commit, but {} aborted it", aborted.join(", ")));
        }
        if c.state == "aborted" && !committed.is_empty() {
            findings.push(format!("the coordinator aborted it, but {} committed it", committed.join(", ")));
        }
    }
    for p in &participants {
        if p.orphaned {
            findings.push(format!(
                "{} holds it orphaned (its coordinator's log was lost): an operator decides it (tandemctl in-doubt \
                 resolve)",
                p.participant
            ));
        }
        if p.heuristic.as_ref().is_some_and(|h| h.state == "mixed") {
            findings.push(format!(
                "{} decided it heuristically and the coordinator later delivered the other outcome (mixed)",
                p.participant
            ));
        }
    }
    Ok((TxnView { txn_id: txn_id.to_string(), coordinator, participants, choreographed, findings }, errors))
}

fn render(view: &TxnView) -> String {
    let mut text = format!("transaction {}\n\n", view.txn_id);
    if let Some(c) = &view.coordinator {
        text.push_str(&format!("coordinator: {}", c.state));
        if !c.pending_participants.is_empty() {
            text.push_str(&format!(" (not acknowledged by {})", c.pending_participants.join(", ")));
        }
        text.push('\n');
        if !c.detail.is_empty() {
            text.push_str(&format!("  {}\n", c.detail));
        }
        if let Some(saga) = &c.saga {
            text.push_str(&format!(
                "  saga {}: {} {} from {} to {}{}{}\n",
                saga.saga_id,
                saga.state,
                saga.amount,
                saga.from_account,
                saga.to_account,
                if saga.suspense_participant.is_empty() {
                    String::new()
                } else {
                    format!(", suspense at {} (parked: {})", saga.suspense_participant, saga.parked)
                },
                if saga.reason.is_empty() { String::new() } else { format!(": {}", saga.reason) },
            ));
        }
        text.push('\n');
    }
    if !view.participants.is_empty() {
        let mut table = Table::new(&[
            ("PARTICIPANT", Align::Left),
            ("STATE", Align::Left),
            ("COORDINATOR", Align::Left),
            ("INCARNATION", Align::Left),
            ("POSITION", Align::Right),
            ("ONE-PHASE", Align::Left),
            ("ORPHANED", Align::Left),
            ("HEURISTIC", Align::Left),
        ]);
        for p in &view.participants {
            let heuristic = p.heuristic.as_ref().map_or(String::new(), |h| {
                format!(
                    "{} {} {} ago: {}",
                    if h.committed { "commit" } else { "abort" },
                    h.state,
                    age(h.decided_ms_ago),
                    h.reason
                )
            });
            table.row(vec![
                p.participant.clone(),
                p.state.clone(),
                p.coordinator_id.clone(),
                p.coordinator_incarnation.clone(),
                if p.position == 0 { String::new() } else { p.position.to_string() },
                flag(p.one_phase),
                flag(p.orphaned),
                heuristic,
            ]);
        }
        text.push_str(&table.render());
    }
    for t in &view.choreographed {
        text.push_str(&format!(
            "\nchoreographed transfer, started on {}: {}{}\n",
            t.participant,
            t.state,
            if t.reason.is_empty() { String::new() } else { format!(": {}", t.reason) }
        ));
    }
    text
}
