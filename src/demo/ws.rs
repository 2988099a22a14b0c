//! The WebSocket shape: `GET /api/ws?conversation=ID` upgraded to a socket.
//!
//! At the upgrade the session cookie is checked (401), the `Origin`, when a browser sends one,
//! must be the site's own (403, the CSRF defence of sockets, which carry no custom headers),
//! and the conversation must be the session's (404). On the socket, all text frames of JSON:
//! - in: `{"type":"auth","token":BEARER}` first, then `{"type":"chat","id":UUID,
//!   "conversation_id":ID,"prompt":TEXT}`, one per turn, on the same socket;
//! - out, per turn: `{"type":"start","message_id","conversation_id"}`, `{"type":"token",
//!   "text"}` per piece of the answer, `{"type":"done","message_id"}`;
//! - errors: `{"type":"error","code","message"}` (a bad token also closes the socket with
//!   code 4401).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::site::{Shared, api_error, api_session};
use super::state::Session;
use super::{Shape, reply_for_turn, tokens};

/// Close code sent when the auth frame is missing or wrong.
pub(crate) const CLOSE_UNAUTHORIZED: u16 = 4401;

/// `GET /api/ws?conversation=ID`: checks, then the upgrade.
pub(crate) async fn upgrade(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if state.shape() != Shape::Ws {
        return StatusCode::NOT_FOUND.into_response();
    }
    let (sid, session) = match api_session(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    if !same_origin(&headers) {
        return api_error(
            StatusCode::FORBIDDEN,
            "bad_origin",
            "Cross-origin WebSocket connections are not allowed.",
        );
    }
    let Some(conversation) = query.get("conversation").filter(|c| !c.is_empty()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "The `conversation` query parameter is missing.",
        );
    };
    if !state.owns_conversation(&sid, conversation) {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Conversation not found.",
        );
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(_) => {
            return api_error(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "This endpoint speaks WebSocket.",
            );
        }
    };
    let conversation = conversation.clone();
    upgrade.on_upgrade(move |socket| serve(socket, state, session, conversation))
}

/// Whether the `Origin` header, if any, names the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn error_frame(code: &str, message: &str) -> Message {
    text(json!({ "type": "error", "code": code, "message": message }))
}

fn text(value: Value) -> Message {
    Message::Text(value.to_string().into())
}

/// The socket's life: auth, then chat turns until the client goes away.
async fn serve(mut socket: WebSocket, state: Shared, session: Session, conversation: String) {
    let mut authed = false;
    while let Some(Ok(message)) = socket.recv().await {
        let data = match message {
            Message::Text(data) => data,
            Message::Close(_) => break,
            // Pings are answered by the library; binary frames mean nothing here.
            _ => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(data.as_str()) else {
            if socket
                .send(error_frame("bad_request", "Frames must be JSON."))
                .await
                .is_err()
            {
                break;
            }
            continue;
        };
        let kind = frame.get("type").and_then(Value::as_str).unwrap_or("");
        if !authed {
            let token = frame.get("token").and_then(Value::as_str);
            if kind != "auth" || token != Some(session.token.as_str()) {
                let _ = socket
                    .send(error_frame(
                        "unauthenticated",
                        "Missing or invalid bearer token.",
                    ))
                    .await;
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: CLOSE_UNAUTHORIZED,
                        reason: "unauthenticated".into(),
                    })))
                    .await;
                break;
            }
            authed = true;
            continue;
        }
        let outcome = match kind {
            "chat" => chat_turn(&mut socket, &state, &session, &conversation, &frame).await,
            "ping" => socket.send(text(json!({ "type": "pong" }))).await,
            _ => {
                socket
                    .send(error_frame("bad_request", "Unknown frame type."))
                    .await
            }
        };
        if outcome.is_err() {
            break;
        }
    }
    // Dropping the socket closes it.
}

/// One chat frame: checks, then the reply's frames. `Err` when the client went away.
async fn chat_turn(
    socket: &mut WebSocket,
    state: &Shared,
    session: &Session,
    conversation: &str,
    frame: &Value,
) -> Result<(), axum::Error> {
    let string = |key: &str| frame.get(key).and_then(Value::as_str);
    let (Some(prompt), Some(_id)) = (string("prompt"), string("id").filter(|i| !i.is_empty()))
    else {
        let message = "A chat frame needs `id` and `prompt`.";
        return socket.send(error_frame("bad_request", message)).await;
    };
    if string("conversation_id") != Some(conversation) {
        let message = "`conversation_id` is not this socket's conversation.";
        return socket.send(error_frame("bad_request", message)).await;
    }
    if let Err(seconds) = state.take_rate(&session.email) {
        return socket
            .send(text(json!({
                "type": "error",
                "code": "rate_limited",
                "message": format!(
                    "You are sending messages too fast. Try again in {seconds} seconds."
                ),
                "retry_after": seconds,
            })))
            .await;
    }
    let turn = state.next_turn(conversation);
    let reply = reply_for_turn(Shape::Ws, prompt, turn);
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut guard = state.streams.start(&session.email);
    socket
        .send(text(json!({
            "type": "start",
            "message_id": message_id,
            "conversation_id": conversation,
        })))
        .await?;
    let delay: Duration = state.config.token_delay;
    for piece in tokens(&reply.content) {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        socket
            .send(text(json!({ "type": "token", "text": piece })))
            .await?;
    }
    socket
        .send(text(json!({ "type": "done", "message_id": message_id })))
        .await?;
    guard.finished = true;
    Ok(())
}
