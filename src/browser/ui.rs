//! Tier 3: the prompt typed into the site's own chat UI, the reply read from the network.
//!
//! How it works:
//! - The account has a UI work page (`pool::Tier::Ui`) with a live-only [`Recorder`]. Its
//!   mutex is the account's UI turn: one typed conversation at a time; concurrent requests
//!   for the same account queue. A request whose history extends the conversation the page
//!   shows (its messages and replies so far, by the key `conversations` uses) continues it:
//!   only the new message is typed. Any other request reloads the chat page (a new site
//!   conversation, so earlier turns never leak in), logging in if it has to, and types the
//!   whole history flattened.
//! - The composer, the send control and the reply are found as the probe finds them
//!   (`chatbox`'s page scripts); the text is typed with `Input.insertText` (set by
//!   script if that did not land), then sent as the probe sends ([`chatbox::Sending`]: a send
//!   that reloads the page or loses the text is retyped and sent with Enter).
//! - The chat call is the first request after sending whose method is the flow's and whose
//!   URL path matches the flow's URL template (a segment with a placeholder matches any
//!   segment), or whose body carries the typed text; for a WebSocket flow, also a socket
//!   whose sent frame carries the typed text. Its body chunks (received frames) from the
//!   recorder's live feed go into the flow's decoder as they arrive.
//! - Last resort, when no such call is seen within [`DOM_AFTER`] but the page shows a reply
//!   growing: the page's reply text is streamed (its growth as `Delta::Text`, reasoning as
//!   `Delta::Reasoning`) until it has not changed for [`DOM_STABLE`]. That text is the
//!   rendered one (markdown already turned into text), so it is not byte-exact.
//! - Dropping the stream releases the UI turn; the page is reloaded by the next request.
//!
//! [`Prompt::flattened`]: crate::replay::render::Prompt::flattened
//! [`Recorder`]: super::recorder::Recorder

use std::time::Duration;

use chromiumoxide::Page;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::chatbox::{self, Found, Rendered};
use super::inpage::{self, Keep};
use super::pool::{BrowserPool, Fresh, Tier, WorkPage};
use super::recorder::RecorderEvent;
use super::{TierRequest, is_connection};
use crate::flow::{Flow, Transport};
use crate::replay::DeltaStream;
use crate::replay::decode::Delta;
use crate::replay::failure::{Call, FailureKind, ReplayError};
use crate::replay::plan::Started;

/// The page property the probe scripts keep their state under.
const KEY: &str = "__ct_ui";
/// How long after sending without a chat call before the page's own text is looked at.
pub const DOM_AFTER: Duration = Duration::from_secs(3);
/// How long the page's reply text must stay unchanged to count as complete (DOM fallback).
pub const DOM_STABLE: Duration = Duration::from_secs(2);
/// How often the page is read while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Tier 3: the prompt typed into the site's chat UI; the reply decoded from the recorded chat
/// call as it streams, the page's text as a last resort (see the module docs).
pub async fn ui_tier(pool: &BrowserPool, req: TierRequest) -> Result<Started, ReplayError> {
    // The site's own page carries its conversation: nothing to extract.
    let started = async {
        Ok(Started {
            deltas: run(pool, req).await?,
            extracted: Default::default(),
        })
    };
    pool.dies_with(started).await
}

