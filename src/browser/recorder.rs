//! The network recorder: every request a page makes while it is attached, with the headers
//! actually sent, the bodies, the complete response bodies (streamed ones included), EventSource
//! messages and WebSocket frames, as [`Exchange`]s; and a live feed of the same
//! ([`Recorder::subscribe`]) for callers that act on a reply while it streams.
//!
//! How the data is obtained (see CHROMIUM.md):
//! - Request headers with `cookie`: `Network.requestWillBeSentExtraInfo` does not parse in
//!   chromiumoxide 0.9.1, so the pool launches Chromium with `surface_invalid_messages()` and
//!   its handler-draining task hands every unparsable message to [`RawTaps`], which routes
//!   those of an attached page's session here as raw JSON. The typed event is listened to as
//!   well (should a later crate parse it).
//! - Request bodies: `postDataEntries` (base64), else `Network.getRequestPostData`.
//! - Streamed response bodies: `Network.streamResourceContent` as soon as `responseReceived`
//!   arrives (its `bufferedData` is the start of the body), then each `dataReceived` carries
//!   its chunk; the page keeps streaming normally. After `loadingFinished`,
//!   `Network.getResponseBody` gives the complete body: the recording keeps that, and the live
//!   feed gets whatever part of it the chunks had not delivered yet, so the feed's `Data`
//!   chunks of a finished request always add up to its complete body.
//!
//! Invariants:
//! - Events of different kinds arrive on separate chromiumoxide channels, so they are merged
//!   by one task that owns all state; ordering across kinds is restored from the CDP
//!   timestamps (exchanges are sorted by start) and by the per-request state machine above
//!   (a request's `Finished` is emitted only once its body is complete; its `Response`, `Data`
//!   and `Finished` wait for its `Request`). The feed's `Frame`s of one socket may come sent
//!   and received out of order by a few milliseconds; recorded frames are sorted by time.
//! - Nothing here logs header values, bodies or frames.
//! - A live-feed subscriber that falls more than [`FEED_CAPACITY`] events behind is dropped
//!   (its receiver ends) rather than slowing the recording down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::network::{
    EventDataReceived, EventEventSourceMessageReceived, EventLoadingFailed, EventLoadingFinished,
    EventRequestWillBeSent, EventRequestWillBeSentExtraInfo, EventResponseReceived,
    EventResponseReceivedExtraInfo, EventWebSocketClosed, EventWebSocketCreated,
    EventWebSocketFrameError, EventWebSocketFrameReceived, EventWebSocketFrameSent,
    EventWebSocketHandshakeResponseReceived, EventWebSocketWillSendHandshakeRequest,
    GetRequestPostDataParams, GetResponseBodyParams, ResourceType, StreamResourceContentParams,
    WebSocketFrame,
};
use chromiumoxide::error::CdpError;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::recording::{Body, Exchange, Frame};

/// How many events a live-feed subscriber may fall behind before it is dropped.
pub const FEED_CAPACITY: usize = 4096;
/// How long `stop` waits for body fetches still in flight.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// One thing the recorder saw, as it happened. `id` is the CDP request id ([`Exchange::id`]).
#[derive(Debug, Clone, PartialEq)]
pub enum RecorderEvent {
    /// A request started (its body, when it has one, is known by now).
    Request {
        id: String,
        method: String,
        url: String,
        resource_type: String,
        body: Option<Bytes>,
    },
    /// Response headers arrived.
    Response {
        id: String,
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// The next piece of a response body, as it arrived.
    Data { id: String, bytes: Bytes },
    /// A WebSocket frame (sent or received) or an EventSource message (received).
    Frame { id: String, frame: Frame },
    /// The response is complete (its `Data` add up to the whole body), or the socket closed.
    Finished { id: String },
    /// The request failed or was cancelled.
    Failed { id: String, error: String },
}

/// A message from Chromium that chromiumoxide could not parse, kept as JSON.
#[derive(Debug, Clone)]
pub(crate) struct RawEvent {
    method: String,
    params: serde_json::Value,
}

/// Routes unparsable CDP messages (see the module docs) to the recorders attached to their
/// session. Owned by the running browser; fed by its handler-draining task.
#[derive(Default)]
pub(crate) struct RawTaps {
    taps: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<RawEvent>>>>,
}

impl RawTaps {
    /// Called with the raw text of every message the handler could not parse. Cheap when no
    /// recorder is attached. Never logs the message (it carries cookies).
    pub(crate) fn dispatch(&self, raw: &str) {
        let mut taps = lock(&self.taps);
        if taps.is_empty() {
            return;
        }
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(raw) else {
            return;
        };
        let Some(session) = value
            .get("sessionId")
            .and_then(|s| s.as_str())
            .map(str::to_owned)
        else {
            return;
        };
        let Some(senders) = taps.get_mut(&session) else {
            return;
        };
        let method = value
            .get("method")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_owned();
        let params = value
            .get_mut("params")
            .map(serde_json::Value::take)
            .unwrap_or_default();
        senders.retain(|tx| {
            tx.send(RawEvent {
                method: method.clone(),
                params: params.clone(),
            })
            .is_ok()
        });
        if senders.is_empty() {
            taps.remove(&session);
        }
    }

