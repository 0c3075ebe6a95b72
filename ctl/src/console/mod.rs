//! `tandemctl console`: the operator's console, web pages for a browser on
//! the operator's machine.
//!
//! It is tandemctl serving HTTP: the same node flags and certificate, the
//! same view builders as the commands ([`crate::status`], [`crate::txn`],
//! [`crate::in_doubt`], [`crate::suspense`]), rendered as HTML by
//! [`page`] instead of a table. Nothing else calls the nodes: a page is a
//! command run on request. The live figures come from the coordinator's
//! Prometheus endpoint, scraped every second by [`live`]. The pages are
//! server-rendered and work with scripts off; `console.js` only refreshes
//! the live figures. Its stylesheet and script are served by the console
//! itself: nothing is loaded from elsewhere, so it works with no internet.
//!
//! Who may use it. The console acts with the operator's certificate, so
//! whoever reaches it acts as the operator. Three guards:
//! - it listens on loopback unless told otherwise (`--allow-non-loopback`);
//! - every request carries a random token, printed with the URL at start
//!   (`/?token=...`): the first request with it in the query sets an
//!   HttpOnly, SameSite=Strict cookie and is redirected to the same page
//!   without it; any request with neither is refused (403);
//! - a form that changes something (a resolve) is a POST that carries the
//!   token again in a hidden field, so another site cannot submit it
//!   (CSRF), and every answer forbids scripts but the console's own
//!   (Content-Security-Policy: `script-src 'self'`), framing, and
//!   caching.
//!
//! Bounds: a request body is at most [`FORM_BYTES_MAX`], a query at most
//! [`QUERY_BYTES_MAX`]; ids are 1 to 64 characters, a reason 1 to 4,096
//! bytes; every list shows at most [`LIST_LIMIT`] rows per node and says
//! how many there are in all. Bad input is a 400 page that says why,
//! never a panic. Connections are served by `tandem::metrics::serve_http`
//! (at most 64 at once, each at most 30 s).

mod live;
mod page;

use crate::nodes::{Nodes, UsageError, REASON_BYTES_MAX};
use crate::report::Report;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tandem::tls::Security;

/// Largest request body read (a resolve form: an id, an account, a reason
/// of at most 4,096 bytes, percent-encoded).
pub const FORM_BYTES_MAX: usize = 16 * 1024;

/// Longest query string taken.
pub const QUERY_BYTES_MAX: usize = 1024;

/// Most fields a form or query may have.
const FIELDS_MAX: usize = 8;

/// Most rows a list shows, per node (the lists' RPCs take at most 1,000).
pub const LIST_LIMIT: u32 = 100;

/// The cookie that carries the token.
const COOKIE: &str = "tandem_console";

/// Every answer's Content-Security-Policy: only the console's own style
/// and script, its own forms and fetches; no frames, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

#[derive(clap::Args, Debug)]
pub struct ConsoleArgs {
    /// Where to serve HTTP (port 0: the kernel picks one). Loopback unless
    /// --allow-non-loopback.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve on an address that is not loopback. The console is plain
    /// HTTP: the token then travels in clear on that network, and whoever
    /// holds it acts as the operator. Prefer an SSH tunnel.
    #[arg(long)]
    allow_non_loopback: bool,
    /// The coordinator's metrics endpoint (its --http-addr), for the live
    /// throughput, latency and transactions in flight: https://HOST:PORT
    /// (http:// with --insecure). Without it the overview has no live
    /// figures.
    #[arg(long, value_name = "URL")]
    coordinator_metrics: Option<String>,
}

/// What every request handler shares.
struct Console {
    nodes: Nodes,
    token: String,
    live: Arc<live::Live>,
}

