//! The probe: types one message carrying a unique marker into a logged-in chat page, the way a
//! person would, while `browser::recorder` captures the network, and reads what the page
//! rendered as the reply. The result is a [`Recording`] for inference.
//!
//! Generic heuristics, no site knowledge:
//! - The chat input: the best-scored visible, enabled `textarea` / contenteditable /
//!   `role=textbox` (or a text field whose placeholder, label or aria-label reads like a
//!   message box) outside any form holding a password field; search-like fields score down;
//!   larger, lower on the page and focused score up.
//! - The send control, looked for after typing (many sites enable it only then): a visible,
//!   enabled button in the input's form or near it whose text, aria-label, title, test id or
//!   class reads like send/submit/arrow, or the submit button of the input's form; controls
//!   that read like attach/voice/stop/settings are excluded. None: Enter is pressed.
//! - A send that does not go ([`Sending`], shared with the UI tier): when the page navigates
//!   (the click submitted the form natively) or the text leaves the input with no request
//!   carrying it, the composer is found again, the text retyped and sent with Enter; when the
//!   text is still in the input a few seconds after the click, Enter is pressed.
//! - The call carrying the probe: the first request whose URL or body, or WebSocket frame
//!   sent, contains the marker (from the recorder's live feed); a page load never is.
//! - The reply: a `MutationObserver` installed just before sending notes every element added
//!   or changed. The user's own message is the first (in document order), outermost new
//!   element whose text contains the marker and is at most a little longer than the probe (a
//!   reply quoting the probe comes after it). Each touched element is climbed to
//!   its outermost new ancestor that contains neither the user's message nor the input; of
//!   those roots, the one after the user's message with the longest text is the reply.
//!   Reasoning is the text of `<details>` elements, or elements whose class / id / aria-label
//!   / title / test id mentions reasoning / thinking / thought, inside the reply (their
//!   summary or header excluded); it is left out of `rendered_reply`, as are buttons,
//!   scripts, `aria-hidden` and screen-reader-only text.
//! - Done: the call carrying the probe finished (for a WebSocket: no frame received for a
//!   second), so did every call started after it (the reply may stream from a later call),
//!   and the rendered reply has not changed for [`STABLE_FOR`].
//! - The follow-up: a second probe typed into the same conversation right after, recorded
//!   until the page shows its reply coming ([`Until::Shown`]). One recorder captures both; the
//!   recording is split where the second was sent ([`Recording::split_exchanges`]). Without
//!   a follow-up the recording goes on for [`TRAILING`] to catch the requests a page makes
//!   right after a reply.
//!
//! Invariants: typed text and storage values are never logged; the page's global namespace
//! gets one property, named after the marker, removed at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::error::CdpError;
use chromiumoxide::layout::Point;
use rand::Rng;
use serde::Deserialize;
use tokio::time::Instant;

use crate::browser::recorder::{RawTaps, Recorder, RecorderEvent};
use crate::browser::{LoginError, LoginRequest, PageKind, redact_url};
use crate::learn::recording::{Recording, StorageSnapshot};
use crate::session::SessionData;

/// How long the rendered reply must stay unchanged after the chat call finished.
pub const STABLE_FOR: Duration = Duration::from_millis(500);
/// How long recording continues after the reply is complete.
pub const TRAILING: Duration = Duration::from_millis(300);
/// How often the page is read while waiting.
const POLL: Duration = Duration::from_millis(100);
/// After sending, how long before Enter is tried when no request carries the marker.
pub(crate) const RESEND_AFTER: Duration = Duration::from_secs(3);
/// After sending, how long before the probe gives up on seeing a request carrying the marker.
pub(crate) const SEND_WAIT: Duration = Duration::from_secs(15);
/// A WebSocket chat call counts as finished after this long without a received frame.
const SOCKET_QUIET: Duration = Duration::from_secs(1);
/// How long after the chat call finished a page may take to render any reply at all.
const RENDER_WAIT: Duration = Duration::from_secs(10);

/// One probe to run through [`crate::browser::BrowserPool::probe`].
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
            .finish()
    }
}

