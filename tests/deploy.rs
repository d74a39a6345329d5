//! The deployment examples: the router configs that the Kubernetes manifests
//! (deploy/kubernetes/*.yaml) and docker-compose.postgres.yml carry pass the built binary's
//! `check-config` with the environment those deployments give it, and the manifests keep
//! the rules their comments give (probes on /healthz, no admin port in a Service and a
//! NetworkPolicy admitting only Prometheus to it, one SQLite writer, a grace period above
//! the drain). `.ci/run` validates the same files
//! against the Kubernetes and compose-spec schemas.

use std::path::Path;
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `check-config` on `config` with exactly `env`: nothing of this process's environment
/// (a stray DATABASE_URL or VYORA_ROUTER_* here) may make a config pass.
fn check_config(config: &str, env: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("router.toml"), config).expect("write");
    Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .current_dir(dir.path())
        .args(["check-config", "--config", "router.toml"])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run vyora-router")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The YAML block scalar after the first line that reads `key` (e.g. `router.toml: |`),
/// with its indentation removed.
fn block_after(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != key);
    let parent = indent(lines.next()?);
    let mut lines = lines.peekable();
    let first = lines.peek()?;
    let depth = indent(first);
    assert!(depth > parent, "nothing indented under {key}");
    let mut block = String::new();
    for line in lines.take_while(|l| l.trim().is_empty() || indent(l) >= depth) {
        block.push_str(line.get(depth..).unwrap_or(""));
        block.push('\n');
    }
    Some(block)
}

/// Every block under `key` in `yaml`.
fn blocks_after(yaml: &str, key: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = yaml;
    while let Some(at) = rest.lines().position(|l| l.trim() == key) {
        let tail: String = rest.lines().skip(at).map(|l| format!("{l}\n")).collect();
        found.push(block_after(&tail, key).expect("a block"));
        let skip: usize = rest.lines().take(at + 1).map(|l| l.len() + 1).sum();
        rest = &rest[skip.min(rest.len())..];
    }
    found
}

/// The YAML documents of a manifest, without comment lines.
fn documents(yaml: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else if !line.trim_start().starts_with('#') {
            let doc = docs.last_mut().expect("a document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

fn kind(doc: &str) -> &str {
    doc.lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or("")
        .trim()
}

/// `ENV` lines of the Dockerfile: what every container of the image starts with.
fn image_env() -> Vec<(String, String)> {
    read(&root().join("Dockerfile"))
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|vars| vars.split_whitespace())
        .filter_map(|var| var.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What a pod's env gives the router: `value:` as written, a `valueFrom:` (a Secret) as an
/// operator would fill it.
fn manifest_env(doc: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = doc.lines().map(str::trim).collect();
    let mut env = Vec::new();
    for pair in lines.windows(2) {
        let Some(name) = pair[0].strip_prefix("- name: ") else {
            continue;
        };
        if let Some(value) = pair[1].strip_prefix("value: ") {
            env.push((name.to_owned(), value.trim_matches('"').to_owned()));
        } else if pair[1] == "valueFrom:" {
            let secret = match name {
                "DATABASE_URL" => {
                    "postgres://vyora:db-password@db.example.com:5432/vyora?sslmode=require"
                }
                "VYORA_WEBHOOK_SECRET" => "whsec-new,whsec-old",
                _ => "from-a-secret",
            };
            env.push((name.to_owned(), secret.to_owned()));
        }
    }
    env
}

/// `20s`, `1m` as check-config prints durations, in seconds.
fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.len() - 1);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("a duration: {duration}"));
    match unit {
        "s" => n,
        "m" => n * 60,
        _ => panic!("a duration in s or m: {duration}"),
    }
}

/// The value of `key = ...` in check-config's output (the first such key).
fn effective<'a>(config: &'a str, key: &str) -> &'a str {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("{key} in\n{config}"))
        .trim_matches('"')
}

fn yaml_value<'a>(doc: &'a str, key: &str) -> Option<&'a str> {
    doc.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim_matches('"'))
}

fn manifests() -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    found.sort();
    assert!(found.len() >= 2, "{found:?}");
    found
}

