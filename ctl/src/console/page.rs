//! The console's pages, rendered on the server from the commands' views.
//!
//! Every text that comes from a node or a request goes through [`esc`]
//! (HTML) or [`encode`] (a URL's query), so a reason or a detail a node
//! composed cannot become markup. No inline script nor style: the
//! Content-Security-Policy forbids them; `console.js` and `console.css`
//! are separate files served by the console. Every form that changes
//! something is a POST carrying the token in a hidden `csrf` field.

use super::live::Figures;
use crate::in_doubt::{legs_text, InDoubtView, ResolvedView};
use crate::nodes::{RpcError, REASON_BYTES_MAX};
use crate::status::StatusView;
use crate::suspense::{DeadLettersView, ParkedView, ResolvedDeadLetterView, ResolvedParkedView};
use crate::table::age;
use crate::txn::{SagaRecord, TxnView};
use std::fmt::Write;

/// Text made safe to put in HTML, in an element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Text made safe to put in a URL's query (percent-encoding of all but
/// the unreserved characters).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(byte as char),
            byte => {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

/// A state word as the console shows it: upper case, with a class for its
/// colour.
fn state(word: &str) -> String {
    format!("<span class=\"state state-{}\">{}</span>", esc(&word.replace(['(', ')'], "")), esc(&word.to_uppercase()))
}

fn lookup_link(id: &str) -> String {
    format!("<a href=\"/lookup?id={}\">{}</a>", encode(id), esc(id))
}

/// The page around `body`, with the menu; `current` is the menu entry
/// shown as current.
fn layout(title: &str, current: &str, body: &str) -> String {
    let mut menu = String::new();
    for (href, name) in
        [("/", "Overview"), ("/lookup", "Lookup"), ("/dead-letters", "Dead letters"), ("/parked", "Parked")]
    {
        let here = if name == current { " aria-current=\"page\"" } else { "" };
        let _ = write!(menu, "<a href=\"{href}\"{here}>{name}</a>");
    }
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} · tandem console</title>\n<link rel=\"stylesheet\" href=\"/console.css\">\n\
         <script src=\"/console.js\" defer></script>\n</head>\n<body>\n\
         <header><span class=\"brand\">tandem</span><nav>{menu}</nav></header>\n<main>\n<h1>{}</h1>\n{body}</main>\n\
         </body>\n</html>\n",
        esc(title),
        esc(title)
    )
}

/// A page that only says something (an error, a refusal).
pub fn message(title: &str, text: &str) -> String {
    layout(title, "", &format!("<p class=\"message\" id=\"message\">{}</p>\n", esc(text)))
}

/// The calls that failed while a page was built.
fn errors(errors: &[RpcError]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let mut out = String::from("<section class=\"errors\" id=\"errors\"><h2>Calls that failed</h2><ul>");
    for e in errors {
        let _ = write!(
            out,
            "<li><b>{}</b> ({}) {}: <code>{}</code> {}</li>",
            esc(&e.node),
            esc(&e.url),
            esc(e.rpc),
            esc(e.code),
            esc(&e.message)
        );
    }
    out.push_str("</ul></section>\n");
    out
}

fn findings(findings: &[String]) -> String {
    if findings.is_empty() {
        return String::new();
    }
    let mut out = String::from("<section class=\"findings\" id=\"findings\"><h2>Needs attention</h2><ul>");
    for f in findings {
        let _ = write!(out, "<li>{}</li>", esc(f));
    }
    out.push_str("</ul></section>\n");
    out
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or("-".to_string(), |v| esc(&v.to_string()))
}

/// A hidden field.
fn hidden(name: &str, value: &str) -> String {
    format!("<input type=\"hidden\" name=\"{}\" value=\"{}\">", esc(name), esc(value))
}

/// The reason field every resolve form has: required, at most 4,096
/// bytes (the browser counts characters; the console counts bytes again).
fn reason_input(id: &str) -> String {
    format!(
        "<label>Reason <input type=\"text\" name=\"reason\" id=\"{}\" required minlength=\"1\" \
         maxlength=\"{REASON_BYTES_MAX}\" placeholder=\"who decided, and why\"></label>",
        esc(id)
    )
}

