//! The probe: types one message carrying a unique marker into a logged-in chat page, the way a
//! person would, while `browser::recorder` captures the network, and reads what the page
//! rendered as the reply. The result is a [`Recording`] for inference.
//!
//! The account's chat page comes from the pool ([`BrowserPool::chat_page`]: context, injected
//! session, login on the way); the chat box is driven with `browser::chatbox` (find the
//! composer, type, send and send again, read the rendered reply), which tier 3 shares.
//!
//! Generic heuristics, no site knowledge:
//! - The call carrying the probe: the first request whose URL or body, or WebSocket frame
//!   sent, contains the marker (from the recorder's live feed); a page load never is.
//! - The reply: what `chatbox` reads as the reply to the message carrying the marker; its
//!   reasoning is left out of `rendered_reply`.
//! - Done: the call carrying the probe finished (for a WebSocket: no frame received for a
//!   second), so did every call started after it (the reply may stream from a later call),
//!   and the rendered reply has not changed for [`STABLE_FOR`].
//! - The follow-up: a second probe typed into the same conversation right after, recorded
//!   until the page shows its reply coming ([`Until::Shown`]). One recorder captures both; the
//!   recording is split where the second was sent ([`Recording::split_exchanges`]). Without
//!   a follow-up the recording goes on for [`TRAILING`] to catch the requests a page makes
//!   right after a reply.
//!
//! - A send that does not go is sent again as `chatbox::Sending` says.
//!
//! Invariants: typed text and storage values are never logged; the page's global namespace
//! gets one property, named after the marker, removed at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::error::CdpError;
use rand::Rng;
use tokio::time::Instant;

use crate::browser::attach;
use crate::browser::chatbox::{
    self, CLEANUP, FIND_COMPOSER, Found, READ_REPLY, Rendered, Sending, script,
};
use crate::browser::recorder::RecorderEvent;
use crate::browser::{BrowserPool, ChatPage, LoginRequest, PageError, PageRequest, redact_url};
use crate::learn::attach::ProbeFile;
use crate::recording::{Recording, StorageSnapshot};
use crate::session::SessionData;

/// How long the rendered reply must stay unchanged after the chat call finished.
pub const STABLE_FOR: Duration = Duration::from_millis(500);
/// How long recording continues after the reply is complete.
pub const TRAILING: Duration = Duration::from_millis(300);
/// How often the page is read while waiting.
const POLL: Duration = Duration::from_millis(100);
/// A WebSocket chat call counts as finished after this long without a received frame.
const SOCKET_QUIET: Duration = Duration::from_secs(1);
/// How long after the chat call finished a page may take to render any reply at all.
const RENDER_WAIT: Duration = Duration::from_secs(10);

/// One probe to run with [`probe`].
#[derive(Clone)]
pub struct ProbeRequest {
    pub account_id: String,
    /// Where the chat UI is. Default: the chat page the account's last login in this pool
    /// reached, else the login URL.
    pub chat_url: Option<String>,
    /// Injected (cookies, then local and session storage) when the account has no browser
    /// context yet.
    pub session: Option<SessionData>,
    /// Used when the chat page turns out to need a login (no context and no session, or an
    /// expired one).
    pub login: Option<LoginRequest>,
    /// The message to type; the marker is appended when it does not contain one. Default:
    /// [`default_probe`].
    pub probe_text: Option<String>,
    /// Budget from sending the probe to the complete reply.
    pub timeout: Duration,
    /// Send a second probe in the same conversation once the reply is complete, recorded as
    /// [`Recording::follow_up`] (it shows what a later turn carries).
    pub follow_up: bool,
    /// When the page has a file input, choose a generated file in it (written under this
    /// directory) before typing the probe, recorded as [`Recording::attached`].
    pub attach_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for ProbeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeRequest")
            .field("account_id", &self.account_id)
            .field("chat_url", &self.chat_url.as_deref().map(redact_url))
            .field("has_session", &self.session.is_some())
            .field("login", &self.login)
            .field("has_probe_text", &self.probe_text.is_some())
            .field("timeout", &self.timeout)
            .field("follow_up", &self.follow_up)
            .field("attach", &self.attach_dir.is_some())
            .finish()
    }
}

