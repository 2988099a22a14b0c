//! The browser layer: a headless Chromium (through chromiumoxide) that logs in to a chat site
//! the way a person would and harvests the session its own front end uses.
//!
//! - [`BrowserPool`] owns at most one Chromium process, launched lazily, and one browser
//!   context per account (cookies and storage never leak between accounts).
//! - `login` classifies each page generically (login form, landing page, two-step, captcha,
//!   chat) and acts on it, with `login::captcha` (solver hook, human handoff) and
//!   `login::assist` (the optional vision assist); `harvest` turns the logged-in page into a
//!   [`SessionData`].
//! - Layers, each using only those below it: `js` (the page scripts, `js/*.js`) and `page`
//!   (CDP on one page) at the bottom; `process` (one Chromium), `recorder`, `harvest`,
//!   `chatbox`; `login`; `pool`; the tiers `inpage` and `ui` on top.
//! - `recorder` captures a page's network traffic (headers with cookies, complete streamed
//!   bodies, frames) into the crate's neutral `recording` types; [`BrowserPool::chat_page`]
//!   opens an account's chat page for `learn::probe`, which drives it with `chatbox`.
//! - The fallback tiers run a flow through the account's logged-in page when direct replay is
//!   refused: `inpage` (tier 2, [`in_page_tier`]) makes the flow's calls with `fetch()`
//!   inside the page, `ui` (tier 3, [`ui_tier`]) types the prompt into the site's own chat
//!   box. Both ask the pool for the account's work page and read the reply from the
//!   recorder's live feed as it streams. The pool opens pages and logs in; it runs neither
//!   the tiers nor the probe.
//!
//! Invariants:
//! - Nothing this module returns or logs carries a password, a cookie value or a token: error
//!   messages name fields, stages and the site's own error text only, URLs are shown without
//!   query or fragment, typed text is never logged. chromiumoxide itself logs every CDP message
//!   at trace level, so whoever installs the tracing subscriber must add
//!   [`LOG_FILTER_DIRECTIVES`].
//! - Synchronisation is by conditions polled with deadlines, never by fixed sleeps.
//! - A dead browser (CDP connection gone or process exited) is noticed by the task that drains
//!   its handler and replaced on next use; a login it interrupted is retried once.
//!
//! [`SessionData`]: crate::session::SessionData

pub mod attach;
pub(crate) mod chatbox;
pub mod guard;
mod harvest;
mod inpage;
mod js;
mod login;
mod page;
mod pool;
mod process;
pub mod recorder;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
mod ui;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use inpage::in_page_tier;
pub use pool::{BrowserPool, ChatPage, PageRequest};
pub use recorder::{Recorder, RecorderEvent};
pub use ui::ui_tier;

pub(crate) use page::{
    cdp_error, evaluate_string, insert_text, is_connection, press_key, read_storage,
};

use crate::replay::failure::{Call, FailureKind, ReplayError};
use crate::session::SessionData;

/// Tracing filter directives to append to the subscriber's filter (e.g. to `RUST_LOG`'s
/// value). chromiumoxide logs every CDP message it sends (`Input.insertText` carries the typed
/// password) and receives (cookie values, storage) at trace level, and warns on every dropped
/// `Network.requestWillBeSentExtraInfo` (see CHROMIUM.md); tungstenite logs whole frames.
pub const LOG_FILTER_DIRECTIVES: &str =
    "chromiumoxide=warn,chromiumoxide::handler=error,tungstenite=warn,async_tungstenite=warn";

/// One request for a browser tier ([`BrowserPool::inpage`], [`BrowserPool::ui`]).
#[derive(Clone)]
pub struct TierRequest {
    pub account_id: String,
    /// The account's URL: relative flow URLs resolve against it, and it is the chat page
    /// opened when the account has no context in this pool yet.
    pub account_url: String,
    /// Injected into a new context (cookies, then local and session storage), as a probe does.
    /// The in-page tier renders session references from the live page's storage and cookies,
    /// this session filling in what the page lacks.
    pub session: Option<SessionData>,
    /// Used if the page turns out to need a login.
    pub login: Option<LoginRequest>,
    pub flow: Arc<crate::flow::Flow>,
    /// The origins the flow's calls may reach with this account's session.
    pub pins: crate::pinning::Pins,
    pub prompt: crate::replay::render::Prompt,
    /// Tier 2: values an earlier exchange of the site conversation produced (its preflights
    /// are then skipped), as tier 1 gets them.
    pub conversation: std::collections::BTreeMap<String, String>,
    /// Tier 2: the stored session's id and the session-wide preflight values kept under it
    /// (shared with tier 1, see `replay::reuse`).
    pub session_id: Option<String>,
    pub reused: Option<Arc<crate::replay::reuse::Reused>>,
    /// Tier 2: the files sessions uploaded (shared with tier 1, see `replay::uploads`).
    pub uploads: Option<Arc<crate::replay::uploads::Uploaded>>,
    /// Until the chat call's response starts; also the longest silence within the reply.
    pub timeout: Duration,
}

