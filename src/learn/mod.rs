//! Learning a site's chat flow from one probe message: `probe` types a message carrying a
//! unique marker while `browser::recorder` captures the network; `infer` finds the chat call,
//! templates it and finds its preflights; `decoder` infers how to read the reply; `verify`
//! replays the result once directly.
//!
//! Invariant: nothing here knows any site. Every decision comes from the recording: where
//! the marker is, which values came from where, which reading of the bytes yields the text
//! the page rendered.

pub mod attach;
pub mod decoder;
pub mod infer;
pub mod probe;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use url::Url;

use crate::browser::{LoginRequest, PageError};
use crate::flow::Flow;
use crate::recording::Recording;
use crate::renew::{RenewError, Renewer};
use crate::replay::client::Replayer;
use crate::store::accounts::Account;
use crate::store::{Store, StoreError};
use probe::ProbeRequest;
use verify::Verification;

/// Where a learn is, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    LoggingIn,
    Probing,
    Inferring,
    Verifying,
    Saving,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::LoggingIn => "logging in",
            Stage::Probing => "probing",
            Stage::Inferring => "inferring",
            Stage::Verifying => "verifying",
            Stage::Saving => "saving",
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub login_ms: Option<u64>,
    pub probe_ms: u64,
    pub infer_ms: u64,
    pub verify_ms: u64,
    pub total_ms: u64,
}

