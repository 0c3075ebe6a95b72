//! The console in a real browser: a local cluster of the real binaries
//! (mutual TLS), `tandemctl console` run as a process with the cluster's
//! operator certificate, and Debian's headless Chromium driven over
//! WebDriver (chromedriver, by fantoccini), as an operator would click.
//! Build the node binaries first: `cargo build --release --workspace`.
//!
//! Checked: a request without the token is refused (403), the token
//! becomes an HttpOnly SameSite=Strict cookie, every page forbids scripts
//! but its own (CSP); the overview's live figures refresh (console.js
//! polling /live.json, itself fed by the coordinator's /metrics); a lookup
//! of a committed transfer shows it committed on the coordinator and on
//! both participants; a dead letter is resolved from its form: without a
//! reason the form is not sent (the browser) and a POST without one is
//! refused (400, the console), with one it is RESOLVED and leaves the list.
//! In a second cluster: a transaction in doubt (prepared while its
//! coordinator is paused) is decided from the overview's form and its
//! lookup shows the heuristic abort; a parked choreographed transfer is
//! found by its saga id in the lookup and released from the parked page.
//!
//! Where chromedriver is not installed (scripts/setup installs Debian's
//! `chromium` and `chromium-driver`), the test says so and returns.

mod common;

use common::{dead_letter, in_doubt, parked_transfer, reopen, start, tandemctl, transfer, wait_committed_everywhere};
use fantoccini::{Client, ClientBuilder, Locator};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tandem::cluster::{Cluster, NodeRef};
use tandem::pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// `tandemctl console`, running.
struct Console {
    _child: tokio::process::Child,
    /// http://127.0.0.1:PORT/?token=TOKEN, as printed.
    url: String,
    /// 127.0.0.1:PORT
    addr: String,
    token: String,
}

impl Console {
    /// `tandemctl [GLOBAL...] console` for `cluster`.
    async fn start(cluster: &Cluster, global: &[&str]) -> Console {
        let tls = cluster.tls_dir().expect("the cluster runs with mutual TLS");
        let metrics = cluster.coordinator.http_addr.expect("the coordinator serves its metrics");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandemctl"));
        command
            .arg("--tls-cert")
            .arg(tls.join("operator.pem"))
            .arg("--tls-key")
            .arg(tls.join("operator.key"))
            .arg("--tls-ca")
            .arg(tls.join("ca.pem"))
            .args(["--coordinator", &cluster.coordinator.url()])
            .env_remove("TANDEM_COORDINATOR")
            .env_remove("TANDEM_PARTICIPANTS")
            .args(global);
        for (i, participant) in cluster.participants.iter().enumerate() {
            command.arg("--participant").arg(format!("p{}={}", i + 1, participant.url()));
        }
        command.args(["console", "--coordinator-metrics", &format!("https://{metrics}")]);
        let mut child =
            command.stdout(Stdio::piped()).stdin(Stdio::null()).kill_on_drop(true).spawn().expect("tandemctl starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the console prints its address within 10 s")
            .expect("its stdout reads")
            .expect("a line");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url =
            line.strip_prefix("console on ").unwrap_or_else(|| panic!("not the console's line: {line}")).to_string();
        let rest = url.strip_prefix("http://").expect("plain HTTP");
        let (addr, query) = rest.split_once("/?token=").expect("the token in the query");
        assert!(addr.starts_with("127.0.0.1:"), "loopback by default: {addr}");
        Console { _child: child, addr: addr.to_string(), token: query.to_string(), url }
    }
}

/// One HTTP/1.1 exchange with the console, as a script would make it: the
/// status, the headers (lower-case names) and the body.
async fn http(addr: &str, method: &str, path: &str, cookie: Option<&str>, form: Option<&str>) -> (u16, String, String) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = cookie {
        request.push_str(&format!("Cookie: tandem_console={token}\r\n"));
    }
    if let Some(form) = form {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("the console accepts");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the console answers within 10 s")
        .unwrap();
    let answer = String::from_utf8(answer).expect("UTF-8");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a header");
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// chromedriver on a free loopback port, and a headless Chromium session.
async fn browser(log: &Path) -> (tokio::process::Child, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = tokio::process::Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver never listened on {port}; see {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"],
        }),
    );
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(capabilities);
    let client = tokio::time::timeout(Duration::from_secs(60), builder.connect(&format!("http://127.0.0.1:{port}")))
        .await
        .expect("a browser session within 60 s")
        .unwrap_or_else(|e| panic!("chromedriver opens a Chromium session: {e}; see {}", log.display()));
    (driver, client)
}

