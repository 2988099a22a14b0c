//! `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! Streaming: the gateway has already seen the site's first text when the 200 goes out; each
//! delta becomes one chunk as it arrives (nothing is buffered), a failure after that becomes
//! an error event followed by `[DONE]`, and a client that goes away drops the reply, which
//! cancels the call to the site.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::gateway::Reply;
use crate::openai::{
    AssistantMessage, ChatCompletion, ChatRequest, Choice, ChunkEncoder, Model, ModelList, Role,
    Usage, count_prompt_tokens, count_tokens, error_frame,
};
use crate::replay::decode::Delta;
use crate::replay::render::Prompt;

/// Request header that forces a tier (`1`, `2` or `3`, no fallback); the response header of
/// the same name says which tier served the reply.
pub const TIER_HEADER: &str = "x-computetower-tier";

/// A comment line sent while the site is silent (a long thinking phase), so proxies and
/// clients do not time the stream out.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

pub async fn models(State(state): State<AppState>) -> Result<axum::Json<ModelList>, ApiError> {
    let created = crate::store::now();
    let data = state
        .gateway
        .models()
        .await?
        .into_iter()
        .map(|id| Model {
            id,
            object: "model",
            created,
            owned_by: "computetower",
        })
        .collect();
    Ok(axum::Json(ModelList {
        object: "list",
        data,
    }))
}

/// Reads a request body within the size limit.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(limit)
        } else {
            ApiError::bad_request("The request body could not be read.")
        }
    })
}

/// Parses JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!(
                "We could not parse the JSON body of your request: {inner}."
            ))
            .code("invalid_json")
        } else if path == "." || path.is_empty() {
            ApiError::bad_request(format!("Invalid request body: {inner}."))
        } else {
            ApiError::bad_request(format!("Invalid value for `{path}`: {inner}.")).param(path)
        }
    })
}

/// Checks what the types do not: a usable model, messages, and content this gateway sends.
fn prompt_from(request: &ChatRequest) -> Result<Prompt, ApiError> {
    if request.model.trim().is_empty() {
        return Err(ApiError::bad_request("`model` must not be empty.").param("model"));
    }
    if request.messages.is_empty() {
        return Err(
            ApiError::bad_request("`messages` must hold at least one message.").param("messages"),
        );
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("Only `n = 1` is supported.").param("n"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.iter().enumerate() {
        let text = message
            .text()
            .map_err(|e| ApiError::bad_request(e).param(format!("messages[{i}].content")))?;
        messages.push((message.role, text));
    }
    if !messages.iter().any(|(role, _)| *role == Role::User) {
        return Err(
            ApiError::bad_request("`messages` must include a user message.").param("messages"),
        );
    }
    Ok(Prompt {
        messages,
        model: request.model.clone(),
    })
}

/// The tier the request forces, if any. Checked before the body is read, so a bad value
/// costs nothing.
fn forced_tier(headers: &HeaderMap) -> Result<Option<u8>, ApiError> {
    let Some(value) = headers.get(TIER_HEADER) else {
        return Ok(None);
    };
    match value.to_str().map(str::trim) {
        Ok("1") => Ok(Some(1)),
        Ok("2") => Ok(Some(2)),
        Ok("3") => Ok(Some(3)),
        _ => Err(ApiError::bad_request(format!(
            "Invalid `{TIER_HEADER}` header: it must be 1 (direct replay), 2 (fetch() in the \
             site's page) or 3 (the site's own chat UI)."
        ))
        .param(TIER_HEADER)
        .code("invalid_tier")),
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let forced_tier = forced_tier(&headers)?;
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let mut request: ChatRequest = parse_json(&bytes)?;
    // Taken out first, so the password is never logged, stored or sent to a site.
    if let Some(credentials) = crate::inline::take(&mut request.messages) {
        if !state.config.allow_inline_credentials {
            return Err(ApiError::bad_request(
                "This request carries inline credentials (`URL: … | Email: … | Password: …`), \
                 which this server does not accept; add the account with `computetower account add`.",
            )
            .code("inline_credentials_disabled"));
        }
        request.model = state.gateway.inline_account(&credentials).await?;
    }
    let prompt = prompt_from(&request)?;
    let request_id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let reply = state
        .gateway
        .chat(&prompt, &request_id, forced_tier)
        .await?;
    let tier = header::HeaderValue::from(u16::from(reply.tier()));
    let include_reasoning = request.include_reasoning.unwrap_or(true);
    let created = crate::store::now();
    if request.stream.unwrap_or(false) {
        let include_usage = request
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let prompt_tokens = include_usage.then(|| count_prompt_tokens(&prompt.messages));
        let stream = ChunkStream {
            reply,
            service: request.model.clone(),
            encoder: ChunkEncoder::new(&request_id, created, &request.model),
            state: StreamState::Start,
            include_reasoning,
            usage_text: prompt_tokens.map(|p| (p, String::new())),
            keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE_EVERY)),
        };
        let mut response = Response::new(Body::from_stream(stream));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        // Tells buffering reverse proxies (nginx) to pass chunks through at once.
        headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
        headers.insert(TIER_HEADER, tier);
        return Ok(response);
    }
    let (content, reasoning) = collect(reply, &request.model).await?;
    let completion_tokens = count_tokens(&content) + count_tokens(&reasoning);
    let completion = ChatCompletion {
        id: request_id,
        object: "chat.completion",
        created,
        model: request.model,
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                reasoning_content: (include_reasoning && !reasoning.is_empty())
                    .then_some(reasoning),
            },
            finish_reason: "stop",
        }],
        usage: Usage::new(count_prompt_tokens(&prompt.messages), completion_tokens),
    };
    Ok((
        StatusCode::OK,
        [(TIER_HEADER, tier)],
        axum::Json(completion),
    )
        .into_response())
}

