//! The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), which
//! Claude Code and the Anthropic SDKs use through `ANTHROPIC_BASE_URL`: `system`, `messages`
//! with text, image, `tool_use` and `tool_result` blocks, tools, `max_tokens`,
//! `stop_sequences`, and the streamed events (`message_start`, `content_block_start` /
//! `_delta` / `_stop` with `text_delta`, `input_json_delta`, `thinking_delta`,
//! `message_delta`, `message_stop`). Errors are rendered in Anthropic's shape by
//! [`super::error::anthropic_shape`].

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::{TIER_HEADER, forced_tier, parse_json, read_body};
use super::front::{self, Encoder, SseBody, named_frame};
use crate::chat::{self, Event, FinishReason, Message, Part, ToolCall, ToolChoice};

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub system: Option<Value>,
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub thinking: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Value,
}

pub async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let forced_tier = forced_tier(&headers)?;
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let wire: MessagesRequest = super::extract::parse_request(&bytes, "messages")?;
    crate::chat::ignored::note_set(
        "messages",
        &[
            ("temperature", wire.temperature.is_some()),
            ("top_p", wire.top_p.is_some()),
        ],
    );
    if wire.max_tokens.is_none() {
        return Err(ApiError::bad_request("max_tokens: Field required").param("max_tokens"));
    }
    let stream = wire.stream.unwrap_or(false);
    let mut request = request_from(wire)?;
    front::admit(&state, &mut request).await?;
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    let model = request.model.clone();
    let started = chat::start(state.gateway.clone(), request, &id, forced_tier).await?;
    let mut encoder = MessageEncoder {
        id,
        model,
        input_tokens: started.prompt_tokens,
        blocks: Vec::new(),
        open: None,
        finished: false,
    };
    if stream {
        return Ok(SseBody::new(started.events, encoder).into_response(started.tier));
    }
    let tier = header::HeaderValue::from(u16::from(started.tier));
    let mut frames = Vec::new();
    let mut stop = (Value::Null, Value::Null, 0);
    for event in chat::run::collect_events(started.events).await? {
        if let Event::Finish(finish) = &event {
            stop = stop_of(finish);
        }
        encoder.event(event, &mut frames);
    }
    let (stop_reason, stop_sequence, output_tokens) = stop;
    let message = json!({
        "id": encoder.id,
        "type": "message",
        "role": "assistant",
        "model": encoder.model,
        "content": encoder.blocks,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage(encoder.input_tokens, output_tokens),
    });
    Ok((StatusCode::OK, [(TIER_HEADER, tier)], axum::Json(message)).into_response())
}

