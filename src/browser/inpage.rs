//! Tier 2: a flow's calls made by `fetch()` inside the account's logged-in page, so they carry
//! the browser's TLS fingerprint, cookies and anti-bot state.
//!
//! How it works:
//! - The account has a work page (`pool::Tier::InPage`): its chat page, opened once and kept,
//!   with a live-only [`Recorder`] attached.
//! - Each request is rendered in Rust (`replay::render`), with session references resolved
//!   from the live page (its storage and cookies, the caller's session filling in gaps).
//! - A small script starts the `fetch()` (`credentials: "include"`; the cookie header and the
//!   headers a page may not set are dropped) with an `AbortController`, and drains the body
//!   so the page keeps reading. The script returns at once: nothing waits inside
//!   `Runtime.evaluate`.
//! - The call is found in the recorder's live feed by a unique URL fragment (`#ct-…`), which
//!   the page never sends to the site. Its status, headers and body chunks come from the feed:
//!   a preflight's whole body is collected and its values extracted as tier 1 does; the chat
//!   call's chunks feed the flow's [`Decoder`] as they arrive.
//! - WebSocket flows: the script opens the socket in the page and sends the flow's messages;
//!   the socket is the one of that URL whose sent frame is the flow's last message, and its
//!   received frames are decoded as they arrive.
//! - Dropping the returned stream aborts the fetch (or closes the socket) in the page.
//!
//! Errors are classified like tier 1's ([`ReplayError`] with [`Call::Chat`] or
//! [`Call::Preflight`]): 401/403 auth, 429 rate limit, challenge pages anti-bot, an HTML page
//! where data was expected auth or drift.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chromiumoxide::Page;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use url::Url;

use super::TierRequest;
use super::js::inpage as js;
use super::page::{self, is_connection, read_storage};
use super::pool::{BrowserPool, Fresh, PageLease, Tier};
use super::recorder::RecorderEvent;
use crate::flow::{ResponseSpec, Transport};
use crate::recording::Frame;
use crate::replay::DeltaStream;
use crate::replay::decode::{Decoder, Delta};
use crate::replay::failure::{self, Call, ERROR_EXCERPT, FailureKind, ReplayError};
use crate::replay::plan::{self, Answer, Calls, PREFLIGHT_BODY_LIMIT, Plan, Started};
use crate::replay::render::Rendered;
use crate::session::{Cookie, SessionData};

/// The page property holding the in-flight calls (`{tag: {stop, error}}`).
const STATE_KEY: &str = "__ct_inpage";
/// How long an error body is read for classification after its status arrived.
const EXCERPT_WAIT: Duration = Duration::from_secs(2);
/// How often a call not yet seen in the feed is checked for a script-side failure.
const SCRIPT_CHECK: Duration = Duration::from_millis(250);

/// Headers a page cannot set on `fetch()` (the browser computes or forbids them).
fn forbidden(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "cookie"
            | "cookie2"
            | "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "accept-encoding"
            | "accept-charset"
            | "access-control-request-headers"
            | "access-control-request-method"
            | "date"
            | "dnt"
            | "expect"
            | "origin"
            | "referer"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "via"
            | "user-agent"
    ) || name.starts_with("sec-")
        || name.starts_with("proxy-")
}

/// Tier 2: the flow's preflights and chat call run by `fetch()` inside the account's
/// logged-in page (see the module docs).
pub async fn in_page_tier(pool: &BrowserPool, req: TierRequest) -> Result<Started, ReplayError> {
    pool.dies_with(run(pool, req)).await
}

async fn run(pool: &BrowserPool, req: TierRequest) -> Result<Started, ReplayError> {
    let base = Url::parse(&req.account_url).map_err(|_| ReplayError::Unexpected {
        call: Call::Chat,
        kind: FailureKind::Flow,
        message: "the account URL is not a valid URL".into(),
    })?;
    let lease = pool.work_page(&req, Tier::InPage, Fresh::No).await?;
    let page = lease.work.page.clone();
    let session = live_session(&page, req.session.as_ref()).await?;
    let mut calls = InPage {
        page,
        feed: Some(lease.work.recorder.subscribe()),
        lease: Some(lease),
        timeout: req.timeout,
    };
    let plan = Plan {
        flow: &req.flow,
        prompt: &req.prompt,
        base: &base,
        session: &session,
        conversation: &req.conversation,
        pins: &req.pins,
        reuse: req.reused.as_deref().zip(req.session_id.as_deref()),
        uploads: req.uploads.as_deref().zip(req.session_id.as_deref()),
    };
    plan::run(&mut calls, plan).await
}

