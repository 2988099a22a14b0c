//! What one probe recorded: every network exchange around the probe message, the page's
//! session material, and what the page rendered. The recorder (`browser::recorder`) writes
//! it; inference (`learn::infer`, `learn::decoder`) reads it; tests keep recordings as JSON
//! fixtures (with secrets replaced) so inference is tested without a browser.
//!
//! At the crate root because both sides use it and neither owns it: the browser writes
//! recordings without knowing the learner, the learner reads them without knowing Chromium.
//!
//! Invariant: a recording holds secrets (cookie values, tokens). It lives in memory during a
//! learn, and only sanitized copies are ever written to disk.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recording {
    /// The chat page the probe was typed into.
    pub page_url: String,
    /// The unique marker the probe message carries (e.g. `ct7f3a9c`), also inside `probe`.
    pub marker: String,
    /// The whole probe message as typed.
    pub probe: String,
    /// The text the page showed as the reply once it was complete (DOM `innerText`).
    pub rendered_reply: String,
    /// Reasoning the page showed separately (a collapsible "thinking" element), if any.
    #[serde(default)]
    pub rendered_reasoning: Option<String>,
    /// The page's session material just before the probe was sent.
    pub storage: StorageSnapshot,
    /// Every request the page made from shortly before the probe was sent until the reply
    /// was complete, in the order they started.
    pub exchanges: Vec<Exchange>,
    /// When the probe was sent, in milliseconds since the recording started (a follow-up's:
    /// an exchange that started before was opened by the first turn, a WebSocket say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<f64>,
    /// A second probe sent in the same site conversation once the first reply was complete:
    /// what a later turn carries. Its exchanges are those started after it was sent, plus a
    /// WebSocket of the first turn with the frames after that. Its `rendered_reply` may be
    /// the beginning of the reply only (the probe stops once the reply shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_up: Option<Box<Recording>>,
    /// The file the probe attached through the page's file input before typing, when the
    /// page had one: what an upload carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachedFile>,
}

/// A file the probe attached, and when.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttachedFile {
    /// Unique to the probe (inside `name` and the bytes), and never the probe's marker: a
    /// call carrying the file does not carry the probe.
    pub token: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of `bytes`.
    pub sha256: String,
    pub bytes: Body,
    /// The file input's `accept` attribute.
    #[serde(default)]
    pub accept: String,
    /// When the file was chosen and when the probe was typed, in milliseconds since the
    /// recording started: the calls between them are the upload's.
    pub chosen_ms: f64,
    pub typed_ms: f64,
}

