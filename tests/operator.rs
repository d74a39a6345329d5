//! Operator commands of the built binary against the store of a running router.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::downstream::{Downstream, Reply};
use common::*;

fn run(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("VYORA_WEBHOOK_SECRET")
        .output()
        .expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn dead_deliveries_can_be_listed_shown_and_replayed_while_the_router_runs() {
    let downstream = Downstream::start(|_, _| Reply::Status(422)).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config_text = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n",
        base_config(dir.path()),
        downstream.url("/in")
    );
    let router = TestRouter::start_with(Arc::clone(&dir), &config_text).await;
    assert_eq!(
        router
            .post_signed(&payload("call-op", "call_completed"))
            .await
            .status,
        200
    );
    downstream.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The operator's config names the same store and no secret at all.
    let config = dir.path().join("operator.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"{}\"\n",
            dir.path().join("router.db").display()
        ),
    )
    .expect("write");

    let (ok, table) = run(
        &config,
        &["deliveries", "list", "--status", "dead", "--sink", "crm"],
    );
    assert!(ok, "{table}");
    assert!(
        table.contains("call-op") && table.contains("dead") && table.contains("422"),
        "{table}"
    );

    let (ok, json) = run(
        &config,
        &["deliveries", "list", "--call-id", "call-op", "--json"],
    );
    assert!(ok, "{json}");
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON output");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 2, "one row per sink: {rows:?}");

    let (ok, shown) = run(&config, &["events", "show", "call-op"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("call_completed") && shown.contains("archive") && shown.contains("crm"),
        "{shown}"
    );

    downstream.set_script(|_, _| Reply::Status(200));
    let (ok, replayed) = run(
        &config,
        &["deliveries", "replay", "--sink", "crm", "--dead", "--json"],
    );
    assert!(ok, "{replayed}");
    let replayed: serde_json::Value = serde_json::from_str(&replayed).expect("JSON output");
    assert_eq!(replayed["replayed"], 1);

    // The running router picks the replayed row up by itself.
    downstream.wait_for(2, Duration::from_secs(10)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: String = router
            .db()
            .query_row("SELECT status FROM outbox WHERE sink = 'crm'", [], |r| {
                r.get(0)
            })
            .expect("row");
        if status == "delivered" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_store_path_that_does_not_exist_is_an_error_not_a_new_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("operator.toml");
    let missing = dir.path().join("nope.db");
    std::fs::write(
        &config,
        format!("[store]\npath = \"{}\"\n", missing.display()),
    )
    .expect("write");
    let (ok, text) = run(&config, &["deliveries", "list"]);
    assert!(!ok);
    assert!(text.contains("nope.db"), "{text}");
    assert!(!missing.exists());
}

#[test]
fn replay_needs_exactly_one_selection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, "").expect("write");
    let (ok, text) = run(&config, &["deliveries", "replay", "--sink", "crm"]);
    assert!(!ok && text.contains("--dead"), "{text}");
    let (ok, _) = run(
        &config,
        &[
            "deliveries",
            "replay",
            "--sink",
            "crm",
            "--dead",
            "--id",
            "3",
        ],
    );
    assert!(!ok);
}

/// The SQLite schema version this build writes.
const CURRENT: i64 = 9;

/// A store of this build with one event, its schema version then set to `version`.
fn store_at_version(dir: &std::path::Path, version: i64) -> std::path::PathBuf {
    let path = dir.join("router.db");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = vyora_router::store::Store::open(
            &vyora_router::config::StoreConfig::sqlite(path.clone()),
            vyora_router::store::StoreOptions::default(),
        )
        .await
        .expect("store");
        let body = bytes::Bytes::from(payload("call-v", "call_completed"));
        let event = vyora_router::event::Event::from_webhook(None, body).expect("event");
        store
            .ingest(event, vec![Arc::from("archive")])
            .await
            .expect("stored");
        store.close().await;
    });
    set_version(&path, version);
    path
}

fn set_version(path: &std::path::Path, version: i64) {
    rusqlite::Connection::open(path)
        .expect("open")
        .pragma_update(None, "user_version", version)
        .expect("set the version");
}

fn version_of(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .expect("open")
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("read the version")
}