/// Tier 2's way of making a flow's calls: `fetch()` (or a WebSocket) inside the account's
/// work page, the chat call's answer read from the recorder's feed. The feed and the page
/// lease go with the reply stream once the chat call answered.
struct InPage {
    page: Page,
    feed: Option<mpsc::Receiver<RecorderEvent>>,
    lease: Option<PageLease>,
    timeout: Duration,
}

impl Calls for InPage {
    async fn preflight(&mut self, call: Call, request: Rendered) -> Result<Answer, ReplayError> {
        let started = start_fetch(&self.page, &request, call, true).await?;
        let (status, headers, body) =
            in_page_result(&self.page, &started.tag, self.timeout, call).await?;
        let headers = header_map(&headers);
        if !(200..300).contains(&status) {
            return Err(failure::status_error(call, status, &headers, &body));
        }
        Ok(Answer { headers, body })
    }

    async fn chat(
        &mut self,
        request: Rendered,
        spec: &ResponseSpec,
    ) -> Result<DeltaStream, ReplayError> {
        if spec.transport == Transport::Websocket {
            return open_socket(self, &request, spec).await;
        }
        let page = self.page.clone();
        let feed = self.feed.as_mut().ok_or_else(page_gone)?;
        let call_state = start_fetch(&page, &request, Call::Chat, true).await?;
        let mut guard = StopOnDrop::new(page.clone(), call_state.tag.clone());
        let (id, status, headers) =
            await_response(feed, &page, &call_state, Instant::now() + self.timeout).await?;
        if !(200..300).contains(&status) {
            let excerpt = collect_excerpt(feed, &id).await;
            return Err(status_error(Call::Chat, status, &headers, &excerpt));
        }
        let content_type = header(&headers, "content-type").unwrap_or_default();
        if failure::is_page_instead_of_data(content_type, spec.transport != Transport::Text) {
            let excerpt = collect_excerpt(feed, &id).await;
            return Err(failure::html_error(Call::Chat, &excerpt));
        }
        let (Some(feed), Some(lease)) = (self.feed.take(), self.lease.take()) else {
            return Err(page_gone());
        };
        guard.armed = true;
        let events = forward(feed, id, Vec::new());
        let rescue = Some((page, call_state.tag.clone()));
        Ok(reply_stream(
            events,
            spec,
            self.timeout,
            rescue,
            Box::new((guard, lease)),
        ))
    }

    /// Nothing to forget: the page keeps its own cookies.
    fn reset(&mut self) {}
}

/// The work page went with an earlier reply (a plan runs its chat call once per try).
fn page_gone() -> ReplayError {
    ReplayError::Browser {
        call: Call::Chat,
        message: "the in-page call lost its page".into(),
    }
}

/// Waits (up to `limit`) for a call started with `keep` to complete in the page; returns its
/// status, headers and body, and forgets it in the page.
async fn in_page_result(
    page: &Page,
    tag: &str,
    limit: Duration,
    call: Call,
) -> Result<(u16, Vec<(String, String)>, Vec<u8>), ReplayError> {
    #[derive(Deserialize)]
    struct Result_ {
        #[serde(default)]
        status: u16,
        #[serde(default)]
        headers: Vec<(String, String)>,
        #[serde(default)]
        body: String,
        #[serde(default)]
        error: Option<String>,
    }
    let args = serde_json::json!({ "key": STATE_KEY, "tag": tag });
    let answer = tokio::time::timeout(limit, page::call(page, js::FETCH_RESULT, &args))
        .await
        .map_err(|_| ReplayError::Network {
            call,
            message: format!("no complete response within {} s", limit.as_secs()),
        })?
        .map_err(|e| browser_failure(call, &e))?;
    let result: Result_ = serde_json::from_str(&answer).map_err(|_| ReplayError::Browser {
        call,
        message: "the page returned no result for the call".into(),
    })?;
    if let Some(error) = result.error {
        return Err(ReplayError::Network {
            call,
            message: format!("the in-page call failed: {error}"),
        });
    }
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD
        .decode(result.body)
        .unwrap_or_default();
    if body.len() > PREFLIGHT_BODY_LIMIT {
        return Err(ReplayError::Unexpected {
            call,
            kind: FailureKind::FormatDrift,
            message: "response is larger than 4 MiB".into(),
        });
    }
    Ok((
        result.status,
        result
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect(),
        body,
    ))
}

