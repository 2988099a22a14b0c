//! What one probe recorded: every network exchange around the probe message, the page's
//! session material, and what the page rendered. The recorder (`browser::recorder`) writes
//! it; inference (`learn::infer`, `learn::decoder`) reads it; tests keep recordings as JSON
//! fixtures (with secrets replaced) so inference is tested without a browser.
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
