//! Tier 1: runs a flow as direct HTTP calls (reqwest over rustls) with the session's cookies.
//!
//! Invariants:
//! - The reply is decoded as its bytes arrive; nothing waits for the end of the body.
//! - Dropping the returned stream drops the response, which cancels the call to the site.
//! - Errors say which call failed and how (`replay::failure` classifies the site's answers), so
//!   the gateway can choose what to do; they never carry secrets.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::DeltaStream;
use super::decode;
use super::failure::{self, Call, ERROR_EXCERPT, FailureKind, ReplayError};
use super::plan::{self, Answer, Calls, PREFLIGHT_BODY_LIMIT, Plan};
use super::render::{Prompt, Rendered};
use super::reuse::Reused;
use super::uploads::Uploaded;
use crate::flow::{Flow, ResponseSpec, Transport};
use crate::session::{CookieJar, SessionData};

// Callers that predate `replay::failure` (the server's wiring, the account pool) name these
// here; the definitions live in `replay` and `replay::failure`.
pub use super::Timeouts;
pub use super::failure::MAX_RETRY_AFTER_SECS;

/// How long an idle connection to a site is kept. A burst opens a connection per call in
/// flight, each with its grown read buffer (~20 MiB after 2,000 queued requests); they go
/// this long after it. Capping the pool instead made a burst reconnect for every call.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What a replay needs besides the flow.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The account's URL; relative flow URLs resolve against it.
    pub base: &'a Url,
    pub session: &'a SessionData,
    pub proxy: Option<&'a str>,
    /// Values an earlier exchange of the same site conversation produced (preflight extracts
    /// and reply ids). A preflight whose extracts are all known is skipped: continuing a
    /// conversation reuses its id instead of creating a new one.
    pub conversation: &'a BTreeMap<String, String>,
    /// The stored session's id: session-wide preflight values are reused under it (`None`
    /// runs every preflight).
    pub session_id: Option<&'a str>,
    /// The origins the account's calls may reach; every call is checked before it is built.
    pub pins: &'a crate::pinning::Pins,
}

/// A started replay: the chat call answered 2xx and its body is being decoded.
pub struct Replay {
    pub deltas: DeltaStream,
    /// The session's cookies plus what the site set during this replay.
    pub jar: CookieJar,
    pub jar_changed: bool,
    /// Every preflight value this replay used (known or extracted), to continue the site
    /// conversation next time.
    pub extracted: BTreeMap<String, String>,
}

/// HTTP clients, one per proxy, each with its own connection pool.
pub struct Replayer {
    timeouts: Timeouts,
    clients: Mutex<HashMap<String, reqwest::Client>>,
    /// Session-wide preflight values (`None`: every preflight runs on every request).
    reused: Option<Arc<Reused>>,
    /// Files sessions uploaded, shared with tier 2.
    uploads: Arc<Uploaded>,
}