/// What a learn produced.
#[derive(Debug)]
pub struct LearnReport {
    /// The stored flow (the service's active flow now).
    pub flow: Flow,
    /// The version it replaced, kept for comparison.
    pub previous_version: Option<u32>,
    pub notes: Vec<String>,
    pub suspicious: Vec<String>,
    pub verification: Verification,
    pub timings: Timings,
    /// Why each recorded call was or was not taken (when asked for, see
    /// [`Learner::learn_explained`]).
    pub explanation: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Login(#[from] RenewError),
    #[error("the probe failed: {0}")]
    Probe(#[from] PageError),
    #[error("could not infer the chat flow: {source}{}", saved_note(recording.as_deref()))]
    Infer {
        source: infer::InferError,
        /// The probe's recording, secrets replaced, saved for a report or a test fixture.
        recording: Option<PathBuf>,
        /// Why each recorded call was or was not taken.
        explanation: Vec<String>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn saved_note(recording: Option<&Path>) -> String {
    match recording {
        Some(path) => format!(
            ". The probe's recording, secrets replaced, is saved at {} (attach it to a report; \
             dropped into tests/fixtures/recordings/ it is a failing unit test)",
            path.display()
        ),
        None => String::new(),
    }
}

/// How long a probe may wait for the site's reply.
const PROBE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a learn waits for another instance's browser work on the account.
const LEASE_WAIT: Duration = Duration::from_secs(300);

/// Learns accounts' flows: login (when needed) → probe → infer → verify → store.
pub struct Learner {
    renewer: Arc<Renewer>,
    replayer: Arc<Replayer>,
    store: Store,
}

impl Learner {
    pub fn new(renewer: Arc<Renewer>, replayer: Arc<Replayer>, store: Store) -> Self {
        Self {
            renewer,
            replayer,
            store,
        }
    }

    /// Learns `account`'s chat flow and stores it as the service's active flow.
    pub async fn learn(
        &self,
        account: &Account,
        progress: &(dyn Fn(Stage) + Send + Sync),
    ) -> Result<LearnReport, LearnError> {
        self.learn_explained(account, progress, false).await
    }

    /// [`Learner::learn`], with `explain`: the report says why each recorded call was or was
    /// not taken (a failure always does). Long on purpose: it is the learn's steps in order,
    /// each timed and reported, and reads best in one place.
    pub async fn learn_explained(
        &self,
        account: &Account,
        progress: &(dyn Fn(Stage) + Send + Sync),
        explain: bool,
    ) -> Result<LearnReport, LearnError> {
        let started = Instant::now();
        // The whole learn is the account's browser work: one instance at a time.
        let _lease = self
            .renewer
            .hold(&account.id, LEASE_WAIT)
            .await
            .map_err(RenewError::from)?;
        let mut timings = Timings::default();
        let now = crate::store::now();
        let session = match self.store.latest_session(&account.id).await? {
            Some(session) if session.is_usable(now) => session,
            _ => {
                progress(Stage::LoggingIn);
                let login_started = Instant::now();
                let renewed = self.renewer.renew(account, None).await?;
                timings.login_ms = Some(login_started.elapsed().as_millis() as u64);
                renewed.session
            }
        };
        let password = self.store.account_password(&account.id).await?;
        let proxy = self.store.account_proxy(&account.id).await?;
        let secret = password.clone();

        progress(Stage::Probing);
        let probe_started = Instant::now();
        let request = ProbeRequest {
            account_id: account.id.clone(),
            chat_url: None,
            session: Some(session.data.clone()),
            login: Some(LoginRequest {
                account_id: account.id.clone(),
                url: account.url.clone(),
                email: account.email.clone(),
                password,
                proxy: proxy.clone(),
            }),
            probe_text: None,
            timeout: PROBE_TIMEOUT,
            follow_up: true,
            attach_dir: Some(self.renewer.pool().data_dir().join("probe-files")),
        };
        // A probe with a file attached that fails is run again without one: a site whose
        // upload the probe trips over still has a chat flow to learn.
        let recording = match probe::probe(self.renewer.pool(), &request).await {
            Ok(recording) => recording,
            Err(e) => {
                tracing::info!(error = %e, "the probe failed; probing again without a file");
                let plain = ProbeRequest {
                    attach_dir: None,
                    ..request.clone()
                };
                probe::probe(self.renewer.pool(), &plain).await?
            }
        };
        timings.probe_ms = probe_started.elapsed().as_millis() as u64;

        progress(Stage::Inferring);
        let infer_started = Instant::now();
        let mut recording = recording;
        let mut upload_note = None;
        let mut inferred = infer::infer(&recording, &account.service);
        if let Err(infer::InferError::Upload(why)) = &inferred {
            // The chat flow must not depend on a file: learn it from a probe without one.
            tracing::info!(reason = %why, "no upload learned; probing again without a file");
            upload_note = Some(format!("uploads: {why}; the flow takes no files"));
            let plain = ProbeRequest {
                attach_dir: None,
                ..request.clone()
            };
            recording = probe::probe(self.renewer.pool(), &plain).await?;
            inferred = infer::infer(&recording, &account.service);
        }
        let learned = match inferred {
            Ok(mut learned) => {
                learned.notes.extend(upload_note);
                learned
            }
            Err(source) => {
                let extra: Vec<&str> = secret.as_deref().into_iter().collect();
                let saved = self
                    .save_recording(account, &recording.redacted(&extra))
                    .await;
                return Err(LearnError::Infer {
                    source,
                    recording: saved,
                    explanation: infer::explain(&recording),
                });
            }
        };
        let explanation = if explain {
            infer::explain(&recording)
        } else {
            Vec::new()
        };
        drop(recording);
        timings.infer_ms = infer_started.elapsed().as_millis() as u64;
        let mut flow = learned.flow;

        progress(Stage::Verifying);
        let verify_started = Instant::now();
        let base = crate::store::accounts::parse_site_url(&account.url)?;
        // The probe's page may have refreshed cookies; replay with what the store holds now.
        let session = self
            .store
            .latest_session(&account.id)
            .await?
            .map_or(session, |latest| latest);
        let verification = verify::verify(
            &self.replayer,
            &flow,
            &base,
            &session.data,
            proxy.as_deref(),
        )
        .await;
        let mut notes = learned.notes;
        notes.extend(verify::apply(&mut flow, &verification, &learned.suspicious));
        timings.verify_ms = verify_started.elapsed().as_millis() as u64;

        progress(Stage::Saving);
        let previous_version = self
            .store
            .active_flow(&account.service)
            .await?
            .map(|f| f.version);
        flow.origin = Some(origin_of(&base));
        let flow = self.store.save_flow(flow).await?;
        // The page itself called these origins: replay may call them with this session.
        let own = crate::pinning::origin_of(&base);
        let called: Vec<String> = crate::pinning::static_origins(&flow)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, origin)| origin)
            .filter(|origin| *origin != own)
            .collect();
        self.store.trust_flow_origins(&flow.id, &called).await?;
        timings.total_ms = started.elapsed().as_millis() as u64;
        Ok(LearnReport {
            flow,
            previous_version,
            notes,
            suspicious: learned.suspicious,
            verification,
            timings,
            explanation,
        })
    }

    /// Saves a (redacted) recording under `DATA/recordings/`; its path, or `None` when it
    /// could not be written (said in the log).
    async fn save_recording(&self, account: &Account, recording: &Recording) -> Option<PathBuf> {
        let dir = self.renewer.pool().data_dir().join("recordings");
        let name: String = account
            .service
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("failed-{name}-{}.json", crate::store::now()));
        let text = serde_json::to_string_pretty(recording).ok()? + "\n";
        let written = async {
            tokio::fs::create_dir_all(&dir).await?;
            tokio::fs::write(&path, text).await
        };
        match written.await {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::warn!(error = %e, "could not save the probe's recording");
                None
            }
        }
    }
}

fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}
