//! The command line of the built binary: config checking (and `--connect`), environment
//! overrides, the built-in default, how `serve` reports a port in use, and the helpers
//! `trigger` and `healthcheck`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::downstream::{Downstream, Reply};

fn router(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vyora-router"));
    cmd.current_dir(cwd)
        .args(args)
        .env_remove("VYORA_WEBHOOK_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run vyora-router")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("router.toml");
    std::fs::write(
        &path,
        "[webhook]\nsecrets = [\"topsecret-1\", \"topsecret-2\"]\n",
    )
    .expect("write");
    let out = router(
        dir.path(),
        &["check-config", "--config", "router.toml"],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert!(!stdout.contains("topsecret"), "{stdout}");
    assert!(
        stdout.contains("listen = \"127.0.0.1:8080\""),
        "defaults are shown: {stdout}"
    );
}

#[test]
fn check_config_hides_url_paths_and_queries_unless_shown_and_passwords_always() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        r#"[webhook]
secrets = ["s"]

[[sinks]]
name = "slack"
type = "http"
url = "https://hooks.slack.com/services/T000/B000/XXXXSECRET"

[[sinks]]
name = "coded"
type = "http"
url = "https://x.example/hook?code=KEY123"

[[sinks]]
name = "crm"
type = "http"
url = "https://user:url-password@crm.example/"
"#,
    )
    .expect("write");
    let urls = [
        "https://hooks.slack.com/services/T000/B000/XXXXSECRET",
        "https://x.example/hook?code=KEY123",
    ];
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for url in urls {
        assert!(!stdout.contains(url), "{url} shown: {stdout}");
    }
    assert!(
        stdout.contains("https://hooks.slack.com/<redacted>"),
        "{stdout}"
    );
    assert!(!stdout.contains("url-password"), "{stdout}");

    let out = router(
        dir.path(),
        &["check-config", "-c", "router.toml", "--show-urls"],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for url in urls {
        assert!(stdout.contains(url), "{url} not shown: {stdout}");
    }
    assert!(!stdout.contains("url-password"), "{stdout}");
}

#[test]
fn a_bad_value_fails_the_check_naming_the_key_and_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[webhook]\nsecrets = [\"s\"]\n[delivery]\nbackoff_initial = \"soon\"\n",
    )
    .expect("write");
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("delivery.backoff_initial") && stderr.contains("soon"),
        "{stderr}"
    );
}

