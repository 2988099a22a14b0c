//! CDP on one page, for everything in `browser` that drives a page: evaluating a script,
//! typing, pressing keys, opening a URL, reading and restoring storage, screenshots, and what
//! a CDP error means. It knows no login, probe or tier.
//!
//! Invariants: typed text, storage values and cookie values are never logged; URLs are shown
//! without query or fragment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::input::{
    DispatchKeyEventParams, DispatchKeyEventType, InsertTextParams,
};
use chromiumoxide::cdp::browser_protocol::page::{CaptureScreenshotFormat, NavigateParams};
use chromiumoxide::cdp::js_protocol::runtime::EvaluateParams;
use chromiumoxide::error::CdpError;
use chromiumoxide::page::ScreenshotParams;
use serde::Deserialize;
use tokio::time::Instant;

use super::{LoginError, PageError, js, redact_url};
use crate::session::SessionData;

/// Poll interval of every wait: short enough to feel instant, long enough to stay cheap.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Evaluates an expression that returns a string.
pub(crate) async fn evaluate_string(page: &Page, expression: &str) -> Result<String, CdpError> {
    let params = EvaluateParams::builder()
        .expression(expression)
        .return_by_value(true)
        .await_promise(true)
        .build()
        .map_err(CdpError::msg)?;
    let reply = page.execute(params).await?.result;
    if let Some(exception) = reply.exception_details {
        return Err(CdpError::JavascriptException(Box::new(exception)));
    }
    reply
        .result
        .value
        .and_then(|v| v.as_str().map(str::to_owned))
        .ok_or_else(|| CdpError::msg("the page script returned no string"))
}

/// Which of `selectors` match a visible element (invalid selectors count as not visible).
pub(crate) async fn check_visible(
    page: &Page,
    selectors: &[String],
) -> Result<Vec<bool>, CdpError> {
    if selectors.is_empty() {
        return Ok(Vec::new());
    }
    let json = call(page, js::CHECK_VISIBLE, &selectors).await?;
    Ok(serde_json::from_str(&json)?)
}

/// `Input.insertText`: what a paste looks like to the page; any Unicode.
pub(crate) async fn insert_text(page: &Page, text: &str) -> Result<(), CdpError> {
    page.execute(InsertTextParams::new(text)).await?;
    Ok(())
}

/// Presses and releases `key` (a US-keyboard key name such as `Enter`, `Tab`, `a`).
pub(crate) async fn press_key(page: &Page, key: &str) -> Result<(), CdpError> {
    let definition = chromiumoxide::keys::get_key_definition(key)
        .ok_or_else(|| CdpError::msg("unknown key name"))?;
    let text = definition
        .text
        .or((definition.key.chars().count() == 1).then_some(definition.key));
    let mut down = DispatchKeyEventParams::builder()
        .key(definition.key)
        .code(definition.code)
        .windows_virtual_key_code(definition.key_code)
        .native_virtual_key_code(definition.key_code);
    if let Some(text) = text {
        down = down.text(text);
    }
    let up = down.clone().r#type(DispatchKeyEventType::KeyUp);
    let down = down.r#type(if text.is_some() {
        DispatchKeyEventType::KeyDown
    } else {
        DispatchKeyEventType::RawKeyDown
    });
    page.execute(down.build().map_err(CdpError::msg)?).await?;
    page.execute(up.build().map_err(CdpError::msg)?).await?;
    Ok(())
}

/// Errors that mean "the connection to the browser is gone", as opposed to a page that is
/// between documents or a script that failed.
pub(crate) fn is_connection(e: &CdpError) -> bool {
    matches!(
        e,
        CdpError::Ws(_) | CdpError::Io(_) | CdpError::ChannelSendError(_) | CdpError::NoResponse
    )
}

/// Errors a navigation in progress causes ("Execution context was destroyed", "Cannot find
/// context", a half-built document): retried by polling.
pub(crate) fn is_transient(e: &CdpError) -> bool {
    matches!(
        e,
        CdpError::Chrome(_)
            | CdpError::JavascriptException(_)
            | CdpError::Serde(_)
            | CdpError::ChromeMessage(_)
    )
}

