//! Page classification and the login loop.
//!
//! One `Runtime.evaluate` of `js/login/summary.js` turns the page into a [`PageSummary`] (visible
//! inputs, buttons and links, iframes, headings, error-looking texts, each element with a
//! unique CSS selector); everything else is decided in Rust by [`classify`] and [`targets`],
//! which are pure and know no site.
//!
//! Invariants:
//! - The summary holds no field values (only whether a field is filled), so it may be sent
//!   to the assist endpoint; typed text is never logged.
//! - After every action the loop waits for a condition (new document, URL, classification,
//!   error text or form structure changed) with a deadline, then classifies again.
//! - Errors raised while the page is alive carry a failure screenshot.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::browser::BrowserContextId;
use chromiumoxide::cdp::browser_protocol::page::NavigateParams;
use chromiumoxide::error::CdpError;
use rand::Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::page::{
    POLL, cdp_error, check_visible, evaluate_string, insert_text, is_connection, is_transient,
    page_screenshot, press_key, write_screenshot,
};
use super::process::Running;
use super::{
    BrowserConfig, LiveSession, LoginError, LoginOutcome, LoginRequest, PageKind, TypingMode,
    harvest, js, lock, redact_url,
};

mod assist;
mod captcha;
/// How long a page may take to react to one action (a click, a submit).
const ACTION_WAIT: Duration = Duration::from_secs(20);
/// How long an unrecognised page may take to turn into something recognisable (SPAs render
/// late; intermediate redirect pages pass).
const SETTLE_WAIT: Duration = Duration::from_secs(5);
/// How long a chat page showing an error-looking text is watched before it counts anyway.
const CHAT_ERROR_GRACE: Duration = Duration::from_secs(2);
/// Submits of the same step before giving up on a page that keeps coming back unchanged.
const MAX_SUBMITS: u32 = 3;
/// Calls to the assist endpoint per login.
const MAX_ASSIST_CALLS: u32 = 2;

/// What the page shows, as far as logging in goes. No field values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct PageSummary {
    pub url: String,
    pub title: String,
    /// `performance.timeOrigin`: differs for every new document, so it tells a navigation
    /// (even to the same URL, as after a form POST) from an in-page change.
    pub doc: f64,
    pub ready: String,
    pub inputs: Vec<InputInfo>,
    pub buttons: Vec<ButtonInfo>,
    pub iframes: Vec<FrameInfo>,
    pub headings: Vec<String>,
    pub errors: Vec<String>,
    pub markers: Vec<String>,
    pub captcha_solved: bool,
    pub text: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct InputInfo {
    /// The input's `type`, or `textarea`, `select`, `contenteditable`, `textbox`.
    pub kind: String,
    pub name: String,
    pub id: String,
    pub autocomplete: String,
    pub placeholder: String,
    pub label: String,
    pub aria: String,
    pub selector: String,
    /// Index among `document.forms`, -1 when outside any form.
    pub form: i64,
    pub in_password_form: bool,
    pub filled: bool,
    pub disabled: bool,
    /// Read-only fields (an email shown on a two-step password page) are not typed into.
    pub readonly: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ButtonInfo {
    pub tag: String,
    pub text: String,
    pub aria: String,
    pub selector: String,
    pub form: i64,
    /// A submit button of a form.
    pub submit: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct FrameInfo {
    /// Origin and path only (plus `size=` for reCAPTCHA): queries may carry tokens.
    pub src: String,
    pub visible: bool,
    pub selector: String,
}

static IDENTIFIER_RE: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?i)e-?mail|user|login|account|identifier|phone|handle").ok());
static COMPOSER_RE: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?i)message|ask|prompt|chat|type here|send|question").ok());
static LOGIN_CONTROL_RE: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?i)^(log ?in|login|sign ?in|signin)\b").ok());
static SUBMIT_RE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?i)^(sign ?in|log ?in|login|signin|continue|submit|next|enter|go)\b").ok()
});
static CAPTCHA_FRAME_RE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?i)google\.com/recaptcha|recaptcha\.net/recaptcha|hcaptcha\.com|challenges\.cloudflare\.com").ok()
});
static INTERSTITIAL_RE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)verify (that )?you('| a)re (a )?human|checking your browser|are you a robot|i'?m not a robot|confirm you('| a)re (a )?human|human verification|complete the security check|press (and|&) hold",
    )
    .ok()
});

