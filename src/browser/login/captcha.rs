//! Captchas: first the configured solver hook, then a human through the live session.
//!
//! The solver (a command, or a URL taking a POST) receives
//! `{"url","kind","screenshot_png_base64"}` and answers
//! `{"actions":[{"click":{"x":..,"y":..}},{"type":"text"},{"key":"Enter"}]}`; the actions are
//! applied to the page in order (viewport CSS pixels).
//!
//! Invariants:
//! - The time a human takes is not charged to the login's deadline: the deadline moves
//!   back by the time spent waiting.
//! - The solver's answer is never logged (it may hold typed text).

use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use chromiumoxide::layout::Point;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::{Attempt, PageSummary, captcha_kind};
use crate::browser::LoginError;
use crate::browser::page::{POLL, cdp_error, insert_text, is_connection, press_key};

/// Longest a solver may take to answer.
const SOLVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the page may take to react to the solver's actions.
const AFTER_SOLVER: Duration = Duration::from_secs(15);
/// Poll interval while a human solves the challenge.
const HUMAN_POLL: Duration = Duration::from_millis(250);

#[derive(Serialize)]
pub(crate) struct SolverRequest<'a> {
    pub url: &'a str,
    pub kind: &'a str,
    pub screenshot_png_base64: String,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
pub(crate) struct SolverAnswer {
    #[serde(default)]
    pub actions: Vec<SolverAction>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SolverAction {
    Click { x: f64, y: f64 },
    Type(String),
    Key(String),
}

/// Gets the page past a captcha: solver hook, then a human. Returns once the page is no
/// longer a captcha.
pub(crate) async fn resolve(
    attempt: &mut Attempt<'_>,
    summary: &PageSummary,
) -> Result<(), LoginError> {
    let kind = captcha_kind(summary).unwrap_or("interstitial");
    tracing::info!(account = %attempt.req.account_id, kind, "the site shows a captcha");
    if let Some(answer) = ask_solver(attempt, summary, kind).await {
        apply(attempt, &answer).await?;
        let until = Instant::now() + AFTER_SOLVER;
        loop {
            tokio::time::sleep(POLL).await;
            let now = attempt.current().await?;
            if captcha_kind(&now).is_none() {
                return Ok(());
            }
            if Instant::now() >= until {
                tracing::info!("the captcha is still there after the solver's actions");
                break;
            }
        }
    }
    wait_for_human(attempt).await
}

async fn ask_solver(
    attempt: &Attempt<'_>,
    summary: &PageSummary,
    kind: &str,
) -> Option<SolverAnswer> {
    let config = &attempt.config().captcha;
    if config.solver_command.is_none() && config.solver_url.is_none() {
        return None;
    }
    let png = attempt.screenshot_png().await?;
    let request = SolverRequest {
        url: &summary.url,
        kind,
        screenshot_png_base64: base64::engine::general_purpose::STANDARD.encode(png),
    };
    let body = serde_json::to_vec(&request).ok()?;
    let answer = if let Some(command) = &config.solver_command {
        run_command(command, &body).await
    } else if let Some(url) = &config.solver_url {
        post(url, &body).await
    } else {
        None
    };
    if answer.is_none() {
        tracing::warn!("the captcha solver gave no usable answer");
    }
    answer
}

/// Runs `command` through `sh -c` with `body` on stdin and parses its stdout.
async fn run_command(command: &str, body: &[u8]) -> Option<SolverAnswer> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| tracing::warn!(error = %e, "could not start the captcha solver"))
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let body = body.to_vec();
    // Write concurrently with reading stdout: a solver that answers before reading all of
    // stdin must not deadlock against a full pipe.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    });
    let output = tokio::time::timeout(SOLVER_TIMEOUT, child.wait_with_output())
        .await
        .ok()?
        .ok()?;
    writer.abort();
    if !output.status.success() {
        tracing::warn!(status = %output.status, "the captcha solver failed");
        return None;
    }
    parse_answer(&output.stdout)
}