pub fn overview(
    token: &str,
    figures: &Figures,
    (status, status_errors): &(StatusView, Vec<RpcError>),
    (in_doubt, in_doubt_errors): &(InDoubtView, Vec<RpcError>),
) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<section id=\"live\" class=\"live\"><h2>Live</h2><dl>\
         <div><dt>Commits/s</dt><dd id=\"commits-per-s\">{}</dd></div>\
         <div><dt>Latency p50</dt><dd id=\"p50\">{}</dd></div>\
         <div><dt>Latency p99</dt><dd id=\"p99\">{}</dd></div>\
         <div><dt>In flight</dt><dd id=\"in-flight\">{}</dd></div></dl>\
         <p class=\"note\" id=\"live-note\">{}</p></section>\n",
        esc(&figures.commits_per_s),
        esc(&figures.p50),
        esc(&figures.p99),
        esc(&figures.in_flight),
        esc(&figures.note)
    );
    body.push_str(&findings(&status.findings));
    body.push_str(&errors(status_errors));
    let _ = write!(
        body,
        "<section><h2>Nodes</h2><p class=\"{}\" id=\"serving\">{}</p><table id=\"nodes\"><thead><tr>\
         <th>Node</th><th>URL</th><th>Liveness</th><th>Ready / reached</th><th>Accounts</th><th>Prepared</th>\
         <th>Oldest</th><th>Orphaned</th><th>Mixed</th><th>Parked</th><th>Dead letters</th><th>Suspense</th>\
         </tr></thead><tbody>",
        if status.serving { "ok" } else { "bad" },
        if status.serving { "Every node serving, the coordinator ready." } else { "NOT serving: see above." }
    );
    if let Some(c) = &status.coordinator {
        let _ = write!(
            body,
            "<tr><td>coordinator</td><td>{}</td><td>{}</td><td>{}</td><td></td><td></td><td></td><td></td>\
             <td></td><td></td><td><a href=\"/dead-letters\">{}</a></td><td>{}</td></tr>",
            esc(&c.url),
            state(&c.liveness),
            state(&c.ready),
            or_dash(c.dead_letters),
            or_dash(c.dead_letter_amount)
        );
    }
    for p in &status.participants {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\"><a href=\"/parked\">{}</a></td><td></td><td class=\"n\">{}</td></tr>",
            esc(&p.name),
            esc(&p.url),
            state(&p.liveness),
            p.reached_by_coordinator.as_deref().map_or("-".to_string(), state),
            or_dash(p.accounts),
            or_dash(p.prepared),
            or_dash(p.oldest_prepared_ms.map(age)),
            or_dash(p.orphaned),
            or_dash(p.heuristic_mixed),
            or_dash(p.parked),
            or_dash(p.suspense)
        );
    }
    body.push_str("</tbody></table></section>\n");

    body.push_str("<section><h2>In doubt</h2>\n");
    body.push_str(&errors(in_doubt_errors));
    let mut rows = String::new();
    let mut notes = String::new();
    for p in &in_doubt.participants {
        for t in &p.prepared {
            let _ = write!(
                rows,
                "<tr data-participant=\"{}\" data-txn=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>\
                 <td>{}</td><td>{}</td><td><form method=\"post\" action=\"/in-doubt/resolve\" class=\"resolve\">{}{}{}\
                 <label><input type=\"radio\" name=\"outcome\" value=\"commit\" required> commit</label>\
                 <label><input type=\"radio\" name=\"outcome\" value=\"abort\"> abort</label>{}\
                 <button type=\"submit\">Decide</button></form></td></tr>",
                esc(&p.participant),
                esc(&t.txn_id),
                esc(&p.participant),
                lookup_link(&t.txn_id),
                esc(&t.coordinator_id),
                esc(&age(t.prepared_for_ms)),
                if t.orphaned { "yes" } else { "" },
                esc(&legs_text(&t.legs)),
                hidden("csrf", token),
                hidden("participant", &p.participant),
                hidden("id", &t.txn_id),
                reason_input(&format!("reason-{}-{}", p.participant, t.txn_id))
            );
        }
        if p.total > p.prepared.len() as u64 {
            let _ = write!(
                notes,
                "<li>{}: showing {} of {} prepared (oldest first)</li>",
                esc(&p.participant),
                p.prepared.len(),
                p.total
            );
        }
        let _ = write!(
            notes,
            "<li>{}: {} prepared, {} orphaned; longest in doubt since its start {}</li>",
            esc(&p.participant),
            p.total,
            p.orphaned,
            esc(&age(p.longest_in_doubt_ms))
        );
    }
    if rows.is_empty() {
        body.push_str("<p id=\"no-in-doubt\">No transaction in doubt.</p>\n");
    } else {
        let _ = write!(
            body,
            "<p class=\"note\">A prepared transaction is normally decided within milliseconds. Before deciding one \
             by hand, look it up: if any participant committed it, commit it everywhere.</p>\
             <table id=\"in-doubt\"><thead><tr><th>Participant</th><th>Transaction</th><th>Coordinator</th>\
             <th>Prepared for</th><th>Orphaned</th><th>Legs</th><th>Heuristic decision</th></tr></thead>\
             <tbody>{rows}</tbody></table>\n"
        );
    }
    let _ = write!(body, "<ul class=\"note\">{notes}</ul></section>\n");
    layout("Overview", "Overview", &body)
}