/// A call started in the page: its tag (the URL fragment that finds it in the feed).
struct PageCall {
    tag: String,
    call: Call,
    method: String,
    /// For a WebSocket: its URL (the feed shows sockets without fragment).
    socket_url: Option<String>,
    /// For a WebSocket: the last message sent, which identifies the socket.
    last_message: Option<String>,
}

#[derive(Deserialize)]
struct ScriptAnswer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Starts `rendered` with `fetch()` in the page; returns at once. The page keeps the body
/// (for [`in_page_result`]) only when `keep`.
async fn start_fetch(
    page: &Page,
    rendered: &Rendered,
    call: Call,
    keep: bool,
) -> Result<PageCall, ReplayError> {
    let tag = format!("ct-{}", uuid::Uuid::new_v4().simple());
    let mut url = rendered.url.clone();
    url.set_fragment(Some(&tag));
    let mut headers: Vec<(String, String)> = rendered
        .headers
        .iter()
        .filter(|(name, _)| !forbidden(name))
        .cloned()
        .collect();
    if let Some(content_type) = &rendered.content_type {
        headers.push(("content-type".to_owned(), content_type.to_string()));
    }
    let (text, binary) = match rendered.body.as_deref() {
        None => (None, None),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(base64_encode(bytes))),
        },
    };
    let args = serde_json::json!({
        "key": STATE_KEY,
        "tag": tag,
        "text": text,
        "binary": binary,
        "method": rendered.method,
        "headers": headers,
        "url": url.as_str(),
        "keep": keep,
    });
    run_script(page, js::FETCH_START, &args, call).await?;
    Ok(PageCall {
        tag,
        call,
        method: rendered.method.clone(),
        socket_url: None,
        last_message: None,
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn run_script(
    page: &Page,
    script: &str,
    args: &serde_json::Value,
    call: Call,
) -> Result<(), ReplayError> {
    let answer = page::call(page, script, args)
        .await
        .map_err(|e| browser_failure(call, &e))?;
    let answer: ScriptAnswer = serde_json::from_str(&answer).map_err(|_| ReplayError::Browser {
        call,
        message: "the page did not start the call".into(),
    })?;
    if !answer.ok {
        return Err(ReplayError::Unexpected {
            call,
            kind: FailureKind::Flow,
            message: format!(
                "the page refused the request: {}",
                answer.error.unwrap_or_default()
            ),
        });
    }
    Ok(())
}

fn browser_failure(call: Call, e: &chromiumoxide::error::CdpError) -> ReplayError {
    ReplayError::Browser {
        call,
        message: if is_connection(e) {
            "lost the connection to Chromium".into()
        } else {
            "the page could not run the call (it may be navigating)".into()
        },
    }
}

/// A failure the page's script recorded for `tag` (the fetch rejected before any request).
async fn script_error(page: &Page, tag: &str) -> Option<String> {
    let args = serde_json::json!({ "key": STATE_KEY, "tag": tag });
    page::call(page, js::CALL_ERROR, &args)
        .await
        .ok()
        .filter(|e| !e.is_empty())
}

/// Waits for the call's response headers in the feed: `(request id, status, headers)`.
async fn await_response(
    feed: &mut mpsc::Receiver<RecorderEvent>,
    page: &Page,
    started: &PageCall,
    deadline: Instant,
) -> Result<(String, u16, Vec<(String, String)>), ReplayError> {
    let call = started.call;
    let suffix = format!("#{}", started.tag);
    let mut id: Option<String> = None;
    let mut check = tokio::time::interval(SCRIPT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = feed.recv() => match event {
                None => return Err(feed_closed(call)),
                Some(RecorderEvent::Request { id: rid, method, url, .. })
                    if id.is_none()
                        && url.ends_with(&suffix)
                        && method.eq_ignore_ascii_case(&started.method) =>
                {
                    id = Some(rid);
                }
                Some(RecorderEvent::Response { id: rid, status, headers })
                    if id.as_ref() == Some(&rid) =>
                {
                    return Ok((rid, status, headers));
                }
                Some(RecorderEvent::Failed { id: rid, error }) if id.as_ref() == Some(&rid) => {
                    return Err(ReplayError::Network { call, message: format!("the in-page call failed: {error}") });
                }
                Some(_) => {}
            },
            _ = check.tick(), if id.is_none() => {
                if let Some(error) = script_error(page, &started.tag).await {
                    return Err(ReplayError::Network { call, message: format!("the in-page call failed: {error}") });
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ReplayError::Network {
                    call,
                    message: "no response within the time limit".into(),
                });
            }
        }
    }
}

fn feed_closed(call: Call) -> ReplayError {
    ReplayError::Browser {
        call,
        message: "the browser stopped reporting the page's network traffic".into(),
    }
}

/// The start of an error body, for classification; whatever arrived within [`EXCERPT_WAIT`].
pub(super) async fn collect_excerpt(feed: &mut mpsc::Receiver<RecorderEvent>, id: &str) -> Vec<u8> {
    let deadline = Instant::now() + EXCERPT_WAIT;
    let mut body = Vec::new();
    while body.len() < ERROR_EXCERPT {
        match tokio::time::timeout_at(deadline, feed.recv()).await {
            Ok(Some(RecorderEvent::Data { id: rid, bytes })) if rid == id => {
                body.extend_from_slice(&bytes)
            }
            Ok(Some(
                RecorderEvent::Finished { id: rid } | RecorderEvent::Failed { id: rid, .. },
            )) if rid == id => {
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(ERROR_EXCERPT);
    body
}

pub(super) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// A non-2xx answer, classified as tier 1 does.
pub(super) fn status_error(
    call: Call,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> ReplayError {
    failure::status_error(call, status, &header_map(headers), body)
}

/// The session the page itself holds: its storage and cookies (HttpOnly included), over
/// `base` (the caller's session) for anything the page lacks.
async fn live_session(page: &Page, base: Option<&SessionData>) -> Result<SessionData, ReplayError> {
    let mut session = base.cloned().unwrap_or_default();
    let storage = read_storage(page)
        .await
        .map_err(|e| browser_failure(Call::Chat, &e))?;
    session.local_storage.extend(storage.local);
    session.session_storage.extend(storage.session);
    session.user_agent = Some(storage.ua);
    let cookies = page
        .get_cookies()
        .await
        .map_err(|e| browser_failure(Call::Chat, &e))?;
    for cookie in cookies.iter().map(super::harvest::convert) {
        merge_cookie(&mut session.cookies, cookie);
    }
    Ok(session)
}

fn merge_cookie(cookies: &mut Vec<Cookie>, cookie: Cookie) {
    match cookies
        .iter_mut()
        .find(|c| c.name == cookie.name && c.domain == cookie.domain && c.path == cookie.path)
    {
        Some(existing) => *existing = cookie,
        None => cookies.push(cookie),
    }
}

/// Tier 2 over a WebSocket: the socket is opened by the page (see the module docs).
async fn open_socket(
    calls: &mut InPage,
    rendered: &Rendered,
    spec: &ResponseSpec,
) -> Result<DeltaStream, ReplayError> {
    let page = calls.page.clone();
    let timeout = calls.timeout;
    let call = Call::Chat;
    let mut url = rendered.url.clone();
    let scheme = match url.scheme() {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    let _ = url.set_scheme(scheme);
    url.set_fragment(None);
    let messages: Vec<String> = match rendered
        .body
        .as_deref()
        .map(serde_json::from_slice::<serde_json::Value>)
    {
        Some(Ok(serde_json::Value::Array(items))) => items.into_iter().map(message_text).collect(),
        Some(Ok(one)) => vec![message_text(one)],
        Some(Err(_)) | None => Vec::new(),
    };
    let tag = format!("ct-{}", uuid::Uuid::new_v4().simple());
    let args = serde_json::json!({
        "key": STATE_KEY,
        "tag": tag,
        "url": url.as_str(),
        "messages": messages,
    });
    let started = PageCall {
        tag: tag.clone(),
        call,
        method: "GET".into(),
        socket_url: Some(url.to_string()),
        last_message: messages.last().cloned(),
    };
    run_script(&page, js::SOCKET_OPEN, &args, call).await?;
    let mut guard = StopOnDrop::new(page.clone(), tag);
    guard.armed = true;
    let feed = calls.feed.as_mut().ok_or_else(page_gone)?;
    let (id, early) = await_socket(feed, &page, &started, Instant::now() + timeout).await?;
    let (Some(feed), Some(lease)) = (calls.feed.take(), calls.lease.take()) else {
        return Err(page_gone());
    };
    let events = forward(feed, id, early);
    Ok(reply_stream(
        events,
        spec,
        timeout,
        None,
        Box::new((guard, lease)),
    ))
}

fn message_text(value: serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Finds the page's socket: of the sockets to the URL, the one that sent the last message.
/// Returns its id and the frames it received before that.
async fn await_socket(
    feed: &mut mpsc::Receiver<RecorderEvent>,
    page: &Page,
    started: &PageCall,
    deadline: Instant,
) -> Result<(String, Vec<RecorderEvent>), ReplayError> {
    let call = started.call;
    let url = started.socket_url.clone().unwrap_or_default();
    let mut candidates: HashMap<String, Vec<RecorderEvent>> = HashMap::new();
    let mut refused: Option<ReplayError> = None;
    let mut check = tokio::time::interval(SCRIPT_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = feed.recv() => match event {
                None => return Err(feed_closed(call)),
                Some(RecorderEvent::Request { id, url: u, resource_type, .. })
                    if resource_type == "WebSocket" && same_socket_url(&u, &url) =>
                {
                    candidates.insert(id, Vec::new());
                }
                Some(RecorderEvent::Response { id, status, headers }) if candidates.contains_key(&id) => {
                    if status != 101 {
                        refused = Some(status_error(call, status, &headers, b""));
                    }
                }
                Some(RecorderEvent::Frame { id, frame }) if candidates.contains_key(&id) => {
                    if frame.sent {
                        if started.last_message.as_deref() == Some(frame.payload.as_str())
                            || started.last_message.is_none()
                        {
                            let early = candidates.remove(&id).unwrap_or_default();
                            return Ok((id, early));
                        }
                    } else if let Some(held) = candidates.get_mut(&id) {
                        held.push(RecorderEvent::Frame { id: id.clone(), frame });
                    }
                }
                Some(RecorderEvent::Failed { id, error } ) if candidates.contains_key(&id) => {
                    candidates.remove(&id);
                    if candidates.is_empty() {
                        return Err(refused.take().unwrap_or(ReplayError::Network { call, message: format!("the in-page WebSocket failed: {error}") }));
                    }
                }
                Some(RecorderEvent::Finished { id }) if candidates.contains_key(&id) => {
                    candidates.remove(&id);
                    if candidates.is_empty() {
                        return Err(refused.take().unwrap_or(ReplayError::Network { call, message: "the in-page WebSocket closed before the chat message was sent".into() }));
                    }
                }
                Some(_) => {}
            },
            _ = check.tick() => {
                if let Some(error) = script_error(page, &started.tag).await {
                    return Err(refused.take().unwrap_or(ReplayError::Network { call, message: format!("the in-page call failed: {error}") }));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Err(refused.take().unwrap_or(ReplayError::Network {
                    call,
                    message: "the in-page WebSocket did not open within the time limit".into(),
                }));
            }
        }
    }
}

fn same_socket_url(seen: &str, wanted: &str) -> bool {
    let strip = |u: &str| {
        u.split('#')
            .next()
            .unwrap_or(u)
            .trim_end_matches('/')
            .to_owned()
    };
    strip(seen) == strip(wanted)
}

/// Forwards the feed's events of request `id` (after `early`) to an unbounded channel, so a
/// slow reader of the reply never makes the recorder drop the feed. Ends with the request.
pub(super) fn forward(
    mut feed: mpsc::Receiver<RecorderEvent>,
    id: String,
    early: Vec<RecorderEvent>,
) -> mpsc::UnboundedReceiver<RecorderEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    for event in early {
        let _ = tx.send(event);
    }
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                event = feed.recv() => event,
                () = tx.closed() => return,
            };
            let Some(event) = event else {
                return;
            };
            let (mine, last) = match &event {
                RecorderEvent::Data { id: rid, .. } | RecorderEvent::Frame { id: rid, .. } => {
                    (*rid == id, false)
                }
                RecorderEvent::Finished { id: rid } | RecorderEvent::Failed { id: rid, .. } => {
                    (*rid == id, *rid == id)
                }
                _ => (false, false),
            };
            if mine && tx.send(event).is_err() {
                return;
            }
            if last {
                return;
            }
        }
    });
    rx
}

/// Stops an in-page call (aborts the fetch, closes the socket) when dropped while armed.
pub(super) struct StopOnDrop {
    page: Page,
    tag: String,
    pub(super) armed: bool,
}

impl StopOnDrop {
    fn new(page: Page, tag: String) -> Self {
        Self {
            page,
            tag,
            armed: false,
        }
    }
}

impl Drop for StopOnDrop {
    /// Stops the call when armed; forgets it in the page either way.
    fn drop(&mut self) {
        let args = serde_json::json!({ "key": STATE_KEY, "tag": self.tag, "stop": self.armed });
        let page = self.page.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = page::call(&page, js::CALL_STOP, &args).await;
            });
        }
    }
}