impl Recording {
    /// The recording with every secret replaced by a placeholder of its kind, the same
    /// placeholder for the same secret everywhere (so inference sees the same provenance):
    /// cookie values (`fakeCookie0Value…`), storage values and the string leaves of JSON
    /// storage values (`fakeStoredToken0…`), token-like `<meta>` contents (`fakeCsrfToken…`),
    /// credential headers' values and cookies a response set (`fakeHeaderToken0…`), and
    /// `extra` (a password, say). What is left is safe to save, attach and commit.
    pub fn redacted(&self, extra: &[&str]) -> Recording {
        let mut secrets: Vec<(String, String)> = Vec::new();
        let mut add = |secret: &str, fake: String| {
            if secret.chars().count() >= 8 && !secrets.iter().any(|(s, _)| s == secret) {
                secrets.push((secret.to_owned(), fake));
            }
        };
        let storage = &self.storage;
        for (i, value) in storage.cookies.values().enumerate() {
            add(value, format!("fakeCookie{i}Value00000000000000000{i}"));
        }
        let stored = storage
            .local_storage
            .values()
            .chain(storage.session_storage.values());
        for (i, value) in stored.enumerate() {
            match serde_json::from_str::<serde_json::Value>(value) {
                Ok(doc) if doc.is_object() || doc.is_array() => {
                    for (j, leaf) in json_strings(&doc).into_iter().enumerate() {
                        add(leaf, format!("fakeStoredToken{i}x{j}00000000000000000{i}"));
                    }
                }
                _ => add(value, format!("fakeStoredToken{i}000000000000000000{i}")),
            }
        }
        for (i, (name, content)) in storage.meta.iter().enumerate() {
            let lower = name.to_ascii_lowercase();
            if ["csrf", "xsrf", "token", "nonce"]
                .iter()
                .any(|w| lower.contains(w))
            {
                add(content, format!("fakeCsrfToken0000000000000000000{i}"));
            }
        }
        let mut n = 0;
        for exchange in self.all_exchanges() {
            let headers = exchange
                .request_headers
                .iter()
                .filter(|(name, _)| crate::flow::is_sensitive_header(name))
                .chain(
                    exchange
                        .response_headers
                        .iter()
                        .filter(|(name, _)| name.eq_ignore_ascii_case("set-cookie")),
                );
            for (name, value) in headers {
                for secret in header_secrets(name, value) {
                    add(secret, format!("fakeHeaderToken{n}00000000000000000{n}"));
                    n += 1;
                }
            }
        }
        for (i, secret) in extra.iter().enumerate() {
            add(secret, format!("fakeSecret{i}00000000000000000000{i}"));
        }
        // Longest first, so that a secret holding another is replaced whole.
        secrets.sort_by_key(|(secret, _)| std::cmp::Reverse(secret.len()));
        let mut text = serde_json::to_string(self).unwrap_or_default();
        for (secret, fake) in &secrets {
            text = text.replace(secret.as_str(), fake);
            let escaped = serde_json::to_string(secret).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            if escaped != secret {
                text = text.replace(escaped, fake);
            }
        }
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// This recording's exchanges, then its follow-up's.
    fn all_exchanges(&self) -> Vec<&Exchange> {
        let mut all: Vec<&Exchange> = self.exchanges.iter().collect();
        if let Some(second) = &self.follow_up {
            all.extend(second.all_exchanges());
        }
        all
    }

    /// Splits what one recorder captured over two probes at `sent_ms`, when the second was
    /// sent: the exchanges that started before (their frames after `sent_ms` cut off), and
    /// those after (with a copy of each earlier WebSocket holding only its later frames).
    pub fn split_exchanges(all: Vec<Exchange>, sent_ms: f64) -> (Vec<Exchange>, Vec<Exchange>) {
        let mut first = Vec::new();
        let mut second = Vec::new();
        for mut exchange in all {
            if exchange.started_ms >= sent_ms {
                second.push(exchange);
                continue;
            }
            let (before, after): (Vec<Frame>, Vec<Frame>) =
                exchange.frames.drain(..).partition(|f| f.at_ms < sent_ms);
            if !after.is_empty() {
                second.push(Exchange {
                    frames: after,
                    ..exchange.clone()
                });
            }
            exchange.frames = before;
            first.push(exchange);
        }
        (first, second)
    }
}

/// Session material visible to the page, to explain where header and body values come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageSnapshot {
    /// name → value (HttpOnly included).
    #[serde(default)]
    pub cookies: BTreeMap<String, String>,
    #[serde(default)]
    pub local_storage: BTreeMap<String, String>,
    #[serde(default)]
    pub session_storage: BTreeMap<String, String>,
    /// `<meta name=… content=…>` of the chat page (CSRF tokens live here).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub user_agent: Option<String>,
}

/// One request and its response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// CDP request id.
    pub id: String,
    /// Milliseconds since the recording started, when the request was sent.
    pub started_ms: f64,
    /// `Fetch`, `XHR`, `EventSource`, `WebSocket`, `Document`, `Script`, …
    pub resource_type: String,
    pub method: String,
    pub url: String,
    /// Request headers as sent, lower-case names (`cookie` included when CDP reported it).
    #[serde(default)]
    pub request_headers: Vec<(String, String)>,
    #[serde(default)]
    pub request_body: Option<Body>,
    #[serde(default)]
    pub status: Option<u16>,
    /// Response headers, lower-case names.
    #[serde(default)]
    pub response_headers: Vec<(String, String)>,
    /// The complete response body (streamed bodies included).
    #[serde(default)]
    pub response_body: Option<Body>,
    /// Milliseconds since the recording started, when the first response byte arrived.
    #[serde(default)]
    pub first_byte_ms: Option<f64>,
    /// When the response completed.
    #[serde(default)]
    pub finished_ms: Option<f64>,
    /// WebSocket frames, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<Frame>,
    /// Set when the request failed (network error, aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Exchange {
    pub fn request_header(&self, name: &str) -> Option<&str> {
        header(&self.request_headers, name)
    }

    pub fn response_header(&self, name: &str) -> Option<&str> {
        header(&self.response_headers, name)
    }
}

/// The string leaves of a JSON document.
fn json_strings(value: &serde_json::Value) -> Vec<&str> {
    match value {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(items) => items.iter().flat_map(json_strings).collect(),
        serde_json::Value::Object(map) => map.values().flat_map(json_strings).collect(),
        _ => Vec::new(),
    }
}

/// The secret parts of a credential header: a cookie header's values, a set-cookie's value,
/// else the value without its auth scheme (`Bearer `).
fn header_secrets<'a>(name: &str, value: &'a str) -> Vec<&'a str> {
    let lower = name.to_ascii_lowercase();
    if lower == "cookie" {
        return value
            .split(';')
            .filter_map(|pair| pair.split_once('=').map(|(_, v)| v.trim()))
            .collect();
    }
    if lower == "set-cookie" {
        return value
            .split(';')
            .next()
            .and_then(|pair| pair.split_once('='))
            .map(|(_, v)| vec![v.trim()])
            .unwrap_or_default();
    }
    match value.split_once(' ') {
        Some((scheme, rest)) if scheme.chars().all(|c| c.is_ascii_alphabetic()) => vec![rest],
        _ => vec![value],
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    /// true when the page sent it, false when it received it.
    pub sent: bool,
    pub at_ms: f64,
    /// Text frames as is; binary frames base64 (`binary` true).
    pub payload: String,
    #[serde(default)]
    pub binary: bool,
}

