//! `POST /v1/chat/completions`, `GET /v1/models` and `GET /v1/models/{id}`: the OpenAI wire
//! format translated to the internal [`chat::Request`] and the reply events back.
//!
//! Streaming: the gateway has already seen the site's first text when the 200 goes out; each
//! event becomes chunks as it arrives, a failure after that becomes an error event followed by
//! `[DONE]`, and a client that goes away drops the reply, which cancels the call to the site.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use super::extract::Path;
use super::extract::{TIER_HEADER, forced_tier, parse_request, read_body};
use super::front::{self, Encoder, SseBody};
use crate::chat::{self, Event, FinishReason, Message, OutputFormat, Part, ToolCall, ToolChoice};
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatMessage, ChatRequest, Choice, ChunkEncoder, Model,
    ModelList, Usage, WireFunction, WireToolCall, error_frame,
};
use crate::role::Role;

pub async fn models(State(state): State<AppState>) -> Result<axum::Json<ModelList>, ApiError> {
    Ok(axum::Json(ModelList {
        object: "list",
        data: serving_models(&state).await?,
    }))
}

pub async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<Model>, ApiError> {
    let models = serving_models(&state).await?;
    let known: Vec<String> = models.iter().map(|m| m.id.clone()).collect();
    models
        .into_iter()
        .find(|m| m.id == id)
        .map(axum::Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "The model `{id}` does not exist. {}",
                crate::gateway::available_models(&known)
            ))
            .code("model_not_found")
            .param("model")
        })
}

/// The services that can serve now: an enabled account and a flow. `owned_by` is the site.
pub async fn serving_models(state: &AppState) -> Result<Vec<Model>, ApiError> {
    let store = state.gateway.store();
    let created = crate::store::now();
    let mut models: Vec<Model> = Vec::new();
    for account in store.accounts().await?.into_iter().filter(|a| a.enabled) {
        if models.iter().any(|m| m.id == account.service)
            || store.active_flow(&account.service).await?.is_none()
        {
            continue;
        }
        let owned_by = url::Url::parse(&account.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| account.url.clone());
        models.push(Model {
            id: account.service,
            object: "model",
            created,
            owned_by,
        });
    }
    Ok(models)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let forced_tier = forced_tier(&headers)?;
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let wire: ChatRequest = parse_request(&bytes, "chat.completions")?;
    crate::chat::ignored::note_set(
        "chat.completions",
        &[
            ("temperature", wire.temperature.is_some()),
            ("top_p", wire.top_p.is_some()),
            ("presence_penalty", wire.presence_penalty.is_some()),
            ("frequency_penalty", wire.frequency_penalty.is_some()),
        ],
    );
    let stream = wire.stream.unwrap_or(false);
    let include_usage = wire
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let Translated {
        mut request,
        legacy,
    } = request_from(wire)?;
    request.count_usage = !stream || include_usage;
    // Before anything else sees the request: inline credentials out, checks.
    front::admit(&state, &mut request).await?;
    let model = request.model.clone();
    let request_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let started = chat::start(state.gateway.clone(), request, &request_id, forced_tier).await?;
    let created = crate::store::now();
    if stream {
        let encoder = ChatEncoder {
            chunks: ChunkEncoder::new(&request_id, created, &model),
            legacy,
            include_usage,
            calls: 0,
            finished: false,
        };
        return Ok(SseBody::new(started.events, encoder).into_response(started.tier));
    }
    let tier = header::HeaderValue::from(u16::from(started.tier));
    let reply = chat::run::collect(started.events).await?;
    let finish = reply.finish.unwrap_or(chat::reply::Finish {
        reason: FinishReason::Stop,
        usage: None,
    });
    let calls: Vec<WireToolCall> = reply.calls.iter().map(wire_call).collect();
    let (tool_calls, function_call) = match (legacy, calls.is_empty()) {
        (_, true) => (None, None),
        (true, false) => (None, calls.into_iter().next().map(|c| c.function)),
        (false, false) => (Some(calls), None),
    };
    let content = match (
        reply.text.is_empty(),
        tool_calls.is_some() || function_call.is_some(),
    ) {
        (true, true) => None,
        _ => Some(reply.text),
    };
    let completion = ChatCompletion {
        id: request_id,
        object: "chat.completion",
        created,
        model,
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                reasoning_content: (!reply.reasoning.is_empty()).then_some(reply.reasoning),
                tool_calls,
                function_call,
                refusal: None,
            },
            finish_reason: finish_reason(&finish.reason, legacy),
            logprobs: None,
        }],
        usage: finish.usage.map(Usage::from).unwrap_or_default(),
    };
    Ok((
        StatusCode::OK,
        [(TIER_HEADER, tier)],
        axum::Json(completion),
    )
        .into_response())
}

