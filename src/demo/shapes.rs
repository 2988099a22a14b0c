//! The shapes of the learner's harder classes (see [`Shape`]): newchat (the first message in
//! a create call, the reply from a later call that names only ids), batch (patch batches with
//! no path of their own), details and think (reasoning markup in delta and in cumulative
//! streams) and fragile (plain named SSE events, the difficulty is in its page). Here: their
//! requests, the checks a later turn of their conversations must pass, and their replies'
//! wire formats.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::chat::{
    ChatRequest, Piece, all_tokens, message_text, nonempty_at, request, sse, streamed, string_at,
    unix_secs, usage,
};
use super::site::{Refusal, Shared, api_error, api_session, authorize};
use super::state::AppState;
use super::{Reply, Shape, tokens};

/// The patch path the batch shape's reply text grows at.
const PART: &str = "/message/content/parts/0";
/// The details shape's opening tag, sent as a piece of its own.
const DETAILS_OPEN: &str =
    "<details type=\"reasoning\" done=\"false\">\n<summary>Thinking…</summary>\n";

// ---------------------------------------------------------------------------------------------
// Requests

/// Parses the chat call of one of this module's shapes.
pub(super) fn parse(
    shape: Shape,
    path_conversation: Option<String>,
    json: &Value,
) -> Result<ChatRequest, String> {
    match shape {
        Shape::Newchat => parse_newchat(json),
        Shape::Batch => parse_batch(json),
        Shape::Details => parse_details(json),
        Shape::Think => parse_think(json, path_conversation),
        Shape::Fragile => {
            let mut req = request(
                nonempty_at(json, "/message")?,
                nonempty_at(json, "/conversation_id")?,
            );
            nonempty_at(json, "/request_id")?;
            req.model = string_at(json, "/model").unwrap_or_else(|_| "demo".into());
            Ok(req)
        }
        _ => Err(format!("`{shape}` is not parsed here")),
    }
}

/// `POST /api/chat`: `{"chatId", "mode": "start"}` answers the message the create call
/// carried; `{"chatId", "mode": "append", "messageInput", "messageId"}` a new one. (The
/// pending message of `start` is taken in [`pending_prompt`], once the chat is known to be
/// the caller's.)
fn parse_newchat(json: &Value) -> Result<ChatRequest, String> {
    let chat = nonempty_at(json, "/chatId")?;
    match json.get("mode").and_then(Value::as_str) {
        Some("start") => Ok(request(String::new(), chat)),
        Some("append") => {
            nonempty_at(json, "/messageId")?;
            Ok(request(string_at(json, "/messageInput")?, chat))
        }
        _ => Err("`mode` must be \"start\" or \"append\".".into()),
    }
}

fn parse_batch(json: &Value) -> Result<ChatRequest, String> {
    if json.get("action").and_then(Value::as_str) != Some("next") {
        return Err("`action` must be \"next\".".into());
    }
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
    let conversation = optional_id(json, "/conversation_id")?;
    let mut req = request(prompt, conversation);
    req.parent = Some(nonempty_at(json, "/parent_message_id")?);
    Ok(req)
}

fn parse_details(json: &Value) -> Result<ChatRequest, String> {
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
    let mut req = request(prompt, optional_id(json, "/chat_id")?);
    req.parent = Some(optional_id(json, "/parent_id")?).filter(|p| !p.is_empty());
    req.turn = Some(
        json.get("turn")
            .and_then(Value::as_i64)
            .ok_or("`turn` must be a number.")?,
    );
    Ok(req)
}

fn parse_think(json: &Value, conversation: Option<String>) -> Result<ChatRequest, String> {
    let conversation = conversation
        .filter(|c| !c.is_empty())
        .ok_or("The chat id is missing from the path.")?;
    let prompt = string_at(json, "/message/content")?;
    nonempty_at(json, "/message/id")?;
    let mut req = request(prompt, conversation);
    req.parent = Some(optional_id(json, "/parent_id")?).filter(|p| !p.is_empty());
    Ok(req)
}

/// A string id that may be absent or null (a first turn): empty then.
fn optional_id(json: &Value, pointer: &str) -> Result<String, String> {
    match json.pointer(pointer) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`{pointer}` must be a string or null.")),
    }
}

/// newchat's `mode: "start"`: the message its create call left waiting (400 when none).
pub(super) fn pending_prompt(
    state: &AppState,
    req: &mut ChatRequest,
    shape: Shape,
) -> Result<(), Refusal> {
    if shape != Shape::Newchat || !req.prompt.is_empty() {
        return Ok(());
    }
    match state.take_pending(&req.conversation_id) {
        Some(prompt) => {
            req.prompt = prompt;
            Ok(())
        }
        None => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "nothing_to_answer",
            "This chat has no message waiting for an answer.",
        )),
    }
}