impl ProbeRequest {
    pub fn new(account_id: impl Into<String>) -> Self {
        Self {
            account_id: account_id.into(),
            chat_url: None,
            session: None,
            login: None,
            probe_text: None,
            timeout: Duration::from_secs(60),
            follow_up: false,
        }
    }
}

/// Why a probe failed. Messages are for the user and never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("could not find the chat input on {url}")]
    NoComposer {
        url: String,
        screenshot: Option<PathBuf>,
    },
    #[error("the probe was typed and sent, but the page made no request carrying it")]
    NotSent { screenshot: Option<PathBuf> },
    #[error("the site answered the probe with HTTP {status}")]
    Rejected {
        status: u16,
        screenshot: Option<PathBuf>,
    },
    #[error("the probe's chat request failed: {reason}")]
    CallFailed {
        reason: String,
        screenshot: Option<PathBuf>,
    },
    #[error("the probe timed out {stage}")]
    Timeout {
        stage: String,
        screenshot: Option<PathBuf>,
    },
    #[error("the page at {url} is a {kind}, not a chat, and no login was given for the account")]
    NotLoggedIn {
        url: String,
        kind: PageKind,
        screenshot: Option<PathBuf>,
    },
    #[error("no chat page to probe: give a chat URL or a login")]
    NoChatUrl,
    #[error("could not restore the saved session: {0}")]
    Session(String),
    #[error("logging in before the probe failed: {0}")]
    Login(#[source] LoginError),
    #[error("could not open {url}: {reason}")]
    Navigation { url: String, reason: String },
    #[error("could not start Chromium: {0}")]
    Launch(String),
    #[error("Chromium crashed during the probe: {0}")]
    Crashed(String),
    #[error("browser protocol error: {0}")]
    Cdp(String),
}

impl ProbeError {
    /// The failure screenshot saved for this error, if any.
    pub fn screenshot(&self) -> Option<&std::path::Path> {
        match self {
            ProbeError::NoComposer { screenshot, .. }
            | ProbeError::NotSent { screenshot }
            | ProbeError::Rejected { screenshot, .. }
            | ProbeError::CallFailed { screenshot, .. }
            | ProbeError::Timeout { screenshot, .. }
            | ProbeError::NotLoggedIn { screenshot, .. } => screenshot.as_deref(),
            ProbeError::Login(e) => e.screenshot(),
            _ => None,
        }
    }

    /// Whether a screenshot of the page would explain this error.
    pub(crate) fn wants_screenshot(&self) -> bool {
        matches!(
            self,
            ProbeError::NoComposer { .. }
                | ProbeError::NotSent { .. }
                | ProbeError::Rejected { .. }
                | ProbeError::CallFailed { .. }
                | ProbeError::Timeout { .. }
                | ProbeError::NotLoggedIn { .. }
        )
    }

    pub(crate) fn set_screenshot(&mut self, path: Option<PathBuf>) {
        match self {
            ProbeError::NoComposer { screenshot, .. }
            | ProbeError::NotSent { screenshot }
            | ProbeError::Rejected { screenshot, .. }
            | ProbeError::CallFailed { screenshot, .. }
            | ProbeError::Timeout { screenshot, .. }
            | ProbeError::NotLoggedIn { screenshot, .. } => *screenshot = path,
            _ => {}
        }
    }
}

impl From<LoginError> for ProbeError {
    /// Browser-level failures (launch, crash, protocol, navigation) outside a login.
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Launch(m) => ProbeError::Launch(m),
            LoginError::Crashed(m) => ProbeError::Crashed(m),
            LoginError::Cdp(m) => ProbeError::Cdp(m),
            LoginError::Navigation { url, reason } => ProbeError::Navigation { url, reason },
            LoginError::Timeout { stage, screenshot } => ProbeError::Timeout { stage, screenshot },
            other => ProbeError::Cdp(other.to_string()),
        }
    }
}