#[test]
fn an_operator_command_refuses_a_store_of_another_schema_version_and_leaves_it_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = store_at_version(dir.path(), 5);
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, format!("[store]\npath = \"{}\"\n", path.display())).expect("write");

    for args in [&["deliveries", "list"][..], &["events", "show", "call-v"]] {
        let (ok, text) = run(&config, args);
        assert!(!ok, "{text}");
        for needed in [
            "schema version 5",
            &format!("this build uses version {CURRENT}"),
            "vyora-router serve",
        ] {
            assert!(text.contains(needed), "{needed} missing: {text}");
        }
        assert_eq!(version_of(&path), 5, "the command migrated the store");
    }

    set_version(&path, CURRENT + 1);
    let (ok, text) = run(&config, &["deliveries", "list"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("schema version {}", CURRENT + 1))
            && text.contains("use the build that wrote it"),
        "{text}"
    );
    assert_eq!(version_of(&path), CURRENT + 1);

    set_version(&path, CURRENT);
    let (ok, text) = run(&config, &["events", "show", "call-v"]);
    assert!(ok && text.contains("call_completed"), "{text}");
}

#[test]
fn store_migrate_reads_a_source_of_another_schema_version_never_migrates_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = store_at_version(dir.path(), 5);
    let out = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .current_dir(dir.path())
        .args(["store", "migrate", "--from"])
        .arg(&path)
        .args([
            "--to",
            "postgres://router@127.0.0.1:1/vyora?sslmode=disable",
        ])
        .output()
        .expect("run");
    let (ok, text) = (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("schema version 5")
            && text.contains(&format!("this build uses version {CURRENT}")),
        "{text}"
    );
    assert_eq!(version_of(&path), 5, "the source was migrated");
}

#[tokio::test]
async fn deliveries_of_a_sink_whose_destination_cannot_be_reached_show_the_pause_and_why() {
    // A port nothing listens on: the HTTP sink cannot connect, and pauses.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config_text = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/in\"\n",
        base_config(dir.path()),
    );
    let router = TestRouter::start_with(Arc::clone(&dir), &config_text).await;
    let sent = router
        .post_signed(&payload("call-down", "call_completed"))
        .await;
    assert_eq!(sent.status, 200);
    let config = operator_config(dir.path(), "");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let table = loop {
        let (ok, table) = run(&config, &["deliveries", "list", "--sink", "crm"]);
        assert!(ok, "{table}");
        if table.contains("sink paused") || tokio::time::Instant::now() > deadline {
            break table;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(table.contains("pending (sink paused)"), "{table}");
    assert!(table.contains("cannot connect"), "{table}");

    let (ok, json) = run(&config, &["deliveries", "list", "--sink", "crm", "--json"]);
    assert!(ok, "{json}");
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON output");
    let row = &rows[0];
    assert_eq!(row["status"], "pending");
    assert_eq!(row["attempts"], 0, "a pause uses no attempt: {row}");
    let until = row["sink_paused"]["until"].as_str().expect("a pause end");
    let next = row["next_attempt_at"].as_str().expect("a next attempt");
    assert!(
        until >= next,
        "the pause ends after the row's own time: {row}"
    );
    drop(router);
}

/// An operator's config on the router's store in `dir`, with sinks of its own.
fn operator_config(dir: &std::path::Path, sinks: &str) -> std::path::PathBuf {
    let config = dir.join("operator.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"{}\"\n{sinks}",
            dir.join("router.db").display()
        ),
    )
    .expect("write");
    config
}

/// The id `deliveries list` shows for the one delivery of `call` to `sink`.
fn delivery_id(config: &std::path::Path, sink: &str, call: &str) -> i64 {
    let (ok, json) = run(
        config,
        &[
            "deliveries",
            "list",
            "--sink",
            sink,
            "--call-id",
            call,
            "--json",
        ],
    );
    assert!(ok, "{json}");
    let rows: serde_json::Value = serde_json::from_str(&json).expect("JSON output");
    rows[0]["id"].as_i64().expect("an id")
}

