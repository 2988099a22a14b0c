//! The OpenAI Responses API (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`),
//! which the Codex CLI speaks: input items translated to the internal [`chat::Request`], reply
//! events to output items and the streamed event sequence (`response.created` …
//! `response.completed`, each with its `sequence_number`).
//!
//! `previous_response_id` rebuilds the conversation from the stored response, so the gateway's
//! conversation continuation applies as for any resent history. Responses are stored (sealed)
//! unless `store` is false; the store write finishes before `response.completed` goes out, so
//! a client may chain on it at once.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::extract::Path;
use super::extract::{TIER_HEADER, read_body};
use super::front::{self, Encoder, Hold, SseBody, named_frame};
use crate::chat::{self, Event, FinishReason, Message, OutputFormat, Part, ToolCall, ToolChoice};
use crate::store::Store;

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub conversation: Option<Value>,
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let forced_tier = super::extract::forced_tier(&headers)?;
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let wire: ResponsesRequest = super::extract::parse_request(&bytes, "responses")?;
    crate::chat::ignored::note_set(
        "responses",
        &[
            ("temperature", wire.temperature.is_some()),
            ("top_p", wire.top_p.is_some()),
        ],
    );
    let store = state.gateway.store().clone();
    let earlier = match &wire.previous_response_id {
        Some(id) => previous_conversation(&store, id).await?,
        None => Vec::new(),
    };
    let stream = wire.stream.unwrap_or(false);
    let (mut request, instructed) = request_from(&wire, earlier)?;
    front::admit(&state, &mut request).await?;
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let mut builder = Builder::new(&id, &wire, &request);
    builder.store = wire.store.unwrap_or(true).then(|| Keep {
        store,
        conversation: request.messages[usize::from(instructed)..].to_vec(),
    });
    let started = chat::start(state.gateway.clone(), request, &id, forced_tier).await?;
    builder.prompt_tokens = started.prompt_tokens;
    if stream {
        return Ok(SseBody::new(started.events, builder).into_response(started.tier));
    }
    let tier = header::HeaderValue::from(u16::from(started.tier));
    let mut frames = Vec::new();
    let reply = chat::run::collect_events(started.events).await?;
    builder.start(&mut frames);
    for event in reply {
        builder.event(event, &mut frames);
    }
    if let Some(hold) = builder.hold() {
        hold.await;
    }
    Ok((
        StatusCode::OK,
        [(TIER_HEADER, tier)],
        axum::Json(builder.object()),
    )
        .into_response())
}

pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let stored = state.gateway.store().find_response(&id).await?;
    stored
        .and_then(|mut s| s.get_mut("response").map(Value::take))
        .map(axum::Json)
        .ok_or_else(|| response_not_found(&id, "id"))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    if !state.gateway.store().delete_response(&id).await? {
        return Err(response_not_found(&id, "id"));
    }
    Ok(axum::Json(
        json!({"id": id, "object": "response.deleted", "deleted": true}),
    ))
}

fn response_not_found(id: &str, param: &str) -> ApiError {
    ApiError::not_found(format!("Response with id '{id}' not found.")).param(param)
}

/// The conversation a stored response ended with (its input and its output).
async fn previous_conversation(store: &Store, id: &str) -> Result<Vec<Message>, ApiError> {
    let stored = store.find_response(id).await?.ok_or_else(|| {
        ApiError::bad_request(format!("Previous response with id '{id}' not found."))
            .param("previous_response_id")
            .code("previous_response_not_found")
    })?;
    serde_json::from_value(stored["conversation"].clone())
        .map_err(|_| ApiError::internal("A stored response could not be read."))
}

