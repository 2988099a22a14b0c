//! The chat endpoint: request parsing and the reply's wire format, per shape.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::site::{Shared, api_error, authorize};
use super::state::random_token;
use super::{Reply, Shape, reply_with_files, shapes, tokens, uploads};

/// What the site reads out of a chat request, whatever the shape.
pub(super) struct ChatRequest {
    pub(super) prompt: String,
    /// Empty when the call starts a conversation ([`Shape::creates_on_first_chat`]).
    pub(super) conversation_id: String,
    pub(super) model: String,
    pub(super) stream: bool,
    /// The previous reply a later turn names (the shapes that check it).
    pub(super) parent: Option<String>,
    /// The turn counter a later turn sends (details).
    pub(super) turn: Option<i64>,
    /// Ids of the uploaded files the call names (openai and signed shapes), in order.
    pub(super) files: Vec<String>,
}

/// The chat endpoint of `shape` (all but Claude and the WebSocket): 404 unless `shape` is
/// the one served now.
pub(crate) async fn handle(
    shape: Shape,
    State(state): State<Shared>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if state.shape() != shape {
        return StatusCode::NOT_FOUND.into_response();
    }
    chat_call(shape, &state, &headers, query.as_deref(), None, &body).await
}

/// The Claude shape's `POST /api/organizations/{org}/chat_conversations/{conversation}/
/// completion`: both ids in the path.
pub(crate) async fn handle_claude(
    State(state): State<Shared>,
    Path((org, conversation)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.shape() != Shape::Claude {
        return StatusCode::NOT_FOUND.into_response();
    }
    let ids = Some((org, conversation));
    chat_call(Shape::Claude, &state, &headers, None, ids, &body).await
}

/// The think shape's `POST /api/v1/chats/{conversation}/completions`: the id in the path.
pub(crate) async fn handle_think(
    State(state): State<Shared>,
    Path(conversation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.shape() != Shape::Think {
        return StatusCode::NOT_FOUND.into_response();
    }
    let ids = Some((String::new(), conversation));
    chat_call(Shape::Think, &state, &headers, None, ids, &body).await
}

/// The shared chat call: checks, parsing, rate limit, reply.
async fn chat_call(
    shape: Shape,
    state: &Shared,
    headers: &HeaderMap,
    query: Option<&str>,
    path_ids: Option<(String, String)>,
    body: &[u8],
) -> Response {
    let (sid, session) = match authorize(state, headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let signed = shape == Shape::Signed || state.config.signed;
    if signed && !signature_ok(state, &session.sign_key, headers, body) {
        // Any failure is the same answer, as real sites give no detail.
        return api_error(
            StatusCode::FORBIDDEN,
            "bad_signature",
            "invalid request signature",
        );
    }
    let path_conversation = match path_ids {
        Some((org, _)) if shape == Shape::Claude && org != session.org => {
            return api_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "Organization not found.",
            );
        }
        Some((_, conversation)) => Some(conversation),
        None => None,
    };
    let mut request = match parse(shape, query, path_conversation, body) {
        Ok(request) => request,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, "bad_request", &message),
    };
    let starts = shape.creates_on_first_chat() && request.conversation_id.is_empty();
    if !starts && !state.owns_conversation(&sid, &request.conversation_id) {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Conversation not found.",
        );
    }
    if !starts {
        let checked = shapes::check_turn(shape, state, &request.conversation_id, &request)
            .and_then(|()| shapes::pending_prompt(state, &mut request, shape));
        if let Err(refusal) = checked {
            return refusal.into_response();
        }
    }
    let files = match state
        .uploads
        .for_chat(&uploads::owner(&session), &request.files)
    {
        Ok(files) => files,
        Err(id) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "unknown_file",
                &format!("file {id} is not yours or does not exist"),
            );
        }
    };
    if let Some(response) = rate_limited(state, &session.email) {
        return response;
    }
    if state.take_garbage() {
        // What a CDN's maintenance page looks like to a client expecting a stream.
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!doctype html><html><body><p>We'll be right back.</p></body></html>",
        )
            .into_response();
    }
    if starts {
        request.conversation_id = state.create_conversation(&sid, &session.email);
    }
    let turn = state.next_turn(&request.conversation_id);
    state.streams.files_in_chat(files.len());
    let described: Vec<(&str, &str, &[u8])> = files
        .iter()
        .map(|f| (f.name.as_str(), f.mime_type.as_str(), &f.bytes[..]))
        .collect();
    let reply = reply_with_files(shape, &request.prompt, turn, &described);
    // What a later turn names as its parent, known from the reply's first byte on.
    let reply_id = uuid::Uuid::new_v4().to_string();
    state.set_reply_id(&request.conversation_id, &reply_id);
    // Count the reply as streaming from here until its body ends or the client drops it, so
    // tests can see that a client going away cancels the stream here, and how many ran at
    // once (a one-piece answer waits for its whole delay in `respond`).
    let guard = state.streams.start(&session.email);
    let response = if shape_is_new(shape) {
        let conversation = request.conversation_id.clone();
        shapes::respond(
            shape,
            state.config.token_delay,
            &request,
            &reply,
            &reply_id,
            &conversation,
        )
    } else {
        respond(shape, state.config.token_delay, &request, &reply).await
    };
    let (parts, body) = response.into_parts();
    // A cut reply: a few pieces, then the connection's end without the end marker.
    let pieces = if state.take_truncate() { 4 } else { usize::MAX };
    let tracked = Tracked {
        inner: body.into_data_stream().take(pieces),
        guard,
    };
    Response::from_parts(parts, Body::from_stream(tracked))
}

