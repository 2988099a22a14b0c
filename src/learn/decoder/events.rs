//! The recorded response, framed for analysis: which transports the bytes could be, and the
//! events each transport sees in them. This mirrors `replay::decode`'s framing closely enough
//! to propose candidate rules; every candidate is then checked with the real decoder.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use crate::flow::Transport;
use crate::recording::{Exchange, Frame};

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
            Some(messages.iter().map(|m| event(None, m.clone())).collect())
        }
        (Transport::Websocket, Input::Body(_)) | (_, Input::Messages(_)) => None,
        (Transport::Text, Input::Body(_)) => Some(Vec::new()),
        (Transport::LengthPrefixed, Input::Body(body)) => frames(body),
        (transport, Input::Body(body)) => {
            let text = std::str::from_utf8(body).ok()?;
            match transport {
                Transport::Sse => sse(text),
                Transport::Ndjson => ndjson(text),
                Transport::NumberedLines => numbered(text),
                Transport::Json => {
                    let value: Value = serde_json::from_str(text.trim()).ok()?;
                    Some(vec![Event {
                        name: None,
                        data: text.trim().to_owned(),
                        value: Some(value),
                    }])
                }
                _ => None,
            }
        }
    }
}

fn event(name: Option<String>, data: String) -> Event {
    let value = serde_json::from_str(&data).ok();
    Event { name, data, value }
}

fn sse(text: &str) -> Option<Vec<Event>> {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let normalized = normalized.trim_start_matches('\u{feff}');
    let mut blocks: Vec<&str> = normalized.split("\n\n").collect();
    // As the SSE spec says (and the replay decoder does), an unterminated last event is dropped.
    if !normalized.ends_with("\n\n") {
        blocks.pop();
    }
    let mut events = Vec::new();
    let mut fields = 0usize;
    for block in blocks {
        let mut name = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.split('\n').filter(|l| !l.is_empty()) {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => name = Some(value.to_owned()),
                "data" => data.push(value),
                "id" | "retry" => {}
                _ => return None,
            }
            fields += 1;
        }
        if !data.is_empty() {
            let name = name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "message".into());
            events.push(event(Some(name), data.join("\n")));
        }
    }
    (fields > 0).then_some(events)
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
}

fn ndjson(text: &str) -> Option<Vec<Event>> {
    let mut events = Vec::new();
    for line in lines(text) {
        let value: Value = serde_json::from_str(line).ok()?;
        events.push(Event {
            name: None,
            data: line.to_owned(),
            value: Some(value),
        });
    }
    (events.len() > 1).then_some(events)
}

fn numbered(text: &str) -> Option<Vec<Event>> {
    let mut events = Vec::new();
    for line in lines(text) {
        let (tag, payload) = line.split_once(':')?;
        let tag_ok = (1..=3).contains(&tag.len()) && tag.chars().all(|c| c.is_ascii_alphanumeric());
        if !tag_ok || payload.starts_with(char::is_whitespace) {
            return None;
        }
        let value: Value = serde_json::from_str(payload).ok()?;
        events.push(Event {
            name: Some(tag.to_owned()),
            data: payload.to_owned(),
            value: Some(value),
        });
    }
    (!events.is_empty()).then_some(events)
}

fn frames(body: &[u8]) -> Option<Vec<Event>> {
    let mut events = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 5 || rest[0] > 3 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let payload = rest.get(5..5 + len)?;
        let data = std::str::from_utf8(payload).ok()?.to_owned();
        events.push(event(Some(rest[0].to_string()), data));
        rest = &rest[5 + len..];
    }
    (!events.is_empty()).then_some(events)
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