fn matches(re: &LazyLock<Option<Regex>>, text: &str) -> bool {
    re.as_ref().is_some_and(|re| re.is_match(text))
}

fn normalise(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn is_password(input: &InputInfo) -> bool {
    input.kind == "password"
}

/// An email/username field: typed as such, or a plain text field named like one.
fn is_identifier(input: &InputInfo) -> bool {
    match input.kind.as_str() {
        "email" => true,
        "text" | "tel" | "" => {
            input.autocomplete.contains("username")
                || input.autocomplete.contains("email")
                || [
                    &input.name,
                    &input.id,
                    &input.placeholder,
                    &input.label,
                    &input.aria,
                ]
                .iter()
                .any(|s| matches(&IDENTIFIER_RE, s))
        }
        _ => false,
    }
}

/// A chat message box: a textarea or rich editor (or a text field labelled like one) that is
/// not part of a login form.
fn is_composer(input: &InputInfo) -> bool {
    if input.in_password_form {
        return false;
    }
    match input.kind.as_str() {
        "textarea" | "contenteditable" | "textbox" => true,
        "text" | "" => {
            !is_identifier(input)
                && [&input.placeholder, &input.label, &input.aria]
                    .iter()
                    .any(|s| matches(&COMPOSER_RE, s))
        }
        _ => false,
    }
}

fn button_label(button: &ButtonInfo) -> String {
    if button.text.is_empty() {
        normalise(&button.aria)
    } else {
        normalise(&button.text)
    }
}

/// Which captcha the page shows, if it shows one that is not solved yet.
pub(crate) fn captcha_kind(s: &PageSummary) -> Option<&'static str> {
    if s.captcha_solved {
        return None;
    }
    for frame in s.iframes.iter().filter(|f| f.visible) {
        // An invisible reCAPTCHA only shows a badge; it is no challenge to solve.
        if !matches(&CAPTCHA_FRAME_RE, &frame.src) || frame.src.contains("size=invisible") {
            continue;
        }
        let src = frame.src.to_ascii_lowercase();
        return Some(if src.contains("hcaptcha") {
            "hcaptcha"
        } else if src.contains("cloudflare") {
            "turnstile"
        } else {
            "recaptcha"
        });
    }
    let interstitial = matches(&INTERSTITIAL_RE, &s.text)
        || s.headings.iter().any(|h| matches(&INTERSTITIAL_RE, h))
        || !s.markers.is_empty();
    interstitial.then_some("interstitial")
}

/// Classifies a page generically, first match wins: `Captcha` (a visible challenge iframe
/// of reCAPTCHA / hCaptcha / Turnstile, interstitial text such as "verify you are human", or
/// an element whose role/aria-label mentions a challenge; unless a response token is filled),
/// `LoginForm` (a visible password field), `TwoStep` (an email/username field and a continue
/// button, no chat box), `ChatInterface` (a textarea / rich editor outside login forms),
/// `LandingPage` (a "log in" / "sign in" control), else `Error`.
pub(crate) fn classify(s: &PageSummary) -> PageKind {
    if captcha_kind(s).is_some() {
        return PageKind::Captcha;
    }
    let password = s.inputs.iter().any(is_password);
    if password {
        return PageKind::LoginForm;
    }
    let identifier = s.inputs.iter().any(is_identifier);
    let composer = s.inputs.iter().any(is_composer);
    let continue_button = s.buttons.iter().any(|b| {
        b.submit || {
            let label = button_label(b);
            matches(&SUBMIT_RE, &label) && !label.contains(" with ")
        }
    });
    if identifier && continue_button && !composer {
        return PageKind::TwoStep;
    }
    if composer {
        return PageKind::ChatInterface;
    }
    if login_control(s).is_some() {
        return PageKind::LandingPage;
    }
    PageKind::Error
}

/// The "log in" / "sign in" control of a landing page: exact labels first, then the
/// shortest ("Log in" over "Log in with Google"). "Sign up" never matches.
fn login_control(s: &PageSummary) -> Option<&ButtonInfo> {
    s.buttons
        .iter()
        .filter(|b| {
            matches(&LOGIN_CONTROL_RE, &normalise(&b.text))
                || matches(&LOGIN_CONTROL_RE, &normalise(&b.aria))
        })
        .min_by_key(|b| {
            let label = button_label(b);
            let exact = ["log in", "login", "sign in", "signin"].contains(&label.as_str());
            (!exact, label.contains(" with "), label.len())
        })
}