impl std::fmt::Debug for TierRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierRequest")
            .field("account_id", &self.account_id)
            .field("account_url", &redact_url(&self.account_url))
            .field("has_session", &self.session.is_some())
            .field("login", &self.login)
            .field("flow", &self.flow.id)
            .field("continuing", &!self.conversation.is_empty())
            .field("reusing", &self.reused.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How the browser layer runs.
#[derive(Debug, Clone)]
pub struct BrowserConfig {
    /// The Chromium executable.
    pub chrome: PathBuf,
    /// Failure screenshots go to `data_dir/screenshots/`.
    pub data_dir: PathBuf,
    /// At most this many account contexts at once.
    pub max_contexts: usize,
    /// An account context unused this long is closed.
    pub idle_timeout: Duration,
    /// A tier 2/3 work page unused this long is closed (its context, and so the login, stays).
    pub page_idle_timeout: Duration,
    /// How credentials are typed.
    pub typing: TypingMode,
    /// Budget of one login attempt (time spent waiting for a human on a captcha excluded).
    pub login_timeout: Duration,
    /// Captcha solver hook and human wait.
    pub captcha: CaptchaConfig,
    /// Page-understanding assist (a vision model); off when `None`.
    pub assist: Option<AssistConfig>,
    /// Run Chromium without a window.
    pub headless: bool,
    /// Upper bound of a harvested session's lifetime (`LoginOutcome::expires_at`).
    pub max_session: Duration,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        Self {
            chrome: PathBuf::from("/usr/bin/chromium"),
            data_dir: PathBuf::from("./data"),
            max_contexts: 8,
            idle_timeout: Duration::from_secs(600),
            page_idle_timeout: Duration::from_secs(60),
            typing: TypingMode::Paste,
            login_timeout: Duration::from_secs(60),
            captcha: CaptchaConfig::default(),
            assist: None,
            headless: true,
            max_session: Duration::from_secs(24 * 3600),
        }
    }
}

/// How text goes into a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypingMode {
    /// One `Input.insertText`: what a paste looks like; any Unicode.
    Paste,
    /// Key events per character (US keyboard); falls back to `Paste` for other characters.
    Fast,
    /// One `Input.insertText` per character with a random delay in `[min_ms, max_ms]`.
    Human { min_ms: u64, max_ms: u64 },
}

/// What happens when a page shows a captcha.
#[derive(Debug, Clone)]
pub struct CaptchaConfig {
    /// Shell command run with `{"url","kind","screenshot_png_base64"}` on stdin; prints
    /// `{"actions":[{"click":{"x":..,"y":..}},{"type":"text"},{"key":"Enter"}]}`.
    pub solver_command: Option<String>,
    /// URL that takes the same JSON by POST and answers the same way.
    pub solver_url: Option<String>,
    /// How long a live session waits for a human to solve the challenge.
    pub human_timeout: Duration,
}

impl Default for CaptchaConfig {
    fn default() -> Self {
        Self {
            solver_command: None,
            solver_url: None,
            human_timeout: Duration::from_secs(300),
        }
    }
}

/// An OpenAI-compatible vision endpoint that helps on pages the heuristics do not understand.
#[derive(Clone)]
pub struct AssistConfig {
    /// Base URL; `/chat/completions` is appended.
    pub url: String,
    pub api_key: String,
    pub model: String,
}

impl std::fmt::Debug for AssistConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssistConfig")
            .field("url", &self.url)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// One login to perform.
