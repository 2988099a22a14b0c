//! `computetower learn ACCOUNT` and `computetower login ACCOUNT`: the same jobs `/admin`
//! runs (`api::jobs`), with their progress lines on stderr and their summary on stdout.
//!
//! Where the job runs:
//! - When a `serve` runs on the same data dir (its `serve.json` names a live process that
//!   answers), the job is handed to it: one browser per account, and a captcha is solved on
//!   that server's handoff page.
//! - Otherwise the job runs here, with this process's own browser, and the captcha handoff
//!   page is served here on a loopback port; its URL is printed as soon as a captcha shows.
//!
//! Invariant: the job stores its result before anything is printed about it, and printing
//! never fails the command (a closed pipe loses lines, not a learned flow).

use std::io::Write;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;

use super::CliResult;
use super::progress::Progress;
use crate::api::jobs::{JobLine, JobState, Started};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// With `explain`: also why each recorded call was or was not taken.
    Learn {
        explain: bool,
    },
    Login,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Learn { .. } => "learn",
            Kind::Login => "login",
        }
    }
}

/// How long a running server may take to say it is alive.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(kind: Kind, name: &str, json: bool, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    let account = super::find_account(&store, name).await?;
    let progress = Progress::stderr();
    let result = match running_server(config).await {
        Some(server) => {
            store.close().await;
            progress.step(&format!(
                "a server runs on this data ({}): it does the {} with its browser",
                server.url,
                kind.path()
            ));
            remote(kind, &server, &account.id, &progress).await
        }
        None => local(kind, config, store, account, &progress).await,
    };
    progress.finish();
    let body = result?;
    let mut out = std::io::stdout().lock();
    if json {
        let mut shown = body.clone();
        if let Some(object) = shown.as_object_mut() {
            object.remove("summary");
            object.remove("job");
        }
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&shown).unwrap_or_default()
        );
    } else {
        for line in body["summary"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "{}", line.as_str().unwrap_or_default());
        }
    }
    let _ = out.flush();
    Ok(())
}

/// Prints a job's step (the summary goes to stdout once the job ends; a failure is the
/// command's error).
fn show(progress: &Progress, line: &JobLine) {
    if line.state != JobState::Running || line.summary {
        return;
    }
    if line.handoff.is_some() || line.line.starts_with("  ") {
        progress.note(line.line.trim_start());
    } else {
        progress.step(&line.line);
    }
}

async fn local(
    kind: Kind,
    config: &Config,
    store: crate::store::Store,
    account: crate::store::accounts::Account,
    progress: &Progress,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let (events, writer) = crate::store::events::EventWriter::start(store.clone());
    let state = crate::server::app_state(config.clone(), store.clone(), events);
    let handoff = serve_handoff(&state, &store).await;
    let mut lines = state.jobs.subscribe();
    let started = match kind {
        Kind::Learn { explain } => state.jobs.start_learn(&state, account, explain),
        Kind::Login => state.jobs.start_login(&state, account),
    };
    let outcome = match started {
        Ok(Started { job, result }) => {
            while let Ok(line) = lines.recv().await {
                if line.job != job {
                    continue;
                }
                show(progress, &line);
                if line.state != JobState::Running {
                    break;
                }
            }
            result
                .await
                .map_err(|_| "the job ended without a result".to_owned())
                .and_then(|r| r.map_err(|e| e.message))
        }
        Err(e) => Err(e.message),
    };
    // Before this process ends: a `serve` on the same store need not wait for the leases of
    // this one to expire.
    state.gateway.release_holds().await;
    if let Some(renewer) = state.gateway.renewer() {
        renewer.pool().shutdown().await;
    }
    if let Some(task) = handoff {
        task.abort();
    }
    drop(state);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    store.close().await;
    Ok(outcome?)
}

/// Serves the captcha handoff on a loopback port for this process's own logins, and tells the
/// jobs to link it. With API keys in the store, the link carries a token of this process
/// (valid while it runs) in its fragment, which browsers never send to a server.
async fn serve_handoff(
    state: &crate::api::AppState,
    store: &crate::store::Store,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
    let addr = listener.local_addr().ok()?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    state.keys.allow_local_token(&token);
    let fragment = match store.live_key_count().await {
        Ok(0) => String::new(),
        _ => format!("#key={token}"),
    };
    state.jobs.set_handoff(format!("http://{addr}"), fragment);
    let app = crate::api::handoff_router(state.clone());
    // Aborted when the job ends; it serves nothing else.
    Some(tokio::spawn(async move {
        let _ = axum::serve(listener, app.into_make_service()).await;
    }))
}

/// A `serve` running on this data dir, if its runtime file names a live process that answers.
pub async fn running_server(config: &Config) -> Option<crate::server::Runtime> {
    let runtime = crate::server::read_runtime(&config.data_dir.join(crate::server::RUNTIME_FILE))?;
    let pid = libc::pid_t::try_from(runtime.pid).ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return None;
    }
    let client = reqwest::Client::builder()
        .timeout(HEALTH_TIMEOUT)
        .build()
        .ok()?;
    let health = client
        .get(format!("{}/health", runtime.url))
        .send()
        .await
        .ok()?;
    health.status().is_success().then_some(runtime)
}

/// Runs the job on the server, printing its lines as they stream.
async fn remote(
    kind: Kind,
    server: &crate::server::Runtime,
    account_id: &str,
    progress: &Progress,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/admin/accounts/{account_id}/{}{}",
            server.url,
            kind.path(),
            match kind {
                Kind::Learn { explain: true } => "?explain=true",
                _ => "",
            }
        ))
        .bearer_auth(&server.token)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| format!("the server at {} did not answer: {e}", server.url))?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        return Err(format!(
            "the server refused the {}: {status}: {message}",
            kind.path()
        )
        .into());
    }
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("the server's stream broke: {e}"))?;
        let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
        match event.event.as_str() {
            "progress" => {
                if let Ok(line) = serde_json::from_value::<JobLine>(data) {
                    show(progress, &line);
                }
            }
            "result" => return Ok(data),
            "error" => {
                let message = data["error"]["message"]
                    .as_str()
                    .unwrap_or("the job failed");
                return Err(message.to_owned().into());
            }
            _ => {}
        }
    }
    Err(format!("the server ended the {} without a result", kind.path()).into())
}