/// Serves the console until Ctrl-C or SIGTERM.
pub async fn run(nodes: Nodes, security: Security, args: ConsoleArgs) -> Result<Report, UsageError> {
    if !args.listen.ip().is_loopback() && !args.allow_non_loopback {
        return Err(UsageError(format!(
            "--listen {}: not a loopback address; the console acts as the operator for whoever reaches it: give \
             --allow-non-loopback to serve there anyway",
            args.listen
        )));
    }
    nodes.coordinator()?;
    nodes.participants()?;
    let metrics = match &args.coordinator_metrics {
        Some(url) => Some(metrics_addr(url, &security)?),
        None => None,
    };
    let token = new_token().map_err(|e| UsageError(format!("cannot make the console's token: {e}")))?;
    let (listener, bound) = tandem::server::bind(args.listen)
        .await
        .map_err(|e| UsageError(format!("--listen {}: cannot serve there: {e}", args.listen)))?;
    if !bound.ip().is_loopback() {
        eprintln!("tandemctl: the console is plain HTTP on {bound}: anyone who learns the token acts as the operator");
    }
    let live = Arc::new(live::Live::new(metrics.is_some()));
    if let Some(addr) = metrics {
        tokio::spawn(live::scrape_every_second(live.clone(), addr, security));
    }
    let console = Arc::new(Console { nodes, token, live });
    let router =
        axum::Router::new().fallback(handle).layer(DefaultBodyLimit::max(FORM_BYTES_MAX)).with_state(console.clone());
    // The one line a script waits for (bench cluster up, the tests).
    println!("console on http://{bound}/?token={}", console.token);
    tokio::select! {
        served = tandem::metrics::serve_http(listener, Security::Insecure, router) => {
            if let Err(error) = served {
                eprintln!("tandemctl: the console stopped: {error}");
                return Ok(Report::failed(crate::nodes::RpcError {
                    node: "console".into(),
                    url: format!("http://{bound}"),
                    rpc: "(console)",
                    code: "INTERNAL",
                    message: error.to_string(),
                }));
            }
        }
        _ = tandem::server::shutdown_signal() => {}
    }
    Ok(Report { json: String::new(), text: "console stopped".into(), findings: Vec::new(), errors: Vec::new() })
}

/// HOST:PORT of the coordinator's metrics endpoint, from its URL; the
/// scheme must match the certificates (https) or --insecure (http).
fn metrics_addr(url: &str, security: &Security) -> Result<String, UsageError> {
    let bad = |why: &str| UsageError(format!("--coordinator-metrics {url:?}: {why}"));
    let (scheme, rest) =
        url.split_once("://").ok_or_else(|| bad("give https://HOST:PORT (http:// with --insecure)"))?;
    if scheme != security.scheme() {
        return Err(bad(&format!("the scheme must be {}:// with these flags", security.scheme())));
    }
    let addr = rest.strip_suffix("/metrics").unwrap_or(rest).trim_end_matches('/');
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !addr.contains('/') => {
            Ok(addr.to_string())
        }
        _ => Err(bad("give https://HOST:PORT (http:// with --insecure)")),
    }
}

/// 128 random bits from the kernel, as 32 hex digits.
fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Equal, in a time that depends on the lengths only.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of `name` in the Cookie headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// A form or query's fields. Refused (with why): more than
/// [`FIELDS_MAX`] fields, a field given twice, bad percent-encoding or
/// UTF-8.
fn fields(encoded: &str) -> Result<BTreeMap<String, String>, String> {
    let mut fields = BTreeMap::new();
    for pair in encoded.split('&').filter(|pair| !pair.is_empty()) {
        if fields.len() == FIELDS_MAX {
            return Err(format!("more than {FIELDS_MAX} fields"));
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode(key)?, decode(value)?);
        if fields.insert(key.clone(), value).is_some() {
            return Err(format!("the field {key:?} is given twice"));
        }
    }
    Ok(fields)
}

/// application/x-www-form-urlencoded decoding: `+` is a space, `%XX` a
/// byte; the bytes must be UTF-8.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a bad %-escape in the form")?;
                out.push(byte);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the form is not UTF-8".to_string())
}

/// Every answer's headers: the policy, no sniffing, no framing, no
/// caching, no referrer.
fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: String) -> Response {
    respond(status, "text/html; charset=utf-8", body)
}

/// A page that says what was wrong with the request.
fn bad_request(why: &str) -> Response {
    html(StatusCode::BAD_REQUEST, page::message("Bad request", why))
}

