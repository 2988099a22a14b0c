//! One launched Chromium: its flags, the launch (through `guard`, with a fresh user-data dir),
//! the task that drains its CDP handler and notices its death (connection gone or process
//! exited), disposal, and replies that fail as soon as it dies.
//!
//! Invariants:
//! - A browser is declared dead once, by its drain task; `retired` marks one closed on
//!   purpose, whose death is not a crash.
//! - chromiumoxide's unparsable messages (request headers with `cookie`, see CHROMIUM.md)
//!   reach the recorders through `taps` and are never logged.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::browser::Browser;
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::viewport::Viewport;
use futures_util::StreamExt;
use tokio::sync::{RwLock, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::recorder::RawTaps;
use super::{BrowserConfig, LoginError, guard, lock, page};
use crate::replay::DeltaStream;
use crate::replay::failure::{Call, ReplayError};
use crate::replay::plan::Started;

/// Browser-wide flags (CHROMIUM.md): chromiumoxide's defaults minus `--enable-automation`,
/// plus what keeps Chromium from calling outside hosts.
const CHROME_ARGS: &[&str] = &[
    "disable-background-networking",
    "disable-background-timer-throttling",
    "disable-backgrounding-occluded-windows",
    "disable-breakpad",
    "disable-client-side-phishing-detection",
    "disable-component-extensions-with-background-pages",
    "disable-component-update",
    "disable-default-apps",
    "disable-dev-shm-usage",
    "disable-gpu",
    "disable-quic",
    "disable-hang-monitor",
    "disable-ipc-flooding-protection",
    "disable-popup-blocking",
    "disable-prompt-on-repost",
    "disable-renderer-backgrounding",
    "disable-sync",
    "disable-domain-reliability",
    "metrics-recording-only",
    "no-first-run",
    "no-default-browser-check",
    "use-mock-keychain",
];

pub(crate) const VIEWPORT: (u32, u32) = (1280, 800);
/// Budget of one CDP command; a hung command fails after this instead of chromiumoxide's 30 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the drain task checks that the Chromium process still exists.
const PROCESS_CHECK: Duration = Duration::from_millis(250);

/// One launched Chromium.
pub(crate) struct Running {
    pub(crate) browser: RwLock<Browser>,
    pub(crate) generation: u64,
    pub(crate) pid: Option<u32>,
    pub(crate) user_data_dir: PathBuf,
    pub(crate) user_agent: String,
    pub(crate) major_version: String,
    pub(crate) dead: watch::Receiver<bool>,
    /// Routes messages chromiumoxide cannot parse (request headers with `cookie`) to recorders.
    pub(crate) taps: Arc<RawTaps>,
    /// Set when the pool closes this browser on purpose: a login it interrupts is not retried
    /// and the drain task does not report a crash.
    pub(crate) retired: Arc<AtomicBool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Running {
    pub(crate) fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// `is_dead`, plus a look at the process itself: the drain task notices an exit within
    /// [`PROCESS_CHECK`], but a launch decision should not use a browser that just died.
    pub(crate) fn is_gone(&self) -> bool {
        self.is_dead() || self.pid.is_some_and(|pid| !process_alive(pid))
    }

    /// After a failure (`crash_like`: one that looks like the browser's), whether this browser
    /// died: not closed on purpose, and dead now or within a second.
    pub(crate) async fn crashed(&self, crash_like: bool) -> bool {
        (crash_like || self.is_dead())
            && !self.retired.load(Ordering::SeqCst)
            && (self.is_dead() || self.became_dead(Duration::from_secs(1)).await)
    }

    /// Waits up to `limit` for the drain task to declare this browser dead.
    pub(crate) async fn became_dead(&self, limit: Duration) -> bool {
        let mut dead = self.dead.clone();
        tokio::time::timeout(limit, dead.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(crate) async fn execute<T: chromiumoxide::types::Command>(
        &self,
        cmd: T,
    ) -> Result<T::Response, CdpError> {
        let browser = self.browser.read().await;
        Ok(browser.execute(cmd).await?.result)
    }

    /// Ends the process: `close` + `wait` when `graceful`, else (or when that fails) kill +
    /// wait; then removes the user-data dir (in the background when not `graceful`).
    pub(crate) async fn dispose(&self, graceful: bool) {
        {
            let mut browser = self.browser.write().await;
            let mut closed = false;
            if graceful && !self.is_dead() {
                let close = async {
                    browser.close().await.ok()?;
                    browser.wait().await.ok()
                };
                closed = tokio::time::timeout(Duration::from_secs(5), close)
                    .await
                    .ok()
                    .flatten()
                    .is_some();
            }
            if !closed {
                let exited = matches!(browser.try_wait(), Ok(Some(_)));
                if !exited {
                    let _ = browser.kill().await;
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), browser.wait()).await;
            }
        }
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        if graceful {
            remove_user_data_dir(&self.user_data_dir).await;
        } else {
            // After a crash the helpers take a moment to die; the relaunch need not wait for
            // their directory to go. Not awaited on purpose: it ends within 3 s by itself.
            let dir = self.user_data_dir.clone();
            tokio::spawn(async move { remove_user_data_dir(&dir).await });
        }
    }
}

/// Removes a user-data dir. After a crash, Chromium's helper processes outlive the main one
/// for a moment and keep writing there, so removal is retried until it succeeds or 3 s pass.
async fn remove_user_data_dir(dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                tracing::debug!(error = %e, dir = %dir.display(), "could not remove a Chromium user-data dir");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Launches Chromium with a fresh user-data dir and starts draining its handler.
pub(crate) async fn launch(
    config: &BrowserConfig,
    generation: u64,
) -> Result<Arc<Running>, LoginError> {
    let user_data_dir = std::env::temp_dir().join(format!(
        "computetower-chromium-{}",
        uuid::Uuid::new_v4().simple()
    ));
    tokio::fs::create_dir_all(&user_data_dir)
        .await
        .map_err(|e| {
            LoginError::Launch(format!("cannot create {}: {e}", user_data_dir.display()))
        })?;
    let mut builder = chromiumoxide::BrowserConfig::builder();
    builder = match guard::launcher(&config.chrome) {
        Some((launcher, (key, value))) => builder.chrome_executable(launcher).env(key, value),
        None => builder.chrome_executable(&config.chrome),
    };
    builder = builder
        .user_data_dir(&user_data_dir)
        .disable_default_args()
        .args(CHROME_ARGS.iter().copied())
        .arg(("disable-blink-features", "AutomationControlled"))
        .arg(("disable-features", "TranslateUI"))
        .arg(("password-store", "basic"))
        .arg(("lang", "en-US"))
        .no_sandbox()
        // `requestWillBeSentExtraInfo` does not parse (CHROMIUM.md): surfaced as raw JSON,
        // the drain task hands it to the recorders.
        .surface_invalid_messages()
        .respect_https_errors()
        .request_timeout(REQUEST_TIMEOUT)
        .launch_timeout(Duration::from_secs(20))
        .window_size(VIEWPORT.0, VIEWPORT.1)
        .viewport(Viewport {
            width: VIEWPORT.0,
            height: VIEWPORT.1,
            ..Viewport::default()
        });
    if !config.headless {
        builder = builder.with_head();
    }
    let chrome_config = builder.build().map_err(LoginError::Launch)?;
    let started = std::time::Instant::now();
    let (mut browser, handler) = match Browser::launch(chrome_config).await {
        Ok(launched) => launched,
        Err(e) => {
            remove_user_data_dir(&user_data_dir).await;
            return Err(LoginError::Launch(format!(
                "{} did not start: {e}",
                config.chrome.display()
            )));
        }
    };
    let pid = browser
        .get_mut_child()
        .and_then(|child| child.as_mut_inner().id());
    let (dead_tx, dead_rx) = watch::channel(false);
    let retired = Arc::new(AtomicBool::new(false));
    let taps = Arc::new(RawTaps::default());
    let drain = tokio::spawn(drain_handler(
        handler,
        dead_tx,
        pid,
        retired.clone(),
        taps.clone(),
    ));
    let version = match browser.user_agent().await {
        Ok(ua) => ua,
        Err(e) => {
            let _ = browser.kill().await;
            let _ = browser.wait().await;
            drain.abort();
            remove_user_data_dir(&user_data_dir).await;
            return Err(LoginError::Launch(format!("Chromium did not answer: {e}")));
        }
    };
    let user_agent = version.replace("HeadlessChrome", "Chrome");
    let major_version = user_agent
        .split("Chrome/")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .unwrap_or("0")
        .to_owned();
    tracing::info!(
        pid,
        generation,
        launch_ms = started.elapsed().as_millis() as u64,
        "Chromium launched"
    );
    Ok(Arc::new(Running {
        browser: RwLock::new(browser),
        generation,
        pid,
        user_data_dir,
        user_agent,
        major_version,
        dead: dead_rx,
        taps,
        retired,
        tasks: Mutex::new(vec![drain]),
    }))
}

/// Drives the CDP handler for the browser's life and detects its death. `Err` items do not
/// end the loop unless they mean the connection is gone (an unparsable event — see the
/// `requestWillBeSentExtraInfo` defect in CHROMIUM.md — is not).
async fn drain_handler(
    mut handler: chromiumoxide::Handler,
    dead: watch::Sender<bool>,
    pid: Option<u32>,
    retired: Arc<AtomicBool>,
    taps: Arc<RawTaps>,
) {
    let mut check = tokio::time::interval(PROCESS_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            item = handler.next() => match item {
                None => break "the CDP connection closed",
                Some(Ok(())) => {}
                // Not logged: the raw message carries cookies.
                Some(Err(CdpError::InvalidMessage(raw, _))) => taps.dispatch(&raw),
                Some(Err(e)) if page::is_connection(&e) => {
                    tracing::debug!(error = %e, "CDP connection error");
                    break "the CDP connection failed";
                }
                Some(Err(e)) => tracing::trace!(error = %e, "ignored CDP handler error"),
            },
            _ = check.tick() => {
                if pid.is_some_and(|pid| !process_alive(pid)) {
                    break "the Chromium process exited";
                }
            }
        }
    };
    if retired.load(Ordering::SeqCst) {
        tracing::debug!(pid, "Chromium closed: {reason}");
    } else {
        tracing::warn!(pid, "Chromium is dead: {reason}");
    }
    dead.send_replace(true);
    // Dropping the handler fails every command still waiting for an answer right away.
    drop(handler);
}

/// A browser tier's start and reply that fail as soon as `running` is known dead, instead of
/// waiting out their timeouts. The error is a network failure, so before the first token the
/// gateway retries it (on a relaunched browser); after it, the client sees an error event.
pub(crate) async fn dies_with(
    running: &Running,
    start: impl std::future::Future<Output = Result<Started, ReplayError>>,
) -> Result<Started, ReplayError> {
    let mut dead = running.dead.clone();
    let started = tokio::select! {
        result = start => result?,
        _ = dead.wait_for(|d| *d) => return Err(browser_died()),
    };
    let died = Box::pin(async move {
        // An error means the sender is gone, which only happens once the browser is.
        let _ = dead.wait_for(|d| *d).await;
    });
    Ok(Started {
        deltas: Box::pin(DiesWith {
            inner: Some(started.deltas),
            died,
        }),
        extracted: started.extracted,
    })
}

fn browser_died() -> ReplayError {
    ReplayError::Browser {
        call: Call::Chat,
        message: "the browser died during the reply".into(),
    }
}

/// See [`dies_with`].
struct DiesWith {
    inner: Option<DeltaStream>,
    died: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl futures_util::Stream for DiesWith {
    type Item = Result<crate::replay::decode::Delta, ReplayError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // The reply first: what the browser sent before it died still goes out.
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                self.inner = None;
                return Poll::Ready(None);
            }
            Poll::Ready(item) => return Poll::Ready(item),
            Poll::Pending => {}
        }
        if self.died.as_mut().poll(cx).is_ready() {
            self.inner = None;
            return Poll::Ready(Some(Err(browser_died())));
        }
        Poll::Pending
    }
}

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
fn process_alive(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => false,
    }
}
