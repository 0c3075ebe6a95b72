//! `tandemctl balances` and `tandemctl audit`: where the money is.
//!
//! The money in the system is posted + suspense − heuristic excess: posted
//! balances, plus what dead letters and parked transfers hold in suspense,
//! minus what heuristic-mixed decisions left posted beyond the
//! coordinator's outcomes (see coordinator.proto, AuditResponse).
//!
//! `balances` asks each participant for its totals (ReadBalances), each at
//! one instant of its own: the participants are read one after the other,
//! so while transfers run the sum across them can show a transaction half
//! applied. `audit` asks the coordinator for the consistent cut (Audit),
//! whose totals are exact whatever runs. Nothing in the API records how
//! much money the system should hold; `audit --expected-money N` compares
//! with the figure the operator knows (found wrong, exit 1, if it differs),
//! and so does `balances --expected-money N`. Sums here are 128-bit: a
//! total of int64 figures cannot overflow.

use crate::nodes::{on_each, request, rpc, Nodes, RpcError, UsageError};
use crate::report::Report;
use crate::table::{flag, Align, Table};
use serde::Serialize;
use tandem::pb;

#[derive(Debug, Serialize)]
struct ParticipantTotals {
    participant: String,
    accounts: u64,
    posted: i64,
    reserved: i64,
    incoming: i64,
    suspense: i64,
    heuristic_excess: i64,
    prepared: u64,
    orphaned: u64,
}

impl ParticipantTotals {
    fn new(participant: String, totals: &pb::ReadBalancesResponse) -> ParticipantTotals {
        ParticipantTotals {
            participant,
            accounts: totals.account_count,
            posted: totals.total_posted,
            reserved: totals.total_reserved,
            incoming: totals.total_incoming,
            suspense: totals.suspense,
            heuristic_excess: totals.heuristic_excess,
            prepared: totals.prepared_count,
            orphaned: totals.orphaned_count,
        }
    }
}

#[derive(Debug, Serialize)]
struct BalancesView {
    participants: Vec<ParticipantTotals>,
    accounts: u64,
    posted: i128,
    reserved: i128,
    suspense: i128,
    heuristic_excess: i128,
    /// posted + suspense − heuristic_excess, over the participants read.
    money: i128,
    expected_money: Option<i128>,
    findings: Vec<String>,
}

/// A difference between the money found and the money expected, if any.
fn money_finding(money: i128, expected: Option<i128>) -> Option<String> {
    let expected = expected?;
    (money != expected)
        .then(|| format!("the money is {money}, expected {expected} (a difference of {})", money - expected))
}

pub async fn balances(nodes: &Nodes, expected_money: Option<i128>) -> Result<Report, UsageError> {
    let timeout = nodes.timeout;
    let answers = on_each(nodes.participants()?, move |node| async move {
        let answer = node
            .participant_client()
            .read_balances(request(
                timeout,
                pb::ReadBalancesRequest { include_accounts: false, include_prepared: false },
            ))
            .await
            .map_err(|status| node.failed(rpc::READ_BALANCES, &status))?;
        Ok(answer.into_inner())
    })
    .await;
    let mut errors = Vec::new();
    let mut participants = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(totals) => participants.push(ParticipantTotals::new(node.name.clone(), &totals)),
            Err(error) => errors.push(error),
        }
    }
    let sum = |field: fn(&ParticipantTotals) -> i64| participants.iter().map(|p| field(p) as i128).sum::<i128>();
    let (posted, reserved, suspense, excess) =
        (sum(|p| p.posted), sum(|p| p.reserved), sum(|p| p.suspense), sum(|p| p.heuristic_excess));
    let money = posted + suspense - excess;
    // A partial read says nothing about the total.
    let findings: Vec<String> =
        if errors.is_empty() { money_finding(money, expected_money).into_iter().collect() } else { Vec::new() };
    let view = BalancesView {
        accounts: participants.iter().map(|p| p.accounts).sum(),
        participants,
        posted,
        reserved,
        suspense,
        heuristic_excess: excess,
        money,
        expected_money,
        findings: findings.clone(),
    };
    let mut text = totals_table(&view.participants, (view.accounts, posted, reserved, suspense, excess));
    text.push_str(&format!("\nmoney (posted + suspense - heuristic excess): {money}\n"));
    text.push_str("(each participant read at its own instant; `tandemctl audit` reads a consistent cut)\n");
    Ok(Report::new(&view, text, findings, errors))
}

fn totals_table(participants: &[ParticipantTotals], total: (u64, i128, i128, i128, i128)) -> String {
    let mut table = Table::new(&[
        ("PARTICIPANT", Align::Left),
        ("ACCOUNTS", Align::Right),
        ("POSTED", Align::Right),
        ("RESERVED", Align::Right),
        ("INCOMING", Align::Right),
        ("SUSPENSE", Align::Right),
        ("HEURISTIC-EXCESS", Align::Right),
        ("PREPARED", Align::Right),
        ("ORPHANED", Align::Right),
    ]);
    for p in participants {
        table.row(vec![
            p.participant.clone(),
            p.accounts.to_string(),
            p.posted.to_string(),
            p.reserved.to_string(),
            p.incoming.to_string(),
            p.suspense.to_string(),
            p.heuristic_excess.to_string(),
            p.prepared.to_string(),
            p.orphaned.to_string(),
        ]);
    }
    let (accounts, posted, reserved, suspense, excess) = total;
    table.row(vec![
        "total".into(),
        accounts.to_string(),
        posted.to_string(),
        reserved.to_string(),
        String::new(),
        suspense.to_string(),
        excess.to_string(),
        String::new(),
        String::new(),
    ]);
    table.render()
}

