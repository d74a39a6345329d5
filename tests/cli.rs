//! The command line of the built binary: config checking, environment overrides and the
//! built-in default.

use std::path::Path;
use std::process::{Command, Output};

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
