//! Attaching files through a chat page's own file input, as a person choosing files in the
//! page's file dialog would: CDP's `DOM.setFileInputFiles` on the page's
//! `<input type="file">` fires its `change` event, and the page's script does the rest.
//! Shared by the probe (which attaches a generated file to learn the upload) and tier 3.

use std::path::Path;
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::dom::SetFileInputFilesParams;
use serde::Deserialize;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

use super::{PageError, RecorderEvent};

/// How long the page may take to start uploading once a file is chosen.
const START_WAIT: Duration = Duration::from_secs(2);
/// How long the uploads may take in all.
const UPLOAD_WAIT: Duration = Duration::from_secs(30);
/// Quiet after the last upload call finished before the message is typed.
const SETTLE: Duration = Duration::from_millis(300);

/// What the page's file input is.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FileInput {
    pub found: bool,
    /// Its `accept` attribute (empty: any type).
    #[serde(default)]
    pub accept: String,
    #[serde(default)]
    pub multiple: bool,
}

/// The file input that belongs to the composer remembered under `window[KEY]` (by
/// `chatbox::FIND_COMPOSER`): the one sharing the deepest container with it, below `<body>`
/// (hidden inputs included: sites hide theirs behind an attach button). An input elsewhere on
/// the page (an avatar, an import) is never chosen. It is marked for [`choose_files`].
const FIND_INPUT: &str = r#"((key) => {
  const composer = window[key] && window[key].input;
  if (!composer) return JSON.stringify({ found: false });
  const depth = (el) => { let d = 0; for (let e = el; e; e = e.parentElement) d++; return d; };
  let best = null, bestDepth = 0;
  for (const input of document.querySelectorAll('input[type=file]')) {
    input.removeAttribute('data-ct-attach');
    let shared = input.parentElement;
    while (shared && !shared.contains(composer)) shared = shared.parentElement;
    if (!shared || shared === document.body || shared === document.documentElement) continue;
    if (depth(shared) > bestDepth) { best = input; bestDepth = depth(shared); }
  }
  if (!best) return JSON.stringify({ found: false });
  best.setAttribute('data-ct-attach', '');
  return JSON.stringify({
    found: true,
    accept: best.getAttribute('accept') || '',
    multiple: best.multiple,
  });
})(KEY_JSON)"#;

/// The composer's file input (see [`FIND_INPUT`]), if it has one; `key` is where
/// `chatbox::FIND_COMPOSER` remembered the composer.
pub async fn find_file_input(page: &Page, key: &str) -> Result<FileInput, PageError> {
    let key = serde_json::to_string(key).unwrap_or_default();
    let text = super::evaluate_string(page, &FIND_INPUT.replace("KEY_JSON", &key))
        .await
        .map_err(PageError::from_cdp)?;
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

/// Chooses `files` (paths on this machine, where Chromium runs) in the page's file input.
pub async fn choose_files(page: &Page, files: &[&Path]) -> Result<(), PageError> {
    let input = page
        .find_element("input[type=file][data-ct-attach]")
        .await
        .map_err(PageError::from_cdp)?;
    let params = SetFileInputFilesParams::builder()
        .files(files.iter().map(|p| p.display().to_string()))
        .backend_node_id(input.backend_node_id)
        .build()
        .map_err(|e| PageError::Crashed(format!("cannot attach the file: {e}")))?;
    page.execute(params).await.map_err(PageError::from_cdp)?;
    Ok(())
}

/// Waits for the calls the page makes once a file is chosen to finish: returns when none
/// started within [`START_WAIT`] (the site uploads on send, or not at all), or when every
/// one started has finished and [`SETTLE`] passed quietly, or after [`UPLOAD_WAIT`].
/// Returns how many calls were seen.
pub async fn await_uploads(feed: &mut Receiver<RecorderEvent>) -> usize {
    let started = Instant::now();
    let mut in_flight: Vec<String> = Vec::new();
    let mut seen = 0;
    let mut quiet_since = Instant::now();
    loop {
        let now = Instant::now();
        let deadline = if seen == 0 {
            started + START_WAIT
        } else if in_flight.is_empty() {
            quiet_since + SETTLE
        } else {
            started + UPLOAD_WAIT
        };
        let deadline = deadline.min(started + UPLOAD_WAIT);
        if now >= deadline {
            return seen;
        }
        let event = match tokio::time::timeout_at(deadline, feed.recv()).await {
            Ok(Some(event)) => event,
            // The recorder stopped: nothing more will be seen.
            Ok(None) => return seen,
            Err(_) => continue,
        };
        match event {
            RecorderEvent::Request { id, .. } => {
                seen += 1;
                in_flight.push(id);
            }
            RecorderEvent::Finished { id } | RecorderEvent::Failed { id, .. } => {
                in_flight.retain(|i| *i != id);
                if in_flight.is_empty() {
                    quiet_since = Instant::now();
                }
            }
            _ => {}
        }
    }
}