/// The submit control of the form `form` (or of the page when that form has none).
fn submit_control(s: &PageSummary, form: i64) -> Option<&ButtonInfo> {
    let labelled = |b: &&ButtonInfo| {
        let label = button_label(b);
        matches(&SUBMIT_RE, &label) && !label.contains(" with ")
    };
    let in_form = |b: &&ButtonInfo| form >= 0 && b.form == form;
    s.buttons
        .iter()
        .filter(in_form)
        .find(labelled)
        .or_else(|| s.buttons.iter().filter(in_form).find(|b| b.submit))
        .or_else(|| s.buttons.iter().find(labelled))
}

/// Selectors of the elements an action needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Targets {
    pub identifier: Option<String>,
    pub password: Option<String>,
    pub submit: Option<String>,
    pub login_control: Option<String>,
}

/// Finds the fields and controls on a page by the same generic rules as [`classify`].
pub(crate) fn targets(s: &PageSummary) -> Targets {
    let password = s
        .inputs
        .iter()
        .find(|i| is_password(i) && !i.autocomplete.contains("new-password"))
        .or_else(|| s.inputs.iter().find(|i| is_password(i)));
    let form = password.map(|p| p.form);
    // The identifier of a login form lives in the password's form; a two-step page has
    // only the identifier.
    let identifier = match form {
        Some(f) => s
            .inputs
            .iter()
            .filter(|i| !is_password(i) && (f < 0 || i.form == f))
            .find(|i| is_identifier(i))
            .or_else(|| {
                s.inputs.iter().find(|i| {
                    f >= 0 && i.form == f && matches!(i.kind.as_str(), "text" | "email" | "tel")
                })
            }),
        None => s.inputs.iter().find(|i| is_identifier(i)),
    };
    let form = form.or(identifier.map(|i| i.form)).unwrap_or(-1);
    Targets {
        identifier: identifier
            .filter(|i| !i.readonly && !i.disabled)
            .map(|i| i.selector.clone()),
        password: password.map(|p| p.selector.clone()),
        submit: submit_control(s, form).map(|b| b.selector.clone()),
        login_control: login_control(s).map(|b| b.selector.clone()),
    }
}

/// A hash of what an action can change on a page without navigating.
fn structure(s: &PageSummary) -> u64 {
    let mut hasher = DefaultHasher::new();
    for input in &s.inputs {
        input.selector.hash(&mut hasher);
        input.kind.hash(&mut hasher);
    }
    for button in &s.buttons {
        button.selector.hash(&mut hasher);
    }
    for frame in &s.iframes {
        frame.src.hash(&mut hasher);
        frame.visible.hash(&mut hasher);
    }
    s.errors.hash(&mut hasher);
    s.headings.hash(&mut hasher);
    hasher.finish()
}

/// Whether `after` differs from `before` in a way that means the page reacted.
fn changed(before: &PageSummary, after: &PageSummary) -> bool {
    after.doc != before.doc
        || after.url != before.url
        || classify(after) != classify(before)
        || after.captcha_solved != before.captcha_solved
        || structure(after) != structure(before)
}

/// A login in progress, visible to humans through the admin API (the pool keeps them by id).
pub(crate) struct LiveEntry {
    pub(crate) id: String,
    account_id: String,
    context_id: BrowserContextId,
    page: Page,
    url: Mutex<String>,
    state: Mutex<&'static str>,
    since: i64,
    cancelled: AtomicBool,
    /// The pool's change signal: a state change is news to whoever waits on the pool.
    changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl LiveEntry {
    pub(crate) fn new(
        account_id: &str,
        context_id: BrowserContextId,
        page: Page,
        url: &str,
        changes: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            account_id: account_id.to_owned(),
            context_id,
            page,
            url: Mutex::new(redact_url(url)),
            state: Mutex::new("logging_in"),
            since: super::unix_now(),
            cancelled: AtomicBool::new(false),
            changes,
        }
    }

    pub(crate) fn context_id(&self) -> &BrowserContextId {
        &self.context_id
    }

    pub(crate) fn page(&self) -> &Page {
        &self.page
    }

    pub(crate) fn set_url(&self, url: &str) {
        *lock(&self.url) = redact_url(url);
    }