#[test]
fn the_kubernetes_configs_pass_check_config_with_the_environment_their_pods_get() {
    for path in manifests() {
        let name = path.display();
        let manifest = read(&path);
        let docs = documents(&manifest);
        let configs = blocks_after(&manifest, "router.toml: |");
        assert_eq!(configs.len(), 1, "{name}: one router.toml per manifest");
        let deployment = docs
            .iter()
            .find(|d| kind(d) == "Deployment")
            .unwrap_or_else(|| panic!("{name}: a Deployment"));
        let mut env = image_env();
        env.extend(manifest_env(deployment));
        assert!(
            env.iter().any(|(k, _)| k == "VYORA_WEBHOOK_SECRET"),
            "{name}: the webhook secret comes from a Secret: {env:?}"
        );
        let out = check_config(&configs[0], &env);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let config = text(&out.stdout);

        // Probes and Prometheus reach the admin listener on the port the pod names.
        let admin = config.split("[admin]").nth(1).expect("[admin]");
        assert_eq!(effective(admin, "listen"), "0.0.0.0:9464", "{name}");
        assert_eq!(yaml_value(deployment, "prometheus.io/port"), Some("9464"));
        assert_eq!(
            yaml_value(deployment, "prometheus.io/path"),
            Some("/metrics")
        );
        assert!(
            deployment.contains("containerPort: 9464")
                && deployment.contains("containerPort: 8080"),
            "{name}"
        );

        // The router drains for up to shutdown_timeout twice (requests, then deliveries),
        // after the preStop pause: the kubelet must not kill it before.
        let drain = seconds(effective(&config, "shutdown_timeout"));
        let pause: u64 = block_after(deployment, "preStop:")
            .and_then(|hook| yaml_value(&hook, "seconds").map(|s| s.parse().expect("seconds")))
            .unwrap_or(0);
        let grace: u64 = yaml_value(deployment, "terminationGracePeriodSeconds")
            .expect("terminationGracePeriodSeconds")
            .parse()
            .expect("a number");
        assert!(
            grace > 2 * drain + pause,
            "{name}: grace {grace}s, drain {drain}s, pause {pause}s"
        );

        let strategy = block_after(deployment, "strategy:").expect("strategy");
        let replicas: u32 = yaml_value(deployment, "replicas")
            .expect("replicas")
            .parse()
            .expect("a number");
        match effective(&config, "backend") {
            "sqlite" => {
                assert_eq!(replicas, 1, "{name}: one writer per SQLite file");
                assert_eq!(yaml_value(&strategy, "type"), Some("Recreate"), "{name}");
                assert!(
                    effective(&config, "path").starts_with("/data/")
                        && deployment.contains("mountPath: /data")
                        && deployment.contains("claimName:"),
                    "{name}: the database on the PersistentVolumeClaim"
                );
            }
            "postgres" => {
                assert!(replicas > 1, "{name}");
                assert_eq!(
                    yaml_value(&strategy, "type"),
                    Some("RollingUpdate"),
                    "{name}"
                );
                assert!(
                    !config.contains("type = \"file\""),
                    "{name}: a file sink would hold only one replica's deliveries"
                );
                assert!(
                    docs.iter().any(|d| kind(d) == "PodDisruptionBudget"),
                    "{name}"
                );
            }
            other => panic!("{name}: backend {other}"),
        }
    }
}

#[test]
fn the_manifests_probe_health_not_readiness_and_expose_no_admin_port() {
    for path in manifests() {
        let name = path.display();
        for doc in documents(&read(&path)) {
            assert!(
                !doc.contains("/readyz"),
                "{name}: /readyz fails with a sink, which must not take pods out of rotation:\n{doc}"
            );
            match kind(&doc) {
                "Deployment" => {
                    for probe in ["startupProbe:", "livenessProbe:", "readinessProbe:"] {
                        let block =
                            block_after(&doc, probe).unwrap_or_else(|| panic!("{name}: {probe}"));
                        assert!(
                            block.contains("path: /healthz") && block.contains("port: admin"),
                            "{name}: {probe}\n{block}"
                        );
                    }
                    // A Service named vyora-router would put VYORA_ROUTER_SERVICE_HOST and
                    // the like into the environment, which the router reads as config keys.
                    assert!(doc.contains("enableServiceLinks: false"), "{name}");
                    for setting in [
                        "runAsNonRoot: true",
                        "readOnlyRootFilesystem: true",
                        "allowPrivilegeEscalation: false",
                        "drop: [\"ALL\"]",
                        "secretKeyRef:",
                    ] {
                        assert!(doc.contains(setting), "{name}: {setting}");
                    }
                }
                "Service" => {
                    assert!(
                        !doc.contains("9464") && !doc.contains("admin"),
                        "{name}: the admin listener in a Service:\n{doc}"
                    );
                    assert!(
                        !yaml_value(&doc, "name")
                            .unwrap_or("")
                            .starts_with("vyora-router"),
                        "{name}: a Service named vyora-router* injects VYORA_ROUTER_* variables"
                    );
                }
                _ => {}
            }
        }
    }
}