    fn tap(&self, session: &str) -> mpsc::UnboundedReceiver<RawEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut taps = lock(&self.taps);
        taps.retain(|_, senders| {
            senders.retain(|s| !s.is_closed());
            !senders.is_empty()
        });
        taps.entry(session.to_owned()).or_default().push(tx);
        rx
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Subscribers = Arc<Mutex<Vec<mpsc::Sender<RecorderEvent>>>>;

enum Command {
    Snapshot(oneshot::Sender<Vec<Exchange>>),
    Stop(oneshot::Sender<Vec<Exchange>>),
}

/// Records one page's network traffic from [`Recorder::start`] until [`Recorder::stop`].
/// Dropping it stops recording and discards what was recorded.
pub struct Recorder {
    commands: mpsc::UnboundedSender<Command>,
    subscribers: Subscribers,
    task: JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    /// Attaches to `page`: from when this returns, every request the page makes is recorded.
    pub(crate) async fn start(page: &Page, taps: &RawTaps) -> Result<Recorder, CdpError> {
        Self::attach(page, taps, true).await
    }

    /// Attaches to `page` for the live feed only: a request is forgotten once its `Finished`
    /// or `Failed` went out, so a recorder left on a long-lived page does not grow.
    /// [`Recorder::exchanges`] then shows only the requests in flight.
    pub(crate) async fn start_live(page: &Page, taps: &RawTaps) -> Result<Recorder, CdpError> {
        Self::attach(page, taps, false).await
    }

    async fn attach(page: &Page, taps: &RawTaps, keep: bool) -> Result<Recorder, CdpError> {
        let raw = taps.tap(page.session_id().as_ref());
        let events = listen(page).await?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let subscribers: Subscribers = Arc::default();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let state = State {
            page: page.clone(),
            started: std::time::Instant::now(),
            base_ts: None,
            entries: HashMap::new(),
            early_extra: HashMap::new(),
            done: Vec::new(),
            subscribers: subscribers.clone(),
            internal: internal_tx,
            pending: 0,
            keep,
            forgotten: std::collections::VecDeque::new(),
        };
        let task = tokio::spawn(state.run(events, raw, internal_rx, command_rx));
        Ok(Recorder {
            commands,
            subscribers,
            task,
        })
    }

    /// A live feed of everything recorded from now on. Events are delivered as they happen;
    /// a subscriber more than [`FEED_CAPACITY`] events behind is dropped.
    pub fn subscribe(&self) -> mpsc::Receiver<RecorderEvent> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        lock(&self.subscribers).push(tx);
        rx
    }

