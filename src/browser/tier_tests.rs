//! The browser tiers against the real Chromium and the in-process demo site (see `tests.rs`
//! for the conventions: one pool per test, at most two Chromiums at once).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::tests::{BROWSERS, PASSWORD, Site, config, flow_of, request, site_with};
use super::*;
use crate::demo::{DemoConfig, Shape, reply_for};
use crate::replay::DeltaStream;
use crate::replay::decode::Delta;
use crate::replay::failure::{Call, FailureKind, ReplayError};
use crate::replay::render::Prompt;
use crate::role::Role;

fn tier_request(account: &str, site: &Site, shape: Shape, text: &str) -> TierRequest {
    TierRequest {
        account_id: account.to_owned(),
        account_url: site.url.clone(),
        session: None,
        login: Some(request(account, site, PASSWORD)),
        flow: Arc::new(flow_of(shape)),
        pins: crate::pinning::Pins::new(&url::Url::parse(&site.url).unwrap(), []),
        prompt: Prompt {
            messages: vec![(Role::User, text.to_owned())],
            model: "demo".into(),
            attachments: Vec::new(),
        },
        conversation: Default::default(),
        session_id: None,
        reused: None,
        uploads: None,
        timeout: Duration::from_secs(20),
    }
}

/// Tier 2's reply alone.
async fn in_page(pool: &BrowserPool, req: TierRequest) -> Result<DeltaStream, ReplayError> {
    in_page_tier(pool, req).await.map(|started| started.deltas)
}

/// Tier 3's reply.
async fn ui(pool: &BrowserPool, req: TierRequest) -> Result<DeltaStream, ReplayError> {
    ui_tier(pool, req).await.map(|started| started.deltas)
}

/// Text and reasoning, and what the site said of its replies when the first delta came.
struct Collected {
    text: String,
    reasoning: String,
    /// `/__demo/stats` read at the first delta (when a site was given).
    site_at_first: Option<serde_json::Value>,
}

async fn collect(stream: DeltaStream) -> Collected {
    collect_watching(stream, None).await
}

/// Collects the reply; at its first delta, reads `site`'s stats: whether the site was still
/// streaming then is the evidence that the tier streams (no stopwatch needed).
async fn collect_watching(mut stream: DeltaStream, site: Option<&Site>) -> Collected {
    let mut out = Collected {
        text: String::new(),
        reasoning: String::new(),
        site_at_first: None,
    };
    while let Some(delta) = stream.next().await {
        let piece = match delta.unwrap() {
            Delta::Text(t) => {
                out.text.push_str(&t);
                true
            }
            Delta::Reasoning(t) => {
                out.reasoning.push_str(&t);
                true
            }
            Delta::Id { .. } | Delta::Done => false,
        };
        if piece
            && out.site_at_first.is_none()
            && let Some(site) = site
        {
            out.site_at_first = Some(stats(site).await);
        }
    }
    out
}

fn assert_reply(shape: Shape, text: &str, got: &Collected) {
    let expected = reply_for(shape, text);
    assert_eq!(got.text, expected.content, "{shape}: text");
    assert_eq!(
        got.reasoning,
        expected.reasoning.unwrap_or_default(),
        "{shape}: reasoning"
    );
}