/// The one handler: authenticate, then route by method and path.
async fn handle(
    State(console): State<Arc<Console>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = uri.query().unwrap_or("");
    if query.len() > QUERY_BYTES_MAX {
        return bad_request(&format!("the query is longer than {QUERY_BYTES_MAX} bytes"));
    }
    let query = match fields(query) {
        Ok(query) => query,
        Err(why) => return bad_request(&why),
    };
    let has_cookie = cookie(&headers, COOKIE).is_some_and(|value| same(value, &console.token));
    if !has_cookie {
        let has_token = query.get("token").is_some_and(|value| same(value, &console.token));
        if has_token && method == Method::GET {
            // Keep the token out of the address bar and the history: set
            // the cookie and go to the same page without it.
            let rest: Vec<String> = query
                .iter()
                .filter(|(key, _)| key.as_str() != "token")
                .map(|(key, value)| format!("{}={}", page::encode(key), page::encode(value)))
                .collect();
            let to =
                if rest.is_empty() { uri.path().to_string() } else { format!("{}?{}", uri.path(), rest.join("&")) };
            let mut response = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
            let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", console.token);
            match (HeaderValue::from_str(&to), HeaderValue::from_str(&cookie)) {
                (Ok(location), Ok(cookie)) => {
                    response.headers_mut().insert(header::LOCATION, location);
                    response.headers_mut().insert(header::SET_COOKIE, cookie);
                    return response;
                }
                _ => return bad_request("the address cannot be kept"),
            }
        }
        return html(
            StatusCode::FORBIDDEN,
            page::message(
                "Forbidden",
                "Open the console with the address it printed when it started (http://ADDR/?token=...): it sets a \
                 cookie for this browser.",
            ),
        );
    }
    match (method.as_str(), uri.path()) {
        ("GET", "/") => overview(&console).await,
        ("GET", "/live.json") => respond(StatusCode::OK, "application/json", console.live.figures().to_json()),
        ("GET", "/lookup") => lookup(&console, query.get("id").map(String::as_str)).await,
        ("GET", "/dead-letters") => dead_letters(&console).await,
        ("GET", "/parked") => parked(&console).await,
        ("POST", path @ ("/dead-letters/resolve" | "/parked/resolve" | "/in-doubt/resolve")) => {
            let form =
                match std::str::from_utf8(&body).map_err(|_| "the form is not UTF-8".to_string()).and_then(fields) {
                    Ok(form) => form,
                    Err(why) => return bad_request(&why),
                };
            // The token again, in the form itself (CSRF).
            if !form.get("csrf").is_some_and(|value| same(value, &console.token)) {
                return html(
                    StatusCode::FORBIDDEN,
                    page::message("Forbidden", "The form does not carry the console's token: reload the page."),
                );
            }
            match path {
                "/dead-letters/resolve" => resolve_dead_letter(&console, &form).await,
                "/parked/resolve" => resolve_parked(&console, &form).await,
                _ => resolve_in_doubt(&console, &form).await,
            }
        }
        ("GET", "/console.css") => respond(StatusCode::OK, "text/css; charset=utf-8", CSS),
        ("GET", "/console.js") => respond(StatusCode::OK, "text/javascript; charset=utf-8", JS),
        (_, "/" | "/live.json" | "/lookup" | "/dead-letters" | "/parked" | "/console.css" | "/console.js")
        | (_, "/dead-letters/resolve" | "/parked/resolve" | "/in-doubt/resolve") => html(
            StatusCode::METHOD_NOT_ALLOWED,
            page::message("Method not allowed", &format!("{method} {}", uri.path())),
        ),
        (_, path) => html(StatusCode::NOT_FOUND, page::message("Not found", &format!("no page {path}"))),
    }
}

async fn overview(console: &Console) -> Response {
    let status = crate::status::build(&console.nodes).await;
    let in_doubt = crate::in_doubt::build_list(&console.nodes, LIST_LIMIT).await;
    match (status, in_doubt) {
        (Ok(status), Ok(in_doubt)) => {
            html(StatusCode::OK, page::overview(&console.token, &console.live.figures(), &status, &in_doubt))
        }
        (Err(usage), _) | (_, Err(usage)) => bad_request(&usage.0),
    }
}

