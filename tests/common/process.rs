//! The built binary as a child process: start it on a config, find its addresses, read its
//! memory use.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Writes `router.toml` into `dir`: the in-process tests' base config with JSON logs (so
/// the listening address can be read back), plus `extra`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("router.toml");
    let text = format!(
        "{}\n[log]\nlevel = \"vyora_router=info\"\nformat = \"json\"\n{extra}\n",
        super::base_config(dir)
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// A router started from the built binary.
pub struct Spawned {
    pub child: Child,
    /// The public listener (the webhook path).
    pub addr: SocketAddr,
    /// The operator's listener (`/metrics`, `/readyz`).
    pub admin: SocketAddr,
    /// Where its log goes (`router.log` beside the config), JSON line by line.
    pub log: PathBuf,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the router is running")
    }
}

/// Starts the binary and returns it with the address it reports listening on.
pub async fn spawn_router(config: &Path) -> (Child, SocketAddr) {
    let spawned = start_router(config).await;
    (spawned.child, spawned.addr)
}

/// Starts the binary on `config` (which must ask for JSON logs) and waits until it reports
/// both listeners; its log is copied to `router.log` beside the config.
pub async fn start_router(config: &Path) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn router");
    let log = config
        .parent()
        .expect("the config is in a directory")
        .join("router.log");
    let mut copy = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("open the router's log");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addrs = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut public, mut admin) = (None, None);
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(copy, "{line}");
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let addr = || {
                log["fields"]["addr"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            match log["fields"]["message"].as_str() {
                Some("listening") => public = addr(),
                Some("admin listening") => admin = addr(),
                _ => {}
            }
            if let (Some(public), Some(admin)) = (public, admin) {
                return Some((public, admin));
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let (addr, admin) = addrs.expect("the router reports its addresses");
    // Keep draining the log so the router never waits on a full pipe.
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(copy, "{line}");
        }
    });
    Spawned {
        child,
        addr,
        admin,
        log,
    }
}

/// Resident memory of a process, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
