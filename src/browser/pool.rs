//! The browser pool: one Chromium at a time (`process`), a browser context per account, the
//! pages the probe and the browser tiers ask for, and the live login sessions.
//!
//! Invariants:
//! - At most one [`Running`] browser at a time; it is launched lazily, under the `browser`
//!   lock, and replaced (killed, reaped, its user-data dir removed) when found dead.
//! - One browser context per account, at most `max_contexts`; a context in use is never
//!   evicted or reaped. Context bookkeeping sits behind a std mutex that is never held
//!   across an await, so a lease can be returned from `Drop`.
//! - The pool opens pages and logs in; what runs on a page (a probe, a tier) is its caller's.
//! - Background tasks run on the runtime that launched the browser and hold only a `Weak`
//!   to the pool; `shutdown` (or the pool's last clone going away) ends them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::browser::BrowserContextId;
use chromiumoxide::cdp::browser_protocol::emulation::{
    SetUserAgentOverrideParams, UserAgentBrandVersion, UserAgentMetadata,
};
use chromiumoxide::cdp::browser_protocol::network::{CookieParam, TimeSinceEpoch};
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::cdp::browser_protocol::storage::SetCookiesParams as StorageSetCookiesParams;
use chromiumoxide::cdp::browser_protocol::target::{
    CreateBrowserContextParams, CreateTargetParams,
};
use chromiumoxide::error::CdpError;
use chromiumoxide::layout::Point;
use chromiumoxide::page::ScreenshotParams;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::login::{self, Attempt, LiveEntry};
use super::page::{self, cdp_error};
use super::process::{self, Running};
#[cfg(test)]
use super::recorder::RawTaps;
use super::recorder::Recorder;
use super::{
    BrowserConfig, LiveSession, LoginError, LoginOutcome, LoginRequest, PageError, PageKind,
    TierRequest, lock,
};
use crate::replay::failure::ReplayError;
use crate::replay::plan::Started;
use crate::session::SessionData;

/// Cheap to clone; launches Chromium lazily on first use. See the module docs.
#[derive(Clone)]
pub struct BrowserPool {
    shared: Arc<PoolShared>,
}

/// A test hook called with every page classification; returns true to be removed.
#[cfg(test)]
pub(crate) type Observer = Box<dyn FnMut(PageKind) -> bool + Send>;

/// State shared by the pool's clones and its tasks.
pub(crate) struct PoolShared {
    pub(crate) config: BrowserConfig,
    browser: tokio::sync::Mutex<Option<Arc<Running>>>,
    generation: AtomicU64,
    contexts: Mutex<HashMap<String, AccountContext>>,
    /// Serialises context creation and eviction (the CDP calls), not their use.
    context_lock: tokio::sync::Mutex<()>,
    context_freed: Notify,
    live: Mutex<HashMap<String, Arc<LiveEntry>>>,
    /// The browser tiers' pages, per account.
    work: Mutex<HashMap<String, Arc<AccountWork>>>,
    /// Told what a page holds after a probe or a browser-tier page load (see
    /// [`BrowserPool::set_harvest_hook`]).
    harvest_hook: Mutex<Option<HarvestHook>>,
    /// Bumped whenever what the pool holds changes (contexts, work pages, live sessions and
    /// their states), for whoever waits on that state ([`BrowserPool::changes`]).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    #[cfg(test)]
    pub(crate) observer: Mutex<Option<Observer>>,
}

impl PoolShared {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Receives (account id, session material) harvested from an account's page after it ran:
/// pages write storage after login (a token stored when the chat page loads), and flows
/// refer to it.
pub type HarvestHook =
    Arc<dyn Fn(String, SessionData) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Which browser tier a work page serves. Each has its own page in the account's context:
/// the UI tier reloads its page for every request, which would abort the in-page tier's
/// fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    InPage,
    Ui,
}

/// A logged-in chat page kept open for the browser tiers, with a live-only recorder on it.
pub(crate) struct WorkPage {
    pub(crate) page: Page,
    pub(crate) recorder: Recorder,
    /// The chat page's URL (where a fresh conversation starts).
    pub(crate) chat_url: String,
    context: BrowserContextId,
    generation: u64,
    /// When the page last finished (or started) serving a request.
    last_used: Mutex<Instant>,
    /// The UI tier's page: the key (`conversations::key_of`) of the site conversation it shows,
    /// its messages and replies so far; `None` once reloaded.
    pub(crate) conversation: Mutex<Option<String>>,
}

/// Whether a work page is reloaded on the chat page (a new site conversation) before use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fresh {
    No,
    Yes,
    /// Unless it shows the conversation with this key.
    UnlessShowing(String),
}

impl WorkPage {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }
}

impl Drop for WorkPage {
    fn drop(&mut self) {
        let page = self.page.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), page.close()).await;
            });
        }
    }
}

/// An account's work pages. The UI slot's mutex is also the account's UI turn: one typed
/// conversation at a time, the others queue.
#[derive(Default)]
struct AccountWork {
    inpage: tokio::sync::Mutex<Option<Arc<WorkPage>>>,
    ui: Arc<tokio::sync::Mutex<Option<Arc<WorkPage>>>>,
}