#[test]
fn a_secret_in_the_environment_given_as_the_wrong_type_is_named_but_not_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    for command in ["check-config", "serve"] {
        let out = router(
            dir.path(),
            &[command, "--config", "router.toml"],
            &[("VYORA_ROUTER_WEBHOOK__SECRETS", "whsec_x")],
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{command}");
        assert!(stderr.contains("webhook.secrets"), "{command}: {stderr}");
        assert!(
            !stderr.contains("whsec_x") && !stdout.contains("whsec_x"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn a_syntax_error_names_its_line_and_column_but_does_not_print_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[webhook]\nsecrets = [\"whsec_on_a_broken_line\n",
    )
    .expect("write");
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2, column"), "{stderr}");
    assert!(!stderr.contains("whsec_on_a_broken_line"), "{stderr}");
}

#[test]
fn a_missing_secret_fails_serve_with_how_to_set_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n",
    )
    .expect("write");
    let out = router(dir.path(), &["serve", "--config", "router.toml"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("VYORA_WEBHOOK_SECRET") && stderr.contains("webhook.secrets"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_that_does_not_exist_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = router(
        dir.path(),
        &["check-config", "--config", "nowhere.toml"],
        &[("VYORA_WEBHOOK_SECRET", "s")],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("nowhere.toml"));
}

#[test]
fn environment_variables_override_the_file_and_supply_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[server]\nlisten = \"127.0.0.1:8080\"\n",
    )
    .expect("write");
    let out = router(
        dir.path(),
        &["check-config", "--config", "router.toml"],
        &[
            ("VYORA_ROUTER_SERVER__LISTEN", "0.0.0.0:9999"),
            ("VYORA_ROUTER_STORE__SYNCHRONOUS", "normal"),
            ("VYORA_WEBHOOK_SECRET", "env-secret-a,env-secret-b"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("listen = \"0.0.0.0:9999\""), "{stdout}");
    assert!(stdout.contains("synchronous = \"normal\""), "{stdout}");
    assert_eq!(stdout.matches("<redacted>").count(), 2, "{stdout}");
    assert!(!stdout.contains("env-secret"), "{stdout}");
}

#[test]
fn without_a_config_file_the_built_in_default_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = router(
        dir.path(),
        &["check-config"],
        &[("VYORA_WEBHOOK_SECRET", "s")],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("name = \"archive\"") && stdout.contains("data/events.jsonl"),
        "{stdout}"
    );
}

/// The router config that docker-compose.yml writes inline, its broker credentials filled
/// in as compose fills them.
fn compose_router_config(compose: &str) -> String {
    let mut lines = compose
        .lines()
        .skip_while(|l| l.trim() != "content: |")
        .skip(1)
        .peekable();
    let first = lines
        .peek()
        .expect("docker-compose.yml writes the router config inline");
    let indent = first.len() - first.trim_start().len();
    let mut config = String::new();
    for line in
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
    {
        config.push_str(line.get(indent..).unwrap_or(""));
        config.push('\n');
    }
    config
        .replace("${RABBITMQ_DEFAULT_USER}", "vyora")
        .replace("${RABBITMQ_DEFAULT_PASS}", "compose-password")
        .replace("${REDIS_PASSWORD:-}", "redis-password")
}

#[test]
fn the_example_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let from_compose = dir.path().join("compose-router.toml");
    std::fs::write(&from_compose, compose_router_config(&compose)).expect("write");
    for config in [root.join("config/router.toml"), from_compose] {
        let path = config.to_str().expect("a UTF-8 path");
        let out = router(
            root,
            &["check-config", "--config", path],
            &[("VYORA_WEBHOOK_SECRET", "s")],
        );
        assert!(out.status.success(), "{path}: {}", text(&out.stderr));
    }
}

#[test]
fn an_http_api_url_is_refused_unless_it_points_at_this_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (url, allowed) in [
        ("http://api.example.com", false),
        ("http://10.0.0.7:8080/", false),
        ("http://127.0.0.1:1", true),
        ("http://127.8.9.10:1", true),
        ("http://localhost:1", true),
        ("http://[::1]:1", true),
        ("https://api.example.com", true),
    ] {
        std::fs::write(
            dir.path().join("router.toml"),
            format!("[webhook]\nsecrets = [\"s\"]\n[api]\nbase_url = \"{url}\"\n"),
        )
        .expect("write");
        let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.success(), allowed, "{url}: {stderr}");
        if !allowed {
            assert!(
                stderr.contains("api.base_url")
                    && stderr.contains(url)
                    && stderr.contains("clear text"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn the_secret_flags_warn_that_the_command_line_is_visible_in_ps() {
    let dir = tempfile::tempdir().expect("tempdir");
    for command in ["trigger", "sign"] {
        let out = router(dir.path(), &[command, "--help"], &[]);
        let help = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            help.contains("visible to other local users in `ps`")
                && help.contains("Prefer the environment variable")
                && help.contains("VYORA_WEBHOOK_SECRET"),
            "{help}"
        );
    }
}

#[test]
fn the_example_deployment_publishes_no_broker_port_and_takes_its_credentials_from_the_environment()
{
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).expect("read");
    for mapping in compose
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("- \"") && l.contains("5672"))
    {
        assert!(
            mapping.starts_with("- \"127.0.0.1:"),
            "{mapping} is published"
        );
    }
    assert!(
        !compose.contains("guest"),
        "default credentials in {compose}"
    );
    let config = compose_router_config(&compose);
    assert!(
        config.contains("amqp://vyora:compose-password@rabbitmq:5672/") && !config.contains("${"),
        "the AMQP URL is built from RABBITMQ_DEFAULT_USER and _PASS: {config}"
    );
}

#[test]
fn service_link_variables_named_like_our_prefix_are_not_taken_for_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        "[webhook]\nsecrets = [\"s\"]\n",
    )
    .expect("write");
    // What Kubernetes sets for a Service named vyora-router, next to a real override.
    let out = router(
        dir.path(),
        &["check-config", "-c", "router.toml"],
        &[
            ("VYORA_ROUTER_SERVICE_HOST", "10.0.0.7"),
            ("VYORA_ROUTER_PORT", "tcp://10.0.0.7:8080"),
            ("VYORA_ROUTER_PORT_8080_TCP_ADDR", "10.0.0.7"),
            ("VYORA_ROUTER_LOG__FORMAT", "json"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("format = \"json\""), "{stdout}");
}

#[test]
fn check_config_reports_every_error_of_the_file_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        r#"[server]
listen_on = "0.0.0.0:8080"
ack_timeout = 4

[webhook]
secrets = ["s"]

[store]
retention = "8s"
dedup_window = "8s"

[log]
level = "inf"

[[sinks]]
name = "archive"
type = "file"
path = "events.jsonl"
events = ["call_complete"]
"#,
    )
    .expect("write");
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "5 errors in the config:",
        "`server.listen_on`: unknown key; did you mean `listen`?",
        "`server.ack_timeout`: invalid type: found signed int `4`, expected a duration like \"4s\"",
        "`store.dedup_window` = \"8s\"",
        "webhook.max_clock_skew (\"5m\")",
        "`log.level` = \"inf\": \"inf\" is not a level (did you mean \"info\"?)",
        "`sinks[0].events` = \"call_complete\": is not an event Vyora sends (did you mean \"call_completed\"?)",
    ] {
        assert!(stderr.contains(expected), "{expected} not in:\n{stderr}");
    }
    assert!(!stderr.contains("``"), "{stderr}");
}

