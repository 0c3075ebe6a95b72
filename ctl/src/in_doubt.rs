//! `tandemctl in-doubt list|resolve`: transactions prepared on a
//! participant whose outcome it does not know yet, and the heuristic
//! decisions an operator took on them.
//!
//! A prepared transaction is normally decided within milliseconds by its
//! coordinator, or, if that word is lost, by the participant asking it
//! (after the participant's --in-doubt-after-ms). Two kinds wait for a
//! person: orphans, whose coordinator lost its log (a new incarnation
//! answers for it, and no one may presume them aborted), and any prepared
//! transaction whose coordinator stays away longer than the business can
//! wait. `resolve` forces one to commit or abort (ResolveInDoubt): a
//! heuristic decision, written with the reason and never collected. Before
//! deciding, look at what the others did (`tandemctl txn get ID`): if any
//! participant committed it, every participant must commit it.

use crate::nodes::{check_reason, on_each, request, rpc, Nodes, RpcError, UsageError};
use crate::report::Report;
use crate::table::{age, flag, Align, Table};
use crate::txn::{heuristic_state, incarnation};
use serde::Serialize;
use tandem::pb;

/// What ListPrepared allows at most.
pub const LIST_LIMIT_MAX: u32 = 1_000;

#[derive(Debug, Serialize)]
pub struct InDoubtView {
    pub participants: Vec<ParticipantInDoubt>,
    pub findings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ParticipantInDoubt {
    pub participant: String,
    /// Prepared transactions held (listed: at most --limit).
    pub total: u64,
    pub orphaned: u64,
    /// The longest a transaction stayed prepared before its decision
    /// arrived, among those decided since the node started.
    pub longest_in_doubt_ms: u64,
    pub prepared: Vec<PreparedView>,
    pub heuristic: Vec<HeuristicView>,
}

#[derive(Debug, Serialize)]
pub struct PreparedView {
    pub txn_id: String,
    pub coordinator_id: String,
    pub coordinator_incarnation: String,
    pub position: u64,
    pub prepared_for_ms: u64,
    pub orphaned: bool,
    pub legs: Vec<LegView>,
}

#[derive(Debug, Serialize)]
pub struct LegView {
    pub account: u64,
    pub amount: i64,
}

#[derive(Debug, Serialize)]
pub struct HeuristicView {
    pub txn_id: String,
    pub coordinator_id: String,
    pub coordinator_incarnation: String,
    /// What the operator applied.
    pub committed: bool,
    /// decided, confirmed, mixed.
    pub state: String,
    pub reason: String,
    pub decided_ms_ago: u64,
    pub legs: Vec<LegView>,
}

fn legs(legs: &[pb::Leg]) -> Vec<LegView> {
    legs.iter().map(|leg| LegView { account: leg.account, amount: leg.amount }).collect()
}

pub fn legs_text(legs: &[LegView]) -> String {
    legs.iter().map(|leg| format!("{}:{:+}", leg.account, leg.amount)).collect::<Vec<_>>().join(" ")
}

fn heuristic_view(decision: &pb::HeuristicDecision) -> HeuristicView {
    HeuristicView {
        txn_id: decision.txn_id.clone(),
        coordinator_id: decision.coordinator_id.clone(),
        coordinator_incarnation: incarnation(decision.coordinator_incarnation),
        committed: decision.committed,
        state: heuristic_state(decision.state),
        reason: decision.reason.clone(),
        decided_ms_ago: decision.decided_ms_ago,
        legs: legs(&decision.legs),
    }
}

pub async fn list(nodes: &Nodes, limit: u32) -> Result<Report, UsageError> {
    let (view, errors) = build_list(nodes, limit).await?;
    let text = render(&view);
    // A list is not a check: the findings are for `status`.
    Ok(Report::new(&view, text, Vec::new(), errors))
}

/// The view `in-doubt list` prints (the console's overview shows it too),
/// and the calls that failed.
pub async fn build_list(nodes: &Nodes, limit: u32) -> Result<(InDoubtView, Vec<RpcError>), UsageError> {
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(UsageError(format!("--limit {limit}: give 1 to {LIST_LIMIT_MAX}")));
    }
    let timeout = nodes.timeout;
    let answers = on_each(nodes.participants()?, move |node| async move {
        let answer = node
            .participant_client()
            .list_prepared(request(timeout, pb::ListPreparedRequest { limit }))
            .await
            .map_err(|status| node.failed(rpc::LIST_PREPARED, &status))?;
        Ok(answer.into_inner())
    })
    .await;
    let mut errors = Vec::new();
    let mut participants = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(listed) => participants.push(ParticipantInDoubt {
                participant: node.name.clone(),
                total: listed.total,
                orphaned: listed.orphaned,
                longest_in_doubt_ms: listed.longest_in_doubt_ms,
                prepared: listed
                    .prepared
                    .iter()
                    .map(|p| PreparedView {
                        txn_id: p.txn_id.clone(),
                        coordinator_id: p.coordinator_id.clone(),
                        coordinator_incarnation: incarnation(p.coordinator_incarnation),
                        position: p.position,
                        prepared_for_ms: p.prepared_for_ms,
                        orphaned: p.orphaned,
                        legs: legs(&p.legs),
                    })
                    .collect(),
                heuristic: listed.heuristic.iter().map(heuristic_view).collect(),
            }),
            Err(error) => errors.push(error),
        }
    }
    Ok((InDoubtView { participants, findings: Vec::new() }, errors))
}