/// A work page in use: keeps the account's context from being reaped and, for the UI tier,
/// holds the account's UI turn. Dropping it releases both.
pub(crate) struct PageLease {
    pub(crate) work: Arc<WorkPage>,
    _turn: Option<tokio::sync::OwnedMutexGuard<Option<Arc<WorkPage>>>>,
    _lease: ContextLease,
}

impl Drop for PageLease {
    fn drop(&mut self) {
        // Idle time counts from the end of the request.
        self.work.touch();
    }
}

/// What [`BrowserPool::chat_page`] opens: the account's chat page, and what to get there.
#[derive(Clone)]
pub struct PageRequest {
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
}

impl std::fmt::Debug for PageRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRequest")
            .field("account_id", &self.account_id)
            .field("chat_url", &self.chat_url.as_deref().map(super::redact_url))
            .field("has_session", &self.session.is_some())
            .field("login", &self.login)
            .finish()
    }
}

/// A tab on an account's chat page, opened by [`BrowserPool::chat_page`] for one probe. It
/// holds the account's context (not reaped while in use); [`ChatPage::close`] closes the tab.
pub struct ChatPage {
    page: Page,
    pool: BrowserPool,
    running: Arc<Running>,
    account_id: String,
    lease: ContextLease,
    closed: bool,
}

impl ChatPage {
    pub fn page(&self) -> &Page {
        &self.page
    }

    /// Starts recording the page's network traffic, request headers with cookies included.
    pub async fn record(&self) -> Result<Recorder, CdpError> {
        Recorder::start(&self.page, &self.running.taps).await
    }

    /// After `error`, whether the browser died: a new [`BrowserPool::chat_page`] then runs on
    /// a relaunched one.
    pub async fn browser_died(&self, error: &PageError) -> bool {
        self.running.crashed(error.is_crash_like()).await
    }

    /// Saves a screenshot of the page (for a failure) under the data dir; its path.
    pub async fn screenshot(&self) -> Option<PathBuf> {
        if self.running.is_dead() {
            return None;
        }
        let png = page::page_screenshot(&self.page).await?;
        page::write_screenshot(&self.pool.shared.config.data_dir, &self.account_id, &png).await
    }

    /// Closes the tab. With `harvest`, first hands what the page holds now (a token the page
    /// stored while it ran, say) to the pool's harvest hook, and waits for it.
    pub async fn close(mut self, harvest: bool) {
        if harvest {
            self.pool
                .reharvest(
                    &self.running,
                    &self.lease.id,
                    &self.page,
                    &self.account_id,
                    true,
                )
                .await;
        }
        if !self.running.is_dead() {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.page.clone().close()).await;
        }
        self.closed = true;
    }
}

impl Drop for ChatPage {
    /// A tab dropped without [`ChatPage::close`] (its task was cancelled) is closed anyway.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let page = self.page.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), page.close()).await;
            });
        }
    }
}

struct AccountContext {
    id: BrowserContextId,
    generation: u64,
    proxy: Option<String>,
    /// The chat page the last login in this context reached.
    chat_url: Option<String>,
    in_use: usize,
    last_used: Instant,
}

