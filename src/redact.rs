//! Per-sink redaction: removes personal data a downstream must not receive from what that
//! sink is sent. The stored original is never changed.

use bytes::Bytes;
use serde_json::Value;

use crate::config::error::Invalid;

/// A payload field that can be redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Transcript,
    PhoneNumber,
    ContactName,
    RecordingUrl,
    CustomArgs,
}

impl Field {
    const ALL: [(&'static str, Field); 5] = [
        ("transcript", Field::Transcript),
        ("phone_number", Field::PhoneNumber),
        ("contact_name", Field::ContactName),
        ("recording_url", Field::RecordingUrl),
        ("custom_args", Field::CustomArgs),
    ];

    fn key(self) -> &'static str {
        Field::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("", |(k, _)| k)
    }
}

/// The fields one sink must not receive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redaction(Vec<Field>);

/// How many trailing digits of a phone number a redacted payload keeps.
const PHONE_DIGITS_KEPT: usize = 4;

impl Redaction {
    pub fn parse(names: &[String]) -> Result<Redaction, Invalid> {
        let mut fields = Vec::with_capacity(names.len());
        for name in names {
            let field = Field::ALL
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    Invalid::new(
                        name,
                        format!(
                            "is not a redactable field; use {}",
                            Field::ALL.map(|(k, _)| k).join(", ")
                        ),
                    )
                })?;
            if !fields.contains(&field) {
                fields.push(field);
            }
        }
        Ok(Redaction(fields))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The payload without the redacted fields; `phone_number` keeps its last 4 digits,
    /// the others are removed. Key order and number text are preserved.
    pub fn apply(&self, payload: &[u8]) -> Result<Bytes, serde_json::Error> {
        let mut doc: Value = serde_json::from_slice(payload)?;
        if let Some(object) = doc.as_object_mut() {
            for field in &self.0 {
                match field {
                    Field::PhoneNumber => {
                        if let Some(Value::String(number)) = object.get_mut(field.key()) {
                            *number = mask_phone(number);
                        } else {
                            object.remove(field.key());
                        }
                    }
                    other => {
                        object.remove(other.key());
                    }
                }
            }
        }
        serde_json::to_vec(&doc).map(Bytes::from)
    }
}

/// What an operator sees of a payload unless they reveal it: each field that carries
/// personal data (those sinks can redact, and the analysis's summary) replaced by a note
/// of what it held, the phone number masked as a redacted payload masks it; the rest as
/// it was.
pub fn masked(payload: &[u8]) -> Result<Value, serde_json::Error> {
    let mut doc: Value = serde_json::from_slice(payload)?;
    let hidden = |v: &Value| {
        Value::String(match v {
            Value::Array(items) => format!("[hidden: {} items]", items.len()),
            Value::String(text) => format!("[hidden: {} characters]", text.chars().count()),
            Value::Null => return Value::Null,
            _ => "[hidden]".to_owned(),
        })
    };
    if let Some(object) = doc.as_object_mut() {
        for (key, field) in Field::ALL {
            let Some(value) = object.get_mut(key) else {
                continue;
            };
            *value = match (field, &*value) {
                (Field::PhoneNumber, Value::String(number)) => Value::String(mask_phone(number)),
                _ => hidden(value),
            };
        }
        if let Some(summary) = object
            .get_mut("analysis")
            .and_then(Value::as_object_mut)
            .and_then(|analysis| analysis.get_mut("summary"))
        {
            *summary = hidden(summary);
        }
    }
    Ok(doc)
}

/// Whether `events show` and the console show a payload, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Hidden,
    /// Personal data masked (`--payload`).
    Masked,
    /// Whole (`--payload --reveal`).
    Revealed,
}

impl Payload {
    /// The payload as shown: JSON, or a note of why there is none to show.
    pub fn json(self, stored: &[u8]) -> serde_json::Value {
        if stored.is_empty() {
            return serde_json::Value::String("[emptied by store.retention]".into());
        }
        let shown = match self {
            Payload::Revealed => serde_json::from_slice(stored),
            _ => masked(stored),
        };
        shown.unwrap_or_else(|_| serde_json::Value::String("[not JSON]".into()))
    }
}

/// `+919876543210` -> `+********3210`: every digit but the last four becomes `*`.
fn mask_phone(number: &str) -> String {
    let digits = number.chars().filter(char::is_ascii_digit).count();
    let mut to_hide = digits.saturating_sub(PHONE_DIGITS_KEPT);
    number
        .chars()
        .map(|c| {
            if c.is_ascii_digit() && to_hide > 0 {
                to_hide -= 1;
                '*'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::InvalidAt;

    fn redaction(names: &[&str]) -> Redaction {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        Redaction::parse(&names).expect("valid")
    }

    #[test]
    fn a_masked_payload_hides_every_personal_field_and_keeps_the_rest() {
        let payload = br#"{"event":"call_completed","call_id":"c1","phone_number":"+919876543210","contact_name":"Rahul Sharma","transcript":[{"bot":"hi"},{"user":"my PAN is X"}],"recording_url":"https://x/y.mp3","custom_args":{"name":"Rahul"},"analysis":{"summary":"Rahul wants a loan","classification":"hot"},"duration_seconds":47}"#;
        let shown = masked(payload).expect("json").to_string();
        for secret in ["9876543", "Rahul", "PAN", "y.mp3"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        for kept in [
            r#""phone_number":"+********3210""#,
            r#""transcript":"[hidden: 2 items]""#,
            r#""contact_name":"[hidden: 12 characters]""#,
            r#""custom_args":"[hidden]""#,
            r#""classification":"hot""#,
            r#""duration_seconds":47"#,
        ] {
            assert!(shown.contains(kept), "{kept} missing: {shown}");
        }
        assert!(masked(b"not json").is_err());
    }

    #[test]
    fn redacted_fields_are_removed_and_the_phone_keeps_its_last_four_digits() {
        let payload = br#"{"event":"call_completed","call_id":"c1","phone_number":"+919876543210","contact_name":"Rahul","transcript":[{"bot":"hi"}],"recording_url":"https://x/y.mp3","custom_args":{"a":1},"duration_seconds":47.50}"#;
        let all = redaction(&[
            "transcript",
            "phone_number",
            "contact_name",
            "recording_url",
            "custom_args",
        ]);
        let out = all.apply(payload).expect("json");
        let text = std::str::from_utf8(&out).expect("utf-8");
        assert_eq!(
            text,
            r#"{"event":"call_completed","call_id":"c1","phone_number":"+********3210","duration_seconds":47.50}"#
        );
    }

    #[test]
    fn fields_not_listed_are_kept() {
        let out = redaction(&["transcript"])
            .apply(br#"{"transcript":[],"contact_name":"Rahul"}"#)
            .expect("json");
        assert_eq!(&out[..], br#"{"contact_name":"Rahul"}"#);
    }

    #[test]
    fn an_unknown_field_is_a_config_error_naming_it() {
        let err = Redaction::parse(&["email".to_owned()])
            .at("sinks[0].redact")
            .expect_err("invalid");
        assert!(err.to_string().contains("email") && err.to_string().contains("sinks[0].redact"));
    }

    #[test]
    fn short_numbers_are_left_as_they_are() {
        assert_eq!(mask_phone("1234"), "1234");
        assert_eq!(mask_phone("98-76-54"), "**-76-54");
    }
}
