//! What the three front doors (chat completions, Responses, Messages) share: admitting an
//! internal request (inline credentials, checks), parameter bounds, and the streamed body
//! that turns reply events into a wire format's SSE frames.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::{Stream, StreamExt};

use super::AppState;
use super::error::ApiError;
use super::extract::TIER_HEADER;
use crate::chat::{self, Event};
use crate::gateway::GatewayError;

/// A comment line sent while the site is silent (a long thinking phase), so proxies and
/// clients do not time the stream out.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// Takes inline credentials out (refusing them unless allowed) and checks what holds for
/// every front door. Runs before anything logs, stores or forwards the request.
pub async fn admit(state: &AppState, request: &mut chat::Request) -> Result<(), ApiError> {
    if let Some(credentials) = request.take_inline_credentials() {
        if !state.config.allow_inline_credentials {
            return Err(ApiError::bad_request(
                "This request carries inline credentials (a site URL, a login and a password), \
                 which this server does not accept; add the account with `computetower account \
                 add`. The request was not forwarded.",
            )
            .code("inline_credentials_disabled"));
        }
        request.model = state.gateway.inline_account(&credentials).await?;
    }
    request
        .check()
        .map_err(|(param, message)| ApiError::bad_request(message).param(param))?;
    super::media::resolve(request, &state.config.api).await
}

/// A number OpenAI bounds: the same 400 it gives outside `min..=max`.
pub fn bounded(param: &str, value: Option<f64>, min: f64, max: f64) -> Result<(), ApiError> {
    let Some(value) = value else {
        return Ok(());
    };
    let (what, code, bound, sign) = if value > max {
        ("above maximum", "decimal_above_max_value", max, "<=")
    } else if value < min || value.is_nan() {
        ("below minimum", "decimal_below_min_value", min, ">=")
    } else {
        return Ok(());
    };
    Err(ApiError::bad_request(format!(
        "Invalid '{param}': decimal {what} value. Expected a value {sign} {bound}, but got \
         {value} instead."
    ))
    .param(param)
    .code(code))
}

/// A token limit: at least 1.
pub fn token_limit(param: &str, value: Option<i64>) -> Result<Option<u64>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n >= 1 => Ok(Some(n as u64)),
        Some(n) => Err(ApiError::bad_request(format!(
            "Invalid '{param}': integer below minimum value. Expected a value >= 1, but got {n} \
             instead."
        ))
        .param(param)
        .code("integer_below_min_value")),
    }
}

/// A failure after the reply started, as the API error it would have been.
pub fn stream_error(error: GatewayError) -> ApiError {
    tracing::warn!(error = %error, "reply failed mid-stream");
    ApiError::from(error)
}

/// Writes one wire format's frames for the reply events.
pub trait Encoder: Send + Unpin + 'static {
    /// Frames before the first event.
    fn start(&mut self, out: &mut Vec<Bytes>);
    fn event(&mut self, event: Event, out: &mut Vec<Bytes>);
    /// A failure mid-stream; the stream ends after it.
    fn error(&mut self, error: ApiError, out: &mut Vec<Bytes>);
    /// After the last event.
    fn end(&mut self, out: &mut Vec<Bytes>);
    fn keep_alive(&self) -> Bytes {
        Bytes::from_static(b": keep-alive\n\n")
    }
    /// Work to finish before the frames of the last event go out (storing the response the
    /// client may ask for as soon as it has them).
    fn hold(&mut self) -> Option<Hold> {
        None
    }
}

pub type Hold = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The SSE body: each event becomes its frames as it arrives (nothing is buffered); a client
/// that goes away drops the events, which cancels the site's call.
pub struct SseBody<E> {
    events: chat::run::EventStream,
    encoder: E,
    frames: VecDeque<Bytes>,
    started: bool,
    ended: bool,
    hold: Option<Hold>,
    keep_alive: Pin<Box<tokio::time::Sleep>>,
}

impl<E: Encoder> SseBody<E> {
    pub fn new(events: chat::run::EventStream, encoder: E) -> Self {
        Self {
            events,
            encoder,
            frames: VecDeque::new(),
            started: false,
            ended: false,
            hold: None,
            keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE_EVERY)),
        }
    }

    /// The streamed response, with the headers SSE needs and the tier that serves it.
    pub fn into_response(self, tier: u8) -> Response {
        let mut response = Response::new(Body::from_stream(self));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // Tells buffering reverse proxies (nginx) to pass chunks through at once.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        headers.insert(TIER_HEADER, HeaderValue::from(u16::from(tier)));
        response
    }
}

impl<E: Encoder> Stream for SseBody<E> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut out = Vec::new();
        if !this.started {
            this.started = true;
            this.encoder.start(&mut out);
            this.frames.extend(out.drain(..));
        }
        loop {
            if let Some(hold) = &mut this.hold {
                if hold.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.hold = None;
            }
            if let Some(frame) = this.frames.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.events.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(event))) => this.encoder.event(event, &mut out),
                Poll::Ready(Some(Err(error))) => {
                    this.encoder.error(stream_error(error), &mut out);
                    this.ended = true;
                }
                Poll::Ready(None) => {
                    this.encoder.end(&mut out);
                    this.ended = true;
                }
                Poll::Pending => {
                    if this.keep_alive.as_mut().poll(cx).is_ready() {
                        this.reset_keep_alive();
                        return Poll::Ready(Some(Ok(this.encoder.keep_alive())));
                    }
                    return Poll::Pending;
                }
            }
            if !out.is_empty() {
                this.reset_keep_alive();
            }
            this.frames.extend(out.drain(..));
            this.hold = this.encoder.hold();
        }
    }
}

impl<E> SseBody<E> {
    fn reset_keep_alive(&mut self) {
        let deadline = tokio::time::Instant::now() + KEEP_ALIVE_EVERY;
        self.keep_alive.as_mut().reset(deadline);
    }
}

/// An SSE frame with an event name (`event: NAME\ndata: JSON\n\n`).
pub fn named_frame(name: &str, data: &serde_json::Value) -> Bytes {
    let json = serde_json::to_string(data).unwrap_or_default();
    Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_give_openai_errors() {
        assert!(bounded("temperature", Some(2.0), 0.0, 2.0).is_ok());
        assert!(bounded("temperature", None, 0.0, 2.0).is_ok());
        let err = bounded("temperature", Some(3.0), 0.0, 2.0).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"));
        assert_eq!(err.code, Some("decimal_above_max_value"));
        assert!(
            err.message.contains("Expected a value <= 2, but got 3"),
            "{err}"
        );
        let err = bounded("top_p", Some(-0.5), 0.0, 1.0).unwrap_err();
        assert_eq!(err.code, Some("decimal_below_min_value"));
        assert_eq!(token_limit("max_tokens", Some(5)).unwrap(), Some(5));
        let err = token_limit("max_tokens", Some(0)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
    }
}