/// The checks a later turn must pass: it names the previous reply (and, for details, counts
/// the turns). A first turn must not claim a parent.
pub(super) fn check_turn(
    shape: Shape,
    state: &AppState,
    conversation: &str,
    req: &ChatRequest,
) -> Result<(), Refusal> {
    let checks_parent = matches!(shape, Shape::Batch | Shape::Details | Shape::Think);
    if !checks_parent {
        return Ok(());
    }
    let turns = state.turns(conversation).unwrap_or(0);
    let expected = state.reply_id(conversation);
    let first = turns == 0;
    let parent_ok = match (&req.parent, &expected) {
        // The batch shape's first turn names a root of the client's making.
        (Some(_), _) if first && shape == Shape::Batch => true,
        (None, _) if first => true,
        (Some(given), Some(want)) => given == want,
        _ => false,
    };
    if !parent_ok {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_parent",
            "The parent message is not the last message of this conversation.",
        ));
    }
    if shape == Shape::Details && req.turn != Some(i64::from(turns)) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_turn",
            "The turn counter does not match this conversation.",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The newchat create call and the think shape's token endpoint

/// `POST /api/trpc/message.newChat?batch=1`, tRPC batch body `{"0":{"json":{"content",
/// "clientMessageId","model"}}}`: creates a chat holding the first message (answered by the
/// next `/api/chat` call, `mode: "start"`); answers the ids only.
pub(super) async fn new_chat(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.shape() != Shape::Newchat {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (sid, session) = match authorize(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let input = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.pointer("/0/json").cloned());
    let Some(input) = input else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected a tRPC batch body {\"0\":{\"json\":{…}}}.",
        );
    };
    let prompt = match (
        string_at(&input, "/content"),
        nonempty_at(&input, "/clientMessageId"),
    ) {
        (Ok(prompt), Ok(_)) if !prompt.trim().is_empty() => prompt,
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "`content` and `clientMessageId` are required.",
            );
        }
    };
    let chat = state.create_conversation(&sid, &session.email);
    state.set_pending(&chat, &prompt);
    axum::Json(json!([{ "result": { "data": { "json": {
        "chatId": chat,
        "messageId": uuid::Uuid::new_v4().to_string(),
    } } } }]))
    .into_response()
}

/// `GET /api/v1/auths/`: the think shape's page asks for its bearer token with the session
/// cookie when it loads (and stores it, wrapped, in localStorage).
pub(super) async fn auths(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if state.shape() != Shape::Think {
        return StatusCode::NOT_FOUND.into_response();
    }
    match api_session(&state, &headers) {
        Ok((_, session)) => axum::Json(json!({
            "token": session.token,
            "token_type": "Bearer",
            "email": session.email,
        }))
        .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// The reply of one of this module's shapes; `reply_id` is what a later turn names as its
/// parent, `conversation` the conversation's id.
pub(super) fn respond(
    shape: Shape,
    delay: std::time::Duration,
    req: &ChatRequest,
    reply: &Reply,
    reply_id: &str,
    conversation: &str,
) -> Response {
    let sse_type = "text/event-stream; charset=utf-8";
    match shape {
        Shape::Newchat => {
            let mut response = streamed(
                "text/plain; charset=utf-8",
                newchat_stream(reply, reply_id),
                delay,
            );
            response.headers_mut().insert(
                header::HeaderName::from_static("x-vercel-ai-data-stream"),
                header::HeaderValue::from_static("v1"),
            );
            response
        }
        Shape::Batch => streamed(
            sse_type,
            batch_stream(req, reply, reply_id, conversation),
            delay,
        ),
        Shape::Details => streamed(
            sse_type,
            details_stream(reply, reply_id, conversation),
            delay,
        ),
        Shape::Think => streamed(sse_type, think_stream(req, reply, reply_id), delay),
        _ => streamed(
            sse_type,
            fragile_stream(reply, reply_id, conversation),
            delay,
        ),
    }
}

/// AI-SDK data-stream lines: `f:` (the message id), `0:"text"`, `e:` (step end), `d:` (done).
fn newchat_stream(reply: &Reply, reply_id: &str) -> Vec<Piece> {
    let mut out = vec![Piece::now(format!(
        "f:{}\n",
        json!({ "messageId": reply_id })
    ))];
    for token in tokens(&reply.content) {
        out.push(Piece::later(format!("0:{}\n", json!(token))));
    }
    let end = json!({ "finishReason": "stop", "usage": usage(reply) });
    out.push(Piece::now(format!("e:{}\n", {
        let mut e = end.clone();
        e["isContinued"] = json!(false);
        e
    })));
    out.push(Piece::now(format!("d:{end}\n")));
    out
}

/// ChatGPT-like patches; a few operations, the reply's last words among them, travel as
/// batches `{"v": [ops]}` with no path of their own.
fn batch_stream(req: &ChatRequest, reply: &Reply, reply_id: &str, cid: &str) -> Vec<Piece> {
    let delta = |v: Value| Piece::later(sse(Some("delta"), &v.to_string()));
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
                },
                "conversation_id": cid,
            })
            .to_string(),
        )),
        Piece::now(sse(
            Some("delta"),
            &json!({
                "p": "", "o": "add", "c": 0,
                "v": {
                    "message": {
                        "id": reply_id,
                        "author": { "role": "assistant" },
                        "create_time": unix_secs(),
                        "content": { "content_type": "text", "parts": [""] },
                        "status": "in_progress",
                        "metadata": { "seq": 0 },
                    },
                    "conversation_id": cid,
                    "error": null,
                },
            })
            .to_string(),
        )),
    ];
    let toks = tokens(&reply.content);
    let last = toks.len().saturating_sub(1);
    for (i, token) in toks.into_iter().enumerate() {
        out.push(delta(if i == last {
            json!({ "v": [
                { "p": PART, "o": "append", "v": token },
                { "p": "/message/status", "o": "replace", "v": "finished_successfully" },
            ] })
        } else if i == 0 {
            json!({ "p": PART, "o": "append", "v": token })
        } else if i % 8 == 0 {
            // The text op last, so that `{"v": …}` continuations go on from it.
            json!({ "v": [
                { "p": "/message/metadata/seq", "o": "replace", "v": i },
                { "p": PART, "o": "append", "v": token },
            ] })
        } else {
            json!({ "v": token })
        }));
    }
    out.push(Piece::now(sse(
        None,
        &json!({ "type": "message_stream_complete", "conversation_id": cid }).to_string(),
    )));
    out.push(Piece::now(sse(None, "[DONE]")));
    out
}

