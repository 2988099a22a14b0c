//! Two `serve` instances on one PostgreSQL store (the unprivileged cluster of
//! `common::postgres`) and the demo site, each instance with its own data dir and Chromium:
//! what they share is checked by what the site saw. Concurrent streams over both stay within
//! each account's limit; a 429 seen through one instance keeps the other off that account;
//! a conversation alternating between them continues one site conversation; an account both
//! need logs in once; and an instance SIGKILLed mid-stream hands its account (its lease and
//! its slot) to the other, which serves the next requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::{Data, PASSWORD, Proc, ask, demo_site, eventually, get_json, http, post_chat};
use computetower::demo::{Shape, reply_for, reply_for_turn};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// Short leases and a fast shared-state poll, so takeovers happen within the test.
const CLUSTER: [(&str, &str); 3] = [
    ("COMPUTETOWER_CLUSTER__LEASE_SECS", "3"),
    ("COMPUTETOWER_CLUSTER__LEASE_RENEW_SECS", "1"),
    ("COMPUTETOWER_CLUSTER__SHARED_POLL_MS", "200"),
];

/// Two instances on the database at `url`, with `limit` replies at once per account.
fn two_instances(url: &str, limit: &str) -> (Data, Proc, Data, Proc) {
    let mut env: Vec<(&str, &str)> = CLUSTER.to_vec();
    env.push(("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", limit));
    let (data_a, data_b) = (Data::on_postgres(url), Data::on_postgres(url));
    let a = data_a.serve(&env);
    let b = data_b.serve(&env);
    (data_a, a, data_b, b)
}