#[test]
fn check_config_shows_the_defaults_in_effect_and_ends_by_saying_the_config_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        r#"[server]
listen = "localhost:8080"

[webhook]
secrets = ["s"]

[[sinks]]
name = "queue"
type = "amqp"
url = "amqp://guest:guest-password@mq.internal:5672/%2f"
exchange = "vyora"
"#,
    )
    .expect("write");
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for shown in [
        "listen = \"localhost:8080\"",
        "max_event_age = \"89d 23h 55m\"",
        "exchange_type = \"topic\"",
        "confirm_timeout = \"30s\"",
        "amqp://guest:***@mq.internal:5672/",
    ] {
        assert!(stdout.contains(shown), "{shown} not in {stdout}");
    }
    assert!(
        !stdout.contains("pool_size") && !stdout.contains("guest-password"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("# router.toml is valid."),
        "{stdout}"
    );
}

#[test]
fn serve_says_once_which_address_is_already_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    std::fs::write(
        dir.path().join("router.toml"),
        format!(
            "[server]\nlisten = \"{addr}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [webhook]\nsecrets = [\"s\"]\n[store]\npath = \"router.db\"\n\
             [[sinks]]\nname = \"archive\"\ntype = \"file\"\npath = \"events.jsonl\"\n"
        ),
    )
    .expect("write");
    let out = router(dir.path(), &["serve", "-c", "router.toml"], &[]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (server.listen)")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}

/// `check-config --connect` from a runtime's worker: the test's own servers keep
/// answering meanwhile.
async fn connect(dir: &Path) -> Output {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        router(
            &dir,
            &["check-config", "-c", "router.toml", "--connect"],
            &[],
        )
    })
    .await
    .expect("the command ran")
}

