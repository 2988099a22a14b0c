//! Verifying a learned flow: replay it once directly with a second probe. It must yield reply
//! text; the replay stops at the first text, which is all the proof needed. When the flow
//! learned how a later turn continues, a direct second turn in the same site conversation
//! must yield text too (the first turn is read on only until the ids it needs have come).
//!
//! A flow whose direct replay fails is still worth keeping: its request carries values the
//! page computes (a signature, a proof of work, a one-time token), so it is marked as needing
//! a browser tier, with the reason, instead of failing the learn. Such a flow loses its
//! follow-up (the browser tiers let the site's own page continue its conversations), and so
//! does a flow whose second turn fails.

use std::collections::BTreeMap;
use std::time::Instant;

use futures_util::StreamExt;
use url::Url;

use crate::flow::{Flow, TURNS};
use crate::pinning::Pins;
use crate::replay::client::{Replayer, Target};
use crate::replay::decode::Delta;
use crate::replay::failure::FailureKind;
use crate::replay::render::Prompt;
use crate::role::Role;
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
    /// The direct second turn, when the flow has a follow-up: `Ok(latency_ms)` or why not.
    pub follow_up: Option<Result<u64, String>>,
}

/// The second probe: a fresh marker, so the site cannot answer from a cache.
pub fn second_probe() -> String {
    format!(
        "Reply with a short greeting. ct{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// One direct turn: the first text (or reasoning), and the values a later turn reuses.
struct Turn {
    first_token_ms: Option<u64>,
    text: String,
    reasoning: String,
    values: BTreeMap<String, String>,
    failure: Option<(FailureKind, String)>,
}

async fn turn(
    replayer: &Replayer,
    flow: &Flow,
    prompt: &Prompt,
    target: Target<'_>,
    wanted: &[String],
) -> Turn {
    let started = Instant::now();
    let mut turn = Turn {
        first_token_ms: None,
        text: String::new(),
        reasoning: String::new(),
        values: BTreeMap::new(),
        failure: None,
    };
    let replay = match replayer.start(flow, prompt, target).await {
        Ok(replay) => replay,
        Err(e) => {
            turn.failure = Some((e.kind(), e.to_string()));
            return turn;
        }
    };
    turn.values = replay.extracted;
    let mut deltas = replay.deltas;
    while let Some(item) = deltas.next().await {
        match item {
            Ok(Delta::Text(t)) => {
                turn.first_token_ms
                    .get_or_insert(started.elapsed().as_millis() as u64);
                turn.text.push_str(&t);
            }
            Ok(Delta::Reasoning(t)) => {
                turn.first_token_ms
                    .get_or_insert(started.elapsed().as_millis() as u64);
                turn.reasoning.push_str(&t);
            }
            Ok(Delta::Done) => break,
            Ok(Delta::Id { name, value }) => {
                turn.values.insert(name, value);
            }
            Err(e) => {
                turn.failure = Some((e.kind(), e.to_string()));
                break;
            }
        }
        // Text (or reasoning) proves the replay works; the rest of a long reply would only
        // slow the learn down (dropping the stream cancels the call), once a later turn has
        // the ids it needs.
        let answered = !turn.text.trim().is_empty() || !turn.reasoning.trim().is_empty();
        if answered && wanted.iter().all(|w| turn.values.contains_key(w)) {
            break;
        }
    }
    if turn.failure.is_none() && turn.text.trim().is_empty() && turn.reasoning.trim().is_empty() {
        turn.failure = Some((
            FailureKind::FormatDrift,
            "the replayed call answered, but the decoder found no reply text in it".into(),
        ));
    }
    turn
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
        attachments: Vec::new(),
    };
    let none = BTreeMap::new();
    // The flow was just learned from the site's own page: the origins it calls are the page's.
    let learned = crate::pinning::static_origins(flow).unwrap_or_default();
    let pins = Pins::new(base, learned.iter().map(|(_, origin)| origin.as_str()));
    let target = Target {
        base,
        session,
        proxy,
        conversation: &none,
        // A new flow is checked against the site as it is now, not against reused values.
        session_id: None,
        pins: &pins,
    };
    let wanted = flow
        .follow_up
        .as_ref()
        .map(|f| f.uses())
        .unwrap_or_default();
    let started = Instant::now();
    let first = turn(replayer, flow, &prompt, target, &wanted).await;
    let mut verification = Verification {
        ok: first.failure.is_none(),
        latency_ms: started.elapsed().as_millis() as u64,
        first_token_ms: first.first_token_ms,
        text: first.text,
        reasoning: first.reasoning,
        failure_kind: first.failure.as_ref().map(|(k, _)| *k),
        failure: first.failure.map(|(_, m)| m),
        follow_up: None,
    };
    if !verification.ok {
        return verification;
    }
    let (Some(follow_up), Some(next)) = (&flow.follow_up, flow.follow_up_flow()) else {
        return verification;
    };
    if let Some(missing) = wanted.iter().find(|w| !first.values.contains_key(*w)) {
        verification.follow_up = Some(Err(format!(
            "the first reply never gave `{missing}`, which a later turn sends"
        )));
        return verification;
    }
    let mut values = follow_up.carried(&first.values);
    values.insert(TURNS.to_owned(), "1".to_owned());
    let later = Prompt {
        messages: if follow_up.resends_history {
            vec![
                (Role::User, prompt.last_user().to_owned()),
                (Role::Assistant, verification.text.clone()),
                (Role::User, second_probe()),
            ]
        } else {
            vec![(Role::User, second_probe())]
        },
        model: flow.service.clone(),
        attachments: Vec::new(),
    };
    let target = Target {
        conversation: &values,
        ..target
    };
    let started = Instant::now();
    let second = turn(replayer, &next, &later, target, &[]).await;
    verification.follow_up = Some(match second.failure {
        None => Ok(started.elapsed().as_millis() as u64),
        Some((_, message)) => Err(message),
    });
    verification
}

/// Records the verification in the flow: stats, whether it needs a browser tier, and whether
/// it keeps its follow-up. Returns a note on the follow-up, if any.
pub fn apply(
    flow: &mut Flow,
    verification: &Verification,
    suspicious: &[String],
) -> Option<String> {
    flow.stats.tested = true;
    flow.stats.last_tested_at = Some(crate::store::now());
    flow.stats.success_rate = Some(if verification.ok { 1.0 } else { 0.0 });
    if verification.ok {
        flow.stats.p50_ms = Some(verification.latency_ms);
        flow.stats.p95_ms = Some(verification.latency_ms);
        flow.replay.needs_browser = false;
        flow.replay.reason = None;
        flow.replay.min_tier = None;
        return match &verification.follow_up {
            Some(Ok(ms)) => Some(format!(
                "later turns: a direct second turn in the same site conversation answered \
                 (first text after {ms} ms)"
            )),
            Some(Err(reason)) => {
                flow.follow_up = None;
                Some(format!(
                    "later turns: the direct second turn failed ({reason}); each request \
                     starts a new site conversation"
                ))
            }
            None => None,
        };
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
    flow.follow_up.take().map(|_| {
        "later turns: left to the site's own page (the flow runs in the browser tiers)".to_owned()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::demo::{self, DemoConfig, Shape};
    use crate::replay::Timeouts;
    use crate::session::Cookie;

    const PASSWORD: &str = "demo-password";

    /// The demo site serving `shape`, in process on a free port.
    async fn site(shape: Shape) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = DemoConfig {
            shape,
            ..DemoConfig::default()
        };
        tokio::spawn(demo::serve(listener, config));
        format!("http://{addr}/")
    }

    /// The session a login on the site leaves: its cookies and the token it stores.
    async fn session(site: &str) -> SessionData {
        let login = demo::json_login(site, "verify@example.com", PASSWORD)
            .await
            .unwrap();
        let host = Url::parse(site).unwrap().host_str().unwrap().to_owned();
        SessionData {
            cookies: login
                .cookies
                .into_iter()
                .map(|(name, value)| Cookie {
                    name,
                    value,
                    domain: host.clone(),
                    path: "/".into(),
                    expires: None,
                    secure: false,
                    http_only: true,
                    host_only: true,
                })
                .collect(),
            local_storage: login.local_storage.into_iter().collect(),
            ..SessionData::default()
        }
    }

    fn replayer() -> Replayer {
        crate::install_tls_provider();
        Replayer::new(Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        })
    }

    async fn conversation_turns(site: &str) -> Vec<u64> {
        let conversations: serde_json::Value = reqwest::get(format!("{site}__demo/conversations"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        conversations
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["turns"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_flow_that_replays_directly_is_verified_by_a_first_and_a_second_turn() {
        let site = site(Shape::Openai).await;
        let mut flow: Flow = serde_json::from_str(Shape::Openai.flow_file()).unwrap();
        let base = Url::parse(&site).unwrap();
        let session = session(&site).await;
        let verification = verify(&replayer(), &flow, &base, &session, None).await;
        assert!(verification.ok, "{:?}", verification.failure);
        // The replay stops at the first piece of the answer (text or reasoning).
        assert!(!format!("{}{}", verification.text, verification.reasoning).is_empty());
        assert!(
            matches!(verification.follow_up, Some(Ok(_))),
            "{:?}",
            verification.follow_up
        );
        // What the site saw: one conversation, continued by the second turn.
        assert_eq!(conversation_turns(&site).await, [2]);
        let note = apply(&mut flow, &verification, &[]).unwrap();
        assert!(note.contains("direct second turn"), "{note}");
        assert!(flow.stats.tested && !flow.replay.needs_browser);
        assert!(flow.follow_up.is_some());
    }

    #[tokio::test]
    async fn a_flow_the_site_refuses_directly_is_kept_for_the_browser_tiers() {
        // The signed shape's page signs every chat call: a replayed signature is refused.
        let site = site(Shape::Signed).await;
        let mut flow: Flow = serde_json::from_str(Shape::Signed.flow_file()).unwrap();
        let base = Url::parse(&site).unwrap();
        let session = session(&site).await;
        let verification = verify(&replayer(), &flow, &base, &session, None).await;
        assert!(!verification.ok);
        assert!(verification.failure.is_some() && verification.failure_kind.is_some());
        assert_eq!(verification.follow_up, None);
        let suspicious = ["`/sig` looks computed in the page".to_owned()];
        apply(&mut flow, &verification, &suspicious);
        assert!(flow.replay.needs_browser);
        assert_eq!(flow.replay.min_tier, Some(3));
        assert!(flow.follow_up.is_none());
        let reason = flow.replay.reason.unwrap();
        assert!(reason.contains("computed in the page"), "{reason}");
    }

    #[test]
    fn apply_records_what_the_verification_found() {
        let flow: Flow = serde_json::from_str(Shape::Openai.flow_file()).unwrap();
        let verified = |ok: bool, follow_up: Option<Result<u64, String>>| Verification {
            ok,
            latency_ms: 120,
            first_token_ms: Some(80),
            text: "hi".into(),
            reasoning: String::new(),
            failure: (!ok).then(|| "HTTP 403".to_owned()),
            failure_kind: (!ok).then_some(FailureKind::Auth),
            follow_up,
        };
        // (verification, suspicious values) → needs browser, min tier, keeps follow-up
        let table = [
            (verified(true, None), false, false, None, true),
            (verified(true, Some(Ok(90))), false, false, None, true),
            (
                verified(true, Some(Err("400".into()))),
                false,
                false,
                None,
                false,
            ),
            (verified(false, None), false, true, Some(2), false),
            (verified(false, None), true, true, Some(3), false),
        ];
        for (verification, suspicious, browser, min_tier, follow_up) in table {
            let mut flow = flow.clone();
            let suspicious = if suspicious {
                vec!["a signature".to_owned()]
            } else {
                Vec::new()
            };
            apply(&mut flow, &verification, &suspicious);
            let case = format!("{verification:?} {suspicious:?}");
            assert!(flow.stats.tested, "{case}");
            assert_eq!(flow.replay.needs_browser, browser, "{case}");
            assert_eq!(flow.replay.min_tier, min_tier, "{case}");
            assert_eq!(flow.follow_up.is_some(), follow_up, "{case}");
            let p50 = verification.ok.then_some(120);
            assert_eq!(flow.stats.p50_ms, p50, "{case}");
        }
    }
}