/// Bytes that serialize as text when they are UTF-8, as base64 otherwise, so fixtures stay
/// readable.
#[derive(Clone, Default, PartialEq)]
pub struct Body(pub Vec<u8>);

impl Body {
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body({} bytes)", self.0.len())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum BodyRepr {
    Text(String),
    Base64(String),
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => BodyRepr::Text(text.to_owned()),
            Err(_) => BodyRepr::Base64(BASE64.encode(&self.0)),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match BodyRepr::deserialize(deserializer)? {
            BodyRepr::Text(text) => Ok(Body(text.into_bytes())),
            BodyRepr::Base64(b64) => BASE64
                .decode(b64)
                .map(Body)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_secret_the_same_way_everywhere() {
        let token = "dt_SeCrEt0123456789abcdef";
        let recording = Recording {
            storage: StorageSnapshot {
                cookies: [("sid".to_owned(), "c00kieValue12345678".to_owned())].into(),
                local_storage: [(
                    "userToken".to_owned(),
                    format!(r#"{{"value":"{token}","__version":"0"}}"#),
                )]
                .into(),
                meta: [("csrf-token".to_owned(), "csrfValue987654321".to_owned())].into(),
                ..StorageSnapshot::default()
            },
            exchanges: vec![Exchange {
                request_headers: vec![
                    ("authorization".into(), format!("Bearer {token}")),
                    (
                        "cookie".into(),
                        "sid=c00kieValue12345678; other=sEcOnDcOoKiE999".into(),
                    ),
                    ("x-csrf-token".into(), "csrfValue987654321".into()),
                ],
                response_headers: vec![(
                    "set-cookie".into(),
                    "fresh=nEwCoOkIe12345678; Path=/".into(),
                )],
                request_body: Some(Body(b"password=hunter2hunter2".to_vec())),
                ..Exchange::default()
            }],
            ..Recording::default()
        };
        let clean = recording.redacted(&["hunter2hunter2"]);
        let text = serde_json::to_string(&clean).unwrap();
        for secret in [
            token,
            "c00kieValue12345678",
            "sEcOnDcOoKiE999",
            "csrfValue987654321",
            "nEwCoOkIe12345678",
            "hunter2hunter2",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        // The same placeholder wherever the secret was: provenance survives.
        let stored = &clean.storage.local_storage["userToken"];
        let fake = serde_json::from_str::<serde_json::Value>(stored).unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            clean.exchanges[0].request_header("authorization"),
            Some(format!("Bearer {fake}").as_str())
        );
        assert_eq!(
            clean.storage.cookies["sid"],
            "fakeCookie0Value000000000000000000"
        );
    }

    #[test]
    fn two_probes_split_by_when_the_second_was_sent() {
        let frame = |sent, at_ms| Frame {
            sent,
            at_ms,
            payload: format!("{at_ms}"),
            binary: false,
        };
        let socket = Exchange {
            id: "ws".into(),
            started_ms: 1.0,
            frames: vec![
                frame(true, 2.0),
                frame(false, 3.0),
                frame(true, 12.0),
                frame(false, 13.0),
            ],
            ..Exchange::default()
        };
        let early = Exchange {
            id: "a".into(),
            started_ms: 5.0,
            ..Exchange::default()
        };
        let late = Exchange {
            id: "b".into(),
            started_ms: 11.0,
            ..Exchange::default()
        };
        let (first, second) = Recording::split_exchanges(vec![socket, early, late], 10.0);
        let ids = |list: &[Exchange]| list.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ["ws", "a"]);
        assert_eq!(ids(&second), ["ws", "b"]);
        assert_eq!(first[0].frames.len(), 2);
        assert_eq!(second[0].frames[0].at_ms, 12.0);
        assert_eq!(second[0].started_ms, 1.0, "opened by the first turn");
    }

    #[test]
    fn bodies_round_trip_as_text_or_base64() {
        for bytes in [b"hello".to_vec(), vec![0, 0, 0, 0, 5, 0xff, 0xfe]] {
            let body = Body(bytes.clone());
            let json = serde_json::to_string(&body).unwrap();
            assert_eq!(serde_json::from_str::<Body>(&json).unwrap().0, bytes);
        }
        assert_eq!(
            serde_json::to_string(&Body(b"hi".to_vec())).unwrap(),
            r#"{"text":"hi"}"#
        );
    }
}
