//! `check-config --connect` for an HTTP sink: does its host answer HTTP?
//!
//! The probe asks `HEAD /` of the URL's host, not the hook itself: a request there could
//! act, and its path is often the hook's key. Any answer proves the host reachable; a
//! refused connection, a name that does not resolve, a TLS failure or a timeout fails.

use std::error::Error;
use std::time::Duration;

use super::{HttpSinkConfig, USER_AGENT};
use crate::sinks::{BoxFuture, Probe};

impl Probe for HttpSinkConfig {
    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            crate::net::install_tls_provider();
            let mut root = self.url.clone();
            root.set_path("/");
            root.set_query(None);
            root.set_fragment(None);
            // Only fail for URLs without a host, which validation refused.
            let _ = root.set_username("");
            let _ = root.set_password(None);
            let host = format!(
                "{}:{}",
                root.host_str().unwrap_or_default(),
                root.port_or_known_default().unwrap_or_default()
            );
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(self.timeout)
                .connect_timeout(self.timeout.min(Duration::from_secs(10)))
                .user_agent(USER_AGENT)
                .build()
                .map_err(|e| format!("cannot set up the HTTP client: {}", chain(&e)))?;
            match client.head(root).send().await {
                Ok(answer) => Ok(format!(
                    "{host} answers HTTP (HEAD / answered {})",
                    answer.status()
                )),
                Err(e) => Err(format!("{host}: {}", chain(&e.without_url()))),
            }
        })
    }
}

/// The error and its causes, `a: b: c`: reqwest's own message alone ("error sending
/// request") does not say what went wrong.
fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}