pub(crate) fn cdp(e: CdpError) -> ProbeError {
    ProbeError::from(crate::browser::cdp_error(e))
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
pub(crate) struct ProbeOptions {
    /// The message to type (it contains `marker`).
    pub probe: String,
    pub marker: String,
    /// Budget from sending to the complete reply.
    pub timeout: Duration,
    /// A second message (and its marker) to send in the same conversation once the reply is
    /// complete.
    pub follow_up: Option<(String, String)>,
}

impl ProbeOptions {
    /// The probe text of `req` (its marker appended when it lacks one), with a new marker.
    pub(crate) fn for_request(req: &ProbeRequest) -> ProbeOptions {
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
        }
    }
}

#[derive(Debug, Deserialize)]
struct PageStorage {
    url: String,
    ua: String,
    #[serde(default)]
    local: BTreeMap<String, String>,
    #[serde(default)]
    session: BTreeMap<String, String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

const STORAGE_JS: &str = r#"(() => {
  const dump = (name) => { try { const s = window[name]; const o = {}; for (let i = 0; i < s.length; i++) { const k = s.key(i); o[k] = s.getItem(k); } return o; } catch (e) { return {}; } };
  const meta = {};
  document.querySelectorAll('meta[content]').forEach((m) => {
    const name = m.getAttribute('name') || m.getAttribute('property');
    if (name && !(name in meta)) meta[name] = m.getAttribute('content');
  });
  return JSON.stringify({ url: location.href, ua: navigator.userAgent, local: dump('localStorage'), session: dump('sessionStorage'), meta });
})()"#;

/// Shared helpers of the page scripts below.
pub(crate) const HELPERS_JS: &str = r#"
  const vis = (el) => {
    if (!el || !el.isConnected) return false;
    if (typeof el.checkVisibility === 'function' &&
        !el.checkVisibility({ opacityProperty: true, visibilityProperty: true })) return false;
    const r = el.getBoundingClientRect();
    return r.width > 1 && r.height > 1;
  };
  const norm = (s) => String(s || '').replace(/\s+/g, ' ').trim();
  const cls = (el) => { const c = el.className; return typeof c === 'string' ? c : (c && c.baseVal) || ''; };
  const labelOf = (el) => {
    let t = '';
    if (el.labels && el.labels.length) t = Array.from(el.labels).map((l) => l.innerText).join(' ');
    const by = el.getAttribute('aria-labelledby');
    if (!t && by) t = by.split(/\s+/).map((id) => { const n = document.getElementById(id); return n ? n.innerText : ''; }).join(' ');
    return t;
  };
  const disabled = (el) => !!el.disabled || el.getAttribute('aria-disabled') === 'true';
"#;

/// Finds the chat input, remembers it under `window[KEY]`, focuses it and selects its content
/// (so typing replaces a draft).
pub(crate) const FIND_COMPOSER_JS: &str = r#"
  const cands = [];
  const sel = 'textarea, [contenteditable=""], [contenteditable="true"], [contenteditable="plaintext-only"], [role=textbox], input:not([type]), input[type=text], input[type=search]';
  for (const el of document.querySelectorAll(sel)) {
    if (!vis(el) || disabled(el) || el.readOnly) continue;
    if (el.parentElement && el.parentElement.isContentEditable) continue;
    const form = el.closest('form');
    if (form && Array.from(form.querySelectorAll('input[type=password]')).some(vis)) continue;
    const hint = [el.getAttribute('placeholder'), el.getAttribute('aria-label'), el.getAttribute('aria-placeholder'),
      el.getAttribute('data-placeholder'), el.getAttribute('title'), labelOf(el), el.getAttribute('name'), el.id].join(' ');
    const rich = el.localName === 'textarea' || el.isContentEditable || el.getAttribute('role') === 'textbox';
    const chatty = /message|ask|prompt|chat|type|send|question|anything|reply|talk|write/i.test(hint);
    const searchy = /search|filter|find|e-?mail|user|login|phone|url/i.test(hint) || el.type === 'search';
    if (!rich && !chatty) continue;
    const r = el.getBoundingClientRect();
    let score = (rich ? 3 : 0) + (chatty ? 2 : 0) - (searchy ? 4 : 0);
    score += Math.min((r.width * r.height) / 20000, 2);
    if (r.top > window.innerHeight / 2) score += 1;
    if (document.activeElement === el) score += 1;
    cands.push({ el, score });
  }
  cands.sort((a, b) => b.score - a.score);
  if (!cands.length) return JSON.stringify({ found: false });
  const el = cands[0].el;
  window[KEY] = { input: el };
  el.scrollIntoView({ block: 'center' });
  el.focus();
  if (typeof el.select === 'function') el.select();
  else if (el.isContentEditable) {
    const range = document.createRange();
    range.selectNodeContents(el);
    const s = window.getSelection();
    s.removeAllRanges();
    s.addRange(range);
  }
  return JSON.stringify({ found: true, kind: el.localName, candidates: cands.length });