/// The rate limit: the 429 with `Retry-After` to answer, if the call is over it.
fn rate_limited(state: &Shared, email: &str) -> Option<Response> {
    state.take_rate(email).err().map(|seconds| {
        let mut response = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("You are sending messages too fast. Try again in {seconds} seconds."),
        );
        let value = state
            .retry_after_text(email)
            .and_then(|text| HeaderValue::from_str(&text).ok())
            .unwrap_or_else(|| HeaderValue::from(seconds));
        response.headers_mut().insert(header::RETRY_AFTER, value);
        response
    })
}

struct Tracked<S> {
    inner: S,
    guard: super::state::StreamGuard,
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for Tracked<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        let item = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(None) = item {
            self.guard.finished = true;
        }
        item
    }
}

// ---------------------------------------------------------------------------------------------
// Request signatures (signed shape)

/// Header carrying the request signature (hex SHA-256).
pub(crate) const SIGNATURE_HEADER: &str = "x-signature";
/// Header carrying the signed timestamp, in milliseconds since the epoch.
pub(crate) const TIMESTAMP_HEADER: &str = "x-timestamp";
/// A signed timestamp further than this from the server's clock is refused.
pub(crate) const MAX_SIGNATURE_SKEW_MS: u64 = 30_000;

/// Hex SHA-256 of `key + "\n" + timestamp + "\n" + body`: what the page's script computes.
pub(crate) fn signature(key: &str, timestamp: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(key.as_bytes());
    hasher.update(b"\n");
    hasher.update(timestamp.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    hex::encode(hasher.finalize())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Whether the signed shape's `x-signature` verifies over the body: right key, fresh
/// timestamp, never used before (a verified signature is used up).
fn signature_ok(state: &Shared, key: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(given), Some(timestamp)) = (text(SIGNATURE_HEADER), text(TIMESTAMP_HEADER)) else {
        return false;
    };
    let Ok(millis) = timestamp.trim().parse::<u64>() else {
        return false;
    };
    if millis.abs_diff(unix_millis()) > MAX_SIGNATURE_SKEW_MS {
        return false;
    }
    let given = given.trim().to_ascii_lowercase();
    given == signature(key, timestamp, body) && state.use_signature(&given)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// Whether `shape` is one of [`shapes`]'.
fn shape_is_new(shape: Shape) -> bool {
    matches!(
        shape,
        Shape::Newchat | Shape::Batch | Shape::Details | Shape::Think | Shape::Fragile
    )
}

fn parse(
    shape: Shape,
    query: Option<&str>,
    path_conversation: Option<String>,
    body: &[u8],
) -> Result<ChatRequest, String> {
    if shape == Shape::Json {
        return parse_form(body);
    }
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("The body is not valid JSON: {e}"))?;
    if shape_is_new(shape) {
        return shapes::parse(shape, path_conversation, &json);
    }
    match shape {
        Shape::Openai | Shape::Signed => parse_openai(&json),
        Shape::Patch => parse_patch(&json),
        Shape::Cumulative => parse_cumulative(&json, query),
        Shape::Ndjson => parse_ndjson(&json),
        Shape::Numbered => parse_numbered(&json),
        Shape::Frames => parse_frames(&json),
        Shape::Claude => parse_claude(&json, path_conversation),
        Shape::Json => parse_form(body),
        Shape::Ws => Err("This shape chats over its WebSocket.".into()),
        _ => Err(format!("`{shape}` is parsed in `shapes`")),
    }
}

pub(super) fn string_at(json: &Value, pointer: &str) -> Result<String, String> {
    json.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("`{pointer}` must be a string."))
}