#[derive(Debug, Serialize)]
struct AccountView {
    participant: String,
    account: u64,
    posted: i64,
    reserved: i64,
    incoming: i64,
    available: i64,
    closed: bool,
}

#[derive(Debug, Serialize)]
struct AccountBalancesView {
    account: u64,
    /// The participants that hold it (one, in a sound cluster).
    holders: Vec<AccountView>,
    findings: Vec<String>,
}

/// One account's balance, from whichever participant has it: each is asked
/// (tandemctl does not know the directory's ranges); NOT_FOUND from the
/// others is expected.
pub async fn account(nodes: &Nodes, account: u64) -> Result<Report, UsageError> {
    let timeout = nodes.timeout;
    let answers = on_each(nodes.participants()?, move |node| async move {
        match node.participant_client().get_balance(request(timeout, pb::GetBalanceRequest { account })).await {
            Ok(answer) => Ok(Some(answer.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(node.failed(rpc::GET_BALANCE, &status)),
        }
    })
    .await;
    let mut errors: Vec<RpcError> = Vec::new();
    let mut holders = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok(Some(balance)) => holders.push(AccountView {
                participant: node.name.clone(),
                account: balance.account,
                posted: balance.posted,
                reserved: balance.reserved,
                incoming: balance.incoming,
                available: balance.available,
                closed: balance.closed,
            }),
            Ok(None) => {}
            Err(error) => errors.push(error),
        }
    }
    let mut findings = Vec::new();
    if holders.is_empty() && errors.is_empty() {
        findings.push(format!("no participant given has account {account}"));
    }
    if holders.len() > 1 {
        let names: Vec<&str> = holders.iter().map(|h| h.participant.as_str()).collect();
        findings.push(format!("account {account} is held by more than one participant: {}", names.join(", ")));
    }
    let mut table = Table::new(&[
        ("PARTICIPANT", Align::Left),
        ("ACCOUNT", Align::Right),
        ("POSTED", Align::Right),
        ("RESERVED", Align::Right),
        ("INCOMING", Align::Right),
        ("AVAILABLE", Align::Right),
        ("CLOSED", Align::Left),
    ]);
    for h in &holders {
        table.row(vec![
            h.participant.clone(),
            h.account.to_string(),
            h.posted.to_string(),
            h.reserved.to_string(),
            h.incoming.to_string(),
            h.available.to_string(),
            flag(h.closed),
        ]);
    }
    let text = if table.is_empty() { String::new() } else { table.render() };
    let view = AccountBalancesView { account, holders, findings: findings.clone() };
    Ok(Report::new(&view, text, findings, errors))
}

#[derive(Debug, Serialize)]
struct AuditView {
    participants: Vec<ParticipantTotals>,
    accounts: u64,
    posted: i64,
    reserved: i64,
    suspense: i64,
    heuristic_excess: i64,
    commits_in_flight: u64,
    /// posted + suspense − heuristic_excess: the money in the system at the
    /// audit's cut.
    money: i128,
    expected_money: Option<i128>,
    /// Whether the money is the expected figure (None without
    /// --expected-money: the API records no such figure).
    balanced: Option<bool>,
    findings: Vec<String>,
}

pub async fn audit(nodes: &Nodes, expected_money: Option<i128>) -> Result<Report, UsageError> {
    let node = nodes.coordinator()?;
    let audit = match node.coordinator_client().audit(nodes.request(pb::AuditRequest { include_accounts: false })).await
    {
        Ok(answer) => answer.into_inner(),
        Err(status) => return Ok(Report::failed(node.failed(rpc::AUDIT, &status))),
    };
    let money = audit.total_posted as i128 + audit.total_suspense as i128 - audit.total_heuristic_excess as i128;
    let mut findings: Vec<String> = money_finding(money, expected_money).into_iter().collect();
    if audit.total_heuristic_excess != 0 {
        findings.push(format!(
            "heuristic-mixed decisions left {} posted beyond the coordinator's outcomes (tandemctl in-doubt list)",
            audit.total_heuristic_excess
        ));
    }
    let participants: Vec<ParticipantTotals> =
        audit.participants.iter().map(|p| ParticipantTotals::new(p.participant_id.clone(), p)).collect();
    let view = AuditView {
        participants,
        accounts: audit.account_count,
        posted: audit.total_posted,
        reserved: audit.total_reserved,
        suspense: audit.total_suspense,
        heuristic_excess: audit.total_heuristic_excess,
        commits_in_flight: audit.commits_in_flight,
        money,
        expected_money,
        balanced: expected_money.map(|expected| expected == money),
        findings: findings.clone(),
    };
    let mut text = totals_table(
        &view.participants,
        (
            view.accounts,
            view.posted as i128,
            view.reserved as i128,
            view.suspense as i128,
            view.heuristic_excess as i128,
        ),
    );
    text.push_str(&format!(
        "\nmoney (posted + suspense - heuristic excess) at a consistent cut: {money}; commits in flight counted as \
         applied: {}\n",
        view.commits_in_flight
    ));
    text.push_str(&match view.balanced {
        Some(true) => "balanced: the money is the expected figure\n".to_string(),
        Some(false) => format!("NOT balanced: expected {}\n", expected_money.unwrap_or_default()),
        None => "(give --expected-money N to check the total)\n".to_string(),
    });
    Ok(Report::new(&view, text, findings, Vec::new()))
}