#[tokio::test]
async fn replay_refuses_a_sink_or_a_delivery_that_does_not_exist_and_says_why_it_replayed_nothing()
{
    // Nothing listens on crm's port: its delivery stays pending (postponed, never dead).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config_text = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"http://{closed}/in\"\n",
        base_config(dir.path())
    );
    let router = TestRouter::start_with(Arc::clone(&dir), &config_text).await;
    let body = payload("call-wait", "call_completed");
    assert_eq!(router.post_signed(&body).await.status, 200);
    wait_for_lines(&router.events_file(), 1, Duration::from_secs(10)).await;
    // Written to the file, and then recorded as delivered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while router
        .count("SELECT count(*) FROM outbox WHERE sink = 'archive' AND status = 'delivered'")
        < 1
    {
        assert!(tokio::time::Instant::now() < deadline, "never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `billing` is configured but has never been routed an event.
    let config = operator_config(
        dir.path(),
        "[[sinks]]\nname = \"billing\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"\n",
    );

    let (ok, text) = run(
        &config,
        &["deliveries", "replay", "--sink", "nosuch", "--dead"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("nosuch")
            && text.contains("archive")
            && text.contains("crm")
            && text.contains("billing"),
        "names the sink and the known ones: {text}"
    );
    let (ok, text) = run(
        &config,
        &["deliveries", "replay", "--sink", "billing", "--dead"],
    );
    assert!(ok, "a configured sink with nothing dead: {text}");
    assert!(text.contains("no dead deliveries to billing"), "{text}");

    for which in [["--id", "999"], ["--call-id", "call-nope"]] {
        let mut args = vec!["deliveries", "replay", "--sink", "crm"];
        args.extend(which);
        let (ok, text) = run(&config, &args);
        assert!(!ok, "{which:?}: {text}");
        assert!(text.contains(which[1]) && text.contains("crm"), "{text}");
    }

    // Pending already: nothing to do, and the answer says so.
    let id = delivery_id(&config, "crm", "call-wait").to_string();
    let (ok, json) = run(
        &config,
        &[
            "deliveries",
            "replay",
            "--sink",
            "crm",
            "--id",
            &id,
            "--json",
        ],
    );
    assert!(ok, "{json}");
    let done: serde_json::Value = serde_json::from_str(&json).expect("JSON output");
    assert_eq!(
        (&done["replayed"], &done["already_pending"]),
        (&0.into(), &1.into())
    );
    let (ok, text) = run(
        &config,
        &[
            "deliveries",
            "replay",
            "--sink",
            "crm",
            "--call-id",
            "call-wait",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("1 delivery pending already"), "{text}");

    // The same event, delivered to the archive, is replayed by the same id.
    let (ok, text) = run(
        &config,
        &["deliveries", "replay", "--sink", "archive", "--id", &id],
    );
    assert!(ok, "{text}");
    assert!(
        text.starts_with("1 delivery to archive is pending again"),
        "{text}"
    );
    wait_for_lines(&router.events_file(), 2, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn events_show_of_a_call_the_store_does_not_have_fails_naming_it() {
    let router = TestRouter::start().await;
    assert_eq!(
        router
            .post_signed(&payload("call-here", "call_completed"))
            .await
            .status,
        200
    );
    let config = operator_config(router.path(), "");
    let (ok, text) = run(&config, &["events", "show", "call-here"]);
    assert!(ok, "{text}");
    for json in [false, true] {
        let mut args = vec!["events", "show", "call-elsewhere"];
        if json {
            args.push("--json");
        }
        let (ok, text) = run(&config, &args);
        assert!(!ok, "{text}");
        assert!(
            text.contains("no stored events for call call-elsewhere"),
            "{text}"
        );
    }
}

/// `vyora-router <args> --json`, which must succeed, parsed.
fn run_json(config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (ok, text) = run(config, &with_json);
    assert!(ok, "{args:?}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

/// The ids of a page of `events list --json`.
fn listed(page: &serde_json::Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_i64().expect("id"))
        .collect()
}

#[tokio::test]
async fn events_list_filters_and_pages_and_events_show_masks_payloads_unless_revealed() {
    let downstream = Downstream::start(|_, _| Reply::Status(422)).await;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config_text = format!(
        "{}\n[[sinks]]\nname = \"crm\"\ntype = \"http\"\nurl = \"{}\"\n",
        base_config(dir.path()),
        downstream.url("/in")
    );
    let router = TestRouter::start_with(Arc::clone(&dir), &config_text).await;
    for call in ["call-e0", "call-e1", "call-e2"] {
        for event in ["call_started", "call_completed"] {
            assert_eq!(router.post_signed(&payload(call, event)).await.status, 200);
        }
    }
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, &config_text).expect("write");
    // crm refuses everything: each of the six goes dead there, one after the other.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while listed(&run_json(
        &config,
        &["events", "list", "--sink", "crm", "--status", "dead"],
    ))
    .len()
        < 6
    {
        assert!(tokio::time::Instant::now() < deadline, "not all dead");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let all = listed(&run_json(&config, &["events", "list"]));
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first: {all:?}");

    // Keyset pages: the first says where the next starts, and together they hold all.
    let (ok, first) = run(&config, &["events", "list", "--limit", "4"]);
    assert!(ok, "{first}");
    let before = all[3].to_string();
    assert!(
        first.contains(&format!("--before {before}")),
        "the next page: {first}"
    );
    let page = run_json(&config, &["events", "list", "--limit", "4"]);
    assert_eq!(listed(&page), all[..4]);
    assert_eq!(page["next_before"], all[3]);
    let rest = run_json(&config, &["events", "list", "--before", &before]);
    assert_eq!(listed(&rest), all[4..]);
    assert!(rest["next_before"].is_null());

    let started = run_json(&config, &["events", "list", "--event", "call_started"]);
    assert_eq!(listed(&started).len(), 3);
    assert!(
        started["events"]
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["event"] == "call_started")
    );
    let delivered = run_json(
        &config,
        &["events", "list", "--sink", "crm", "--status", "delivered"],
    );
    assert_eq!(listed(&delivered), Vec::<i64>::new());
    let archived = run_json(
        &config,
        &[
            "events",
            "list",
            "--sink",
            "archive",
            "--status",
            "delivered",
        ],
    );
    assert_eq!(listed(&archived).len(), 6);
    assert_eq!(
        listed(&run_json(&config, &["events", "list", "--since", "1h"])).len(),
        6
    );
    assert_eq!(
        listed(&run_json(&config, &["events", "list", "--until", "1h"])).len(),
        0
    );

    let (ok, text) = run(&config, &["events", "list", "--sink", "nosuch"]);
    assert!(
        !ok && text.contains("nosuch") && text.contains("archive, crm"),
        "{text}"
    );
    let (ok, text) = run(&config, &["events", "list", "--since", "yesterday-ish"]);
    assert!(!ok && text.contains("yesterday-ish"), "{text}");
    for limit in ["0", "10001"] {
        let (ok, text) = run(&config, &["events", "list", "--limit", limit]);
        assert!(
            !ok && text.contains(&format!("\"{limit}\" is not a page size from 1 to 10000")),
            "{text}"
        );
    }

    // Payloads: masked by default, whole only when revealed.
    let (ok, shown) = run(&config, &["events", "show", "call-e0", "--payload"]);
    assert!(ok, "{shown}");
    assert!(
        shown.contains("masked")
            && shown.contains("+********3210")
            && shown.contains("\"call_id\": \"call-e0\""),
        "{shown}"
    );
    assert!(
        !shown.contains("Rahul") && !shown.contains("9876543210"),
        "{shown}"
    );
    let (ok, revealed) = run(
        &config,
        &["events", "show", "call-e0", "--payload", "--reveal"],
    );
    assert!(
        ok && revealed.contains("Rahul Sharma") && revealed.contains("+919876543210"),
        "{revealed}"
    );
    let json = run_json(&config, &["events", "show", "call-e0", "--payload"]);
    assert_eq!(json[0]["payload"]["call_id"], "call-e0");
    assert_eq!(
        json[0]["payload"]["contact_name"],
        "[hidden: 12 characters]"
    );
    let without = run_json(&config, &["events", "show", "call-e0"]);
    assert!(without[0].get("payload").is_none(), "{without}");
    // Each delivery's attempts come along: crm refused it once, for good.
    let crm = without[1]["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .find(|d| d["sink"] == "crm")
        .expect("crm")
        .clone();
    assert_eq!(crm["history"][0]["code"], 422, "{crm}");

    let (ok, text) = run(&config, &["events", "show", "call-e0", "--reveal"]);
    assert!(!ok && text.contains("--payload"), "{text}");
    let (ok, text) = run(&config, &["events", "show", "call-nowhere", "--payload"]);
    assert!(!ok && text.contains("call-nowhere"), "{text}");

    // Replay by status and time: the archive's six delivered events go out again.
    let replay = |range: &str| {
        run_json(
            &config,
            &[
                "deliveries",
                "replay",
                "--sink",
                "archive",
                "--status",
                "delivered",
                range,
                "1h",
            ],
        )
    };
    assert_eq!(replay("--until")["replayed"], 0);
    assert_eq!(replay("--since")["replayed"], 6);
    wait_for_lines(&router.events_file(), 12, Duration::from_secs(10)).await;
    let dead = run_json(
        &config,
        &[
            "deliveries",
            "replay",
            "--sink",
            "crm",
            "--dead",
            "--since",
            "1h",
        ],
    );
    assert_eq!(dead["replayed"], 6);
    let (ok, text) = run(
        &config,
        &[
            "deliveries",
            "replay",
            "--sink",
            "crm",
            "--id",
            "1",
            "--since",
            "1h",
        ],
    );
    assert!(!ok && text.contains("--since"), "{text}");
    drop(router);
}

#[tokio::test]
async fn backfill_gives_a_new_sink_the_stored_events_its_route_takes_and_a_second_run_adds_nothing()
{
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let router = TestRouter::start_with(Arc::clone(&dir), &base_config(dir.path())).await;
    for call in ["call-b0", "call-b1"] {
        for event in ["call_started", "call_completed"] {
            assert_eq!(router.post_signed(&payload(call, event)).await.status, 200);
        }
    }
    // A sink added afterwards, taking only call_completed.
    let late = dir.path().join("late.jsonl");
    let config_text = format!(
        "{}\n[[sinks]]\nname = \"late\"\ntype = \"file\"\npath = \"{}\"\nevents = [\"call_completed\"]\n",
        base_config(dir.path()),
        late.display()
    );
    let config = dir.path().join("operator.toml");
    std::fs::write(&config, &config_text).expect("write");
    router.reload(&config_text).await;

    let none = run_json(
        &config,
        &[
            "deliveries",
            "backfill",
            "--sink",
            "late",
            "--since",
            "1h",
            "--until",
            "1h",
        ],
    );
    assert_eq!(none["added"], 0);
    let first = run_json(
        &config,
        &["deliveries", "backfill", "--sink", "late", "--since", "1h"],
    );
    assert_eq!(
        (&first["examined"], &first["matched"], &first["added"]),
        (&4.into(), &2.into(), &2.into()),
        "{first}"
    );
    let lines = wait_for_lines(&late, 2, Duration::from_secs(10)).await;
    let mut events: Vec<&str> = lines
        .iter()
        .map(|l| l["event"].as_str().expect("event"))
        .collect();
    events.dedup();
    assert_eq!(events, ["call_completed"], "the route's filter decides");

    let second = run_json(
        &config,
        &["deliveries", "backfill", "--sink", "late", "--since", "1h"],
    );
    assert_eq!(
        (&second["examined"], &second["added"]),
        (&2.into(), &0.into()),
        "{second}"
    );
    let (ok, text) = run(
        &config,
        &["deliveries", "backfill", "--sink", "late", "--since", "1h"],
    );
    assert!(ok && text.contains("nothing to backfill"), "{text}");
    let (ok, text) = run(
        &config,
        &[
            "deliveries",
            "backfill",
            "--sink",
            "nosuch",
            "--since",
            "1h",
        ],
    );
    assert!(
        !ok && text.contains("nosuch") && text.contains("archive, late"),
        "{text}"
    );
    let (ok, text) = run(&config, &["deliveries", "backfill", "--sink", "late"]);
    assert!(!ok && text.contains("--since"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_lines(&late).len(),
        2,
        "each backfilled event went out once"
    );
    drop(router);
}