async fn stats(site: &Site) -> serde_json::Value {
    crate::demo::http_client()
        .unwrap()
        .get(format!("{}__demo/stats", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn tier2_runs_preflights_and_the_chat_call_inside_the_page() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = BrowserPool::new(config(dir.path()));
    let mut failures = Vec::new();
    for shape in [Shape::Openai, Shape::Ndjson, Shape::Claude] {
        let site = site_with(DemoConfig {
            shape,
            ..DemoConfig::default()
        })
        .await;
        let account = format!("inpage-{shape}");
        pool.login(request(&account, &site, PASSWORD))
            .await
            .unwrap();
        for round in 0..2 {
            let text = format!("In-page {shape} round {round}: héllo «wörld» ✓");
            let stream = in_page(&pool, tier_request(&account, &site, shape, &text)).await;
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{shape}: {e}"));
                    continue;
                }
            };
            let got = collect(stream).await;
            assert_reply(shape, &text, &got);
        }
    }
    // Signed: the signature is computed by the page's own script over the body; a fetch with
    // the flow's stale one is refused.
    let site = site_with(DemoConfig {
        shape: Shape::Signed,
        ..DemoConfig::default()
    })
    .await;
    pool.login(request("inpage-signed", &site, PASSWORD))
        .await
        .unwrap();
    let error = in_page(
        &pool,
        tier_request("inpage-signed", &site, Shape::Signed, "sign me"),
    )
    .await
    .err()
    .expect("a stale signature is refused");
    pool.shutdown().await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        matches!(
            error,
            ReplayError::Status {
                call: Call::Chat,
                status: 403,
                kind: FailureKind::Auth,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("signature"), "{error}");
}

#[tokio::test]
async fn dropping_a_tier2_stream_cancels_the_sites_call() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site_with(DemoConfig {
        token_delay: Duration::from_millis(50),
        ..DemoConfig::default()
    })
    .await;
    let pool = BrowserPool::new(config(dir.path()));
    let mut req = tier_request("dropper", &site, Shape::Openai, "cancel me midway");
    // No login beforehand: the tier logs in itself.
    req.session = None;
    let mut stream = in_page(&pool, req).await.unwrap();
    loop {
        let delta = stream.next().await.unwrap().unwrap();
        if matches!(delta, Delta::Reasoning(_) | Delta::Text(_)) {
            break;
        }
    }
    let before = stats(&site).await;
    assert_eq!(before["active"], 1, "{before}");
    drop(stream);
    // The site answers once its call ended (or after 10 s, and the check below fails).
    let after: serde_json::Value = crate::demo::http_client()
        .unwrap()
        .get(format!("{}__demo/stats?wait_idle_ms=10000", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        after["active"], 0,
        "the site call is still running: {after}"
    );
    pool.shutdown().await;
    assert_eq!(after["cancelled"], 1, "{after}");
    assert_eq!(after["completed"], 0, "{after}");
}

#[tokio::test]
async fn tier3_types_into_the_signed_site_and_streams_the_recorded_reply() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site_with(DemoConfig {
        shape: Shape::Signed,
        token_delay: Duration::from_millis(50),
        ..DemoConfig::default()
    })
    .await;
    let pool = BrowserPool::new(config(dir.path()));
    pool.login(request("typist", &site, PASSWORD))
        .await
        .unwrap();
    let text = "Typed by the UI tier: grüße ✓";
    let stream = ui(&pool, tier_request("typist", &site, Shape::Signed, text)).await;
    let got = collect_watching(stream.unwrap(), Some(&site)).await;
    assert_reply(Shape::Signed, text, &got);
    // Streamed from the recorded call, not read off the finished page: when the first delta
    // came out, the site was still sending the reply.
    let at_first = got.site_at_first.expect("a first delta");
    assert_eq!(at_first["active"], 1, "{at_first}");
    assert_eq!(at_first["completed"], 0, "{at_first}");
    // Two more, concurrently: they queue for the account's UI and each gets its own
    // conversation (a first-turn reply).
    let a = ui(
        &pool,
        tier_request("typist", &site, Shape::Signed, "queued one"),
    );
    let b = ui(
        &pool,
        tier_request("typist", &site, Shape::Signed, "queued two"),
    );
    let (a, b) = tokio::join!(async { collect(a.await.unwrap()).await }, async {
        collect(b.await.unwrap()).await
    });
    pool.shutdown().await;
    assert_reply(Shape::Signed, "queued one", &a);
    assert_reply(Shape::Signed, "queued two", &b);
}

#[tokio::test]
async fn tier3_on_openai_and_websocket_sites() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = BrowserPool::new(config(dir.path()));
    let mut failures = Vec::new();
    for shape in [Shape::Openai, Shape::Ws] {
        let site = site_with(DemoConfig {
            shape,
            ..DemoConfig::default()
        })
        .await;
        let account = format!("ui-{shape}");
        pool.login(request(&account, &site, PASSWORD))
            .await
            .unwrap();
        for round in 0..2 {
            let text = format!("UI tier {shape} round {round}");
            match ui(&pool, tier_request(&account, &site, shape, &text)).await {
                Ok(stream) => {
                    let got = collect(stream).await;
                    let expected = reply_for(shape, &text);
                    if got.text != expected.content
                        || got.reasoning != expected.reasoning.unwrap_or_default()
                    {
                        failures.push(format!("{shape} round {round}: {:?}", got.text));
                    }
                }
                Err(e) => failures.push(format!("{shape} round {round}: {e}")),
            }
        }
    }
    pool.shutdown().await;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn an_idle_work_page_is_closed_and_its_context_kept() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site_with(DemoConfig::default()).await;
    let pool = BrowserPool::new(BrowserConfig {
        page_idle_timeout: Duration::from_millis(300),
        ..config(dir.path())
    });
    let text = "close my page later";
    let got = collect(
        in_page(&pool, tier_request("idler", &site, Shape::Openai, text))
            .await
            .unwrap(),
    )
    .await;
    assert_reply(Shape::Openai, text, &got);
    assert_eq!(pool.work_page_count(), 1, "kept for the next request");
    let mut changes = pool.changes();
    tokio::time::timeout(Duration::from_secs(20), async {
        while pool.work_page_count() > 0 {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("the idle page was not closed");
    assert_eq!(pool.context_count(), 1, "the context (and its login) stays");
    // The next request opens a page in the same context, without logging in again.
    let mut again = tier_request("idler", &site, Shape::Openai, "and again");
    again.login = None;
    let got = collect(in_page(&pool, again).await.unwrap()).await;
    assert_reply(Shape::Openai, "and again", &got);
    pool.shutdown().await;
}
