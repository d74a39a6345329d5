//! One stream entry per delivery, added by a server-side script that makes a redelivery
//! add nothing: it checks the delivery's idempotency key and adds the entry in one atomic
//! step, keeping the entry's id under that key for `idempotency_ttl`.

use std::time::UNIX_EPOCH;

use redis::{Cmd, Script, Value};

use super::RedisSinkConfig;
use crate::event::Delivery;
use crate::signature;

/// `KEYS[1]`: the idempotency key; `KEYS[2]`: the stream. `ARGV[1]`: the idempotency
/// key's time to live in seconds; `ARGV[2]`: `MAXLEN ~` for the stream, `0` for none;
/// `ARGV[3..]`: the entry's fields and values. Answers `{1, id}` for an entry added now,
/// `{0, id}` for one added before. A script runs alone on the server, so two copies of a
/// delivery cannot both find the key missing; an `XADD` that fails (out of memory, a key
/// of another type) raises before the key is set, so the delivery can be tried again.
const ADD: &str = r"
local added = redis.call('GET', KEYS[1])
if added then
  return {0, added}
end
local id
if ARGV[2] ~= '0' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[1], id, 'NX', 'EX', ARGV[1])
return {1, id}
";

pub fn script() -> Script {
    Script::new(ADD)
}

/// The stream key and the `EVALSHA` that adds `d` to it, ready for a pipeline.
pub fn command(config: &RedisSinkConfig, script: &Script, d: &Delivery) -> (String, Cmd) {
    let stream = config.stream.render(d);
    let idempotency_key = format!("{}{stream}:{}", config.idempotency_prefix, d.dedup_key);
    let received_at = d
        .received_at
        .duration_since(UNIX_EPOCH)
        .map(|t| t.as_millis())
        .unwrap_or_default();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(2)
        .arg(&idempotency_key)
        .arg(&stream)
        .arg(config.idempotency_ttl.as_secs().max(1))
        .arg(config.maxlen.unwrap_or(0))
        .arg("event")
        .arg(&d.event);
    if let Some(call_id) = &d.call_id {
        cmd.arg("call_id").arg(call_id);
    }
    cmd.arg("source")
        .arg(d.source.as_str())
        .arg("idempotency_key")
        .arg(&d.dedup_key)
        .arg("received_at")
        .arg(received_at.to_string());
    if let Some(secret) = &config.secret {
        cmd.arg("signature")
            .arg(signature::sign(secret, &d.payload));
    }
    cmd.arg("payload").arg(d.payload.as_ref());
    (stream, cmd)
}

/// What the script answered: the entry's id, and whether this call added it.
pub fn added(answer: Value) -> Option<(bool, String)> {
    let (fresh, id): (i64, String) = redis::from_redis_value(answer).ok()?;
    Some((fresh == 1, id))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::event::{DeliveryId, Source};
    use crate::sinks::redis::config::tests::config;

    pub(crate) fn delivery() -> Delivery {
        Delivery {
            id: DeliveryId::row(1),
            attempts: 0,
            event: "call_completed".into(),
            call_id: Some("abc".into()),
            dedup_key: "abc:call_completed".into(),
            source: Source::Webhook,
            received_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            payload: Bytes::from_static(br#"{"agent_id":"agent-7"}"#),
        }
    }

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<not simple>".into(),
            })
            .collect()
    }

    #[test]
    fn an_entry_carries_its_fields_after_the_keys_and_the_payload_last() {
        let c = config(
            "url = \"redis://cache\"\nstream = \"calls.{event}\"\nmaxlen = 1000\nsecret = \"s\"\n",
        );
        let (stream, cmd) = command(&c, &script(), &delivery());
        assert_eq!(stream, "calls.call_completed");
        let a = args(&cmd);
        assert_eq!(a[0], "EVALSHA");
        assert_eq!(a[1], script().get_hash());
        assert_eq!(
            a[2..7],
            [
                "2",
                "vyora:idempotency:calls.call_completed:abc:call_completed",
                "calls.call_completed",
                "604800",
                "1000"
            ]
        );
        let fields: Vec<&str> = a[7..].iter().step_by(2).map(String::as_str).collect();
        assert_eq!(
            fields,
            [
                "event",
                "call_id",
                "source",
                "idempotency_key",
                "received_at",
                "signature",
                "payload"
            ]
        );
        assert_eq!(a[8], "call_completed");
        assert_eq!(a[10], "abc");
        assert!(a[18].starts_with("sha256="), "{}", a[18]);
        assert_eq!(a[20], r#"{"agent_id":"agent-7"}"#);
    }

    #[test]
    fn without_maxlen_or_secret_the_stream_is_not_trimmed_and_not_signed() {
        let c = config("url = \"redis://cache\"\n");
        let mut d = delivery();
        d.call_id = None;
        let a = args(&command(&c, &script(), &d).1);
        assert_eq!(a[6], "0");
        assert!(
            !a.iter().any(|f| f == "signature" || f == "call_id"),
            "{a:?}"
        );
    }

    #[test]
    fn the_scripts_answer_says_whether_the_entry_is_new() {
        let answer = |n| Value::Array(vec![Value::Int(n), Value::BulkString(b"1-0".to_vec())]);
        assert_eq!(added(answer(1)), Some((true, "1-0".into())));
        assert_eq!(added(answer(0)), Some((false, "1-0".into())));
        assert_eq!(added(Value::Nil), None);
    }
}
