//! Bad requests and failures get their documented status and an OpenAI error body; streams
//! that fail after tokens went out end with an error event and `[DONE]`; a client that goes
//! away cancels the call to the site.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, ask, demo_site, error_message, get_json, http, post_chat, sdk};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

#[tokio::test]
async fn malformed_requests_get_400_with_the_field_named() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "e@example.com")
        .await;
    let server = data.serve(&[]);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("malformed JSON", "{\"model\": \"x\", ".into(), None),
        ("not an object", "[1,2]".into(), None),
        ("missing messages", json!({"model": model}).to_string(), None),
        (
            "empty messages",
            json!({"model": model, "messages": []}).to_string(),
            Some("messages"),
        ),
        (
            "messages of wrong type",
            json!({"model": model, "messages": "hi"}).to_string(),
            Some("messages"),
        ),
        (
            "model of wrong type",
            json!({"model": 5, "messages": [{"role": "user", "content": "x"}]}).to_string(),
            Some("model"),
        ),
        (
            "unknown role",
            json!({"model": model, "messages": [{"role": "robot", "content": "x"}]}).to_string(),
            Some("messages[0].role"),
        ),
        (
            "stream of wrong type",
            json!({"model": model, "stream": "yes", "messages": [{"role": "user", "content": "x"}]})
                .to_string(),
            Some("stream"),
        ),
        (
            "image content",
            json!({"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
                .to_string(),
            Some("messages[0].content[0]"),
        ),
        (
            "null user content",
            json!({"model": model, "messages": [{"role": "user", "content": null}]}).to_string(),
            Some("messages[0].content"),
        ),
        (
            "empty user content",
            json!({"model": model, "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": ""}]})
                .to_string(),
            Some("messages[1].content"),
        ),
        (
            "empty text parts",
            json!({"model": model, "messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]})
                .to_string(),
            Some("messages[0].content"),
        ),
        (
            "no user message",
            json!({"model": model, "messages": [{"role": "system", "content": "x"}]}).to_string(),
            Some("messages"),
        ),
    ];
    for (what, body, param) in cases {
        let (status, json) = post_chat(&server.url, None, body).await;
        assert_eq!(status, 400, "{what}: {json}");
        error_message(&json);
        assert_eq!(json["error"]["type"], "invalid_request_error", "{what}");
        if let Some(param) = param {
            assert_eq!(json["error"]["param"], param, "{what}: {json}");
        }
    }
    // The server is still healthy and serving.
    let (status, json) = post_chat(&server.url, None, ask(&model, "hi")).await;
    assert_eq!(status, 200, "{json}");
    assert!(!server.stderr().contains("panicked"));
}

#[tokio::test]
async fn unknown_model_is_404_through_the_sdk() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    data.add_demo_account(&site.url, "openai", "e@example.com")
        .await;
    let server = data.serve(&[]);
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "model": "no-such-model", "prompt": "x", "mode": "error"
    }));
    assert_eq!(report["status"], 404, "{report}");
    assert_eq!(report["type"], "NotFoundError");
    assert_eq!(report["body"]["code"], "model_not_found");
    assert!(
        report["body"]["message"]
            .as_str()
            .unwrap()
            .contains("demo-openai")
    );
    let models: Value = http()
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "demo-openai");
}

#[tokio::test]
async fn oversize_body_is_413() {
    let data = Data::new();
    let server = data.serve(&[("COMPUTETOWER_MAX_BODY_BYTES", "2000")]);
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let (status, json) = post_chat(&server.url, None, big.to_string()).await;
    assert_eq!(status, 413, "{json}");
    error_message(&json);
    // Without a content-length (chunked), the limit still holds.
    let chunks =
        futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 500])));
    let (status, json) = post_chat(&server.url, None, reqwest::Body::wrap_stream(chunks)).await;
    assert_eq!(status, 413, "{json}");
}