pub fn lookup(_token: &str, id: &str, result: Option<Result<(TxnView, Vec<RpcError>), String>>) -> String {
    let mut body = format!(
        "<form method=\"get\" action=\"/lookup\" class=\"lookup\"><label>Transaction or saga id \
         <input type=\"text\" name=\"id\" id=\"lookup-id\" value=\"{}\" required maxlength=\"64\" autofocus></label>\
         <button type=\"submit\" id=\"lookup-go\">Look up</button></form>\n",
        esc(id)
    );
    match result {
        None => {}
        Some(Err(why)) => {
            let _ = write!(body, "<p class=\"bad\" id=\"message\">{}</p>\n", esc(&why));
        }
        Some(Ok((view, failed))) => {
            body.push_str(&findings(&view.findings));
            body.push_str(&errors(&failed));
            let _ = write!(body, "<section id=\"result\"><h2>Transaction {}</h2>", esc(&view.txn_id));
            if let Some(c) = &view.coordinator {
                let _ = write!(
                    body,
                    "<table id=\"coordinator\"><tbody><tr><th>Coordinator</th><td id=\"coordinator-state\">{}</td></tr>",
                    state(&c.state)
                );
                if !c.pending_participants.is_empty() {
                    let _ = write!(
                        body,
                        "<tr><th>Not acknowledged by</th><td>{}</td></tr>",
                        esc(&c.pending_participants.join(", "))
                    );
                }
                if !c.detail.is_empty() {
                    let _ = write!(body, "<tr><th>Detail</th><td>{}</td></tr>", esc(&c.detail));
                }
                body.push_str("</tbody></table>\n");
                if let Some(saga) = &c.saga {
                    body.push_str(&saga_table(saga));
                }
            }
            if !view.choreographed.is_empty() {
                body.push_str(
                    "<table id=\"choreographed\"><thead><tr><th>Choreographed transfer started on</th><th>State</th>\
                     <th>Reason</th></tr></thead><tbody>",
                );
                for t in &view.choreographed {
                    let _ = write!(
                        body,
                        "<tr data-participant=\"{}\"><td>{}</td><td class=\"transfer-state\">{}</td><td>{}</td></tr>",
                        esc(&t.participant),
                        esc(&t.participant),
                        state(&t.state),
                        esc(&t.reason)
                    );
                }
                body.push_str("</tbody></table>\n");
            }
            body.push_str(
                "<table id=\"participants\"><thead><tr><th>Participant</th><th>State</th><th>Coordinator</th>\
                 <th>Incarnation</th><th>Position</th><th>One-phase</th><th>Orphaned</th><th>Heuristic</th></tr>\
                 </thead><tbody>",
            );
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
                let _ = write!(
                    body,
                    "<tr data-participant=\"{}\"><td>{}</td><td class=\"participant-state\">{}</td><td>{}</td>\
                     <td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&p.participant),
                    esc(&p.participant),
                    state(&p.state),
                    esc(&p.coordinator_id),
                    esc(&p.coordinator_incarnation),
                    if p.position == 0 { String::new() } else { p.position.to_string() },
                    if p.one_phase { "yes" } else { "" },
                    if p.orphaned { "yes" } else { "" },
                    esc(&heuristic)
                );
            }
            body.push_str(
                "</tbody></table>\n<p class=\"note\">UNKNOWN on the coordinator: no record (presumed \
                           aborted, or finished and collected); on a participant: never prepared there, or finished \
                           and collected.</p></section>\n",
            );
        }
    }
    layout("Lookup", "Lookup", &body)
}

