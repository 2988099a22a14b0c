//! `computetower learn ACCOUNT`: log in if needed, probe, infer, verify, store — with progress
//! on stderr and a summary of the learned flow.

use std::sync::Arc;
use std::time::Instant;

use super::{CliResult, print_json};
use crate::browser::BrowserPool;
use crate::config::Config;
use crate::flow::{Flow, ReasoningRule};
use crate::learn::{LearnError, LearnReport, Learner, Stage};
use crate::renew::Renewer;

pub async fn run(account: &str, json: bool, explain: bool, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    let account = store.account(account).await?;
    let pool = BrowserPool::new(crate::server::browser_config(config));
    let renewer = Arc::new(Renewer::new(pool.clone(), store.clone()));
    let learner = Learner::new(
        renewer,
        Arc::new(crate::server::replayer(config)),
        store.clone(),
    );
    let started = Instant::now();
    eprintln!("==>   0.0 s  launching the browser for {}", account.url);
    let progress = move |stage: Stage| {
        eprintln!(
            "==> {:>5.1} s  {}",
            started.elapsed().as_secs_f64(),
            stage.as_str()
        );
    };
    let result = learner.learn_explained(&account, &progress, explain).await;
    pool.shutdown().await;
    store.close().await;
    if let Err(LearnError::Infer { explanation, .. }) = &result
        && explain
    {
        eprintln!("calls the probe recorded:");
        for line in explanation {
            eprintln!("  {line}");
        }
    }
    let report = result?;
    if json {
        print_json(&serde_json::json!({
            "flow": report.flow.redacted(),
            "previous_version": report.previous_version,
            "notes": report.notes,
            "suspicious": report.suspicious,
            "verified": report.verification.ok,
            "verification_failure": report.verification.failure,
            "timings": report.timings,
            "explanation": report.explanation,
        }))?;
    } else {
        print_summary(&report);
        if explain {
            println!("  calls the probe recorded:");
            for line in &report.explanation {
                println!("    {line}");
            }
        }
    }
    Ok(())
}

fn print_summary(report: &LearnReport) {
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
    println!(
        "learned flow {} for `{}` (version {}{replaced}) in {:.1} s ({login}probe {:.1} s, infer {} ms, verify {} ms)",
        flow.id,
        flow.service,
        flow.version,
        t.total_ms as f64 / 1000.0,
        t.probe_ms as f64 / 1000.0,
        t.infer_ms,
        t.verify_ms,
    );
    println!("  chat call   {} {}", flow.request.method, flow.request.url);
    for step in &flow.preflight {
        let extracts: Vec<&str> = step.extract.keys().map(String::as_str).collect();
        println!(
            "  preflight   {} {} → {}",
            step.http.method,
            step.http.url,
            extracts.join(", ")
        );
    }
    for (pointer, source) in &flow.request.slots {
        println!("  slot        {pointer} ← {source}");
    }
    println!("  reply       {}", describe_response(flow));
    if report.verification.ok {
        println!(
            "  verified    direct replay answered: first token after {} ms",
            report.verification.first_token_ms.unwrap_or_default()
        );
    } else {
        println!(
            "  NEEDS BROWSER  {}",
            flow.replay
                .reason
                .as_deref()
                .unwrap_or("direct replay failed")
        );
    }
    for note in &report.notes {
        println!("  note        {note}");
    }
}

fn describe_response(flow: &Flow) -> String {
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
