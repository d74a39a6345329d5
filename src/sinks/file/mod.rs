//! The file sink: appends one JSON line per event and fsyncs before reporting success.
//!
//! A crash can leave the last line half-written; it was never reported delivered, so on
//! open the torn tail is cut off (and the event is written again), keeping the file valid
//! JSON Lines. Only a tail that looks like one of our lines is cut: a path pointing at some
//! other file is refused, never truncated, and so is a symlink. The file is the owner's
//! alone (0600). A file moved away by log rotation is noticed and reopened at its path.
//! Its settings are in `config`.

mod config;
mod probe;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde_json::value::RawValue;

pub use config::{FileOptions, FileSinkConfig};
pub use probe::writable;

use super::{BoxFuture, BuildError, Sink, SinkError};
use crate::event::Delivery;

/// Lines appended (and fsynced) together.
const BATCH: usize = 256;

pub struct FileSink {
    name: String,
    path: PathBuf,
    state: Arc<Mutex<Option<File>>>,
}

/// One line of the file.
#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    event: &'a str,
    call_id: Option<&'a str>,
    source: &'a str,
    received_at: String,
    payload: &'a RawValue,
}

impl FileSink {
    /// Opens (creating the file and its directory) and repairs a torn last line, so a
    /// path we cannot write is reported at start rather than at the first event.
    pub fn open(name: &str, path: &Path) -> Result<FileSink, BuildError> {
        let file = open_repaired(path).map_err(|source| BuildError::File {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        Ok(FileSink {
            name: name.to_owned(),
            path: path.to_owned(),
            state: Arc::new(Mutex::new(Some(file))),
        })
    }
}

/// The JSON line for one delivery, newline included.
fn line(d: &Delivery) -> Result<Vec<u8>, SinkError> {
    // Valid JSON never has a raw line break inside a string, so every CR or LF in the
    // payload is insignificant whitespace: blanking them keeps the exact document on one
    // line without re-serializing it (which could reorder keys or round numbers).
    let text = String::from_utf8_lossy(&d.payload).replace(['\n', '\r'], " ");
    let payload = RawValue::from_string(text).map_err(|e| SinkError::NotJson(Arc::new(e)))?;
    let mut out = serde_json::to_vec(&Line {
        id: &d.dedup_key,
        event: &d.event,
        call_id: d.call_id.as_deref(),
        source: d.source.as_str(),
        received_at: humantime::format_rfc3339_millis(d.received_at).to_string(),
        payload: &payload,
    })
    .map_err(|e| SinkError::NotJson(Arc::new(e)))?;
    out.push(b'\n');
    Ok(out)
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn batch_size(&self) -> usize {
        BATCH
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let mut results: Vec<Result<(), SinkError>> = Vec::with_capacity(batch.len());
            let mut buf = Vec::new();
            for d in batch {
                match line(d) {
                    Ok(l) => {
                        buf.extend_from_slice(&l);
                        results.push(Ok(()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            if buf.is_empty() {
                return results;
            }
            let state = Arc::clone(&self.state);
            let path = self.path.clone();
            let written = tokio::task::spawn_blocking(move || {
                let mut file = state.lock().unwrap_or_else(PoisonError::into_inner);
                append(&mut file, &path, &buf)
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
            if let Err(e) = written {
                let e = Arc::new(e);
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(SinkError::FileIo {
                        path: self.path.clone(),
                        source: Arc::clone(&e),
                    });
                }
            }
            results
        })
    }
}

/// Appends `buf` and fsyncs. On failure, cuts the file back to where it was, so a partial
/// batch leaves no torn line, and forgets the handle so the next attempt reopens.
fn append(slot: &mut Option<File>, path: &Path, buf: &[u8]) -> io::Result<()> {
    if let Some(file) = slot.as_ref()
        && !still_at_path(file, path)
    {
        tracing::info!(path = %path.display(), "the sink file was moved or replaced; reopening");
        *slot = None;
    }
    let file = match slot {
        Some(f) => f,
        None => slot.insert(open_repaired(path)?),
    };
    let before = file.seek(SeekFrom::End(0))?;
    let result = file.write_all(buf).and_then(|()| file.sync_data());
    if result.is_err() {
        if let Err(e) = file.set_len(before) {
            tracing::warn!(path = %path.display(), error = %e, "could not cut back a failed append; it is repaired on reopen");
        }
        *slot = None;
    }
    result
}

fn still_at_path(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(at_path)) => open.dev() == at_path.dev() && open.ino() == at_path.ino(),
        _ => false,
    }
}

/// What every line we write starts with (`Line` serializes `id` first), and so what a
/// line torn by a crash starts with.
const LINE_START: &[u8] = b"{\"id\":";

fn open_repaired(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Only the directories created here get 0700; an existing parent keeps its mode.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // The lines hold transcripts and phone numbers: 0600. O_NOFOLLOW: a symlink planted at
    // the path must not make us append to, or cut, some other file.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                e.kind(),
                "a symbolic link, which the file sink does not follow",
            ),
            _ => e,
        })?;
    let meta = file.metadata()?;
    let len = meta.len();
    let complete = complete_len(&mut file, len)?;
    if complete < len {
        if !is_torn_line(&mut file, complete, len)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a JSON Lines file written by vyora-router; refusing to truncate it",
            ));
        }
        tracing::warn!(
            path = %path.display(),
            bytes = len - complete,
            "cut off a torn last line left by a crash; its event will be written again"
        );
        file.set_len(complete)?;
        file.sync_data()?;
    }
    restrict_to_owner(&file, &meta, path)?;
    file.seek(SeekFrom::End(0))?;
    Ok(file)
}