impl ProbeRequest {
    /// The chat page the probe runs on.
    fn page(&self) -> PageRequest {
        PageRequest {
            account_id: self.account_id.clone(),
            chat_url: self.chat_url.clone(),
            session: self.session.clone(),
            login: self.login.clone(),
        }
    }

    pub fn new(account_id: impl Into<String>) -> Self {
        Self {
            account_id: account_id.into(),
            chat_url: None,
            session: None,
            login: None,
            probe_text: None,
            timeout: Duration::from_secs(60),
            follow_up: false,
            attach_dir: None,
        }
    }
}

fn cdp(e: CdpError) -> PageError {
    PageError::from_cdp(e)
}

/// A fresh marker: `ct` and 10 random lowercase hex digits.
pub fn new_marker() -> String {
    let n: u64 = rand::rng().random_range(0..(1u64 << 40));
    format!("ct{n:010x}")
}

/// The default probe message for `marker`: short, plain (no markdown), asks for a reply.
pub fn default_probe(marker: &str) -> String {
    format!("Reply with a short greeting. {marker}")
}

/// The second probe, sent in the same conversation to see what a later turn carries.
pub fn follow_up_probe(marker: &str) -> String {
    format!("And once more, briefly. {marker}")
}

/// What the page-level probe needs.
struct ProbeOptions {
    /// The message to type (it contains `marker`).
    pub probe: String,
    pub marker: String,
    /// Budget from sending to the complete reply.
    pub timeout: Duration,
    /// A second message (and its marker) to send in the same conversation once the reply is
    /// complete.
    pub follow_up: Option<(String, String)>,
    pub attach_dir: Option<std::path::PathBuf>,
}

impl ProbeOptions {
    /// The probe text of `req` (its marker appended when it lacks one), with a new marker.
    fn for_request(req: &ProbeRequest) -> ProbeOptions {
        let marker = new_marker();
        let probe = match &req.probe_text {
            Some(text) if text.contains(&marker) => text.clone(),
            Some(text) => format!("{} {marker}", text.trim_end()),
            None => default_probe(&marker),
        };
        let follow_up = req.follow_up.then(|| {
            let marker = new_marker();
            (follow_up_probe(&marker), marker)
        });
        ProbeOptions {
            probe,
            marker,
            timeout: req.timeout,
            follow_up,
            attach_dir: req.attach_dir.clone(),
        }
    }
}

/// Types one probe message (and the follow-up, when asked) into the account's chat page while
/// recording the network, and returns the [`Recording`]. The page is a new tab in the
/// account's context (see [`BrowserPool::chat_page`]); a successful probe hands what the
/// page holds afterwards to the pool's harvest hook before it returns.
///
/// When Chromium dies during the probe, a new page on a relaunched browser runs it once
/// more. Page-level failures carry a screenshot.
pub async fn probe(pool: &BrowserPool, req: &ProbeRequest) -> Result<Recording, PageError> {
    let mut retried = false;
    loop {
        let started = std::time::Instant::now();
        let chat = pool.chat_page(&req.page()).await?;
        let options = ProbeOptions::for_request(req);
        let mut error = match run(&chat, &options).await {
            Ok(recording) => {
                tracing::info!(
                    account = %req.account_id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    exchanges = recording.exchanges.len(),
                    "probe recorded"
                );
                chat.close(true).await;
                return Ok(recording);
            }
            Err(error) => error,
        };
        tracing::info!(account = %req.account_id, error = %error, "probe failed");
        if !retried && chat.browser_died(&error).await {
            tracing::warn!(
                account = %req.account_id,
                "Chromium died during the probe; relaunching it and retrying once"
            );
            retried = true;
            chat.close(false).await;
            continue;
        }
        if error.wants_screenshot() {
            error.set_screenshot(chat.screenshot().await);
        }
        chat.close(false).await;
        return Err(error);
    }
}

/// Probes a logged-in chat page: see the module docs. Errors carry no screenshot; the caller
/// adds one.
async fn run(chat: &ChatPage, options: &ProbeOptions) -> Result<Recording, PageError> {
    let page = chat.page();
    let key = format!("__{}", options.marker);
    let result = probe_page(chat, options, &key).await;
    let _ = script::<bool>(page, &key, CLEANUP, &[]).await;
    result
}