/// `POST /v1/messages/count_tokens`: the tokens of the prompt the site would be sent.
pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<Value>, ApiError> {
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let wire: MessagesRequest = parse_json(&bytes)?;
    let mut request = request_from(wire)?;
    front::admit(&state, &mut request).await?;
    let prompt = chat::prompt::prompt_of(&request);
    Ok(axum::Json(json!({
        "input_tokens": crate::tokens::count_prompt_tokens(&prompt.messages)
    })))
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

/// `(stop_reason, stop_sequence, output_tokens)`.
fn stop_of(finish: &chat::reply::Finish) -> (Value, Value, u64) {
    let sequence = match &finish.reason {
        FinishReason::StopSequence(s) => json!(s),
        _ => Value::Null,
    };
    (
        json!(finish.reason.anthropic()),
        sequence,
        finish.usage.map_or(0, |u| u.completion_tokens),
    )
}

fn request_from(wire: MessagesRequest) -> Result<chat::Request, ApiError> {
    // Anthropic's own bounds.
    front::bounded("temperature", wire.temperature, 0.0, 1.0)?;
    front::bounded("top_p", wire.top_p, 0.0, 1.0)?;
    let max_tokens = front::token_limit("max_tokens", wire.max_tokens)?;
    let mut messages = Vec::new();
    match &wire.system {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) if text.trim().is_empty() => {}
        Some(Value::String(text)) => messages.push(Message::System { text: text.clone() }),
        Some(blocks @ Value::Array(_)) => {
            let text = blocks_text(blocks, "system")?;
            if !text.trim().is_empty() {
                messages.push(Message::System { text });
            }
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("system: must be a string or a list of text blocks")
                    .param("system"),
            );
        }
    }
    if wire.messages.is_empty() {
        return Err(
            ApiError::bad_request("messages: at least one message is required").param("messages"),
        );
    }
    for (i, message) in wire.messages.into_iter().enumerate() {
        let at = format!("messages.{i}");
        match message.role.as_str() {
            "user" => user_turn(&message.content, &at, &mut messages)?,
            "assistant" => messages.push(assistant_turn(&message.content, &at)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "{at}.role: Input should be 'user' or 'assistant', not '{other}'"
                ))
                .param(format!("{at}.role")));
            }
        }
    }
    let mut request = chat::Request::new(wire.model, messages);
    request.max_tokens = max_tokens;
    request.stop = wire.stop_sequences.unwrap_or_default();
    request.include_reasoning = wire
        .thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        != Some("disabled");
    for (i, tool) in wire.tools.iter().flatten().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("custom");
        if kind != "custom" {
            return Err(ApiError::bad_request(format!(
                "tools.{i}.type: the server tool `{kind}` is not supported; define the tool with \
                 `name`, `description` and `input_schema`"
            ))
            .param(format!("tools.{i}.type")));
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad_request(format!("tools.{i}.name: Field required"))
                .param(format!("tools.{i}.name"))
        })?;
        request.tools.push(chat::Tool {
            name: name.to_owned(),
            description: tool
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            parameters: tool.get("input_schema").cloned().ok_or_else(|| {
                ApiError::bad_request(format!("tools.{i}.input_schema: Field required"))
                    .param(format!("tools.{i}.input_schema"))
            })?,
        });
    }
    if let Some(choice) = wire.tool_choice.as_ref().filter(|c| !c.is_null()) {
        request.tool_choice = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => ToolChoice::Auto,
            Some("any") => ToolChoice::Required,
            Some("none") => ToolChoice::None,
            Some("tool") => ToolChoice::Named(
                choice
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad_request("tool_choice.name: Field required")
                            .param("tool_choice.name")
                    })?
                    .to_owned(),
            ),
            _ => {
                return Err(ApiError::bad_request(
                    "tool_choice.type: use 'auto', 'any', 'tool' or 'none'",
                )
                .param("tool_choice.type"));
            }
        };
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            request.parallel_tool_calls = false;
        }
    }
    Ok(request)
}

/// A user turn: its `tool_result` blocks become tool results (in order), the rest a user
/// message.
fn user_turn(content: &Value, at: &str, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let mut parts = Vec::new();
    match content {
        Value::String(text) => parts.push(Part::text(text.clone())),
        Value::Array(blocks) => {
            for (j, block) in blocks.iter().enumerate() {
                let place = format!("{at}.content.{j}");
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_result") => {
                        let call_id = block
                            .get("tool_use_id")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::bad_request(format!(
                                    "{place}.tool_use_id: Field required"
                                ))
                                .param(format!("{place}.tool_use_id"))
                            })?
                            .to_owned();
                        let mut result = match block.get("content") {
                            None | Some(Value::Null) => Vec::new(),
                            Some(Value::String(text)) => vec![Part::text(text.clone())],
                            Some(inner) => block_parts(inner, &format!("{place}.content"))?,
                        };
                        if block.get("is_error") == Some(&Value::Bool(true)) {
                            result.insert(0, Part::text("(the tool reported an error)"));
                        }
                        let name = name_of_call(out, &call_id);
                        out.push(Message::Tool {
                            call_id,
                            name,
                            parts: result,
                        });
                    }
                    _ => parts.extend(
                        block_parts(&Value::Array(vec![block.clone()]), at)?
                            .into_iter()
                            .map(|p| relocate(p, &place)),
                    ),
                }
            }
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "{at}.content: must be a string or a list of content blocks"
            ))
            .param(format!("{at}.content")));
        }
    }
    if !parts.is_empty() {
        let empty = parts
            .iter()
            .all(|p| matches!(p, Part::Text { text } if text.trim().is_empty()));
        if empty {
            return Err(ApiError::bad_request(format!(
                "{at}.content: text content blocks must be non-empty"
            ))
            .param(format!("{at}.content")));
        }
        out.push(Message::User { parts });
    } else if !matches!(content, Value::Array(b) if !b.is_empty()) {
        return Err(
            ApiError::bad_request(format!("{at}.content: must not be empty"))
                .param(format!("{at}.content")),
        );
    }
    Ok(())
}