"#;

/// The chat input's current text.
pub(crate) const COMPOSER_TEXT_JS: &str = r#"
  const st = window[KEY];
  if (!st || !st.input || !st.input.isConnected) return JSON.stringify(null);
  const el = st.input;
  return JSON.stringify(typeof el.value === 'string' ? el.value : el.innerText);
"#;

/// Types `TEXT` into the input by script (fallback when `Input.insertText` did not land).
pub(crate) const SET_TEXT_JS: &str = r#"
  const st = window[KEY];
  const el = st.input;
  el.focus();
  if (el.isContentEditable) {
    document.execCommand('selectAll', false);
    document.execCommand('insertText', false, TEXT);
  } else {
    const proto = el.localName === 'textarea' ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
    const setter = Object.getOwnPropertyDescriptor(proto, 'value').set;
    setter.call(el, TEXT);
    el.dispatchEvent(new Event('input', { bubbles: true }));
    el.dispatchEvent(new Event('change', { bubbles: true }));
  }
  return JSON.stringify(true);
"#;

/// Notes the elements present now and starts observing what is added or changed.
pub(crate) const WATCH_JS: &str = r#"
  const st = window[KEY];
  st.before = new WeakSet(document.querySelectorAll('*'));
  st.touched = new Set();
  st.obs = new MutationObserver((ms) => {
    for (const m of ms) {
      if (m.type === 'childList') {
        st.touched.add(m.target);
        m.addedNodes.forEach((n) => { if (n.nodeType === 1) st.touched.add(n); });
      } else if (m.target.parentElement) {
        st.touched.add(m.target.parentElement);
      }
    }
  });
  st.obs.observe(document.documentElement, { childList: true, subtree: true, characterData: true });
  return JSON.stringify(true);
"#;

/// Finds the send control near the input; returns where to click it.
pub(crate) const FIND_SEND_JS: &str = r#"
  const st = window[KEY];
  const input = st.input;
  const ir = input.getBoundingClientRect();
  const form = input.closest('form');
  const scopes = [];
  if (form) scopes.push(form);
  let node = input.parentElement;
  for (let i = 0; node && i < 6; i++, node = node.parentElement) scopes.push(node);
  const seen = new Set();
  let best = null;
  for (const scope of scopes) {
    for (const el of scope.querySelectorAll('button, [role=button], input[type=submit], input[type=button], input[type=image]')) {
      if (seen.has(el)) continue;
      seen.add(el);
      if (!vis(el) || disabled(el)) continue;
      const label = [el.innerText, el.value, el.getAttribute('aria-label'), el.getAttribute('title'),
        el.getAttribute('data-testid'), el.id, cls(el), el.getAttribute('name')].join(' ');
      if (/attach|upload|file|image|photo|voice|micro|\bmic\b|record|dictat|stop|cancel|clear|emoji|setting|model|menu|more|share|search|tool|plus|log ?in|sign/i.test(label)) continue;
      const type = (el.getAttribute('type') || (el.localName === 'button' ? 'submit' : '')).toLowerCase();
      let score = 0;
      if (/send|submit|ask|\bgo\b|arrow|paper.?plane|➤|↑|→/i.test(label)) score += 4;
      if (form && el.form === form && type === 'submit') score += 3;
      if (!norm(el.innerText) && el.querySelector('svg, img')) score += 1;
      const r = el.getBoundingClientRect();
      const dx = Math.max(ir.left - r.right, r.left - ir.right, 0);
      const dy = Math.max(ir.top - r.bottom, r.top - ir.bottom, 0);
      score += Math.max(0, 2 - Math.hypot(dx, dy) / 150);
      if (!best || score > best.score) best = { el, score };
    }
  }
  if (!best || best.score < 4) return JSON.stringify({ found: false });
  const el = best.el;
  st.send = el;
  el.scrollIntoView({ block: 'center' });
  const r = el.getBoundingClientRect();
  const x = r.left + r.width / 2, y = r.top + r.height / 2;
  const hit = document.elementFromPoint(x, y);
  return JSON.stringify({ found: true, x, y, hit: !!hit && (hit === el || el.contains(hit)) });