/// A streamed chat completion's text.
async fn streamed(server: &str, model: &str, prompt: &str) -> String {
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .json(&json!({"model": model, "stream": true,
                      "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{prompt}");
    let mut events = response.bytes_stream().eventsource();
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        assert!(chunk.get("error").is_none(), "{chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    text
}

async fn stats(site: &Proc) -> Value {
    get_json(format!("{}/__demo/stats", site.url)).await
}

async fn reset_stats(site: &Proc) {
    let response = http()
        .post(format!("{}/__demo/reset-stats", site.url))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

async fn control(site: &Proc, path: &str) {
    let response = http()
        .post(format!("{}{path}", site.url))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{path}");
}

/// Seconds of cooldown `server` has for the account of `email`, per its `/admin/overview`.
async fn cooling_on(server: &Proc, email: &str) -> Option<u64> {
    let overview = get_json(format!("{}/admin/overview", server.url)).await;
    overview["accounts"]
        .as_array()?
        .iter()
        .find(|a| a["account"]["email"] == email)?["load"]["cooling_down_secs"]
        .as_u64()
}

#[tokio::test]
async fn two_instances_share_limits_cooldowns_and_conversations() {
    let url = common::postgres::fresh_database().await;
    let site = demo_site("openai", &["--token-delay-ms", "5"]);
    let setup = Data::on_postgres(&url);
    let (ann, bob) = ("ann@example.com", "bob@example.com");
    let model = setup.add_demo_account(&site.url, "openai", ann).await;
    setup.add_demo_account(&site.url, "openai", bob).await;
    let (_data_a, a, _data_b, b) = two_instances(&url, "2");

    // 40 concurrent streams, half through each instance: every one is the site's reply, and
    // the site never has more than 2 of an account's replies running at once (each instance
    // alone allows 2, so without the store's slots it would see 4).
    let streams = (0..40).map(|i| {
        let server = if i % 2 == 0 { &a.url } else { &b.url };
        let model = model.clone();
        async move {
            let prompt = format!("stream number {i}");
            (streamed(server, &model, &prompt).await, prompt)
        }
    });
    for (text, prompt) in futures_util::future::join_all(streams).await {
        assert_eq!(text, reply_for(Shape::Openai, &prompt).content, "{prompt}");
    }
    let seen = stats(&site).await;
    assert_eq!(seen["completed"], 40, "{seen}");
    assert_eq!(seen["cancelled"], 0, "{seen}");
    assert_eq!(
        seen["max_active_by_email"],
        json!({ann: 2, bob: 2}),
        "{seen}"
    );

    // A 429 seen through instance A: the site holds ann, and A moves on to bob.
    control(&site, &format!("/__demo/rate-limit?email={ann}&seconds=60")).await;
    reset_stats(&site).await;
    for i in 0..10 {
        let prompt = format!("through A {i}");
        assert_eq!(
            streamed(&a.url, &model, &prompt).await,
            reply_for(Shape::Openai, &prompt).content
        );
        if stats(&site).await["rate_limited_by_email"][ann] == 1 {
            break;
        }
    }
    assert_eq!(stats(&site).await["rate_limited_by_email"], json!({ann: 1}));
    // B hears of it. Then the site lets ann through again: B, had it not heard, would use
    // ann (the least loaded and first); it keeps to bob, and the site sees no call of ann.
    eventually(WAIT, "instance B to hear of ann's cooldown", || async {
        cooling_on(&b, ann).await.filter(|s| *s > 0)
    })
    .await;
    control(&site, &format!("/__demo/rate-limit?email={ann}&seconds=0")).await;
    reset_stats(&site).await;
    for i in 0..4 {
        let prompt = format!("through B {i}");
        assert_eq!(
            streamed(&b.url, &model, &prompt).await,
            reply_for(Shape::Openai, &prompt).content
        );
    }
    let seen = stats(&site).await;
    assert_eq!(seen["completed"], 4, "{seen}");
    assert_eq!(seen["max_active_by_email"], json!({bob: 1}), "{seen}");
    assert_eq!(seen["rate_limited_by_email"], json!({}), "{seen}");

    // A conversation whose turns go to A, B, A continues one site conversation.
    let before = get_json(format!("{}/__demo/conversations", site.url)).await;
    let before = before.as_array().unwrap().len();
    let mut messages: Vec<Value> = Vec::new();
    for (turn, server) in [(1, &a), (2, &b), (3, &a)] {
        let asked = format!("turn {turn}, alternating instances");
        messages.push(json!({"role": "user", "content": asked}));
        let (status, body) = post_chat(
            &server.url,
            None,
            json!({"model": model, "messages": messages}).to_string(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let reply = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(reply, reply_for_turn(Shape::Openai, &asked, turn).content);
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    let conversations = get_json(format!("{}/__demo/conversations", site.url)).await;
    let conversations = conversations.as_array().unwrap();
    assert_eq!(conversations.len(), before + 1, "{conversations:?}");
    assert_eq!(conversations[before]["turns"], 3, "{conversations:?}");
}

/// A long reply through tier 2 (the account's page in the instance's Chromium), which holds
/// the account's lease while it streams.
async fn start_tier_2_stream(
    server: &str,
    model: &str,
) -> impl futures_util::Stream<Item = String> + use<> {
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .header("x-computetower-tier", "2")
        .json(&json!({"model": model, "stream": true,
                      "messages": [{"role": "user", "content": "a long answer please"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
        .bytes_stream()
        .map(|chunk| String::from_utf8_lossy(&chunk.unwrap_or_default()).into_owned())
}

#[tokio::test]
async fn an_account_logs_in_once_and_a_killed_instance_is_taken_over() {
    let url = common::postgres::fresh_database().await;
    let site = demo_site("openai", &["--token-delay-ms", "40"]);
    let setup = Data::on_postgres(&url);
    let carol = "carol@example.com";
    // An account with a password and no session: the first request must log it in.
    setup.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "demo-openai",
            "--email",
            carol,
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    let flow = common::repo().join("flows/demo-openai.json");
    setup.ok(&["flows", "import", flow.to_str().unwrap()], None);
    let model = "demo-openai";
    let (_data_a, mut a, _data_b, b) = two_instances(&url, "2");

    // Both instances need the account at once: one logs in, the other waits for its session.
    let (on_a, on_b) = tokio::join!(
        post_chat(&a.url, None, ask(model, "first on A")),
        post_chat(&b.url, None, ask(model, "first on B")),
    );
    for ((status, body), asked) in [(on_a, "first on A"), (on_b, "first on B")] {
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            reply_for(Shape::Openai, asked).content
        );
    }
    let seen = stats(&site).await;
    assert_eq!(seen["logins_by_email"], json!({carol: 1}), "{seen}");

    // A streams through its Chromium, holding the account's lease and a slot, and is
    // SIGKILLed mid-stream: the site sees the reply cut short.
    reset_stats(&site).await;
    let mut stream = Box::pin(start_tier_2_stream(&a.url, model).await);
    let mut seen_text = String::new();
    while !seen_text.contains("\"content\":\"") {
        seen_text.push_str(&stream.next().await.expect("the stream ended early"));
    }
    assert_eq!(stats(&site).await["active"], 1);
    // Both instances say A holds the account's lease now.
    let holder = get_json(format!("{}/admin/overview", a.url)).await["server"]["instance"].clone();
    let on_b = get_json(format!("{}/admin/overview", b.url)).await;
    assert_eq!(on_b["accounts"][0]["lease"]["instance"], holder, "{on_b}");
    assert_eq!(
        on_b["accounts"][0]["lease"]["this_instance"], false,
        "{on_b}"
    );
    a.kill();
    drop(stream);
    // The site answers once A's reply ended there.
    let seen = get_json(format!("{}/__demo/stats?wait_idle_ms=20000", site.url)).await;
    assert_eq!(
        (seen["cancelled"].as_u64(), seen["active"].as_u64()),
        (Some(1), Some(0)),
        "{seen}"
    );

    // B takes the account's browser work over once A's lease expires: tier 2 from its own
    // Chromium, with the stored session (no second login), then tier 1 as usual.
    let response = http()
        .post(format!("{}/v1/chat/completions", b.url))
        .header("x-computetower-tier", "2")
        .body(ask(model, "after the crash"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-computetower-tier"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reply_for(Shape::Openai, "after the crash").content
    );
    for i in 0..3 {
        let asked = format!("next on B {i}");
        let (status, body) = post_chat(&b.url, None, ask(model, &asked)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            reply_for(Shape::Openai, &asked).content
        );
    }
    let seen = stats(&site).await;
    assert_eq!(seen["completed"], 4, "{seen}");
    assert_eq!(
        seen["logins_by_email"],
        json!({}),
        "no second login: {seen}"
    );
    assert_eq!(seen["max_active_by_email"], json!({carol: 1}), "{seen}");
}