/// The probe's one sequence: find the composer, snapshot the storage, record, converse,
/// the follow-up, split the recording. Long because each step hands the next what it found.
async fn probe_page(
    chat: &ChatPage,
    options: &ProbeOptions,
    key: &str,
) -> Result<Recording, PageError> {
    let page = chat.page();
    let found: Found = script(page, key, FIND_COMPOSER, &[]).await.map_err(cdp)?;
    if !found.found {
        let url = page.url().await.ok().flatten().unwrap_or_default();
        return Err(PageError::NoComposer {
            url: redact_url(&url),
            screenshot: None,
        });
    }
    let storage = snapshot_storage(page).await?;
    let recorder = chat.record().await.map_err(cdp)?;
    // Taken once the recorder runs, so no earlier than its time 0: what started after a
    // send has a recording time after it.
    let origin = Instant::now();
    let mut feed = recorder.subscribe();
    let chosen = match &options.attach_dir {
        Some(dir) => attach_probe_file(page, key, &mut feed, dir, origin).await?,
        None => None,
    };
    let typed_ms = origin.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let first = converse(
        page,
        key,
        &mut feed,
        &options.probe,
        &options.marker,
        options.timeout,
        Until::Complete,
    )
    .await?;
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "probe: the first reply is complete"
    );
    let second = match &options.follow_up {
        Some((probe, marker)) => {
            let sent = Instant::now();
            match converse(
                page,
                key,
                &mut feed,
                probe,
                marker,
                FOLLOW_UP_TIMEOUT,
                Until::Shown,
            )
            .await
            {
                Ok(reply) => Some((probe, marker, reply, sent)),
                Err(e) => {
                    // One probe is all a flow needs; later turns then start new conversations.
                    tracing::info!(error = %e, "the second probe was not answered");
                    None
                }
            }
        }
        None => None,
    };
    if second.is_none() {
        // A capture window, not synchronisation: pages often report usage or fetch a title
        // right after the reply, and those calls belong to the recording.
        tokio::time::sleep(TRAILING).await;
    }
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        follow_up = second.is_some(),
        "probe: recording done"
    );
    let all = recorder.stop().await;
    let page_url = page.url().await.ok().flatten().unwrap_or(storage.0);
    let (exchanges, follow_up) = match second {
        Some((probe, marker, reply, sent)) => {
            let sent_ms = sent.duration_since(origin).as_secs_f64() * 1000.0;
            let (first_half, second_half) = Recording::split_exchanges(all, sent_ms);
            let follow_up = Recording {
                page_url: page_url.clone(),
                marker: marker.clone(),
                probe: probe.clone(),
                rendered_reply: reply.text.trim().to_owned(),
                rendered_reasoning: reply.reasoning.map(|r| r.trim().to_owned()),
                storage: storage.1.clone(),
                exchanges: second_half,
                sent_ms: Some(sent_ms),
                follow_up: None,
                attached: None,
            };
            (first_half, Some(Box::new(follow_up)))
        }
        None => (all, None),
    };
    Ok(Recording {
        page_url,
        marker: options.marker.clone(),
        probe: options.probe.clone(),
        rendered_reply: first.text.trim().to_owned(),
        rendered_reasoning: first.reasoning.map(|r| r.trim().to_owned()),
        storage: storage.1,
        exchanges,
        sent_ms: None,
        follow_up,
        attached: chosen.map(|(file, accept, chosen_ms)| {
            let _ = std::fs::remove_file(&file.path);
            file.recorded(&accept, chosen_ms, typed_ms)
        }),
    })
}