fn finish_reason(reason: &FinishReason, legacy: bool) -> &'static str {
    match reason {
        FinishReason::ToolCalls if legacy => "function_call",
        other => other.openai(),
    }
}

fn wire_call(call: &ToolCall) -> WireToolCall {
    WireToolCall {
        id: call.id.clone(),
        kind: "function".into(),
        function: WireFunction {
            name: call.name.clone(),
            arguments: Value::String(call.arguments.clone()),
        },
    }
}

/// The internal request, and whether the client used the legacy `functions` form (its reply
/// then carries `function_call`).
struct Translated {
    request: chat::Request,
    legacy: bool,
}

/// Translates the wire request, refusing what cannot be honoured with a 400 naming the field.
fn request_from(wire: ChatRequest) -> Result<Translated, ApiError> {
    if wire.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("Only `n = 1` is supported.").param("n"));
    }
    if wire.logprobs == Some(true) {
        return Err(ApiError::bad_request(
            "`logprobs` is not supported: chat sites do not expose token probabilities.",
        )
        .param("logprobs"));
    }
    if wire.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::bad_request(
            "`top_logprobs` is not supported: chat sites do not expose token probabilities.",
        )
        .param("top_logprobs"));
    }
    if wire
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        return Err(
            ApiError::bad_request("Only the `text` modality is supported.").param("modalities"),
        );
    }
    // Accepted and ignored (the site samples as it likes), but OpenAI's bounds hold.
    front::bounded("temperature", wire.temperature, 0.0, 2.0)?;
    front::bounded("top_p", wire.top_p, 0.0, 1.0)?;
    front::bounded("presence_penalty", wire.presence_penalty, -2.0, 2.0)?;
    front::bounded("frequency_penalty", wire.frequency_penalty, -2.0, 2.0)?;
    let max_tokens = front::token_limit("max_tokens", wire.max_tokens)?;
    let max_completion = front::token_limit("max_completion_tokens", wire.max_completion_tokens)?;
    let legacy = wire.tools.is_none() && wire.functions.is_some();
    let mut request = chat::Request::new(wire.model, messages_from(wire.messages)?);
    request.max_tokens = match (max_tokens, max_completion) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    request.stop = stop_from(wire.stop)?;
    request.format = format_from(wire.response_format)?;
    request.include_reasoning = wire.include_reasoning.unwrap_or(true);
    request.parallel_tool_calls = wire.parallel_tool_calls.unwrap_or(true) && !legacy;
    if legacy {
        let functions = wire.functions.unwrap_or_default();
        request.tools = functions.into_iter().map(tool_from).collect();
        request.tool_choice = choice_from(wire.function_call.as_ref(), "function_call")?;
    } else {
        let mut tools = Vec::new();
        for (i, tool) in wire.tools.unwrap_or_default().into_iter().enumerate() {
            if tool.kind != "function" {
                return Err(ApiError::bad_request(format!(
                    "Tools of type `{}` are not supported; use `function` tools.",
                    tool.kind
                ))
                .param(format!("tools[{i}].type")));
            }
            let function = tool.function.ok_or_else(|| {
                ApiError::bad_request("A function tool needs `function`.")
                    .param(format!("tools[{i}].function"))
            })?;
            tools.push(tool_from(function));
        }
        request.tools = tools;
        request.tool_choice = choice_from(wire.tool_choice.as_ref(), "tool_choice")?;
    }
    Ok(Translated { request, legacy })
}