#[derive(Clone)]
pub struct LoginRequest {
    pub account_id: String,
    pub url: String,
    pub email: Option<String>,
    pub password: Option<String>,
    /// Proxy server for this account's browser context (`scheme://host:port`).
    pub proxy: Option<String>,
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("account_id", &self.account_id)
            .field("url", &self.url)
            .field("has_email", &self.email.is_some())
            .field("has_password", &self.password.is_some())
            .field("proxy", &self.proxy.is_some())
            .finish()
    }
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Cookies (HttpOnly included) that apply to the chat page's host, the chat origin's
    /// local and session storage, and the user agent.
    pub session: SessionData,
    /// Unix seconds: the latest cookie expiry, capped at now + `max_session`.
    pub expires_at: Option<i64>,
    /// The kinds of page seen on the way, in order, without immediate repeats.
    pub page_kinds: Vec<PageKind>,
    /// URL of the chat page reached.
    pub chat_url: String,
    /// From the call to `login` to the harvested chat page (browser launch included).
    pub elapsed: Duration,
}

/// What a page is, as far as logging in goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    LoginForm,
    LandingPage,
    TwoStep,
    ChatInterface,
    Captcha,
    Error,
}

impl PageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PageKind::LoginForm => "login_form",
            PageKind::LandingPage => "landing_page",
            PageKind::TwoStep => "two_step",
            PageKind::ChatInterface => "chat_interface",
            PageKind::Captcha => "captcha",
            PageKind::Error => "error",
        }
    }
}

impl std::fmt::Display for PageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a login failed. Messages are for the user and never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the site refused the credentials: {site_message}")]
    WrongCredentials {
        site_message: String,
        screenshot: Option<PathBuf>,
    },
    #[error("could not find the {what} on the page")]
    FieldNotFound {
        what: String,
        screenshot: Option<PathBuf>,
    },
    #[error("captcha: {reason}")]
    Captcha {
        reason: String,
        screenshot: Option<PathBuf>,
    },
    #[error("login timed out {stage}")]
    Timeout {
        stage: String,
        screenshot: Option<PathBuf>,
    },
    #[error("could not tell what the page at {url} is (no login form, login button or chat box)")]
    Unclassified {
        url: String,
        screenshot: Option<PathBuf>,
    },
    #[error("could not open {url}: {reason}")]
    Navigation { url: String, reason: String },
    #[error("could not start Chromium: {0}")]
    Launch(String),
    #[error("Chromium crashed during the login: {0}")]
    Crashed(String),
    #[error("browser protocol error: {0}")]
    Cdp(String),
    #[error("no live browser session `{0}`")]
    NoSuchLiveSession(String),
    #[error("the login was cancelled: live session `{0}` was closed")]
    Cancelled(String),
    #[error("the site asks for credentials but the account has no email or password")]
    NoCredentials,
}

impl LoginError {
    /// The failure screenshot saved for this error, if any.
    pub fn screenshot(&self) -> Option<&std::path::Path> {
        match self {
            LoginError::WrongCredentials { screenshot, .. }
            | LoginError::FieldNotFound { screenshot, .. }
            | LoginError::Captcha { screenshot, .. }
            | LoginError::Timeout { screenshot, .. }
            | LoginError::Unclassified { screenshot, .. } => screenshot.as_deref(),
            _ => None,
        }
    }
}

/// Why an account's chat page could not be opened or driven (by a probe or by tier 3).
/// Messages are for the user and never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("could not find the chat input on {url}")]
    NoComposer {
        url: String,
        screenshot: Option<PathBuf>,
    },
    #[error("the message was typed and sent, but the page made no request carrying it")]
    NotSent { screenshot: Option<PathBuf> },
    #[error("the site answered the message with HTTP {status}")]
    Rejected {
        status: u16,
        screenshot: Option<PathBuf>,
    },
    #[error("the page's chat request failed: {reason}")]
    CallFailed {
        reason: String,
        screenshot: Option<PathBuf>,
    },
    #[error("timed out {stage}")]
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
    #[error("no chat page to open: give a chat URL or a login")]
    NoChatUrl,
    #[error("could not restore the saved session: {0}")]
    Session(String),
    #[error("logging in on the way to the chat page failed: {0}")]
    Login(#[source] LoginError),
    #[error("could not open {url}: {reason}")]
    Navigation { url: String, reason: String },
    #[error("could not start Chromium: {0}")]
    Launch(String),
    #[error("Chromium crashed: {0}")]
    Crashed(String),
    #[error("browser protocol error: {0}")]
    Cdp(String),
}