/// Chooses a generated file in the page's file input, when it has one it takes, and waits
/// for the uploads it starts. The file, the input's `accept` and when it was chosen.
async fn attach_probe_file(
    page: &Page,
    key: &str,
    feed: &mut tokio::sync::mpsc::Receiver<RecorderEvent>,
    dir: &std::path::Path,
    origin: Instant,
) -> Result<Option<(ProbeFile, String, f64)>, PageError> {
    let input = attach::find_file_input(page, key).await?;
    if !input.found {
        return Ok(None);
    }
    let file = match ProbeFile::create(&input.accept, dir).await {
        Ok(Some(file)) => file,
        Ok(None) => {
            tracing::info!(accept = %input.accept, "probe: the file input takes neither images nor text");
            return Ok(None);
        }
        Err(e) => {
            tracing::warn!(error = %e, "probe: cannot write the probe file");
            return Ok(None);
        }
    };
    let chosen_ms = origin.elapsed().as_secs_f64() * 1000.0;
    attach::choose_files(page, &[file.path.as_path()]).await?;
    let calls = attach::await_uploads(feed).await;
    tracing::debug!(calls, "probe: a file was chosen in the page's file input");
    Ok(Some((file, input.accept, chosen_ms)))
}

/// How long the second probe may take to show the start of its reply.
const FOLLOW_UP_TIMEOUT: Duration = Duration::from_secs(20);
/// A request started after the probe that has shown no activity for this long no longer
/// holds the probe back (a long-lived channel of the page, not the reply).
const IN_FLIGHT_QUIET: Duration = Duration::from_millis(1500);

/// When a probe's exchange is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The reply is complete: the call carrying the probe and every call after it are done,
    /// and the rendered reply has been stable for [`STABLE_FOR`].
    Complete,
    /// The reply has started to show, its text or the reasoning before it (a follow-up needs
    /// what the requests carry, not the whole reply).
    Shown,
}

/// Types `text` into the composer, sends it, and waits for the reply (see [`Until`]).
async fn converse(
    page: &Page,
    key: &str,
    feed: &mut tokio::sync::mpsc::Receiver<RecorderEvent>,
    text: &str,
    marker: &str,
    timeout: Duration,
    until: Until,
) -> Result<Rendered, PageError> {
    let typing = Instant::now();
    chatbox::type_message(page, key, text, marker).await?;
    let mut sending = Sending::start(page, key, text, marker).await?;
    tracing::debug!(
        typing_ms = typing.elapsed().as_millis() as u64,
        "probe: typed and sent"
    );
    let mut progress = Progress::new(marker);
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = feed.recv() => {
                let Some(event) = event else {
                    return Err(PageError::Crashed("the recorder stopped".into()));
                };
                if progress.on_event(event) {
                    sending.navigated();
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let current: Rendered = match script(page, key, READ_REPLY, &[("PROBE", text), ("MARKER", marker)]).await {
                    Ok(r) => r,
                    Err(e) if crate::browser::is_connection(&e) => return Err(cdp(e)),
                    // A navigation in progress (some sites move to the conversation's URL).
                    Err(_) => Rendered::default(),
                };
                progress.rendered(current, now);
                if progress.chat.is_none() {
                    sending.check(page, now).await?;
                }
                if progress.is_over(now, until)? {
                    return Ok(progress.rendered);
                }
                if now >= deadline {
                    return Err(PageError::Timeout {
                        stage: format!("after {} s {}", timeout.as_secs(), progress.stage()),
                        screenshot: None,
                    });
                }
            }
        }
    }
}

/// What one probe's exchange has shown so far: the call carrying the probe, the calls after
/// it, what the page renders.
struct Progress {
    marker: String,
    sent_at: Instant,
    /// The request (or socket) carrying the probe.
    chat: Option<String>,
    socket: bool,
    status: Option<u16>,
    finished_at: Option<Instant>,
    failure: Option<String>,
    last_frame: Option<Instant>,
    /// Requests started after the one carrying the probe, not yet finished: id → last activity.
    in_flight: BTreeMap<String, Instant>,
    rendered: Rendered,
    changed_at: Instant,
}

impl Progress {
    fn new(marker: &str) -> Self {
        Self {
            marker: marker.to_owned(),
            sent_at: Instant::now(),
            chat: None,
            socket: false,
            status: None,
            finished_at: None,
            failure: None,
            last_frame: None,
            in_flight: BTreeMap::new(),
            rendered: Rendered::default(),
            changed_at: Instant::now(),
        }
    }