/// Waits for `css` to be on the page and returns its text.
async fn text_of(browser: &Client, css: &str) -> String {
    let element = browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} is not on the page: {e}"));
    element.text().await.unwrap()
}

/// Whether there is no browser to drive here (says so, for the log).
fn no_browser() -> bool {
    let missing = !Path::new(CHROMEDRIVER).exists();
    if missing {
        eprintln!(
            "SKIPPED: {CHROMEDRIVER} is not installed, so there is no browser to drive; scripts/setup installs \
             Debian's chromium and chromium-driver"
        );
    }
    missing
}

async fn path_of(browser: &Client) -> String {
    browser.current_url().await.unwrap().path().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_looks_up_a_transfer_and_resolves_a_dead_letter_in_a_browser() {
    if no_browser() {
        return;
    }
    let began = Instant::now();
    let (mut cluster, dir) = start().await;

    // A transfer across both participants, committed everywhere; and a
    // dead letter whose source account is open again (so it can resolve).
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let committed = client.transfer(transfer(2, 18, 30)).await.unwrap().into_inner();
    assert_eq!(committed.outcome, pb::Outcome::Committed as i32, "{committed:?}");
    wait_committed_everywhere(&cluster, &committed.txn_id).await;
    let saga = dead_letter(&mut cluster, (4, 14, 120)).await;
    reopen(&cluster, 0, 4).await;

    let console = Console::start(&cluster, &[]).await;
    let addr = console.addr.as_str();
    let token = console.token.as_str();

    // Without the token: refused, whatever the page.
    for path in ["/", "/dead-letters", "/live.json", "/console.js", "/?token=0123456789abcdef0123456789abcdef"] {
        let (status, _, body) = http(addr, "GET", path, None, None).await;
        assert_eq!(status, 403, "GET {path} without the token: {body}");
    }
    let (status, _, _) =
        http(addr, "POST", "/dead-letters/resolve", None, Some(&format!("csrf={token}&id={saga}&reason=x"))).await;
    assert_eq!(status, 403, "a resolve without the cookie");
    // With it in the query: a cookie for this browser only, and the same
    // page without the token.
    let (status, head, _) = http(addr, "GET", &format!("/?token={token}"), None, None).await;
    assert_eq!(status, 303, "{head}");
    assert!(head.contains(&format!("set-cookie: tandem_console={token}; httponly; samesite=strict")), "{head}");
    assert!(head.contains("location: /\r\n") || head.ends_with("location: /"), "{head}");
    // Every page: the console's own script only, nothing from elsewhere.
    let (status, head, page) = http(addr, "GET", "/", Some(token), None).await;
    assert_eq!(status, 200, "{page}");
    assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
    assert!(page.contains("<script src=\"/console.js\" defer></script>"), "{page}");
    assert_eq!(page.matches("<script").count(), 1, "no inline script: {page}");
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"), "nothing loaded from elsewhere");
    // A resolve must carry the token in the form too (CSRF), and a reason.
    let (status, _, _) =
        http(addr, "POST", "/dead-letters/resolve", Some(token), Some(&format!("id={saga}&reason=x"))).await;
    assert_eq!(status, 403, "a resolve without the form's token");
    let (status, _, body) =
        http(addr, "POST", "/dead-letters/resolve", Some(token), Some(&format!("csrf={token}&id={saga}&reason=+")))
            .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("a reason is required"), "{body}");
    let (status, _, body) = http(addr, "GET", "/lookup?id=%3Cscript%3E", Some(token), None).await;
    assert_eq!(status, 400, "a bad id: {body}");
    assert!(!body.contains("<script>") && body.contains("&lt;script&gt;"), "escaped: {body}");

    // The browser.
    let (_driver, browser) = browser(&dir.path().join("chromedriver.log")).await;
    browser.goto(&console.url).await.unwrap();
    assert_eq!(path_of(&browser).await, "/", "the token left the address bar");
    assert!(browser.title().await.unwrap().starts_with("Overview"));
    let nodes = text_of(&browser, "#nodes").await;
    assert!(nodes.contains("p1") && nodes.contains("p2") && nodes.contains("SERVING"), "{nodes}");
    assert_eq!(text_of(&browser, "#no-in-doubt").await, "No transaction in doubt.");
    // console.js refreshes the live figures from /live.json.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let note = text_of(&browser, "#live-note").await;
        if note.starts_with("over the last") {
            assert_ne!(text_of(&browser, "#in-flight").await, "-");
            break;
        }
        assert!(Instant::now() < deadline, "the live figures never came: {note}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A lookup: committed on the coordinator and on both participants.
    browser.find(Locator::LinkText("Lookup")).await.unwrap().click().await.unwrap();
    browser.find(Locator::Css("#lookup-id")).await.unwrap().send_keys(&committed.txn_id).await.unwrap();
    browser.find(Locator::Css("#lookup-go")).await.unwrap().click().await.unwrap();
    assert_eq!(text_of(&browser, "#coordinator-state").await, "COMMITTED");
    let mut states = Vec::new();
    for cell in browser.find_all(Locator::Css("#participants .participant-state")).await.unwrap() {
        states.push(cell.text().await.unwrap());
    }
    assert_eq!(states, ["COMMITTED", "COMMITTED"]);
    let result = text_of(&browser, "#result").await;
    assert!(result.contains(&committed.txn_id), "{result}");

    // The dead letter, resolved from its form.
    browser.find(Locator::LinkText("Dead letters")).await.unwrap().click().await.unwrap();
    let row_css = format!("tr[data-saga=\"{saga}\"]");
    let row = browser.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(&row_css)).await.unwrap();
    assert!(row.text().await.unwrap().contains("DEAD_LETTERED"));
    // No reason: the browser does not send the form (it is required).
    row.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(path_of(&browser).await, "/dead-letters", "a form without a reason is not sent");
    let reason = "console test: the source account is open again";
    let row = browser.find(Locator::Css(&row_css)).await.unwrap();
    row.find(Locator::Css("input[name=reason]")).await.unwrap().send_keys(reason).await.unwrap();
    row.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    let message = text_of(&browser, "#message").await;
    assert!(message.contains(&saga) && message.ends_with("RESOLVED"), "{message}");
    assert_eq!(path_of(&browser).await, "/dead-letters/resolve");
    assert_eq!(text_of(&browser, "#saga-state").await, "RESOLVED");
    if let Ok(dir) = std::env::var("TANDEM_CONSOLE_SCREENSHOTS") {
        let png = browser.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join("console-resolved.png"), png).unwrap();
    }
    browser.find(Locator::LinkText("Back to the dead letters")).await.unwrap().click().await.unwrap();
    assert_eq!(text_of(&browser, "#no-dead-letters").await, "No dead letter.");
    assert!(browser.find_all(Locator::Css(&row_css)).await.unwrap().is_empty());
    assert_eq!(text_of(&browser, "#total").await, "0 dead letter(s) in all.");
    // The coordinator agrees.
    let run = tandemctl(&cluster, "operator", &["--json", "dead-letters", "list"]).await;
    assert_eq!(run.json()["total"], 0, "{run:?}");
    browser.goto(&format!("http://{addr}/lookup?id={saga}")).await.unwrap();
    let record = text_of(&browser, "#result").await;
    assert!(record.contains(&saga), "{record}");
    if let Ok(dir) = std::env::var("TANDEM_CONSOLE_SCREENSHOTS") {
        browser.goto(&format!("http://{addr}/")).await.unwrap();
        text_of(&browser, "#nodes").await;
        let png = browser.screenshot().await.unwrap();
        std::fs::write(Path::new(&dir).join("console-overview.png"), png).unwrap();
    }

    browser.close().await.unwrap();
    cluster.stop().await;
    eprintln!("the console test took {:.1} s", began.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_decides_an_in_doubt_transaction_and_releases_a_parked_transfer_in_a_browser() {
    if no_browser() {
        return;
    }
    let began = Instant::now();
    let (mut cluster, dir) = start().await;

    // A choreographed transfer parked in p1's suspense, its source account
    // open again (so it can be released to it).
    let parked = parked_transfer(&mut cluster, (6, 16, 55)).await;
    reopen(&cluster, 0, 6).await;
    // A transaction in doubt on p1 while c1 is paused.
    in_doubt(&mut cluster, "in-doubt-1", (7, -5)).await;

    // The overview asks the paused coordinator too: a short deadline.
    let console = Console::start(&cluster, &["--timeout-ms", "1500"]).await;
    let (_driver, browser) = browser(&dir.path().join("chromedriver.log")).await;
    browser.goto(&console.url).await.unwrap();
    let row_css = "#in-doubt tr[data-participant=\"p1\"][data-txn=\"in-doubt-1\"]";
    let row = browser.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(row_css)).await.unwrap();
    assert!(row.text().await.unwrap().contains("7:-5"), "{}", row.text().await.unwrap());
    // Neither an outcome nor a reason: the browser does not send the form.
    row.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(path_of(&browser).await, "/", "a form without an outcome and a reason is not sent");
    let row = browser.find(Locator::Css(row_css)).await.unwrap();
    row.find(Locator::Css("input[name=outcome][value=abort]")).await.unwrap().click().await.unwrap();
    let reason = "console test: c1 is paused and never began it";
    row.find(Locator::Css("input[name=reason]")).await.unwrap().send_keys(reason).await.unwrap();
    row.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    let message = text_of(&browser, "#message").await;
    assert!(message.starts_with("p1: aborted in-doubt-1 by heuristic decision"), "{message}");
    assert!(message.ends_with(reason), "{message}");
    assert_eq!(path_of(&browser).await, "/in-doubt/resolve");
    // Its lookup: aborted on p1, with the operator's decision beside it.
    browser.find(Locator::LinkText("Look it up")).await.unwrap().click().await.unwrap();
    assert_eq!(text_of(&browser, "#participants tr[data-participant=\"p1\"] .participant-state").await, "ABORTED");
    let p1_row = text_of(&browser, "#participants tr[data-participant=\"p1\"]").await;
    assert!(p1_row.contains(reason), "{p1_row}");
    browser.find(Locator::LinkText("Overview")).await.unwrap().click().await.unwrap();
    assert_eq!(text_of(&browser, "#no-in-doubt").await, "No transaction in doubt.");
    cluster.node(NodeRef::Coordinator).resume();

    // The parked transfer: listed on p1's section, found by its saga id.
    browser.find(Locator::LinkText("Parked")).await.unwrap().click().await.unwrap();
    let row_css = format!("tr[data-saga=\"{parked}\"]");
    let row = browser.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(&row_css)).await.unwrap();
    assert!(row.text().await.unwrap().contains("DEAD_LETTERED"));
    row.find(Locator::LinkText(&parked)).await.unwrap().click().await.unwrap();
    assert_eq!(text_of(&browser, "#choreographed tr[data-participant=\"p1\"] .transfer-state").await, "DEAD_LETTERED");
    browser.back().await.unwrap();
    let row = browser.wait().at_most(Duration::from_secs(10)).for_element(Locator::Css(&row_css)).await.unwrap();
    let reason = "console test: the source account is open again";
    row.find(Locator::Css("input[name=reason]")).await.unwrap().send_keys(reason).await.unwrap();
    row.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
    let message = text_of(&browser, "#message").await;
    assert_eq!(message, format!("p1: parked transfer {parked}: RESOLVED"));
    assert_eq!(path_of(&browser).await, "/parked/resolve");
    browser.find(Locator::LinkText("Back to the parked transfers")).await.unwrap().click().await.unwrap();
    text_of(&browser, "main h1").await;
    assert!(browser.find_all(Locator::Css(&row_css)).await.unwrap().is_empty(), "it left the list");
    // The nodes agree: nothing parked, the money back in account 6.
    let run = tandemctl(&cluster, "operator", &["--json", "parked", "list"]).await;
    assert_eq!(run.json()["participants"][0]["total"], 0, "{run:?}");
    let run = tandemctl(&cluster, "operator", &["--json", "txn", "get", &parked]).await;
    assert_eq!(run.json()["choreographed"][0]["state"], "resolved", "{run:?}");

    browser.close().await.unwrap();
    cluster.stop().await;
    eprintln!("the second console test took {:.1} s", began.elapsed().as_secs_f64());
}