fn render(view: &InDoubtView) -> String {
    let mut prepared = Table::new(&[
        ("PARTICIPANT", Align::Left),
        ("TXN", Align::Left),
        ("COORDINATOR", Align::Left),
        ("PREPARED-FOR", Align::Right),
        ("ORPHANED", Align::Left),
        ("LEGS", Align::Left),
    ]);
    let mut heuristic = Table::new(&[
        ("PARTICIPANT", Align::Left),
        ("TXN", Align::Left),
        ("APPLIED", Align::Left),
        ("STATE", Align::Left),
        ("DECIDED-AGO", Align::Right),
        ("LEGS", Align::Left),
        ("REASON", Align::Left),
    ]);
    let mut notes = String::new();
    for p in &view.participants {
        for t in &p.prepared {
            prepared.row(vec![
                p.participant.clone(),
                t.txn_id.clone(),
                t.coordinator_id.clone(),
                age(t.prepared_for_ms),
                flag(t.orphaned),
                legs_text(&t.legs),
            ]);
        }
        for h in &p.heuristic {
            heuristic.row(vec![
                p.participant.clone(),
                h.txn_id.clone(),
                if h.committed { "commit" } else { "abort" }.into(),
                h.state.clone(),
                age(h.decided_ms_ago),
                legs_text(&h.legs),
                h.reason.clone(),
            ]);
        }
        if p.total > p.prepared.len() as u64 {
            notes.push_str(&format!(
                "{}: showing {} of {} prepared (oldest first; --limit)\n",
                p.participant,
                p.prepared.len(),
                p.total
            ));
        }
        notes.push_str(&format!(
            "{}: {} prepared, {} orphaned; longest in doubt since start {}\n",
            p.participant,
            p.total,
            p.orphaned,
            age(p.longest_in_doubt_ms)
        ));
    }
    let mut text = String::new();
    if prepared.is_empty() {
        text.push_str("no transaction in doubt\n");
    } else {
        text.push_str(&prepared.render());
    }
    if !heuristic.is_empty() {
        text.push_str("\nheuristic decisions\n");
        text.push_str(&heuristic.render());
    }
    text.push('\n');
    text.push_str(&notes);
    text
}

#[derive(Debug, Serialize)]
pub struct ResolvedView {
    pub participant: String,
    pub decision: HeuristicView,
    pub findings: Vec<String>,
}

pub async fn resolve(
    nodes: &Nodes,
    participant: &str,
    txn_id: &str,
    commit: bool,
    reason: &str,
) -> Result<Report, UsageError> {
    let view = match build_resolve(nodes, participant, txn_id, commit, reason).await? {
        Ok(view) => view,
        Err(error) => return Ok(Report::failed(error)),
    };
    let text = format!(
        "{}: {} {} by heuristic decision ({}): {}\n",
        view.participant,
        if view.decision.committed { "committed" } else { "aborted" },
        view.decision.txn_id,
        view.decision.state,
        view.decision.reason
    );
    Ok(Report::new(&view, text, Vec::new(), Vec::new()))
}

/// Asks `participant` to decide `txn_id` (ResolveInDoubt): the decision it
/// stored, or the call's error.
pub async fn build_resolve(
    nodes: &Nodes,
    participant: &str,
    txn_id: &str,
    commit: bool,
    reason: &str,
) -> Result<Result<ResolvedView, RpcError>, UsageError> {
    tandem::domain::Id::parse("the transaction id", txn_id).map_err(|e| UsageError(e.to_string()))?;
    check_reason(reason)?;
    let node = nodes.participant(participant)?;
    let request = pb::ResolveInDoubtRequest { txn_id: txn_id.into(), commit, reason: reason.into() };
    let decision = match node.participant_client().resolve_in_doubt(nodes.request(request)).await {
        Ok(answer) => answer.into_inner(),
        Err(status) => return Ok(Err(node.failed(rpc::RESOLVE_IN_DOUBT, &status))),
    };
    Ok(Ok(ResolvedView { participant: node.name.clone(), decision: heuristic_view(&decision), findings: Vec::new() }))
}