async fn collect(mut reply: Reply, service: &str) -> Result<(String, String), ApiError> {
    let mut content = String::new();
    let mut reasoning = String::new();
    while let Some(item) = reply.next().await {
        match item {
            Ok(Delta::Text(t)) => content.push_str(&t),
            Ok(Delta::Reasoning(t)) => reasoning.push_str(&t),
            Ok(Delta::Done) => break,
            Ok(Delta::Id { .. }) => {}
            Err(e) => {
                return Err(ApiError::from(crate::gateway::GatewayError::Upstream {
                    service: service.to_owned(),
                    source: e,
                }));
            }
        }
    }
    Ok((content, reasoning))
}

enum StreamState {
    Start,
    Streaming,
    /// Finish chunk sent; usage (if asked) and `[DONE]` follow.
    Usage,
    Done,
    Ended,
}

/// Reply deltas → OpenAI chunk frames.
struct ChunkStream {
    reply: Reply,
    service: String,
    encoder: ChunkEncoder,
    state: StreamState,
    include_reasoning: bool,
    /// Prompt tokens and the reply text so far, kept only when usage was asked for.
    usage_text: Option<(u64, String)>,
    keep_alive: Pin<Box<tokio::time::Sleep>>,
}

impl Stream for ChunkStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.state {
                StreamState::Start => {
                    this.state = StreamState::Streaming;
                    return Poll::Ready(Some(Ok(this.encoder.role())));
                }
                StreamState::Streaming => match this.reply.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(delta))) => {
                        let frame = match delta {
                            Delta::Text(t) if !t.is_empty() => {
                                if let Some((_, text)) = &mut this.usage_text {
                                    text.push_str(&t);
                                }
                                this.encoder.content(&t)
                            }
                            Delta::Reasoning(t) if !t.is_empty() && this.include_reasoning => {
                                if let Some((_, text)) = &mut this.usage_text {
                                    text.push_str(&t);
                                }
                                this.encoder.reasoning(&t)
                            }
                            Delta::Done => {
                                this.state = StreamState::Usage;
                                this.encoder.finish("stop")
                            }
                            _ => continue,
                        };
                        this.reset_keep_alive();
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Poll::Ready(None) => {
                        this.state = StreamState::Usage;
                        return Poll::Ready(Some(Ok(this.encoder.finish("stop"))));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        tracing::warn!(error = %e, "reply failed mid-stream");
                        let error = ApiError::from(crate::gateway::GatewayError::Upstream {
                            service: this.service.clone(),
                            source: e,
                        });
                        this.state = StreamState::Done;
                        return Poll::Ready(Some(Ok(error_frame(&error.body()))));
                    }
                    Poll::Pending => {
                        if this.keep_alive.as_mut().poll(cx).is_ready() {
                            this.reset_keep_alive();
                            return Poll::Ready(Some(Ok(Bytes::from_static(b": keep-alive\n\n"))));
                        }
                        return Poll::Pending;
                    }
                },
                StreamState::Usage => {
                    this.state = StreamState::Done;
                    if let Some((prompt_tokens, text)) = this.usage_text.take() {
                        let usage = Usage::new(prompt_tokens, count_tokens(&text));
                        return Poll::Ready(Some(Ok(this.encoder.usage(usage))));
                    }
                }
                StreamState::Done => {
                    this.state = StreamState::Ended;
                    return Poll::Ready(Some(Ok(ChunkEncoder::done())));
                }
                StreamState::Ended => return Poll::Ready(None),
            }
        }
    }
}

impl ChunkStream {
    fn reset_keep_alive(&mut self) {
        let deadline = tokio::time::Instant::now() + KEEP_ALIVE_EVERY;
        self.keep_alive.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn semantic_checks() {
        let request: ChatRequest = parse_json(br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(
            prompt_from(&request).unwrap_err().param.as_deref(),
            Some("messages")
        );
        let request: ChatRequest =
            parse_json(br#"{"model":"m","messages":[{"role":"system","content":"x"}]}"#).unwrap();
        assert!(prompt_from(&request).is_err());
        let request: ChatRequest =
            parse_json(br#"{"model":" ","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(
            prompt_from(&request).unwrap_err().param.as_deref(),
            Some("model")
        );
        let request: ChatRequest =
            parse_json(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(prompt_from(&request).unwrap().flattened(), "x");
    }
}
