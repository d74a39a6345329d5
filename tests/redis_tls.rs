//! The Redis sink over TLS (`rediss://`): a private `redis-server` with a certificate from
//! a test CA, reached through rustls when the CA is trusted (`SSL_CERT_FILE`) and refused
//! when it is not.

mod common;

use std::time::Duration;

use common::*;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

#[tokio::test]
#[ignore = "needs redis-server (built with TLS) and openssl on the PATH, and VYORA_TEST_REDIS_URL set, run with --include-ignored"]
async fn a_rediss_url_reaches_a_tls_server_whose_ca_is_trusted_and_refuses_one_whose_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=vyora test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let config = d.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[sinks]]\nname = \"tls\"\ntype = \"redis\"\nurl = \"rediss://127.0.0.1:{port}\"\n",
            base_config(d)
        ),
    )
    .expect("write the config");
    let check = |trusted: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"));
        command
            .args(["check-config", "--connect", "--config"])
            .arg(&config);
        if trusted {
            command.env("SSL_CERT_FILE", d.join("ca.pem"));
        }
        let out = command.output().expect("check-config runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // The server may take a moment to listen.
    let deadline = Instant::now() + WAIT;
    let (ok, trusted) = loop {
        let (ok, out) = check(true);
        if ok || Instant::now() > deadline {
            break (ok, out);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (refused, untrusted) = check(false);
    let _ = server.kill();
    let _ = server.wait();
    assert!(ok, "{trusted}");
    assert!(trusted.contains("PING answered by Redis"), "{trusted}");
    assert!(!refused, "{untrusted}");
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
}
