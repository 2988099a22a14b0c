//! The site's own chat box, driven the way a person would: find the composer, type, send (and
//! send again when the page lost the message), watch the page for the reply and read it.
//! Used by the probe (`learn::probe`) and by tier 3 (`ui`), which must find and read the
//! chat box the same way.
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
//! - A send that does not go ([`Sending`]): when the page navigates (the click submitted the
//!   form natively) or the text leaves the input with no request carrying it, the composer is
//!   found again, the text retyped and sent with Enter; when the text is still in the input a
//!   few seconds after the click, Enter is pressed.
//! - The reply ([`READ_REPLY_JS`]): a `MutationObserver` installed just before sending notes
//!   every element added or changed. The user's own message is the first (in document
//!   order), outermost new element whose text contains the marker and is at most a little
//!   longer than the message (a reply quoting it comes after it). Each touched element is
//!   climbed to its outermost new ancestor that contains neither the user's message nor the
//!   input; of those roots, the one after the user's message with the longest text is the
//!   reply. Reasoning is the text of `<details>` elements, or elements whose class / id /
//!   aria-label / title / test id mentions reasoning / thinking / thought, inside the reply
//!   (their summary or header excluded); it is left out of the text, as are buttons,
//!   scripts, `aria-hidden` and screen-reader-only text.
//!
//! Invariants: typed text is never logged; the scripts keep their state under one page
//! property (`KEY`), which [`CLEANUP_JS`] removes.

use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::error::CdpError;
use chromiumoxide::layout::Point;
use serde::Deserialize;
use tokio::time::Instant;

use super::{PageError, redact_url};

/// After sending, how long before Enter is tried when no request carries the message.
pub(crate) const RESEND_AFTER: Duration = Duration::from_secs(3);
/// After sending, how long before giving up on seeing a request carrying the message.
pub(crate) const SEND_WAIT: Duration = Duration::from_secs(15);
/// How often the page is checked while waiting for the composer to come back.
const POLL: Duration = Duration::from_millis(100);

fn cdp(e: CdpError) -> PageError {
    PageError::from_cdp(e)
}

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
    let json = super::evaluate_string(page, &expression).await?;
    Ok(serde_json::from_str(&json)?)
}

/// Finds the composer (again: pages re-render it), types `text` into it, and starts watching
/// the page for the reply.
pub(crate) async fn type_message(
    page: &Page,
    key: &str,
    text: &str,
    marker: &str,
) -> Result<(), PageError> {
    let found: Found = script(page, key, FIND_COMPOSER_JS, &[])
        .await
        .map_err(cdp)?;
    if !found.found {
        let url = page.url().await.ok().flatten().unwrap_or_default();
        return Err(PageError::NoComposer {
            url: redact_url(&url),
            screenshot: None,
        });
    }
    super::insert_text(page, text).await.map_err(cdp)?;
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
    ) -> Result<Sending, PageError> {
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
    pub(crate) async fn check(&mut self, page: &Page, now: Instant) -> Result<(), PageError> {
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
                super::press_key(page, "Enter").await.map_err(cdp)?;
            }
        }
        if now >= self.sent_at + SEND_WAIT {
            return Err(PageError::NotSent { screenshot: None });
        }
        Ok(())
    }

    /// Waits for the composer, types the text again and sends it with Enter.
    async fn retype(&mut self, page: &Page) -> Result<(), PageError> {
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
                return Err(PageError::NotSent { screenshot: None });
            }
            tokio::time::sleep(POLL).await;
        }
        super::insert_text(page, &self.text).await.map_err(cdp)?;
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
        super::press_key(page, "Enter").await.map_err(cdp)?;
        self.sent_at = Instant::now();
        self.navigated = false;
        self.lost_at = None;
        Ok(())
    }
}

/// Clicks the send control; presses Enter when there is none. Returns whether it clicked.
async fn send(page: &Page, key: &str) -> Result<bool, PageError> {
    let control: Found = script(page, key, FIND_SEND_JS, &[]).await.map_err(cdp)?;
    if !control.found {
        super::press_key(page, "Enter").await.map_err(cdp)?;
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