"#;

pub(crate) const FOCUS_JS: &str = r#"
  const st = window[KEY];
  if (st && st.input) st.input.focus();
  return JSON.stringify(true);
"#;

pub(crate) const CLICK_SEND_JS: &str = r#"
  const st = window[KEY];
  if (st && st.send) st.send.click();
  return JSON.stringify(true);
"#;

/// Reads the reply (see the module docs). Returns `{found, text, reasoning}`.
pub(crate) const READ_REPLY_JS: &str = r#"
  const st = window[KEY];
  if (!st || !st.before) return JSON.stringify({ found: false });
  const composer = st.input;
  const isNew = (el) => !st.before.has(el);
  const probe = norm(PROBE);
  const body = document.body;
  const touched = Array.from(st.touched).filter((el) => el.isConnected && body && body.contains(el) && el !== body);
  // The user's own message: the outermost new element showing the marker, about the probe's size.
  const fresh = [];
  for (const el of touched) {
    if (!isNew(el)) continue;
    fresh.push(el);
    for (const d of el.querySelectorAll('*')) fresh.push(d);
  }
  let user = null;
  for (const el of fresh) {
    const t = norm(el.innerText);
    if (!t.includes(MARKER) || t.length > probe.length + 40) continue;
    if (composer && (el.contains(composer) || composer.contains(el))) continue;
    // The first in document order (a reply may quote the probe later), outermost there.
    if (!user || el.contains(user) || (!user.contains(el) && (el.compareDocumentPosition(user) & Node.DOCUMENT_POSITION_FOLLOWING))) user = el;
  }
  const excluded = (el) => (user && (el === user || el.contains(user) || user.contains(el))) ||
    (composer && (el === composer || el.contains(composer) || composer.contains(el)));
  const roots = new Set();
  for (let el of touched) {
    if (excluded(el)) continue;
    if (isNew(el)) {
      while (el.parentElement && el.parentElement !== body && isNew(el.parentElement) && !excluded(el.parentElement)) el = el.parentElement;
    }
    roots.add(el);
  }
  let list = Array.from(roots).filter((r) => !Array.from(roots).some((o) => o !== r && o.contains(r)));
  if (user) list = list.filter((r) => user.compareDocumentPosition(r) & Node.DOCUMENT_POSITION_FOLLOWING);
  const REASON = /reason|think|thought/i;
  const attrs = (el) => [cls(el), el.id, el.getAttribute('aria-label'), el.getAttribute('title'), el.getAttribute('data-testid'), el.getAttribute('data-type')].join(' ');
  const skip = (el) => ['button', 'script', 'style', 'svg', 'noscript', 'template', 'textarea', 'input', 'select'].includes(el.localName) ||
    el.getAttribute('role') === 'button' || el.getAttribute('aria-hidden') === 'true' || /sr-only|visually-hidden|screen-reader/i.test(cls(el));
  const read = (root) => {
    const reasoning = Array.from(root.querySelectorAll('*')).filter((el) => el.localName === 'details' || REASON.test(attrs(el)));
    const outer = reasoning.filter((el) => !reasoning.some((o) => o !== el && o.contains(el)));
    const cut = new Set(outer);
    for (const el of root.querySelectorAll('*')) if (skip(el)) cut.add(el);
    const dirty = new Set();
    for (const el of cut) for (let p = el.parentElement; p && p !== root.parentElement; p = p.parentElement) dirty.add(p);
    const textOf = (node) => {
      if (node.nodeType === 3) return node.textContent;
      if (node.nodeType !== 1 || cut.has(node)) return '';
      if (!dirty.has(node)) return node.innerText || '';
      return Array.from(node.childNodes).map(textOf).join('\n');
    };
    const pieces = [];
    for (const el of outer) {
      let t = '';
      if (el.localName === 'details') {
        const was = el.open;
        el.open = true;
        t = Array.from(el.childNodes).filter((c) => c.localName !== 'summary').map((c) => c.nodeType === 1 ? (c.innerText || c.textContent) : c.textContent).join('\n');
        el.open = was;
      } else {
        const kids = Array.from(el.children).filter((c) => !skip(c) && !/header|title|label|toggle|summary/i.test(attrs(c)));
        t = kids.length ? kids.map((c) => c.innerText || c.textContent).join('\n') : (el.innerText || el.textContent);
      }
      if (norm(t)) pieces.push(t.trim());
    }
    return { text: textOf(root).trim(), reasoning: pieces.length ? pieces.join('\n\n') : null };
  };
  let best = null;
  for (const root of list) {
    const r = read(root);
    if (!norm(r.text) && !r.reasoning) continue;
    if (!best || norm(r.text).length >= norm(best.text).length) best = r;
  }
  if (!best) return JSON.stringify({ found: false, user: !!user });
  return JSON.stringify({ found: true, user: !!user, text: best.text, reasoning: best.reasoning });
