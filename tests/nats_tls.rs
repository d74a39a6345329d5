//! The NATS sink over TLS (`tls://`): a private `nats-server` with a certificate from a
//! test CA, reached through rustls when `ca_file` names the CA and refused when it does not.

mod common;

use std::time::Duration;

use common::nats::PrivateServer;
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

/// A test CA (`ca.pem`) and a certificate it signed for 127.0.0.1 (`server.pem`,
/// `server.key`), in `dir`.
fn certificates(d: &std::path::Path) {
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
}

#[tokio::test]
#[ignore = "needs nats-server and openssl on the PATH, and VYORA_TEST_NATS_URL set, run with --include-ignored"]
async fn a_tls_url_reaches_a_server_whose_ca_is_the_ca_file_and_refuses_one_whose_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    certificates(d);
    let server = PrivateServer::start(
        d,
        &["--tls", "--tlscert", "server.pem", "--tlskey", "server.key"],
    )
    .await;
    let config = |ca_file: bool| {
        let path = d.join(format!("router-{ca_file}.toml"));
        let ca = if ca_file {
            format!("ca_file = \"{}\"\n", d.join("ca.pem").display())
        } else {
            String::new()
        };
        std::fs::write(
            &path,
            format!(
                "{}\n[[sinks]]\nname = \"tls\"\ntype = \"nats\"\nurl = \"tls://127.0.0.1:{}\"\nstream = \"TLS\"\ndeclare = true\n{ca}",
                base_config(d),
                server.port
            ),
        )
        .expect("write the config");
        path
    };
    let check = |ca_file: bool| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vyora-router"))
            .args(["check-config", "--connect", "--config"])
            .arg(config(ca_file))
            .output()
            .expect("check-config runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = Instant::now() + WAIT;
    let (ok, trusted) = loop {
        let (ok, out) = check(true);
        if ok || Instant::now() > deadline {
            break (ok, out);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (refused, untrusted) = check(false);
    assert!(ok, "{trusted}");
    assert!(trusted.contains("connected to NATS"), "{trusted}");
    assert!(!refused, "{untrusted}");
    assert!(untrusted.contains("FAILED  sink tls (nats)"), "{untrusted}");
}
