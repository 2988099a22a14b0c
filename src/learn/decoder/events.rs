//! The recorded response, framed for analysis: which transports the bytes could be, and the
//! events each transport sees in them. The events come from replay's own framer
//! (`replay::decode::frame`), so a rule proposed over them reads what replay will read; on top
//! of it the learner asks a little more of a transport before proposing it (lines that are
//! all JSON, short tags), and every candidate is then checked with the real decoder.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use crate::flow::Transport;
use crate::recording::{Exchange, Frame};
use crate::replay::decode;

/// One framed event: its name (SSE `event:`, numbered-line tag, frame flag), its raw data and,
/// when the data is JSON, its value.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) name: Option<String>,
    pub(crate) data: String,
    pub(crate) value: Option<Value>,
}

/// What the reply is read from: a response body, or the messages a WebSocket received.
#[derive(Debug, Clone)]
pub(crate) enum Input {
    Body(Vec<u8>),
    Messages(Vec<String>),
}

/// The chat call's response, if it has one.
pub(crate) fn input_of(chat: &Exchange) -> Option<Input> {
    let received: Vec<String> = chat
        .frames
        .iter()
        .filter(|f| !f.sent)
        .filter_map(frame_text)
        .collect();
    if !received.is_empty() {
        return Some(Input::Messages(received));
    }
    chat.response_body
        .as_ref()
        .filter(|b| !b.0.is_empty())
        .map(|b| Input::Body(b.0.clone()))
}

/// The text of a WebSocket frame (binary frames are base64 in recordings).
pub(crate) fn frame_text(frame: &Frame) -> Option<String> {
    if frame.binary {
        BASE64
            .decode(frame.payload.as_bytes())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
    } else {
        Some(frame.payload.clone())
    }
}

/// The transports worth trying, most likely first: the content type's, then what the framing
/// looks like. Only transports that frame the bytes into at least one event are listed (the
/// `text` transport always is, last).
pub(crate) fn candidate_transports(content_type: &str, input: &Input) -> Vec<Transport> {
    let body = match input {
        Input::Messages(_) => return vec![Transport::Websocket],
        Input::Body(body) => body,
    };
    let ct = content_type.to_ascii_lowercase();
    let mut order = Vec::new();
    if ct.contains("event-stream") {
        order.push(Transport::Sse);
    }
    if ct.contains("ndjson") || ct.contains("jsonl") || ct.contains("json-seq") {
        order.push(Transport::Ndjson);
    }
    if ct.contains("connect+") || ct.contains("grpc") {
        order.push(Transport::LengthPrefixed);
    }
    if body.first().is_some_and(|b| *b <= 3) {
        order.push(Transport::LengthPrefixed);
    }
    let text = std::str::from_utf8(body).unwrap_or_default();
    let starts_sse = text.lines().any(|line| {
        let line = line.trim_start_matches('\u{feff}');
        line.starts_with("data:") || line.starts_with("event:")
    });
    if starts_sse {
        order.push(Transport::Sse);
    }
    if ct.contains("json") && !ct.contains("+json") {
        order.push(Transport::Json);
    }
    order.extend([
        Transport::NumberedLines,
        Transport::Json,
        Transport::Ndjson,
        Transport::Sse,
    ]);
    let mut out: Vec<Transport> = Vec::new();
    for transport in order {
        if !out.contains(&transport)
            && split(transport, input).is_some_and(|events| !events.is_empty())
        {
            out.push(transport);
        }
    }
    out.push(Transport::Text);
    out
}

/// The events `transport` sees in `input`, or `None` when the bytes do not fit it.
pub(crate) fn split(transport: Transport, input: &Input) -> Option<Vec<Event>> {
    match (transport, input) {
        (Transport::Websocket, Input::Messages(messages)) => {
            let mut events = Vec::new();
            for message in messages {
                events.extend(framed(transport, message.as_bytes())?);
            }
            Some(events)
        }
        (Transport::Websocket, Input::Body(_)) | (_, Input::Messages(_)) => None,
        (Transport::Text, Input::Body(_)) => Some(Vec::new()),
        (transport, Input::Body(body)) => {
            let events = framed(transport, body)?;
            plausible(transport, &events).then_some(events)
        }
    }
}

/// What replay's framer finds in `bytes`, each event with its JSON value when it is JSON.
fn framed(transport: Transport, bytes: &[u8]) -> Option<Vec<Event>> {
    let framed = decode::frame(transport, bytes).ok()?;
    Some(
        framed
            .into_iter()
            .map(|f| {
                let data = match transport {
                    Transport::Json => f.data.trim().to_owned(),
                    _ => f.data,
                };
                let value = serde_json::from_str(&data).ok();
                Event {
                    name: f.name,
                    data,
                    value,
                }
            })
            .collect(),
    )
}

/// Whether framed events look like `transport` at all. The framer reads what it is given
/// (it skips what it does not understand); before proposing a transport the learner wants
/// its shape: JSON lines (more than one, else it is a JSON document), short alphanumeric tags
/// before JSON, frames flagged 0 to 3, one JSON document.
fn plausible(transport: Transport, events: &[Event]) -> bool {
    let json = |e: &Event| e.value.is_some();
    match transport {
        Transport::Ndjson => events.len() > 1 && events.iter().all(json),
        Transport::NumberedLines => events.iter().all(|e| {
            let tag = e.name.as_deref().unwrap_or_default();
            (1..=3).contains(&tag.len())
                && tag.chars().all(|c| c.is_ascii_alphanumeric())
                && !e.data.starts_with(char::is_whitespace)
                && json(e)
        }),
        Transport::LengthPrefixed => events.iter().all(|e| {
            e.name
                .as_deref()
                .and_then(|flag| flag.parse::<u8>().ok())
                .is_some_and(|flag| flag <= 3)
        }),
        Transport::Json => events.len() == 1 && events.iter().all(json),
        Transport::Sse | Transport::Websocket | Transport::Text => true,
    }
}

/// `t` escaped as one JSON pointer token.
pub(crate) fn escape_token(t: &str) -> String {
    t.replace('~', "~0").replace('/', "~1")
}

/// Every non-null scalar under `value` with its JSON pointer, in document order.
pub(crate) fn scalars(value: &Value) -> Vec<(String, &Value)> {
    fn walk<'v>(prefix: String, value: &'v Value, out: &mut Vec<(String, &'v Value)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(format!("{prefix}/{}", escape_token(k)), v, out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(format!("{prefix}/{i}"), v, out);
                }
            }
            Value::Null => {}
            scalar => out.push((prefix, scalar)),
        }
    }
    let mut out = Vec::new();
    walk(String::new(), value, &mut out);
    out
}

/// Every string under `value` with its JSON pointer.
pub(crate) fn strings(value: &Value) -> Vec<(String, &str)> {
    scalars(value)
        .into_iter()
        .filter_map(|(p, v)| v.as_str().map(|s| (p, s)))
        .collect()
}
