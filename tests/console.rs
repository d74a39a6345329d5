//! The operator console on the admin listener: who may use it, that it shows hostile
//! values as text, and that a replay from it is delivered.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::downstream::{Downstream, Reply};
use common::{Answer, TestRouter, base_config, payload, post_signed, send, wait_for_lines};
use http_body_util::Full;
use hyper::Request;

const TOKEN: &str = "console-test-token-0123456789";
const HOSTILE: &str = r#"<script>alert(1)</script>"><img src=x onerror=alert(1)>"#;

fn with_token(config: String) -> String {
    config.replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    )
}

async fn get(admin: SocketAddr, path: &str, auth: Option<&str>) -> Answer {
    let mut request = Request::get(path).header("host", admin.to_string());
    if let Some(cookie) = auth {
        request = request.header("cookie", cookie);
    }
    send(
        admin,
        request.body(Full::new(Bytes::new())).expect("request"),
    )
    .await
}

async fn post(
    admin: SocketAddr,
    path: &str,
    origin: Option<&str>,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> Answer {
    let mut body = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form {
        body.append_pair(k, v);
    }
    let mut request = Request::post(path)
        .header("host", admin.to_string())
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(o) = origin {
        request = request.header("origin", o);
    }
    if let Some(c) = cookie {
        request = request.header("cookie", c);
    }
    send(
        admin,
        request
            .body(Full::new(Bytes::from(body.finish())))
            .expect("request"),
    )
    .await
}

/// Logs in with the token; the cookie to send back.
async fn login(admin: SocketAddr) -> String {
    let origin = format!("http://{admin}");
    let answer = post(admin, "/ui/login", Some(&origin), None, &[("token", TOKEN)]).await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    let set = answer.headers["set-cookie"].to_str().expect("ASCII");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    set.split(';').next().expect("a cookie").to_owned()
}

/// The CSRF token the page's forms carry.
fn csrf_of(page: &str) -> String {
    let start = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + r#"name="csrf" value=""#.len();
    page[start..].split('"').next().expect("a value").to_owned()
}

#[tokio::test]
async fn a_console_off_loopback_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = base_config(dir.path()).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"0.0.0.0:0\"\n",
    );
    let path = dir.path().join("router.toml");
    std::fs::write(&path, &config).expect("write");
    for command in ["check-config", "serve"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
            .args([command, "--config"])
            .arg(&path)
            .output()
            .await
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} accepted it: {stderr}");
        assert!(stderr.contains("admin.token"), "{command}: {stderr}");
    }
    // With the console off, or a token, the same address is fine.
    let off = config.replace("[admin]\n", "[admin]\nconsole = false\n");
    assert!(vyora_router::config::Config::from_toml(&off).is_ok());
    let with = config.replace("[admin]\n", &format!("[admin]\ntoken = \"{TOKEN}\"\n"));
    assert!(vyora_router::config::Config::from_toml(&with).is_ok());
}

#[tokio::test]
async fn the_console_asks_for_the_token_and_probes_do_not() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = with_token(base_config(dir.path()));
    let router = TestRouter::start_with(dir, &config).await;
    let admin = router.admin;

    let page = get(admin, "/ui", None).await;
    assert_eq!(page.status, 303);
    assert_eq!(page.headers["location"], "/ui/login");
    let wrong = get(admin, "/ui", Some("vyora_console=1-00.ff")).await;
    assert_eq!(wrong.status, 303);
    let origin = format!("http://{admin}");
    let replay = post(
        admin,
        "/ui/replay",
        Some(&origin),
        None,
        &[("sink", "archive")],
    )
    .await;
    assert_eq!(replay.status, 401);
    let refused = post(
        admin,
        "/ui/login",
        Some(&origin),
        None,
        &[("token", "nope")],
    )
    .await;
    assert_eq!(refused.status, 401);
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(admin, path, None).await.status, 200, "{path}");
    }

    let cookie = login(admin).await;
    let page = get(admin, "/ui", Some(&cookie)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("archive"), "{}", page.body);
    for (header, value) in [
        (
            "content-security-policy",
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(page.headers[header], value, "{header}");
    }

    let bearer = Request::get("/ui/dead")
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(admin, bearer).await.status, 200);
    let css = get(admin, "/ui/static/console.css", None).await;
    assert_eq!(css.status, 200);
    assert_eq!(css.headers["content-type"], "text/css");
}