/// Narrows a file created before modes were set (or by someone else) to its owner.
fn restrict_to_owner(file: &File, meta: &std::fs::Metadata, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if meta.is_file() && mode & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
        tracing::info!(
            path = %path.display(),
            was = format!("{:o}", mode & 0o777),
            "restricted the sink file to its owner"
        );
    }
    Ok(())
}

/// Whether the bytes after the last newline (from `complete` to `len`) are what a crash
/// in the middle of an append leaves: the start of one of our lines, after a complete line
/// of ours if there is any. Anything else is not our file, and cutting it would lose data.
fn is_torn_line(file: &mut File, complete: u64, len: u64) -> io::Result<bool> {
    let starts_like_ours = |file: &mut File, at: u64, available: u64| -> io::Result<bool> {
        let mut head = [0u8; LINE_START.len()];
        let n = usize::try_from(available).map_or(head.len(), |a| a.min(head.len()));
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut head[..n])?;
        // A tail shorter than LINE_START must be a prefix of it.
        Ok(n > 0 && LINE_START.starts_with(&head[..n]))
    };
    if !starts_like_ours(file, complete, len - complete)? {
        return Ok(false);
    }
    if complete == 0 {
        return Ok(true);
    }
    let last = complete_len(file, complete - 1)?;
    let last_len = complete - 1 - last;
    if last_len < LINE_START.len() as u64 || !starts_like_ours(file, last, last_len)? {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(last))?;
    let line = io::BufReader::new(Read::take(&mut *file, last_len));
    Ok(serde_json::from_reader::<_, serde::de::IgnoredAny>(line).is_ok())
}