fn saga_table(saga: &SagaRecord) -> String {
    format!(
        "<table id=\"saga\"><tbody><tr><th>Saga</th><td>{}</td></tr><tr><th>State</th><td id=\"saga-state\">{}</td></tr>\
         <tr><th>From</th><td>{}</td></tr><tr><th>To</th><td>{}</td></tr><tr><th>Amount</th><td>{}</td></tr>\
         <tr><th>Suspense at</th><td>{}</td></tr><tr><th>Parked</th><td>{}</td></tr><tr><th>Reason</th><td>{}</td></tr>\
         </tbody></table>\n",
        esc(&saga.saga_id),
        state(&saga.state),
        saga.from_account,
        saga.to_account,
        saga.amount,
        esc(&saga.suspense_participant),
        if saga.parked { "yes" } else { "no" },
        esc(&saga.reason)
    )
}

pub fn dead_letters(token: &str, listed: &Result<DeadLettersView, RpcError>) -> String {
    let view = match listed {
        Ok(view) => view,
        Err(error) => return layout("Dead letters", "Dead letters", &errors(std::slice::from_ref(error))),
    };
    let mut body = String::from(
        "<p class=\"note\">Orchestrated sagas whose refund could not be applied: their money waits in the \
         suspense account of a participant. Resolving one moves it to an account of that participant (by default \
         the saga's source account, which must be open).</p>\n",
    );
    if view.dead_letters.is_empty() {
        body.push_str("<p id=\"no-dead-letters\">No dead letter.</p>\n");
    } else {
        body.push_str(
            "<table id=\"dead-letters\"><thead><tr><th>Saga</th><th>State</th><th>From</th><th>To</th>\
             <th>Amount</th><th>Suspense at</th><th>Parked</th><th>Reason</th><th>Resolve</th></tr></thead><tbody>",
        );
        for d in &view.dead_letters {
            let _ = write!(
                body,
                "<tr data-saga=\"{}\"><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>\
                 <form method=\"post\" action=\"/dead-letters/resolve\" class=\"resolve\">{}{}\
                 <label>To account <input type=\"text\" name=\"to_account\" inputmode=\"numeric\" pattern=\"[0-9]*\" \
                 maxlength=\"20\" placeholder=\"source\"></label>{}<button type=\"submit\">Resolve</button></form>\
                 </td></tr>",
                esc(&d.saga_id),
                lookup_link(&d.saga_id),
                state(&d.state),
                d.from_account,
                d.to_account,
                d.amount,
                esc(&d.suspense_participant),
                if d.parked { "yes" } else { "no" },
                esc(&d.reason),
                hidden("csrf", token),
                hidden("id", &d.saga_id),
                reason_input(&format!("reason-{}", d.saga_id))
            );
        }
        body.push_str("</tbody></table>\n");
    }
    let _ = write!(
        body,
        "<p class=\"note\" id=\"total\">{} dead letter(s) in all{}.</p>\n",
        view.total,
        if view.total > view.dead_letters.len() {
            format!("; showing the oldest {}", view.dead_letters.len())
        } else {
            String::new()
        }
    );
    layout("Dead letters", "Dead letters", &body)
}

pub fn parked(token: &str, (view, failed): &(ParkedView, Vec<RpcError>)) -> String {
    let mut body = String::from(
        "<p class=\"note\">Choreographed transfers whose refund could not be applied: their money waits in the \
         suspense account of their source participant. Releasing one moves it to an account of that participant \
         (by default the transfer's source account, which must be open).</p>\n",
    );
    body.push_str(&errors(failed));
    for p in &view.participants {
        let _ = write!(body, "<section><h2>{}</h2>", esc(&p.participant));
        if p.parked.is_empty() {
            body.push_str("<p>No parked transfer.</p>");
        } else {
            body.push_str(
                "<table class=\"parked\"><thead><tr><th>Saga</th><th>State</th><th>Reason</th><th>Resolve</th></tr>\
                 </thead><tbody>",
            );
            for t in &p.parked {
                let _ = write!(
                    body,
                    "<tr data-saga=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>\
                     <form method=\"post\" action=\"/parked/resolve\" class=\"resolve\">{}{}{}\
                     <label>To account <input type=\"text\" name=\"to_account\" inputmode=\"numeric\" \
                     pattern=\"[0-9]*\" maxlength=\"20\" placeholder=\"source\"></label>{}\
                     <button type=\"submit\">Resolve</button></form></td></tr>",
                    esc(&t.saga_id),
                    lookup_link(&t.saga_id),
                    state(&t.state),
                    esc(&t.reason),
                    hidden("csrf", token),
                    hidden("participant", &p.participant),
                    hidden("id", &t.saga_id),
                    reason_input(&format!("reason-{}-{}", p.participant, t.saga_id))
                );
            }
            body.push_str("</tbody></table>");
        }
        let _ = write!(
            body,
            "<p class=\"note\">{} parked in all{}.</p></section>\n",
            p.total,
            if p.total > p.parked.len() { format!("; showing the first {}", p.parked.len()) } else { String::new() }
        );
    }
    layout("Parked transfers", "Parked", &body)
}

