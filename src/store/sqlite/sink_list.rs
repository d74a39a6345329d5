//! The sinks an event was routed to, as the event log stores them: `,a,b,`.

use std::sync::Arc;

/// The sinks an event was routed to, as stored: `,a,b,` (empty for none).
pub(super) fn sinks_text(sinks: &[Arc<str>]) -> String {
    if sinks.is_empty() {
        return String::new();
    }
    let mut text = String::from(",");
    for sink in sinks {
        text.push_str(sink);
        text.push(',');
    }
    text
}

pub(super) fn sink_names(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').filter(|s| !s.is_empty())
}