    pub(crate) fn set_state(&self, state: &'static str) {
        *lock(&self.state) = state;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Makes the login fail with [`LoginError::Cancelled`] at its next check.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn view(&self) -> LiveSession {
        LiveSession {
            id: self.id.clone(),
            account_id: self.account_id.clone(),
            url: lock(&self.url).clone(),
            state: (*lock(&self.state)).to_owned(),
            since: self.since,
        }
    }
}

/// One login attempt on one page.
pub(crate) struct Attempt<'a> {
    pub config: &'a BrowserConfig,
    /// Told every classification (tests act at a precise point of a login with it).
    pub observe: &'a (dyn Fn(PageKind) + Send + Sync),
    pub running: &'a Running,
    pub page: &'a Page,
    pub live: &'a Arc<LiveEntry>,
    pub req: &'a LoginRequest,
    pub started: std::time::Instant,
    /// Pushed back by the time a human spends on a captcha.
    pub deadline: Instant,
    kinds: Vec<PageKind>,
    assist_calls: u32,
}

impl<'a> Attempt<'a> {
    pub(crate) fn new(
        config: &'a BrowserConfig,
        observe: &'a (dyn Fn(PageKind) + Send + Sync),
        running: &'a Running,
        page: &'a Page,
        live: &'a Arc<LiveEntry>,
        req: &'a LoginRequest,
        started: std::time::Instant,
    ) -> Self {
        Self {
            config,
            observe,
            running,
            page,
            live,
            req,
            started,
            deadline: Instant::now() + config.login_timeout,
            kinds: Vec::new(),
            assist_calls: 0,
        }
    }

    pub(crate) fn config(&self) -> &BrowserConfig {
        self.config
    }

    /// Logs in and harvests. The page is left open; the caller closes it.
    pub(crate) async fn run(&mut self) -> Result<LoginOutcome, LoginError> {
        self.navigate().await?;
        let first = self.current().await?;
        let mut summary = self.settle(first).await?;
        let mut submitted_form = 0u32;
        let mut submitted_identifier = 0u32;
        let mut clicked_login = 0u32;
        loop {
            self.check()?;
            if summary.ready == "loading" {
                summary = self.settle(summary).await?;
            }
            let kind = classify(&summary);
            self.record(kind, &summary);
            tracing::debug!(
                account = %self.req.account_id,
                kind = %kind,
                url = %redact_url(&summary.url),
                "login page classified"
            );
            summary = match kind {
                PageKind::ChatInterface => {
                    if !summary.errors.is_empty() {
                        // The chat page may show a transient banner; give it a moment.
                        let grace = Instant::now() + CHAT_ERROR_GRACE;
                        if let Some(next) = self.wait_change(&summary, grace).await? {
                            summary = next;
                            continue;
                        }
                    }
                    return self.finish().await;
                }
                PageKind::Captcha => {
                    captcha::resolve(self, &summary).await?;
                    self.current().await?
                }
                PageKind::LoginForm => {
                    if submitted_form > 0 && !summary.errors.is_empty() {
                        return Err(self.wrong_credentials(&summary).await);
                    }
                    if submitted_form >= MAX_SUBMITS {
                        return Err(self.unclassified(&summary).await);
                    }
                    submitted_form += 1;
                    let t = targets(&summary);
                    self.submit_login_form(&summary, t).await?;
                    self.after_action(&summary, "waiting for the site to answer the login form")
                        .await?
                }
                PageKind::TwoStep => {
                    if submitted_identifier > 0 && !summary.errors.is_empty() {
                        return Err(self.wrong_credentials(&summary).await);
                    }
                    if submitted_identifier >= MAX_SUBMITS {
                        return Err(self.unclassified(&summary).await);
                    }
                    submitted_identifier += 1;
                    let t = targets(&summary);
                    self.submit_identifier(&summary, t).await?;
                    self.after_action(&summary, "waiting for the site to answer the email step")
                        .await?
                }
                PageKind::LandingPage => {
                    if clicked_login >= MAX_SUBMITS {
                        return Err(self.unclassified(&summary).await);
                    }
                    clicked_login += 1;
                    let t = targets(&summary);
                    self.click_login_control(&summary, t).await?;
                    self.after_action(&summary, "waiting for the login page to open")
                        .await?
                }
                PageKind::Error => {
                    let until = Instant::now() + SETTLE_WAIT;
                    match self.wait_change(&summary, until).await? {
                        Some(next) => next,
                        None => self.assisted_step(&summary).await?,
                    }
                }
            };
        }
    }