    /// Notes one event of the feed. Returns true when it is the page itself being replaced (a
    /// form submitted natively), which the send has to know.
    fn on_event(&mut self, event: RecorderEvent) -> bool {
        let now = Instant::now();
        let ours = |id: &str, chat: &Option<String>| chat.as_deref() == Some(id);
        match event {
            RecorderEvent::Request {
                id,
                url,
                body,
                resource_type,
                ..
            } => {
                if resource_type.eq_ignore_ascii_case("document") {
                    return true;
                } else if self.chat.is_none() {
                    let marker = self.marker.as_bytes();
                    let in_body = body.as_deref().is_some_and(|b| contains(b, marker));
                    if url.contains(&self.marker) || in_body {
                        tracing::debug!(
                            after_ms = self.sent_at.elapsed().as_millis() as u64,
                            "probe: a request carries it"
                        );
                        self.chat = Some(id);
                    }
                } else {
                    self.in_flight.insert(id, now);
                }
            }
            RecorderEvent::Frame { id, frame } => {
                self.touch(&id, now);
                if self.chat.is_none() && frame.sent && frame.payload.contains(&self.marker) {
                    self.chat = Some(id);
                    self.socket = true;
                } else if ours(&id, &self.chat) && !frame.sent {
                    self.last_frame = Some(now);
                }
            }
            RecorderEvent::Response { id, status, .. } => {
                if ours(&id, &self.chat) {
                    self.status = Some(status);
                }
                self.touch(&id, now);
            }
            RecorderEvent::Data { id, .. } => self.touch(&id, now),
            RecorderEvent::Finished { id } => {
                if ours(&id, &self.chat) {
                    tracing::debug!(
                        after_ms = self.sent_at.elapsed().as_millis() as u64,
                        "probe: the request carrying it finished"
                    );
                    self.finished_at.get_or_insert(now);
                }
                self.in_flight.remove(&id);
            }
            RecorderEvent::Failed { id, error } => {
                if ours(&id, &self.chat) {
                    self.failure = Some(error);
                    self.finished_at.get_or_insert(now);
                }
                self.in_flight.remove(&id);
            }
        }
        false
    }

    fn touch(&mut self, id: &str, now: Instant) {
        if let Some(seen) = self.in_flight.get_mut(id) {
            *seen = now;
        }
    }

    fn rendered(&mut self, current: Rendered, now: Instant) {
        if current != self.rendered {
            self.rendered = current;
            self.changed_at = now;
        }
        if self.socket
            && self.finished_at.is_none()
            && self.last_frame.is_some_and(|t| now >= t + SOCKET_QUIET)
        {
            self.finished_at = Some(now);
        }
    }

    /// Whether the exchange is over (see [`Until`]); an error when the call failed.
    fn is_over(&self, now: Instant, until: Until) -> Result<bool, PageError> {
        let rendered = &self.rendered;
        let shown = rendered.found && !rendered.text.trim().is_empty();
        // The page shows the reply coming (its text, or the reasoning before it).
        let coming = shown
            || rendered.found
                && rendered
                    .reasoning
                    .as_deref()
                    .is_some_and(|r| !r.trim().is_empty());
        if until == Until::Shown && self.chat.is_some() && coming {
            return Ok(true);
        }
        let Some(done) = self.finished_at else {
            return Ok(false);
        };
        if let Some(reason) = &self.failure {
            return Err(PageError::CallFailed {
                reason: reason.clone(),
                screenshot: None,
            });
        }
        if let Some(status) = self.status.filter(|s| *s >= 400) {
            return Err(PageError::Rejected {
                status,
                screenshot: None,
            });
        }
        // The reply may stream from a later call (the one carrying the probe only created the
        // conversation): wait for those to end too.
        let streaming = self
            .in_flight
            .values()
            .any(|seen| now < *seen + IN_FLIGHT_QUIET);
        let settled = now >= done + STABLE_FOR && now >= self.changed_at + STABLE_FOR;
        if settled && !streaming && shown {
            return Ok(true);
        }
        if now >= done + RENDER_WAIT && !streaming {
            tracing::warn!("the chat call finished but no rendered reply was found on the page");
            return Ok(true);
        }
        Ok(false)
    }