#[tokio::test]
async fn a_dead_delivery_is_shown_as_text_and_replayed_by_a_confirmed_post() {
    let down = Arc::new(AtomicBool::new(true));
    let failing = Arc::clone(&down);
    let downstream = Downstream::start(move |_, _| {
        if failing.load(Ordering::SeqCst) {
            Reply::Json(500, serde_json::json!({ "error": HOSTILE }))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\ncircuit_breaker = {{ failures = 0 }}\n",
        with_token(base_config(dir.path()))
            .replace("[delivery]\n", "[delivery]\nmax_attempts = 1\n"),
        downstream.url("/hooks"),
    );
    let router = TestRouter::start_with(dir, &config).await;
    let admin = router.admin;
    assert_eq!(
        post_signed(router.addr, &payload(HOSTILE, "call_completed"))
            .await
            .status,
        200
    );
    let cookie = login(admin).await;
    let dead = wait_for_dead(admin, &cookie).await;

    // Shown as text: escaped in the page, never as markup.
    assert!(
        dead.body.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
        ),
        "{}",
        dead.body
    );
    assert!(!dead.body.contains("<script>alert(1)"), "{}", dead.body);
    assert!(!dead.body.contains("<img src=x"), "{}", dead.body);
    let call = get(
        admin,
        &format!("/ui/call?{}", encode(&[("id", HOSTILE)])),
        Some(&cookie),
    )
    .await;
    assert_eq!(call.status, 200);
    assert!(call.body.contains("call_completed") && call.body.contains("crm"));
    assert!(!call.body.contains("<script>alert(1)"), "{}", call.body);

    // The confirmation page carries the form; the change is its POST.
    assert!(dead.body.contains("/ui/replay?sink=crm&amp;all=dead"));
    let start = dead
        .body
        .find("/ui/replay?sink=crm&amp;id=")
        .expect("a replay link");
    let href = dead.body[start..]
        .split('"')
        .next()
        .expect("href")
        .replace("&amp;", "&");
    let confirm = get(admin, &href, Some(&cookie)).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    let csrf = csrf_of(&confirm.body);
    let id = href.split("id=").nth(1).expect("an id").to_owned();
    let form = [
        ("csrf", csrf.as_str()),
        ("sink", "crm"),
        ("id", id.as_str()),
    ];
    let origin = format!("http://{admin}");

    let no_csrf = post(
        admin,
        "/ui/replay",
        Some(&origin),
        Some(&cookie),
        &form[1..],
    )
    .await;
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    let foreign = post(
        admin,
        "/ui/replay",
        Some("http://evil.example"),
        Some(&cookie),
        &form,
    )
    .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    let none = post(admin, "/ui/replay", None, Some(&cookie), &form).await;
    assert_eq!(none.status, 403, "{}", none.body);
    assert_eq!(downstream.count(), 1, "nothing was replayed");

    down.store(false, Ordering::SeqCst);
    let replayed = post(admin, "/ui/replay", Some(&origin), Some(&cookie), &form).await;
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert!(replayed.body.contains("1 replayed"), "{}", replayed.body);
    let received = downstream.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(received[1].json()["call_id"], HOSTILE);
    // Settled as delivered soon after the downstream answered.
    let path = format!(
        "/ui/events?{}",
        encode(&[("sink", "crm"), ("status", "delivered")])
    );
    for _ in 0..100 {
        let delivered = get(admin, &path, Some(&cookie)).await;
        if delivered.body.contains("&lt;script&gt;") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the replayed delivery is not shown as delivered");
}

async fn wait_for_dead(admin: SocketAddr, cookie: &str) -> Answer {
    for _ in 0..100 {
        let page = get(admin, "/ui/dead?sink=crm", Some(cookie)).await;
        assert_eq!(page.status, 200, "{}", page.body);
        if page.body.contains("Replay</a>") {
            return page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the delivery did not go dead");
}

fn encode(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

#[tokio::test]
async fn the_live_view_streams_events_as_they_are_stored_and_settled() {
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;

    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = with_token(base_config(dir.path()));
    let router = TestRouter::start_with(dir, &config).await;
    let admin = router.admin;
    let cookie = login(admin).await;
    let page = get(admin, "/ui/live", Some(&cookie)).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(r#"<script src="/ui/static/live.js">"#));
    assert_eq!(
        get(admin, "/ui/live/events", None).await.status,
        303,
        "the stream asks for the token too"
    );

    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let request = Request::get("/ui/live/events")
        .header("host", admin.to_string())
        .header("cookie", &cookie)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The stream is open once its first comment arrives.
    body.frame().await.expect("a frame").expect("data");

    let sent = tokio::time::Instant::now();
    let call = r#"live-<b>"1"#;
    assert_eq!(
        post_signed(router.addr, &payload(call, "call_completed"))
            .await
            .status,
        200
    );
    let mut text = String::new();
    while !(text.contains(r#""kind":"stored""#) && text.contains(r#""outcome":"delivered""#)) {
        let frame = tokio::time::timeout(Duration::from_secs(2), body.frame())
            .await
            .expect("within 2 s")
            .expect("a frame")
            .expect("data");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(sent.elapsed() < Duration::from_secs(2));
    assert!(text.contains(r#""call_id":"live-<b>\"1""#), "{text}");
    assert!(text.contains(r#""sink":"archive""#), "{text}");
    assert!(!text.contains("phone_number"), "no payload: {text}");
}

#[tokio::test]
async fn a_calls_payload_is_masked_until_revealed_and_shown_as_text_either_way() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let router =
        TestRouter::start_with(Arc::clone(&dir), &with_token(base_config(dir.path()))).await;
    let mut body: serde_json::Value =
        serde_json::from_str(&payload("call-p1", "call_completed")).expect("json");
    body["contact_name"] = HOSTILE.into();
    body["analysis"]["classification"] = HOSTILE.into();
    assert_eq!(
        post_signed(router.addr, &body.to_string()).await.status,
        200
    );
    let cookie = login(router.admin).await;

    let page = get(router.admin, "/ui/call?id=call-p1", Some(&cookie)).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("+********3210"), "{}", page.body);
    assert!(
        !page.body.contains("+919876543210") && !page.body.contains("alert(1)</script>"),
        "masked: {}",
        page.body
    );
    // A field that is no personal data is shown, as text.
    assert!(
        page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        page.body
    );
    let reveal = format!(
        "/ui/call?{}",
        encode(&[("id", "call-p1"), ("reveal", "call-p1:call_completed")])
    );
    assert!(
        page.body.contains(&reveal.replace('&', "&amp;")),
        "{}",
        page.body
    );

    let revealed = get(router.admin, &reveal, Some(&cookie)).await;
    assert!(revealed.body.contains("+919876543210"), "{}", revealed.body);
    assert!(revealed.body.contains("Payload (revealed)"));
    assert!(
        !revealed.body.contains("<script>alert(1)"),
        "{}",
        revealed.body
    );
    drop(router);
}

#[tokio::test]
async fn wrong_tokens_are_taken_ten_a_minute_and_a_session_goes_on_meanwhile() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let router =
        TestRouter::start_with(Arc::clone(&dir), &with_token(base_config(dir.path()))).await;
    let admin = router.admin;
    let cookie = login(admin).await;
    let origin = format!("http://{admin}");
    for _ in 0..10 {
        let wrong = post(
            admin,
            "/ui/login",
            Some(&origin),
            None,
            &[("token", "guess")],
        )
        .await;
        assert_eq!(wrong.status, 401);
    }
    // The right token waits too: an answer would tell a guesser what it told anyone.
    let paced = post(admin, "/ui/login", Some(&origin), None, &[("token", TOKEN)]).await;
    assert_eq!(paced.status, 429, "{}", paced.body);
    let wait: u64 = paced.headers["retry-after"]
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&wait), "{wait}");
    let bearer = send(
        admin,
        Request::get("/ui")
            .header("host", admin.to_string())
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(bearer.status, 429);
    // Logged in before, still in.
    assert_eq!(get(admin, "/ui", Some(&cookie)).await.status, 200);
    drop(router);
}

/// Confirms the change the GET page `path` asks about by posting its form as a browser
/// would; the answer's page.
async fn confirm(admin: SocketAddr, cookie: &str, path: &str, action: &str) -> Answer {
    let page = get(admin, path, Some(cookie)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let mut fields: Vec<(String, String)> = Vec::new();
    for input in page.body.split("<input type=\"hidden\" ").skip(1) {
        let attr = |name: &str| {
            let start = input.find(&format!("{name}=\"")).expect("attribute") + name.len() + 2;
            input[start..]
                .split('"')
                .next()
                .expect("value")
                .replace("&amp;", "&")
        };
        fields.push((attr("name"), attr("value")));
    }
    let form: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let origin = format!("http://{admin}");
    post(admin, action, Some(&origin), Some(cookie), &form).await
}

#[tokio::test]
async fn delivered_events_are_replayed_by_time_and_a_new_sink_backfilled_after_confirmation() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = with_token(base_config(dir.path()));
    let router = TestRouter::start_with(Arc::clone(&dir), &config).await;
    for event in ["call_started", "call_completed"] {
        assert_eq!(
            post_signed(router.addr, &payload("call-r1", event))
                .await
                .status,
            200
        );
    }
    wait_for_lines(&router.events_file(), 2, Duration::from_secs(10)).await;
    let admin = router.admin;
    let cookie = login(admin).await;

    let overview = get(admin, "/ui", Some(&cookie)).await;
    assert!(
        overview.body.contains("Attempts to archive") && overview.body.contains("<polyline"),
        "the overview's plots: {}",
        overview.body
    );
    let dead = get(admin, "/ui/dead", Some(&cookie)).await;
    assert!(dead.body.contains("Replay by time") && dead.body.contains("Backfill"));
    let replayed = confirm(
        admin,
        &cookie,
        "/ui/replay?sink=archive&all=delivered&since=1h&until=",
        "/ui/replay",
    )
    .await;
    assert!(replayed.body.contains("2 replayed"), "{}", replayed.body);
    wait_for_lines(&router.events_file(), 4, Duration::from_secs(10)).await;

    let late = dir.path().join("late.jsonl");
    router
        .reload(&format!(
            "{config}\n[[sinks]]\nname = \"late\"\ntype = \"file\"\npath = \"{}\"\nevents = [\"call_completed\"]\n",
            late.display()
        ))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !get(admin, "/ui/dead", Some(&cookie))
        .await
        .body
        .contains("<option>late</option>")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = get(admin, "/ui/backfill?sink=late&since=", Some(&cookie)).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let backfilled = confirm(
        admin,
        &cookie,
        "/ui/backfill?sink=late&since=1h",
        "/ui/backfill",
    )
    .await;
    assert!(
        backfilled.body.contains("1 deliveries created"),
        "{}",
        backfilled.body
    );
    let lines = wait_for_lines(&late, 1, Duration::from_secs(10)).await;
    assert_eq!(lines[0]["event"], "call_completed");
    drop(router);
}
