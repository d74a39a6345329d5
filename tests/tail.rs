//! `vyora-router tail`, the built binary, against a running router: what it streams, its
//! filters, the admin token, and a router that is not there.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const TOKEN: &str = "tail-test-token-0123456789";

/// A router whose admin listener asks for `TOKEN`, and an operator's config reaching it
/// with `token`.
async fn router_and_config(token: &str) -> (TestRouter, std::path::PathBuf) {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let with_token = |listen: &str, token: &str| {
        base_config(dir.path()).replace(
            "[admin]\nlisten = \"127.0.0.1:0\"\n",
            &format!("[admin]\nlisten = \"{listen}\"\ntoken = \"{token}\"\n"),
        )
    };
    let router = TestRouter::start_with(Arc::clone(&dir), &with_token("127.0.0.1:0", TOKEN)).await;
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, with_token(&router.admin.to_string(), token)).expect("write");
    (router, config)
}

fn tail(config: &std::path::Path, args: &[&str]) -> tokio::process::Child {
    Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .arg("tail")
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("VYORA_WEBHOOK_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tail starts")
}

#[tokio::test]
async fn tail_streams_stored_events_and_settled_deliveries_of_the_chosen_event_without_payloads() {
    let (router, config) = router_and_config(TOKEN).await;
    let mut child = tail(&config, &["--json", "--event", "call_completed"]);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    // Webhooks go on until tail, which connects at its own pace, shows one call's story.
    for n in 0.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tail showed: {seen:?}"
        );
        let call = format!("call-t{n}");
        for event in ["call_started", "call_completed"] {
            assert_eq!(router.post_signed(&payload(&call, event)).await.status, 200);
        }
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
        {
            assert!(!line.contains("Rahul"), "no payload: {line}");
            seen.push(serde_json::from_str(&line).expect("one JSON object a line"));
        }
        let kinds: Vec<&str> = seen
            .iter()
            .filter(|h| h["call_id"] == call.as_str())
            .map(|h| h["kind"].as_str().expect("kind"))
            .collect();
        if kinds.contains(&"stored") && kinds.contains(&"settled") {
            break;
        }
    }
    assert!(
        seen.iter().all(|h| h["event"] == "call_completed"),
        "{seen:?}"
    );
    let settled = seen
        .iter()
        .find(|h| h["kind"] == "settled")
        .expect("a settlement");
    assert_eq!(
        (&settled["sink"], &settled["outcome"]),
        (&"archive".into(), &"delivered".into())
    );
    let stored = seen.iter().find(|h| h["kind"] == "stored").expect("stored");
    assert_eq!(stored["sinks"], serde_json::json!(["archive"]));
    drop(router);
}

/// Runs `tail`, which must fail; what it said.
async fn failing_tail(config: &std::path::Path) -> String {
    let out = tail(config, &[])
        .wait_with_output()
        .await
        .expect("tail ends");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn tail_says_why_when_the_token_is_wrong_or_nothing_listens() {
    let (router, config) = router_and_config("not-the-token-0123456789").await;
    let text = failing_tail(&config).await;
    assert!(
        text.contains("refused") && text.contains("admin.token"),
        "{text}"
    );

    let addr = router.admin.to_string();
    let _dir = router.stop().await;
    let text = failing_tail(&config).await;
    assert!(
        text.contains("cannot reach") && text.contains(&addr),
        "{text}"
    );
}