/// The internal request, and whether its first message is this request's `instructions`
/// (which apply to this request only, so they are not stored with the conversation).
fn request_from(
    wire: &ResponsesRequest,
    earlier: Vec<Message>,
) -> Result<(chat::Request, bool), ApiError> {
    if wire.background == Some(true) {
        return Err(
            ApiError::bad_request("Background responses are not supported.").param("background"),
        );
    }
    if wire.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::bad_request(
            "`conversation` is not supported; use `previous_response_id`.",
        )
        .param("conversation"));
    }
    front::bounded("temperature", wire.temperature, 0.0, 2.0)?;
    front::bounded("top_p", wire.top_p, 0.0, 1.0)?;
    let input = input_messages(&wire.input, &earlier)?;
    let mut messages = Vec::new();
    let instructions = wire.instructions.as_ref().filter(|i| !i.trim().is_empty());
    if let Some(instructions) = instructions {
        messages.push(Message::System {
            text: instructions.clone(),
        });
    }
    messages.extend(earlier);
    messages.extend(input);
    let mut request = chat::Request::new(wire.model.clone(), messages);
    request.max_tokens = front::token_limit("max_output_tokens", wire.max_output_tokens)?;
    request.parallel_tool_calls = wire.parallel_tool_calls.unwrap_or(true);
    for (i, tool) in wire.tools.iter().flatten().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(ApiError::bad_request(format!(
                "Tools of type `{kind}` are not supported; use `function` tools."
            ))
            .param(format!("tools[{i}].type")));
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad_request("A function tool needs a `name`.")
                .param(format!("tools[{i}].name"))
        })?;
        request.tools.push(chat::Tool {
            name: name.to_owned(),
            description: tool
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned),
            parameters: tool
                .get("parameters")
                .filter(|p| !p.is_null())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
    }
    request.tool_choice = match &wire.tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(choice) => match choice.get("name").and_then(Value::as_str) {
            Some(name) if choice.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Named(name.to_owned())
            }
            _ => {
                return Err(ApiError::bad_request(
                    "Invalid `tool_choice`: use \"auto\", \"none\", \"required\" or {\"type\": \
                     \"function\", \"name\": …}.",
                )
                .param("tool_choice"));
            }
        },
    };
    request.format = match wire.text.as_ref().and_then(|t| t.get("format")) {
        None | Some(Value::Null) => OutputFormat::Text,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => OutputFormat::Text,
            Some("json_object") => OutputFormat::JsonObject,
            Some("json_schema") => OutputFormat::JsonSchema {
                name: format
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("response")
                    .to_owned(),
                schema: format.get("schema").cloned().ok_or_else(|| {
                    ApiError::bad_request("`text.format.schema` is required.")
                        .param("text.format.schema")
                })?,
            },
            _ => {
                return Err(ApiError::bad_request(
                    "Unknown `text.format.type`: use text, json_object or json_schema.",
                )
                .param("text.format.type"));
            }
        },
    };
    Ok((request, instructions.is_some()))
}

/// `input`: a string, or a list of items (messages, `function_call`, `function_call_output`;
/// `reasoning` items are the site's own thinking and are not sent back).
fn input_messages(input: &Value, earlier: &[Message]) -> Result<Vec<Message>, ApiError> {
    let items = match input {
        Value::String(text) if !text.trim().is_empty() => {
            return Ok(vec![Message::User {
                parts: vec![Part::text(text.clone())],
            }]);
        }
        Value::Array(items) if !items.is_empty() => items,
        _ => {
            return Err(ApiError::bad_request(
                "`input` must be a non-empty string or a non-empty list of items.",
            )
            .param("input"));
        }
    };
    let mut out: Vec<Message> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => out.push(message_item(item, &at)?),
            "function_call" => {
                let text = |key: &str| {
                    item.get(key).and_then(Value::as_str).ok_or_else(|| {
                        ApiError::bad_request(format!("A `function_call` item needs `{key}`."))
                            .param(format!("{at}.{key}"))
                    })
                };
                let call = ToolCall {
                    id: text("call_id")?.to_owned(),
                    name: text("name")?.to_owned(),
                    arguments: item
                        .get("arguments")
                        .and_then(Value::as_str)
                        .unwrap_or("{}")
                        .to_owned(),
                };
                // Calls after an assistant turn belong to it.
                match out.last_mut() {
                    Some(Message::Assistant { calls, .. }) => calls.push(call),
                    _ => out.push(Message::Assistant {
                        text: String::new(),
                        calls: vec![call],
                    }),
                }
            }
            "function_call_output" => {
                let call_id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad_request("A `function_call_output` item needs `call_id`.")
                            .param(format!("{at}.call_id"))
                    })?
                    .to_owned();
                let parts = match item.get("output") {
                    Some(Value::String(s)) => vec![Part::text(s.clone())],
                    Some(parts @ Value::Array(_)) => content_parts(parts, &format!("{at}.output"))?,
                    _ => {
                        return Err(ApiError::bad_request(
                            "A `function_call_output` item needs an `output`.",
                        )
                        .param(format!("{at}.output")));
                    }
                };
                let name = earlier.iter().chain(out.iter()).find_map(|m| match m {
                    Message::Assistant { calls, .. } => calls
                        .iter()
                        .find(|c| c.id == call_id)
                        .map(|c| c.name.clone()),
                    _ => None,
                });
                out.push(Message::Tool {
                    call_id,
                    name,
                    parts,
                });
            }
            "reasoning" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "Input items of type `{other}` are not supported."
                ))
                .param(format!("{at}.type")));
            }
        }
    }
    if out.is_empty() {
        return Err(ApiError::bad_request("`input` holds nothing to send.").param("input"));
    }
    Ok(out)
}