fn tool_from(function: crate::openai::FunctionDef) -> chat::Tool {
    chat::Tool {
        name: function.name,
        description: function.description,
        parameters: function
            .parameters
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
    }
}

/// `tool_choice` (or the legacy `function_call`).
fn choice_from(value: Option<&Value>, param: &str) -> Result<ToolChoice, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "Invalid `{param}`: use \"auto\", \"none\", \"required\" or a named function."
        ))
        .param(param)
    };
    Ok(match value {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" | "any" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(object) => {
            let name = object
                .pointer("/function/name")
                .or_else(|| object.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            ToolChoice::Named(name.to_owned())
        }
    })
}

fn stop_from(value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let stops = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => {
            if items.len() > 4 {
                return Err(
                    ApiError::bad_request("`stop` takes at most 4 sequences.").param("stop")
                );
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    _ => Err(
                        ApiError::bad_request("Each stop sequence must be a string.")
                            .param(format!("stop[{i}]")),
                    ),
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("`stop` must be a string or a list of strings.")
                    .param("stop"),
            );
        }
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

fn format_from(value: Option<crate::openai::ResponseFormat>) -> Result<OutputFormat, ApiError> {
    let Some(format) = value else {
        return Ok(OutputFormat::Text);
    };
    match format.kind.as_str() {
        "text" => Ok(OutputFormat::Text),
        "json_object" => Ok(OutputFormat::JsonObject),
        "json_schema" => {
            let spec = format.json_schema.ok_or_else(|| {
                ApiError::bad_request("`response_format.json_schema` is required.")
                    .param("response_format.json_schema")
            })?;
            let schema = spec.schema.ok_or_else(|| {
                ApiError::bad_request("`response_format.json_schema.schema` is required.")
                    .param("response_format.json_schema.schema")
            })?;
            Ok(OutputFormat::JsonSchema {
                name: spec.name.unwrap_or_else(|| "response".into()),
                schema,
            })
        }
        other => Err(ApiError::bad_request(format!(
            "Unknown `response_format.type` `{other}`: use text, json_object or json_schema."
        ))
        .param("response_format.type")),
    }
}

/// The conversation, with every message's content checked (the error names the field).
fn messages_from(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.into_iter().enumerate() {
        let at = format!("messages[{i}].content");
        if message.content.is_null() && message.role != Role::Assistant {
            return Err(ApiError::bad_request(format!("`{at}` must not be null.")).param(at));
        }
        let parts = parts_from(&message.content, &at)?;
        let text = joined_text(&parts);
        match message.role {
            Role::System | Role::Developer | Role::User
                if text.trim().is_empty()
                    && !parts.iter().any(|p| !matches!(p, Part::Text { .. })) =>
            {
                return Err(ApiError::bad_request(format!("`{at}` must not be empty.")).param(at));
            }
            Role::System | Role::Developer => out.push(Message::System { text }),
            Role::User => out.push(Message::User { parts }),
            Role::Assistant => {
                let mut calls = Vec::new();
                for (j, call) in message.tool_calls.into_iter().flatten().enumerate() {
                    calls.push(call_from(
                        call.id,
                        call.function,
                        &format!("messages[{i}].tool_calls[{j}]"),
                    )?);
                }
                if let Some(function) = message.function_call {
                    let id = function.name.clone();
                    calls.push(call_from(
                        id,
                        function,
                        &format!("messages[{i}].function_call"),
                    )?);
                }
                out.push(Message::Assistant { text, calls });
            }
            Role::Tool => {
                let call_id = message
                    .tool_call_id
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| {
                        ApiError::bad_request("A `tool` message needs `tool_call_id`.")
                            .param(format!("messages[{i}].tool_call_id"))
                    })?;
                out.push(Message::Tool {
                    call_id,
                    name: message.name,
                    parts,
                });
            }
            Role::Function => {
                let name = message.name.filter(|n| !n.is_empty()).ok_or_else(|| {
                    ApiError::bad_request("A `function` message needs `name`.")
                        .param(format!("messages[{i}].name"))
                })?;
                out.push(Message::Tool {
                    call_id: name.clone(),
                    name: Some(name),
                    parts,
                });
            }
        }
    }
    Ok(out)
}