impl BrowserPool {
    pub fn new(config: BrowserConfig) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                config,
                browser: tokio::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                contexts: Mutex::new(HashMap::new()),
                context_lock: tokio::sync::Mutex::new(()),
                context_freed: Notify::new(),
                live: Mutex::new(HashMap::new()),
                work: Mutex::new(HashMap::new()),
                harvest_hook: Mutex::new(None),
                changes: Arc::new(tokio::sync::watch::Sender::new(0)),
                #[cfg(test)]
                observer: Mutex::new(None),
            }),
        }
    }

    /// Tells of every change of what the pool holds (contexts, work pages, live sessions and
    /// their states): wait on it instead of polling.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Where failure screenshots (and the learner's saved recordings) go.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.shared.config.data_dir
    }

    /// Sets what is told the session material of an account's page after a probe (awaited
    /// before the probe returns) and after a browser tier loaded its page (not awaited).
    pub fn set_harvest_hook(&self, hook: HarvestHook) {
        *lock(&self.shared.harvest_hook) = Some(hook);
    }

    /// Harvests `page` and hands the result to the hook. Failures only cost a fresher session.
    async fn reharvest(
        &self,
        running: &Running,
        context: &BrowserContextId,
        page: &Page,
        account_id: &str,
        wait: bool,
    ) {
        let Some(hook) = lock(&self.shared.harvest_hook).clone() else {
            return;
        };
        match super::harvest::harvest(running, context, page).await {
            Ok(harvested) => {
                let told = hook(account_id.to_owned(), harvested.session);
                if wait {
                    told.await;
                } else {
                    // Detached: a browser-tier reply must not wait for a store write.
                    tokio::spawn(told);
                }
            }
            Err(e) => {
                tracing::debug!(account = %account_id, error = %e, "could not harvest the page")
            }
        }
    }

    /// Logs in to `req.url` and harvests the session. When Chromium dies during the attempt
    /// (connection lost, process gone), relaunches it and retries once.
    pub async fn login(&self, req: LoginRequest) -> Result<LoginOutcome, LoginError> {
        let started = std::time::Instant::now();
        let mut retried = false;
        loop {
            let running = self.ensure_browser().await?;
            let result = self.login_once(&running, &req, started).await;
            let Err(error) = result else {
                return result;
            };
            let crash_like =
                matches!(error, LoginError::Crashed(_) | LoginError::Cdp(_)) || running.is_dead();
            let crashed = crash_like
                && !running.retired.load(Ordering::SeqCst)
                && (running.is_dead() || running.became_dead(Duration::from_secs(1)).await);
            if !crashed {
                return Err(error);
            }
            if retried {
                return Err(LoginError::Crashed(format!(
                    "Chromium died twice while logging in to account {}",
                    req.account_id
                )));
            }
            tracing::warn!(
                account = %req.account_id,
                "Chromium died during the login; relaunching it and retrying once"
            );
            retried = true;
        }
    }

    async fn login_once(
        &self,
        running: &Arc<Running>,
        req: &LoginRequest,
        started: std::time::Instant,
    ) -> Result<LoginOutcome, LoginError> {
        let deadline = Instant::now() + self.shared.config.login_timeout;
        let lease = self
            .acquire_context(running, &req.account_id, req.proxy.as_deref(), deadline)
            .await?;
        let page = self.new_page(running, &lease.id).await?;
        let live = Arc::new(LiveEntry::new(
            &req.account_id,
            lease.id.clone(),
            page.clone(),
            &req.url,
            self.shared.changes.clone(),
        ));
        lock(&self.shared.live).insert(live.id.clone(), live.clone());
        self.shared.changed();
        let observe = |kind: PageKind| self.shared.observe(kind);
        let result = Attempt::new(
            &self.shared.config,
            &observe,
            running,
            &page,
            &live,
            req,
            started,
        )
        .run()
        .await;
        lock(&self.shared.live).remove(&live.id);
        self.shared.changed();
        if !running.is_dead() {
            let _ = tokio::time::timeout(Duration::from_secs(5), page.close()).await;
        }
        if let Ok(outcome) = &result
            && let Some(c) = lock(&self.shared.contexts).get_mut(&req.account_id)
            && c.id == lease.id
        {
            c.chat_url = Some(outcome.chat_url.clone());
        }
        drop(lease);
        match &result {
            Ok(outcome) => tracing::info!(
                account = %req.account_id,
                elapsed_ms = outcome.elapsed.as_millis() as u64,
                "logged in"
            ),
            Err(e) => tracing::info!(account = %req.account_id, error = %e, "login failed"),
        }
        result
    }

    /// A new tab on the account's chat page, logged in, for a probe (`learn::probe`) to drive.
    /// The tab is in the account's context:
    /// - a context kept from an earlier login or probe in this pool is reused as it is;
    /// - a new context gets `req.session` injected: its cookies (`Storage.setCookies`), then
    ///   its local and session storage (set on the chat URL's origin) before the chat page
    ///   is opened;
    /// - the chat page is `req.chat_url`, else the chat page the account's last login here
    ///   reached, else `req.login`'s URL; when it turns out not to be a chat (a login form, a
    ///   landing page…), `req.login` logs in first (in the same context) and the tab ends on
    ///   the chat page the login reached.
    ///
    /// When Chromium dies on the way, relaunches it and retries once. Page-level failures
    /// carry a screenshot.
    pub async fn chat_page(&self, req: &PageRequest) -> Result<ChatPage, PageError> {
        let mut retried = false;
        loop {
            let running = self.ensure_browser().await?;
            let error = match self.chat_page_once(&running, req).await {
                Ok(page) => return Ok(page),
                Err(error) => error,
            };
            if retried || !running.crashed(error.is_crash_like()).await {
                return Err(error);
            }
            tracing::warn!(
                account = %req.account_id,
                "Chromium died while opening the chat page; relaunching it and retrying once"
            );
            retried = true;
        }
    }

    /// What the pool knows of the account's context in this browser: whether it exists,
    /// the proxy to use (the login's, else the context's) and the chat page's URL.
    fn known_context(
        &self,
        running: &Running,
        account_id: &str,
        login: Option<&LoginRequest>,
    ) -> (bool, Option<String>, Option<String>) {
        let contexts = lock(&self.shared.contexts);
        let known = contexts
            .get(account_id)
            .filter(|c| c.generation == running.generation);
        let proxy = match login {
            Some(login) => login.proxy.clone(),
            None => known.and_then(|c| c.proxy.clone()),
        };
        (
            known.is_some(),
            proxy,
            known.and_then(|c| c.chat_url.clone()),
        )
    }

    async fn chat_page_once(
        &self,
        running: &Arc<Running>,
        req: &PageRequest,
    ) -> Result<ChatPage, PageError> {
        let deadline = Instant::now() + self.shared.config.login_timeout;
        let (existed, proxy, known_chat) =
            self.known_context(running, &req.account_id, req.login.as_ref());
        let chat_url = req
            .chat_url
            .clone()
            .or(known_chat)
            .or_else(|| req.login.as_ref().map(|l| l.url.clone()))
            .ok_or(PageError::NoChatUrl)?;
        let lease = self
            .acquire_context(running, &req.account_id, proxy.as_deref(), deadline)
            .await?;
        let inject = if existed { None } else { req.session.as_ref() };
        if let Some(session) = inject {
            inject_cookies(running, &lease.id, session).await?;
        }
        let page = self.new_page(running, &lease.id).await?;
        let chat = ChatPage {
            page,
            pool: self.clone(),
            running: running.clone(),
            account_id: req.account_id.clone(),
            lease,
            closed: false,
        };
        let opened = self
            .open_with_session(
                running,
                &chat.page,
                &req.account_id,
                req.login.as_ref(),
                &chat_url,
                inject,
            )
            .await;
        match opened {
            Ok(_) => Ok(chat),
            Err(mut error) => {
                if error.wants_screenshot() {
                    error.set_screenshot(chat.screenshot().await);
                }
                chat.close(false).await;
                Err(error)
            }
        }
    }

    /// Opens the chat page in `page`, first writing `inject`'s storage into its origin when
    /// the context is new, logging in on the way as needed. Returns the chat page's URL.
    async fn open_with_session(
        &self,
        running: &Arc<Running>,
        page: &Page,
        account_id: &str,
        login: Option<&LoginRequest>,
        chat_url: &str,
        inject: Option<&SessionData>,
    ) -> Result<String, PageError> {
        let deadline = Instant::now() + self.shared.config.login_timeout;
        if let Some(session) =
            inject.filter(|s| !s.local_storage.is_empty() || !s.session_storage.is_empty())
        {
            let origin = url::Url::parse(chat_url)
                .map(|u| u.origin().ascii_serialization())
                .map_err(|e| PageError::Navigation {
                    url: super::redact_url(chat_url),
                    reason: format!("not a valid URL ({e})"),
                })?;
            page::navigate(page, &format!("{origin}/"), deadline).await?;
            page::restore_storage(page, session).await?;
        }
        self.open_chat(running, page, account_id, login, chat_url, deadline)
            .await
    }

    /// `start` (a browser tier starting its reply) and then its reply, failing as soon as the
    /// browser is known dead instead of waiting out their timeouts (see [`dies_with`]).
    pub(crate) async fn dies_with(
        &self,
        start: impl std::future::Future<Output = Result<Started, ReplayError>>,
    ) -> Result<Started, ReplayError> {
        let running = self.ensure_browser().await.map_err(ReplayError::from)?;
        process::dies_with(&running, start).await
    }

    /// The account's work page for `tier`, opened on its chat page (created, injected with
    /// `req.session` in a new context, logged in with `req.login` as needed, like
    /// [`BrowserPool::chat_page`]). With `fresh`, an existing page is reloaded on the chat page
    /// (a new conversation), unless it shows the conversation `fresh` names. The UI tier's
    /// lease holds the account's UI turn.
    pub(crate) async fn work_page(
        &self,
        req: &TierRequest,
        tier: Tier,
        fresh: Fresh,
    ) -> Result<PageLease, ReplayError> {
        let running = self.ensure_browser().await.map_err(ReplayError::from)?;
        let account = lock(&self.shared.work)
            .entry(req.account_id.clone())
            .or_default()
            .clone();
        let deadline = Instant::now() + self.shared.config.login_timeout;
        let (existed, proxy, known_chat) =
            self.known_context(&running, &req.account_id, req.login.as_ref());
        let lease = self
            .acquire_context(&running, &req.account_id, proxy.as_deref(), deadline)
            .await
            .map_err(ReplayError::from)?;
        let setup = Setup {
            running: &running,
            context: &lease.id,
            req,
            inject: if existed { None } else { req.session.as_ref() },
            chat_url: known_chat.unwrap_or_else(|| req.account_url.clone()),
            fresh,
        };
        match tier {
            Tier::Ui => {
                let mut slot = account.ui.clone().lock_owned().await;
                let work = self.ready_page(&mut slot, &setup).await?;
                Ok(PageLease {
                    work,
                    _turn: Some(slot),
                    _lease: lease,
                })
            }
            Tier::InPage => {
                let mut slot = account.inpage.lock().await;
                let work = self.ready_page(&mut slot, &setup).await?;
                drop(slot);
                Ok(PageLease {
                    work,
                    _turn: None,
                    _lease: lease,
                })
            }
        }
    }

    /// The slot's page if it is still usable (reloaded when `fresh`), else a new one.
    async fn ready_page(
        &self,
        slot: &mut Option<Arc<WorkPage>>,
        setup: &Setup<'_>,
    ) -> Result<Arc<WorkPage>, ReplayError> {
        let running = setup.running;
        if let Some(work) = slot.as_ref()
            && work.generation == running.generation
            && &work.context == setup.context
        {
            let keep = match &setup.fresh {
                Fresh::No => true,
                Fresh::Yes => false,
                Fresh::UnlessShowing(key) => lock(&work.conversation).as_ref() == Some(key),
            };
            if keep {
                if page::evaluate_string(&work.page, "location.href")
                    .await
                    .is_ok()
                {
                    work.touch();
                    return Ok(work.clone());
                }
            } else {
                let deadline = Instant::now() + self.shared.config.login_timeout;
                match self
                    .open_chat(
                        running,
                        &work.page,
                        &setup.req.account_id,
                        setup.req.login.as_ref(),
                        &work.chat_url,
                        deadline,
                    )
                    .await
                {
                    Ok(_) => {
                        work.touch();
                        *lock(&work.conversation) = None;
                        self.reharvest(
                            running,
                            setup.context,
                            &work.page,
                            &setup.req.account_id,
                            false,
                        )
                        .await;
                        return Ok(work.clone());
                    }
                    Err(e) if !matches!(e, PageError::Crashed(_) | PageError::Cdp(_)) => {
                        return Err(ReplayError::from(e));
                    }
                    // The page itself is broken (closed, crashed renderer): a new one.
                    Err(_) => {}
                }
            }
        }
        // Dropping the old page closes it.
        *slot = None;
        if let Some(session) = setup.inject {
            inject_cookies(running, setup.context, session)
                .await
                .map_err(ReplayError::from)?;
        }
        let page = self
            .new_page(running, setup.context)
            .await
            .map_err(ReplayError::from)?;
        let opened = async {
            let chat_url = self
                .open_with_session(
                    running,
                    &page,
                    &setup.req.account_id,
                    setup.req.login.as_ref(),
                    &setup.chat_url,
                    setup.inject,
                )
                .await?;
            let recorder = Recorder::start_live(&page, &running.taps)
                .await
                .map_err(PageError::from_cdp)?;
            Ok::<_, PageError>((chat_url, recorder))
        }
        .await;
        let (chat_url, recorder) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                if !running.is_dead() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), page.close()).await;
                }
                return Err(ReplayError::from(e));
            }
        };
        self.reharvest(running, setup.context, &page, &setup.req.account_id, false)
            .await;
        let work = Arc::new(WorkPage {
            page,
            recorder,
            chat_url,
            context: setup.context.clone(),
            generation: running.generation,
            last_used: Mutex::new(Instant::now()),
            conversation: Mutex::new(None),
        });
        *slot = Some(work.clone());
        Ok(work)
    }

    /// Opens `chat_url` in `page`; logs in first (in the same context) when it is not a chat
    /// and `login` is given. Returns the chat page's URL.
    async fn open_chat(
        &self,
        running: &Arc<Running>,
        page: &Page,
        account_id: &str,
        login: Option<&LoginRequest>,
        chat_url: &str,
        deadline: Instant,
    ) -> Result<String, PageError> {
        page::navigate(page, chat_url, deadline).await?;
        let (kind, url) = wait_for_page(page, deadline).await?;
        if kind == PageKind::ChatInterface {
            return Ok(url);
        }
        let Some(login) = login else {
            return Err(PageError::NotLoggedIn {
                url: super::redact_url(&url),
                kind,
                screenshot: None,
            });
        };
        tracing::debug!(account = %account_id, kind = %kind, "the chat page needs a login first");
        let outcome = self
            .login_once(running, login, std::time::Instant::now())
            .await
            .map_err(PageError::Login)?;
        let deadline = Instant::now() + self.shared.config.login_timeout;
        page::navigate(page, &outcome.chat_url, deadline).await?;
        let (kind, url) = wait_for_page(page, deadline).await?;
        if kind != PageKind::ChatInterface {
            return Err(PageError::NotLoggedIn {
                url: super::redact_url(&url),
                kind,
                screenshot: None,
            });
        }
        Ok(url)
    }

    /// The running browser, launched (or relaunched after a crash) as needed.
    async fn ensure_browser(&self) -> Result<Arc<Running>, LoginError> {
        let mut slot = self.shared.browser.lock().await;
        if let Some(running) = slot.as_ref()
            && !running.is_gone()
        {
            return Ok(running.clone());
        }
        if let Some(old) = slot.take() {
            tracing::warn!(
                pid = old.pid,
                "Chromium is gone (crashed or killed); launching a new one"
            );
            old.dispose(false).await;
        }
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let running = process::launch(&self.shared.config, generation).await?;
        let reaper = tokio::spawn(reap_idle(Arc::downgrade(&self.shared), running.clone()));
        lock(&running.tasks).push(reaper);
        *slot = Some(running.clone());
        Ok(running)
    }

    /// A lease on the account's context, created (or recreated with another proxy) as needed.
    async fn acquire_context(
        &self,
        running: &Arc<Running>,
        account_id: &str,
        proxy: Option<&str>,
        deadline: Instant,
    ) -> Result<ContextLease, LoginError> {
        let shared = &self.shared;
        loop {
            let freed = shared.context_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let _creating = shared.context_lock.lock().await;
                let mut dispose = Vec::new();
                let mut reuse = None;
                let mut room = false;
                {
                    let mut contexts = lock(&shared.contexts);
                    // Contexts of a dead browser died with it.
                    contexts.retain(|_, c| c.generation == running.generation);
                    if let Some(c) = contexts.get_mut(account_id) {
                        if c.proxy.as_deref() == proxy {
                            c.in_use += 1;
                            c.last_used = Instant::now();
                            reuse = Some(c.id.clone());
                        } else if c.in_use == 0
                            && let Some(c) = contexts.remove(account_id)
                        {
                            dispose.push(c.id);
                        }
                    }
                    if reuse.is_none() && !contexts.contains_key(account_id) {
                        if contexts.len() >= shared.config.max_contexts.max(1) {
                            let lru = contexts
                                .iter()
                                .filter(|(_, c)| c.in_use == 0)
                                .min_by_key(|(_, c)| c.last_used)
                                .map(|(k, _)| k.clone());
                            if let Some(c) = lru.and_then(|k| contexts.remove(&k)) {
                                dispose.push(c.id);
                            }
                        }
                        room = contexts.len() < shared.config.max_contexts.max(1);
                    }
                }
                if !dispose.is_empty() {
                    shared.changed();
                }
                for id in dispose {
                    dispose_context(running, id).await;
                }
                if let Some(id) = reuse {
                    return Ok(self.lease(account_id, id));
                }
                if room {
                    let id = create_context(running, proxy).await?;
                    lock(&shared.contexts).insert(
                        account_id.to_owned(),
                        AccountContext {
                            id: id.clone(),
                            generation: running.generation,
                            proxy: proxy.map(str::to_owned),
                            chat_url: None,
                            in_use: 1,
                            last_used: Instant::now(),
                        },
                    );
                    return Ok(self.lease(account_id, id));
                }
            }
            // Every context is in use by another login: wait for one to be returned.
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(LoginError::Timeout {
                    stage: format!(
                        "waiting for a free browser context (all {} are in use)",
                        shared.config.max_contexts
                    ),
                    screenshot: None,
                });
            }
        }
    }

    fn lease(&self, account_id: &str, id: BrowserContextId) -> ContextLease {
        ContextLease {
            shared: self.shared.clone(),
            account_id: account_id.to_owned(),
            id,
        }
    }

    /// A blank page in `context`, with a desktop Chrome user agent (no "Headless").
    async fn new_page(
        &self,
        running: &Running,
        context: &BrowserContextId,
    ) -> Result<Page, LoginError> {
        let page = {
            let browser = running.browser.read().await;
            let params = CreateTargetParams::builder()
                .url("about:blank")
                .browser_context_id(context.clone())
                .build()
                .map_err(LoginError::Cdp)?;
            browser.new_page(params).await.map_err(cdp_error)?
        };
        let brands = vec![
            UserAgentBrandVersion::new("Chromium", running.major_version.clone()),
            UserAgentBrandVersion::new("Google Chrome", running.major_version.clone()),
            UserAgentBrandVersion::new("Not-A.Brand", "99"),
        ];
        let metadata = UserAgentMetadata::builder()
            .brands(brands)
            .platform("Linux")
            .platform_version("")
            .architecture("x86")
            .model("")
            .mobile(false)
            .build()
            .map_err(LoginError::Cdp)?;
        let ua = SetUserAgentOverrideParams::builder()
            .user_agent(running.user_agent.clone())
            .accept_language("en-US,en;q=0.9")
            .platform("Linux x86_64")
            .user_agent_metadata(metadata)
            .build()
            .map_err(LoginError::Cdp)?;
        page.execute(ua).await.map_err(cdp_error)?;
        // A proxy that wants a login gets it from the page's auth handling (it answers the
        // proxy's 407 challenge; Chromium takes no credentials in the proxy setting).
        let credentials = lock(&self.shared.contexts)
            .values()
            .find(|c| &c.id == context)
            .and_then(|c| c.proxy.as_deref().and_then(proxy_credentials));
        if let Some(credentials) = credentials {
            page.authenticate(credentials).await.map_err(cdp_error)?;
        }
        Ok(page)
    }

    /// Live browser sessions: logins in progress, in particular those waiting for a human.
    pub async fn live_sessions(&self) -> Vec<LiveSession> {
        let mut sessions: Vec<LiveSession> =
            lock(&self.shared.live).values().map(|e| e.view()).collect();
        sessions.sort_by(|a, b| a.since.cmp(&b.since).then(a.id.cmp(&b.id)));
        sessions
    }

    fn live(&self, live_id: &str) -> Result<Arc<LiveEntry>, LoginError> {
        lock(&self.shared.live)
            .get(live_id)
            .cloned()
            .ok_or_else(|| LoginError::NoSuchLiveSession(live_id.to_owned()))
    }

    /// A PNG of the live session's viewport.
    pub async fn screenshot(&self, live_id: &str) -> Result<Vec<u8>, LoginError> {
        let live = self.live(live_id)?;
        live.page()
            .screenshot(
                ScreenshotParams::builder()
                    .format(CaptureScreenshotFormat::Png)
                    .build(),
            )
            .await
            .map_err(cdp_error)
    }

    /// Clicks at viewport CSS pixel `(x, y)` of the live session's page.
    pub async fn click(&self, live_id: &str, x: f64, y: f64) -> Result<(), LoginError> {
        let live = self.live(live_id)?;
        live.page().click(Point { x, y }).await.map_err(cdp_error)?;
        Ok(())
    }

    /// Types `text` into the focused element of the live session's page.
    pub async fn type_text(&self, live_id: &str, text: &str) -> Result<(), LoginError> {
        let live = self.live(live_id)?;
        page::insert_text(live.page(), text)
            .await
            .map_err(|e| match page::is_connection(&e) {
                true => cdp_error(e),
                false => LoginError::Cdp("could not type into the page".into()),
            })
    }

    /// Presses a key (`Enter`, `Tab`, `Escape`, `a`, …) in the live session's page.
    pub async fn press_key(&self, live_id: &str, key: &str) -> Result<(), LoginError> {
        let live = self.live(live_id)?;
        page::press_key(live.page(), key).await.map_err(|e| {
            if page::is_connection(&e) {
                cdp_error(e)
            } else {
                LoginError::Cdp(format!("could not press `{key}`"))
            }
        })
    }

    /// Cancels the live session's login; it fails with [`LoginError::Cancelled`].
    pub async fn close_live(&self, live_id: &str) -> Result<(), LoginError> {
        let live = lock(&self.shared.live)
            .remove(live_id)
            .ok_or_else(|| LoginError::NoSuchLiveSession(live_id.to_owned()))?;
        live.cancel();
        self.shared.changed();
        Ok(())
    }

    /// Closes Chromium cleanly (close + wait). A later call launches a new one.
    pub async fn shutdown(&self) {
        let running = self.shared.browser.lock().await.take();
        for live in lock(&self.shared.live).values() {
            live.cancel();
        }
        lock(&self.shared.contexts).clear();
        lock(&self.shared.work).clear();
        if let Some(running) = running {
            running.retired.store(true, Ordering::SeqCst);
            running.dispose(true).await;
        }
    }

    /// A blank page in the account's context (created as needed), and the taps its
    /// recorders need. The context lease is released at once.
    #[cfg(test)]
    pub(crate) async fn page_for_tests(&self, account_id: &str) -> (Page, Arc<RawTaps>) {
        let running = self.ensure_browser().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let lease = self
            .acquire_context(&running, account_id, None, deadline)
            .await
            .unwrap();
        let page = self.new_page(&running, &lease.id).await.unwrap();
        (page, running.taps.clone())
    }

    #[cfg(test)]
    pub(crate) fn shared_for_tests(&self) -> &PoolShared {
        &self.shared
    }

    /// Account contexts currently open.
    #[cfg(test)]
    pub(crate) fn context_count(&self) -> usize {
        lock(&self.shared.contexts).len()
    }

    /// Work pages currently kept open (a slot in use counts as open).
    #[cfg(test)]
    pub(crate) fn work_page_count(&self) -> usize {
        let accounts: Vec<Arc<AccountWork>> = lock(&self.shared.work).values().cloned().collect();
        accounts
            .iter()
            .flat_map(|a| [&a.inpage, &*a.ui])
            .filter(|slot| slot.try_lock().map_or(true, |page| page.is_some()))
            .count()
    }

    /// The PID of the running Chromium, if any (for crash-recovery tests).
    pub async fn browser_pid(&self) -> Option<u32> {
        let slot = self.shared.browser.lock().await;
        slot.as_ref().filter(|r| !r.is_dead()).and_then(|r| r.pid)
    }
}