fn message_item(item: &Value, at: &str) -> Result<Message, ApiError> {
    let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
    let content = item.get("content").unwrap_or(&Value::Null);
    let parts = match content {
        Value::String(s) => vec![Part::text(s.clone())],
        Value::Array(_) => content_parts(content, &format!("{at}.content"))?,
        _ => {
            return Err(
                ApiError::bad_request("A message needs `content`.").param(format!("{at}.content"))
            );
        }
    };
    let text = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let attachments = parts.iter().any(|p| !matches!(p, Part::Text { .. }));
    if text.trim().is_empty() && !attachments {
        return Err(
            ApiError::bad_request(format!("`{at}.content` must not be empty."))
                .param(format!("{at}.content")),
        );
    }
    match role {
        "user" => Ok(Message::User { parts }),
        "system" | "developer" => Ok(Message::System { text }),
        "assistant" => Ok(Message::Assistant {
            text,
            calls: Vec::new(),
        }),
        other => {
            Err(ApiError::bad_request(format!("Unknown role `{other}`."))
                .param(format!("{at}.role")))
        }
    }
}

fn content_parts(parts: &Value, at: &str) -> Result<Vec<Part>, ApiError> {
    let mut out = Vec::new();
    for (j, part) in parts.as_array().into_iter().flatten().enumerate() {
        let place = format!("{at}[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("input_text") | Some("output_text") | Some("text") => {
                let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::bad_request("A text part needs a string `text`.")
                        .param(format!("{place}.text"))
                })?;
                out.push(Part::text(text));
            }
            Some("refusal") => out.push(Part::text(
                part.get("refusal").and_then(Value::as_str).unwrap_or(""),
            )),
            Some("input_image") => out.push(super::media::responses_image(part, &place)?),
            Some("input_file") => out.push(super::media::openai_file(part, &place)?),
            other => {
                return Err(ApiError::bad_request(format!(
                    "Content parts of type `{}` are not supported.",
                    other.unwrap_or("(none)")
                ))
                .param(format!("{place}.type")));
            }
        }
    }
    Ok(out)
}

/// Where to keep the finished response.
struct Keep {
    store: Store,
    conversation: Vec<Message>,
}

/// The output item being streamed.
enum Open {
    None,
    Reasoning { id: String, text: String },
    Message { id: String, text: String },
}

/// Builds the response object and its streamed events from the reply events.
struct Builder {
    id: String,
    created_at: i64,
    model: String,
    /// Request fields echoed in the response object.
    echo: serde_json::Map<String, Value>,
    output: Vec<Value>,
    open: Open,
    sequence: u64,
    status: &'static str,
    usage: Option<chat::Usage>,
    error: Option<Value>,
    prompt_tokens: u64,
    /// The reply's text and calls, for the stored conversation.
    text: String,
    calls: Vec<ToolCall>,
    store: Option<Keep>,
}

