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

#[test]
fn the_example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for config in ["config/router.toml", "deploy/router.toml"] {
        let out = router(
            root,
            &["check-config", "--config", config],
            &[("VYORA_WEBHOOK_SECRET", "s")],
        );
        assert!(out.status.success(), "{config}: {}", text(&out.stderr));
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