pub(super) fn nonempty_at(json: &Value, pointer: &str) -> Result<String, String> {
    let value = string_at(json, pointer)?;
    if value.trim().is_empty() {
        return Err(format!("`{pointer}` must not be empty."));
    }
    Ok(value)
}

pub(super) fn request(prompt: String, conversation_id: String) -> ChatRequest {
    ChatRequest {
        prompt,
        conversation_id,
        model: "demo".to_owned(),
        stream: true,
        parent: None,
        turn: None,
        files: Vec::new(),
    }
}

/// The text of an OpenAI message `content`: a string or a list of `{type:"text", text}` parts.
pub(super) fn message_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

fn parse_openai(json: &Value) -> Result<ChatRequest, String> {
    let messages = json
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or("`messages` must be a non-empty list.")?;
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(message_text)
        .ok_or("`messages` has no user message with text content.")?;
    let conversation_id = nonempty_at(json, "/conversation_id")?;
    let mut req = request(prompt, conversation_id);
    if let Some(model) = json.get("model").and_then(Value::as_str) {
        req.model = model.to_owned();
    }
    req.stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    req.files = uploads::named_files(json)?;
    Ok(req)
}

fn parse_patch(json: &Value) -> Result<ChatRequest, String> {
    if json.get("action").and_then(Value::as_str) != Some("next") {
        return Err("`action` must be \"next\".".into());
    }
    let conversation_id = nonempty_at(json, "/conversation_id")?;
    let message = json
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .ok_or("`messages` must be a non-empty list.")?;
    if message.pointer("/author/role").and_then(Value::as_str) != Some("user") {
        return Err("the last message's `author.role` must be \"user\".".into());
    }
    nonempty_at(message, "/id")?;
    let parts = message
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .ok_or("`content.parts` must be a list.")?;
    let prompt: Option<Vec<&str>> = parts.iter().map(Value::as_str).collect();
    let prompt = prompt.ok_or("`content.parts` must hold strings.")?.join("");
    Ok(request(prompt, conversation_id))
}

fn parse_cumulative(json: &Value, query: Option<&str>) -> Result<ChatRequest, String> {
    let chat_id = query
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
        .find(|(k, _)| k == "chat_id")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
        .ok_or("The `chat_id` query parameter is missing.")?;
    if let Some(body_id) = json.get("chat_id").and_then(Value::as_str)
        && body_id != chat_id
    {
        return Err("`chat_id` in the body differs from the query.".into());
    }
    let prompt = json
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(message_text)
        .ok_or("`messages` has no user message with text content.")?;
    let mut req = request(prompt, chat_id);
    req.stream = json.get("stream").and_then(Value::as_bool).unwrap_or(true);
    Ok(req)
}