/// Checks a field that names a transaction or saga: 1 to 64 characters
/// (the nodes check the alphabet).
fn id_field<'a>(form: &'a BTreeMap<String, String>, key: &str, what: &str) -> Result<&'a str, String> {
    let id = form.get(key).map(|id| id.trim()).unwrap_or("");
    if id.is_empty() || id.chars().count() > 64 {
        return Err(format!("{what}: give 1 to 64 characters"));
    }
    tandem::domain::Id::parse(what, id).map_err(|e| e.to_string())?;
    Ok(id)
}

/// The reason of a resolve form: required, 1 to 4,096 bytes.
fn reason_field(form: &BTreeMap<String, String>) -> Result<&str, String> {
    let reason = form.get("reason").map(String::as_str).unwrap_or("");
    if reason.trim().is_empty() {
        return Err("a reason is required: say who decided and why (it is stored with the record)".into());
    }
    if reason.len() > REASON_BYTES_MAX {
        return Err(format!("the reason is {} bytes; the most is {REASON_BYTES_MAX}", reason.len()));
    }
    Ok(reason)
}

/// The optional account of a resolve form: empty (the source account) or
/// a number.
fn account_field(form: &BTreeMap<String, String>) -> Result<u64, String> {
    match form.get("to_account").map(|a| a.trim()).unwrap_or("") {
        "" => Ok(0),
        text => text.parse::<u64>().map_err(|_| format!("to account {text:?}: give an account number, or nothing")),
    }
}

async fn lookup(console: &Console, id: Option<&str>) -> Response {
    let Some(id) = id.map(str::trim).filter(|id| !id.is_empty()) else {
        return html(StatusCode::OK, page::lookup(&console.token, "", None));
    };
    let mut form = BTreeMap::new();
    form.insert("id".to_string(), id.to_string());
    if let Err(why) = id_field(&form, "id", "the transaction or saga id") {
        return html(StatusCode::BAD_REQUEST, page::lookup(&console.token, id, Some(Err(why))));
    }
    match crate::txn::build(&console.nodes, id).await {
        Ok(built) => html(StatusCode::OK, page::lookup(&console.token, id, Some(Ok(built)))),
        Err(usage) => html(StatusCode::BAD_REQUEST, page::lookup(&console.token, id, Some(Err(usage.0)))),
    }
}

async fn dead_letters(console: &Console) -> Response {
    match crate::suspense::build_dead_letters(&console.nodes, LIST_LIMIT).await {
        Ok(listed) => html(StatusCode::OK, page::dead_letters(&console.token, &listed)),
        Err(usage) => bad_request(&usage.0),
    }
}

async fn parked(console: &Console) -> Response {
    match crate::suspense::build_parked(&console.nodes, LIST_LIMIT).await {
        Ok(listed) => html(StatusCode::OK, page::parked(&console.token, &listed)),
        Err(usage) => bad_request(&usage.0),
    }
}

/// The answer to a resolve: 200 with what the node answered, 502 when the
/// node refused or could not be reached, 400 for bad input.
fn resolved<V>(
    answer: Result<Result<V, crate::nodes::RpcError>, UsageError>,
    render: impl FnOnce(&V) -> String,
) -> Response {
    match answer {
        Ok(Ok(view)) => html(StatusCode::OK, render(&view)),
        Ok(Err(error)) => html(StatusCode::BAD_GATEWAY, page::refused(&error)),
        Err(usage) => bad_request(&usage.0),
    }
}

async fn resolve_dead_letter(console: &Console, form: &BTreeMap<String, String>) -> Response {
    let checked =
        (|| Ok::<_, String>((id_field(form, "id", "the saga id")?, account_field(form)?, reason_field(form)?)))();
    let (id, to_account, reason) = match checked {
        Ok(checked) => checked,
        Err(why) => return bad_request(&why),
    };
    let answer = crate::suspense::build_resolve_dead_letter(&console.nodes, id, to_account, reason).await;
    resolved(answer, page::resolved_dead_letter)
}

async fn resolve_parked(console: &Console, form: &BTreeMap<String, String>) -> Response {
    let checked = (|| {
        Ok::<_, String>((
            participant_field(console, form)?,
            id_field(form, "id", "the saga id")?,
            account_field(form)?,
            reason_field(form)?,
        ))
    })();
    let (participant, id, to_account, reason) = match checked {
        Ok(checked) => checked,
        Err(why) => return bad_request(&why),
    };
    let answer = crate::suspense::build_resolve_parked(&console.nodes, participant, id, to_account, reason).await;
    resolved(answer, page::resolved_parked)
}

