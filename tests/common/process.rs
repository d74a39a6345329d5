//! The built binary as a child process: start it on a config, find its address, read its
//! memory use.

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

/// Starts the binary and returns it with the address it reports listening on.
pub async fn spawn_router(config: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vyora-router"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn router");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let Ok(log) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if log["fields"]["message"] == "listening" {
                return log["fields"]["addr"].as_str().and_then(|a| a.parse().ok());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the router reports its address");
    // Keep draining the log so the router never waits on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
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