"#;

pub(crate) const CLEANUP_JS: &str = r#"
  const st = window[KEY];
  if (st && st.obs) st.obs.disconnect();
  delete window[KEY];
  return JSON.stringify(true);
"#;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Found {
    pub(crate) found: bool,
    #[serde(default)]
    x: f64,
    #[serde(default)]
    y: f64,
    #[serde(default)]
    hit: bool,
}

/// What [`READ_REPLY_JS`] read.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
pub(crate) struct Rendered {
    pub(crate) found: bool,
    #[serde(default)]
    pub(crate) text: String,
    #[serde(default)]
    pub(crate) reasoning: Option<String>,
}

/// One page script: `body` runs in a function with the helpers, `KEY` and the given
/// constants bound; it returns a JSON string, parsed here.
pub(crate) async fn script<T: serde::de::DeserializeOwned>(
    page: &Page,
    key: &str,
    body: &str,
    consts: &[(&str, &str)],
) -> Result<T, CdpError> {
    let mut bindings = format!("const KEY = {};", serde_json::to_string(key)?);
    for (name, value) in consts {
        bindings.push_str(&format!(
            "const {name} = {};",
            serde_json::to_string(value)?
        ));
    }
    let expression = format!("(() => {{ {bindings} {HELPERS_JS} {body} }})()");
    let json = crate::browser::evaluate_string(page, &expression).await?;
    Ok(serde_json::from_str(&json)?)
}

/// Probes a logged-in chat page: see the module docs. `taps` routes the request headers
/// chromiumoxide cannot parse to the recorder. Errors carry no screenshot; the caller adds one.
pub(crate) async fn run(
    page: &Page,
    taps: &RawTaps,
    options: &ProbeOptions,
) -> Result<Recording, ProbeError> {
    let key = format!("__{}", options.marker);
    let result = probe_page(page, taps, options, &key).await;
    let _ = script::<bool>(page, &key, CLEANUP_JS, &[]).await;
    result
}