impl PoolShared {
    /// Called with every classification; tests use it to act at a precise point of a login.
    pub(crate) fn observe(&self, kind: PageKind) {
        #[cfg(test)]
        {
            let mut observer = lock(&self.observer);
            if let Some(f) = observer.as_mut()
                && f(kind)
            {
                *observer = None;
            }
        }
        #[cfg(not(test))]
        let _ = kind;
    }
}

/// A context in use by one login; returned on drop, even when the login future is dropped.
struct ContextLease {
    shared: Arc<PoolShared>,
    account_id: String,
    id: BrowserContextId,
}

impl Drop for ContextLease {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.shared.contexts).get_mut(&self.account_id)
            && c.id == self.id
        {
            c.in_use = c.in_use.saturating_sub(1);
            c.last_used = Instant::now();
        }
        self.shared.context_freed.notify_waiters();
    }
}

async fn create_context(
    running: &Running,
    proxy: Option<&str>,
) -> Result<BrowserContextId, LoginError> {
    let mut params = CreateBrowserContextParams::builder().dispose_on_detach(true);
    if let Some(proxy) = proxy {
        let server = proxy_server(proxy)
            .ok_or_else(|| LoginError::Launch("the account's proxy URL is not usable".into()))?;
        // `<-loopback>`: Chromium otherwise talks to loopback sites directly, and every call
        // an account makes goes through its proxy.
        params = params.proxy_server(server).proxy_bypass_list("<-loopback>");
    }
    let reply = running.execute(params.build()).await.map_err(cdp_error)?;
    Ok(reply.browser_context_id)
}

