//! `check-config --connect` for a file sink: can its file be appended to?

use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::FileSinkConfig;
use crate::sinks::{BoxFuture, Probe};

impl Probe for FileSinkConfig {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move { writable(&self.path) })
    }
}

/// Whether a file at `path` can be appended to, as the file sink (or the SQLite store)
/// would: missing directories are created (0700) as at start; an existing file is opened
/// for appending, a missing one is tried with a scratch file beside it, removed at once,
/// so that the check leaves no file of its own.
pub fn writable(path: &Path) -> Result<String, String> {
    let shown = path.display();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the directory {}: {e}", dir.display()))?;
    }
    if path.exists() {
        OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("cannot open {shown} for appending: {e}"))?;
        return Ok(format!("{shown} can be appended to"));
    }
    let dir = dir.unwrap_or(Path::new("."));
    let scratch = dir.join(format!(".vyora-router-check-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&scratch)
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
    // Created a moment ago by us; should removing it fail, it is empty and named as ours.
    let _ = std::fs::remove_file(&scratch);
    Ok(format!(
        "{shown} does not exist yet; its directory is writable"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_sink_probe_creates_the_directory_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/events.jsonl");
        let config = FileSinkConfig { path: path.clone() };
        let found = config.probe().await.expect("writable");
        assert!(found.contains("does not exist yet"), "{found}");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("created")
            .collect();
        assert!(left.is_empty(), "{left:?}");

        std::fs::write(&path, b"").expect("write");
        let found = config.probe().await.expect("writable");
        assert!(found.contains("can be appended to"), "{found}");
    }

    #[tokio::test]
    async fn a_file_sink_probe_fails_where_its_directory_cannot_be() {
        let dir = tempfile::tempdir().expect("tempdir");
        let in_the_way = dir.path().join("not-a-directory");
        std::fs::write(&in_the_way, b"").expect("write");
        let config = FileSinkConfig {
            path: in_the_way.join("events.jsonl"),
        };
        let why = config
            .probe()
            .await
            .expect_err("a file where the directory goes");
        assert!(why.contains("cannot create the directory"), "{why}");
    }
}
