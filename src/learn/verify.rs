//! Verifying a learned flow: replay it once directly with a second probe. It must yield reply
//! text; the replay stops at the first text, which is all the proof needed.
//!
//! A flow whose direct replay fails is still worth keeping: its request carries values the
//! page computes (a signature, a proof of work, a one-time token), so it is marked as needing
//! a browser tier, with the reason, instead of failing the learn.

use std::collections::BTreeMap;
use std::time::Instant;

use futures_util::StreamExt;
use url::Url;

use crate::flow::Flow;
use crate::openai::Role;
use crate::pinning::Pins;
use crate::replay::client::{FailureKind, Replayer, Target};
use crate::replay::decode::Delta;
use crate::replay::render::Prompt;
use crate::session::SessionData;

/// How the direct replay went.
#[derive(Debug, Clone)]
pub struct Verification {
    pub ok: bool,
    /// From sending the first call to the first reply text (the replay stops there).
    pub latency_ms: u64,
    /// Until the first text or reasoning.
    pub first_token_ms: Option<u64>,
    pub text: String,
    pub reasoning: String,
    pub failure: Option<String>,
    pub failure_kind: Option<FailureKind>,
}

/// The second probe: a fresh marker, so the site cannot answer from a cache.
pub fn second_probe() -> String {
    format!(
        "Reply with a short greeting. ct{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

pub async fn verify(
    replayer: &Replayer,
    flow: &Flow,
    base: &Url,
    session: &SessionData,
    proxy: Option<&str>,
) -> Verification {
    let prompt = Prompt {
        messages: vec![(Role::User, second_probe())],
        model: flow.service.clone(),
    };
    let conversation = BTreeMap::new();
    // The flow was just learned from the site's own page: the origins it calls are the page's.
    let learned = crate::pinning::static_origins(flow).unwrap_or_default();
    let pins = Pins::new(base, learned.iter().map(|(_, origin)| origin.as_str()));
    let target = Target {
        base,
        session,
        proxy,
        conversation: &conversation,
        // A new flow is checked against the site as it is now, not against reused values.
        session_id: None,
        pins: &pins,
    };
    let started = Instant::now();
    let mut verification = Verification {
        ok: false,
        latency_ms: 0,
        first_token_ms: None,
        text: String::new(),
        reasoning: String::new(),
        failure: None,
        failure_kind: None,
    };
    let fail = |v: &mut Verification, kind: FailureKind, message: String| {
        v.failure_kind = Some(kind);
        v.failure = Some(message);
    };
    match replayer.start(flow, &prompt, target).await {
        Err(e) => fail(&mut verification, e.kind(), e.to_string()),
        Ok(replay) => {
            let mut deltas = replay.deltas;
            while let Some(item) = deltas.next().await {
                match item {
                    Ok(Delta::Text(t)) => {
                        verification
                            .first_token_ms
                            .get_or_insert(started.elapsed().as_millis() as u64);
                        verification.text.push_str(&t);
                        // Reply text proves the replay works; the rest of a long reply would
                        // only slow the learn down (dropping the stream cancels the call).
                        if !verification.text.trim().is_empty() {
                            break;
                        }
                    }
                    Ok(Delta::Reasoning(t)) => {
                        verification
                            .first_token_ms
                            .get_or_insert(started.elapsed().as_millis() as u64);
                        verification.reasoning.push_str(&t);
                        // Decoded reasoning proves it as well as text does.
                        if !verification.reasoning.trim().is_empty() {
                            break;
                        }
                    }
                    Ok(Delta::Done) => break,
                    Ok(Delta::Id { .. }) => {}
                    Err(e) => {
                        fail(&mut verification, e.kind(), e.to_string());
                        break;
                    }
                }
            }
            if verification.failure.is_none()
                && verification.text.trim().is_empty()
                && verification.reasoning.trim().is_empty()
            {
                fail(
                    &mut verification,
                    FailureKind::FormatDrift,
                    "the replayed call answered, but the decoder found no reply text in it".into(),
                );
            }
        }
    }
    verification.latency_ms = started.elapsed().as_millis() as u64;
    verification.ok = verification.failure.is_none();
    verification
}

/// Records the verification in the flow: stats, and whether it needs a browser tier.
pub fn apply(flow: &mut Flow, verification: &Verification, suspicious: &[String]) {
    flow.stats.tested = true;
    flow.stats.last_tested_at = Some(crate::store::now());
    flow.stats.success_rate = Some(if verification.ok { 1.0 } else { 0.0 });
    if verification.ok {
        flow.stats.p50_ms = Some(verification.latency_ms);
        flow.stats.p95_ms = Some(verification.latency_ms);
        flow.replay.needs_browser = false;
        flow.replay.reason = None;
        flow.replay.min_tier = None;
        return;
    }
    let failure = verification
        .failure
        .clone()
        .unwrap_or_else(|| "direct replay failed".into());
    flow.replay.needs_browser = true;
    flow.replay.min_tier = Some(if suspicious.is_empty() { 2 } else { 3 });
    flow.replay.reason = Some(if suspicious.is_empty() {
        format!("direct replay failed: {failure}")
    } else {
        format!(
            "direct replay failed ({failure}); the request carries values computed in the page \
             ({}), likely anti-replay material",
            suspicious.join("; ")
        )
    });
}