fn relocate(part: Part, place: &str) -> Part {
    match part {
        Part::Image { media, .. } => Part::Image {
            at: place.into(),
            media: media.at(place),
        },
        Part::File { media, .. } => Part::File {
            at: place.into(),
            media: media.at(place),
        },
        text => text,
    }
}

fn name_of_call(messages: &[Message], call_id: &str) -> Option<String> {
    messages.iter().rev().find_map(|m| match m {
        Message::Assistant { calls, .. } => calls
            .iter()
            .find(|c| c.id == call_id)
            .map(|c| c.name.clone()),
        _ => None,
    })
}

fn assistant_turn(content: &Value, at: &str) -> Result<Message, ApiError> {
    let blocks = match content {
        Value::String(text) => {
            return Ok(Message::Assistant {
                text: text.clone(),
                calls: Vec::new(),
            });
        }
        Value::Array(blocks) => blocks,
        _ => {
            return Err(ApiError::bad_request(format!(
                "{at}.content: must be a string or a list of content blocks"
            ))
            .param(format!("{at}.content")));
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let place = format!("{at}.content.{j}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let field = |key: &str| {
                    block.get(key).and_then(Value::as_str).ok_or_else(|| {
                        ApiError::bad_request(format!("{place}.{key}: Field required"))
                            .param(format!("{place}.{key}"))
                    })
                };
                calls.push(ToolCall {
                    id: field("id")?.to_owned(),
                    name: field("name")?.to_owned(),
                    arguments: block.get("input").cloned().unwrap_or(json!({})).to_string(),
                });
            }
            // The site's own thinking is not sent back to it.
            Some("thinking") | Some("redacted_thinking") => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "{place}.type: content blocks of type '{}' are not supported",
                    other.unwrap_or("(none)")
                ))
                .param(format!("{place}.type")));
            }
        }
    }
    Ok(Message::Assistant { text, calls })
}

/// Text, image and document blocks as parts.
fn block_parts(blocks: &Value, at: &str) -> Result<Vec<Part>, ApiError> {
    let mut parts = Vec::new();
    for (j, block) in blocks.as_array().into_iter().flatten().enumerate() {
        let place = format!("{at}.{j}");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = block.get("text").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::bad_request(format!("{place}.text: Field required"))
                        .param(format!("{place}.text"))
                })?;
                parts.push(Part::text(text));
            }
            Some("image") => parts.push(super::media::anthropic_block(block, &place, true)?),
            Some("document") => parts.push(super::media::anthropic_block(block, &place, false)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "{place}.type: content blocks of type '{}' are not supported here",
                    other.unwrap_or("(none)")
                ))
                .param(format!("{place}.type")));
            }
        }
    }
    Ok(parts)
}