async fn resolve_in_doubt(console: &Console, form: &BTreeMap<String, String>) -> Response {
    let checked = (|| {
        let commit = match form.get("outcome").map(String::as_str) {
            Some("commit") => true,
            Some("abort") => false,
            _ => return Err("choose commit or abort".to_string()),
        };
        Ok((
            participant_field(console, form)?,
            id_field(form, "id", "the transaction id")?,
            commit,
            reason_field(form)?,
        ))
    })();
    let (participant, id, commit, reason) = match checked {
        Ok(checked) => checked,
        Err(why) => return bad_request(&why),
    };
    let answer = crate::in_doubt::build_resolve(&console.nodes, participant, id, commit, reason).await;
    resolved(answer, page::resolved_in_doubt)
}

/// A participant the console was given (--participant NAME=URL).
fn participant_field<'a>(console: &Console, form: &'a BTreeMap<String, String>) -> Result<&'a str, String> {
    let name = form.get("participant").map(String::as_str).unwrap_or("");
    if console.nodes.participants.iter().any(|node| node.name == name) {
        Ok(name)
    } else {
        Err(format!("no participant {name:?} is known to this console"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_refuse_what_is_malformed() {
        let form = fields("id=saga-1&reason=ops-12%3A+refund+%C3%A9&to_account=").unwrap();
        assert_eq!(form["id"], "saga-1");
        assert_eq!(form["reason"], "ops-12: refund é");
        assert_eq!(form["to_account"], "");
        assert!(fields("a=1&a=2").unwrap_err().contains("twice"));
        assert!(fields("a=%zz").is_err());
        assert!(fields("a=%c3").is_err(), "not UTF-8");
        assert!(fields("a=%4").is_err());
        let many: Vec<String> = (0..=FIELDS_MAX).map(|i| format!("f{i}=1")).collect();
        assert!(fields(&many.join("&")).is_err());
    }

    #[test]
    fn the_token_is_found_in_cookies_and_compared_whole() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b; tandem_console=abc123; c=d"));
        assert_eq!(cookie(&headers, COOKIE), Some("abc123"));
        assert!(same("abc123", "abc123"));
        assert!(!same("abc123", "abc124"));
        assert!(!same("abc123", "abc12"));
        let token = new_token().unwrap();
        assert_eq!(token.len(), 32);
        assert_ne!(token, new_token().unwrap());
    }

    #[test]
    fn the_form_fields_are_bounded() {
        let form = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(reason_field(&form(&[("reason", "  ")])).is_err());
        assert!(reason_field(&form(&[])).is_err());
        assert!(reason_field(&form(&[("reason", &"x".repeat(REASON_BYTES_MAX))])).is_ok());
        assert!(reason_field(&form(&[("reason", &"x".repeat(REASON_BYTES_MAX + 1))])).is_err());
        assert!(id_field(&form(&[("id", &"a".repeat(64))]), "id", "the id").is_ok());
        assert!(id_field(&form(&[("id", &"a".repeat(65))]), "id", "the id").is_err());
        assert!(id_field(&form(&[("id", "<script>")]), "id", "the id").is_err());
        assert_eq!(account_field(&form(&[("to_account", "")])), Ok(0));
        assert_eq!(account_field(&form(&[("to_account", "42")])), Ok(42));
        assert!(account_field(&form(&[("to_account", "-1")])).is_err());
    }

    #[test]
    fn the_metrics_url_names_host_and_port_with_the_right_scheme() {
        let insecure = Security::Insecure;
        assert_eq!(metrics_addr("http://127.0.0.1:9100", &insecure).unwrap(), "127.0.0.1:9100");
        assert_eq!(metrics_addr("http://127.0.0.1:9100/metrics", &insecure).unwrap(), "127.0.0.1:9100");
        assert!(metrics_addr("https://127.0.0.1:9100", &insecure).is_err());
        assert!(metrics_addr("127.0.0.1:9100", &insecure).is_err());
        assert!(metrics_addr("http://127.0.0.1", &insecure).is_err());
        assert!(metrics_addr("http://127.0.0.1:9100/other", &insecure).is_err());
    }
}
