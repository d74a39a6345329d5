//! The JetStream stream behind the sink's subject: found (or, with `declare`, created) on
//! every connect, so that a subject no stream captures is refused at start and reported
//! by readiness instead of failing each publish.

use async_nats::jetstream::{self, stream};

use super::NatsSinkConfig;

/// Why no stream takes the sink's messages.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "no stream captures subject {filter:?} (subject = {template:?}): create one, or set stream = \"<name>\" and declare = true"
    )]
    NoneCaptures { filter: String, template: String },
    #[error(
        "stream = {stream:?} does not exist: create it capturing {filter:?}, or set declare = true"
    )]
    Missing { stream: String, filter: String },
    #[error(
        "stream = {stream:?} does not capture subject {filter:?}: its subjects are {subjects:?}"
    )]
    NotCapturing {
        stream: String,
        filter: String,
        subjects: Vec<String>,
    },
    /// JetStream did not answer as asked (not enabled, no permission, a timeout).
    #[error("cannot look up the stream: {0}")]
    Request(String),
}

impl StreamError {
    /// Whether the server answered and the answer is that no stream fits, as opposed to
    /// a question that went unanswered.
    pub fn is_answer(&self) -> bool {
        !matches!(self, StreamError::Request(_))
    }
}

/// The name of the stream that captures every subject the sink publishes to.
pub async fn find(js: &jetstream::Context, config: &NatsSinkConfig) -> Result<String, StreamError> {
    let template = &config.subject_template;
    let filter = config.subject.subject_filter();
    let found = match (&config.stream, config.declare) {
        (Some(name), true) => js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![filter.clone()],
                duplicate_window: config.duplicate_window,
                storage: stream::StorageType::File,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| StreamError::Request(e.to_string()))?,
        (Some(name), false) => match js.get_stream(name).await {
            Ok(found) => found,
            Err(e) if not_found(&e) => {
                return Err(StreamError::Missing {
                    stream: name.clone(),
                    filter,
                });
            }
            Err(e) => return Err(StreamError::Request(e.to_string())),
        },
        (None, _) => {
            let name = match js.stream_by_subject(filter.as_str()).await {
                Ok(name) => name,
                Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    return Err(StreamError::NoneCaptures {
                        filter,
                        template: template.to_owned(),
                    });
                }
                Err(e) => return Err(StreamError::Request(e.to_string())),
            };
            js.get_stream(&name)
                .await
                .map_err(|e| StreamError::Request(e.to_string()))?
        }
    };
    let info = found.cached_info();
    if info.config.subjects.iter().any(|s| covers(s, &filter)) {
        return Ok(info.config.name.clone());
    }
    match &config.stream {
        Some(stream) => Err(StreamError::NotCapturing {
            stream: stream.clone(),
            filter,
            subjects: info.config.subjects.clone(),
        }),
        None => Err(StreamError::NoneCaptures {
            filter,
            template: template.to_owned(),
        }),
    }
}

fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Whether the stream subject `pattern` captures every subject `filter` matches.
fn covers(pattern: &str, filter: &str) -> bool {
    let mut filter = filter.split('.');
    for p in pattern.split('.') {
        match (p, filter.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(f)) if p == f && f != "*" => {}
            _ => return false,
        }
    }
    filter.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn a_stream_subject_covers_a_filter_only_when_it_matches_all_it_matches() {
        assert!(covers("vyora.*", "vyora.*"));
        assert!(covers("vyora.>", "vyora.*.*"));
        assert!(covers(">", "vyora.*"));
        assert!(covers("vyora.call_completed", "vyora.call_completed"));
        assert!(!covers("vyora.call_completed", "vyora.*"));
        assert!(!covers("vyora.*", "vyora.*.*"));
        assert!(!covers("vyora.*.*", "vyora.*"));
        assert!(!covers("other.>", "vyora.*"));
    }
}