#[tokio::test]
async fn api_keys_guard_v1_and_admin() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "e@example.com")
        .await;
    let user_key = data.ok(&["keys", "create"], None).trim().to_owned();
    let admin_key = data
        .ok(&["keys", "create", "--admin"], None)
        .trim()
        .to_owned();
    assert!(user_key.starts_with("ct-") && user_key != admin_key);
    let server = data.serve(&[]);
    let (status, json) = post_chat(&server.url, None, ask(&model, "hi")).await;
    assert_eq!(status, 401, "{json}");
    assert_eq!(json["error"]["code"], "invalid_api_key");
    let (status, _) = post_chat(&server.url, Some("ct-wrong"), ask(&model, "hi")).await;
    assert_eq!(status, 401);
    let report = sdk(json!({
        "base_url": format!("{}/v1", server.url), "api_key": "ct-wrong", "model": model, "prompt": "x", "mode": "error"
    }));
    assert_eq!(report["type"], "AuthenticationError", "{report}");
    let (status, json) = post_chat(&server.url, Some(&user_key), ask(&model, "hi")).await;
    assert_eq!(status, 200, "{json}");
    let admin = |key: &str| {
        http()
            .get(format!("{}/admin/accounts", server.url))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(admin(&user_key).await.unwrap().status(), 403);
    assert_eq!(admin(&admin_key).await.unwrap().status(), 200);
    // Health needs no key.
    let health = http()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn non_loopback_bind_without_keys_is_refused() {
    let data = Data::new();
    let out = data.cli(&["serve", "--bind", "0.0.0.0:0"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("keys create"), "{stderr}");
}

#[tokio::test]
async fn site_failures_map_to_429_502_and_503() {
    let site = demo_site("ndjson", &["--rate-limit", "1"]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "ndjson", "rl@example.com")
        .await;
    let server = data.serve(&[]);
    let (status, json) = post_chat(&server.url, None, ask(&model, "hi")).await;
    assert_eq!(status, 200, "{json}");
    // The site's 429 (one call a minute) passes through with Retry-After.
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .header("content-type", "application/json")
        .body(ask(&model, "hi"))
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
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["error"]["type"], "rate_limit_error");
    // The account cools down: the next request is refused at once, without calling the site.
    let (status, json) = post_chat(&server.url, None, ask(&model, "hi")).await;
    assert_eq!(status, 429, "{json}");
    assert!(error_message(&json).contains("cooling down"), "{json}");

    // The site expires every session of an account that has no password to log in again
    // with: its 401 marks the session rejected → 503 saying why.
    let site2 = demo_site("ndjson", &[]);
    let data2 = Data::new();
    let model2 = data2
        .add_demo_account_cookies_only(&site2.url, "ndjson", "x@example.com")
        .await;
    let server2 = data2.serve(&[]);
    http()
        .post(format!("{}/__demo/expire-sessions", site2.url))
        .send()
        .await
        .unwrap();
    let (status, json) = post_chat(&server2.url, None, ask(&model2, "hi")).await;
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"]["code"], "no_usable_account");
    let message = error_message(&json);
    assert!(message.contains("no email or password"), "{json}");

    // The site is down → 502 (on a fresh account: the rate-limited one is cooling down).
    let site3 = demo_site("ndjson", &[]);
    let data3 = Data::new();
    let model3 = data3
        .add_demo_account_cookies_only(&site3.url, "ndjson", "down@example.com")
        .await;
    let server3 = data3.serve(&[]);
    drop(site3);
    let (status, json) = post_chat(&server3.url, None, ask(&model3, "hi")).await;
    assert_eq!(status, 502, "{json}");
    assert_eq!(json["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn account_without_session_is_503() {
    let data = Data::new();
    data.ok(
        &[
            "account",
            "add",
            "--url",
            "http://127.0.0.1:9/",
            "--name",
            "nosession",
        ],
        None,
    );
    let flow = common::repo().join("flows/demo-openai.json");
    data.ok(
        &[
            "flows",
            "import",
            flow.to_str().unwrap(),
            "--service",
            "nosession",
        ],
        None,
    );
    let server = data.serve(&[]);
    let (status, json) = post_chat(&server.url, None, ask("nosession", "hi")).await;
    assert_eq!(status, 503, "{json}");
    // It has no session, so the browser tries to log in, and says why that failed.
    assert!(error_message(&json).contains("login to account"), "{json}");
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let data = Data::new();
    let server = data.serve(&[]);
    let response = http()
        .get(format!("{}/v1/nope", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    error_message(&response.json().await.unwrap());
    let response = http()
        .get(format!("{}/v1/chat/completions", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    error_message(&response.json().await.unwrap());
    // Bad query strings and paths under /admin get the same JSON error shape.
    for path in [
        "/admin/events?limit=many",
        "/admin/decisions?limit=-x",
        "/admin/flows?all=perhaps",
        "/admin/accounts/%FF%FE",
    ] {
        let response = http()
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{path}");
        let text = response.text().await.unwrap();
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path}: not a JSON error: {text}"));
        error_message(&body);
    }
}

/// Opens a streamed completion and returns its SSE events as they come.
async fn open_stream(
    server: &str,
    model: &str,
) -> impl futures_util::Stream<Item = Result<eventsource_stream::Event, String>> {
    let response = http()
        .post(format!("{server}/v1/chat/completions"))
        .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
        .bytes_stream()
        .eventsource()
        .map(|e| e.map_err(|e| e.to_string()))
}

#[tokio::test]
async fn a_stream_whose_site_fails_midway_ends_with_an_error_event_and_done() {
    let mut site = demo_site("openai", &["--token-delay-ms", "200"]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "m@example.com")
        .await;
    let server = data.serve(&[]);
    let mut events = Box::pin(open_stream(&server.url, &model).await);
    let mut saw_text = false;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        let chunk: Value = serde_json::from_str(&event.data).unwrap();
        if chunk["choices"][0]["delta"]["reasoning_content"].is_string() {
            saw_text = true;
            break;
        }
    }
    assert!(saw_text);
    site.kill();
    let mut rest = Vec::new();
    while let Some(event) = events.next().await {
        rest.push(event.unwrap().data);
    }
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    error_message(&error);
    assert_eq!(error["error"]["type"], "upstream_error");
}

/// A reply the site cuts off (the body ends with no end marker) is never reported as a
/// complete `stop`: a stream ends with an error event and `[DONE]`, a non-streamed request
/// gets a 502 saying the reply is incomplete.
#[tokio::test]
async fn a_reply_cut_off_without_its_end_marker_is_reported_as_incomplete() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "cut@example.com")
        .await;
    let server = data.serve(&[]);
    let truncate = |count: u32| {
        http()
            .post(format!("{}/__demo/truncate?count={count}", site.url))
            .send()
    };
    truncate(1).await.unwrap();
    let mut events = Box::pin(open_stream(&server.url, &model).await);
    let mut data_lines = Vec::new();
    while let Some(event) = events.next().await {
        data_lines.push(event.unwrap().data);
    }
    assert_eq!(
        data_lines.last().map(String::as_str),
        Some("[DONE]"),
        "{data_lines:?}"
    );
    let error: Value = serde_json::from_str(&data_lines[data_lines.len() - 2]).unwrap();
    assert!(error_message(&error).contains("incomplete"), "{error}");
    assert!(
        !data_lines
            .iter()
            .any(|d| d.contains("\"finish_reason\":\"stop\"")),
        "{data_lines:?}"
    );
    truncate(1).await.unwrap();
    let (status, body) = post_chat(&server.url, None, ask(&model, "hello")).await;
    assert_eq!(status, 502, "{body}");
    assert!(error_message(&body).contains("incomplete"), "{body}");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_site_call() {
    let site = demo_site("patch", &["--token-delay-ms", "100"]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "patch", "d@example.com")
        .await;
    let server = data.serve(&[]);
    let stats = || async {
        let v: Value = http()
            .get(format!("{}/__demo/stats", site.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
    };
    let mut events = Box::pin(open_stream(&server.url, &model).await);
    events.next().await.unwrap().unwrap();
    assert_eq!(stats().await["active"], 1);
    drop(events);
    // The site answers once its call ended, or after 10 s (and the checks fail).
    let ended = get_json(format!("{}/__demo/stats?wait_idle_ms=10000", site.url)).await;
    assert_eq!(ended["active"], 0, "{ended}");
    assert_eq!(ended["cancelled"], 1, "{ended}");
    assert_eq!(ended["completed"], 0, "{ended}");
}