impl PageError {
    /// The failure screenshot saved for this error, if any.
    pub fn screenshot(&self) -> Option<&std::path::Path> {
        match self {
            PageError::NoComposer { screenshot, .. }
            | PageError::NotSent { screenshot }
            | PageError::Rejected { screenshot, .. }
            | PageError::CallFailed { screenshot, .. }
            | PageError::Timeout { screenshot, .. }
            | PageError::NotLoggedIn { screenshot, .. } => screenshot.as_deref(),
            PageError::Login(e) => e.screenshot(),
            _ => None,
        }
    }

    /// Whether a screenshot of the page would explain this error.
    pub fn wants_screenshot(&self) -> bool {
        matches!(
            self,
            PageError::NoComposer { .. }
                | PageError::NotSent { .. }
                | PageError::Rejected { .. }
                | PageError::CallFailed { .. }
                | PageError::Timeout { .. }
                | PageError::NotLoggedIn { .. }
        )
    }

    pub fn set_screenshot(&mut self, path: Option<PathBuf>) {
        match self {
            PageError::NoComposer { screenshot, .. }
            | PageError::NotSent { screenshot }
            | PageError::Rejected { screenshot, .. }
            | PageError::CallFailed { screenshot, .. }
            | PageError::Timeout { screenshot, .. }
            | PageError::NotLoggedIn { screenshot, .. } => *screenshot = path,
            _ => {}
        }
    }

    /// Whether the browser itself may have died (the pool then checks, and relaunches).
    pub fn is_crash_like(&self) -> bool {
        matches!(
            self,
            PageError::Crashed(_)
                | PageError::Cdp(_)
                | PageError::Login(LoginError::Crashed(_) | LoginError::Cdp(_))
        )
    }

    pub(crate) fn from_cdp(e: chromiumoxide::error::CdpError) -> PageError {
        PageError::from(cdp_error(e))
    }
}

impl From<LoginError> for PageError {
    /// Browser-level failures (launch, crash, protocol, navigation) outside a login.
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Launch(m) => PageError::Launch(m),
            LoginError::Crashed(m) => PageError::Crashed(m),
            LoginError::Cdp(m) => PageError::Cdp(m),
            LoginError::Navigation { url, reason } => PageError::Navigation { url, reason },
            LoginError::Timeout { stage, screenshot } => PageError::Timeout { stage, screenshot },
            other => PageError::Cdp(other.to_string()),
        }
    }
}

/// A browser page a human may look at and drive: a login in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub id: String,
    pub account_id: String,
    /// The page's URL without query or fragment.
    pub url: String,
    /// `logging_in` or `waiting_for_human`.
    pub state: String,
    /// Unix seconds when the session started.
    pub since: i64,
}

/// What a login failure means for the gateway.
fn login_kind(e: &LoginError) -> FailureKind {
    match e {
        LoginError::WrongCredentials { .. } | LoginError::NoCredentials => FailureKind::Auth,
        LoginError::Captcha { .. } => FailureKind::AntiBot,
        LoginError::FieldNotFound { .. } | LoginError::Unclassified { .. } => {
            FailureKind::FormatDrift
        }
        _ => FailureKind::Network,
    }
}

/// A browser-level failure of a browser tier, as the replay error the gateway classifies.
impl From<LoginError> for ReplayError {
    fn from(e: LoginError) -> Self {
        ReplayError::Unexpected {
            call: Call::Chat,
            kind: login_kind(&e),
            message: format!("browser: {e}"),
        }
    }
}

/// A page-level failure of a browser tier, as the replay error the gateway classifies.
impl From<PageError> for ReplayError {
    fn from(e: PageError) -> Self {
        let kind = match &e {
            PageError::Login(login) => login_kind(login),
            PageError::NotLoggedIn { .. } | PageError::Session(_) => FailureKind::Auth,
            PageError::NoComposer { .. } | PageError::NotSent { .. } => FailureKind::FormatDrift,
            _ => FailureKind::Network,
        };
        ReplayError::Unexpected {
            call: Call::Chat,
            kind,
            message: format!("browser: {e}"),
        }
    }
}

/// A std mutex guard that survives a poisoned lock: the data the browser layer keeps under
/// std mutexes (maps, strings) stays consistent even if a holder panicked.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `url` without query string or fragment: those may carry tokens (OAuth codes, magic links).
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_owned(),
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
