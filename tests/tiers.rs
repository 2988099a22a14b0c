//! The browser fallback tiers with real Chromium, through the official openai SDK: an
//! anti-bot layer sends requests to tier 2 (and tier 1 is not retried during the cooldown), a
//! page-signed API is served by tier 3 streaming from the network capture, and a site that
//! changes its API is served by tier 3 while the flow is re-learned, then by tier 1 again.
//! The `x-computetower-tier` header forces one tier, with no fallback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::{
    Data, PASSWORD, ask, demo_site, error_message, eventually, get_json, http, post_chat,
};
use computetower::demo::{Shape, reply_for, reply_for_turn};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const TIER_HEADER: &str = "x-computetower-tier";

/// Text as a page shows markdown: markup gone, whitespace collapsed.
fn rendered(text: &str) -> String {
    text.replace(['*', '`'], "")
        .lines()
        .map(|l| l.trim().trim_start_matches("- "))
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn tiers_of(events: &Value) -> Vec<(i64, String)> {
    events["data"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| {
            (
                e["tier"].as_i64().unwrap_or(0),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn anti_bot_mode_is_served_by_tier_2_and_tier_1_waits_out_its_cooldown() {
    let site = demo_site("ndjson", &["--anti-bot"]);
    let data = Data::new();
    // The hand-written flow carries no clearance: direct replay meets the challenge page.
    data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "guarded",
            "--email",
            "bot@example.com",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    let flow = common::repo().join("flows/demo-ndjson.json");
    data.ok(
        &[
            "flows",
            "import",
            flow.to_str().unwrap(),
            "--service",
            "guarded",
        ],
        None,
    );
    let server = data.serve(&[]);
    for text in ["one", "two"] {
        let (status, body) = post_chat(&server.url, None, ask("guarded", text)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            reply_for(Shape::Ndjson, text).content
        );
    }
    let events = get_json(format!("{}/admin/events", server.url)).await;
    let tiers = tiers_of(&events);
    // The first request met the challenge at tier 1, then tier 2 served it; the second went
    // straight to tier 2.
    assert_eq!(
        tiers.first(),
        Some(&(1, "anti_bot".to_owned())),
        "{tiers:?}"
    );
    assert_eq!(
        tiers.iter().filter(|(t, _)| *t == 1).count(),
        1,
        "{tiers:?}"
    );
    assert_eq!(
        tiers.iter().filter(|t| **t == (2, "ok".to_owned())).count(),
        2,
        "{tiers:?}"
    );
    let decisions = get_json(format!("{}/admin/decisions", server.url)).await;
    assert!(
        decisions["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["failure"] == "anti_bot" && d["action"] == "tier_2"),
        "{decisions}"
    );
    // Forcing tier 1 skips the cooldown and the fallback: the refusal is the answer.
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .header(TIER_HEADER, "1")
        .json(&serde_json::from_str::<Value>(&ask("guarded", "three")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    error_message(&body);
    assert_eq!(body["error"]["code"], "upstream_challenge", "{body}");
    let tiers = eventually(WAIT, "the forced request's event", || async {
        let tiers = tiers_of(&get_json(format!("{}/admin/events", server.url)).await);
        (tiers.len() == 4).then_some(tiers)
    })
    .await;
    assert_eq!(tiers[3], (1, "anti_bot".to_owned()), "{tiers:?}");
}

#[tokio::test]
async fn the_signed_shape_streams_from_tier_3_before_the_site_finishes() {
    let site = demo_site("signed", &["--token-delay-ms", "40"]);
    let data = Data::new();
    data.learn_account(&site.url, "signed", "tiers@example.com");
    let server = data.serve(&[]);
    // The learn's probes completed replies; count from zero.
    http()
        .post(format!("{}/__demo/reset-stats", site.url))
        .send()
        .await
        .unwrap();
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({"model": "signed", "stream": true,
            "messages": [{"role": "user", "content": "sign this"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let (mut content, mut reasoning) = (String::new(), String::new());
    let mut site_at_first: Option<Value> = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        let delta = &chunk["choices"][0]["delta"];
        for (field, out) in [
            ("content", &mut content),
            ("reasoning_content", &mut reasoning),
        ] {
            if let Some(text) = delta[field].as_str().filter(|t| !t.is_empty()) {
                out.push_str(text);
                if site_at_first.is_none() {
                    site_at_first = Some(get_json(format!("{}/__demo/stats", site.url)).await);
                }
            }
        }
    }
    let expected = reply_for(Shape::Signed, "sign this");
    assert_eq!(content, expected.content);
    assert_eq!(Some(reasoning), expected.reasoning);
    // Streamed from the capture, not read off the finished page: when the first token
    // reached the client, the site was still sending the reply.
    let at_first = site_at_first.expect("a first token");
    assert_eq!(at_first["active"], 1, "{at_first}");
    assert_eq!(at_first["completed"], 0, "{at_first}");
    let events = get_json(format!("{}/admin/events", server.url)).await;
    assert!(
        tiers_of(&events).contains(&(3, "ok".to_owned())),
        "{events}"
    );
}

#[tokio::test]
async fn a_site_that_changes_its_api_is_served_by_tier_3_then_relearned() {
    let site = demo_site("ndjson", &[]);
    let data = Data::new();
    data.learn_account(&site.url, "changing", "tiers@example.com");
    let server = data.serve(&[]);
    let (status, _) = post_chat(&server.url, None, ask("changing", "before")).await;
    assert_eq!(status, 200);
    let switched = http()
        .post(format!("{}/__demo/shape?to=numbered", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(switched.status(), 200);
    // The learned call now 404s: tier 3 answers through the site's own page. Its new wire
    // format does not fit the old decoder, so the text is the page's rendering of the reply.
    let (status, body) = post_chat(&server.url, None, ask("changing", "during")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        rendered(body["choices"][0]["message"]["content"].as_str().unwrap()),
        rendered(&reply_for(Shape::Numbered, "during").content)
    );
    // Meanwhile the flow is re-learned in the background.
    eventually(WAIT, "the re-learned flow", || async {
        let flows = get_json(format!("{}/admin/flows", server.url)).await;
        let flow = flows["data"].as_array()?.first()?.clone();
        (flow["version"].as_u64()? >= 2 && flow["response"]["transport"] == "numbered_lines")
            .then_some(())
    })
    .await;
    let (status, body) = post_chat(&server.url, None, ask("changing", "after")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reply_for(Shape::Numbered, "after").content
    );
    let tiers = tiers_of(&get_json(format!("{}/admin/events", server.url)).await);
    assert_eq!(tiers.last(), Some(&(1, "ok".to_owned())), "{tiers:?}");
    assert!(tiers.contains(&(3, "ok".to_owned())), "{tiers:?}");
    let decisions = get_json(format!("{}/admin/decisions", server.url)).await;
    assert!(
        decisions["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["action"] == "tier_3_and_relearn"),
        "{decisions}"
    );
}

/// Sends `text` to `model` with the tier forced; returns the tier the response header names
/// and the reply's content (streamed or not).
async fn forced(
    server: &str,
    model: &str,
    tier: &str,
    text: &str,
    stream: bool,
) -> (String, String) {
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .header(TIER_HEADER, tier)
        .json(&json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "tier {tier}");
    let served = response.headers()[TIER_HEADER].to_str().unwrap().to_owned();
    if !stream {
        let body: Value = response.json().await.unwrap();
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        return (served, content.to_owned());
    }
    let mut events = response.bytes_stream().eventsource();
    let mut content = String::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(text);
        }
    }
    (served, content)
}

#[tokio::test]
async fn a_forced_tier_serves_the_request_and_health_lists_the_tiers() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "force@example.com")
        .await;
    let server = data.serve(&[]);
    let health = get_json(format!("{}/health", server.url)).await;
    assert_eq!(health["tiers"], json!([1, 2, 3]), "{health}");
    // A value that names no tier is the client's mistake, in OpenAI's shape.
    for bad in ["0", "4", "abc"] {
        let response = http()
            .post(format!("{}/v1/chat/completions", server.url))
            .header(TIER_HEADER, bad)
            .json(&serde_json::from_str::<Value>(&ask(&model, "x")).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert!(error_message(&body).contains(TIER_HEADER), "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], TIER_HEADER);
    }
    // The same tier-1 flow, served by each tier in turn (streamed and not), with the site's
    // exact reply.
    for (tier, text, stream) in [
        ("1", "direct", false),
        ("2", "in the page", false),
        ("3", "through the UI", true),
        ("2", "in the page, streamed", true),
    ] {
        let (served, content) = forced(&server.url, &model, tier, text, stream).await;
        assert_eq!(served, tier, "{text}");
        assert_eq!(content, reply_for(Shape::Openai, text).content, "{text}");
    }
    // An unforced request names its tier too.
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&serde_json::from_str::<Value>(&ask(&model, "unforced")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[TIER_HEADER], "1");
    response.bytes().await.unwrap();
    let tiers = eventually(WAIT, "five recorded events", || async {
        let tiers = tiers_of(&get_json(format!("{}/admin/events", server.url)).await);
        (tiers.len() == 5).then_some(tiers)
    })
    .await;
    let ok = |t: i64| (t, "ok".to_owned());
    assert_eq!(tiers, [ok(1), ok(2), ok(3), ok(2), ok(1)]);
    let decisions = get_json(format!("{}/admin/decisions", server.url)).await;
    assert_eq!(decisions["data"], json!([]), "no fallback: {decisions}");
}

/// Sends `messages` to `model` with tier 2 forced; returns the reply's content.
async fn in_the_page(server: &str, model: &str, messages: &[(&str, &str)]) -> String {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .header(TIER_HEADER, "2")
        .json(&json!({"model": model, "messages": messages}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[TIER_HEADER], "2");
    let body: Value = response.json().await.unwrap();
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn tier_2_reuses_session_wide_preflights_and_continues_the_site_conversation() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "page@example.com")
        .await;
    let server = data.serve(&[]);
    // `pages` counts reads of the chat page: the browser's own load, and the flow's preflight
    // that reads the CSRF token from it.
    let pages = || async {
        get_json(format!("{}/__demo/stats", site.url)).await["pages"]
            .as_u64()
            .unwrap()
    };
    let first = in_the_page(&server.url, &model, &[("user", "first question")]).await;
    assert_eq!(first, reply_for(Shape::Openai, "first question").content);
    // The next turn continues the site conversation the first one created (with the flow's
    // follow-up: its own CSRF read, no new conversation).
    let history = [
        ("user", "first question"),
        ("assistant", first.as_str()),
        ("user", "second question"),
    ];
    let second = in_the_page(&server.url, &model, &history).await;
    assert_eq!(
        second,
        reply_for_turn(Shape::Openai, "second question", 2).content
    );
    let before = pages().await;
    // A new conversation creates one, but the CSRF token the first turn read (a session-wide
    // value) is reused: the chat page is not read again.
    let other = in_the_page(&server.url, &model, &[("user", "another topic")]).await;
    assert_eq!(other, reply_for(Shape::Openai, "another topic").content);
    assert_eq!(pages().await, before);
    let conversations = get_json(format!("{}/__demo/conversations", site.url)).await;
    let turns: Vec<u64> = conversations
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["turns"].as_u64().unwrap())
        .collect();
    assert_eq!(turns, [2, 1], "{conversations}");
    let events = eventually(WAIT, "three recorded events", || async {
        let events = get_json(format!("{}/admin/events", server.url)).await;
        (events["data"].as_array()?.len() == 3).then_some(events)
    })
    .await;
    assert_eq!(tiers_of(&events), vec![(2, "ok".to_owned()); 3]);
    let continued = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["detail"] == "continued the site conversation")
        .count();
    assert_eq!(continued, 1, "{events}");
}