/// A node refused the action, or could not be reached.
pub fn refused(error: &RpcError) -> String {
    layout(
        "Refused",
        "",
        &format!(
            "<p class=\"bad\" id=\"message\">{} ({}) {}: <code>{}</code> {}</p>\n<p><a href=\"/\">Back</a></p>\n",
            esc(&error.node),
            esc(&error.url),
            esc(error.rpc),
            esc(error.code),
            esc(&error.message)
        ),
    )
}

fn outcome(findings: &[String]) -> String {
    if findings.is_empty() {
        String::new()
    } else {
        self::findings(findings)
    }
}

pub fn resolved_dead_letter(view: &ResolvedDeadLetterView) -> String {
    let body = format!(
        "<p id=\"message\" class=\"{}\">Dead letter {}: {}</p>\n{}{}<p><a href=\"/dead-letters\">Back to the dead \
         letters</a></p>\n",
        if view.findings.is_empty() { "ok" } else { "bad" },
        esc(&view.saga.saga_id),
        state(&view.saga.state),
        outcome(&view.findings),
        saga_table(&view.saga)
    );
    layout("Dead letter resolved", "Dead letters", &body)
}

pub fn resolved_parked(view: &ResolvedParkedView) -> String {
    let body = format!(
        "<p id=\"message\" class=\"{}\">{}: parked transfer {}: {}</p>\n{}<p>{}</p>\
         <p><a href=\"/parked\">Back to the parked transfers</a></p>\n",
        if view.findings.is_empty() { "ok" } else { "bad" },
        esc(&view.participant),
        esc(&view.transfer.saga_id),
        state(&view.transfer.state),
        outcome(&view.findings),
        esc(&view.transfer.reason)
    );
    layout("Parked transfer resolved", "Parked", &body)
}

pub fn resolved_in_doubt(view: &ResolvedView) -> String {
    let d = &view.decision;
    let body = format!(
        "<p id=\"message\" class=\"ok\">{}: {} {} by heuristic decision ({}): {}</p>\n\
         <p><a href=\"/lookup?id={}\">Look it up</a> · <a href=\"/\">Back to the overview</a></p>\n",
        esc(&view.participant),
        if d.committed { "committed" } else { "aborted" },
        esc(&d.txn_id),
        esc(&d.state),
        esc(&d.reason),
        encode(&d.txn_id)
    );
    layout("Decided", "Overview", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_cannot_become_markup() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        let page = message("<b>", "<img src=x onerror=alert(1)>");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    }

    #[test]
    fn a_dead_letter_row_carries_the_token_and_requires_a_reason() {
        let view = DeadLettersView {
            total: 3,
            dead_letters: vec![SagaRecord {
                saga_id: "saga-1".into(),
                state: "dead_lettered".into(),
                from_account: 4,
                to_account: 14,
                amount: 120,
                reason: "refund failed: <closed>".into(),
                suspense_participant: "p1".into(),
                parked: true,
            }],
            findings: Vec::new(),
        };
        let page = dead_letters("t0k3n", &Ok(view));
        assert!(page.contains("name=\"csrf\" value=\"t0k3n\""), "{page}");
        assert!(page.contains("name=\"reason\" id=\"reason-saga-1\" required"), "{page}");
        assert!(page.contains("DEAD_LETTERED"));
        assert!(page.contains("refund failed: &lt;closed&gt;"));
        assert!(page.contains("3 dead letter(s) in all; showing the oldest 1"));
        assert!(!page.contains("<script>"), "no inline script");
    }
}
