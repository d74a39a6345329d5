//! The file sink's settings: its one key as written ([`FileOptions`]) and the checked
//! [`FileSinkConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::error::Invalid;

/// A `file` sink's own keys, beside those every sink has.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileOptions {
    path: String,
}

#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    /// The JSON Lines file, created (with its directory) if missing.
    pub path: PathBuf,
}

impl FileOptions {
    /// Checks every key; a refusal names the key below the sink's table.
    pub fn validate(self) -> Result<FileSinkConfig, Invalid> {
        if self.path.is_empty() {
            return Err(Invalid::new(&self.path, "must name a file").under("path"));
        }
        Ok(FileSinkConfig {
            path: PathBuf::from(self.path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_path_is_refused_by_its_key() {
        let e = FileOptions {
            path: String::new(),
        }
        .validate()
        .expect_err("empty");
        assert_eq!(e.key.as_deref(), Some("path"));
    }
}