fn call_from(id: String, function: WireFunction, at: &str) -> Result<ToolCall, ApiError> {
    if function.name.is_empty() {
        return Err(
            ApiError::bad_request("A tool call needs a function `name`.")
                .param(format!("{at}.function.name")),
        );
    }
    let arguments = match function.arguments {
        Value::String(s) => s,
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    };
    Ok(ToolCall {
        id: if id.is_empty() {
            chat::request::new_call_id()
        } else {
            id
        },
        name: function.name,
        arguments,
    })
}

/// Content as parts: a string, or a list of `text`, `image_url`, `input_audio` and `file`
/// parts.
fn parts_from(content: &Value, at: &str) -> Result<Vec<Part>, ApiError> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::text(s.clone())]),
        Value::Array(items) => {
            let mut parts = Vec::with_capacity(items.len());
            for (j, item) in items.iter().enumerate() {
                let place = format!("{at}[{j}]");
                match item.get("type").and_then(Value::as_str) {
                    Some("text") | Some("input_text") | Some("output_text") => {
                        let text = item.get("text").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::bad_request("A `text` part needs a string `text`.")
                                .param(format!("{place}.text"))
                        })?;
                        parts.push(Part::text(text));
                    }
                    Some("refusal") => {
                        let text = item.get("refusal").and_then(Value::as_str).unwrap_or("");
                        parts.push(Part::text(text));
                    }
                    Some("image_url") | Some("image") => {
                        parts.push(super::media::openai_image(item, &place)?)
                    }
                    Some("file") => parts.push(super::media::openai_file(
                        item.get("file").unwrap_or(&Value::Null),
                        &place,
                    )?),
                    Some("input_audio") => parts.push(super::media::openai_audio(item, &place)?),
                    Some(other) => {
                        return Err(ApiError::bad_request(format!(
                            "Content parts of type `{other}` are not supported."
                        ))
                        .param(format!("{place}.type")));
                    }
                    None => {
                        return Err(ApiError::bad_request("A content part lacks `type`.")
                            .param(format!("{place}.type")));
                    }
                }
            }
            Ok(parts)
        }
        _ => Err(
            ApiError::bad_request("`content` must be a string or a list of content parts.")
                .param(at),
        ),
    }
}

fn joined_text(parts: &[Part]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    texts.join("\n")
}

/// Reply events → `chat.completion.chunk` frames.
struct ChatEncoder {
    chunks: ChunkEncoder,
    legacy: bool,
    include_usage: bool,
    calls: usize,
    finished: bool,
}

impl Encoder for ChatEncoder {
    fn start(&mut self, out: &mut Vec<Bytes>) {
        out.push(self.chunks.role());
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        match event {
            Event::Text(text) => out.push(self.chunks.content(&text)),
            Event::Reasoning(text) => out.push(self.chunks.reasoning(&text)),
            Event::ToolCall(call) => {
                let frames = match self.legacy {
                    true => self.chunks.function_call(&call),
                    false => self.chunks.tool_call(self.calls, &call),
                };
                self.calls += 1;
                out.extend(frames);
            }
            Event::Finish(finish) => {
                self.finished = true;
                out.push(
                    self.chunks
                        .finish(finish_reason(&finish.reason, self.legacy)),
                );
                if let Some(usage) = finish.usage.filter(|_| self.include_usage) {
                    out.push(self.chunks.usage(usage.into()));
                }
            }
        }
    }