async fn probe_page(
    page: &Page,
    taps: &RawTaps,
    options: &ProbeOptions,
    key: &str,
) -> Result<Recording, ProbeError> {
    let found: Found = script(page, key, FIND_COMPOSER_JS, &[])
        .await
        .map_err(cdp)?;
    if !found.found {
        let url = page.url().await.ok().flatten().unwrap_or_default();
        return Err(ProbeError::NoComposer {
            url: redact_url(&url),
            screenshot: None,
        });
    }
    let storage = snapshot_storage(page).await?;
    let recorder = Recorder::start(page, taps).await.map_err(cdp)?;
    // Taken once the recorder runs, so no earlier than its time 0: what started after a
    // send has a recording time after it.
    let origin = Instant::now();
    let mut feed = recorder.subscribe();
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
    })
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
) -> Result<Rendered, ProbeError> {
    let typing = Instant::now();
    type_message(page, key, text, marker).await?;
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
                    return Err(ProbeError::Crashed("the recorder stopped".into()));
                };
                progress.on_event(event, &mut sending);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let current: Rendered = match script(page, key, READ_REPLY_JS, &[("PROBE", text), ("MARKER", marker)]).await {
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
                    return Err(ProbeError::Timeout {
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

    fn on_event(&mut self, event: RecorderEvent, sending: &mut Sending) {
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
                    // The page itself is being replaced (a form submitted natively).
                    sending.navigated();
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
    fn is_over(&self, now: Instant, until: Until) -> Result<bool, ProbeError> {
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
            return Err(ProbeError::CallFailed {
                reason: reason.clone(),
                screenshot: None,
            });
        }
        if let Some(status) = self.status.filter(|s| *s >= 400) {
            return Err(ProbeError::Rejected {
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

/// Finds the composer (again: pages re-render it), types `text` into it, and starts watching
/// the page for the reply.
async fn type_message(page: &Page, key: &str, text: &str, marker: &str) -> Result<(), ProbeError> {
    let found: Found = script(page, key, FIND_COMPOSER_JS, &[])
        .await
        .map_err(cdp)?;
    if !found.found {
        let url = page.url().await.ok().flatten().unwrap_or_default();
        return Err(ProbeError::NoComposer {
            url: redact_url(&url),
            screenshot: None,
        });
    }
    crate::browser::insert_text(page, text).await.map_err(cdp)?;
    let typed: Option<String> = script(page, key, COMPOSER_TEXT_JS, &[])
        .await
        .map_err(cdp)?;
    if !typed.is_some_and(|t| t.contains(marker)) {
        tracing::debug!("Input.insertText did not reach the chat input; setting it by script");
        script::<bool>(page, key, SET_TEXT_JS, &[("TEXT", text)])
            .await
            .map_err(cdp)?;
    }
    script::<bool>(page, key, WATCH_JS, &[])
        .await
        .map_err(cdp)?;
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// How long a send may take before the text counts as lost: the page navigated, or the text
/// left the input, and no request carried it.
const LOST_AFTER: Duration = Duration::from_millis(1200);
/// How long the page may take to show its composer again after a navigation.
const COMPOSER_BACK: Duration = Duration::from_secs(10);

/// A typed message being sent, and what to do when it does not go: shared by the probe and
/// the UI tier (`browser::ui`).
///
/// The send control is clicked (Enter when there is none). While no request carries the
/// text, every poll checks the page: when it navigated (the click submitted the form
/// natively and reloaded it: the page's state is gone) or the text left the input, for
/// [`LOST_AFTER`], the composer is found again on the page, the text retyped and sent with
/// Enter; when the text is still in the input after [`RESEND_AFTER`] (the click landed before
/// the page's handler was ready), Enter is pressed. After [`SEND_WAIT`] without a request,
/// it gives up.
pub(crate) struct Sending {
    key: String,
    text: String,
    needle: String,
    sent_at: Instant,
    /// Enter was pressed (after the click) or the text was retyped: no second chance.
    resent: bool,
    retyped: bool,
    navigated: bool,
    lost_at: Option<Instant>,
}

impl Sending {
    /// Clicks the send control (Enter when there is none). `needle` is what shows the text is
    /// still in the input (the probe's marker; the UI tier's text itself).
    pub(crate) async fn start(
        page: &Page,
        key: &str,
        text: &str,
        needle: &str,
    ) -> Result<Sending, ProbeError> {
        let clicked = send(page, key).await?;
        Ok(Sending {
            key: key.to_owned(),
            text: text.to_owned(),
            needle: needle.to_owned(),
            sent_at: Instant::now(),
            resent: !clicked,
            retyped: false,
            navigated: false,
            lost_at: None,
        })
    }

    /// The page started loading a new document since the send.
    pub(crate) fn navigated(&mut self) {
        self.navigated = true;
    }

    /// One poll while no request carried the text: re-sends or gives up as the type docs say.
    pub(crate) async fn check(&mut self, page: &Page, now: Instant) -> Result<(), ProbeError> {
        let key = self.key.clone();
        let in_input: Option<String> = script(page, &key, COMPOSER_TEXT_JS, &[])
            .await
            .unwrap_or(None);
        let still_typed = in_input
            .as_deref()
            .is_some_and(|t| t.contains(&self.needle));
        // The page's state is gone with its document.
        let reloaded = in_input.is_none() && self.navigated;
        if !still_typed {
            let lost_at = *self.lost_at.get_or_insert(now);
            if !self.retyped && (reloaded || now >= lost_at + LOST_AFTER) {
                tracing::debug!(
                    reloaded,
                    "the message left the page without a request carrying it; typing it again"
                );
                self.retype(page).await?;
                return Ok(());
            }
        } else {
            self.lost_at = None;
            if !self.resent && now >= self.sent_at + RESEND_AFTER {
                self.resent = true;
                tracing::debug!(
                    "no request carried the message after clicking send; pressing Enter"
                );
                let _ = script::<bool>(page, &key, FOCUS_JS, &[]).await;
                crate::browser::press_key(page, "Enter")
                    .await
                    .map_err(cdp)?;
            }
        }
        if now >= self.sent_at + SEND_WAIT {
            return Err(ProbeError::NotSent { screenshot: None });
        }
        Ok(())
    }

    /// Waits for the composer, types the text again and sends it with Enter.
    async fn retype(&mut self, page: &Page) -> Result<(), ProbeError> {
        self.retyped = true;
        self.resent = true;
        let deadline = Instant::now() + COMPOSER_BACK;
        let key = self.key.clone();
        loop {
            let found: Found = script(page, &key, FIND_COMPOSER_JS, &[])
                .await
                .unwrap_or_default();
            if found.found {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ProbeError::NotSent { screenshot: None });
            }
            tokio::time::sleep(POLL).await;
        }
        crate::browser::insert_text(page, &self.text)
            .await
            .map_err(cdp)?;
        let typed: Option<String> = script(page, &key, COMPOSER_TEXT_JS, &[])
            .await
            .map_err(cdp)?;
        if !typed.is_some_and(|t| t.contains(&self.needle)) {
            script::<bool>(page, &key, SET_TEXT_JS, &[("TEXT", &self.text)])
                .await
                .map_err(cdp)?;
        }
        script::<bool>(page, &key, WATCH_JS, &[])
            .await
            .map_err(cdp)?;
        crate::browser::press_key(page, "Enter")
            .await
            .map_err(cdp)?;
        self.sent_at = Instant::now();
        self.navigated = false;
        self.lost_at = None;
        Ok(())
    }
}

/// Clicks the send control; presses Enter when there is none. Returns whether it clicked.
async fn send(page: &Page, key: &str) -> Result<bool, ProbeError> {
    let control: Found = script(page, key, FIND_SEND_JS, &[]).await.map_err(cdp)?;
    if !control.found {
        crate::browser::press_key(page, "Enter")
            .await
            .map_err(cdp)?;
        return Ok(false);
    }
    if control.hit {
        page.click(Point {
            x: control.x,
            y: control.y,
        })
        .await
        .map_err(cdp)?;
    } else {
        // Something covers the control: click it by script.
        script::<bool>(page, key, CLICK_SEND_JS, &[])
            .await
            .map_err(cdp)?;
    }
    Ok(true)
}

/// The page URL and its storage: cookies for the page's URL (HttpOnly included, from CDP),
/// local and session storage, `<meta>` name/content pairs and the user agent.
async fn snapshot_storage(page: &Page) -> Result<(String, StorageSnapshot), ProbeError> {
    let json = crate::browser::evaluate_string(page, STORAGE_JS)
        .await
        .map_err(cdp)?;
    let storage: PageStorage =
        serde_json::from_str(&json).map_err(|e| ProbeError::Cdp(format!("storage dump: {e}")))?;
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