async fn post(url: &str, body: &[u8]) -> Option<SolverAnswer> {
    crate::install_tls_provider();
    let client = reqwest::Client::builder()
        .timeout(SOLVER_TIMEOUT)
        .build()
        .ok()?;
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| tracing::warn!(error = %e, "the captcha solver URL failed"))
        .ok()?;
    if !response.status().is_success() {
        tracing::warn!(status = %response.status(), "the captcha solver URL refused");
        return None;
    }
    parse_answer(&response.bytes().await.ok()?)
}

pub(crate) fn parse_answer(bytes: &[u8]) -> Option<SolverAnswer> {
    serde_json::from_slice(bytes).ok()
}

async fn apply(attempt: &Attempt<'_>, answer: &SolverAnswer) -> Result<(), LoginError> {
    for action in &answer.actions {
        attempt.check()?;
        match action {
            SolverAction::Click { x, y } => {
                attempt
                    .page
                    .click(Point { x: *x, y: *y })
                    .await
                    .map_err(cdp_error)?;
            }
            SolverAction::Type(text) => insert_text(attempt.page, text).await.map_err(cdp_error)?,
            SolverAction::Key(key) => press_key(attempt.page, key).await.map_err(cdp_error)?,
        }
    }
    Ok(())
}

/// Leaves the page to a human (live session state `waiting_for_human`) until it is no longer
/// a captcha, or `human_timeout` passes.
async fn wait_for_human(attempt: &mut Attempt<'_>) -> Result<(), LoginError> {
    let limit = attempt.config().captcha.human_timeout;
    let started = Instant::now();
    attempt.live.set_state("waiting_for_human");
    tracing::info!(
        account = %attempt.req.account_id,
        live_session = %attempt.live.id,
        wait_s = limit.as_secs(),
        "waiting for a human to solve the captcha"
    );
    let outcome = loop {
        if let Err(e) = attempt.check() {
            break Err(e);
        }
        if started.elapsed() >= limit {
            break Err(LoginError::Captcha {
                // The live session ends with this error: its page is no place to send anyone.
                reason: format!(
                    "nobody solved the challenge within {} s (live session {}); log in again \
                     and solve it on the handoff page while the login waits",
                    limit.as_secs(),
                    attempt.live.id
                ),
                screenshot: attempt.save_screenshot().await,
            });
        }
        tokio::time::sleep(HUMAN_POLL).await;
        // While the page navigates the summary may fail; the next poll sees the new page.
        match super::summarize(attempt.page).await {
            Ok(now) if captcha_kind(&now).is_none() && now.ready != "loading" => break Ok(()),
            Ok(_) => {}
            Err(e) if is_connection(&e) => break Err(cdp_error(e)),
            Err(_) => {}
        }
    };
    attempt.live.set_state("logging_in");
    attempt.deadline += started.elapsed();
    outcome
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn solver_answers_parse_into_actions() {
        let answer = parse_answer(
            br#"{"actions":[{"click":{"x":10.5,"y":20}},{"type":"h\u00e9llo"},{"key":"Enter"}]}"#,
        )
        .unwrap();
        assert_eq!(
            answer.actions,
            vec![
                SolverAction::Click { x: 10.5, y: 20.0 },
                SolverAction::Type("héllo".into()),
                SolverAction::Key("Enter".into()),
            ]
        );
        assert!(parse_answer(b"not json").is_none());
        assert_eq!(parse_answer(b"{}").unwrap().actions, vec![]);
    }

    #[tokio::test]
    async fn a_solver_command_gets_the_request_on_stdin() {
        let command = r#"grep -q '"kind":"recaptcha"' && echo '{"actions":[{"key":"Enter"}]}'"#;
        let body = serde_json::to_vec(&SolverRequest {
            url: "http://x/",
            kind: "recaptcha",
            screenshot_png_base64: String::new(),
        })
        .unwrap();
        let answer = run_command(command, &body).await.unwrap();
        assert_eq!(answer.actions, vec![SolverAction::Key("Enter".into())]);
        assert!(run_command("exit 3", &body).await.is_none());
    }
}
