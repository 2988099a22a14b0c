//! Tier 1 over a WebSocket: connect with the session's cookies, send the flow's messages,
//! decode each received message as it arrives.
//!
//! The chat request's `body` is the list of messages to send (see `flow::Transport`).
//! Dropping the stream closes the socket.

use std::collections::VecDeque;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::decode::{Decoder, Delta};
use super::failure::{self, Call, FailureKind, ReplayError};
use super::render::Rendered;
use super::{DeltaStream, Timeouts};
use crate::flow::ResponseSpec;
use crate::session::{CookieJar, SessionData};

/// Opens the socket, sends the messages and returns the decoded reply.
pub async fn open(
    rendered: Rendered,
    session: &SessionData,
    jar: &CookieJar,
    spec: &ResponseSpec,
    timeouts: Timeouts,
    proxy: Option<&str>,
) -> Result<DeltaStream, ReplayError> {
    let http_url = rendered.url.clone();
    let mut ws_url = rendered.url.clone();
    let scheme = match http_url.scheme() {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    let _ = ws_url.set_scheme(scheme);
    let unexpected = |message: String| ReplayError::Unexpected {
        call: Call::Chat,
        kind: FailureKind::Flow,
        message,
    };
    let mut request = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| unexpected(format!("not a WebSocket URL: {e}")))?;
    let headers = request.headers_mut();
    for (name, value) in &rendered.headers {
        let lower = name.to_ascii_lowercase();
        // The handshake headers are the client library's business.
        if lower.starts_with("sec-websocket")
            || matches!(
                lower.as_str(),
                "host" | "connection" | "upgrade" | "cookie" | "content-length" | "content-type"
            )
        {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    if let Some(cookie) = jar
        .header_for(&http_url)
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        headers.insert("cookie", cookie);
    }
    if let Some(ua) = session
        .user_agent
        .as_deref()
        .and_then(|ua| HeaderValue::from_str(ua).ok())
    {
        headers.entry("user-agent").or_insert(ua);
    }
    if let Ok(origin) = HeaderValue::from_str(&http_url.origin().ascii_serialization()) {
        headers.entry("origin").or_insert(origin);
    }
    let connect = async {
        let Some(proxy) = proxy else {
            return tokio_tungstenite::connect_async(request).await;
        };
        // Through the account's proxy, like every other call the account makes.
        let host = ws_url.host_str().unwrap_or_default().to_owned();
        let port = ws_url.port_or_known_default().unwrap_or(80);
        let stream = super::tunnel::open(proxy, &host, port, timeouts.connect)
            .await
            .map_err(|e| WsError::Io(std::io::Error::other(e.to_string())))?;
        tokio_tungstenite::client_async_tls(request, stream).await
    };
    let (mut socket, _) = match tokio::time::timeout(timeouts.first_byte, connect).await {
        Err(_) => {
            return Err(ReplayError::Network {
                call: Call::Chat,
                message: format!(
                    "the WebSocket did not open within {} s",
                    timeouts.first_byte.as_secs()
                ),
            });
        }
        Ok(Err(WsError::Http(response))) => {
            let body = response.body().as_deref().unwrap_or_default();
            return Err(failure::status_error(
                Call::Chat,
                response.status().as_u16(),
                response.headers(),
                body,
            ));
        }
        Ok(Err(e)) => {
            return Err(ReplayError::Network {
                call: Call::Chat,
                message: format!("the WebSocket failed: {e}"),
            });
        }
        Ok(Ok(opened)) => opened,
    };
    let messages: Vec<Value> = match rendered
        .body
        .as_deref()
        .map(serde_json::from_slice::<Value>)
    {
        Some(Ok(Value::Array(items))) => items,
        Some(Ok(one)) => vec![one],
        Some(Err(_)) | None => Vec::new(),
    };
    for message in messages {
        let text = match message {
            Value::String(s) => s,
            other => other.to_string(),
        };
        socket
            .send(Message::text(text))
            .await
            .map_err(|e| ReplayError::Network {
                call: Call::Chat,
                message: format!("sending on the WebSocket failed: {e}"),
            })?;
    }
    let decoder = Decoder::new(spec);
    let idle = timeouts.idle;
    let state = (socket, decoder, VecDeque::<Delta>::new(), false);
    let stream = futures_util::stream::unfold(
        state,
        move |(mut socket, mut decoder, mut pending, mut ended)| async move {
            loop {
                if let Some(delta) = pending.pop_front() {
                    return Some((Ok(delta), (socket, decoder, pending, ended)));
                }
                if ended || decoder.is_done() {
                    return None;
                }
                let mut out = Vec::new();
                let next = tokio::time::timeout(idle, socket.next()).await;
                let result = match next {
                    Err(_) => Err(ReplayError::Body(format!(
                        "the site sent nothing for {} s",
                        idle.as_secs()
                    ))),
                    Ok(None) | Ok(Some(Ok(Message::Close(_)))) => {
                        ended = true;
                        decoder.finish(&mut out).map_err(ReplayError::from)
                    }
                    Ok(Some(Ok(Message::Text(text)))) => decoder
                        .feed_message(None, text.as_str(), &mut out)
                        .map_err(ReplayError::from),
                    Ok(Some(Ok(Message::Binary(bytes)))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => decoder
                            .feed_message(None, text, &mut out)
                            .map_err(ReplayError::from),
                        Err(_) => Ok(()),
                    },
                    Ok(Some(Ok(_))) => Ok(()),
                    Ok(Some(Err(e))) => {
                        Err(ReplayError::Body(format!("the WebSocket failed: {e}")))
                    }
                };
                if let Err(e) = result {
                    ended = true;
                    pending.clear();
                    return Some((Err(e), (socket, decoder, pending, ended)));
                }
                pending.extend(out);
            }
        },
    );
    Ok(stream.boxed())
}
