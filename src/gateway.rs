//! One chat request end to end: model → service → flow → account and session → replay, with
//! retries and account fallback, and a record of what happened.
//!
//! Phases: resolve (cached per service for a few seconds, so the hot path does not open the
//! vault per request) → start a replay on the first usable account → on a failure before any
//! token, classify it and retry, move to another account, or give up with a precise error →
//! hand the reply over as a stream that records its outcome when it ends or is dropped.
//!
//! Invariant: once a token has been handed over, nothing is retried or restarted.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use url::Url;

use crate::account_pool::{AccountPool, Limits, Permit};
use crate::browser::{LoginRequest, TierRequest};
use crate::conversations::{Continuation, Conversations, KeyBuilder, key_of};
use crate::flow::Flow;
use crate::inline::InlineCredentials;
use crate::learn::Learner;
use crate::openai::Role;
use crate::pinning::Pins;
use crate::renew::{RenewError, Renewer};
use crate::replay::client::{Call, DeltaStream, FailureKind, ReplayError, Replayer, Target};
use crate::replay::decode::Delta;
use crate::replay::render::Prompt;
use crate::store::accounts::Account;
use crate::store::events::{EventWriter, ExecutionEvent, Record};
use crate::store::sessions::Session;
use crate::store::{Store, StoreError};
use crate::tier_floor::{Start, TierFloors};

/// How long a service's resolved accounts, sessions and flow are reused.
const SERVICE_TTL: Duration = Duration::from_secs(2);
/// Attempts per account for network errors (with exponential backoff) and 5xx.
const NETWORK_ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(100);
/// After a tier failed on evidence, how soon a request tries it again (doubling per failed
/// try, up to the second figure; see `tier_floor`).
const FLOOR_FIRST_PROBE: Duration = Duration::from_secs(5);
const FLOOR_MAX_PROBE: Duration = Duration::from_secs(600);
/// Budget of a browser tier until the reply starts (and the longest silence within it),
/// unless configured.
const BROWSER_TIER_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("The model `{model}` does not exist. {}", available_models(.available))]
    UnknownModel {
        model: String,
        /// The models that can serve now.
        available: Vec<String>,
    },
    #[error(
        "No flow is known for `{0}` yet: learn it (`computetower learn`) or import one (`computetower flows import`)."
    )]
    NoFlow(String),
    #[error("No usable account for `{service}`: {reason}")]
    NoUsableAccount { service: String, reason: String },
    #[error("`{service}` needs a browser tier: {reason}")]
    NeedsBrowser { service: String, reason: String },
    #[error("`{service}` is rate limited on every account: {message}")]
    RateLimited {
        service: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("`{service}` failed: {source}")]
    Upstream {
        service: String,
        source: ReplayError,
    },
    #[error("internal error: {0}")]
    Store(#[from] StoreError),
}

/// The end of an unknown model's message: what can serve, or how to add a model.
pub fn available_models(available: &[String]) -> String {
    if available.is_empty() {
        return "No model can serve yet: add an account (`computetower account add --url URL \
                --name NAME`, or the Accounts page at /admin), then learn its flow \
                (`computetower learn NAME`)."
            .to_owned();
    }
    format!("Available models: {}.", available.join(", "))
}

/// An account the service may use: with a usable session, or one a login can give it.
#[derive(Debug)]
struct Candidate {
    account: Account,
    base: Url,
    session: Option<Session>,
    proxy: Option<String>,
    /// The origins the flow's calls may reach with this account's session.
    pins: Pins,
}

#[derive(Debug)]
struct ServiceState {
    flow: Arc<Flow>,
    /// Accounts with a usable session first, then those that need a login.
    candidates: Vec<Arc<Candidate>>,
    /// Why each unusable account is unusable.
    unusable: Vec<String>,
}

pub struct Gateway {
    store: Store,
    replayer: Replayer,
    events: EventWriter,
    renewer: Option<Arc<Renewer>>,
    accounts: AccountPool,
    conversations: Arc<Conversations>,
    learner: Option<Arc<Learner>>,
    /// Flow id → lowest tier worth trying (after an anti-bot refusal or a format drift).
    floors: Arc<TierFloors>,
    /// Services being re-learned in the background.
    relearning: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    services: moka::future::Cache<String, Arc<ServiceState>>,
    /// Service → origins the operator allows besides the account's (`[services.X]`).
    allowed_origins: BTreeMap<String, Vec<String>>,
    browser_tier_timeout: Duration,
}

