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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use url::Url;

    use super::*;
    use crate::session::Cookie;

    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(5),
        first_byte: Duration::from_secs(5),
        idle: Duration::from_secs(30),
    };

    fn spec() -> ResponseSpec {
        serde_json::from_value(serde_json::json!({
            "transport": "websocket",
            "text": {"path": "/t", "mode": "delta"},
            "done": [{"path": "/type", "equals": "done"}],
        }))
        .unwrap()
    }

    fn session() -> SessionData {
        SessionData {
            cookies: vec![Cookie {
                name: "sid".into(),
                value: "s1".into(),
                domain: "127.0.0.1".into(),
                path: "/".into(),
                expires: None,
                secure: false,
                http_only: true,
                host_only: true,
            }],
            user_agent: Some("TestAgent/1".into()),
            ..SessionData::default()
        }
    }

    fn rendered(url: &str, body: serde_json::Value) -> Rendered {
        Rendered {
            method: "GET".into(),
            url: Url::parse(url).unwrap(),
            headers: vec![
                ("x-csrf-token".into(), "c1".into()),
                ("host".into(), "elsewhere.example".into()),
            ],
            body: Some(body.to_string().into_bytes()),
            content_type: None,
        }
    }

    /// What the test server saw of the connection: its request headers and the messages the
    /// client sent before the server answered.
    struct Seen {
        headers: Vec<(String, String)>,
        messages: Vec<String>,
    }

    /// A one-connection WebSocket server: reads `expect` messages, sends `replies`, then holds
    /// the socket open until the client goes.
    async fn server(
        expect: usize,
        replies: Vec<&'static str>,
    ) -> (String, oneshot::Receiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ws", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut headers = Vec::new();
            // The callback's type is the library's (its error is a whole HTTP response).
            #[allow(clippy::result_large_err)]
            let callback = |request: &Request, response: Response| {
                for (name, value) in request.headers() {
                    headers.push((name.to_string(), value.to_str().unwrap().to_owned()));
                }
                Ok(response)
            };
            let mut socket = tokio_tungstenite::accept_hdr_async(stream, callback)
                .await
                .unwrap();
            let mut messages = Vec::new();
            while messages.len() < expect {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => messages.push(text.as_str().to_owned()),
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            for reply in replies {
                socket.send(Message::text(reply)).await.unwrap();
            }
            let _ = tx.send(Seen { headers, messages });
            while let Some(Ok(_)) = socket.next().await {}
        });
        (url, rx)
    }

    #[tokio::test]
    async fn the_flows_messages_go_out_and_each_received_message_is_decoded() {
        let replies = vec![
            r#"{"t":"he"}"#,
            "ping",
            r#"{"t":"llo"}"#,
            r#"{"type":"done"}"#,
        ];
        let (url, seen) = server(2, replies).await;
        let session = session();
        let jar = CookieJar::new(session.cookies.clone());
        let body = serde_json::json!([r#"{"type":"auth"}"#, {"type": "chat", "prompt": "hi"}]);
        let stream = open(
            rendered(&url, body),
            &session,
            &jar,
            &spec(),
            TIMEOUTS,
            None,
        )
        .await
        .unwrap();
        let deltas: Vec<Delta> = stream.map(Result::unwrap).collect().await;
        assert_eq!(
            deltas,
            [
                Delta::Text("he".into()),
                Delta::Text("llo".into()),
                Delta::Done
            ]
        );
        let seen = seen.await.unwrap();
        // A string message goes as it is, any other value as its JSON.
        assert_eq!(
            seen.messages,
            [r#"{"type":"auth"}"#, r#"{"type":"chat","prompt":"hi"}"#]
        );
        let header = |name: &str| {
            seen.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("cookie").as_deref(), Some("sid=s1"));
        assert_eq!(header("user-agent").as_deref(), Some("TestAgent/1"));
        assert_eq!(header("x-csrf-token").as_deref(), Some("c1"));
        let origin = url.trim_end_matches("/ws");
        assert_eq!(header("origin").as_deref(), Some(origin));
        // The handshake's own headers are the client library's, not the flow's.
        assert_ne!(header("host").as_deref(), Some("elsewhere.example"));
    }

    #[tokio::test]
    async fn a_refused_handshake_is_classified_like_any_answer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 2048];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
            let answer =
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 0\r\n\r\n";
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        let session = session();
        let jar = CookieJar::new(Vec::new());
        let body = serde_json::json!(["hello"]);
        let error = match open(
            rendered(&url, body),
            &session,
            &jar,
            &spec(),
            TIMEOUTS,
            None,
        )
        .await
        {
            Ok(_) => panic!("the handshake was refused"),
            Err(e) => e,
        };
        assert_eq!(error.kind(), FailureKind::RateLimit, "{error}");
        assert_eq!(error.retry_after(), Some(7));
        assert!(!error.retry_safe());
    }

    #[tokio::test]
    async fn a_socket_that_stays_silent_ends_with_an_error_after_the_idle_time() {
        let (url, _seen) = server(1, Vec::new()).await;
        let session = session();
        let jar = CookieJar::new(Vec::new());
        let body = serde_json::json!(["hello"]);
        let mut stream = open(
            rendered(&url, body),
            &session,
            &jar,
            &spec(),
            TIMEOUTS,
            None,
        )
        .await
        .unwrap();
        // From here on the clock only moves when nothing else can: the idle timer fires as
        // soon as the socket has nothing to give, without the test waiting 30 s.
        tokio::time::pause();
        let started = tokio::time::Instant::now();
        let error = stream.next().await.unwrap().unwrap_err();
        assert_eq!(error.kind(), FailureKind::Network);
        assert!(
            error.to_string().contains("sent nothing for 30 s"),
            "{error}"
        );
        // (The timer wheel rounds up to the next millisecond.)
        let waited = started.elapsed();
        assert!(
            waited >= TIMEOUTS.idle && waited < TIMEOUTS.idle + Duration::from_millis(10),
            "{waited:?}"
        );
        assert!(stream.next().await.is_none());
    }
}