fn parse_ndjson(json: &Value) -> Result<ChatRequest, String> {
    let blocks = json
        .pointer("/message/blocks")
        .and_then(Value::as_array)
        .filter(|b| !b.is_empty())
        .ok_or("`message.blocks` must be a non-empty list.")?;
    let prompt: Option<Vec<&str>> = blocks
        .iter()
        .map(|b| b.pointer("/text/content").and_then(Value::as_str))
        .collect();
    let prompt = prompt
        .ok_or("every block needs `text.content`.")?
        .join("\n");
    let conversation_id = nonempty_at(json, "/conversation/id")?;
    nonempty_at(json, "/client_msg_id")?;
    Ok(request(prompt, conversation_id))
}

fn parse_numbered(json: &Value) -> Result<ChatRequest, String> {
    let input = json
        .pointer("/0/json")
        .ok_or("Expected a tRPC batch body {\"0\":{\"json\":{…}}}.")?;
    let conversation_id = nonempty_at(input, "/conversationId")?;
    let parts = input
        .get("content")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or("`content` must be a non-empty list.")?;
    let prompt = parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join("");
    if !input.get("ts").is_some_and(Value::is_number) {
        return Err("`ts` must be a number.".into());
    }
    Ok(request(prompt, conversation_id))
}

fn parse_form(body: &[u8]) -> Result<ChatRequest, String> {
    let mut prompt = None;
    let mut conversation = None;
    let mut nonce = None;
    for (k, v) in url::form_urlencoded::parse(body) {
        match k.as_ref() {
            "prompt" => prompt = Some(v.into_owned()),
            "conversation" => conversation = Some(v.into_owned()),
            "nonce" => nonce = Some(v.into_owned()),
            _ => {}
        }
    }
    let prompt = prompt.ok_or("The `prompt` field is missing.")?;
    let conversation = conversation
        .filter(|c| !c.is_empty())
        .ok_or("The `conversation` field is missing.")?;
    nonce
        .filter(|n| !n.is_empty())
        .ok_or("The `nonce` field is missing.")?;
    Ok(request(prompt, conversation))
}

fn parse_claude(json: &Value, conversation: Option<String>) -> Result<ChatRequest, String> {
    let conversation_id = conversation
        .filter(|c| !c.is_empty())
        .ok_or("The conversation id is missing from the path.")?;
    let prompt = string_at(json, "/prompt")?;
    for list in ["attachments", "files"] {
        if json.get(list).is_some_and(|v| !v.is_array()) {
            return Err(format!("`{list}` must be a list."));
        }
    }
    Ok(request(prompt, conversation_id))
}

fn parse_frames(json: &Value) -> Result<ChatRequest, String> {
    let conversation_id = nonempty_at(json, "/conversationId")?;
    let prompt = string_at(json, "/prompt")?;
    nonempty_at(json, "/requestId")?;
    Ok(request(prompt, conversation_id))
}

// ---------------------------------------------------------------------------------------------
// Responding

/// One piece of the response body, sent after the token delay when `delayed`.
pub(super) struct Piece {
    delayed: bool,
    bytes: Bytes,
}

impl Piece {
    pub(super) fn now(bytes: impl Into<Bytes>) -> Self {
        Piece {
            delayed: false,
            bytes: bytes.into(),
        }
    }

    pub(super) fn later(bytes: impl Into<Bytes>) -> Self {
        Piece {
            delayed: true,
            bytes: bytes.into(),
        }
    }
}