/// Something the reply stream keeps alive until it is dropped (leases, guards).
pub(super) type Keep = Box<dyn std::any::Any + Send>;

/// Decodes the forwarded events of the chat call as they arrive. `Data` chunks feed the
/// decoder (received frames for the WebSocket transport); `Finished` ends the body. A silence
/// longer than `idle` is an error. Dropping the stream drops `keep`.
///
/// `rescue` names an in-page call started with `keep`: when the feed reports the call failed
/// but the page read the whole body (the DevTools network stream can give up on a response
/// the page itself reads fine), the rest of the body comes from the page.
pub(super) fn reply_stream(
    events: mpsc::UnboundedReceiver<RecorderEvent>,
    spec: &ResponseSpec,
    idle: Duration,
    rescue: Option<(Page, String)>,
    keep: Keep,
) -> DeltaStream {
    struct State {
        events: mpsc::UnboundedReceiver<RecorderEvent>,
        rescue: Option<(Page, String)>,
        received: usize,
        decoder: Decoder,
        pending: VecDeque<Delta>,
        ended: bool,
        socket: bool,
        idle: Duration,
        keep: Keep,
    }
    let state = State {
        events,
        rescue,
        received: 0,
        decoder: Decoder::new(spec),
        pending: VecDeque::new(),
        ended: false,
        socket: spec.transport == Transport::Websocket,
        idle,
        keep,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(delta) = s.pending.pop_front() {
                return Some((Ok(delta), s));
            }
            if s.ended || s.decoder.is_done() {
                return None;
            }
            let mut out = Vec::new();
            let result = match tokio::time::timeout(s.idle, s.events.recv()).await {
                Err(_) => Err(ReplayError::Body(format!(
                    "the site sent nothing for {} s",
                    s.idle.as_secs()
                ))),
                Ok(None) => Err(ReplayError::Body(
                    "the browser stopped reporting the reply".into(),
                )),
                Ok(Some(RecorderEvent::Data { bytes, .. })) if !s.socket => {
                    s.received += bytes.len();
                    s.decoder.feed(&bytes, &mut out).map_err(ReplayError::from)
                }
                Ok(Some(RecorderEvent::Frame {
                    frame:
                        Frame {
                            sent: false,
                            payload,
                            ..
                        },
                    ..
                })) if s.socket => s
                    .decoder
                    .feed_message(None, &payload, &mut out)
                    .map_err(ReplayError::from),
                Ok(Some(RecorderEvent::Finished { .. })) => {
                    s.ended = true;
                    disarm(&mut s.keep);
                    s.decoder.finish(&mut out).map_err(ReplayError::from)
                }
                Ok(Some(RecorderEvent::Failed { error, .. })) => {
                    s.ended = true;
                    let rest = match s.rescue.take() {
                        Some((page, tag)) if !s.socket => {
                            in_page_rest(&page, &tag, s.received).await
                        }
                        _ => None,
                    };
                    match rest {
                        Some(rest) => {
                            disarm(&mut s.keep);
                            s.decoder
                                .feed(&rest, &mut out)
                                .and_then(|()| s.decoder.finish(&mut out))
                                .map_err(ReplayError::from)
                        }
                        None => Err(ReplayError::Body(format!(
                            "the in-page call failed: {error}"
                        ))),
                    }
                }
                Ok(Some(_)) => Ok(()),
            };
            s.pending.extend(out);
            if let Err(e) = result {
                s.ended = true;
                s.pending.clear();
                return Some((Err(e), s));
            }
        }
    })
    .boxed()
}