async fn run(pool: &BrowserPool, req: TierRequest) -> Result<DeltaStream, ReplayError> {
    // A history that extends the conversation the page shows goes on there; anything else
    // starts a new one on a reloaded page.
    let shown = shown_key(&req.prompt);
    let fresh = shown.clone().map_or(Fresh::Yes, Fresh::UnlessShowing);
    let lease = pool.work_page(&req, Tier::Ui, fresh).await?;
    let page = lease.work.page.clone();
    let continuing = shown.is_some() && *lock(&lease.work.conversation) == shown;
    *lock(&lease.work.conversation) = None;
    let text = if continuing {
        req.prompt.last_user().to_owned()
    } else {
        req.prompt.flattened()
    };
    let work = lease.work.clone();
    let messages = req.prompt.keyed_messages().into_owned();
    let remember = move |stream: DeltaStream| remembering(stream, work, messages);
    let found: Found = chatbox::script(&page, KEY, chatbox::FIND_COMPOSER, &[])
        .await
        .map_err(page_error)?;
    if !found.found {
        return Err(ReplayError::Unexpected {
            call: Call::Chat,
            kind: FailureKind::FormatDrift,
            message: "could not find the chat input on the page".into(),
        });
    }
    let files: Vec<_> = req
        .prompt
        .attachments
        .iter()
        .filter(|a| !continuing || a.turn + 1 == req.prompt.messages.len())
        .map(|a| a.file.clone())
        .collect();
    if !files.is_empty() {
        let mut feed = lease.work.recorder.subscribe();
        attach_files(
            &page,
            &mut feed,
            &pool.data_dir().join("tier3-files"),
            &files,
        )
        .await?;
    }
    super::insert_text(&page, &text).await.map_err(page_error)?;
    let typed: Option<String> = chatbox::script(&page, KEY, chatbox::COMPOSER_TEXT, &[])
        .await
        .map_err(page_error)?;
    if typed.as_deref().map(normalize) != Some(normalize(&text)) {
        tracing::debug!("Input.insertText did not reach the chat input; setting it by script");
        chatbox::script::<bool>(&page, KEY, chatbox::SET_TEXT, &[("TEXT", &text)])
            .await
            .map_err(page_error)?;
    }
    chatbox::script::<bool>(&page, KEY, chatbox::WATCH, &[])
        .await
        .map_err(page_error)?;
    let mut feed = lease.work.recorder.subscribe();
    let needle: String = text
        .trim()
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(60)
        .collect();
    let mut sending = chatbox::Sending::start(&page, KEY, &text, &needle)
        .await
        .map_err(ReplayError::from)?;
    let sent_at = Instant::now();
    let matcher = Matcher::new(&req.flow, &text);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chat: Option<String> = None;
    let deadline = sent_at + req.timeout;
    loop {
        tokio::select! {
            event = feed.recv() => {
                let Some(event) = event else {
                    return Err(ReplayError::Browser {
                        call: Call::Chat,
                        message: "the browser stopped reporting the page's network traffic".into(),
                    });
                };
                match event {
                    // The page itself is being replaced (a form submitted natively).
                    RecorderEvent::Request { resource_type, .. }
                        if resource_type.eq_ignore_ascii_case("document") =>
                    {
                        sending.navigated();
                    }
                    RecorderEvent::Request { id, method, url, body, .. }
                        if chat.is_none() && matcher.request(&method, &url, body.as_deref()) =>
                    {
                        chat = Some(id);
                    }
                    RecorderEvent::Frame { id, frame }
                        if chat.is_none()
                            && frame.sent
                            && matcher.socket
                            && matcher.carries(frame.payload.as_bytes()) =>
                    {
                        // An open socket: its answer frames follow.
                        let events = inpage::forward(feed, id, Vec::new());
                        return Ok(remember(inpage::reply_stream(events, &req.flow.response, req.timeout, None, Box::new(lease))));
                    }
                    RecorderEvent::Response { id, status, headers } if chat.as_ref() == Some(&id) => {
                        let ok = if matcher.socket { status == 101 } else { (200..300).contains(&status) };
                        if !ok {
                            let excerpt = inpage::collect_excerpt(&mut feed, &id).await;
                            return Err(inpage::status_error(Call::Chat, status, &headers, &excerpt));
                        }
                        let mut decoded = inpage::reply_stream(
                            inpage::forward(feed, id, Vec::new()),
                            &req.flow.response,
                            req.timeout,
                            None,
                            Box::new(()),
                        );
                        // The site may have changed its format (that is often why tier 3 is
                        // serving): when the flow's decoder cannot read the call, the page's
                        // own rendering of the reply is what remains.
                        let first = decoded.next().await;
                        if let Some(Err(ReplayError::Decode(reason))) = &first {
                            tracing::info!(%reason, "the chat call no longer fits the flow; streaming the page's text");
                            drop(decoded);
                            return Ok(remember(dom_stream(page.clone(), text, req.timeout, Box::new(lease))));
                        }
                        let keep: inpage::Keep = Box::new(lease);
                        return Ok(remember(futures_util::stream::iter(first)
                            .chain(decoded)
                            .map(move |item| {
                                let _held = &keep;
                                item
                            })
                            .boxed()));
                    }
                    RecorderEvent::Failed { id, error } if chat.as_ref() == Some(&id) => {
                        return Err(ReplayError::Network {
                            call: Call::Chat,
                            message: format!("the page's chat call failed: {error}"),
                        });
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if chat.is_some() {
                    if now >= deadline {
                        return Err(ReplayError::Network {
                            call: Call::Chat,
                            message: format!("the page's chat call got no response within {} s", req.timeout.as_secs()),
                        });
                    }
                    continue;
                }
                sending.check(&page, now).await.map_err(ReplayError::from)?;
                if now >= sent_at + DOM_AFTER {
                    let rendered = read_reply(&page, &text).await?;
                    if rendered.found && !rendered.text.trim().is_empty() {
                        tracing::debug!("no chat call seen; streaming the page's own text");
                        return Ok(remember(dom_stream(page.clone(), text, req.timeout, Box::new(lease))));
                    }
                }
                if now >= deadline {
                    return Err(ReplayError::Unexpected {
                        call: Call::Chat,
                        kind: FailureKind::FormatDrift,
                        message: "the prompt was typed and sent, but the page made no chat call and showed no reply".into(),
                    });
                }
            }
        }
    }
}

/// The key of the conversation a prompt continues: its messages before the last user one
/// (`None` for a first message).
fn shown_key(prompt: &crate::replay::render::Prompt) -> Option<String> {
    let keyed = prompt.keyed_messages();
    let (last, earlier) = keyed.split_last()?;
    (last.0 == crate::role::Role::User && !earlier.is_empty())
        .then(|| crate::conversations::key_of(earlier))
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Passes the reply on; once it is complete (its done signal, or its end), the page is known
/// to show the conversation of `messages` and this reply: a later request extending it
/// continues there.
fn remembering(
    stream: DeltaStream,
    work: std::sync::Arc<WorkPage>,
    messages: Vec<(crate::role::Role, String)>,
) -> DeltaStream {
    let mut key = crate::conversations::KeyBuilder::default();
    for (role, text) in &messages {
        key.push(*role, text);
    }
    key.open(crate::role::Role::Assistant);
    let complete = move |key: crate::conversations::KeyBuilder, work: &WorkPage| {
        let mut key = key;
        key.close();
        *lock(&work.conversation) = Some(key.finish());
    };
    futures_util::stream::unfold(Some((stream, Some(key), work)), move |state| async move {
        let (mut stream, mut key, work) = state?;
        let Some(item) = stream.next().await else {
            if let Some(key) = key.take() {
                complete(key, &work);
            }
            return None;
        };
        match &item {
            Ok(Delta::Text(piece)) => {
                if let Some(key) = &mut key {
                    key.text(piece);
                }
            }
            Ok(Delta::Done) => {
                if let Some(key) = key.take() {
                    complete(key, &work);
                }
            }
            // A reply cut short leaves the page's conversation unknown.
            Err(_) => key = None,
            Ok(_) => {}
        }
        Some((item, Some((stream, key, work))))
    })
    .boxed()
}

fn page_error(e: chromiumoxide::error::CdpError) -> ReplayError {
    ReplayError::Browser {
        call: Call::Chat,
        message: if is_connection(&e) {
            "lost the connection to Chromium".into()
        } else {
            "the chat page could not be driven (it may be navigating)".into()
        },
    }
}

fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Tells the flow's chat call among the page's requests (see the module docs).
struct Matcher {
    method: String,
    /// The template's path segments; `None` stands for any one segment.
    path: Vec<Option<String>>,
    /// The typed text as it may appear in a body: raw, and JSON-escaped.
    needles: Vec<Vec<u8>>,
    socket: bool,
    /// The flow's chat call carries the prompt. When a preflight does (the prompt travels
    /// in a "new chat" call), the call carrying the typed text is that preflight, and only
    /// the path tells the chat call.
    prompt_in_chat: bool,
}

impl Matcher {
    fn new(flow: &Flow, text: &str) -> Matcher {
        let mut needles = vec![text.as_bytes().to_vec()];
        let escaped = serde_json::to_string(text).unwrap_or_default();
        let escaped = escaped.trim_matches('"');
        if escaped != text {
            needles.push(escaped.as_bytes().to_vec());
        }
        Matcher {
            method: flow.request.method.to_ascii_uppercase(),
            path: template_path(&flow.request.url),
            needles,
            socket: flow.response.transport == Transport::Websocket,
            prompt_in_chat: carries_prompt(&flow.request),
        }
    }

    fn request(&self, method: &str, url: &str, body: Option<&[u8]>) -> bool {
        let path_matches = method.eq_ignore_ascii_case(&self.method) && self.path_matches(url);
        path_matches || (self.prompt_in_chat && body.is_some_and(|b| self.carries(b)))
    }

    fn carries(&self, haystack: &[u8]) -> bool {
        self.needles.iter().any(|needle| {
            !needle.is_empty()
                && haystack
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
        })
    }

    fn path_matches(&self, url: &str) -> bool {
        let Ok(parsed) = url::Url::parse(url) else {
            return false;
        };
        let segments: Vec<&str> = parsed.path().split('/').collect();
        segments.len() == self.path.len()
            && segments
                .iter()
                .zip(&self.path)
                .all(|(seen, wanted)| wanted.as_deref().is_none_or(|w| w == *seen))
    }
}

/// Whether a call template sends the prompt (a prompt-like slot, or a `{{prompt}}`
/// placeholder in its URL, headers or body).
fn carries_prompt(http: &crate::flow::HttpTemplate) -> bool {
    let prompt_like = |source: &str| matches!(source, "prompt" | "last_user" | "messages");
    http.slots.values().any(|s| prompt_like(s))
        || http.url.contains("{{prompt}}")
        || http.headers.values().any(|v| v.contains("{{prompt}}"))
        || http
            .body
            .as_ref()
            .is_some_and(|b| b.to_string().contains("{{prompt}}"))
}

/// The path of a flow URL template (absolute or relative), split into segments; a segment
/// holding a placeholder becomes a wildcard.
fn template_path(template: &str) -> Vec<Option<String>> {
    let mut rest = template;
    if let Some(i) = rest.find("://") {
        rest = &rest[i + 3..];
        rest = rest.find('/').map_or("/", |j| &rest[j..]);
    }
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    path.split('/')
        .map(|segment| (!segment.contains("{{")).then(|| segment.to_owned()))
        .collect()
}

/// Chooses `files` in the page's file input, as a person attaching them would, and waits for
/// the page's uploads. The files are written under `dir` for Chromium to read, and removed.
async fn attach_files(
    page: &Page,
    feed: &mut tokio::sync::mpsc::Receiver<RecorderEvent>,
    dir: &std::path::Path,
    files: &[std::sync::Arc<crate::attachment::Attachment>],
) -> Result<Written, ReplayError> {
    let input = super::attach::find_file_input(page, KEY).await?;
    if !input.found {
        return Err(ReplayError::Unexpected {
            call: Call::Chat,
            kind: FailureKind::FormatDrift,
            message: "the page has no file input to attach the files with".into(),
        });
    }
    let written = |e: std::io::Error| ReplayError::Browser {
        call: Call::Chat,
        message: format!("cannot write the files for the page: {e}"),
    };
    // One private directory per request (two files may share a name), removed when the
    // guard goes, whatever happens to the request.
    let guard = Written(dir.join(uuid::Uuid::new_v4().simple().to_string()));
    let mut paths = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let parent = guard.0.join(format!("{i}"));
        private_dir(&parent).map_err(written)?;
        let path = parent.join(&file.name);
        tokio::fs::write(&path, &file.bytes)
            .await
            .map_err(written)?;
        paths.push(path);
    }
    let chosen: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
    super::attach::choose_files(page, &chosen).await?;
    super::attach::await_uploads(feed).await;
    Ok(guard)
}

fn private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Files written for the page to read, removed when dropped (the page may read them as late
/// as the send).
struct Written(std::path::PathBuf);

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn read_reply(page: &Page, typed: &str) -> Result<Rendered, ReplayError> {
    let marker: String = normalize(typed).chars().take(80).collect();
    match chatbox::script(
        page,
        KEY,
        chatbox::READ_REPLY,
        &[("PROBE", typed), ("MARKER", &marker)],
    )
    .await
    {
        Ok(rendered) => Ok(rendered),
        Err(e) if is_connection(&e) => Err(page_error(e)),
        // A navigation in progress.
        Err(_) => Ok(Rendered::default()),
    }
}

/// The last resort: the page's reply text as it grows (see the module docs).
fn dom_stream(page: Page, typed: String, idle: Duration, keep: Keep) -> DeltaStream {
    struct State {
        page: Page,
        typed: String,
        text: String,
        reasoning: String,
        /// The page's text at the last poll (`text` is what was passed on).
        seen: String,
        changed_at: Instant,
        idle: Duration,
        ended: bool,
        tick: tokio::time::Interval,
        _keep: Keep,
    }
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State {
        page,
        typed,
        text: String::new(),
        reasoning: String::new(),
        seen: String::new(),
        changed_at: Instant::now(),
        idle,
        ended: false,
        tick,
        _keep: keep,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        if s.ended {
            return None;
        }
        loop {
            s.tick.tick().await;
            let rendered = match read_reply(&s.page, &s.typed).await {
                Ok(r) => r,
                Err(e) => {
                    s.ended = true;
                    return Some((Err(e), s));
                }
            };
            let now = Instant::now();
            let text = rendered.text.trim().to_owned();
            let reasoning = rendered.reasoning.unwrap_or_default().trim().to_owned();
            // Only growth can be passed on; a re-rendered prefix is waited out.
            if reasoning.len() > s.reasoning.len() && reasoning.starts_with(&s.reasoning) {
                let piece = reasoning[s.reasoning.len()..].to_owned();
                s.reasoning = reasoning;
                s.changed_at = now;
                return Some((Ok(Delta::Reasoning(piece)), s));
            }
            if text.len() > s.text.len() && text.starts_with(&s.text) {
                let piece = text[s.text.len()..].to_owned();
                s.seen.clone_from(&text);
                s.text = text;
                s.changed_at = now;
                return Some((Ok(Delta::Text(piece)), s));
            }
            // A re-rendered text that no longer extends what was passed on still counts as
            // a change while it changes, so the reply ends once the page settles rather than
            // never (compared with what was passed on, it would differ on every poll).
            if text != s.seen && !text.is_empty() {
                s.changed_at = now;
            }
            s.seen = text;
            if !s.text.is_empty() && now >= s.changed_at + DOM_STABLE {
                s.ended = true;
                return Some((Ok(Delta::Done), s));
            }
            if now >= s.changed_at + s.idle {
                s.ended = true;
                return Some((
                    Err(ReplayError::Body(format!(
                        "the page's reply did not change for {} s",
                        s.idle.as_secs()
                    ))),
                    s,
                ));
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn template_paths_match_with_placeholders_as_wildcards() {
        let m = Matcher {
            method: "POST".into(),
            path: template_path(
                "/api/organizations/{{preflight.org_id}}/chat_conversations/{{preflight.conversation_id}}/completion",
            ),
            needles: vec![b"hi there".to_vec()],
            socket: false,
            prompt_in_chat: true,
        };
        assert!(m.request(
            "POST",
            "http://h/api/organizations/o1/chat_conversations/c2/completion?x=1",
            None
        ));
        assert!(!m.request(
            "GET",
            "http://h/api/organizations/o1/chat_conversations/c2/completion",
            None
        ));
        assert!(!m.request(
            "POST",
            "http://h/api/organizations/o1/chat_conversations",
            None
        ));
        assert!(m.request("POST", "http://h/other", Some(b"{\"q\":\"hi there\"}")));
        assert_eq!(
            template_path("https://x.example/api/ws?conversation={{preflight.c}}"),
            vec![Some(String::new()), Some("api".into()), Some("ws".into())]
        );
    }

    #[test]
    fn with_the_prompt_in_a_preflight_only_the_path_tells_the_chat_call() {
        let flow = Flow::from_json(
            r#"{"service":"s","preflight":[{"url":"/new","body":{"q":""},"slots":{"/q":"prompt"},
                "extract":{"c":"/id"}}],
                "request":{"url":"/stream/{{preflight.c}}","body":{"c":""},"slots":{"/c":"preflight.c"}},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        let m = Matcher::new(&flow, "hi there");
        assert!(!m.request("POST", "http://h/new", Some(br#"{"q":"hi there"}"#)));
        assert!(m.request("POST", "http://h/stream/c1", None));
    }

    #[test]
    fn typed_text_is_found_json_escaped() {
        let flow = Flow::from_json(
            r#"{"service":"s","request":{"url":"/x"},"response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        let m = Matcher::new(&flow, "line one\nsays \"hi\"");
        assert!(m.carries(br#"{"content":"line one\nsays \"hi\""}"#));
        assert!(!m.carries(b"line one"));
    }
}
