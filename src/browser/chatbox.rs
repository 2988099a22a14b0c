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
//! - The reply ([`READ_REPLY`]): a `MutationObserver` installed just before sending notes
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
//! property (`KEY`), which [`CLEANUP`] removes.

use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::error::CdpError;
use chromiumoxide::layout::Point;
use serde::Deserialize;
use tokio::time::Instant;

// The scripts callers run with [`script`] are named here too.
pub(crate) use super::js::chatbox::{
    CLEANUP, CLICK_SEND, COMPOSER_TEXT, FIND_COMPOSER, FIND_SEND, FOCUS, HELPERS, READ_REPLY,
    SET_TEXT, WATCH,
};
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

/// What [`READ_REPLY`] read.
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
    let expression = format!("(() => {{ {bindings} {HELPERS} {body} }})()");
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
    let found: Found = script(page, key, FIND_COMPOSER, &[]).await.map_err(cdp)?;
    if !found.found {
        let url = page.url().await.ok().flatten().unwrap_or_default();
        return Err(PageError::NoComposer {
            url: redact_url(&url),
            screenshot: None,
        });
    }
    super::insert_text(page, text).await.map_err(cdp)?;
    let typed: Option<String> = script(page, key, COMPOSER_TEXT, &[]).await.map_err(cdp)?;
    if !typed.is_some_and(|t| t.contains(marker)) {
        tracing::debug!("Input.insertText did not reach the chat input; setting it by script");
        script::<bool>(page, key, SET_TEXT, &[("TEXT", text)])
            .await
            .map_err(cdp)?;
    }
    script::<bool>(page, key, WATCH, &[]).await.map_err(cdp)?;
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
        let in_input: Option<String> = script(page, &key, COMPOSER_TEXT, &[]).await.unwrap_or(None);
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
                let _ = script::<bool>(page, &key, FOCUS, &[]).await;
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
            let found: Found = script(page, &key, FIND_COMPOSER, &[])
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
        let typed: Option<String> = script(page, &key, COMPOSER_TEXT, &[]).await.map_err(cdp)?;
        if !typed.is_some_and(|t| t.contains(&self.needle)) {
            script::<bool>(page, &key, SET_TEXT, &[("TEXT", &self.text)])
                .await
                .map_err(cdp)?;
        }
        script::<bool>(page, &key, WATCH, &[]).await.map_err(cdp)?;
        super::press_key(page, "Enter").await.map_err(cdp)?;
        self.sent_at = Instant::now();
        self.navigated = false;
        self.lost_at = None;
        Ok(())
    }
}

/// Clicks the send control; presses Enter when there is none. Returns whether it clicked.
async fn send(page: &Page, key: &str) -> Result<bool, PageError> {
    let control: Found = script(page, key, FIND_SEND, &[]).await.map_err(cdp)?;
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
        script::<bool>(page, key, CLICK_SEND, &[])
            .await
            .map_err(cdp)?;
    }
    Ok(true)
}
