//! `tandemctl status`: is every node serving, does the coordinator reach
//! its participants, and does anything wait for an operator.
//!
//! Health comes from `grpc.health.v1` (see coordinator.proto, "Health"):
//! `""` is each node's liveness; on the coordinator,
//! `tandem.v1.Coordinator.ready` is SERVING only while it reaches every
//! participant and nothing it recovered from its log waits for votes, and `tandem.v1.Participant/<id>` says it for one (the
//! coordinator probes each every 500 ms). The counts come from the
//! participants' ReadBalances (totals only, one instant of each node),
//! ListPrepared (limit 1, for the oldest in-doubt age: it lists oldest
//! first) and ListParkedTransfers, and from the coordinator's
//! ListDeadLetters. A node that is not serving is not asked for counts (it
//! would only answer UNAVAILABLE); it is asked why (GetHealth), and so is
//! a coordinator that is not ready.
//!
//! Found wrong (exit 1): a node or the readiness not SERVING, a named
//! participant the coordinator does not know, and what waits for an
//! operator: orphaned or heuristic-mixed transactions, dead letters,
//! parked transfers. Prepared transactions are not a fault in themselves:
//! they are in flight, and the oldest age says whether one is stuck.

use crate::nodes::{on_each, request, rpc, Node, Nodes, RpcError, UsageError};
use crate::report::Report;
use crate::table::{age, Align, Table};
use serde::Serialize;
use std::time::Duration;
use tandem::pb;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Every node named is live and serving, the coordinator is ready, and
    /// every call answered.
    pub serving: bool,
    pub coordinator: Option<CoordinatorStatus>,
    pub participants: Vec<ParticipantStatus>,
    pub findings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CoordinatorStatus {
    pub url: String,
    /// `serving`, `not_serving`, `unknown`, `service_unknown`, or
    /// `unreachable`.
    pub liveness: String,
    /// `tandem.v1.Coordinator.ready`.
    pub ready: String,
    /// Why it is not serving or not ready, in its own words (GetHealth).
    pub reason: Option<String>,
    /// Dead letters listed (None when not asked or not answered).
    pub dead_letters: Option<usize>,
    /// Money the dead letters hold in suspense.
    pub dead_letter_amount: Option<i128>,
}

#[derive(Debug, Serialize)]
pub struct ParticipantStatus {
    pub name: String,
    pub url: String,
    pub liveness: String,
    /// Why it is not serving, in its own words (GetHealth).
    pub reason: Option<String>,
    /// `tandem.v1.Participant/<name>` on the coordinator: whether the
    /// coordinator reaches it (None without --coordinator).
    pub reached_by_coordinator: Option<String>,
    pub accounts: Option<u64>,
    /// Prepared transactions not yet decided here (in doubt or in flight).
    pub prepared: Option<u64>,
    /// How long the oldest of them has been prepared.
    pub oldest_prepared_ms: Option<u64>,
    pub orphaned: Option<u64>,
    pub heuristic_mixed: Option<u64>,
    pub parked: Option<usize>,
    pub suspense: Option<i64>,
    pub transfers_in_flight: Option<u64>,
    pub outbox_pending: Option<u64>,
}

/// What one health check said, as a word.
fn health_word(answer: &Result<i32, RpcError>) -> String {
    match answer {
        Ok(status) => match ServingStatus::try_from(*status) {
            Ok(ServingStatus::Serving) => "serving",
            Ok(ServingStatus::NotServing) => "not_serving",
            Ok(ServingStatus::ServiceUnknown) => "service_unknown",
            Ok(ServingStatus::Unknown) | Err(_) => "unknown",
        },
        Err(error) if error.code == "NOT_FOUND" => "service_unknown",
        Err(_) => "unreachable",
    }
    .to_string()
}

async fn check(node: &Node, timeout: Duration, service: &str) -> Result<i32, RpcError> {
    let answer = node
        .health_client()
        .check(request(timeout, HealthCheckRequest { service: service.to_string() }))
        .await
        .map_err(|status| node.failed(rpc::HEALTH_CHECK, &status))?;
    Ok(answer.into_inner().status)
}

/// Why a node is not serving or not ready, as its GetHealth says (None
/// when it says nothing, or does not answer: the health check's error
/// already tells).
fn reason_of(answer: Result<tonic::Response<pb::NodeHealth>, tonic::Status>) -> Option<String> {
    answer.ok().map(|answer| answer.into_inner().reason).filter(|reason| !reason.is_empty())
}

/// What a participant said, call by call.
struct ParticipantAnswers {
    liveness: Result<i32, RpcError>,
    reason: Option<String>,
    balances: Option<Result<pb::ReadBalancesResponse, RpcError>>,
    prepared: Option<Result<pb::ListPreparedResponse, RpcError>>,
    parked: Option<Result<pb::ListParkedTransfersResponse, RpcError>>,
}