/// `${NAME}`, `${NAME:?message}`, `${NAME:-default}` and `$$` as compose reads them.
fn interpolate(text: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after.find('}').expect("a closing brace");
            let expr = &after[..end];
            let (var, default) = match expr.split_once(":-") {
                Some((var, default)) => (var, Some(default)),
                None => (expr.split(":?").next().unwrap_or(expr), None),
            };
            match vars.iter().find(|(k, _)| *k == var) {
                Some((_, value)) => out.push_str(value),
                None => out.push_str(default.unwrap_or_else(|| panic!("${{{var}}} is unset"))),
            }
            rest = &after[end + 1..];
        } else {
            panic!("a bare $ that compose would read as a variable: {rest}");
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn the_postgres_compose_example_is_valid_and_publishes_no_database_or_broker_port() {
    let compose = read(&root().join("docker-compose.postgres.yml"));
    let vars = [
        ("VYORA_WEBHOOK_SECRET", "whsec"),
        ("RABBITMQ_DEFAULT_USER", "vyora"),
        ("RABBITMQ_DEFAULT_PASS", "broker-password"),
        ("POSTGRES_PASSWORD", "pg-password"),
    ];
    let router_config = compose
        .split_once("\n  router-config:\n")
        .map(|(_, rest)| rest)
        .expect("configs: router-config:");
    let config = interpolate(
        &block_after(router_config, "content: |").expect("router-config: content: |"),
        &vars,
    );
    assert!(
        config.contains("amqp://vyora:broker-password@rabbitmq:5672/"),
        "the AMQP URL is built from RABBITMQ_DEFAULT_USER and _PASS: {config}"
    );

    let router = compose
        .split_once("\n  router:\n")
        .map(|(_, rest)| rest)
        .expect("services: router:");
    let mut env = image_env();
    for line in block_after(router, "environment:")
        .expect("the router's environment")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        let (key, value) = line.split_once(": ").expect("KEY: value");
        env.push((key.to_owned(), interpolate(value, &vars)));
    }
    let database_url = &env
        .iter()
        .find(|(k, _)| k == "DATABASE_URL")
        .expect("DATABASE_URL")
        .1;
    assert!(
        database_url.starts_with("postgres://vyora:pg-password@postgres:5432/vyora"),
        "the database URL takes POSTGRES_PASSWORD: {database_url}"
    );
    assert!(compose.contains("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?"));

    let out = check_config(&config, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let effective_config = text(&out.stdout);
    assert_eq!(effective(&effective_config, "backend"), "postgres");
    assert!(
        !effective_config.contains("type = \"file\""),
        "{effective_config}"
    );

    // Only the proxy's webhook port faces the network; the database, the broker and the
    // admin listeners are on this host's loopback at most. Port mappings are quoted (YAML 1.1 reads 22:22 as a number), in
    // block or flow lists alike.
    let services = compose
        .split_once("\nconfigs:\n")
        .map_or(compose.as_str(), |(services, _)| services);
    let mappings: Vec<&str> = services
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split('"').skip(1).step_by(2))
        .filter(|s| {
            s.contains(':')
                && s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_digit() || ".:-/tcpud".contains(c))
        })
        .collect();
    assert!(mappings.contains(&"8080:8080"), "{mappings:?}");
    for mapping in mappings {
        assert!(
            mapping.starts_with("127.0.0.1:") || mapping == "8080:8080",
            "{mapping} is published to the network"
        );
    }
    assert!(!compose.contains("guest"), "default credentials");
}

/// The ingress rules of a NetworkPolicy document: the items of its `ingress:` list, each
/// as its lines, trimmed.
fn ingress_rules(policy: &str) -> Vec<String> {
    let Some(list) = block_after(policy, "ingress:") else {
        return Vec::new();
    };
    let mut rules: Vec<String> = Vec::new();
    for line in list.lines() {
        // block_after removed the list's indentation: its items start at column 0.
        if line.starts_with("- ") {
            rules.push(String::new());
        }
        if let Some(rule) = rules.last_mut() {
            rule.push_str(line.trim());
            rule.push('\n');
        }
    }
    rules
}

#[test]
fn every_manifest_admits_only_prometheus_to_the_admin_port_of_its_pods() {
    for path in manifests() {
        let name = path.display();
        let docs = documents(&read(&path));
        let deployment = docs
            .iter()
            .find(|d| kind(d) == "Deployment")
            .unwrap_or_else(|| panic!("{name}: a Deployment"));
        let pods = block_after(deployment, "template:")
            .and_then(|template| yaml_value(&template, "app.kubernetes.io/name").map(str::to_owned))
            .unwrap_or_else(|| panic!("{name}: the pods' app.kubernetes.io/name"));
        let policy = docs
            .iter()
            .find(|d| kind(d) == "NetworkPolicy")
            .unwrap_or_else(|| {
                panic!("{name}: no NetworkPolicy keeps other pods off the admin port")
            });
        let selector = block_after(policy, "podSelector:").expect("podSelector");
        assert_eq!(
            yaml_value(&selector, "app.kubernetes.io/name"),
            Some(pods.as_str()),
            "{name}: the policy selects the router's pods"
        );
        assert!(policy.contains("policyTypes: [\"Ingress\"]"), "{name}");
        let rules = ingress_rules(policy);
        assert!(
            rules
                .iter()
                .any(|r| r.contains("port: webhook") && !r.contains("from:")),
            "{name}: the webhook port is open to the ingress controller: {rules:?}"
        );
        for rule in rules
            .iter()
            .filter(|r| r.contains("port: admin") || r.contains("9464"))
        {
            assert!(
                rule.contains("from:") && rule.contains("namespaceSelector:"),
                "{name}: the admin port is open beyond Prometheus' namespace: {rule}"
            );
        }
        assert!(
            rules.iter().any(|r| r.contains("port: admin")),
            "{name}: Prometheus is admitted to the admin port: {rules:?}"
        );
    }
}