    /// What has been recorded so far (bodies of requests in flight as far as they arrived).
    pub async fn exchanges(&self) -> Vec<Exchange> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Snapshot(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops recording and returns every exchange, ordered by start. Body fetches still in
    /// flight are awaited for up to a few seconds.
    pub async fn stop(self) -> Vec<Exchange> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// Everything the merging task reacts to.
enum Input {
    WillBeSent(Arc<EventRequestWillBeSent>),
    ExtraInfo {
        id: String,
        headers: Vec<(String, String)>,
    },
    Response(Arc<EventResponseReceived>),
    ResponseExtra(Arc<EventResponseReceivedExtraInfo>),
    Data(Arc<EventDataReceived>),
    Finished(Arc<EventLoadingFinished>),
    Failed(Arc<EventLoadingFailed>),
    SourceMessage(Arc<EventEventSourceMessageReceived>),
    WsCreated(Arc<EventWebSocketCreated>),
    WsRequest(Arc<EventWebSocketWillSendHandshakeRequest>),
    WsResponse(Arc<EventWebSocketHandshakeResponseReceived>),
    WsSent(Arc<EventWebSocketFrameSent>),
    WsReceived(Arc<EventWebSocketFrameReceived>),
    WsClosed(Arc<EventWebSocketClosed>),
    WsError(Arc<EventWebSocketFrameError>),
    /// Results of the CDP commands the task starts.
    PostData {
        id: String,
        body: Option<Vec<u8>>,
    },
    Buffered {
        id: String,
        data: Option<Vec<u8>>,
    },
    Body {
        id: String,
        body: Option<Vec<u8>>,
    },
}

async fn listen(page: &Page) -> Result<BoxStream<'static, Input>, CdpError> {
    macro_rules! streams {
        ($($event:ty => $map:expr),* $(,)?) => {
            vec![$(page.event_listener::<$event>().await?.map($map).boxed()),*]
        };
    }
    let streams: Vec<BoxStream<'static, Input>> = streams![
        EventRequestWillBeSent => Input::WillBeSent,
        EventRequestWillBeSentExtraInfo => |e: Arc<EventRequestWillBeSentExtraInfo>| Input::ExtraInfo {
            id: e.request_id.as_ref().to_owned(),
            headers: header_list(e.headers.inner()),
        },
        EventResponseReceived => Input::Response,
        EventResponseReceivedExtraInfo => Input::ResponseExtra,
        EventDataReceived => Input::Data,
        EventLoadingFinished => Input::Finished,
        EventLoadingFailed => Input::Failed,
        EventEventSourceMessageReceived => Input::SourceMessage,
        EventWebSocketCreated => Input::WsCreated,
        EventWebSocketWillSendHandshakeRequest => Input::WsRequest,
        EventWebSocketHandshakeResponseReceived => Input::WsResponse,
        EventWebSocketFrameSent => Input::WsSent,
        EventWebSocketFrameReceived => Input::WsReceived,
        EventWebSocketClosed => Input::WsClosed,
        EventWebSocketFrameError => Input::WsError,
    ];
    Ok(futures_util::stream::select_all(streams).boxed())
}

/// CDP headers (a JSON object) as lower-case `(name, value)` pairs; values Chromium joined
/// with newlines (several `set-cookie`) become several pairs; HTTP/2 pseudo-headers dropped.
fn header_list(value: &serde_json::Value) -> Vec<(String, String)> {
    let Some(map) = value.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, value) in map {
        if name.starts_with(':') {
            continue;
        }
        let name = name.to_ascii_lowercase();
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        for part in text.split('\n') {
            out.push((name.clone(), part.to_owned()));
        }
    }
    out
}

fn decode_base64(data: &str) -> Vec<u8> {
    BASE64.decode(data).unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// Not streamed (static resources): the body comes from `getResponseBody` at the end.
    Off,
    /// `streamResourceContent` sent, its answer (the buffered start) not back yet.
    Requested,
    Active,
    /// Streaming could not be enabled (the response was already complete, for example).
    Failed,
}

struct Entry {
    ex: Exchange,
    /// The `Request` feed event was sent; until then feed events wait in `held`.
    announced: bool,
    held: Vec<RecorderEvent>,
    awaiting_post_data: bool,
    extra_headers: bool,
    extra_response_headers: bool,
    stream: Stream,
    /// Chunks that arrived while the buffered start was still being fetched.
    stash: Vec<Vec<u8>>,
    /// The body as delivered to the feed so far.
    streamed: Vec<u8>,
    loading_finished: bool,
    awaiting_body: bool,
    full: Option<Vec<u8>>,
    /// `Finished` / `Failed` was emitted.
    closed: bool,
}

impl Entry {
    fn new(id: &str) -> Entry {
        Entry {
            ex: Exchange {
                id: id.to_owned(),
                ..Exchange::default()
            },
            announced: false,
            held: Vec::new(),
            awaiting_post_data: false,
            extra_headers: false,
            extra_response_headers: false,
            stream: Stream::Off,
            stash: Vec::new(),
            streamed: Vec::new(),
            loading_finished: false,
            awaiting_body: false,
            full: None,
            closed: false,
        }
    }