    /// Notes the page kind. `Error` pages are noted only when the loop gives up or asks the
    /// assist about them: intermediate pages (a redirect page, a half-rendered SPA) are not
    /// part of the way.
    fn record(&mut self, kind: PageKind, summary: &PageSummary) {
        self.live.set_url(&summary.url);
        (self.observe)(kind);
        if kind != PageKind::Error && self.kinds.last() != Some(&kind) {
            self.kinds.push(kind);
        }
    }

    fn record_error_page(&mut self) {
        if self.kinds.last() != Some(&PageKind::Error) {
            self.kinds.push(PageKind::Error);
        }
    }

    /// Fails when the login was cancelled (its live session closed).
    pub(crate) fn check(&self) -> Result<(), LoginError> {
        if self.live.is_cancelled() {
            return Err(LoginError::Cancelled(self.live.id.clone()));
        }
        Ok(())
    }

    async fn navigate(&self) -> Result<(), LoginError> {
        let url = url::Url::parse(&self.req.url).map_err(|e| LoginError::Navigation {
            url: redact_url(&self.req.url),
            reason: format!("not a valid URL ({e})"),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(LoginError::Navigation {
                url: redact_url(&self.req.url),
                reason: "only http and https URLs can be opened".into(),
            });
        }
        let reply = self
            .page
            .execute(NavigateParams::new(url.as_str()))
            .await
            .map_err(cdp_error)?;
        if let Some(error) = reply.result.error_text.filter(|e| !e.is_empty()) {
            return Err(LoginError::Navigation {
                url: redact_url(url.as_str()),
                reason: error,
            });
        }
        Ok(())
    }

    /// The page's summary now; retried while a navigation swaps documents.
    pub(crate) async fn current(&self) -> Result<PageSummary, LoginError> {
        loop {
            self.check()?;
            match summarize(self.page).await {
                Ok(summary) => return Ok(summary),
                Err(e) if is_transient(&e) => {
                    if Instant::now() >= self.deadline {
                        return Err(self.timeout("waiting for the page to load").await);
                    }
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => return Err(cdp_error(e)),
            }
        }
    }

    /// Waits for a loaded document (not `about:blank`, not still parsing).
    async fn settle(&self, before: PageSummary) -> Result<PageSummary, LoginError> {
        let mut summary = before;
        loop {
            if !summary.url.is_empty() && summary.url != "about:blank" && summary.ready != "loading"
            {
                return Ok(summary);
            }
            if Instant::now() >= self.deadline {
                return Err(self.timeout("waiting for the page to load").await);
            }
            tokio::time::sleep(POLL).await;
            summary = self.current().await?;
        }
    }

    /// Polls until the page differs from `before` (see [`changed`]); `None` when `until`
    /// passes first. The login deadline still applies.
    pub(crate) async fn wait_change(
        &self,
        before: &PageSummary,
        until: Instant,
    ) -> Result<Option<PageSummary>, LoginError> {
        loop {
            tokio::time::sleep(POLL).await;
            let now = self.current().await?;
            if changed(before, &now) && now.ready != "loading" {
                return Ok(Some(now));
            }
            if Instant::now() >= self.deadline {
                return Err(self.timeout("waiting for the page to change").await);
            }
            if Instant::now() >= until {
                return Ok(None);
            }
        }
    }

    /// After an action: the changed page, or a timeout naming `stage`.
    async fn after_action(
        &self,
        before: &PageSummary,
        stage: &str,
    ) -> Result<PageSummary, LoginError> {
        let until = (Instant::now() + ACTION_WAIT).min(self.deadline);
        match self.wait_change(before, until).await? {
            Some(summary) => self.settle(summary).await,
            None => Err(self.timeout(stage).await),
        }
    }

    async fn submit_login_form(
        &mut self,
        summary: &PageSummary,
        mut t: Targets,
    ) -> Result<(), LoginError> {
        let (Some(email), Some(password)) = (self.req.email.clone(), self.req.password.clone())
        else {
            return Err(LoginError::NoCredentials);
        };
        if t.password.is_none() {
            t = self.assist_targets(summary, t).await;
        }
        let Some(password_sel) = t.password.clone() else {
            return Err(self.field_not_found("password field").await);
        };
        if let Some(identifier) = &t.identifier {
            self.fill(identifier, &email, "email field").await?;
        }
        self.fill(&password_sel, &password, "password field")
            .await?;
        self.submit(t.submit.as_deref(), "sign-in button").await
    }

    async fn submit_identifier(
        &mut self,
        summary: &PageSummary,
        mut t: Targets,
    ) -> Result<(), LoginError> {
        let Some(email) = self.req.email.clone() else {
            return Err(LoginError::NoCredentials);
        };
        if t.identifier.is_none() {
            t = self.assist_targets(summary, t).await;
        }
        let Some(identifier) = t.identifier.clone() else {
            return Err(self.field_not_found("email field").await);
        };
        self.fill(&identifier, &email, "email field").await?;
        self.submit(t.submit.as_deref(), "continue button").await
    }

    async fn click_login_control(
        &mut self,
        summary: &PageSummary,
        mut t: Targets,
    ) -> Result<(), LoginError> {
        if t.login_control.is_none() {
            t = self.assist_targets(summary, t).await;
        }
        let Some(control) = t.login_control.clone() else {
            return Err(self.field_not_found("log-in button").await);
        };
        self.click_selector(&control, "log-in button").await
    }

    /// An unrecognised page that did not change by itself: ask the assist (when configured)
    /// what it is and act on its verified answer, else give up.
    async fn assisted_step(&mut self, summary: &PageSummary) -> Result<PageSummary, LoginError> {
        self.record_error_page();
        let Some(hints) = self.ask_assist(summary).await else {
            return Err(self.unclassified(summary).await);
        };
        let t = hints.targets;
        let stage = match hints.page_type {
            Some(PageKind::LoginForm) if t.password.is_some() => {
                self.submit_login_form(summary, t).await?;
                "waiting for the site to answer the login form"
            }
            Some(PageKind::TwoStep) if t.identifier.is_some() => {
                self.submit_identifier(summary, t).await?;
                "waiting for the site to answer the email step"
            }
            Some(PageKind::LandingPage) | None if t.login_control.is_some() => {
                self.click_login_control(summary, t).await?;
                "waiting for the login page to open"
            }
            _ => return Err(self.unclassified(summary).await),
        };
        self.after_action(summary, stage).await
    }

    /// Fills in the selectors `t` lacks from the assist's verified answer.
    async fn assist_targets(&mut self, summary: &PageSummary, t: Targets) -> Targets {
        match self.ask_assist(summary).await {
            Some(hints) => Targets {
                identifier: t.identifier.or(hints.targets.identifier),
                password: t.password.or(hints.targets.password),
                submit: t.submit.or(hints.targets.submit),
                login_control: t.login_control.or(hints.targets.login_control),
            },
            None => t,
        }
    }

    async fn ask_assist(&mut self, summary: &PageSummary) -> Option<assist::Hints> {
        let config = self.config.assist.clone()?;
        if self.assist_calls >= MAX_ASSIST_CALLS {
            return None;
        }
        self.assist_calls += 1;
        let png = self.screenshot_png().await?;
        let answer = assist::ask(&config, &png, summary).await?;
        let selectors = answer.selectors();
        let visible = check_visible(self.page, &selectors).await.ok()?;
        let hints = assist::verify(answer, &selectors, &visible);
        tracing::debug!(
            account = %self.req.account_id,
            page_type = ?hints.page_type,
            "assist answered"
        );
        Some(hints)
    }

    /// Focuses `selector` by clicking it, selects its content (so typing replaces it) and
    /// types `text` the configured way. `what` names the field in errors; `text` never
    /// appears in an error or a log line.
    async fn fill(&self, selector: &str, text: &str, what: &str) -> Result<(), LoginError> {
        self.check()?;
        let element = match self.page.find_element(selector).await {
            Ok(element) => element,
            Err(e) if is_connection(&e) => return Err(cdp_error(e)),
            Err(_) => return Err(self.field_not_found(what).await),
        };
        element.click().await.map_err(|e| typing_error(e, what))?;
        element
            .call_js_fn(js::login::SELECT_CONTENT, false)
            .await
            .map_err(|e| typing_error(e, what))?;
        match self.config.typing {
            TypingMode::Paste => insert_text(self.page, text)
                .await
                .map_err(|e| typing_error(e, what))?,
            TypingMode::Fast => {
                let us_keyboard = text
                    .chars()
                    .all(|c| chromiumoxide::keys::get_key_definition(c.to_string()).is_some());
                if us_keyboard {
                    element
                        .type_str(text)
                        .await
                        .map_err(|e| typing_error(e, what))?;
                } else {
                    insert_text(self.page, text)
                        .await
                        .map_err(|e| typing_error(e, what))?;
                }
            }
            TypingMode::Human { min_ms, max_ms } => {
                let (low, high) = (min_ms.min(max_ms), min_ms.max(max_ms));
                let mut buf = [0u8; 4];
                for c in text.chars() {
                    insert_text(self.page, c.encode_utf8(&mut buf))
                        .await
                        .map_err(|e| typing_error(e, what))?;
                    // Pacing, not synchronisation: a person's typing rhythm.
                    let delay = rand::rng().random_range(low..=high);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
            }
        }
        Ok(())
    }

    /// Clicks the submit control, or presses Enter in the focused field when there is none.
    async fn submit(&self, selector: Option<&str>, what: &str) -> Result<(), LoginError> {
        match selector {
            Some(selector) => self.click_selector(selector, what).await,
            None => press_key(self.page, "Enter").await.map_err(cdp_error),
        }
    }

    async fn click_selector(&self, selector: &str, what: &str) -> Result<(), LoginError> {
        self.check()?;
        let element = match self.page.find_element(selector).await {
            Ok(element) => element,
            Err(e) if is_connection(&e) => return Err(cdp_error(e)),
            Err(_) => return Err(self.field_not_found(what).await),
        };
        element.click().await.map_err(cdp_error)?;
        Ok(())
    }

    async fn finish(&mut self) -> Result<LoginOutcome, LoginError> {
        let harvested = harvest::harvest(self.running, self.live.context_id(), self.page).await?;
        let max = self.config.max_session;
        let expires_at = harvest::expires_at(&harvested.session.cookies, super::unix_now(), max);
        Ok(LoginOutcome {
            session: harvested.session,
            expires_at: Some(expires_at),
            page_kinds: std::mem::take(&mut self.kinds),
            chat_url: harvested.url,
            elapsed: self.started.elapsed(),
        })
    }

    pub(crate) async fn screenshot_png(&self) -> Option<Vec<u8>> {
        page_screenshot(self.page).await
    }

    /// Saves a failure screenshot under `data_dir/screenshots/`.
    pub(crate) async fn save_screenshot(&self) -> Option<PathBuf> {
        let png = self.screenshot_png().await?;
        write_screenshot(&self.config.data_dir, &self.req.account_id, &png).await
    }

    async fn wrong_credentials(&self, summary: &PageSummary) -> LoginError {
        LoginError::WrongCredentials {
            site_message: summary.errors.join(" "),
            screenshot: self.save_screenshot().await,
        }
    }

    async fn field_not_found(&self, what: &str) -> LoginError {
        LoginError::FieldNotFound {
            what: what.to_owned(),
            screenshot: self.save_screenshot().await,
        }
    }

    async fn unclassified(&self, summary: &PageSummary) -> LoginError {
        LoginError::Unclassified {
            url: redact_url(&summary.url),
            screenshot: self.save_screenshot().await,
        }
    }

    pub(crate) async fn timeout(&self, stage: &str) -> LoginError {
        let secs = self.config.login_timeout.as_secs();
        let stage = if Instant::now() >= self.deadline {
            format!("after {secs} s while {stage}")
        } else {
            format!("while {stage}")
        };
        LoginError::Timeout {
            stage,
            screenshot: self.save_screenshot().await,
        }
    }
}

/// Evaluates `js/login/summary.js`. `Runtime.evaluate` without a context id runs in the main
/// frame's current document, which survives navigations better than a cached context id.
pub(crate) async fn summarize(page: &Page) -> Result<PageSummary, CdpError> {
    let json = evaluate_string(page, js::login::SUMMARY).await?;
    Ok(serde_json::from_str(&json)?)
}

/// A typing failure, described without the text being typed (chromiumoxide's own message
/// names the key it could not type).
fn typing_error(e: CdpError, what: &str) -> LoginError {
    if is_connection(&e) {
        cdp_error(e)
    } else {
        LoginError::Cdp(format!("could not type into the {what}"))
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn input(kind: &str, name: &str, selector: &str, form: i64) -> InputInfo {
        InputInfo {
            kind: kind.into(),
            name: name.into(),
            selector: selector.into(),
            form,
            ..Default::default()
        }
    }

    fn button(text: &str, selector: &str, form: i64, submit: bool) -> ButtonInfo {
        ButtonInfo {
            tag: "button".into(),
            text: text.into(),
            selector: selector.into(),
            form,
            submit,
            ..Default::default()
        }
    }

    fn login_page() -> PageSummary {
        let mut password = input("password", "password", "#password", 0);
        password.in_password_form = true;
        let mut email = input("email", "email", "#email", 0);
        email.in_password_form = true;
        PageSummary {
            url: "http://site.test/login".into(),
            inputs: vec![email, password],
            buttons: vec![
                button("Sign in with Google", "#google", -1, false),
                button("Continue", "#login-submit", 0, true),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_password_field_makes_a_login_form_and_its_form_gives_the_targets() {
        let page = login_page();
        assert_eq!(classify(&page), PageKind::LoginForm);
        let t = targets(&page);
        assert_eq!(t.identifier.as_deref(), Some("#email"));
        assert_eq!(t.password.as_deref(), Some("#password"));
        assert_eq!(t.submit.as_deref(), Some("#login-submit"));
    }

    #[test]
    fn an_email_field_with_continue_and_no_password_is_two_step() {
        let page = PageSummary {
            inputs: vec![input("text", "username", "#u", 0)],
            buttons: vec![button("Next", "#next", 0, true)],
            ..Default::default()
        };
        assert_eq!(classify(&page), PageKind::TwoStep);
        assert_eq!(targets(&page).submit.as_deref(), Some("#next"));
    }

    #[test]
    fn a_textarea_outside_login_forms_is_a_chat_even_with_a_log_in_link() {
        let page = PageSummary {
            inputs: vec![input("textarea", "prompt", "#prompt", 0)],
            buttons: vec![
                button("Send", "#send", 0, true),
                button("Log in", "#l", -1, false),
            ],
            ..Default::default()
        };
        assert_eq!(classify(&page), PageKind::ChatInterface);
    }

    #[test]
    fn landing_prefers_log_in_over_sign_up_and_provider_buttons() {
        let page = PageSummary {
            buttons: vec![
                button("Sign up", "#signup", -1, false),
                button("Log in with Apple", "#apple", -1, false),
                button("Log in", "#login", -1, false),
            ],
            ..Default::default()
        };
        assert_eq!(classify(&page), PageKind::LandingPage);
        assert_eq!(targets(&page).login_control.as_deref(), Some("#login"));
        let only_signup = PageSummary {
            buttons: vec![button("Sign up", "#signup", -1, false)],
            ..Default::default()
        };
        assert_eq!(classify(&only_signup), PageKind::Error);
    }

    #[test]
    fn captcha_frames_and_interstitials_are_captchas_unless_invisible_or_solved() {
        let mut page = login_page();
        page.iframes.push(FrameInfo {
            src: "https://www.google.com/recaptcha/api2/anchor?size=invisible".into(),
            visible: true,
            selector: "iframe".into(),
        });
        assert_eq!(classify(&page), PageKind::LoginForm);
        page.iframes[0].src = "https://challenges.cloudflare.com/cdn-cgi/challenge".into();
        assert_eq!(captcha_kind(&page), Some("turnstile"));
        page.captcha_solved = true;
        assert_eq!(classify(&page), PageKind::LoginForm);
        let interstitial = PageSummary {
            text: "Verify you are human by clicking the circle".into(),
            ..Default::default()
        };
        assert_eq!(classify(&interstitial), PageKind::Captcha);
        let checking = PageSummary {
            headings: vec!["Checking your browser before accessing".into()],
            ..Default::default()
        };
        assert_eq!(captcha_kind(&checking), Some("interstitial"));
    }

    #[test]
    fn a_same_url_reload_counts_as_a_change() {
        let before = login_page();
        let mut after = before.clone();
        assert!(!changed(&before, &after));
        after.doc = 42.0;
        assert!(changed(&before, &after));
        let mut with_error = before.clone();
        with_error
            .errors
            .push("Incorrect email or password.".into());
        assert!(changed(&before, &with_error));
    }

    #[test]
    fn summary_parses_what_the_script_returns() {
        let json = r##"{"url":"http://x/login","title":"Log in","doc":1.5,"ready":"complete",
            "inputs":[{"kind":"email","name":"email","id":"email","autocomplete":"username",
            "placeholder":"","label":"Email address","aria":"","selector":"#email","form":0,
            "in_password_form":true,"filled":false,"disabled":false}],
            "buttons":[],"iframes":[],"headings":["Log in"],"errors":[],"markers":[],
            "captcha_solved":false,"text":"Log in"}"##;
        let summary: PageSummary = serde_json::from_str(json).unwrap();
        assert_eq!(summary.inputs[0].label, "Email address");
        // An email field without any continue button is not a step we can act on.
        assert_eq!(classify(&summary), PageKind::Error);
    }
}