fn blocks_text(blocks: &Value, at: &str) -> Result<String, ApiError> {
    let parts = block_parts(blocks, at)?;
    Ok(parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Block {
    Thinking,
    Text,
}

/// Reply events → Messages stream events; also keeps the content blocks for a whole reply.
struct MessageEncoder {
    id: String,
    model: String,
    input_tokens: u64,
    blocks: Vec<Value>,
    open: Option<Block>,
    finished: bool,
}

impl MessageEncoder {
    fn close(&mut self, out: &mut Vec<Bytes>) {
        if self.open.take().is_some() {
            let index = self.blocks.len() - 1;
            out.push(named_frame(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// Appends to the open block of `kind`, opening it first when needed.
    fn append(&mut self, kind: Block, piece: String, out: &mut Vec<Bytes>) {
        if self.open != Some(kind) {
            self.close(out);
            let block = match kind {
                Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                Block::Text => json!({"type": "text", "text": ""}),
            };
            out.push(named_frame(
                "content_block_start",
                &json!({"type": "content_block_start", "index": self.blocks.len(),
                    "content_block": block}),
            ));
            self.blocks.push(block);
            self.open = Some(kind);
        }
        let index = self.blocks.len() - 1;
        let (field, delta) = match kind {
            Block::Thinking => (
                "thinking",
                json!({"type": "thinking_delta", "thinking": piece}),
            ),
            Block::Text => ("text", json!({"type": "text_delta", "text": piece})),
        };
        if let Some(Value::String(text)) = self.blocks[index].get_mut(field) {
            text.push_str(&piece);
        }
        out.push(named_frame(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }
}

impl Encoder for MessageEncoder {
    fn start(&mut self, out: &mut Vec<Bytes>) {
        out.push(named_frame(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage(self.input_tokens, 0),
            }}),
        ));
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        match event {
            Event::Reasoning(text) => self.append(Block::Thinking, text, out),
            Event::Text(text) => self.append(Block::Text, text, out),
            Event::ToolCall(call) => {
                self.close(out);
                let index = self.blocks.len();
                let input: Value = serde_json::from_str(&call.arguments).unwrap_or(json!({}));
                out.push(named_frame(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": call.id, "name": call.name, "input": {}}}),
                ));
                out.push(named_frame(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": call.arguments}}),
                ));
                out.push(named_frame(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                ));
                self.blocks.push(
                    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}),
                );
            }
            Event::Finish(finish) => {
                self.close(out);
                self.finished = true;
                let (stop_reason, stop_sequence, output_tokens) = stop_of(&finish);
                out.push(named_frame(
                    "message_delta",
                    &json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                        "usage": {"output_tokens": output_tokens}}),
                ));
                out.push(named_frame(
                    "message_stop",
                    &json!({"type": "message_stop"}),
                ));
            }
        }
    }

    fn error(&mut self, error: ApiError, out: &mut Vec<Bytes>) {
        self.finished = true;
        out.push(named_frame("error", &error.anthropic_body()));
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if !self.finished {
            self.error(
                ApiError::bad_gateway("The site's reply ended unexpectedly."),
                out,
            );
        }
    }

    fn keep_alive(&self) -> Bytes {
        named_frame("ping", &json!({"type": "ping"}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(json: &str) -> Result<chat::Request, ApiError> {
        request_from(parse_json(json.as_bytes()).unwrap())
    }

    #[test]
    fn tool_use_round_trips_translate() {
        let r = translated(
            r#"{"model":"m","max_tokens":100,"system":[{"type":"text","text":"Be brief."}],
            "stop_sequences":["END"],
            "tools":[{"name":"get_weather","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"any","disable_parallel_tool_use":true},
            "messages":[{"role":"user","content":"weather?"},
              {"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},
                {"type":"text","text":"Checking."},
                {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1",
                "content":[{"type":"text","text":"sunny"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}}]},
                {"type":"text","text":"and now?"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(100));
        assert_eq!(r.stop, vec!["END".to_owned()]);
        assert_eq!(r.tool_choice, ToolChoice::Required);
        assert!(!r.parallel_tool_calls);
        assert_eq!(r.messages.len(), 5);
        assert!(matches!(&r.messages[2], Message::Assistant { text, calls }
            if text == "Checking." && calls[0].arguments == r#"{"city":"Paris"}"#));
        assert!(
            matches!(&r.messages[3], Message::Tool { name: Some(n), parts, .. }
            if n == "get_weather" && parts.len() == 2)
        );
        assert!(r.check().is_ok(), "an image inside a tool result is fine");
    }

    #[test]
    fn bad_input_is_named_in_anthropic_terms() {
        for (json, param) in [
            (
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"bot","content":"x"}]}"#,
                "messages.0.role",
            ),
            (
                r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":""}]}"#,
                "messages.0.content",
            ),
            (
                r#"{"model":"m","max_tokens":1,"temperature":1.5,"messages":[{"role":"user","content":"x"}]}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","max_tokens":1,"tools":[{"type":"web_search_20250305","name":"w"}],"messages":[{"role":"user","content":"x"}]}"#,
                "tools.0.type",
            ),
            (
                r#"{"model":"m","max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
        ] {
            let err = translated(json).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{json}: {err}");
        }
    }
}