impl Gateway {
    /// `renewer` logs accounts in with the browser when their session is missing or rejected;
    /// without it such accounts are reported unusable.
    pub fn new(
        store: Store,
        replayer: Replayer,
        events: EventWriter,
        renewer: Option<Arc<Renewer>>,
        learner: Option<Arc<Learner>>,
        limits: Limits,
    ) -> Self {
        Self {
            learner,
            floors: Arc::new(TierFloors::new(FLOOR_FIRST_PROBE, FLOOR_MAX_PROBE)),
            relearning: Arc::default(),
            conversations: Arc::new(Conversations::new(store.clone(), events.clone())),
            store,
            replayer,
            events,
            renewer,
            accounts: AccountPool::new(limits),
            services: moka::future::Cache::builder()
                .max_capacity(1024)
                .time_to_live(SERVICE_TTL)
                .build(),
            allowed_origins: BTreeMap::new(),
            browser_tier_timeout: BROWSER_TIER_TIMEOUT,
        }
    }

    /// How long a browser tier may wait for the reply to start, and within it.
    pub fn with_browser_tier_timeout(mut self, timeout: Duration) -> Self {
        self.browser_tier_timeout = timeout;
        self
    }

    /// Origins, per service, that flows may call besides the account's own.
    pub fn with_allowed_origins(mut self, origins: BTreeMap<String, Vec<String>>) -> Self {
        self.allowed_origins = origins;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn events(&self) -> &EventWriter {
        &self.events
    }

    pub fn renewer(&self) -> Option<&Arc<Renewer>> {
        self.renewer.as_ref()
    }

    /// Per-account load, queues and cooldowns.
    pub fn account_loads(&self) -> Vec<crate::account_pool::AccountLoad> {
        self.accounts.loads()
    }

    /// Forgets cached state so the next request reads the store (after an admin change).
    pub fn invalidate(&self) {
        self.services.invalidate_all();
    }

    /// The tier floor raised for `flow_id`, if any (for the admin page).
    pub fn tier_floor(&self, flow_id: &str) -> Option<crate::tier_floor::FloorView> {
        self.floors.floor(flow_id)
    }

    /// Model ids: the services that can serve (an enabled account and a flow).
    pub async fn models(&self) -> Result<Vec<String>, StoreError> {
        let mut services: Vec<String> = Vec::new();
        for account in self
            .store
            .accounts()
            .await?
            .into_iter()
            .filter(|a| a.enabled)
        {
            if !services.contains(&account.service)
                && self.store.active_flow(&account.service).await?.is_some()
            {
                services.push(account.service);
            }
        }
        Ok(services)
    }

    async fn service(&self, model: &str) -> Result<Arc<ServiceState>, GatewayError> {
        if let Some(state) = self.services.get(model).await {
            return Ok(state);
        }
        let accounts = self.store.accounts_for_service(model).await?;
        if accounts.is_empty() {
            return Err(GatewayError::UnknownModel {
                model: model.to_owned(),
                available: self.models().await?,
            });
        }
        let flow = self
            .store
            .active_flow(model)
            .await?
            .ok_or_else(|| GatewayError::NoFlow(model.to_owned()))?;
        let mut extra_origins = self.store.trusted_flow_origins(&flow.id).await?;
        extra_origins.extend(
            self.allowed_origins
                .get(model)
                .into_iter()
                .flatten()
                .cloned(),
        );
        let now = crate::store::now();
        let mut ready = Vec::new();
        let mut need_login = Vec::new();
        let mut unusable = Vec::new();
        for account in accounts {
            if !account.enabled {
                unusable.push(format!("account {} is disabled", account.id));
                continue;
            }
            let Ok(base) = Url::parse(&account.url) else {
                unusable.push(format!("account {} has an invalid URL", account.id));
                continue;
            };
            let session = self.store.latest_session(&account.id).await?;
            let problem = match &session {
                Some(s) if s.is_usable(now) => None,
                Some(s) if !s.authenticated => Some("the site rejected its session"),
                Some(_) => Some("its session has expired"),
                None => Some("it has no session"),
            };
            let proxy = self.store.account_proxy(&account.id).await?;
            let pins = Pins::new(&base, extra_origins.iter().map(String::as_str));
            match problem {
                None => ready.push(Arc::new(Candidate {
                    account,
                    base,
                    session,
                    proxy,
                    pins,
                })),
                Some(_) if self.renewer.is_some() => need_login.push(Arc::new(Candidate {
                    account,
                    base,
                    session: None,
                    proxy,
                    pins,
                })),
                Some(problem) => unusable.push(format!(
                    "account {}: {problem}; log in again (`computetower login {}`) or import cookies",
                    account.id, account.id
                )),
            }
        }
        ready.extend(need_login);
        let state = Arc::new(ServiceState {
            flow: Arc::new(flow),
            candidates: ready,
            unusable,
        });
        self.services.insert(model.to_owned(), state.clone()).await;
        Ok(state)
    }

    /// The tier a request on `flow` starts at, and whether it probes a raised floor: 1,
    /// unless the flow says direct replay cannot work, or a tier failed on evidence recently
    /// (then a request now and then tries the lower tier again, see `tier_floor`).
    fn start_tier(&self, flow: &Flow) -> (u8, bool) {
        let minimum = if flow.replay.needs_browser {
            flow.replay.min_tier.unwrap_or(2).clamp(2, 3)
        } else {
            1
        };
        match self.floors.start(&flow.id) {
            Start::At(floor) => (floor.max(minimum), false),
            Start::Probe { .. } if minimum > 1 => {
                // Nothing to probe below the flow's own minimum; the floor stays.
                self.floors.probe_failed(&flow.id);
                (minimum, false)
            }
            Start::Probe { .. } => (minimum, true),
        }
    }

    /// Tier 2 (`fetch()` in the account's page) or tier 3 (the site's own UI).
    async fn browser_tier(
        &self,
        tier: u8,
        candidate: &Candidate,
        session: &Session,
        flow: &Arc<Flow>,
        prompt: &Prompt,
    ) -> Result<DeltaStream, ReplayError> {
        let Some(renewer) = &self.renewer else {
            return Err(ReplayError::Unexpected {
                call: Call::Chat,
                kind: FailureKind::Flow,
                message: "direct replay failed and the browser is not enabled".into(),
            });
        };
        let account = &candidate.account;
        let password = self
            .store
            .account_password(&account.id)
            .await
            .ok()
            .flatten();
        let request = TierRequest {
            account_id: account.id.clone(),
            account_url: account.url.clone(),
            session: Some(session.data.clone()),
            login: Some(LoginRequest {
                account_id: account.id.clone(),
                url: account.url.clone(),
                email: account.email.clone(),
                password,
                proxy: candidate.proxy.clone(),
            }),
            flow: flow.clone(),
            pins: candidate.pins.clone(),
            prompt: prompt.clone(),
            timeout: self.browser_tier_timeout,
        };
        match tier {
            2 => renewer.pool().inpage(request).await,
            _ => renewer.pool().ui(request).await,
        }
    }

    /// Re-learns the account's service in the background (once at a time per service); the
    /// next request uses the new flow.
    fn relearn_in_background(&self, account: &Account, flow_id: &str) {
        let Some(learner) = self.learner.clone() else {
            return;
        };
        {
            let mut running = self.relearning.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(account.service.clone()) {
                return;
            }
        }
        let account = account.clone();
        let services = self.services.clone();
        let relearning = self.relearning.clone();
        let floors = self.floors.clone();
        let flow_id = flow_id.to_owned();
        // Detached on purpose: the request that noticed the drift is served by tier 3 and must
        // not wait for the learn.
        tokio::spawn(async move {
            match learner.learn(&account, &|_| {}).await {
                Ok(report) => {
                    tracing::info!(
                        service = %account.service,
                        version = report.flow.version,
                        verified = report.verification.ok,
                        "re-learned the flow after the site changed"
                    );
                    if report.verification.ok {
                        floors.lift(&flow_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(service = %account.service, error = %e, "re-learning failed")
                }
            }
            services.invalidate_all();
            relearning
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&account.service);
        });
    }

    /// The site conversation `prompt` continues, with the new turn alone to send.
    async fn continuation_of(&self, prompt: &Prompt) -> Option<(Arc<Continuation>, Prompt)> {
        let (last, earlier) = prompt.messages.split_last()?;
        if last.0 != Role::User || earlier.is_empty() {
            return None;
        }
        let known = self.conversations.find(&key_of(earlier)).await?;
        let new_turn = Prompt {
            messages: vec![last.clone()],
            model: prompt.model.clone(),
        };
        Some((known, new_turn))
    }

    /// The service of the account that inline credentials name, creating the account (or
    /// updating its password) as needed.
    pub async fn inline_account(
        &self,
        credentials: &InlineCredentials,
    ) -> Result<String, GatewayError> {
        let url = crate::store::accounts::parse_site_url(&credentials.url)?;
        let origin = url.origin();
        let existing = self.store.accounts().await?.into_iter().find(|a| {
            a.email.as_deref() == Some(credentials.email.as_str())
                && Url::parse(&a.url).is_ok_and(|u| u.origin() == origin)
        });
        let account = match existing {
            Some(account) => {
                let stored = self.store.account_password(&account.id).await?;
                if stored.as_deref() != Some(credentials.password.as_str()) {
                    self.store
                        .update_account(
                            &account.id,
                            crate::store::accounts::AccountUpdate {
                                password: Some(credentials.password.clone()),
                                ..Default::default()
                            },
                        )
                        .await?;
                    self.services.invalidate(&account.service).await;
                }
                account
            }
            None => {
                let account = self
                    .store
                    .add_account(crate::store::accounts::NewAccount {
                        url: credentials.url.clone(),
                        service: None,
                        email: Some(credentials.email.clone()),
                        password: Some(credentials.password.clone()),
                        proxy: None,
                    })
                    .await?;
                self.services.invalidate(&account.service).await;
                account
            }
        };
        Ok(account.service)
    }

    /// A fresh session for `account` through the browser; `None` when there is no browser or
    /// the login failed (the reason goes to `reasons`).
    async fn relogin(
        &self,
        request_id: &str,
        account: &Account,
        stale: Option<&Session>,
        reasons: &mut Vec<String>,
    ) -> Result<Option<Session>, GatewayError> {
        let Some(renewer) = &self.renewer else {
            return Ok(None);
        };
        self.decide(
            request_id,
            &account.service,
            &account.id,
            FailureKind::Auth,
            "relogin",
        );
        match renewer.renew(account, stale.map(|s| s.id.as_str())).await {
            Ok(renewed) => {
                self.services.invalidate(&account.service).await;
                Ok(Some(renewed.session))
            }
            Err(RenewError::Store(e)) => Err(e.into()),
            Err(e @ RenewError::Login { .. }) => {
                tracing::warn!(request_id, account = %account.id, error = %e, "re-login failed");
                reasons.push(e.to_string());
                Ok(None)
            }
        }
    }

    /// Starts a reply. Returns once the site's first text (or its end) has arrived, so any
    /// failure before that is an error here, not a broken stream.
    ///
    /// The rare paths (browser tiers, re-login) are boxed: an awaited future is stored inline
    /// in this one, which every request holds until its first token.
    ///
    /// `forced_tier` (1, 2 or 3; the API's `x-computetower-tier` header) runs that tier alone:
    /// no tier fallback, and no tier cooldown is raised for other requests, so comparing the
    /// tiers on one flow measures each of them and leaves the normal routing as it was.
    /// Retries, re-login and account hand-over still apply within the tier.
    pub async fn chat(
        &self,
        prompt: &Prompt,
        request_id: &str,
        forced_tier: Option<u8>,
    ) -> Result<Reply, GatewayError> {
        let started = Instant::now();
        let service = self.service(&prompt.model).await?;
        let name = prompt.model.clone();
        if let Some(tier) = forced_tier.filter(|t| *t >= 2)
            && self.renewer.is_none()
        {
            return Err(GatewayError::NeedsBrowser {
                service: name,
                reason: format!(
                    "tier {tier} was asked for, and the browser is not enabled on this server"
                ),
            });
        }
        if forced_tier.is_none() && service.flow.replay.needs_browser && self.renewer.is_none() {
            let reason = service
                .flow
                .replay
                .reason
                .clone()
                .unwrap_or_else(|| "direct replay does not work for this site".into());
            return Err(GatewayError::NeedsBrowser {
                service: name,
                reason: format!("{reason}; the browser is not enabled on this server"),
            });
        }
        if service.candidates.is_empty() {
            return Err(GatewayError::NoUsableAccount {
                service: name,
                reason: service.unusable.join("; "),
            });
        }
        let mut reasons = service.unusable.clone();
        let mut rate_limited: Option<(String, Option<u64>)> = None;
        let no_conversation = BTreeMap::new();
        let keeps_conversations = keeps_conversations(&service.flow);
        let continuation = match keeps_conversations {
            true => self.continuation_of(prompt).await,
            false => None,
        };
        // How the site's own page sends a later turn, when the learner saw one.
        let follow_up = continuation
            .as_ref()
            .and_then(|_| service.flow.follow_up_flow());
        let ids: Vec<&str> = service
            .candidates
            .iter()
            .map(|c| c.account.id.as_str())
            .collect();
        let mut order = self.accounts.order(&ids);
        if let Some((known, _)) = &continuation {
            // The site conversation lives on one account: try it first.
            order.sort_by_key(|i| service.candidates[*i].account.id != known.account_id);
        }
        for index in order {
            let candidate = &service.candidates[index];
            let account = &candidate.account;
            let mut continuing = continuation
                .as_ref()
                .filter(|(known, _)| known.account_id == account.id);
            // Waits in the account's queue when its slots are taken; a full queue or a
            // cooldown moves on to the next account.
            let permit = match self.accounts.acquire(&account.id).await {
                Ok(permit) => permit,
                Err(busy) => {
                    // When every account is busy, the soonest one decides the Retry-After.
                    let retry_after = busy.retry_after();
                    if rate_limited
                        .as_ref()
                        .is_none_or(|(_, r)| r.is_none_or(|r| retry_after < r))
                    {
                        rate_limited = Some((busy.to_string(), Some(retry_after)));
                    }
                    self.decide(
                        request_id,
                        &name,
                        &account.id,
                        FailureKind::RateLimit,
                        "next_account",
                    );
                    continue;
                }
            };
            let mut relogged = false;
            let mut session = match &candidate.session {
                Some(session) => session.clone(),
                None => {
                    relogged = true;
                    match Box::pin(self.relogin(request_id, account, None, &mut reasons)).await? {
                        Some(session) => session,
                        None => continue,
                    }
                }
            };
            // `probing`: this request tries tier 1 below the flow's raised floor.
            let (mut tier, mut probing) = match forced_tier {
                Some(tier) => (tier, false),
                None => self.start_tier(&service.flow),
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let carried;
                let (flow, send, known) = match (continuing, &follow_up, &service.flow.follow_up) {
                    (Some((known, new_turn)), Some(next), Some(spec)) => {
                        carried = spec.carried(&known.values);
                        let send = if spec.resends_history {
                            prompt
                        } else {
                            new_turn
                        };
                        (next, send, &carried)
                    }
                    (Some((known, new_turn)), _, _) => (&*service.flow, new_turn, &known.values),
                    (None, _, _) => (&*service.flow, prompt, &no_conversation),
                };
                let target = Target {
                    base: &candidate.base,
                    session: &session.data,
                    proxy: candidate.proxy.as_deref(),
                    conversation: known,
                    session_id: Some(&session.id),
                    pins: &candidate.pins,
                };
                let mut extracted = BTreeMap::new();
                let started_tier = if tier == 1 {
                    self.replayer.start(flow, send, target).await.map(|replay| {
                        if replay.jar_changed {
                            self.keep_rotated_cookies(&session, replay.jar.cookies());
                        }
                        extracted = replay.extracted;
                        replay.deltas
                    })
                } else {
                    // The browser tiers run the site's own conversation handling: they get
                    // the whole prompt.
                    Box::pin(self.browser_tier(tier, candidate, &session, &service.flow, prompt))
                        .await
                };
                let result = match started_tier {
                    Ok(deltas) => first_text(deltas).await,
                    Err(e) => Err(e),
                };
                let error = match result {
                    Ok((head, rest)) => {
                        let ttft = started.elapsed();
                        crate::telemetry::first_token(&name, tier, ttft.as_secs_f64());
                        self.accounts.record(&account.id, true);
                        if probing {
                            tracing::info!(service = %name, flow = %service.flow.id, "direct replay works again; the tier floor is lifted");
                            self.floors.probe_worked(&service.flow.id);
                        }
                        let queue_ms = permit.waited.as_millis() as i64;
                        let tracker = (keeps_conversations && tier == 1).then(|| {
                            count_turn(&mut extracted);
                            let mut key = KeyBuilder::default();
                            for (role, text) in &prompt.messages {
                                key.push(*role, text);
                            }
                            key.open(Role::Assistant);
                            Tracker {
                                key,
                                values: extracted,
                                account_id: account.id.clone(),
                                conversations: self.conversations.clone(),
                            }
                        });
                        let detail = match (continuing.is_some(), relogged) {
                            (true, _) => Some("continued the site conversation".to_owned()),
                            (false, true) => Some("after a fresh login".to_owned()),
                            _ => None,
                        };
                        return Ok(Reply {
                            head,
                            rest,
                            tier,
                            tracker,
                            _permit: Some(permit),
                            ending: None,
                            record: Some(Outcome {
                                event: ExecutionEvent {
                                    request_id: request_id.to_owned(),
                                    service: name.clone(),
                                    account_id: Some(account.id.clone()),
                                    flow_id: Some(service.flow.id.clone()),
                                    tier: Some(i64::from(tier)),
                                    outcome: "ok".into(),
                                    status: Some(200),
                                    ttft_ms: Some(ttft.as_millis() as i64),
                                    latency_ms: None,
                                    queue_ms: Some(queue_ms),
                                    detail,
                                },
                                started,
                                writer: self.events.clone(),
                            }),
                        });
                    }
                    Err(e) => e,
                };
                let kind = error.kind();
                self.record_failure(request_id, &name, &account.id, &error, started, tier);
                if probing {
                    probing = false;
                    self.floors.probe_failed(&service.flow.id);
                }
                // Tier fallback first: a refusal of direct replay is not the account's fault.
                // A floor is raised only on evidence that the tier cannot work for the flow
                // (a refusal, a reply it cannot read); a blip moves this request alone.
                match (tier, kind) {
                    _ if forced_tier.is_some() => {}
                    (1, FailureKind::AntiBot) => {
                        self.floors.raise(&service.flow.id, 2);
                        self.decide(request_id, &name, &account.id, kind, "tier_2");
                        tier = 2;
                        attempt = 0;
                        continue;
                    }
                    (1, FailureKind::FormatDrift) if self.renewer.is_some() => {
                        self.floors.raise(&service.flow.id, 3);
                        self.decide(request_id, &name, &account.id, kind, "tier_3_and_relearn");
                        self.relearn_in_background(account, &service.flow.id);
                        tier = 3;
                        attempt = 0;
                        continue;
                    }
                    (2, FailureKind::AntiBot | FailureKind::FormatDrift | FailureKind::Flow) => {
                        self.floors.raise(&service.flow.id, 3);
                        self.decide(request_id, &name, &account.id, kind, "tier_3");
                        tier = 3;
                        attempt = 0;
                        continue;
                    }
                    (2, FailureKind::Network | FailureKind::Upstream) => {
                        self.decide(request_id, &name, &account.id, kind, "tier_3");
                        tier = 3;
                        attempt = 0;
                        continue;
                    }
                    _ => {}
                }
                if continuing.is_some()
                    && matches!(
                        kind,
                        FailureKind::FormatDrift | FailureKind::Upstream | FailureKind::Flow
                    )
                {
                    // The site no longer knows that conversation: start a new one.
                    self.decide(request_id, &name, &account.id, kind, "new_conversation");
                    continuing = None;
                    attempt = 0;
                    continue;
                }
                self.accounts.record(&account.id, false);
                match kind {
                    FailureKind::Network if attempt < NETWORK_ATTEMPTS => {
                        self.decide(request_id, &name, &account.id, kind, "retry");
                        tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
                    }
                    FailureKind::Upstream if attempt < 2 && is_status(&error) => {
                        self.decide(request_id, &name, &account.id, kind, "retry");
                    }
                    FailureKind::Auth => {
                        Box::pin(self.store.mark_session_rejected(&session.id)).await?;
                        self.services.invalidate(&name).await;
                        if !relogged {
                            relogged = true;
                            if let Some(fresh) = Box::pin(self.relogin(
                                request_id,
                                account,
                                Some(&session),
                                &mut reasons,
                            ))
                            .await?
                            {
                                session = fresh;
                                attempt = 0;
                                continue;
                            }
                        }
                        self.decide(request_id, &name, &account.id, kind, "next_account");
                        reasons.push(format!(
                            "the site rejected the session of account {} ({error}); log in again",
                            account.id
                        ));
                        break;
                    }
                    FailureKind::RateLimit => {
                        self.decide(request_id, &name, &account.id, kind, "next_account");
                        let retry_after = error.retry_after();
                        self.accounts
                            .cool_down(&account.id, retry_after.map(Duration::from_secs));
                        rate_limited = Some((error.to_string(), retry_after));
                        break;
                    }
                    _ => {
                        self.decide(request_id, &name, &account.id, kind, "fail");
                        return Err(GatewayError::Upstream {
                            service: name,
                            source: error,
                        });
                    }
                }
            }
        }
        if let Some((message, retry_after)) = rate_limited {
            return Err(GatewayError::RateLimited {
                service: name,
                message,
                retry_after,
            });
        }
        Err(GatewayError::NoUsableAccount {
            service: name,
            reason: reasons.join("; "),
        })
    }

    /// Sites rotate cookies; keeping the new ones keeps the session alive.
    fn keep_rotated_cookies(&self, session: &Session, cookies: Vec<crate::session::Cookie>) {
        let store = self.store.clone();
        let session_id = session.id.clone();
        let mut data = session.data.clone();
        data.cookies = cookies;
        // Detached: a slow write must not delay the reply; failure only costs a cookie refresh.
        tokio::spawn(async move {
            if let Err(e) = store.update_session_data(&session_id, &data).await {
                tracing::warn!(session = %session_id, error = %e, "could not keep rotated cookies");
            }
        });
    }

    fn record_failure(
        &self,
        request_id: &str,
        service: &str,
        account_id: &str,
        error: &ReplayError,
        started: Instant,
        tier: u8,
    ) {
        tracing::info!(request_id, service, account = account_id, kind = error.kind().as_str(), error = %error, "replay failed");
        crate::telemetry::attempt_failed(service, tier, error.kind().as_str());
        self.events.record(Record::Execution(ExecutionEvent {
            request_id: request_id.to_owned(),
            service: service.to_owned(),
            account_id: Some(account_id.to_owned()),
            flow_id: None,
            tier: Some(i64::from(tier)),
            outcome: error.kind().as_str().to_owned(),
            status: match error {
                ReplayError::Status { status, .. } => Some(i64::from(*status)),
                _ => None,
            },
            ttft_ms: None,
            latency_ms: Some(started.elapsed().as_millis() as i64),
            queue_ms: None,
            detail: Some(error.to_string()),
        }));
    }

    fn decide(
        &self,
        request_id: &str,
        service: &str,
        account_id: &str,
        failure: FailureKind,
        action: &str,
    ) {
        crate::telemetry::decision(service, failure.as_str(), action);
        self.events.record(Record::Decision {
            request_id: request_id.to_owned(),
            service: service.to_owned(),
            account_id: Some(account_id.to_owned()),
            failure: failure.as_str().to_owned(),
            action: action.to_owned(),
        });
    }
}

/// Whether the flow knows the site's conversations: it creates them in a preflight or the
/// reply names them. Otherwise every request is a new site conversation with the history
/// flattened into the prompt.
fn keeps_conversations(flow: &Flow) -> bool {
    flow.follow_up.is_some()
        || !flow.response.ids.is_empty()
        || flow.preflight.iter().any(|s| !s.extract.is_empty())
}

/// Counts the turn just sent among the values remembered of its site conversation (a flow's
/// `turn` counter reads it).
fn count_turn(values: &mut BTreeMap<String, String>) {
    let before: u32 = values
        .get(crate::flow::TURNS)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    values.insert(crate::flow::TURNS.to_owned(), (before + 1).to_string());
}

/// Remembers the site conversation when a reply completes.
struct Tracker {
    key: KeyBuilder,
    values: BTreeMap<String, String>,
    account_id: String,
    conversations: Arc<Conversations>,
}

fn is_status(error: &ReplayError) -> bool {
    matches!(error, ReplayError::Status { .. })
}

/// Pulls deltas until the first text, reasoning or end, so failures before it surface as
/// errors. Returns what was pulled and the rest.
async fn first_text(
    mut deltas: DeltaStream,
) -> Result<(VecDeque<Delta>, DeltaStream), ReplayError> {
    let mut head = VecDeque::new();
    while let Some(item) = deltas.next().await {
        let delta = item?;
        let substantive = matches!(delta, Delta::Text(_) | Delta::Reasoning(_) | Delta::Done);
        head.push_back(delta);
        if substantive {
            break;
        }
    }
    Ok((head, deltas))
}

/// A reply's last item, and what says its record is written.
type Ending = (
    tokio::sync::oneshot::Receiver<()>,
    Option<Result<Delta, ReplayError>>,
);

/// The record written when a reply ends, fails or is dropped.
struct Outcome {
    event: ExecutionEvent,
    started: Instant,
    writer: EventWriter,
}

/// A reply in progress. Recording its outcome is tied to its end: completion, error, or the
/// client going away (drop).
pub struct Reply {
    head: VecDeque<Delta>,
    rest: DeltaStream,
    /// The tier that serves it (1 direct replay, 2 in-page `fetch()`, 3 the site's UI).
    tier: u8,
    /// Feeds the conversation key as the reply streams (no copy of the reply is kept).
    tracker: Option<Tracker>,
    /// The account slot, held until the reply ends or is dropped.
    _permit: Option<Permit>,
    record: Option<Outcome>,
    /// The reply's last item, held back until its record is written, so that a reply the
    /// client saw end is never missing from the store (even if the process dies right after).
    ending: Option<Ending>,
}

impl Reply {
    pub fn account_id(&self) -> Option<&str> {
        self.record.as_ref()?.event.account_id.as_deref()
    }

    /// The tier that serves this reply; unlike the record, known until the reply is dropped.
    pub fn tier(&self) -> u8 {
        self.tier
    }

    /// Ends the reply before the site has, because the client's answer is complete (a stop
    /// sequence or a token limit was reached): recorded as `ok` with `why`; dropping it then
    /// cancels the site's call.
    pub fn end_early(mut self, why: &str) {
        self.finish("ok", Some(why.to_owned()), false);
    }

    /// Records the outcome; with `durably`, returns what completes once it is written.
    fn finish(
        &mut self,
        outcome: &str,
        detail: Option<String>,
        durably: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let mut record = self.record.take()?;
        crate::telemetry::reply_ended(&record.event.service, self.tier, outcome);
        record.event.outcome = outcome.to_owned();
        if detail.is_some() {
            record.event.detail = detail;
        }
        record.event.latency_ms = Some(record.started.elapsed().as_millis() as i64);
        let event = Record::Execution(record.event);
        if durably {
            return record.writer.record_durably(event);
        }
        record.writer.record(event);
        None
    }
}

impl Stream for Reply {
    type Item = Result<Delta, ReplayError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some((written, _)) = &mut self.ending {
            if Pin::new(written).poll(cx).is_pending() {
                return Poll::Pending;
            }
            let last = self.ending.take().and_then(|(_, last)| last);
            return Poll::Ready(last);
        }
        let next = if let Some(delta) = self.head.pop_front() {
            Some(Ok(delta))
        } else if self.record.is_none() {
            return Poll::Ready(None);
        } else {
            match self.rest.poll_next_unpin(cx) {
                Poll::Ready(next) => next,
                Poll::Pending => return Poll::Pending,
            }
        };
        let written = match &next {
            Some(Ok(Delta::Text(text))) => {
                if let Some(tracker) = &mut self.tracker {
                    tracker.key.text(text);
                }
                None
            }
            Some(Ok(Delta::Id { name, value })) => {
                if let Some(tracker) = &mut self.tracker {
                    tracker.values.insert(name.clone(), value.clone());
                }
                None
            }
            None | Some(Ok(Delta::Done)) => {
                self.remember_conversation();
                self.finish("ok", None, true)
            }
            Some(Err(e)) => {
                let kind = e.kind().as_str();
                let detail = e.to_string();
                self.tracker = None;
                self.finish(kind, Some(detail), true)
            }
            Some(Ok(Delta::Reasoning(_))) => None,
        };
        match written {
            // The end waits for its record (one SQLite commit, shared with whatever else
            // is queued).
            Some(written) => {
                self.ending = Some((written, next));
                self.poll_next(cx)
            }
            None => Poll::Ready(next),
        }
    }
}

impl Reply {
    fn remember_conversation(&mut self) {
        let (Some(tracker), Some(record)) = (self.tracker.take(), self.record.as_ref()) else {
            return;
        };
        let mut key = tracker.key;
        key.close();
        tracker.conversations.remember(
            record.event.request_id.clone(),
            record.event.service.clone(),
            key.finish(),
            Continuation {
                account_id: tracker.account_id,
                values: tracker.values,
            },
        );
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.finish("cancelled", Some("the client went away".into()), false);
    }
}