/// The length of the file up to and including its last newline.
fn complete_len(file: &mut File, len: u64) -> io::Result<u64> {
    let mut chunk = [0u8; 8192];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(pos) = part.iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;

    use super::*;
    use crate::event::Source;

    fn delivery(id: i64, payload: &str) -> Delivery {
        Delivery {
            id: crate::event::DeliveryId::row(id),
            attempts: 0,
            event: "call_completed".into(),
            call_id: Some(format!("c{id}")),
            dedup_key: format!("c{id}:call_completed"),
            source: Source::Webhook,
            received_at: UNIX_EPOCH + Duration::from_millis(1_780_000_000_123),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[tokio::test]
    async fn each_event_becomes_one_json_line_with_the_original_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out/events.jsonl");
        let sink = FileSink::open("archive", &path).expect("opens");
        let pretty =
            "{\n  \"event\": \"call_completed\",\n  \"call_id\": \"c1\",\n  \"n\": 1.50\n}";
        let results = sink
            .deliver(&[delivery(1, pretty), delivery(2, "{\"a\":[1,2]}")])
            .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let text = std::fs::read_to_string(&path).expect("file written");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], "c1:call_completed");
        assert_eq!(lines[0]["call_id"], "c1");
        assert_eq!(lines[0]["source"], "webhook");
        assert_eq!(lines[0]["received_at"], "2026-05-28T20:26:40.123Z");
        assert_eq!(lines[0]["payload"]["call_id"], "c1");
        assert!(
            text.contains("\"n\": 1.50"),
            "numbers keep their exact text: {text}"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c\",\"pay")
            .expect("write");
        FileSink::open("archive", &path).expect("opens");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
    }

    #[test]
    fn a_line_of_ours_torn_at_any_byte_is_cut_off_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let first = line(&delivery(1, "{\"call_id\":\"c1\"}")).expect("line");
        let torn = line(&delivery(2, "{\"call_id\":\"c2\"}")).expect("line");
        for cut in 1..torn.len() {
            std::fs::write(&path, [&first[..], &torn[..cut]].concat()).expect("write");
            FileSink::open("archive", &path).expect("opens");
            assert_eq!(std::fs::read(&path).expect("read"), first, "cut at {cut}");
        }
    }

    #[test]
    fn a_file_that_is_only_a_torn_line_is_emptied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"id\":\"c1:call_completed\",\"eve").expect("write");
        FileSink::open("archive", &path).expect("opens");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
    }

    #[test]
    fn an_empty_file_is_opened_as_it_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "").expect("write");
        FileSink::open("archive", &path).expect("opens");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
    }

    /// Opening fails naming the path, and the file keeps every byte.
    fn assert_refused_and_untouched(content: &[u8]) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, content).expect("write");
        let mode_before = mode(&path);
        let Err(e) = FileSink::open("archive", &path) else {
            panic!("opened a file that is not JSON Lines: {content:?}");
        };
        let e = e.to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("not a JSON Lines file"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), content);
        assert_eq!(mode(&path), mode_before, "a refused file keeps its mode");
    }

    #[test]
    fn a_file_without_a_line_break_that_is_not_a_torn_line_is_refused_and_kept() {
        assert_refused_and_untouched("x".repeat(20_000).as_bytes());
    }

    #[test]
    fn a_text_file_with_an_unfinished_last_line_is_refused_and_kept() {
        assert_refused_and_untouched(b"dear diary\ntoday I configured the wrong path");
        assert_refused_and_untouched(b"dear diary\n{\"id\":\"c\",\"pay");
        assert_refused_and_untouched(b"{\"id\":\"a\"}\nnot a line of ours");
    }

    #[test]
    fn a_symlink_is_refused_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "keep\n").expect("write");
        let path = dir.path().join("events.jsonl");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        let Err(e) = FileSink::open("archive", &path) else {
            panic!("opened a symlink");
        };
        let e = e.to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("symbolic link"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "keep\n");
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_file_and_the_directories_created_for_it_are_private_to_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out/archive/events.jsonl");
        let sink = FileSink::open("archive", &path).expect("opens");
        assert!(sink.deliver(&[delivery(1, "{}")]).await[0].is_ok());
        assert_eq!(mode(&path), 0o600);
        for created in ["out", "out/archive"] {
            assert_eq!(mode(&dir.path().join(created)), 0o700, "{created}");
        }
    }

    #[test]
    fn an_existing_file_readable_by_others_is_restricted_on_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"id\":\"a\"}\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        FileSink::open("archive", &path).expect("opens");
        assert_eq!(mode(&path), 0o600);
    }

    #[tokio::test]
    async fn a_rotated_file_is_reopened_at_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let sink = FileSink::open("archive", &path).expect("opens");
        assert!(sink.deliver(&[delivery(1, "{}")]).await[0].is_ok());
        std::fs::rename(&path, dir.path().join("events.jsonl.1")).expect("rotate");
        assert!(sink.deliver(&[delivery(2, "{}")]).await[0].is_ok());
        let text = std::fs::read_to_string(&path).expect("new file");
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("c2:call_completed"));
    }

    #[tokio::test]
    async fn a_write_that_fails_is_reported_for_every_event_of_the_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let sink = FileSink::open("archive", &path).expect("opens");
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("a directory where the file was");
        let results = sink.deliver(&[delivery(1, "{}"), delivery(2, "{}")]).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(SinkError::FileIo { .. }))),
            "{results:?}"
        );
    }
}