    /// The exchange as recorded so far.
    fn exchange(&self) -> Exchange {
        let mut ex = self.ex.clone();
        // Sent and received frames come on separate channels: order them by CDP time.
        ex.frames.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        // CDP stamps the `responseReceived` of a response that arrived whole a fraction of a
        // millisecond after its `loadingFinished`.
        if let (Some(first), Some(last)) = (ex.first_byte_ms, ex.finished_ms)
            && last < first
        {
            ex.finished_ms = Some(first);
        }
        if ex.response_body.is_none() {
            if let Some(full) = &self.full {
                ex.response_body = Some(Body(full.clone()));
            } else if !self.streamed.is_empty() || self.loading_finished {
                ex.response_body = Some(Body(self.streamed.clone()));
            }
        }
        ex
    }
}

/// Resource types whose responses are streamed into the feed as they arrive.
fn streamable(kind: &ResourceType) -> bool {
    matches!(
        kind,
        ResourceType::Fetch | ResourceType::Xhr | ResourceType::EventSource | ResourceType::Other
    )
}

/// Resource types whose complete body is fetched at the end (static assets are not).
fn wants_body(kind: &str) -> bool {
    matches!(
        kind,
        "Fetch" | "XHR" | "EventSource" | "Other" | "Document" | "Ping" | "Preflight" | ""
    )
}

/// The request an input is about.
fn input_id(input: &Input) -> Option<&str> {
    Some(match input {
        Input::WillBeSent(e) => e.request_id.as_ref(),
        Input::ExtraInfo { id, .. }
        | Input::PostData { id, .. }
        | Input::Buffered { id, .. }
        | Input::Body { id, .. } => id,
        Input::Response(e) => e.request_id.as_ref(),
        Input::ResponseExtra(e) => e.request_id.as_ref(),
        Input::Data(e) => e.request_id.as_ref(),
        Input::Finished(e) => e.request_id.as_ref(),
        Input::Failed(e) => e.request_id.as_ref(),
        Input::SourceMessage(e) => e.request_id.as_ref(),
        Input::WsCreated(e) => e.request_id.as_ref(),
        Input::WsRequest(e) => e.request_id.as_ref(),
        Input::WsResponse(e) => e.request_id.as_ref(),
        Input::WsSent(e) => e.request_id.as_ref(),
        Input::WsReceived(e) => e.request_id.as_ref(),
        Input::WsClosed(e) => e.request_id.as_ref(),
        Input::WsError(e) => e.request_id.as_ref(),
    })
}

struct State {
    page: Page,
    started: std::time::Instant,
    /// CDP monotonic time (s) of the recording's start, estimated from the first event.
    base_ts: Option<f64>,
    entries: HashMap<String, Entry>,
    /// Extra-info headers that arrived before their request.
    early_extra: HashMap<String, Vec<(String, String)>>,
    /// Exchanges closed early (redirect hops).
    done: Vec<Exchange>,
    subscribers: Subscribers,
    internal: mpsc::UnboundedSender<Input>,
    /// CDP commands started and not answered yet.
    pending: usize,
    /// Whether closed requests are kept (a recording) or forgotten (a live feed only).
    keep: bool,
    /// Recently forgotten request ids: late events for them are ignored.
    forgotten: std::collections::VecDeque<String>,
}

/// How many forgotten request ids a live-only recorder remembers.
const FORGOTTEN: usize = 512;

