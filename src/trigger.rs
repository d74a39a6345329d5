//! Realistic, correctly signed test events in the shape of Vyora's reference, for the
//! `trigger` command: try a router (or your own receiver) without a Vyora account.

use std::time::SystemTime;

use crate::protocol::{
    ALL_PROCESSING_COMPLETED, CALL_COMPLETED, CALL_STARTED, EVENT_HEADER, LIFECYCLE,
    SIGNATURE_HEADER,
};
use crate::signature::{self, Secret};

/// The events `trigger` can send; `Call` is the whole lifecycle in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trigger {
    #[value(name = "call_started")]
    CallStarted,
    #[value(name = "call_completed")]
    CallCompleted,
    #[value(name = "all_processing_completed")]
    AllProcessingCompleted,
    Call,
}

impl Trigger {
    /// The event names to send, in order.
    pub fn events(self) -> &'static [&'static str] {
        match self {
            Trigger::CallStarted => &[CALL_STARTED],
            Trigger::CallCompleted => &[CALL_COMPLETED],
            Trigger::AllProcessingCompleted => &[ALL_PROCESSING_COMPLETED],
            Trigger::Call => &LIFECYCLE,
        }
    }
}

/// The payload Vyora would send for `event` of call `call_id`, in the shape of the API
/// reference's example: about 1.5 KB once the call has ended (transcript and analysis
/// included), less for `call_started`.
pub fn payload(event: &str, call_id: &str) -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut body = serde_json::json!({
        "event": event,
        "call_id": call_id,
        "phone_number": "+919876543210",
        "contact_name": "Rahul Sharma",
        "agent_id": "def456-7890-agent",
        "agent_name": "Home Loan Agent",
        "status": if event == CALL_STARTED { "in_progress" } else { "completed" },
        "direction": "outbound",
        "campaign_id": "campaign_456",
        "custom_args": {"name": "Rahul Sharma", "product": "Home Loan"},
        "called_at": now,
        "timestamp": now,
    });
    if event != CALL_STARTED {
        body["duration_seconds"] = 47.into();
        body["recording_url"] = format!("https://cdn.vyora.ai/recordings/{call_id}.mp3").into();
        body["transcript"] = serde_json::json!([
            {"bot": "Hi Rahul, I'm calling about your home loan inquiry. Is this a good time to talk about the options we have for you?"},
            {"user": "Yes, I was interested in learning more about the interest rates and the EMI options you offer."},
            {"bot": "Of course. For a loan of fifty lakhs over twenty years, the EMI starts at about forty-three thousand per month."},
            {"user": "That sounds reasonable. Can you send me the details on WhatsApp so I can discuss with my family?"},
            {"bot": "Certainly, I will share the details right away. Is there anything else I can help you with today?"},
            {"user": "No, that's all for now. Thank you for calling."}
        ]);
        body["analysis"] = serde_json::json!({
            "summary": "Lead expressed strong interest, asked about EMI options and requested details on WhatsApp.",
            "classification": "Interested"
        });
    }
    body.to_string()
}

/// Sends one signed event; returns the status and the answer's body.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    secret: &Secret,
    event: &str,
    body: String,
) -> Result<(u16, String), reqwest::Error> {
    let signature = signature::sign(secret, body.as_bytes());
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header(EVENT_HEADER, event)
        .header(SIGNATURE_HEADER, signature)
        .header("user-agent", "Vyora-Webhooks/1.0")
        .body(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    #[test]
    fn every_triggered_payload_is_an_event_the_router_accepts() {
        for event in Trigger::Call.events() {
            let body = payload(event, "trigger-1");
            let parsed = Event::from_webhook(Some(event.as_bytes()), bytes::Bytes::from(body))
                .expect("valid");
            assert_eq!(parsed.dedup_key, format!("trigger-1:{event}"));
            assert!(matches!(parsed.timestamp, crate::event::Timestamp::At(_)));
        }
    }
}
