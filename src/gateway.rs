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
use crate::fallback::{self, Next, Situation};
use crate::flow::Flow;
use crate::inline::InlineCredentials;
use crate::learn::Learner;
use crate::pinning::Pins;
use crate::renew::{RenewError, Renewer};
use crate::replay::DeltaStream;
use crate::replay::client::{Replayer, Target};
use crate::replay::decode::Delta;
use crate::replay::failure::{Call, FailureKind, ReplayError};
use crate::replay::plan::Started;
use crate::replay::render::{Prompt, PromptFile};
use crate::role::Role;
use crate::shared::{Change, Shared};
use crate::store::accounts::Account;
use crate::store::events::{EventWriter, ExecutionEvent, Record};
use crate::store::sessions::Session;
use crate::store::{Store, StoreError};
use crate::tier_floor::{Start, TierFloors};

/// How long a service's resolved accounts, sessions and flow are reused.
const SERVICE_TTL: Duration = Duration::from_secs(2);
/// After a tier failed on evidence, how soon a request tries it again (doubling per failed
/// try, up to the second figure; see `tier_floor`).
const FLOOR_FIRST_PROBE: Duration = Duration::from_secs(5);
const FLOOR_MAX_PROBE: Duration = Duration::from_secs(600);
/// Budget of a browser tier until the reply starts (and the longest silence within it),
/// unless configured.
const BROWSER_TIER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a background re-learn waits for another instance's browser work on the account.
const RELEARN_WAIT: Duration = Duration::from_secs(300);

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
    /// An image or file the service cannot take (no upload step, a type the site does not
    /// accept, a file the site refused); `at` names the part.
    #[error("{message}")]
    Attachment {
        at: String,
        code: &'static str,
        message: String,
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
    accounts: Arc<AccountPool>,
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
    /// What other instances on the same store are told and heard from (PostgreSQL only).
    shared: Option<Arc<Shared>>,
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
            accounts: Arc::new(AccountPool::new(limits)),
            services: moka::future::Cache::builder()
                .max_capacity(1024)
                .time_to_live(SERVICE_TTL)
                .build(),
            allowed_origins: BTreeMap::new(),
            browser_tier_timeout: BROWSER_TIER_TIMEOUT,
            shared: None,
        }
    }

    /// Shares 429 cooldowns, tier floors and re-learned flows with the other instances on
    /// the store, and follows theirs (until the gateway is dropped).
    pub fn with_shared(mut self, shared: Arc<Shared>) -> Self {
        let floors = self.floors.clone();
        let services = self.services.clone();
        let clock = shared.clone();
        shared.clone().follow(
            Arc::downgrade(&self.accounts),
            move |accounts: &AccountPool, change: &Change| match change {
                Change::Cooldown { account, until_ms } => {
                    let left = until_ms.saturating_sub(clock.now());
                    if let Ok(left @ 1..) = u64::try_from(left) {
                        accounts.cool_down_at_least(account, Duration::from_millis(left));
                    }
                }
                Change::FloorRaised { flow, tier } => floors.raise(flow, *tier),
                Change::FloorLifted { flow } => floors.lift(flow),
                Change::FlowChanged { .. } => services.invalidate_all(),
            },
        );
        self.shared = Some(shared);
        self
    }

    /// Counts each account's replies in the store too, so its limit holds across the
    /// instances sharing it.
    pub fn with_shared_slots(self, slots: Arc<crate::slots::Slots>) -> Self {
        self.accounts.share_slots(slots);
        self
    }

    /// Gives up what this instance holds in the store (account leases, slots), so other
    /// instances take over at once rather than when it expires. For after the last reply.
    pub async fn release_holds(&self) {
        if let Some(renewer) = &self.renewer {
            renewer.leases().release_all().await;
        }
        self.accounts.release_shared().await;
    }

    /// Tells the other instances, if any.
    fn share(&self, change: Change) {
        if let Some(shared) = &self.shared {
            shared.publish(change);
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

    /// What this instance shares with the others on its store, if it does.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
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

    /// Tier 2 (`fetch()` in the account's page, continuing `known` as tier 1 does) or tier 3
    /// (the site's own UI, which continues its conversations itself).
    async fn browser_tier(
        &self,
        tier: u8,
        candidate: &Candidate,
        session: &Session,
        flow: Arc<Flow>,
        prompt: &Prompt,
        known: &BTreeMap<String, String>,
    ) -> Result<Started, ReplayError> {
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
            flow,
            pins: candidate.pins.clone(),
            prompt: prompt.clone(),
            conversation: known.clone(),
            session_id: Some(session.id.clone()),
            reused: self.replayer.reused(),
            uploads: Some(self.replayer.uploads()),
            timeout: self.browser_tier_timeout,
        };
        // The account's browser work is one instance's at a time; the lease is held until
        // the reply ends (it streams from this instance's page).
        let lease = renewer
            .hold(&account.id, self.browser_tier_timeout)
            .await
            .map_err(|e| ReplayError::Unexpected {
                call: Call::Chat,
                kind: FailureKind::Upstream,
                message: e.to_string(),
            })?;
        let started = match tier {
            2 => crate::browser::in_page_tier(renewer.pool(), request).await,
            _ => crate::browser::ui_tier(renewer.pool(), request).await,
        }?;
        Ok(Started {
            deltas: Box::pin(started.deltas.map(move |delta| {
                let _held = &lease;
                delta
            })),
            extracted: started.extracted,
        })
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
        let shared = self.shared.clone();
        let store = self.store.clone();
        let renewer = self.renewer.clone();
        let flow_id = flow_id.to_owned();
        // Detached on purpose: the request that noticed the drift is served by tier 3 and must
        // not wait for the learn.
        tokio::spawn(async move {
            // Another instance that saw the drift may be re-learning the service already:
            // after its learn (under the account's lease), the active flow is a new one.
            let _lease = match &renewer {
                Some(renewer) => renewer.hold(&account.id, RELEARN_WAIT).await.ok(),
                None => None,
            };
            let current = store.active_flow(&account.service).await.ok().flatten();
            let result = match current {
                Some(flow) if flow.id != flow_id => {
                    tracing::info!(service = %account.service, version = flow.version, "the flow was re-learned meanwhile (by another instance)");
                    None
                }
                _ => Some(learner.learn(&account, &|_| {}).await),
            };
            match result {
                None => {}
                Some(Ok(report)) => {
                    tracing::info!(
                        service = %account.service,
                        version = report.flow.version,
                        verified = report.verification.ok,
                        "re-learned the flow after the site changed"
                    );
                    if report.verification.ok {
                        floors.lift(&flow_id);
                        if let Some(shared) = &shared {
                            shared.publish(Change::FloorLifted {
                                flow: flow_id.clone(),
                            });
                        }
                    }
                    if let Some(shared) = &shared {
                        shared.publish(Change::FlowChanged {
                            service: account.service.clone(),
                        });
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(service = %account.service, error = %e, "re-learning failed")
                }
            }
            drop(_lease);
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
        let keyed = prompt.keyed_messages();
        let known = self
            .conversations
            .find(&key_of(&keyed[..earlier.len()]))
            .await?;
        let last_index = earlier.len();
        let new_turn = Prompt {
            messages: vec![last.clone()],
            model: prompt.model.clone(),
            // Files of earlier turns are in the site's conversation already.
            attachments: prompt
                .attachments
                .iter()
                .filter(|a| a.turn == last_index)
                .map(|a| PromptFile {
                    turn: 0,
                    ..a.clone()
                })
                .collect(),
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
        match renewer.renew(account, stale).await {
            Ok(renewed) => {
                self.services.invalidate(&account.service).await;
                Ok(Some(renewed.session))
            }
            Err(RenewError::Store(e)) => Err(e.into()),
            Err(e @ (RenewError::Login { .. } | RenewError::Busy(_))) => {
                tracing::warn!(request_id, account = %account.id, error = %e, "re-login failed");
                reasons.push(e.to_string());
                Ok(None)
            }
        }
    }

    /// Starts a reply. Returns once the site's first text (or its end) has arrived, so any
    /// failure before that is an error here, not a broken stream.
    ///
    /// The phases of a request, each its own function: [`Gateway::resolve`] (model →
    /// service, flow and accounts), then per account in the pool's order
    /// [`Gateway::admit`] (a slot), [`Gateway::session_for`] (a session, logging in if
    /// needed), then [`Gateway::attempt`] (one try of a tier up to its first token) and, on
    /// failure, [`Gateway::decide_next`] (the policy of `fallback`, carried out), until
    /// [`Gateway::hand_over`] returns the reply.
    ///
    /// `forced_tier` (1, 2 or 3; the API's `x-computetower-tier` header) runs that tier alone:
    /// no tier fallback, and no tier floor is raised for other requests, so comparing the
    /// tiers on one flow measures each of them and leaves the normal routing as it was.
    /// Retries, re-login and account hand-over still apply within the tier.
    pub async fn chat(
        &self,
        prompt: &Prompt,
        request_id: &str,
        forced_tier: Option<u8>,
    ) -> Result<Reply, GatewayError> {
        let started = Instant::now();
        let service = self.resolve(&prompt.model, forced_tier).await?;
        let as_text;
        let prompt = match check_attachments(&service.flow, prompt)? {
            Files::Send => prompt,
            Files::AsText => {
                as_text = prompt.files_as_text();
                &as_text
            }
        };
        let mut request = self
            .request(prompt, request_id, forced_tier, &service, started)
            .await;
        for index in self.account_order(&service, &request) {
            let candidate = &service.candidates[index];
            let Some(permit) = self.admit(&mut request, candidate).await else {
                continue;
            };
            let Some(mut attempt) =
                Box::pin(self.session_for(&mut request, &service, candidate)).await?
            else {
                continue;
            };
            loop {
                let error = match self.attempt(&request, &service, candidate, &attempt).await {
                    Ok(first) => {
                        return Ok(
                            self.hand_over(&request, &service, candidate, &attempt, first, permit)
                        );
                    }
                    Err(error) => error,
                };
                match Box::pin(self.decide_next(
                    &mut request,
                    &service,
                    candidate,
                    &mut attempt,
                    error,
                ))
                .await?
                {
                    Carry::On => {}
                    Carry::NextAccount => break,
                    Carry::Fail(error) => return Err(error),
                }
            }
        }
        Err(request.exhausted())
    }

    /// Phase 1: the service's state, and whether this server can serve it at all.
    async fn resolve(
        &self,
        model: &str,
        forced_tier: Option<u8>,
    ) -> Result<Arc<ServiceState>, GatewayError> {
        let service = self.service(model).await?;
        let name = model.to_owned();
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
        Ok(service)
    }

    /// What the request carries from account to account: the site conversation it continues
    /// (and the learned way a later turn is sent), and why accounts were passed over.
    async fn request<'a>(
        &self,
        prompt: &'a Prompt,
        request_id: &'a str,
        forced_tier: Option<u8>,
        service: &ServiceState,
        started: Instant,
    ) -> Request<'a> {
        let keeps_conversations = keeps_conversations(&service.flow);
        let continuation = match keeps_conversations {
            true => self.continuation_of(prompt).await.map(Arc::new),
            false => None,
        };
        // How the site's own page sends a later turn, when the learner saw one.
        let follow_up = continuation
            .as_ref()
            .and_then(|_| service.flow.follow_up_flow());
        Request {
            prompt,
            request_id,
            name: prompt.model.clone(),
            forced_tier,
            started,
            keeps_conversations,
            continuation,
            follow_up,
            reasons: service.unusable.clone(),
            rate_limited: None,
        }
    }

    /// The accounts to try, least loaded first; the one holding the continued site
    /// conversation before all.
    fn account_order(&self, service: &ServiceState, request: &Request<'_>) -> Vec<usize> {
        let ids: Vec<&str> = service
            .candidates
            .iter()
            .map(|c| c.account.id.as_str())
            .collect();
        let mut order = self.accounts.order(&ids);
        if let Some(continued) = &request.continuation {
            order.sort_by_key(|i| service.candidates[*i].account.id != continued.0.account_id);
        }
        order
    }

    /// Phase 2: a slot on the account, waiting in its queue when all are taken; a full queue
    /// or a cooldown passes to the next account (`None`).
    async fn admit(&self, request: &mut Request<'_>, candidate: &Candidate) -> Option<Permit> {
        let account = &candidate.account;
        match self.accounts.acquire(&account.id).await {
            Ok(permit) => Some(permit),
            Err(busy) => {
                // When every account is busy, the soonest one decides the Retry-After.
                let retry_after = busy.retry_after();
                if request
                    .rate_limited
                    .as_ref()
                    .is_none_or(|(_, r)| r.is_none_or(|r| retry_after < r))
                {
                    request.rate_limited = Some((busy.to_string(), Some(retry_after)));
                }
                self.decide(
                    request.request_id,
                    &request.name,
                    &account.id,
                    FailureKind::RateLimit,
                    "next_account",
                );
                None
            }
        }
    }

    /// Phase 3: the account's session (logging in when it has none) and the tier to start
    /// at; `None` passes to the next account.
    async fn session_for(
        &self,
        request: &mut Request<'_>,
        service: &ServiceState,
        candidate: &Candidate,
    ) -> Result<Option<Attempt>, GatewayError> {
        let account = &candidate.account;
        let mut relogged = false;
        let session = match &candidate.session {
            Some(session) => session.clone(),
            None => {
                relogged = true;
                self.decide(
                    request.request_id,
                    &request.name,
                    &account.id,
                    FailureKind::Auth,
                    "relogin",
                );
                match self
                    .relogin(request.request_id, account, None, &mut request.reasons)
                    .await?
                {
                    Some(session) => session,
                    None => return Ok(None),
                }
            }
        };
        // `probing`: this request tries tier 1 below the flow's raised floor.
        let (tier, probing) = match request.forced_tier {
            Some(tier) => (tier, false),
            None => self.start_tier(&service.flow),
        };
        Ok(Some(Attempt {
            session,
            tier,
            number: 1,
            probing,
            relogged,
            continuing: request.continues_on(&account.id),
        }))
    }

    /// Phase 4: one try of the attempt's tier, up to the site's first text (or its end).
    async fn attempt(
        &self,
        request: &Request<'_>,
        service: &ServiceState,
        candidate: &Candidate,
        attempt: &Attempt,
    ) -> Result<FirstText, ReplayError> {
        let no_conversation = BTreeMap::new();
        let carried;
        let continuing = attempt.continuing.as_deref();
        let resent;
        let (flow, send, known) = match (continuing, &request.follow_up, &service.flow.follow_up) {
            (Some((known, new_turn)), Some(next), Some(spec)) => {
                carried = spec.carried(&known.values);
                let send = match spec.resends_history {
                    // The history's text goes again, its files do not: the site has them.
                    true if request.prompt.attachments.len() != new_turn.attachments.len() => {
                        resent = Prompt {
                            attachments: request
                                .prompt
                                .attachments
                                .iter()
                                .filter(|a| a.turn + 1 == request.prompt.messages.len())
                                .cloned()
                                .collect(),
                            ..request.prompt.clone()
                        };
                        &resent
                    }
                    true => request.prompt,
                    false => new_turn,
                };
                (next, send, &carried)
            }
            (Some((known, new_turn)), _, _) => (&*service.flow, new_turn, &known.values),
            (None, _, _) => (&*service.flow, request.prompt, &no_conversation),
        };
        let session = &attempt.session;
        let (deltas, extracted) = if attempt.tier == 1 {
            let target = Target {
                base: &candidate.base,
                session: &session.data,
                proxy: candidate.proxy.as_deref(),
                conversation: known,
                session_id: Some(&session.id),
                pins: &candidate.pins,
            };
            let replay = self
                .replayer
                .start(flow, send, target)
                .await
                .map_err(|e| e.naming_file(&send.attachments))?;
            if replay.jar_changed {
                self.keep_rotated_cookies(session, replay.jar.cookies());
            }
            (replay.deltas, replay.extracted)
        } else {
            // Tier 2 makes the flow's own calls, so it continues the site conversation as tier
            // 1 does; tier 3 runs the site's own conversation handling and gets the whole
            // prompt. Boxed: a rare path, kept out of the future every request holds.
            let (flow, send, known) = match attempt.tier {
                2 if std::ptr::eq(flow, &*service.flow) => (service.flow.clone(), send, known),
                2 => (Arc::new(flow.clone()), send, known),
                _ => (service.flow.clone(), request.prompt, &no_conversation),
            };
            let tier = attempt.tier;
            let started = Box::pin(self.browser_tier(tier, candidate, session, flow, send, known))
                .await
                .map_err(|e| e.naming_file(&send.attachments))?;
            (started.deltas, started.extracted)
        };
        let (head, rest) = first_text(deltas).await?;
        Ok(FirstText {
            head,
            rest,
            extracted,
        })
    }

    /// Phase 5, on failure: what the fallback policy says, carried out.
    async fn decide_next(
        &self,
        request: &mut Request<'_>,
        service: &ServiceState,
        candidate: &Candidate,
        attempt: &mut Attempt,
        error: ReplayError,
    ) -> Result<Carry, GatewayError> {
        let account = &candidate.account;
        let (name, request_id) = (request.name.clone(), request.request_id);
        let kind = error.kind();
        self.record_failure(
            request_id,
            &name,
            &account.id,
            &error,
            request.started,
            attempt.tier,
        );
        if let ReplayError::FileRefused { at, .. } = &error {
            return Err(GatewayError::Attachment {
                at: at.clone(),
                code: "file_refused",
                message: format!(
                    "{error}. The file was not taken; nothing was sent to the chat. Check its \
                     type and size against what the site accepts."
                ),
            });
        }
        if std::mem::take(&mut attempt.probing) {
            self.floors.probe_failed(&service.flow.id);
        }
        let situation = Situation {
            forced: request.forced_tier.is_some(),
            continuing: attempt.continuing.is_some(),
            relogged: attempt.relogged,
            browser: self.renewer.is_some(),
            retry_safe: error.retry_safe(),
        };
        let decision = fallback::next(attempt.tier, kind, attempt.number, &situation);
        self.decide(request_id, &name, &account.id, kind, decision.action);
        if decision.relearn {
            self.relearn_in_background(account, &service.flow.id);
        }
        // Tier changes and a new conversation are no fault of the account.
        if !matches!(decision.next, Next::Tier { .. } | Next::NewConversation) {
            self.accounts.record(&account.id, false);
        }
        if kind == FailureKind::Auth {
            // Only the version the site refused: one renewed in place since (by another
            // instance, say) stays usable, and a re-login then picks it up.
            let session = &attempt.session;
            Box::pin(self.store.reject_session(&session.id, session.version)).await?;
            self.services.invalidate(&name).await;
        }
        self.carry_out(decision.next, request, service, candidate, attempt, error)
            .await
    }

    /// Does what the policy decided; `Carry::On` tries again on this account.
    async fn carry_out(
        &self,
        next: Next,
        request: &mut Request<'_>,
        service: &ServiceState,
        candidate: &Candidate,
        attempt: &mut Attempt,
        error: ReplayError,
    ) -> Result<Carry, GatewayError> {
        let account = &candidate.account;
        match next {
            Next::Retry { after } => {
                tokio::time::sleep(after).await;
                attempt.number += 1;
            }
            Next::Tier { to, raise_floor } => {
                if raise_floor {
                    self.floors.raise(&service.flow.id, to);
                    self.share(Change::FloorRaised {
                        flow: service.flow.id.clone(),
                        tier: to,
                    });
                }
                attempt.restart_at(to);
            }
            Next::NewConversation => {
                // The site no longer knows that conversation: start a new one.
                attempt.continuing = None;
                attempt.restart_at(attempt.tier);
            }
            Next::Relogin => {
                attempt.relogged = true;
                let stale = attempt.session.clone();
                let fresh = self
                    .relogin(
                        request.request_id,
                        account,
                        Some(&stale),
                        &mut request.reasons,
                    )
                    .await?;
                match fresh {
                    Some(session) => {
                        attempt.session = session;
                        attempt.restart_at(attempt.tier);
                    }
                    None => return Ok(Carry::NextAccount),
                }
            }
            Next::NextAccount { rate_limited: true } => {
                let retry_after = error.retry_after();
                let wait = self
                    .accounts
                    .cool_down(&account.id, retry_after.map(Duration::from_secs));
                if let Some(shared) = &self.shared {
                    let until_ms = shared
                        .now()
                        .saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
                    self.share(Change::Cooldown {
                        account: account.id.clone(),
                        until_ms,
                    });
                }
                request.rate_limited = Some((error.to_string(), retry_after));
                return Ok(Carry::NextAccount);
            }
            Next::NextAccount {
                rate_limited: false,
            } => {
                request.reasons.push(format!(
                    "the site rejected the session of account {} ({error}); log in again",
                    account.id
                ));
                return Ok(Carry::NextAccount);
            }
            Next::Fail => {
                return Ok(Carry::Fail(GatewayError::Upstream {
                    service: request.name.clone(),
                    source: error,
                }));
            }
        }
        Ok(Carry::On)
    }

    /// Phase 6: the reply, with its account slot, its outcome record and, when the flow
    /// keeps site conversations, what remembers this exchange once it completes.
    fn hand_over(
        &self,
        request: &Request<'_>,
        service: &ServiceState,
        candidate: &Candidate,
        attempt: &Attempt,
        first: FirstText,
        permit: Permit,
    ) -> Reply {
        let account = &candidate.account;
        let tier = attempt.tier;
        let ttft = request.started.elapsed();
        crate::telemetry::first_token(&request.name, tier, ttft.as_secs_f64());
        self.accounts.record(&account.id, true);
        if attempt.probing {
            tracing::info!(service = %request.name, flow = %service.flow.id, "direct replay works again; the tier floor is lifted");
            self.floors.probe_worked(&service.flow.id);
            self.share(Change::FloorLifted {
                flow: service.flow.id.clone(),
            });
        }
        let FirstText {
            head,
            rest,
            mut extracted,
        } = first;
        let tracker = (request.keeps_conversations && tier <= 2).then(|| {
            count_turn(&mut extracted);
            let mut key = KeyBuilder::default();
            for (role, text) in request.prompt.keyed_messages().iter() {
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
        let detail = match (attempt.continuing.is_some(), attempt.relogged) {
            (true, _) => Some("continued the site conversation".to_owned()),
            (false, true) => Some("after a fresh login".to_owned()),
            _ => None,
        };
        let queue_ms = permit.waited.as_millis() as i64;
        Reply {
            head,
            rest,
            tier,
            tracker,
            _permit: Some(permit),
            ending: None,
            record: Some(Outcome {
                event: ExecutionEvent {
                    request_id: request.request_id.to_owned(),
                    service: request.name.clone(),
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
                started: request.started,
                writer: self.events.clone(),
            }),
        }
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
        tracing::info!(request_id, service, account = account_id, kind = error.kind().as_str(), source = error.came_from().as_str(), retry_safe = error.retry_safe(), error = %error, "replay failed");
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

/// What becomes of a prompt's files.
enum Files {
    /// The flow's upload steps send them (or there are none).
    Send,
    /// The flow cannot send files and they are all in the history: they are shown as
    /// `[image]` text, as the site's own page would show a past attachment it lost.
    AsText,
}

/// Refuses files the service's flow cannot send: files of the new turn when it has no upload
/// step, a type the site's attach control does not take, more than the one file it names.
fn check_attachments(flow: &Flow, prompt: &Prompt) -> Result<Files, GatewayError> {
    if prompt.attachments.is_empty() {
        return Ok(Files::Send);
    }
    let Some(upload) = &flow.upload else {
        let Some(new) = prompt.attachments.iter().find(|a| a.new) else {
            return Ok(Files::AsText);
        };
        return Err(GatewayError::Attachment {
            at: new.file.at.clone(),
            code: "no_upload",
            message: format!(
                "`{}` cannot take images or files: its flow has no upload step (the site's \
                 chat page showed no attach control when it was learned). Send text (images \
                 in earlier turns are shown to it as [image]); if the site now takes files, \
                 re-learn it (`computetower learn ACCOUNT`, or Learn on /admin).",
                flow.service
            ),
        });
    };
    for attached in &prompt.attachments {
        let file = &attached.file;
        if !file.accepted_by(&upload.accept) {
            return Err(GatewayError::Attachment {
                at: file.at.clone(),
                code: "unsupported_file_type",
                message: format!(
                    "The file at `{}` is `{}`; `{}` takes only {}.",
                    file.at, file.mime, flow.service, upload.accept
                ),
            });
        }
    }
    let mut distinct: Vec<&PromptFile> = Vec::new();
    for attached in prompt.attachments.iter().filter(|a| a.new) {
        if !distinct
            .iter()
            .any(|d| d.file.sha256 == attached.file.sha256)
        {
            distinct.push(attached);
        }
    }
    if upload.single && distinct.len() > 1 {
        return Err(GatewayError::Attachment {
            at: distinct[1].file.at.clone(),
            code: "too_many_files",
            message: format!(
                "`{}` takes one file per message; this request has {}.",
                flow.service,
                distinct.len()
            ),
        });
    }
    Ok(Files::Send)
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

/// One request, across the accounts it tries.
struct Request<'a> {
    prompt: &'a Prompt,
    request_id: &'a str,
    /// The service (the model asked for).
    name: String,
    forced_tier: Option<u8>,
    started: Instant,
    keeps_conversations: bool,
    /// The remembered site conversation this request's history extends, and its new turn.
    continuation: Option<Arc<(Arc<Continuation>, Prompt)>>,
    /// The flow a later turn of a site conversation is sent with, when the learner saw one.
    follow_up: Option<Flow>,
    /// Why accounts could not serve, for the final error.
    reasons: Vec<String>,
    /// The soonest an account said it can serve again, for a 429.
    rate_limited: Option<(String, Option<u64>)>,
}

impl Request<'_> {
    /// The continued conversation, when it lives on `account`.
    fn continues_on(&self, account: &str) -> Option<Arc<(Arc<Continuation>, Prompt)>> {
        self.continuation
            .clone()
            .filter(|continued| continued.0.account_id == account)
    }

    /// The error when no account served.
    fn exhausted(self) -> GatewayError {
        if let Some((message, retry_after)) = self.rate_limited {
            return GatewayError::RateLimited {
                service: self.name,
                message,
                retry_after,
            };
        }
        GatewayError::NoUsableAccount {
            service: self.name,
            reason: self.reasons.join("; "),
        }
    }
}

/// One account's tries: the session, the tier and how often it was tried.
struct Attempt {
    session: Session,
    tier: u8,
    /// 1-based count of tries of this tier with this session.
    number: u32,
    /// This try tests whether a raised tier floor can go.
    probing: bool,
    /// The account was logged in afresh during this request.
    relogged: bool,
    continuing: Option<Arc<(Arc<Continuation>, Prompt)>>,
}

impl Attempt {
    fn restart_at(&mut self, tier: u8) {
        self.tier = tier;
        self.number = 1;
    }
}

/// What a try that reached the site's first text gives the hand-over.
struct FirstText {
    head: VecDeque<Delta>,
    rest: DeltaStream,
    /// Preflight values and reply ids of this exchange, to continue it next time.
    extracted: BTreeMap<String, String>,
}

/// After a failure: try again on this account, go to the next one, or give up.
enum Carry {
    On,
    NextAccount,
    Fail(GatewayError),
}

/// Remembers the site conversation when a reply completes.
struct Tracker {
    key: KeyBuilder,
    values: BTreeMap<String, String>,
    account_id: String,
    conversations: Arc<Conversations>,
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

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