impl State {
    async fn run(
        mut self,
        mut events: BoxStream<'static, Input>,
        mut raw: mpsc::UnboundedReceiver<RawEvent>,
        mut internal: mpsc::UnboundedReceiver<Input>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let mut stopping: Option<(oneshot::Sender<Vec<Exchange>>, tokio::time::Instant)> = None;
        loop {
            if let Some((_, deadline)) = &stopping
                && (self.pending == 0 || tokio::time::Instant::now() >= *deadline)
            {
                if let Some((reply, _)) = stopping.take() {
                    let _ = reply.send(self.exchanges());
                }
                return;
            }
            let stop_at = stopping
                .as_ref()
                .map(|(_, d)| *d)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                Some(input) = internal.recv() => self.on_input(input),
                Some(input) = events.next() => self.on_input(input),
                Some(raw) = raw.recv() => self.on_raw(raw),
                command = commands.recv(), if stopping.is_none() => match command {
                    Some(Command::Snapshot(reply)) => { let _ = reply.send(self.exchanges()); }
                    Some(Command::Stop(reply)) => {
                        stopping = Some((reply, tokio::time::Instant::now() + STOP_GRACE));
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(stop_at), if stopping.is_some() => {}
            }
        }
    }

    fn exchanges(&self) -> Vec<Exchange> {
        let mut all: Vec<Exchange> = self
            .done
            .iter()
            .cloned()
            .chain(self.entries.values().map(Entry::exchange))
            .filter(|ex| !ex.url.starts_with("data:") && !ex.url.is_empty())
            .collect();
        all.sort_by(|a, b| a.started_ms.total_cmp(&b.started_ms));
        all
    }

    /// Milliseconds since the recording started, for a CDP monotonic timestamp.
    fn ms(&mut self, ts: f64) -> f64 {
        let base = *self
            .base_ts
            .get_or_insert_with(|| ts - self.started.elapsed().as_secs_f64());
        ((ts - base) * 1000.0).max(0.0)
    }

    fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    fn emit(&self, event: RecorderEvent) {
        let mut subscribers = lock(&self.subscribers);
        subscribers.retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a recorder feed subscriber fell behind and was dropped");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Emits `event` for `id`, or holds it until the request itself was announced.
    fn feed(&mut self, id: &str, event: RecorderEvent) {
        let closing = matches!(
            event,
            RecorderEvent::Finished { .. } | RecorderEvent::Failed { .. }
        );
        match self.entries.get_mut(id) {
            Some(entry) if !entry.announced => entry.held.push(event),
            _ => {
                self.emit(event);
                if closing {
                    self.forget(id);
                }
            }
        }
    }

    /// In a live-only recorder, drops a request whose last feed event went out.
    fn forget(&mut self, id: &str) {
        if self.keep {
            return;
        }
        self.entries.remove(id);
        self.early_extra.remove(id);
        if self.forgotten.len() >= FORGOTTEN {
            self.forgotten.pop_front();
        }
        self.forgotten.push_back(id.to_owned());
    }

    fn announce(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.announced || entry.awaiting_post_data {
            return;
        }
        entry.announced = true;
        let held = std::mem::take(&mut entry.held);
        let closed = entry.closed;
        let request = RecorderEvent::Request {
            id: id.to_owned(),
            method: entry.ex.method.clone(),
            url: entry.ex.url.clone(),
            resource_type: entry.ex.resource_type.clone(),
            body: entry
                .ex
                .request_body
                .as_ref()
                .map(|b| Bytes::from(b.0.clone())),
        };
        self.emit(request);
        for event in held {
            self.emit(event);
        }
        if closed {
            self.forget(id);
        }
    }

    fn entry(&mut self, id: &str) -> &mut Entry {
        let early = self.early_extra.remove(id);
        let entry = self
            .entries
            .entry(id.to_owned())
            .or_insert_with(|| Entry::new(id));
        if let Some(headers) = early {
            entry.ex.request_headers = headers;
            entry.extra_headers = true;
        }
        entry
    }

    /// Runs a CDP command in its own task; its result comes back as an [`Input`].
    fn spawn<F>(&mut self, work: F)
    where
        F: Future<Output = Input> + Send + 'static,
    {
        self.pending += 1;
        let tx = self.internal.clone();
        tokio::spawn(async move {
            let _ = tx.send(work.await);
        });
    }

    fn on_raw(&mut self, raw: RawEvent) {
        if raw.method != "Network.requestWillBeSentExtraInfo" {
            return;
        }
        let Some(id) = raw.params.get("requestId").and_then(|v| v.as_str()) else {
            return;
        };
        let headers = header_list(
            raw.params
                .get("headers")
                .unwrap_or(&serde_json::Value::Null),
        );
        self.on_input(Input::ExtraInfo {
            id: id.to_owned(),
            headers,
        });
    }

    fn on_input(&mut self, input: Input) {
        if !self.keep
            && let Some(id) = input_id(&input)
            && self.forgotten.iter().any(|f| f == id)
        {
            if matches!(
                input,
                Input::PostData { .. } | Input::Buffered { .. } | Input::Body { .. }
            ) {
                self.pending = self.pending.saturating_sub(1);
            }
            return;
        }
        match input {
            Input::WillBeSent(e) => self.on_request(&e),
            Input::ExtraInfo { id, headers } => match self.entries.get_mut(&id) {
                Some(entry) => {
                    entry.ex.request_headers = headers;
                    entry.extra_headers = true;
                }
                None => {
                    self.early_extra.insert(id, headers);
                }
            },
            Input::Response(e) => self.on_response(&e),
            Input::ResponseExtra(e) => {
                let entry = self.entry(e.request_id.as_ref());
                entry.ex.response_headers = header_list(e.headers.inner());
                entry.extra_response_headers = true;
                if entry.ex.status.is_none() {
                    entry.ex.status = u16::try_from(e.status_code).ok();
                }
            }
            Input::Data(e) => {
                let id = e.request_id.as_ref().to_owned();
                let Some(data) = &e.data else { return };
                let bytes = decode_base64(data.as_ref());
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                match entry.stream {
                    Stream::Requested => entry.stash.push(bytes),
                    Stream::Active if !entry.closed => {
                        entry.streamed.extend_from_slice(&bytes);
                        self.feed(
                            &id,
                            RecorderEvent::Data {
                                id: id.clone(),
                                bytes: Bytes::from(bytes),
                            },
                        );
                    }
                    _ => {}
                }
            }
            Input::Buffered { id, data } => {
                self.pending -= 1;
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                let mut chunks = Vec::new();
                match data {
                    Some(start) => {
                        entry.stream = Stream::Active;
                        chunks.push(start);
                        chunks.append(&mut entry.stash);
                    }
                    None => {
                        entry.stream = Stream::Failed;
                        entry.stash.clear();
                    }
                }
                for bytes in chunks.into_iter().filter(|b| !b.is_empty()) {
                    if let Some(entry) = self.entries.get_mut(&id) {
                        entry.streamed.extend_from_slice(&bytes);
                    }
                    self.feed(
                        &id,
                        RecorderEvent::Data {
                            id: id.clone(),
                            bytes: Bytes::from(bytes),
                        },
                    );
                }
                self.try_finish(&id);
            }
            Input::Finished(e) => {
                let id = e.request_id.as_ref().to_owned();
                let at = self.ms(*e.timestamp.inner());
                let page = self.page.clone();
                let entry = self.entry(&id);
                entry.ex.finished_ms = Some(at);
                entry.loading_finished = true;
                if wants_body(&entry.ex.resource_type) {
                    entry.awaiting_body = true;
                    let request_id = e.request_id.clone();
                    self.spawn(async move {
                        let body = page
                            .execute(GetResponseBodyParams::new(request_id))
                            .await
                            .ok()
                            .map(|reply| {
                                let reply = reply.result;
                                if reply.base64_encoded {
                                    decode_base64(&reply.body)
                                } else {
                                    reply.body.into_bytes()
                                }
                            });
                        Input::Body { id, body }
                    });
                } else {
                    self.try_finish(&id);
                }
            }
            Input::Body { id, body } => {
                self.pending -= 1;
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.awaiting_body = false;
                    entry.full = body;
                }
                self.try_finish(&id);
            }
            Input::Failed(e) => {
                let id = e.request_id.as_ref().to_owned();
                let at = self.ms(*e.timestamp.inner());
                let entry = self.entry(&id);
                if entry.ex.resource_type.is_empty() {
                    entry.ex.resource_type = e.r#type.as_ref().to_owned();
                }
                entry.ex.finished_ms = Some(at);
                let error = if e.canceled == Some(true) {
                    format!("canceled ({})", e.error_text)
                } else {
                    e.error_text.clone()
                };
                entry.ex.error = Some(error.clone());
                if entry.closed {
                    return;
                }
                entry.closed = true;
                self.feed(
                    &id,
                    RecorderEvent::Failed {
                        id: id.clone(),
                        error,
                    },
                );
            }
            Input::PostData { id, body } => {
                self.pending -= 1;
                if let Some(entry) = self.entries.get_mut(&id) {
                    entry.awaiting_post_data = false;
                    if body.is_some() {
                        entry.ex.request_body = body.map(Body);
                    }
                }
                self.announce(&id);
            }
            Input::SourceMessage(e) => {
                let id = e.request_id.as_ref().to_owned();
                let frame = Frame {
                    sent: false,
                    at_ms: self.ms(*e.timestamp.inner()),
                    payload: e.data.clone(),
                    binary: false,
                };
                self.entry(&id).ex.frames.push(frame.clone());
                self.feed(
                    &id,
                    RecorderEvent::Frame {
                        id: id.clone(),
                        frame,
                    },
                );
            }
            Input::WsCreated(e) => {
                let id = e.request_id.as_ref().to_owned();
                let now = self.now_ms();
                let entry = self.entry(&id);
                entry.ex.resource_type = "WebSocket".into();
                entry.ex.method = "GET".into();
                entry.ex.url = e.url.clone();
                entry.ex.started_ms = now;
                self.announce(&id);
            }
            Input::WsRequest(e) => {
                let at = self.ms(*e.timestamp.inner());
                let entry = self.entry(e.request_id.as_ref());
                entry.ex.started_ms = at;
                if !entry.extra_headers {
                    entry.ex.request_headers = header_list(e.request.headers.inner());
                }
            }
            Input::WsResponse(e) => {
                let id = e.request_id.as_ref().to_owned();
                let at = self.ms(*e.timestamp.inner());
                let entry = self.entry(&id);
                let status = u16::try_from(e.response.status).ok();
                entry.ex.status = status;
                entry.ex.first_byte_ms = Some(at);
                if !entry.extra_response_headers {
                    entry.ex.response_headers = header_list(e.response.headers.inner());
                }
                if !entry.extra_headers
                    && let Some(sent) = &e.response.request_headers
                {
                    entry.ex.request_headers = header_list(sent.inner());
                }
                let headers = entry.ex.response_headers.clone();
                self.feed(
                    &id,
                    RecorderEvent::Response {
                        id: id.clone(),
                        status: status.unwrap_or_default(),
                        headers,
                    },
                );
            }
            Input::WsSent(e) => self.on_frame(
                e.request_id.as_ref(),
                *e.timestamp.inner(),
                &e.response,
                true,
            ),
            Input::WsReceived(e) => self.on_frame(
                e.request_id.as_ref(),
                *e.timestamp.inner(),
                &e.response,
                false,
            ),
            Input::WsClosed(e) => {
                let id = e.request_id.as_ref().to_owned();
                let at = self.ms(*e.timestamp.inner());
                let entry = self.entry(&id);
                entry.ex.finished_ms = Some(at);
                if !entry.closed {
                    entry.closed = true;
                    self.feed(&id, RecorderEvent::Finished { id: id.clone() });
                }
            }
            Input::WsError(e) => {
                let id = e.request_id.as_ref().to_owned();
                let entry = self.entry(&id);
                entry.ex.error = Some(e.error_message.clone());
            }
        }
    }

    fn on_frame(&mut self, id: &str, ts: f64, frame: &WebSocketFrame, sent: bool) {
        // Text (1) and binary (2) frames; control frames carry no message.
        let binary = match frame.opcode as i64 {
            1 => false,
            2 => true,
            _ => return,
        };
        let frame = Frame {
            sent,
            at_ms: self.ms(ts),
            payload: frame.payload_data.clone(),
            binary,
        };
        self.entry(id).ex.frames.push(frame.clone());
        self.feed(
            id,
            RecorderEvent::Frame {
                id: id.to_owned(),
                frame,
            },
        );
    }

    fn on_request(&mut self, e: &EventRequestWillBeSent) {
        let id = e.request_id.as_ref().to_owned();
        let at = self.ms(*e.timestamp.inner());
        // A redirect reuses the request id: the previous hop becomes an exchange of its own.
        if let Some(redirect) = &e.redirect_response
            && let Some(mut previous) = self.entries.remove(&id)
        {
            previous.ex.status = u16::try_from(redirect.status).ok();
            if !previous.extra_response_headers {
                previous.ex.response_headers = header_list(redirect.headers.inner());
            }
            previous.ex.finished_ms = Some(at);
            previous.ex.id = format!("{id}#{}", self.done.len() + 1);
            if self.keep {
                self.done.push(previous.exchange());
            }
        }
        let request = &e.request;
        let mut body: Option<Vec<u8>> = request.post_data_entries.as_ref().map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry.bytes.as_ref())
                .flat_map(|b| decode_base64(b.as_ref()))
                .collect()
        });
        if body.as_ref().is_some_and(Vec::is_empty) {
            body = None;
        }
        let needs_post_data = body.is_none() && request.has_post_data == Some(true);
        let resource_type = e
            .r#type
            .as_ref()
            .map(|t| t.as_ref().to_owned())
            .unwrap_or_default();
        let mut url = request.url.clone();
        if let Some(fragment) = &request.url_fragment {
            url.push_str(fragment);
        }
        let entry = self.entry(&id);
        entry.ex.started_ms = at;
        entry.ex.method = request.method.clone();
        entry.ex.url = url;
        entry.ex.resource_type = resource_type;
        if !entry.extra_headers {
            entry.ex.request_headers = header_list(request.headers.inner());
        }
        entry.ex.request_body = body.map(Body);
        if needs_post_data {
            entry.awaiting_post_data = true;
            let page = self.page.clone();
            let request_id = e.request_id.clone();
            self.spawn(async move {
                let body = page
                    .execute(GetRequestPostDataParams::new(request_id))
                    .await
                    .ok()
                    .map(|reply| reply.result.post_data.into_bytes());
                Input::PostData { id, body }
            });
        } else {
            self.announce(&id);
        }
    }

    fn on_response(&mut self, e: &EventResponseReceived) {
        let id = e.request_id.as_ref().to_owned();
        let at = self.ms(*e.timestamp.inner());
        let entry = self.entry(&id);
        if entry.ex.url.is_empty() {
            entry.ex.url = e.response.url.clone();
        }
        entry.ex.resource_type = e.r#type.as_ref().to_owned();
        let status = u16::try_from(e.response.status).ok();
        entry.ex.status = status;
        entry.ex.first_byte_ms = Some(at);
        if !entry.extra_response_headers {
            entry.ex.response_headers = header_list(e.response.headers.inner());
        }
        if !entry.extra_headers
            && let Some(sent) = &e.response.request_headers
        {
            entry.ex.request_headers = header_list(sent.inner());
        }
        let stream = streamable(&e.r#type) && !entry.loading_finished;
        if stream {
            entry.stream = Stream::Requested;
        }
        // When the request event has not been processed yet (it comes on another channel),
        // feed events wait in `held` until it is.
        let headers = entry.ex.response_headers.clone();
        self.feed(
            &id,
            RecorderEvent::Response {
                id: id.clone(),
                status: status.unwrap_or_default(),
                headers,
            },
        );
        if stream {
            let page = self.page.clone();
            let request_id = e.request_id.clone();
            self.spawn(async move {
                let data = page
                    .execute(StreamResourceContentParams::new(request_id))
                    .await
                    .ok()
                    .map(|reply| decode_base64(reply.result.buffered_data.as_ref()));
                Input::Buffered { id, data }
            });
        }
    }

    /// Completes a finished request once its body is settled: the feed gets the part of the
    /// complete body its chunks had not delivered, then `Finished`.
    fn try_finish(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        if entry.closed
            || !entry.loading_finished
            || entry.awaiting_body
            || entry.stream == Stream::Requested
        {
            return;
        }
        entry.closed = true;
        let mut rest = None;
        match &entry.full {
            Some(full) if full.starts_with(&entry.streamed) => {
                if full.len() > entry.streamed.len() {
                    rest = Some(Bytes::copy_from_slice(&full[entry.streamed.len()..]));
                }
                entry.streamed = full.clone();
            }
            Some(_) => {
                tracing::debug!(
                    "a streamed body differs from the complete body; keeping the latter"
                );
            }
            None => {}
        }
        entry.ex.response_body = Some(Body(match &entry.full {
            Some(full) => full.clone(),
            None => entry.streamed.clone(),
        }));
        if let Some(bytes) = rest {
            self.feed(
                id,
                RecorderEvent::Data {
                    id: id.to_owned(),
                    bytes,
                },
            );
        }
        self.feed(id, RecorderEvent::Finished { id: id.to_owned() });
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn headers_are_lower_cased_split_on_newlines_and_pseudo_headers_dropped() {
        let headers = serde_json::json!({
            ":authority": "x", "Cookie": "a=1; b=2", "Set-Cookie": "a=1\nb=2", "X-N": 5
        });
        assert_eq!(
            header_list(&headers),
            vec![
                ("cookie".to_owned(), "a=1; b=2".to_owned()),
                ("set-cookie".to_owned(), "a=1".to_owned()),
                ("set-cookie".to_owned(), "b=2".to_owned()),
                ("x-n".to_owned(), "5".to_owned()),
            ]
        );
    }

    #[test]
    fn raw_messages_reach_the_taps_of_their_session_only() {
        let taps = RawTaps::default();
        let mut mine = taps.tap("S1");
        let mut other = taps.tap("S2");
        taps.dispatch(
            r#"{"method":"Network.requestWillBeSentExtraInfo","params":{"requestId":"7","headers":{"Cookie":"sid=x"}},"sessionId":"S1"}"#,
        );
        taps.dispatch("not json");
        let event = mine.try_recv().unwrap();
        assert_eq!(event.method, "Network.requestWillBeSentExtraInfo");
        assert_eq!(event.params["requestId"], "7");
        assert!(mine.try_recv().is_err() && other.try_recv().is_err());
        drop(mine);
        taps.dispatch(r#"{"method":"m","params":{},"sessionId":"S1"}"#);
        assert!(
            !lock(&taps.taps).contains_key("S1"),
            "closed taps are removed"
        );
    }
}