pub(crate) fn cdp_error(e: CdpError) -> LoginError {
    if is_connection(&e) {
        LoginError::Crashed(format!("lost the connection to Chromium ({e})"))
    } else if matches!(e, CdpError::Timeout) {
        LoginError::Cdp("Chromium did not answer in time".into())
    } else {
        LoginError::Cdp(e.to_string())
    }
}

/// What [`js::STORAGE`] reads of a page: its URL, user agent, origin storage and `<meta>`
/// name/content pairs.
#[derive(Debug, Deserialize)]
pub(crate) struct PageStorage {
    pub(crate) url: String,
    pub(crate) ua: String,
    #[serde(default)]
    pub(crate) local: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) session: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) meta: BTreeMap<String, String>,
}

/// Reads the page's storage in one evaluation (see [`PageStorage`]). Storage access throws on
/// opaque origins; that yields empty maps, not a failure.
pub(crate) async fn read_storage(page: &Page) -> Result<PageStorage, CdpError> {
    let json = evaluate_string(page, js::STORAGE).await?;
    Ok(serde_json::from_str(&json)?)
}

/// Calls a page script that is a function expression with `args` (serialised as JSON) and
/// returns the string it returns (or resolves to).
pub(crate) async fn call(
    page: &Page,
    function: &str,
    args: &impl serde::Serialize,
) -> Result<String, CdpError> {
    let args = serde_json::to_string(args)?;
    evaluate_string(page, &format!("({})({args})", function.trim())).await
}

/// Writes `session`'s local and session storage into the page's current origin.
pub(crate) async fn restore_storage(page: &Page, session: &SessionData) -> Result<(), PageError> {
    let args = serde_json::json!({
        "local": session.local_storage,
        "session": session.session_storage,
    });
    call(page, js::RESTORE_STORAGE, &args).await.map_err(|e| {
        if is_connection(&e) {
            PageError::from(cdp_error(e))
        } else {
            PageError::Session("the page refused the session's storage".into())
        }
    })?;
    Ok(())
}

/// Opens `url` in `page` and waits for the new document to be past loading.
pub(crate) async fn navigate(page: &Page, url: &str, deadline: Instant) -> Result<(), PageError> {
    let parsed = url::Url::parse(url).map_err(|e| PageError::Navigation {
        url: redact_url(url),
        reason: format!("not a valid URL ({e})"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(PageError::Navigation {
            url: redact_url(url),
            reason: "only http and https URLs can be opened".into(),
        });
    }
    let before = evaluate_string(page, "String(performance.timeOrigin)")
        .await
        .unwrap_or_default();
    let reply = page
        .execute(NavigateParams::new(parsed.as_str()))
        .await
        .map_err(|e| PageError::from(cdp_error(e)))?;
    if let Some(error) = reply.result.error_text.filter(|e| !e.is_empty()) {
        return Err(PageError::Navigation {
            url: redact_url(url),
            reason: error,
        });
    }
    loop {
        let state = evaluate_string(
            page,
            "JSON.stringify([String(performance.timeOrigin), document.readyState, location.href])",
        )
        .await;
        match state {
            Ok(json) => {
                let (origin, ready, href): (String, String, String) =
                    serde_json::from_str(&json).unwrap_or_default();
                if origin != before && ready != "loading" && href != "about:blank" {
                    return Ok(());
                }
            }
            Err(e) if is_connection(&e) => return Err(PageError::from(cdp_error(e))),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(PageError::Timeout {
                stage: format!("while opening {}", redact_url(url)),
                screenshot: None,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A PNG of `page`'s viewport, if Chromium gives one within 10 s.
pub(crate) async fn page_screenshot(page: &Page) -> Option<Vec<u8>> {
    let shot = page.screenshot(
        ScreenshotParams::builder()
            .format(CaptureScreenshotFormat::Png)
            .build(),
    );
    match tokio::time::timeout(Duration::from_secs(10), shot).await {
        Ok(Ok(png)) => Some(png),
        _ => None,
    }
}

/// Writes a failure screenshot to `data_dir/screenshots/<account>-<millis>.png`.
pub(crate) async fn write_screenshot(
    data_dir: &std::path::Path,
    account_id: &str,
    png: &[u8],
) -> Option<PathBuf> {
    let dir = data_dir.join("screenshots");
    let safe: String = account_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = dir.join(format!("{safe}-{millis}.png"));
    let written = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&path, png).await
    };
    match written.await {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "could not save a failure screenshot");
            None
        }
    }
}