pub(super) fn streamed(
    content_type: &'static str,
    pieces: Vec<Piece>,
    delay: Duration,
) -> Response {
    let stream = futures_util::stream::iter(pieces).then(move |piece| async move {
        if piece.delayed && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<Bytes, Infallible>(piece.bytes)
    });
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

pub(super) fn sse(event: Option<&str>, data: &str) -> String {
    match event {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

pub(super) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Reasoning tokens then answer tokens, each tagged `true` when it is reasoning.
pub(super) fn all_tokens(reply: &Reply) -> Vec<(bool, String)> {
    let thinking = reply.reasoning.as_deref().map(tokens).unwrap_or_default();
    thinking
        .into_iter()
        .map(|t| (true, t))
        .chain(tokens(&reply.content).into_iter().map(|t| (false, t)))
        .collect()
}

async fn respond(shape: Shape, delay: Duration, req: &ChatRequest, reply: &Reply) -> Response {
    match shape {
        Shape::Openai | Shape::Signed if !req.stream => {
            let n = all_tokens(reply).len();
            wait_total(delay, n).await;
            axum::Json(openai_completion(req, reply)).into_response()
        }
        Shape::Openai | Shape::Signed => streamed(
            "text/event-stream; charset=utf-8",
            openai_stream(req, reply),
            delay,
        ),
        Shape::Claude => streamed(
            "text/event-stream; charset=utf-8",
            claude_stream(req, reply),
            delay,
        ),
        // Served by the WebSocket handler; a POST here is refused in `parse`.
        Shape::Ws => api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "This shape chats over its WebSocket.",
        ),
        Shape::Patch => streamed(
            "text/event-stream; charset=utf-8",
            patch_stream(req, reply),
            delay,
        ),
        Shape::Cumulative => streamed(
            "text/event-stream; charset=utf-8",
            cumulative_stream(req, reply),
            delay,
        ),
        Shape::Ndjson => streamed("application/x-ndjson", ndjson_stream(req, reply), delay),
        Shape::Numbered => streamed(
            "text/plain; charset=utf-8",
            numbered_stream(req, reply),
            delay,
        ),
        Shape::Json => {
            let n = all_tokens(reply).len();
            wait_total(delay, n).await;
            axum::Json(json!({
                "data": {
                    "answer": { "text": reply.content, "format": "markdown" },
                    "conversation": req.conversation_id,
                    "message_id": uuid::Uuid::new_v4().to_string(),
                }
            }))
            .into_response()
        }
        Shape::Frames => streamed("application/connect+json", frames_stream(req, reply), delay),
        // Answered by `shapes::respond`.
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn wait_total(delay: Duration, tokens: usize) {
    let total = delay.saturating_mul(u32::try_from(tokens).unwrap_or(u32::MAX));
    if !total.is_zero() {
        tokio::time::sleep(total).await;
    }
}

pub(super) fn usage(reply: &Reply) -> Value {
    let completion = all_tokens(reply).len();
    json!({ "prompt_tokens": 12, "completion_tokens": completion, "total_tokens": completion + 12 })
}

fn openai_completion(req: &ChatRequest, reply: &Reply) -> Value {
    let mut message = json!({ "role": "assistant", "content": reply.content });
    if let (Some(reasoning), Some(obj)) = (&reply.reasoning, message.as_object_mut()) {
        obj.insert("reasoning_content".into(), json!(reasoning));
    }
    json!({
        "id": format!("chatcmpl-{}", random_token(12)),
        "object": "chat.completion",
        "created": unix_secs(),
        "model": req.model,
        "conversation_id": req.conversation_id,
        "choices": [{ "index": 0, "message": message, "finish_reason": "stop" }],
        "usage": usage(reply),
    })
}

fn openai_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let id = format!("chatcmpl-{}", random_token(12));
    let created = unix_secs();
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    let mut out = vec![Piece::now(sse(
        None,
        &chunk(json!({ "role": "assistant" }), Value::Null).to_string(),
    ))];
    for (thinking, token) in all_tokens(reply) {
        let delta = if thinking {
            json!({ "reasoning_content": token })
        } else {
            json!({ "content": token })
        };
        out.push(Piece::later(sse(
            None,
            &chunk(delta, Value::Null).to_string(),
        )));
    }
    let mut last = chunk(json!({}), json!("stop"));
    if let Some(obj) = last.as_object_mut() {
        obj.insert("usage".into(), usage(reply));
    }
    out.push(Piece::now(sse(None, &last.to_string())));
    out.push(Piece::now(sse(None, "[DONE]")));
    out
}

fn title_for(prompt: &str) -> String {
    let words: Vec<&str> = prompt.split_whitespace().take(4).collect();
    if words.is_empty() {
        "New chat".to_owned()
    } else {
        words.join(" ")
    }
}

fn patch_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    const PART: &str = "/message/content/parts/0";
    let cid = &req.conversation_id;
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut out = vec![
        Piece::now(sse(Some("delta_encoding"), "\"v1\"")),
        Piece::now(sse(
            None,
            &json!({
                "type": "input_message",
                "input_message": {
                    "id": uuid::Uuid::new_v4().to_string(),
                    "author": { "role": "user" },
                    "content": { "content_type": "text", "parts": [req.prompt] },
                    "status": "finished_successfully",
                },
                "conversation_id": cid,
            })
            .to_string(),
        )),
        Piece::now(sse(
            Some("delta"),
            &json!({
                "p": "",
                "o": "add",
                "v": {
                    "message": {
                        "id": message_id,
                        "author": { "role": "assistant", "name": null },
                        "create_time": unix_secs(),
                        "content": { "content_type": "text", "parts": [""] },
                        "status": "in_progress",
                        "end_turn": null,
                        "metadata": { "model_slug": req.model },
                    },
                    "conversation_id": cid,
                    "error": null,
                },
                "c": 0,
            })
            .to_string(),
        )),
    ];
    let toks = tokens(&reply.content);
    let last_index = toks.len().saturating_sub(1);
    for (i, token) in toks.into_iter().enumerate() {
        let event = if i == 0 {
            json!({ "p": PART, "o": "append", "v": token })
        } else if i == last_index {
            json!({
                "p": "",
                "o": "patch",
                "v": [
                    { "p": PART, "o": "append", "v": token },
                    { "p": "/message/status", "o": "replace", "v": "finished_successfully" },
                    { "p": "/message/end_turn", "o": "replace", "v": true },
                ],
            })
        } else {
            json!({ "v": token })
        };
        out.push(Piece::later(sse(Some("delta"), &event.to_string())));
        if i == 4 {
            out.push(Piece::now(sse(
                None,
                &json!({
                    "type": "title_generation",
                    "title": title_for(&req.prompt),
                    "conversation_id": cid,
                })
                .to_string(),
            )));
        }
    }
    out.push(Piece::now(sse(
        None,
        &json!({ "type": "message_stream_complete", "conversation_id": cid }).to_string(),
    )));
    out.push(Piece::now(sse(None, "[DONE]")));
    out
}

fn cumulative_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let response_id = uuid::Uuid::new_v4().to_string();
    let event = |content: &str, phase: &str, status: &str| {
        json!({
            "choices": [{
                "delta": {
                    "role": "assistant",
                    "content": content,
                    "phase": phase,
                    "status": status,
                }
            }],
            "response_id": response_id,
        })
        .to_string()
    };
    let mut out = vec![Piece::now(sse(
        None,
        &json!({
            "response.created": {
                "chat_id": req.conversation_id,
                "parent_id": null,
                "response_id": response_id,
            }
        })
        .to_string(),
    ))];
    let mut so_far = String::new();
    let mut phase_thinking = None;
    for (thinking, token) in all_tokens(reply) {
        if phase_thinking != Some(thinking) {
            so_far.clear();
            phase_thinking = Some(thinking);
        }
        so_far.push_str(&token);
        let phase = if thinking { "think" } else { "answer" };
        out.push(Piece::later(sse(None, &event(&so_far, phase, "typing"))));
    }
    out.push(Piece::now(sse(
        None,
        &event(&reply.content, "answer", "finished"),
    )));
    out
}

fn ndjson_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let message_id = uuid::Uuid::new_v4().to_string();
    let line = |v: Value| format!("{v}\n");
    let mut out = vec![Piece::now(line(json!({
        "type": "meta",
        "conversation_id": req.conversation_id,
        "message_id": message_id,
    })))];
    for (i, token) in tokens(&reply.content).into_iter().enumerate() {
        if i > 0 && i % 10 == 0 {
            out.push(Piece::now(line(json!({ "type": "ping" }))));
        }
        out.push(Piece::later(line(json!({
            "type": "token",
            "data": { "delta": { "text": token } },
        }))));
    }
    out.push(Piece::now(line(
        json!({ "type": "done", "message_id": message_id }),
    )));
    out
}