impl Replayer {
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            timeouts,
            clients: Mutex::new(HashMap::new()),
            reused: None,
            uploads: Arc::new(Uploaded::default()),
        }
    }

    /// Reuses the values of session-wide preflights for `ttl` (see `replay::reuse`).
    pub fn reusing_preflights(mut self, ttl: Duration) -> Self {
        self.reused = (!ttl.is_zero()).then(|| Arc::new(Reused::new(ttl)));
        self
    }

    fn client(&self, proxy: Option<&str>) -> Result<reqwest::Client, ReplayError> {
        let key = proxy.unwrap_or_default().to_owned();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.timeouts.connect)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(proxy) = proxy {
            let proxy = reqwest::Proxy::all(proxy).map_err(|_| ReplayError::Network {
                call: Call::Chat,
                message: "the account's proxy URL is not usable".into(),
            })?;
            builder = builder.proxy(proxy);
        } else {
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|e| ReplayError::Network {
            call: Call::Chat,
            message: format!("cannot build HTTP client: {e}"),
        })?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// The files sessions uploaded, shared with tier 2.
    pub fn uploads(&self) -> Arc<Uploaded> {
        self.uploads.clone()
    }

    /// The session-wide preflight values, shared with tier 2 (`None` when reuse is off).
    pub fn reused(&self) -> Option<Arc<Reused>> {
        self.reused.clone()
    }

    /// Runs the flow (`plan::run`) as direct HTTP calls. Returns once the chat call's
    /// response headers are in; the body is decoded as the returned stream is polled.
    pub async fn start(
        &self,
        flow: &Flow,
        prompt: &Prompt,
        target: Target<'_>,
    ) -> Result<Replay, ReplayError> {
        let mut calls = Http {
            replayer: self,
            client: self.client(target.proxy)?,
            session: target.session,
            proxy: target.proxy,
            jar: CookieJar::new(target.session.cookies.clone()),
            jar_changed: false,
        };
        let plan = Plan {
            flow,
            prompt,
            base: target.base,
            session: target.session,
            conversation: target.conversation,
            pins: target.pins,
            reuse: self.reused.as_deref().zip(target.session_id),
            uploads: target.session_id.map(|id| (&*self.uploads, id)),
        };
        let started = plan::run(&mut calls, plan).await?;
        Ok(Replay {
            deltas: started.deltas,
            jar: calls.jar,
            jar_changed: calls.jar_changed,
            extracted: started.extracted,
        })
    }

    async fn send(
        &self,
        client: &reqwest::Client,
        rendered: Rendered,
        session: &SessionData,
        jar: &CookieJar,
        call: Call,
    ) -> Result<reqwest::Response, ReplayError> {
        let method = reqwest::Method::from_bytes(rendered.method.as_bytes()).map_err(|_| {
            ReplayError::Unexpected {
                call,
                kind: FailureKind::Flow,
                message: format!("`{}` is not an HTTP method", rendered.method),
            }
        })?;
        let mut headers = HeaderMap::with_capacity(rendered.headers.len() + 3);
        for (name, value) in &rendered.headers {
            // Hop-by-hop and computed headers are the client's business.
            if matches!(
                name.to_ascii_lowercase().as_str(),
                "host" | "content-length" | "cookie" | "connection" | "accept-encoding"
            ) {
                continue;
            }
            let name = HeaderName::from_bytes(name.as_bytes());
            let value = HeaderValue::from_str(value);
            if let (Ok(name), Ok(value)) = (name, value) {
                headers.insert(name, value);
            }
        }
        if let Some(content_type) = rendered.content_type {
            let value = match content_type {
                std::borrow::Cow::Borrowed(fixed) => Ok(HeaderValue::from_static(fixed)),
                std::borrow::Cow::Owned(built) => HeaderValue::from_str(&built),
            };
            if let Ok(value) = value {
                headers.insert(reqwest::header::CONTENT_TYPE, value);
            }
        }
        if !headers.contains_key(reqwest::header::USER_AGENT)
            && let Some(ua) = session
                .user_agent
                .as_deref()
                .and_then(|ua| HeaderValue::from_str(ua).ok())
        {
            headers.insert(reqwest::header::USER_AGENT, ua);
        }
        if let Some(cookie) = jar
            .header_for(&rendered.url)
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            headers.insert(reqwest::header::COOKIE, cookie);
        }
        let mut request = client.request(method, rendered.url).headers(headers);
        if let Some(body) = rendered.body {
            request = request.body(body);
        }
        match tokio::time::timeout(self.timeouts.first_byte, request.send()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ReplayError::Network {
                call,
                message: describe_reqwest_error(&e),
            }),
            Err(_) => Err(ReplayError::Network {
                call,
                message: format!(
                    "no response within {} s",
                    self.timeouts.first_byte.as_secs()
                ),
            }),
        }
    }
}

/// Tier 1's way of making a flow's calls: reqwest with the session's cookies, the jar
/// keeping what the site sets.
struct Http<'a> {
    replayer: &'a Replayer,
    client: reqwest::Client,
    session: &'a SessionData,
    proxy: Option<&'a str>,
    jar: CookieJar,
    jar_changed: bool,
}

