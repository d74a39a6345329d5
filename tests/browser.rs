//! The console in a real headless Chromium, driven over WebDriver: logging in, the
//! overview with a sink down, a call's events and their attempts, replaying a dead
//! delivery by clicking, the live view, and hostile values shown as text. Screenshots go
//! to docs/console/.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::{TestRouter, base_config, payload, post_signed};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::process::{Child, Command};

const TOKEN: &str = "browser-test-token-0123456789";
const HOSTILE: &str = r#"<script>alert(1)</script>"><img src=x onerror=alert(1)>"#;

/// chromedriver on a free port, with a headless Chromium session.
struct Browser {
    client: Client,
    _driver: Child,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (apt-get install chromium chromium-driver)");
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            }),
        );
        for _ in 0..100 {
            if let Ok(client) = ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                return Browser {
                    client,
                    _driver: driver,
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not answer at {url}");
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        std::fs::write(dir.join(name), png).expect("write screenshot");
    }

    /// The page's text; empty while a page is being replaced (its body went stale).
    async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Waits until the page's text contains `wanted`, reloading it if `reload`.
    async fn wait_for_text(&self, wanted: &str, within: Duration, reload: bool) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.text().await;
            if text.contains(wanted) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{wanted:?} not shown: {text}"
            );
            if reload {
                self.client.refresh().await.expect("refresh");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn start_router(crm: &Downstream) -> TestRouter {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    // A port nothing listens on: the third sink's destination is down.
    let closed: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\ncircuit_breaker = {{ failures = 0 }}\n\
         \n[[sinks]]\nname = \"warehouse\"\ntype = \"http\"\nurl = \"http://{closed}/in\"\n",
        base_config(dir.path())
            .replace(
                "[admin]\nlisten = \"127.0.0.1:0\"\n",
                &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
            )
            .replace("[delivery]\n", "[delivery]\nmax_attempts = 1\n"),
        crm.url("/hooks"),
    );
    TestRouter::start_with(dir, &config).await
}

#[tokio::test]
#[ignore = "needs chromium and chromedriver: set VYORA_TEST_BROWSER=1, run with --include-ignored"]
async fn an_operator_logs_in_finds_a_call_replays_it_and_watches_live() {
    let down = Arc::new(AtomicBool::new(true));
    let failing = Arc::clone(&down);
    let crm = Downstream::start(move |_, _| {
        if failing.load(Ordering::SeqCst) {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let router = start_router(&crm).await;
    for event in ["call_started", "call_completed", "all_processing_completed"] {
        let answer = post_signed(router.addr, &payload(HOSTILE, event)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let browser = Browser::start().await;
    let c = &browser.client;
    let base = format!("http://{}", router.admin);

    // Asked to log in first; the token opens the overview.
    c.goto(&format!("{base}/ui")).await.expect("goto");
    assert!(c.current_url().await.expect("url").path() == "/ui/login");
    browser.shot("login.png").await;
    let form = c.form(Locator::Css("form")).await.expect("login form");
    form.set_by_name("token", TOKEN).await.expect("token");
    form.submit().await.expect("log in");
    let text = browser
        .wait_for_text("warehouse", Duration::from_secs(10), true)
        .await;
    assert!(text.contains("archive") && text.contains("crm"), "{text}");
    browser
        .wait_for_text("paused", Duration::from_secs(15), true)
        .await;
    browser.shot("overview.png").await;

    // The call, found by its id: three events, each sink's status, shown as text.
    let search = c.form(Locator::Css("form.search")).await.expect("search");
    search.set_by_name("id", HOSTILE).await.expect("id");
    search.submit().await.expect("find");
    let text = browser
        .wait_for_text("all_processing_completed", Duration::from_secs(10), true)
        .await;
    assert!(text.contains(HOSTILE), "the call id shown as text: {text}");
    let events = c
        .find_all(Locator::Css("section.event"))
        .await
        .expect("events");
    assert_eq!(events.len(), 3);
    let injected = c
        .execute(
            "return document.querySelectorAll('img[src=\"x\"], main script').length",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(
        injected,
        serde_json::json!(0),
        "no element came from the call id"
    );
    // Each attempt on the call's timeline: crm answered 500 and, with one attempt
    // allowed, each delivery went dead.
    browser
        .wait_for_text("Attempts to crm", Duration::from_secs(10), true)
        .await;
    let attempts = c
        .find_all(Locator::Css("ol.timeline li.dead"))
        .await
        .expect("attempts");
    assert!(!attempts.is_empty());
    let first = attempts[0].text().await.expect("text");
    assert!(
        first.contains("#1") && first.contains("500"),
        "the attempt's number and status: {first}"
    );
    browser.shot("call.png").await;

    // A dead delivery, replayed by clicking through the confirmation.
    c.goto(&format!("{base}/ui/dead?sink=crm"))
        .await
        .expect("goto");
    browser
        .wait_for_text("Replay all dead of crm", Duration::from_secs(15), true)
        .await;
    browser.shot("dead-letters.png").await;
    down.store(false, Ordering::SeqCst);
    let before = crm.count();
    c.find(Locator::Css("td a.button"))
        .await
        .expect("a replay link")
        .click()
        .await
        .expect("click");
    browser
        .wait_for_text("Confirm replay", Duration::from_secs(5), false)
        .await;
    browser.shot("replay-confirm.png").await;
    c.find(Locator::Css("button.danger"))
        .await
        .expect("the replay button")
        .click()
        .await
        .expect("click");
    browser
        .wait_for_text("1 replayed", Duration::from_secs(5), false)
        .await;
    crm.wait_for(before + 1, Duration::from_secs(10)).await;

    // The live view shows a webhook sent now within 2 s.
    c.goto(&format!("{base}/ui/live")).await.expect("goto");
    browser
        .wait_for_text("Connected", Duration::from_secs(5), false)
        .await;
    post_signed(router.addr, &payload("live-call-42", "call_completed")).await;
    browser
        .wait_for_text("live-call-42", Duration::from_secs(2), false)
        .await;
    browser
        .wait_for_text(
            "delivered  call_completed  call live-call-42  -> archive",
            Duration::from_secs(5),
            false,
        )
        .await;
    browser.shot("live.png").await;

    // The browser's own POST is accepted only from this origin, with the CSRF token:
    // a form posted from elsewhere is refused.
    let status = c
        .execute_async(
            "const done = arguments[0];
             fetch('/ui/replay', {method: 'POST', body: new URLSearchParams({sink: 'crm', all: 'dead'})})
               .then(r => done(r.status));",
            vec![],
        )
        .await
        .expect("fetch");
    assert_eq!(status, serde_json::json!(403), "without the CSRF token");
    c.clone().close().await.expect("close");
}