fn numbered_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut out = vec![Piece::now(format!(
        "1:{}\n",
        json!({ "json": { "messageId": message_id, "conversationId": req.conversation_id } })
    ))];
    for (thinking, token) in all_tokens(reply) {
        let kind = if thinking { "reasoning" } else { "text" };
        out.push(Piece::later(format!(
            "0:{}\n",
            json!({ "json": { "kind": kind, "delta": token } })
        )));
    }
    out.push(Piece::now(format!(
        "2:{}\n",
        json!({ "json": { "usage": usage(reply) } })
    )));
    out.push(Piece::now("8:null\n"));
    out
}

/// A Connect envelope: flag byte, big-endian u32 length, payload.
pub(crate) fn frame(flag: u8, payload: &Value) -> Vec<u8> {
    let body = payload.to_string().into_bytes();
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(flag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn frames_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut out = vec![Piece::now(frame(
        0,
        &json!({ "result": { "meta": {
            "conversationId": req.conversation_id,
            "messageId": message_id,
        } } }),
    ))];
    for (thinking, token) in all_tokens(reply) {
        out.push(Piece::later(frame(
            0,
            &json!({ "result": { "response": { "token": token, "isThinking": thinking } } }),
        )));
    }
    out.push(Piece::now(frame(2, &json!({}))));
    out
}

/// Anthropic-style events: `message_start`, a `thinking` block then a `text` block of
/// `content_block_delta`s (with `ping`s in between), `message_delta`, `message_stop`.
fn claude_stream(req: &ChatRequest, reply: &Reply) -> Vec<Piece> {
    let event = |name: &str, data: Value| sse(Some(name), &data.to_string());
    let mut out = vec![Piece::now(event(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": format!("chatcompl_{}", random_token(12)),
                "type": "message",
                "role": "assistant",
                "model": req.model,
                "parent_uuid": uuid::Uuid::new_v4().to_string(),
                "uuid": uuid::Uuid::new_v4().to_string(),
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
            },
        }),
    ))];
    let mut blocks: Vec<(&str, Vec<String>)> = Vec::new();
    if let Some(reasoning) = &reply.reasoning {
        blocks.push(("thinking", tokens(reasoning)));
    }
    blocks.push(("text", tokens(&reply.content)));
    let mut sent = 0usize;
    for (index, (kind, pieces)) in blocks.into_iter().enumerate() {
        let start = match kind {
            "thinking" => json!({ "type": "thinking", "thinking": "", "summaries": [] }),
            _ => json!({ "type": "text", "text": "", "citations": [] }),
        };
        out.push(Piece::now(event(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index, "content_block": start }),
        )));
        for piece in pieces {
            let delta = match kind {
                "thinking" => json!({ "type": "thinking_delta", "thinking": piece }),
                _ => json!({ "type": "text_delta", "text": piece }),
            };
            out.push(Piece::later(event(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": index, "delta": delta }),
            )));
            sent += 1;
            if sent.is_multiple_of(12) {
                out.push(Piece::now(event("ping", json!({ "type": "ping" }))));
            }
        }
        out.push(Piece::now(event(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        )));
    }
    out.push(Piece::now(event(
        "message_delta",
        json!({
            "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null },
        }),
    )));
    out.push(Piece::now(event(
        "message_limit",
        json!({ "type": "message_limit", "message_limit": { "type": "within_limit" } }),
    )));
    out.push(Piece::now(event(
        "message_stop",
        json!({ "type": "message_stop" }),
    )));
    out
}