async fn ask_participant(node: Node, timeout: Duration) -> Result<ParticipantAnswers, RpcError> {
    let liveness = check(&node, timeout, "").await;
    let mut client = node.participant_client();
    if !matches!(liveness, Ok(status) if status == ServingStatus::Serving as i32) {
        let reason = match liveness {
            Ok(_) => reason_of(client.get_health(request(timeout, pb::GetHealthRequest {})).await),
            Err(_) => None,
        };
        return Ok(ParticipantAnswers { liveness, reason, balances: None, prepared: None, parked: None });
    }
    let balances = client
        .read_balances(request(timeout, pb::ReadBalancesRequest { include_accounts: false, include_prepared: false }))
        .await
        .map(|answer| answer.into_inner())
        .map_err(|status| node.failed(rpc::READ_BALANCES, &status));
    let prepared = client
        .list_prepared(request(timeout, pb::ListPreparedRequest { limit: 1 }))
        .await
        .map(|answer| answer.into_inner())
        .map_err(|status| node.failed(rpc::LIST_PREPARED, &status));
    let parked = client
        .list_parked_transfers(request(timeout, pb::ListParkedTransfersRequest::default()))
        .await
        .map(|answer| answer.into_inner())
        .map_err(|status| node.failed(rpc::LIST_PARKED_TRANSFERS, &status));
    Ok(ParticipantAnswers {
        liveness,
        reason: None,
        balances: Some(balances),
        prepared: Some(prepared),
        parked: Some(parked),
    })
}

/// Keeps an answer, or moves its error to `errors`.
fn take<T>(answer: Option<Result<T, RpcError>>, errors: &mut Vec<RpcError>) -> Option<T> {
    match answer? {
        Ok(value) => Some(value),
        Err(error) => {
            errors.push(error);
            None
        }
    }
}

pub async fn run(nodes: &Nodes) -> Result<Report, UsageError> {
    let (view, errors) = build(nodes).await?;
    let text = render(&view);
    let findings = view.findings.clone();
    Ok(Report::new(&view, text, findings, errors))
}