/// The proxy as Chromium takes it: `scheme://host:port`, with no path (a trailing `/` makes
/// it refuse the proxy with `ERR_NO_SUPPORTED_PROXIES`) and no credentials (answered through
/// CDP, see [`proxy_credentials`]).
fn proxy_server(proxy: &str) -> Option<String> {
    let url = url::Url::parse(proxy).ok()?;
    let host = match url.host()? {
        url::Host::Ipv6(ip) => format!("[{ip}]"),
        host => host.to_string(),
    };
    let port = url.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", url.scheme()))
}

/// The user and password in a proxy URL, if any.
fn proxy_credentials(proxy: &str) -> Option<chromiumoxide::auth::Credentials> {
    let url = url::Url::parse(proxy).ok()?;
    if url.username().is_empty() {
        return None;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    Some(chromiumoxide::auth::Credentials {
        username: decode(url.username()),
        password: decode(url.password().unwrap_or_default()),
    })
}

async fn dispose_context(running: &Running, id: BrowserContextId) {
    use chromiumoxide::cdp::browser_protocol::target::DisposeBrowserContextParams;
    if let Err(e) = running.execute(DisposeBrowserContextParams::new(id)).await {
        tracing::debug!(error = %e, "could not dispose a browser context");
    }
}

/// Sets `session`'s cookies in the browser context (HttpOnly ones included).
async fn inject_cookies(
    running: &Running,
    context: &BrowserContextId,
    session: &SessionData,
) -> Result<(), PageError> {
    let cookies: Vec<CookieParam> = session
        .cookies
        .iter()
        .map(|c| {
            let mut param = CookieParam::builder()
                .name(c.name.clone())
                .value(c.value.clone())
                .path(c.path.clone())
                .secure(c.secure)
                .http_only(c.http_only);
            let host = c.domain.trim_start_matches('.');
            param = if c.host_only {
                let scheme = if c.secure { "https" } else { "http" };
                param.url(format!("{scheme}://{host}{}", c.path))
            } else {
                param.domain(c.domain.clone())
            };
            if let Some(expires) = c.expires {
                param = param.expires(TimeSinceEpoch::new(expires as f64));
            }
            param.build().map_err(PageError::Session)
        })
        .collect::<Result<_, _>>()?;
    if cookies.is_empty() {
        return Ok(());
    }
    let params = StorageSetCookiesParams::builder()
        .cookies(cookies)
        .browser_context_id(context.clone())
        .build()
        .map_err(PageError::Session)?;
    running.execute(params).await.map_err(|e| {
        if page::is_connection(&e) {
            PageError::from(cdp_error(e))
        } else {
            PageError::Session("Chromium refused the session's cookies".into())
        }
    })?;
    Ok(())
}

/// How long a page that is not (yet) a chat must stay so before it counts: SPAs render a
/// shell, then redirect.
const NOT_CHAT_SETTLE: Duration = Duration::from_secs(1);

/// Classifies the page once it is recognisable: a chat at once, anything else once stable
/// for [`NOT_CHAT_SETTLE`] (an unrecognisable page: until `deadline`). Returns the kind and
/// the page's URL.
async fn wait_for_page(page: &Page, deadline: Instant) -> Result<(PageKind, String), PageError> {
    let mut last: Option<(PageKind, String, Instant)> = None;
    loop {
        match login::summarize(page).await {
            Ok(summary) if summary.ready != "loading" => {
                let kind = login::classify(&summary);
                if kind == PageKind::ChatInterface {
                    return Ok((kind, summary.url));
                }
                let now = Instant::now();
                match &last {
                    Some((k, u, since)) if *k == kind && *u == summary.url => {
                        if kind != PageKind::Error && now >= *since + NOT_CHAT_SETTLE {
                            return Ok((kind, summary.url));
                        }
                    }
                    _ => last = Some((kind, summary.url.clone(), now)),
                }
            }
            Ok(_) => {}
            Err(e) if page::is_connection(&e) => return Err(PageError::from(cdp_error(e))),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return match last {
                Some((kind, url, _)) => Ok((kind, url)),
                None => Err(PageError::Timeout {
                    stage: "while waiting for the chat page to load".into(),
                    screenshot: None,
                }),
            };
        }
        tokio::time::sleep(page::POLL).await;
    }
}

/// Closes contexts unused for `idle_timeout` and work pages unused for `page_idle_timeout`.
/// Ends with the browser or the pool.
async fn reap_idle(shared: Weak<PoolShared>, running: Arc<Running>) {
    let period = match shared.upgrade() {
        Some(s) => (s.config.idle_timeout.min(s.config.page_idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(30)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if running.is_dead() || running.retired.load(Ordering::SeqCst) {
            return;
        }
        let idle = shared.config.idle_timeout;
        let expired: Vec<BrowserContextId> = {
            let mut contexts = lock(&shared.contexts);
            let keys: Vec<String> = contexts
                .iter()
                .filter(|(_, c)| {
                    c.generation == running.generation
                        && c.in_use == 0
                        && c.last_used.elapsed() >= idle
                })
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter()
                .filter_map(|k| contexts.remove(k))
                .map(|c| c.id)
                .collect()
        };
        let closed_any = !expired.is_empty();
        for id in expired {
            tracing::debug!("closing an idle browser context");
            dispose_context(&running, id).await;
        }
        if closed_any {
            shared.changed();
        }
        // A page costs a renderer process (tens of MiB): closed sooner than its context,
        // which is cheap and keeps the login.
        let page_idle = shared.config.page_idle_timeout;
        let accounts: Vec<Arc<AccountWork>> = lock(&shared.work).values().cloned().collect();
        for account in accounts {
            for slot in [&account.inpage, &*account.ui] {
                let Ok(mut page) = slot.try_lock() else {
                    continue;
                };
                // Only the slot holds it: no request is using it.
                let unused = page
                    .as_ref()
                    .is_some_and(|w| Arc::strong_count(w) == 1 && w.idle_for() >= page_idle);
                if unused {
                    tracing::debug!("closing an idle work page");
                    // Dropping the last handle closes the page.
                    page.take();
                    shared.changed();
                }
            }
        }
        drop(shared);
    }
}

/// What [`BrowserPool::ready_page`] needs to (re)open a work page.
struct Setup<'a> {
    running: &'a Arc<Running>,
    context: &'a BrowserContextId,
    req: &'a TierRequest,
    /// The session to inject: only into a context this pool did not have yet.
    inject: Option<&'a SessionData>,
    chat_url: String,
    fresh: Fresh,
}