#[tokio::test(flavor = "multi_thread")]
async fn check_config_connect_reaches_each_sink_and_fails_when_one_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Downstream::start(|_, _| Reply::Status(404)).await;
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let config = format!(
        r#"[webhook]
secrets = ["s"]

[store]
path = "data/router.db"

[[sinks]]
name = "archive"
type = "file"
path = "out/events.jsonl"

[[sinks]]
name = "crm"
type = "http"
url = "http://{up}/hooks/PATH-SECRET?code=QUERY-SECRET"
headers = {{ "Authorization" = "Bearer HEADER-SECRET" }}
"#,
        up = up.addr
    );
    let gone =
        format!("\n[[sinks]]\nname = \"gone\"\ntype = \"http\"\nurl = \"http://{down}/hook\"\n");
    std::fs::write(dir.path().join("router.toml"), format!("{config}{gone}")).expect("write");

    let out = connect(dir.path()).await;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let line = |start: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in {stdout}"))
            .to_owned()
    };
    assert!(line("ok      store (sqlite): ").contains("does not exist yet"));
    assert!(line("ok      sink archive (file): ").contains("does not exist yet"));
    assert!(line("ok      sink crm (http): ").contains("answered 404"));
    assert!(line("FAILED  sink gone (http): ").contains(&down.to_string()));
    assert_eq!(
        stdout.lines().last(),
        Some("# 1 of 4 checks failed."),
        "{stdout}"
    );
    let everything = format!("{stdout}{}", text(&out.stderr));
    for secret in ["PATH-SECRET", "QUERY-SECRET", "HEADER-SECRET"] {
        assert!(
            !everything.contains(secret),
            "{secret} printed: {everything}"
        );
    }
    let asked: Vec<String> = up.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        asked,
        ["/"],
        "only the host's root is asked, never the hook"
    );
    assert!(
        !dir.path().join("out/events.jsonl").exists()
            && !dir.path().join("data/router.db").exists(),
        "a check creates no data file"
    );

    std::fs::write(dir.path().join("router.toml"), config).expect("write");
    let out = connect(dir.path()).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some("# all 3 checks passed."),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs RabbitMQ: set VYORA_TEST_AMQP_URL, run with --include-ignored"]
async fn check_config_connect_logs_in_to_the_broker_and_finds_the_exchange() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = common::amqp::broker_url();
    let mut wrong = reqwest::Url::parse(&url).expect("URL");
    wrong
        .set_password(Some("wrong-password"))
        .expect("password");
    let missing = common::amqp::unique("vyora-missing");
    let sink = |name: &str, url: &str, exchange: &str| {
        format!(
            "[[sinks]]\nname = \"{name}\"\ntype = \"amqp\"\nurl = \"{url}\"\nexchange = \"{exchange}\"\ndeclare = false\n"
        )
    };
    std::fs::write(
        dir.path().join("router.toml"),
        format!(
            "[webhook]\nsecrets = [\"s\"]\n{}{}{}",
            sink("good", &url, "amq.topic"),
            sink("refused", wrong.as_str(), "amq.topic"),
            sink("missing", &url, &missing),
        ),
    )
    .expect("write");
    let out = connect(dir.path()).await;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let line = |start: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in {stdout}"))
            .to_owned()
    };
    let good = line("ok      sink good (amqp): ");
    assert!(
        good.contains("logged in to") && good.contains("exchange \"amq.topic\" exists"),
        "{good}"
    );
    line("FAILED  sink refused (amqp): ");
    assert!(line("FAILED  sink missing (amqp): ").contains(&missing));
    assert!(!stdout.contains("wrong-password"), "{stdout}");
    assert_eq!(
        stdout.lines().last(),
        Some("# 2 of 4 checks failed."),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL: set VYORA_TEST_PG_URL, run with --include-ignored"]
async fn check_config_connect_opens_a_postgres_store_or_says_why_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = common::pg::TestDb::create().await;
    let write = |store: &str| {
        std::fs::write(
            dir.path().join("router.toml"),
            format!("[webhook]\nsecrets = [\"s\"]\n{store}"),
        )
        .expect("write");
    };
    write(&db.store_toml(""));
    let out = connect(dir.path()).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ok      store (postgres): "), "{stdout}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    write(&format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgres://postgres:pg-password@{closed}/x?sslmode=disable\"\n"
    ));
    let out = connect(dir.path()).await;
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAILED  store (postgres): "), "{stdout}");
    assert!(!stdout.contains("pg-password"), "{stdout}");
}