/// The view `status` prints (the console's overview shows it too), and the
/// calls that failed.
pub async fn build(nodes: &Nodes) -> Result<(StatusView, Vec<RpcError>), UsageError> {
    if nodes.coordinator_if_given().is_none() && nodes.participants.is_empty() {
        return Err(UsageError(
            "status needs nodes to ask: give --coordinator URL and --participant NAME=URL (or TANDEM_COORDINATOR, \
             TANDEM_PARTICIPANTS)"
                .into(),
        ));
    }
    let timeout = nodes.timeout;
    let mut errors = Vec::new();
    let mut findings = Vec::new();

    let participant_answers = on_each(&nodes.participants, move |node| ask_participant(node, timeout));

    let mut reached = Vec::new();
    let coordinator = match nodes.coordinator_if_given() {
        None => None,
        Some(node) => {
            let liveness = check(node, timeout, "").await;
            let serving = matches!(liveness, Ok(status) if status == ServingStatus::Serving as i32);
            let (ready, dead_letters) = if serving {
                let ready = check(node, timeout, "tandem.v1.Coordinator.ready").await;
                for participant in &nodes.participants {
                    let service = format!("tandem.v1.Participant/{}", participant.name);
                    reached.push(health_word(&check(node, timeout, &service).await));
                }
                let dead = node
                    .coordinator_client()
                    .list_dead_letters(request(timeout, pb::ListDeadLettersRequest::default()))
                    .await
                    .map(|answer| answer.into_inner())
                    .map_err(|status| node.failed(rpc::LIST_DEAD_LETTERS, &status));
                (health_word(&ready), take(Some(dead), &mut errors))
            } else {
                reached.extend(nodes.participants.iter().map(|_| "unknown".to_string()));
                ("unknown".to_string(), None)
            };
            let liveness_word = health_word(&liveness);
            let reason = if liveness.is_ok() && (!serving || ready != "serving") {
                reason_of(node.coordinator_client().get_health(request(timeout, pb::GetHealthRequest {})).await)
            } else {
                None
            };
            let because = |reason: &Option<String>, otherwise: &str| match reason {
                Some(reason) => format!(": {reason}"),
                None => otherwise.to_string(),
            };
            if let Err(error) = liveness {
                errors.push(error);
            } else if !serving {
                findings.push(format!("the coordinator ({}) is {liveness_word}{}", node.url, because(&reason, "")));
            } else if ready != "serving" {
                findings.push(format!(
                    "the coordinator is not ready ({ready}){}",
                    because(
                        &reason,
                        ": it does not reach every participant of its directory, or still recovers transactions \
                         from its log"
                    )
                ));
            }
            if let Some(dead) = &dead_letters {
                if dead.total > 0 {
                    findings.push(format!(
                        "{} dead letter(s) wait for an operator (tandemctl dead-letters list)",
                        dead.total
                    ));
                }
            }
            Some(CoordinatorStatus {
                url: node.url.clone(),
                liveness: liveness_word,
                ready,
                reason,
                // Of those listed (the first 1,000 at most).
                dead_letter_amount: dead_letters
                    .as_ref()
                    .map(|dead| dead.dead_letters.iter().map(|d| d.amount as i128).sum()),
                dead_letters: dead_letters.map(|dead| dead.total as usize),
            })
        }
    };

    let mut participants = Vec::new();
    for (i, (node, answers)) in participant_answers.await.into_iter().enumerate() {
        let reached_by_coordinator = reached.get(i).cloned();
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        let liveness = health_word(&answers.liveness);
        match &answers.liveness {
            Err(error) => errors.push(error.clone()),
            Ok(_) if liveness != "serving" => findings.push(match &answers.reason {
                Some(reason) => format!("participant {} is {liveness}: {reason}", node.name),
                None => format!("participant {} is {liveness}", node.name),
            }),
            Ok(_) => {}
        }
        match reached_by_coordinator.as_deref() {
            Some("service_unknown") => findings.push(format!(
                "the coordinator has no participant {:?} in its directory (is the name right?)",
                node.name
            )),
            Some(word) if word != "serving" && word != "unknown" => {
                findings.push(format!("the coordinator does not reach participant {} ({word})", node.name))
            }
            _ => {}
        }
        let balances = take(answers.balances, &mut errors);
        let prepared = take(answers.prepared, &mut errors);
        let parked = take(answers.parked, &mut errors);
        if let Some(balances) = &balances {
            if balances.orphaned_count > 0 {
                findings.push(format!(
                    "participant {} holds {} orphaned transaction(s): an operator decides them (tandemctl in-doubt \
                     list)",
                    node.name, balances.orphaned_count
                ));
            }
            if balances.heuristic_mixed_count > 0 {
                findings.push(format!(
                    "participant {} has {} heuristic-mixed transaction(s) (tandemctl in-doubt list)",
                    node.name, balances.heuristic_mixed_count
                ));
            }
        }
        if let Some(parked) = &parked {
            if parked.total > 0 {
                findings.push(format!(
                    "participant {} has {} parked transfer(s) waiting for an operator (tandemctl parked list)",
                    node.name, parked.total
                ));
            }
        }
        participants.push(ParticipantStatus {
            name: node.name.clone(),
            url: node.url.clone(),
            liveness,
            reason: answers.reason.clone(),
            reached_by_coordinator,
            accounts: balances.as_ref().map(|b| b.account_count),
            prepared: balances.as_ref().map(|b| b.prepared_count),
            oldest_prepared_ms: prepared.as_ref().and_then(|p| p.prepared.first().map(|t| t.prepared_for_ms)),
            orphaned: balances.as_ref().map(|b| b.orphaned_count),
            heuristic_mixed: balances.as_ref().map(|b| b.heuristic_mixed_count),
            parked: parked.as_ref().map(|p| p.total as usize),
            suspense: balances.as_ref().map(|b| b.suspense),
            transfers_in_flight: balances.as_ref().map(|b| b.transfers_in_flight),
            outbox_pending: balances.as_ref().map(|b| b.outbox_pending),
        });
    }

    let serving = errors.is_empty()
        && coordinator.as_ref().is_none_or(|c| c.liveness == "serving" && c.ready == "serving")
        && participants.len() == nodes.participants.len()
        && participants.iter().all(|p| {
            p.liveness == "serving" && p.reached_by_coordinator.as_deref().is_none_or(|word| word == "serving")
        });
    Ok((StatusView { serving, coordinator, participants, findings }, errors))
}

fn render(view: &StatusView) -> String {
    let mut table = Table::new(&[
        ("NODE", Align::Left),
        ("URL", Align::Left),
        ("LIVENESS", Align::Left),
        ("READY", Align::Left),
        ("ACCOUNTS", Align::Right),
        ("PREPARED", Align::Right),
        ("OLDEST", Align::Right),
        ("ORPHANED", Align::Right),
        ("MIXED", Align::Right),
        ("PARKED", Align::Right),
        ("DEAD-LETTERS", Align::Right),
        ("SUSPENSE", Align::Right),
    ]);
    let shown = |value: Option<String>| value.unwrap_or_else(|| "-".into());
    if let Some(c) = &view.coordinator {
        table.row(vec![
            "coordinator".into(),
            c.url.clone(),
            c.liveness.clone(),
            c.ready.clone(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            shown(c.dead_letters.map(|n| n.to_string())),
            shown(c.dead_letter_amount.map(|n| n.to_string())),
        ]);
    }
    for p in &view.participants {
        table.row(vec![
            p.name.clone(),
            p.url.clone(),
            p.liveness.clone(),
            shown(p.reached_by_coordinator.clone()),
            shown(p.accounts.map(|n| n.to_string())),
            shown(p.prepared.map(|n| n.to_string())),
            shown(p.oldest_prepared_ms.map(age)),
            shown(p.orphaned.map(|n| n.to_string())),
            shown(p.heuristic_mixed.map(|n| n.to_string())),
            shown(p.parked.map(|n| n.to_string())),
            String::new(),
            shown(p.suspense.map(|n| n.to_string())),
        ]);
    }
    let mut text = table.render();
    text.push_str(if view.serving { "\nserving\n" } else { "\nNOT serving (see above)\n" });
    text
}