    fn error(&mut self, error: ApiError, out: &mut Vec<Bytes>) {
        self.finished = true;
        out.push(error_frame(&error.body()));
        out.push(ChunkEncoder::done());
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        if !self.finished {
            out.push(self.chunks.finish("stop"));
        }
        out.push(ChunkEncoder::done());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::extract::parse_json;

    #[test]
    fn field_errors_name_the_field() {
        let err = parse_json::<ChatRequest>(
            br#"{"model":"m","messages":[{"role":"boss","content":"x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.param.as_deref(), Some("messages[0].role"), "{err}");
        let err = parse_json::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(err.code, Some("invalid_json"));
        let err = parse_json::<ChatRequest>(br#"{"model":"m"}"#).unwrap_err();
        assert!(err.message.contains("messages"), "{err}");
    }

    #[test]
    fn the_tier_header_takes_1_2_or_3() {
        let with = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(TIER_HEADER, v.parse().unwrap());
            forced_tier(&headers)
        };
        assert_eq!(forced_tier(&HeaderMap::new()).unwrap(), None);
        assert_eq!(with("1").unwrap(), Some(1));
        assert_eq!(with("3").unwrap(), Some(3));
        for bad in ["0", "4", "abc", ""] {
            let err = with(bad).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some(TIER_HEADER));
            assert!(err.message.contains(TIER_HEADER), "{err}");
        }
    }

    fn translated(json: &str) -> Result<chat::Request, ApiError> {
        request_from(parse_json(json.as_bytes()).unwrap()).map(|t| t.request)
    }

    #[test]
    fn semantic_checks() {
        let err =
            translated(r#"{"model":"m","messages":[{"role":"user","content":null}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
        let err =
            translated(r#"{"model":"m","messages":[{"role":"user","content":"  "}]}"#).unwrap_err();
        assert!(err.message.contains("must not be empty"), "{err}");
        let err =
            translated(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].tool_call_id"));
        let ok = translated(
            r#"{"model":"m","messages":[{"role":"user","content":"x"},
               {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                 "function":{"name":"f","arguments":"{}"}}]},
               {"role":"tool","tool_call_id":"c1","content":""}]}"#,
        )
        .unwrap();
        assert_eq!(ok.messages.len(), 3);
    }

    #[test]
    fn parameters_are_honoured_ignored_or_refused() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        let with = |extra: &str| translated(&format!("{{{base},{extra}}}"));
        let r = with(
            r#""max_tokens":7,"stop":"END","temperature":0.2,"seed":1,"user":"u",
            "metadata":{"a":"b"},"reasoning_effort":"low","unknown_field":true"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["END".to_owned()]);
        assert_eq!(
            with(r#""max_completion_tokens":3"#).unwrap().max_tokens,
            Some(3)
        );
        for (extra, param) in [
            (r#""temperature":2.5"#, "temperature"),
            (r#""n":2"#, "n"),
            (r#""logprobs":true"#, "logprobs"),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
            (r#""max_tokens":0"#, "max_tokens"),
            (
                r#""tools":[{"type":"custom","custom":{}}]"#,
                "tools[0].type",
            ),
            (r#""tool_choice":"sometimes""#, "tool_choice"),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "response_format.json_schema",
            ),
        ] {
            let err = with(extra).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{extra}: {err}");
        }
    }

    #[test]
    fn tools_and_legacy_functions_translate() {
        let r = translated(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
               "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
               "tool_choice":{"type":"function","function":{"name":"f"}},"parallel_tool_calls":false,
               "response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object"}}}}"#,
        )
        .unwrap();
        assert_eq!(r.tools[0].name, "f");
        assert_eq!(r.tool_choice, ToolChoice::Named("f".into()));
        assert!(!r.parallel_tool_calls);
        assert!(matches!(r.format, OutputFormat::JsonSchema { .. }));
        let t = request_from(
            parse_json(
                br#"{"model":"m","messages":[{"role":"user","content":"x"},
                {"role":"assistant","content":null,"function_call":{"name":"f","arguments":"{}"}},
                {"role":"function","name":"f","content":"done"}],
                "functions":[{"name":"f"}],"function_call":"auto"}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert!(t.legacy);
        assert_eq!(t.request.tools[0].parameters["type"], "object");
        assert!(matches!(&t.request.messages[2], Message::Tool { call_id, .. } if call_id == "f"));
    }
}