#[test]
fn no_command_prints_a_postgres_password_whatever_is_wrong_with_the_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = [
        "postgres://router@127.0.0.1:1/vyora?password=hunter2&sslmode=bogus",
        "host=127.0.0.1 port=1 password=hunter2 sslmode=bogus",
        "host=127.0.0.1 password='hunter2",
        "postgres://router:hunter2@127.0.0.1:port/vyora",
    ];
    let commands: [&[&str]; 4] = [
        &["serve"],
        &["check-config"],
        &["check-config", "--show-urls"],
        &["deliveries", "list"],
    ];
    for url in refused {
        let store = format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n");
        std::fs::write(
            dir.path().join("router.toml"),
            format!("[webhook]\nsecrets = [\"s\"]\n{store}"),
        )
        .expect("write");
        for args in commands {
            let out = router(dir.path(), &[args, &["-c", "router.toml"]].concat(), &[]);
            let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(!out.status.success(), "{args:?} {url}: {shown}");
            assert!(shown.contains("store.url"), "{args:?} {url}: {shown}");
            assert!(!shown.contains("hunter2"), "{args:?} {url}: {shown}");
        }
    }
    // Read from DATABASE_URL, and as the whole table.
    std::fs::write(
        dir.path().join("router.toml"),
        "[webhook]\nsecrets = [\"s\"]\n[store]\nbackend = \"postgres\"\n",
    )
    .expect("write");
    let out = router(
        dir.path(),
        &["check-config", "-c", "router.toml"],
        &[("DATABASE_URL", refused[1])],
    );
    assert!(
        !text(&out.stderr).contains("hunter2"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(
        dir.path().join("router.toml"),
        "[webhook]\nsecrets = [\"s\"]\nstore = \"postgres://router:hunter2@db/vyora\"\n",
    )
    .expect("write");
    let out = router(dir.path(), &["check-config", "-c", "router.toml"], &[]);
    assert!(!out.status.success());
    assert!(
        !text(&out.stderr).contains("hunter2"),
        "{}",
        text(&out.stderr)
    );

    // A URL that is fine is shown with --show-urls, its password in none of its places.
    for url in [
        "postgres://router@db/vyora?password=hunter2&sslmode=verify-full",
        "host=db user=router password=hunter2 dbname=vyora sslmode=verify-full",
    ] {
        std::fs::write(
            dir.path().join("router.toml"),
            format!(
                "[webhook]\nsecrets = [\"s\"]\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n"
            ),
        )
        .expect("write");
        let out = router(
            dir.path(),
            &["check-config", "--show-urls", "-c", "router.toml"],
            &[],
        );
        let shown = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(shown.contains("sslmode=verify-full"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

/// An address on loopback where nothing listens (bound, then released).
fn closed_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_takes_the_url_and_the_secret_from_the_config_unless_given_on_the_command_line() {
    let running = common::TestRouter::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The router's own config: an unspecified listen address is reached on loopback, and
    // the file's secret wins over the environment's, as it does for the router.
    std::fs::write(
        dir.path().join("router.toml"),
        format!(
            "[server]\nlisten = \"0.0.0.0:{}\"\n[webhook]\nsecrets = [\"{}\"]\n",
            running.addr.port(),
            common::SECRET
        ),
    )
    .expect("write");
    let trigger = |extra: &[&str]| {
        let mut args = vec!["trigger", "call_completed", "--config", "router.toml"];
        args.extend(extra);
        tokio::task::block_in_place(|| {
            router(
                dir.path(),
                &args,
                &[("VYORA_WEBHOOK_SECRET", "not-the-routers-secret")],
            )
        })
    };
    let out = trigger(&[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("call_completed") && stdout.contains("-> 200"),
        "{stdout}"
    );

    let out = trigger(&["--secret", "a-wrong-secret"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("-> 401"),
        "{}",
        text(&out.stdout)
    );

    let closed = closed_addr();
    let out = trigger(&["--url", &format!("http://{closed}/webhook")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&closed.to_string()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn trigger_shows_its_secret_as_optional_and_says_where_one_may_come_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = router(
        dir.path(),
        &["trigger", "--help"],
        &[("VYORA_WEBHOOK_SECRET", "s")],
    );
    let help = text(&out.stdout);
    let usage = help
        .lines()
        .find(|l| l.starts_with("Usage:"))
        .unwrap_or_else(|| panic!("a usage line: {help}"));
    assert!(!usage.contains("--secret"), "{usage}");

    let closed = closed_addr();
    let out = router(
        dir.path(),
        &[
            "trigger",
            "call_started",
            "--url",
            &format!("http://{closed}/"),
        ],
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--secret")
            && stderr.contains("--config")
            && stderr.contains("VYORA_WEBHOOK_SECRET"),
        "{stderr}"
    );
}

/// `healthcheck` against an admin listener at `admin`, killed if it runs past 10 s.
fn healthcheck(admin: SocketAddr) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("router.toml"),
        format!("[admin]\nlisten = \"{admin}\"\n[webhook]\nsecrets = [\"s\"]\n"),
    )
    .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .current_dir(dir.path())
        .args(["healthcheck", "--config", "router.toml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run healthcheck");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("healthcheck against {admin} still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn healthcheck_says_why_it_failed() {
    let closed = closed_addr();
    let out = healthcheck(closed);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "health check failed: connection refused by {closed}: nothing listens there (is the router running, with this admin.listen?)"
        )
    );

    // Connections are taken (the kernel's queue) but never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr");
    let out = healthcheck(addr);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("no answer from {addr} within 2s")),
        "{}",
        text(&out.stderr)
    );

    // Answered, but not 200.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = busy.accept() {
            let mut request = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut request);
            let _ = std::io::Write::write_all(
                &mut conn,
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n",
            );
        }
    });
    let out = healthcheck(addr);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("{addr} answered 503 Service Unavailable")),
        "{}",
        text(&out.stderr)
    );
}