/// The body bytes after the first `skip` of a call the page read completely, if it did
/// (waiting up to two seconds for the page to finish reading).
async fn in_page_rest(page: &Page, tag: &str, skip: usize) -> Option<Vec<u8>> {
    let args = serde_json::json!({ "key": STATE_KEY, "tag": tag });
    let answer = page::call(page, js::FETCH_REST, &args).await.ok()?;
    let encoded: Option<String> = serde_json::from_str(&answer).ok()?;
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD
        .decode(encoded?)
        .ok()?;
    tracing::debug!("the network feed lost an in-page call; its body came from the page");
    Some(body.get(skip..).map(<[u8]>::to_vec).unwrap_or_default())
}

/// A call that finished by itself needs no stopping.
fn disarm(keep: &mut Keep) {
    if let Some((guard, _)) = keep.downcast_mut::<(StopOnDrop, PageLease)>() {
        guard.armed = false;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn data(id: &str, bytes: &'static [u8]) -> RecorderEvent {
        RecorderEvent::Data {
            id: id.to_owned(),
            bytes: bytes::Bytes::from_static(bytes),
        }
    }

    #[test]
    fn forbidden_headers_are_dropped_and_others_kept() {
        for name in ["Cookie", "host", "Sec-Fetch-Mode", "user-agent", "Origin"] {
            assert!(forbidden(name), "{name}");
        }
        for name in ["authorization", "x-csrf-token", "content-type", "accept"] {
            assert!(!forbidden(name), "{name}");
        }
    }

    #[test]
    fn status_errors_are_classified_like_tier_one() {
        let e = status_error(Call::Chat, 429, &[("retry-after".into(), "7".into())], b"");
        assert_eq!(e.kind(), FailureKind::RateLimit);
        assert_eq!(e.retry_after(), Some(7));
        let e = status_error(
            Call::Preflight(1),
            401,
            &[],
            br#"{"error":{"message":"no"}}"#,
        );
        assert_eq!(e.kind(), FailureKind::Auth);
        assert!(e.to_string().contains("no"), "{e}");
        let e = status_error(Call::Chat, 403, &[], b"<title>Just a moment...</title>");
        assert_eq!(e.kind(), FailureKind::AntiBot);
    }

    #[tokio::test]
    async fn the_reply_stream_decodes_chunks_as_they_come() {
        let spec: ResponseSpec = serde_json::from_value(serde_json::json!({
            "transport": "sse", "text": {"path": "/t", "mode": "delta"}, "done": [{"data": "[DONE]"}]
        }))
        .unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = reply_stream(rx, &spec, Duration::from_secs(5), None, Box::new(()));
        tx.send(data("1", b"data: {\"t\":\"he")).unwrap();
        tx.send(data("1", b"llo\"}\n\n")).unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Delta::Text("hello".into())
        );
        tx.send(data("1", b"data: [DONE]\n\n")).unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), Delta::Done);
        assert!(stream.next().await.is_none());
    }
}