    fn stage(&self) -> &'static str {
        match (&self.chat, self.finished_at) {
            (None, _) => "waiting for the page to send the probe",
            (Some(_), None) => "waiting for the reply to finish",
            (Some(_), Some(_)) => "waiting for the rendered reply to settle",
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The page URL and its storage: cookies for the page's URL (HttpOnly included, from CDP),
/// local and session storage, `<meta>` name/content pairs and the user agent.
async fn snapshot_storage(page: &Page) -> Result<(String, StorageSnapshot), PageError> {
    let storage = crate::browser::read_storage(page).await.map_err(cdp)?;
    let cookies = page.get_cookies().await.map_err(cdp)?;
    Ok((
        storage.url,
        StorageSnapshot {
            cookies: cookies.into_iter().map(|c| (c.name, c.value)).collect(),
            local_storage: storage.local,
            session_storage: storage.session,
            meta: storage.meta,
            user_agent: Some(storage.ua),
        },
    ))
}

#[cfg(test)]
mod tests {
    //! The probe's bookkeeping over a scripted feed, on tokio's paused clock: which call
    //! carries the probe, and when its exchange is over.

    use bytes::Bytes;

    use super::*;
    use crate::recording::Frame;

    const MARKER: &str = "ct0123456789";

    fn request(id: &str, url: &str, body: Option<&str>, kind: &str) -> RecorderEvent {
        RecorderEvent::Request {
            id: id.into(),
            method: "POST".into(),
            url: url.into(),
            resource_type: kind.into(),
            body: body.map(|b| Bytes::from(b.to_owned())),
        }
    }

    fn response(id: &str, status: u16) -> RecorderEvent {
        RecorderEvent::Response {
            id: id.into(),
            status,
            headers: Vec::new(),
        }
    }

    fn finished(id: &str) -> RecorderEvent {
        RecorderEvent::Finished { id: id.into() }
    }

    fn shown(text: &str) -> Rendered {
        Rendered {
            found: true,
            text: text.into(),
            reasoning: None,
        }
    }

    /// A probe whose chat call (`2`, the marker in its body) answered and finished.
    fn answered() -> Progress {
        let mut progress = Progress::new(MARKER);
        progress.on_event(request("1", "http://site/api/telemetry", None, "Fetch"));
        let body = format!(r#"{{"prompt":"hi {MARKER}"}}"#);
        progress.on_event(request("2", "http://site/api/chat", Some(&body), "Fetch"));
        progress.on_event(response("2", 200));
        progress.on_event(finished("2"));
        progress
    }

    async fn later(by: Duration) -> Instant {
        tokio::time::advance(by).await;
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn the_call_carrying_the_marker_is_the_chat_call_and_a_settled_reply_ends_it() {
        let mut progress = answered();
        assert_eq!(progress.chat.as_deref(), Some("2"));
        let now = Instant::now();
        progress.rendered(shown("Hello"), now);
        assert!(!progress.is_over(now, Until::Complete).unwrap());
        // Still changing: the reply is not settled yet.
        let now = later(STABLE_FOR / 2).await;
        progress.rendered(shown("Hello there"), now);
        let now = later(STABLE_FOR / 2).await;
        progress.rendered(shown("Hello there"), now);
        assert!(!progress.is_over(now, Until::Complete).unwrap());
        let now = later(STABLE_FOR).await;
        progress.rendered(shown("Hello there"), now);
        assert!(progress.is_over(now, Until::Complete).unwrap());
        assert_eq!(progress.rendered.text, "Hello there");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_started_after_the_chat_call_holds_the_end_while_it_streams() {
        let mut progress = answered();
        progress.on_event(request("3", "http://site/api/stream", None, "Fetch"));
        let now = later(STABLE_FOR * 2).await;
        progress.on_event(RecorderEvent::Data {
            id: "3".into(),
            bytes: Bytes::from_static(b"data"),
        });
        progress.rendered(shown("Hello"), now);
        let now = later(STABLE_FOR * 2).await;
        progress.rendered(shown("Hello"), now);
        assert!(!progress.is_over(now, Until::Complete).unwrap());
        // Quiet for long enough, it no longer counts as the reply.
        let now = later(IN_FLIGHT_QUIET).await;
        progress.rendered(shown("Hello"), now);
        assert!(progress.is_over(now, Until::Complete).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_or_failed_chat_call_is_the_probes_error() {
        let mut refused = Progress::new(MARKER);
        refused.on_event(request(
            "9",
            &format!("http://site/q?m={MARKER}"),
            None,
            "Fetch",
        ));
        refused.on_event(response("9", 429));
        refused.on_event(finished("9"));
        let now = Instant::now();
        assert!(matches!(
            refused.is_over(now, Until::Complete),
            Err(PageError::Rejected { status: 429, .. })
        ));
        let mut failed = answered();
        failed.on_event(RecorderEvent::Failed {
            id: "2".into(),
            error: "net::ERR_ABORTED".into(),
        });
        assert!(matches!(
            failed.is_over(now, Until::Complete),
            Err(PageError::CallFailed { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_follow_up_is_over_as_soon_as_its_reply_shows() {
        let mut progress = Progress::new(MARKER);
        let body = format!(r#"{{"prompt":"{MARKER}"}}"#);
        progress.on_event(request("5", "http://site/api/chat", Some(&body), "Fetch"));
        let now = Instant::now();
        progress.rendered(shown(""), now);
        assert!(!progress.is_over(now, Until::Shown).unwrap());
        progress.rendered(shown("He"), now);
        assert!(progress.is_over(now, Until::Shown).unwrap());
        assert!(!progress.is_over(now, Until::Complete).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_reply_is_finished_after_a_quiet_second() {
        let mut progress = Progress::new(MARKER);
        let frame = |sent: bool, payload: &str| RecorderEvent::Frame {
            id: "ws".into(),
            frame: Frame {
                sent,
                at_ms: 0.0,
                payload: payload.into(),
                binary: false,
            },
        };
        progress.on_event(frame(true, &format!(r#"{{"prompt":"{MARKER}"}}"#)));
        progress.on_event(frame(false, r#"{"t":"Hi"}"#));
        assert!(progress.socket);
        let now = Instant::now();
        progress.rendered(shown("Hi"), now);
        assert_eq!(progress.finished_at, None);
        let now = later(SOCKET_QUIET).await;
        progress.rendered(shown("Hi"), now);
        assert_eq!(progress.finished_at, Some(now));
        let now = later(STABLE_FOR).await;
        progress.rendered(shown("Hi"), now);
        assert!(progress.is_over(now, Until::Complete).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_page_load_is_never_the_chat_call() {
        let mut progress = Progress::new(MARKER);
        let load = request(
            "d",
            &format!("http://site/chat?q={MARKER}"),
            None,
            "Document",
        );
        assert!(
            progress.on_event(load),
            "a navigation, for the send to know"
        );
        assert_eq!(progress.chat, None);
        assert_eq!(progress.stage(), "waiting for the page to send the probe");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_the_page_never_renders_ends_the_probe_after_the_render_wait() {
        let mut progress = answered();
        let now = later(RENDER_WAIT / 2).await;
        assert!(!progress.is_over(now, Until::Complete).unwrap());
        let now = later(RENDER_WAIT).await;
        progress.rendered(Rendered::default(), now);
        assert!(progress.is_over(now, Until::Complete).unwrap());
        assert!(!progress.rendered.found);
    }

    #[test]
    fn the_probe_text_always_carries_a_fresh_marker() {
        let mut req = ProbeRequest::new("a");
        let options = ProbeOptions::for_request(&req);
        assert_eq!(options.probe, default_probe(&options.marker));
        assert!(options.follow_up.is_none());
        req.probe_text = Some("Say hi ".into());
        req.follow_up = true;
        let options = ProbeOptions::for_request(&req);
        assert_eq!(options.probe, format!("Say hi {}", options.marker));
        let (follow_up, marker) = options.follow_up.unwrap();
        assert_ne!(marker, options.marker);
        assert!(follow_up.contains(&marker));
        let marker = new_marker();
        assert!(marker.starts_with("ct") && marker.len() == 12, "{marker}");
    }
}
