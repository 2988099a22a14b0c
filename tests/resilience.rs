//! Keeping answers coming when accounts are rate-limited or busy, and continuing the site's
//! own conversation across turns — all through the official openai SDK, with each decision
//! checked in `/admin/decisions`, `/admin/events` and `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, ask, demo_site, error_message, get_json, http, post_chat, sdk};
use computetower::demo::{Shape, reply_for, reply_for_turn};
use serde_json::json;

#[tokio::test]
async fn a_rate_limited_account_hands_over_to_the_next_then_429() {
    let site = demo_site("ndjson", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "ndjson", "a@example.com")
        .await;
    data.add_demo_account(&site.url, "ndjson", "b@example.com")
        .await;
    let server = data.serve(&[]);
    let limit = |email: &str| {
        http()
            .post(format!(
                "{}/__demo/rate-limit?email={email}&seconds=120",
                site.url
            ))
            .send()
    };
    assert_eq!(limit("a@example.com").await.unwrap().status(), 200);
    // Whichever account is tried first, the answer comes (from B when A is limited).
    for i in 0..3 {
        let (status, body) = post_chat(&server.url, None, ask(&model, &format!("q{i}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            reply_for(Shape::Ndjson, &format!("q{i}")).content
        );
    }
    let decisions = get_json(format!("{}/admin/decisions", server.url)).await;
    let handed_over = decisions["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["failure"] == "rate_limit" && d["action"] == "next_account");
    assert!(handed_over, "{decisions}");
    // With both limited, the client gets 429 and a Retry-After.
    assert_eq!(limit("b@example.com").await.unwrap().status(), 200);
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .body(ask(&model, "limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    error_message(&response.json().await.unwrap());
}

#[tokio::test]
async fn a_three_turn_conversation_continues_one_site_conversation() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "c@example.com")
        .await;
    let server = data.serve(&[]);
    let turns = ["first question", "second question", "third question"];
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": model, "mode": "conversation",
        "turns": turns,
    }));
    for (i, turn) in turns.iter().enumerate() {
        assert_eq!(
            report["replies"][i],
            reply_for_turn(Shape::Openai, turn, i as u32 + 1).content,
            "turn {}",
            i + 1
        );
    }
    assert!(
        report["replies"][2]
            .as_str()
            .unwrap()
            .contains("turn **3**")
    );
    // An edited history is a new site conversation: turn 1 again, with the history flattened.
    let edited = report["edited"].as_str().unwrap();
    assert!(!edited.contains("turn **"), "{edited}");
    let conversations = get_json(format!("{}/__demo/conversations", site.url)).await;
    let turns: Vec<u64> = conversations
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["turns"].as_u64().unwrap())
        .collect();
    assert!(turns.contains(&3), "{conversations}");
    let events = get_json(format!("{}/admin/events", server.url)).await;
    let continued = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["detail"] == "continued the site conversation")
        .count();
    assert_eq!(continued, 2, "{events}");
}

#[tokio::test]
async fn fifty_streams_over_three_accounts_queue_within_the_limit() {
    let site = demo_site("patch", &["--token-delay-ms", "5"]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "patch", "p1@example.com")
        .await;
    data.add_demo_account(&site.url, "patch", "p2@example.com")
        .await;
    data.add_demo_account(&site.url, "patch", "p3@example.com")
        .await;
    let server = data.serve(&[("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", "4")]);
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": model, "mode": "concurrent",
        "n": 50, "prompt": "load",
    }));
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 50);
    for result in results {
        let i = result["i"].as_u64().unwrap();
        assert!(result.get("error").is_none(), "{result}");
        assert_eq!(
            result["content"],
            reply_for(Shape::Patch, &format!("load {i}")).content
        );
    }
    // The site never saw more than 4 replies at once on one account…
    let stats = get_json(format!("{}/__demo/stats", site.url)).await;
    for (email, max) in stats["max_active_by_email"].as_object().unwrap() {
        assert!(max.as_u64().unwrap() <= 4, "{email}: {stats}");
    }
    // … so requests queued, and that shows in the events and the metrics.
    let events = get_json(format!("{}/admin/events?limit=200", server.url)).await;
    let queued = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["queue_ms"].as_i64().unwrap_or(0) > 0)
        .count();
    assert!(queued > 0, "no request waited: {events}");
    let metrics = http()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let queued_total: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("computetower_account_queued_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(queued_total > 0.0, "{metrics}");
    let served: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("computetower_account_served_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(served, 50.0, "{metrics}");
    // Every reply's time to first token went into the histogram of its service and tier, and
    // every reply's end into the request counter.
    let sum_of = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(
        sum_of("computetower_ttft_seconds_count{"),
        50.0,
        "{metrics}"
    );
    assert_eq!(sum_of("computetower_requests_total{"), 50.0, "{metrics}");
    assert!(
        metrics.contains("# TYPE computetower_ttft_seconds histogram"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_api_key_over_its_rate_gets_429() {
    let site = demo_site("json", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "json", "k@example.com")
        .await;
    let key = data.ok(&["keys", "create"], None).trim().to_owned();
    let server = data.serve(&[("COMPUTETOWER_REQUESTS_PER_MINUTE_PER_KEY", "2")]);
    for _ in 0..2 {
        let (status, body) = post_chat(&server.url, Some(&key), ask(&model, "x")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = post_chat(&server.url, Some(&key), ask(&model, "x")).await;
    assert_eq!(status, 429, "{body}");
    assert!(error_message(&body).contains("API key"), "{body}");
}

#[tokio::test]
async fn a_session_wide_preflight_is_reused_and_read_again_when_stale() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "csrf@example.com")
        .await;
    let server = data.serve(&[]);
    let pages = || async { get_json(format!("{}/__demo/stats", site.url)).await["pages"].clone() };
    let answer = |question: &'static str| {
        let url = server.url.clone();
        let model = model.clone();
        async move {
            let (status, body) = post_chat(&url, None, ask(&model, question)).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body["choices"][0]["message"]["content"],
                reply_for(Shape::Openai, question).content
            );
        }
    };
    http()
        .post(format!("{}/__demo/reset-stats", site.url))
        .send()
        .await
        .unwrap();
    // The flow reads the CSRF token from the chat page, then creates a conversation: the
    // page is read for the first request only.
    answer("one").await;
    answer("two").await;
    answer("three").await;
    assert_eq!(pages().await, 1);
    // The site rotates the token: the next request fails with the reused one, reads the page
    // again and still answers.
    let rotated = http()
        .post(format!("{}/__demo/rotate-csrf", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);
    answer("four").await;
    answer("five").await;
    assert_eq!(pages().await, 2);
}