/// Open WebUI-like: the opening tag alone, then `phase`-tagged pieces of quoted reasoning,
/// the closing tag, and the answer in `<answer>` tags.
fn details_stream(reply: &Reply, reply_id: &str, chat: &str) -> Vec<Piece> {
    let chunk = |delta: Value| {
        json!({ "choices": [{ "index": 0, "delta": delta, "finish_reason": null }] }).to_string()
    };
    let piece = |content: &str, phase: &str| {
        Piece::later(sse(
            None,
            &chunk(json!({ "content": content, "phase": phase })),
        ))
    };
    let mut out = vec![
        Piece::now(sse(
            None,
            &json!({ "chat_id": chat, "message_id": reply_id, "created": unix_secs() }).to_string(),
        )),
        Piece::now(sse(
            None,
            &chunk(json!({ "role": "assistant", "content": DETAILS_OPEN })),
        )),
    ];
    let quoted: Vec<String> = reply
        .reasoning
        .as_deref()
        .unwrap_or_default()
        .lines()
        .map(|line| format!("> {line}"))
        .collect();
    for token in tokens(&quoted.join("\n")) {
        out.push(piece(&token, "thinking"));
    }
    out.push(piece("\n</details>\n", "thinking"));
    out.push(piece("<answer>", "answer"));
    for token in tokens(&reply.content) {
        out.push(piece(&token, "answer"));
    }
    out.push(piece("</answer>", "answer"));
    let mut last: Value = serde_json::from_str(&chunk(json!({}))).unwrap_or_else(|_| json!({}));
    last["choices"][0]["finish_reason"] = json!("stop");
    last["usage"] = usage(reply);
    out.push(Piece::now(sse(None, &last.to_string())));
    out.push(Piece::now(sse(None, "[DONE]")));
    out
}

/// Cumulative `<think>` markup: every event repeats the whole text so far, the closing tag
/// at its end while the reasoning grows.
fn think_stream(req: &ChatRequest, reply: &Reply, reply_id: &str) -> Vec<Piece> {
    let event =
        |text: &str, done: bool| sse(None, &json!({ "text": text, "done": done }).to_string());
    let mut out = vec![Piece::now(sse(
        None,
        &json!({
            "response_id": reply_id,
            "parent_id": req.parent,
            "chat_id": req.conversation_id,
        })
        .to_string(),
    ))];
    let reasoning = reply.reasoning.as_deref().unwrap_or_default();
    let mut thought = String::new();
    for token in tokens(reasoning) {
        thought.push_str(&token);
        out.push(Piece::later(event(
            &format!("<think>{thought}</think>"),
            false,
        )));
    }
    let mut answer = String::new();
    for token in tokens(&reply.content) {
        answer.push_str(&token);
        out.push(Piece::later(event(
            &format!("<think>{thought}</think>\n\n{answer}"),
            false,
        )));
    }
    out.push(Piece::now(event(
        &format!("<think>{thought}</think>\n\n{answer}"),
        true,
    )));
    out
}

/// Named SSE events: `meta`, `token`s, `done`.
fn fragile_stream(reply: &Reply, reply_id: &str, cid: &str) -> Vec<Piece> {
    let mut out = vec![Piece::now(sse(
        Some("meta"),
        &json!({ "conversation_id": cid, "message_id": reply_id }).to_string(),
    ))];
    for (_, token) in all_tokens(reply) {
        out.push(Piece::later(sse(
            Some("token"),
            &json!({ "t": token }).to_string(),
        )));
    }
    out.push(Piece::now(sse(
        Some("done"),
        &json!({ "usage": usage(reply) }).to_string(),
    )));
    out
}
