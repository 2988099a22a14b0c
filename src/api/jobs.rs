//! Learn and login jobs, started from `/admin` or the CLI, with progress lines for whoever
//! watches (the admin page, `POST …/learn` asked as `text/event-stream`, the terminal).
//!
//! Invariants:
//! - A job runs in its own task: a client that goes away does not cancel a learn halfway.
//! - One job per account at a time; a second one is refused with 409, naming the first.
//! - The lines are the steps `computetower learn` prints, then its summary. While the job's
//!   login waits for a person on a captcha, a line says at once where to solve it.
//! - No line holds a secret: they name steps, URLs of the account's site (as stored, which
//!   holds no credentials), flows and session *names*.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, oneshot};

use super::AppState;
use super::error::ApiError;
use crate::browser::BrowserPool;
use crate::flow::{Flow, ReasoningRule};
use crate::learn::LearnReport;
use crate::renew::Renewed;
use crate::store::accounts::Account;

/// Lines kept for a page that opens while a job runs.
const RECENT: usize = 300;
/// Live browser sessions remembered after they end, so a handoff page can say how it ended.
const ENDED_LIVE: usize = 256;
/// How often a running job looks for a login waiting on a person. The browser pool reports
/// live sessions only when asked.
const LIVE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Learn,
    Login,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

/// One progress line of a job.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct JobLine {
    pub job: String,
    pub kind: JobKind,
    pub account_id: String,
    /// Unix milliseconds.
    pub at_ms: i64,
    /// Since the job started.
    pub elapsed_ms: u64,
    pub line: String,
    pub state: JobState,
    /// The handoff page of a login waiting for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
    /// A line of the summary the job ends with (what `learn` prints on stdout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub summary: bool,
}

/// A started job: its id, and its result once it ends (the JSON `POST …/learn` answers).
pub struct Started {
    pub job: String,
    pub result: oneshot::Receiver<Result<Value, ApiError>>,
}