impl Builder {
    fn new(id: &str, wire: &ResponsesRequest, request: &chat::Request) -> Self {
        let mut echo = serde_json::Map::new();
        echo.insert("instructions".into(), json!(wire.instructions));
        echo.insert("max_output_tokens".into(), json!(wire.max_output_tokens));
        echo.insert(
            "parallel_tool_calls".into(),
            json!(request.parallel_tool_calls),
        );
        echo.insert(
            "previous_response_id".into(),
            json!(wire.previous_response_id),
        );
        echo.insert("store".into(), json!(wire.store.unwrap_or(true)));
        echo.insert("temperature".into(), json!(wire.temperature.unwrap_or(1.0)));
        echo.insert("top_p".into(), json!(wire.top_p.unwrap_or(1.0)));
        echo.insert(
            "tool_choice".into(),
            wire.tool_choice.clone().unwrap_or(json!("auto")),
        );
        echo.insert(
            "tools".into(),
            json!(wire.tools.clone().unwrap_or_default()),
        );
        echo.insert(
            "text".into(),
            wire.text
                .clone()
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        );
        echo.insert(
            "metadata".into(),
            wire.metadata.clone().unwrap_or_else(|| json!({})),
        );
        echo.insert("reasoning".into(), json!({"effort": null, "summary": null}));
        echo.insert("truncation".into(), json!("disabled"));
        Self {
            id: id.to_owned(),
            created_at: crate::store::now(),
            model: request.model.clone(),
            echo,
            output: Vec::new(),
            open: Open::None,
            sequence: 0,
            status: "in_progress",
            usage: None,
            error: None,
            prompt_tokens: 0,
            text: String::new(),
            calls: Vec::new(),
            store: None,
        }
    }

    fn object(&self) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": if self.status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "model": self.model,
            "output": self.output,
            "usage": self.usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.total(),
            })),
        });
        if let Value::Object(map) = &mut object {
            map.extend(self.echo.clone());
        }
        object
    }

    fn emit(&mut self, kind: &str, mut data: Value, out: &mut Vec<Bytes>) {
        if let Value::Object(map) = &mut data {
            map.insert("type".into(), json!(kind));
            map.insert("sequence_number".into(), json!(self.sequence));
        }
        self.sequence += 1;
        out.push(named_frame(kind, &data));
    }

    fn close(&mut self, out: &mut Vec<Bytes>) {
        let index = self.output.len();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Reasoning { id, text } => {
                let part = json!({"type": "summary_text", "text": text});
                let common = json!({"item_id": id, "output_index": index, "summary_index": 0});
                self.emit(
                    "response.reasoning_summary_text.done",
                    with(&common, "text", json!(text)),
                    out,
                );
                self.emit(
                    "response.reasoning_summary_part.done",
                    with(&common, "part", part.clone()),
                    out,
                );
                let item = json!({"id": id, "type": "reasoning", "summary": [part]});
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                    out,
                );
                self.output.push(item);
            }
            Open::Message { id, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let common = json!({"item_id": id, "output_index": index, "content_index": 0});
                self.emit(
                    "response.output_text.done",
                    with(&common, "text", json!(text)),
                    out,
                );
                self.emit(
                    "response.content_part.done",
                    with(&common, "part", part.clone()),
                    out,
                );
                let item = json!({"id": id, "type": "message", "status": "completed",
                    "role": "assistant", "content": [part]});
                self.emit(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                    out,
                );
                self.output.push(item);
            }
        }
    }

    fn reasoning(&mut self, delta: String, out: &mut Vec<Bytes>) {
        if !matches!(self.open, Open::Reasoning { .. }) {
            self.close(out);
            let index = self.output.len();
            let id = item_id("rs");
            let item = json!({"id": id, "type": "reasoning", "summary": []});
            self.emit(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
                out,
            );
            self.emit(
                "response.reasoning_summary_part.added",
                json!({"item_id": id, "output_index": index, "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""}}),
                out,
            );
            self.open = Open::Reasoning {
                id,
                text: String::new(),
            };
        }
        let index = self.output.len();
        if let Open::Reasoning { id, text } = &mut self.open {
            text.push_str(&delta);
            let data =
                json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": delta});
            self.emit("response.reasoning_summary_text.delta", data, out);
        }
    }

    fn text(&mut self, delta: String, out: &mut Vec<Bytes>) {
        self.text.push_str(&delta);
        if !matches!(self.open, Open::Message { .. }) {
            self.close(out);
            let index = self.output.len();
            let id = item_id("msg");
            let item = json!({"id": id, "type": "message", "status": "in_progress",
                "role": "assistant", "content": []});
            self.emit(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
                out,
            );
            self.emit(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
                out,
            );
            self.open = Open::Message {
                id,
                text: String::new(),
            };
        }
        let index = self.output.len();
        if let Open::Message { id, text } = &mut self.open {
            text.push_str(&delta);
            let data = json!({"item_id": id, "output_index": index, "content_index": 0,
                "delta": delta, "logprobs": []});
            self.emit("response.output_text.delta", data, out);
        }
    }

    fn call(&mut self, call: ToolCall, out: &mut Vec<Bytes>) {
        self.close(out);
        let index = self.output.len();
        let id = item_id("fc");
        let mut item = json!({"id": id, "type": "function_call", "status": "in_progress",
            "call_id": call.id, "name": call.name, "arguments": ""});
        self.emit(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
            out,
        );
        let common = json!({"item_id": id, "output_index": index});
        self.emit(
            "response.function_call_arguments.delta",
            with(&common, "delta", json!(call.arguments)),
            out,
        );
        self.emit(
            "response.function_call_arguments.done",
            with(&common, "arguments", json!(call.arguments)),
            out,
        );
        item["status"] = json!("completed");
        item["arguments"] = json!(call.arguments);
        self.emit(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            out,
        );
        self.output.push(item);
        self.calls.push(call);
    }
}

/// `base` with one more field.
fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut out = base.clone();
    out[key] = value;
    out
}

fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl Encoder for Builder {
    fn start(&mut self, out: &mut Vec<Bytes>) {
        let response = self.object();
        self.emit(
            "response.created",
            json!({"response": response.clone()}),
            out,
        );
        self.emit("response.in_progress", json!({"response": response}), out);
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        match event {
            Event::Reasoning(text) => self.reasoning(text, out),
            Event::Text(text) => self.text(text, out),
            Event::ToolCall(call) => self.call(call, out),
            Event::Finish(finish) => {
                self.close(out);
                self.usage = Some(finish.usage.unwrap_or_default()).map(|mut u| {
                    u.prompt_tokens = self.prompt_tokens;
                    u
                });
                let kind = match finish.reason {
                    FinishReason::Length => {
                        self.status = "incomplete";
                        "response.incomplete"
                    }
                    _ => {
                        self.status = "completed";
                        "response.completed"
                    }
                };
                let response = self.object();
                self.emit(kind, json!({"response": response}), out);
            }
        }
    }

    fn error(&mut self, error: ApiError, out: &mut Vec<Bytes>) {
        self.close(out);
        self.status = "failed";
        self.error = Some(json!({
            "code": error.code.unwrap_or("server_error"),
            "message": error.message,
        }));
        let response = self.object();
        self.emit("response.failed", json!({"response": response}), out);
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if self.status == "in_progress" {
            self.error(
                ApiError::bad_gateway("The site's reply ended unexpectedly."),
                out,
            );
        }
    }

    /// Stores the finished response before `response.completed` goes out.
    fn hold(&mut self) -> Option<Hold> {
        if !matches!(self.status, "completed" | "incomplete") {
            return None;
        }
        let keep = self.store.take()?;
        let mut conversation = keep.conversation;
        conversation.push(Message::Assistant {
            text: std::mem::take(&mut self.text),
            calls: std::mem::take(&mut self.calls),
        });
        let body = json!({"response": self.object(), "conversation": conversation});
        let (id, model) = (self.id.clone(), self.model.clone());
        Some(Box::pin(async move {
            if let Err(e) = keep.store.save_response(&id, &model, &body).await {
                tracing::warn!(response = %id, error = %e, "could not store a response");
            }
        }))
    }
}