impl Calls for Http<'_> {
    async fn preflight(&mut self, call: Call, request: Rendered) -> Result<Answer, ReplayError> {
        let response = self
            .replayer
            .send(&self.client, request, self.session, &self.jar, call)
            .await?;
        self.jar_changed |= absorb_cookies(&mut self.jar, &response);
        let response = check_status(response, call, None).await?;
        let headers = response.headers().clone();
        let body = read_limited(response, call).await?;
        Ok(Answer { headers, body })
    }

    async fn chat(
        &mut self,
        request: Rendered,
        spec: &ResponseSpec,
    ) -> Result<DeltaStream, ReplayError> {
        let timeouts = self.replayer.timeouts;
        if spec.transport == Transport::Websocket {
            // Boxed: a WebSocket handshake's future is large, and most flows never take it.
            return Box::pin(super::websocket::open(
                request,
                self.session,
                &self.jar,
                spec,
                timeouts,
                self.proxy,
            ))
            .await;
        }
        let response = self
            .replayer
            .send(&self.client, request, self.session, &self.jar, Call::Chat)
            .await?;
        self.jar_changed |= absorb_cookies(&mut self.jar, &response);
        let response = check_status(response, Call::Chat, Some(spec.transport)).await?;
        let body = IdleTimeout::new(response.bytes_stream().boxed(), timeouts.idle);
        Ok(decode::decode_stream(spec, body)
            .map(|item| item.map_err(ReplayError::from))
            .boxed())
    }

    fn reset(&mut self) {
        self.jar = CookieJar::new(self.session.cookies.clone());
        self.jar_changed = false;
    }
}

/// Names the failure without the URL (it may carry a token in its query).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let what = if e.is_connect() {
        "cannot connect to the site"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "the request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}

fn absorb_cookies(jar: &mut CookieJar, response: &reqwest::Response) -> bool {
    let mut changed = false;
    for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
        if let Ok(text) = value.to_str() {
            changed |= jar.absorb(text, response.url());
        }
    }
    changed
}

/// Passes a 2xx response through; classifies anything else.
async fn check_status(
    response: reqwest::Response,
    call: Call,
    expected: Option<Transport>,
) -> Result<reqwest::Response, ReplayError> {
    let status = response.status();
    if status.is_success() {
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let wants_data = !matches!(expected, None | Some(Transport::Text));
        if failure::is_page_instead_of_data(content_type, wants_data) {
            return Err(failure::html_error(call, &read_excerpt(response).await));
        }
        return Ok(response);
    }
    let headers = response.headers().clone();
    let excerpt = read_excerpt(response).await;
    Err(failure::status_error(
        call,
        status.as_u16(),
        &headers,
        &excerpt,
    ))
}

async fn read_excerpt(mut response: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < ERROR_EXCERPT {
        match response.chunk().await {
            Ok(Some(chunk)) => out.extend_from_slice(&chunk),
            _ => break,
        }
    }
    out.truncate(ERROR_EXCERPT);
    out
}

async fn read_limited(mut response: reqwest::Response, call: Call) -> Result<Vec<u8>, ReplayError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > PREFLIGHT_BODY_LIMIT {
                    return Err(ReplayError::Unexpected {
                        call,
                        kind: FailureKind::FormatDrift,
                        message: "response is larger than 4 MiB".into(),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(ReplayError::Network {
                    call,
                    message: describe_reqwest_error(&e),
                });
            }
        }
    }
}

/// Ends a body that stays silent longer than `idle` with an error.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            expired: false,
        }
    }
}

impl<S> Stream for IdleTimeout<S>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    type Item = Result<Bytes, String>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if self.expired {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(item) => {
                let deadline = tokio::time::Instant::now() + self.idle;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(item.map(|r| r.map_err(|e| describe_reqwest_error(&e))))
            }
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.expired = true;
                    Poll::Ready(Some(Err(format!(
                        "the site sent nothing for {} s",
                        self.idle.as_secs()
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