#[derive(Default)]
pub struct Jobs {
    lines: Option<broadcast::Sender<JobLine>>,
    recent: Mutex<VecDeque<JobLine>>,
    /// Account id → the job running on it.
    running: Mutex<HashMap<String, String>>,
    /// Flow id → what learning it found (notes, suspicious values, verification).
    findings: Mutex<HashMap<String, Value>>,
    /// Where a person opens a handoff page: this server's address, and a `#key=…` fragment
    /// when the page needs one it cannot ask for.
    handoff: Mutex<Option<(String, String)>>,
    /// Live session id → (account id, unix seconds it started), kept after it ends.
    live_seen: Mutex<VecDeque<(String, String, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Jobs {
    pub fn new() -> Self {
        Self {
            lines: Some(broadcast::channel(1024).0),
            ..Self::default()
        }
    }

    /// Every line from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobLine> {
        match &self.lines {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// The latest lines, oldest first.
    pub fn recent(&self) -> Vec<JobLine> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// Account id → job id of the jobs running now.
    pub fn running(&self) -> HashMap<String, String> {
        lock(&self.running).clone()
    }

    /// Handoff links start with `base` (`http://127.0.0.1:8000`) and end with `fragment`.
    pub fn set_handoff(&self, base: String, fragment: String) {
        *lock(&self.handoff) = Some((base, fragment));
    }

    /// What learning found for `flow_id`, if this process learned it.
    pub fn findings(&self, flow_id: &str) -> Option<Value> {
        lock(&self.findings).get(flow_id).cloned()
    }

    /// Remembers a live session, so its handoff page can tell how it ended.
    pub fn remember_live(&self, id: &str, account_id: &str, since: i64) {
        let mut seen = lock(&self.live_seen);
        if seen.iter().any(|(known, ..)| known == id) {
            return;
        }
        if seen.len() >= ENDED_LIVE {
            seen.pop_front();
        }
        seen.push_back((id.to_owned(), account_id.to_owned(), since));
    }

    /// The account and start of a live session seen earlier.
    pub fn live_seen(&self, id: &str) -> Option<(String, i64)> {
        lock(&self.live_seen)
            .iter()
            .find(|(known, ..)| known == id)
            .map(|(_, account, since)| (account.clone(), *since))
    }

    fn emit(&self, line: JobLine) {
        {
            let mut recent = lock(&self.recent);
            if recent.len() >= RECENT {
                recent.pop_front();
            }
            recent.push_back(line.clone());
        }
        if let Some(tx) = &self.lines {
            let _ = tx.send(line);
        }
    }

    fn claim(&self, account: &Account, kind: JobKind) -> Result<String, ApiError> {
        let mut running = lock(&self.running);
        if let Some(job) = running.get(&account.id) {
            return Err(ApiError::conflict(format!(
                "Job {job} is already running on account {}; wait for it to end.",
                account.id
            ))
            .code("job_running"));
        }
        let job = crate::store::new_id(match kind {
            JobKind::Learn => "learn",
            JobKind::Login => "login",
        });
        running.insert(account.id.clone(), job.clone());
        Ok(job)
    }

    /// Learns `account`'s flow in a task of its own.
    /// With `explain`, the summary (and a failure's lines) say why each recorded call was or
    /// was not taken.
    pub fn start_learn(
        self: &Arc<Self>,
        state: &AppState,
        account: Account,
        explain: bool,
    ) -> Result<Started, ApiError> {
        let learner = state
            .learner
            .clone()
            .ok_or_else(|| ApiError::not_found("The browser is not enabled on this server."))?;
        let pool = browser_pool(state)?;
        let job = self.claim(&account, JobKind::Learn)?;
        let (done, result) = oneshot::channel();
        let progress = Progress::new(self.clone(), &job, JobKind::Learn, &account.id);
        let gateway = state.gateway.clone();
        let jobs = self.clone();
        progress.line(format!(
            "learning `{}` at {} (account {})",
            account.service, account.url, account.id
        ));
        // Detached on purpose: the job must finish (and store its flow) even when the client
        // that started it goes away; its result and lines reach whoever still listens.
        tokio::spawn(async move {
            let watcher = progress.watch_live(pool);
            let on_stage = |stage: crate::learn::Stage| progress.line(stage.as_str().to_owned());
            let outcome = learner.learn_explained(&account, &on_stage, explain).await;
            watcher.abort();
            gateway.invalidate();
            let answer = match outcome {
                Ok(report) => {
                    let mut summary = learn_summary(&report);
                    if explain {
                        summary.push("  calls the probe recorded:".to_owned());
                        summary.extend(report.explanation.iter().map(|l| format!("    {l}")));
                    }
                    let mut body = learn_json(&report);
                    lock(&jobs.findings).insert(report.flow.id.clone(), body["findings"].clone());
                    body["summary"] = json!(summary);
                    body["job"] = json!(progress.job);
                    progress.finish(&summary, true);
                    Ok(body)
                }
                Err(e) => {
                    if let crate::learn::LearnError::Infer { explanation, .. } = &e
                        && explain
                    {
                        progress.line("  calls the probe recorded:".to_owned());
                        for line in explanation {
                            progress.line(format!("    {line}"));
                        }
                    }
                    let error = match e {
                        crate::learn::LearnError::Store(e) => ApiError::from(e),
                        other => ApiError::bad_gateway(other.to_string()).code("learn_failed"),
                    };
                    progress.finish(&[format!("learning failed: {}", error.message)], false);
                    Err(error)
                }
            };
            lock(&jobs.running).remove(&account.id);
            let _ = done.send(answer);
        });
        Ok(Started { job, result })
    }

    /// Logs `account` in with the browser in a task of its own.
    pub fn start_login(
        self: &Arc<Self>,
        state: &AppState,
        account: Account,
    ) -> Result<Started, ApiError> {
        let renewer = state
            .gateway
            .renewer()
            .cloned()
            .ok_or_else(|| ApiError::not_found("The browser is not enabled on this server."))?;
        let job = self.claim(&account, JobKind::Login)?;
        let (done, result) = oneshot::channel();
        let progress = Progress::new(self.clone(), &job, JobKind::Login, &account.id);
        let gateway = state.gateway.clone();
        let jobs = self.clone();
        progress.line(format!(
            "logging in to {} as account {}",
            account.url, account.id
        ));
        // Detached on purpose, as a learn is.
        tokio::spawn(async move {
            let watcher = progress.watch_live(renewer.pool().clone());
            let outcome = renewer.login(&account).await;
            watcher.abort();
            gateway.invalidate();
            let answer = match outcome {
                Ok(renewed) => {
                    let summary = login_summary(&renewed);
                    let mut body = login_json(&account, &renewed);
                    body["summary"] = json!(summary);
                    body["job"] = json!(progress.job);
                    progress.finish(&summary, true);
                    Ok(body)
                }
                Err(crate::renew::RenewError::Store(e)) => {
                    let error = ApiError::from(e);
                    progress.finish(&[format!("login failed: {}", error.message)], false);
                    Err(error)
                }
                Err(crate::renew::RenewError::Busy(e)) => {
                    let message = format!("login failed: {e}");
                    progress.finish(std::slice::from_ref(&message), false);
                    Err(ApiError::conflict(message).code("account_busy"))
                }
                Err(crate::renew::RenewError::Login { source, .. }) => {
                    let shot = source
                        .screenshot()
                        .map(|p| format!(" (screenshot: {})", p.display()))
                        .unwrap_or_default();
                    let message = format!("login failed: {source}{shot}");
                    progress.finish(std::slice::from_ref(&message), false);
                    Err(ApiError::bad_gateway(message).code("login_failed"))
                }
            };
            lock(&jobs.running).remove(&account.id);
            let _ = done.send(answer);
        });
        Ok(Started { job, result })
    }
}

fn browser_pool(state: &AppState) -> Result<BrowserPool, ApiError> {
    state
        .gateway
        .renewer()
        .map(|r| r.pool().clone())
        .ok_or_else(|| ApiError::not_found("The browser is not enabled on this server."))
}

/// Emits one job's lines.
#[derive(Clone)]
struct Progress {
    jobs: Arc<Jobs>,
    job: String,
    kind: JobKind,
    account_id: String,
    started: Instant,
}

impl Progress {
    fn new(jobs: Arc<Jobs>, job: &str, kind: JobKind, account_id: &str) -> Self {
        Self {
            jobs,
            job: job.to_owned(),
            kind,
            account_id: account_id.to_owned(),
            started: Instant::now(),
        }
    }

    fn emit(&self, line: String, state: JobState, handoff: Option<String>, summary: bool) {
        self.jobs.emit(JobLine {
            job: self.job.clone(),
            kind: self.kind,
            account_id: self.account_id.clone(),
            at_ms: now_ms(),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            line,
            state,
            handoff,
            summary,
        });
    }

    fn line(&self, line: String) {
        self.emit(line, JobState::Running, None, false);
    }

    /// The summary lines, the last one marking the end.
    fn finish(&self, lines: &[String], ok: bool) {
        let (last, earlier) = match lines.split_last() {
            Some(split) => split,
            None => return,
        };
        for line in earlier {
            self.emit(line.clone(), JobState::Running, None, true);
        }
        let state = if ok { JobState::Done } else { JobState::Failed };
        self.emit(last.clone(), state, None, true);
    }

    /// Watches the pool for this account's logins waiting on a person, and says where to
    /// solve each one as soon as it appears.
    fn watch_live(&self, pool: BrowserPool) -> tokio::task::JoinHandle<()> {
        let progress = self.clone();
        tokio::spawn(async move {
            let mut announced = HashSet::new();
            loop {
                for live in pool.live_sessions().await {
                    if live.account_id != progress.account_id {
                        continue;
                    }
                    progress
                        .jobs
                        .remember_live(&live.id, &live.account_id, live.since);
                    if live.state == "waiting_for_human" && announced.insert(live.id.clone()) {
                        let path = format!("/admin/sessions/{}", live.id);
                        let (base, fragment) =
                            lock(&progress.jobs.handoff).clone().unwrap_or_default();
                        progress.emit(
                            format!(
                                "the site shows a captcha: solve it at {base}{path}{fragment} \
                                 (the login waits for you)"
                            ),
                            JobState::Running,
                            Some(path),
                            false,
                        );
                    }
                }
                tokio::time::sleep(LIVE_POLL).await;
            }
        })
    }
}

/// The JSON `POST …/learn` answers.
pub fn learn_json(report: &LearnReport) -> Value {
    json!({
        "flow": report.flow.redacted(),
        "previous_version": report.previous_version,
        "notes": report.notes,
        "suspicious": report.suspicious,
        "verified": report.verification.ok,
        "verification_failure": report.verification.failure,
        "timings": report.timings,
        "explanation": report.explanation,
        "findings": {
            "notes": report.notes,
            "suspicious": report.suspicious,
            "verified": report.verification.ok,
            "verification_failure": report.verification.failure,
            "first_token_ms": report.verification.first_token_ms,
            "timings": report.timings,
        },
    })
}

fn login_json(account: &Account, renewed: &Renewed) -> Value {
    let session = crate::store::sessions::SessionSummary::from(&renewed.session);
    let outcome = renewed.outcome.as_ref().map(|o| {
        json!({
            "pages": o.page_kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            "elapsed_ms": o.elapsed.as_millis() as u64,
        })
    });
    json!({
        "account_id": account.id,
        "session": session,
        "pages": outcome.as_ref().map(|o| o["pages"].clone()),
        "elapsed_ms": outcome.as_ref().map(|o| o["elapsed_ms"].clone()),
        "login": outcome,
    })
}

/// What `learn` prints when it is done.
pub fn learn_summary(report: &LearnReport) -> Vec<String> {
    let flow = &report.flow;
    let t = &report.timings;
    let login = t
        .login_ms
        .map(|ms| format!("login {:.1} s, ", ms as f64 / 1000.0))
        .unwrap_or_default();
    let replaced = report
        .previous_version
        .map(|v| format!(", replacing version {v}"))
        .unwrap_or_default();
    let mut lines = vec![format!(
        "learned flow {} for `{}` (version {}{replaced}) in {:.1} s ({login}probe {:.1} s, infer {} ms, verify {} ms)",
        flow.id,
        flow.service,
        flow.version,
        t.total_ms as f64 / 1000.0,
        t.probe_ms as f64 / 1000.0,
        t.infer_ms,
        t.verify_ms,
    )];
    lines.push(format!(
        "  chat call   {} {}",
        flow.request.method, flow.request.url
    ));
    for step in &flow.preflight {
        let extracts: Vec<&str> = step.extract.keys().map(String::as_str).collect();
        lines.push(format!(
            "  preflight   {} {} → {}",
            step.http.method,
            step.http.url,
            extracts.join(", ")
        ));
    }
    for (pointer, source) in &flow.request.slots {
        lines.push(format!("  slot        {pointer} ← {source}"));
    }
    lines.push(format!("  reply       {}", describe_response(flow)));
    for note in &report.notes {
        lines.push(format!("  note        {note}"));
    }
    if report.verification.ok {
        lines.push(format!(
            "  verified    direct replay answered: first token after {} ms",
            report.verification.first_token_ms.unwrap_or_default()
        ));
    } else {
        lines.push(format!(
            "  NEEDS BROWSER  {}",
            flow.replay
                .reason
                .as_deref()
                .unwrap_or("direct replay failed")
        ));
    }
    lines
}

/// The reply decoder in words: transport, where the text is and how it accrues, reasoning.
pub fn describe_response(flow: &Flow) -> String {
    let r = &flow.response;
    let mut out = format!(
        "{:?}, text at `{}` ({:?})",
        r.transport, r.text.path, r.text.mode
    )
    .to_lowercase();
    match &r.reasoning {
        Some(ReasoningRule::Field { path, .. }) => {
            out.push_str(&format!(", reasoning at `{path}`"))
        }
        Some(ReasoningRule::Flag { path, equals, .. }) => {
            out.push_str(&format!(", reasoning where `{path}` = {equals}"))
        }
        Some(ReasoningRule::Markup { open, .. }) => {
            out.push_str(&format!(", reasoning inside `{open}`"))
        }
        None => {}
    }
    out
}

/// What `login` prints when it is done.
pub fn login_summary(renewed: &Renewed) -> Vec<String> {
    let summary = crate::store::sessions::SessionSummary::from(&renewed.session);
    let mut lines = Vec::new();
    if let Some(o) = &renewed.outcome {
        let pages: Vec<&str> = o.page_kinds.iter().map(|k| k.as_str()).collect();
        lines.push(format!(
            "logged in in {} ms ({})",
            o.elapsed.as_millis(),
            pages.join(" → ")
        ));
    }
    lines.push(format!(
        "session {}: {} cookies ({}), {} localStorage keys, expires {}",
        summary.id,
        summary.cookies.len(),
        summary.cookies.join(", "),
        summary.local_storage.len(),
        summary
            .expires_at
            .map_or("with the browser session".to_owned(), |e| format!(
                "at unix {e}"
            ))
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(job: &str, text: &str) -> JobLine {
        JobLine {
            job: job.into(),
            kind: JobKind::Learn,
            account_id: "a_1".into(),
            at_ms: 0,
            elapsed_ms: 0,
            line: text.into(),
            state: JobState::Running,
            handoff: None,
            summary: false,
        }
    }

    #[test]
    fn recent_lines_are_bounded_and_watchers_get_each_line() {
        let jobs = Jobs::new();
        let mut rx = jobs.subscribe();
        for i in 0..RECENT + 5 {
            jobs.emit(line("j", &format!("step {i}")));
        }
        let recent = jobs.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].line, "step 5");
        assert_eq!(rx.try_recv().unwrap().line, "step 0");
    }

    #[test]
    fn one_job_per_account_at_a_time() {
        let jobs = Jobs::new();
        let account = Account {
            id: "a_1".into(),
            service: "svc".into(),
            url: "http://127.0.0.1:9/".into(),
            email: None,
            has_password: false,
            proxy: None,
            enabled: true,
            created_at: 0,
            updated_at: 0,
        };
        let first = jobs.claim(&account, JobKind::Learn).unwrap();
        let second = jobs.claim(&account, JobKind::Login).unwrap_err();
        assert_eq!(second.status, axum::http::StatusCode::CONFLICT);
        assert!(second.message.contains(&first), "{}", second.message);
        lock(&jobs.running).remove("a_1");
        assert!(jobs.claim(&account, JobKind::Login).is_ok());
    }

    #[test]
    fn ended_live_sessions_are_remembered_within_a_bound() {
        let jobs = Jobs::new();
        for i in 0..ENDED_LIVE + 1 {
            jobs.remember_live(&format!("l{i}"), "a_1", i as i64);
        }
        assert_eq!(jobs.live_seen("l0"), None);
        assert_eq!(jobs.live_seen("l1"), Some(("a_1".into(), 1)));
    }
}