/// Starts `serve` in `cwd` with `args` and JSON logs on port 0, and returns the fields of
/// its "starting" line.
async fn starting_line(cwd: &Path, args: &[&str]) -> serde_json::Value {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .current_dir(cwd)
        .arg("serve")
        .args(args)
        .env("VYORA_WEBHOOK_SECRET", "s")
        .env("VYORA_ROUTER_SERVER__LISTEN", "127.0.0.1:0")
        .env("VYORA_ROUTER_ADMIN__LISTEN", "127.0.0.1:0")
        .env("VYORA_ROUTER_LOG__FORMAT", "json")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the router");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let log: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if log["fields"]["message"] == "starting" {
                return Some(log["fields"].clone());
            }
        }
        None
    })
    .await;
    let _ = child.kill().await;
    found
        .ok()
        .flatten()
        .expect("a \"starting\" line in the log")
}

#[tokio::test]
async fn serve_logs_which_config_and_which_store_it_starts_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("events.db");
    std::fs::write(
        dir.path().join("router.toml"),
        format!("[store]\npath = \"{}\"\n", db.display()),
    )
    .expect("write");
    let fields = starting_line(dir.path(), &["--config", "router.toml"]).await;
    assert_eq!(fields["config"], "router.toml", "{fields}");
    assert_eq!(
        fields["store"],
        format!("SQLite at {}", db.display()).as_str(),
        "{fields}"
    );

    let empty = tempfile::tempdir().expect("tempdir");
    let fields = starting_line(empty.path(), &[]).await;
    assert_eq!(fields["config"], "the built-in default", "{fields}");
    assert_eq!(fields["store"], "SQLite at data/router.db", "{fields}");
}
