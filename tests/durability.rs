//! What is stored survives a crash, opens only with its key, and never holds a secret in
//! plaintext — in the database files or in the logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, MASTER_KEY, demo_site, http, post_chat};
use computetower::demo::{Shape, reply_for};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn admin_list(server: &str, what: &str) -> Vec<Value> {
    let body: Value = http()
        .get(format!("{server}/admin/{what}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["data"].as_array().unwrap().clone()
}

fn data_files_contain(data: &Data, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn sigkill_mid_stream_loses_nothing_and_the_store_stays_sealed() {
    let site = demo_site("openai", &["--token-delay-ms", "50"]);
    let data = Data::new();
    let (model, secrets) = data
        .add_demo_account_with_secrets(&site.url, "openai", "crash@example.com")
        .await;
    let mut server = data.serve(&[]);
    let before_accounts = admin_list(&server.url, "accounts").await;
    let before_flows = admin_list(&server.url, "flows").await;

    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "crash test"}]}))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream().eventsource();
    events.next().await.unwrap().unwrap();
    server.kill();

    // Restarted with the same key: everything is there and it serves again.
    let server = data.serve(&[]);
    assert_eq!(admin_list(&server.url, "accounts").await, before_accounts);
    assert_eq!(admin_list(&server.url, "flows").await, before_flows);
    let sessions = admin_list(&server.url, "sessions").await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["authenticated"], true);
    let (status, body) = post_chat(
        &server.url,
        None,
        json!({"model": model, "messages": [{"role": "user", "content": "after"}]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        reply_for(Shape::Openai, "after").content
    );
    drop(server);

    // No password, cookie value or token in any file of the data dir (WAL included).
    for secret in &secrets {
        assert!(secret.len() >= 8, "secret too short to grep reliably");
        let hits = data_files_contain(&data, secret);
        assert!(
            hits.is_empty(),
            "a secret is stored in plaintext in {hits:?}"
        );
    }
    assert!(data_files_contain(&data, MASTER_KEY).is_empty());
}

#[tokio::test]
async fn a_wrong_master_key_is_refused_clearly_and_loses_nothing() {
    let site = demo_site("json", &[]);
    let data = Data::new();
    data.add_demo_account(&site.url, "json", "key@example.com")
        .await;
    let wrong = "02".repeat(32);
    let out = std::process::Command::new(common::BIN)
        .args(["account", "list"])
        .env("COMPUTETOWER_DATA", data.path())
        .env("COMPUTETOWER_MASTER_KEY", &wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("master key does not open"), "{stderr}");
    assert!(!stderr.contains("panicked"));
    let listed = data.ok(&["account", "list"], None);
    assert!(
        listed.contains("demo-json") && listed.contains("key@example.com"),
        "{listed}"
    );
}

#[tokio::test]
async fn trace_logs_hold_no_secret() {
    let site = demo_site("patch", &[]);
    let data = Data::new();
    let (model, secrets) = data
        .add_demo_account_with_secrets(&site.url, "patch", "logs@example.com")
        .await;
    let key = data
        .ok(&["keys", "create", "--admin"], None)
        .trim()
        .to_owned();
    let server = data.serve(&[("RUST_LOG", "trace")]);
    for stream in [false, true] {
        let response = http()
            .post(format!("{}/v1/chat/completions", server.url))
            .bearer_auth(&key)
            .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "log me"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let accounts = http()
        .get(format!("{}/admin/sessions", server.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let log = server.stderr();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging is off"
    );
    for secret in secrets.iter().chain([&key]) {
        assert!(
            !log.contains(secret.as_str()),
            "a secret appears in the trace log"
        );
        assert!(
            !accounts.contains(secret.as_str()),
            "a secret appears in /admin/sessions"
        );
    }
}

/// A reply the client saw end is in the store even when `serve` is SIGKILLed right after:
/// its record is written before its last bytes go out (records used to wait in a 50 ms
/// batch and die with the process).
#[tokio::test]
async fn a_completed_request_survives_a_sigkill_right_after_it() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "kill9@example.com")
        .await;
    let mut server = data.serve(&[]);
    let (status, body) = post_chat(
        &server.url,
        None,
        json!({"model": model, "messages": [{"role": "user", "content": "keep me"}]}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let response = http()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "me too"}]}))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let stream_id = text
        .split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    server.kill();
    let server = data.serve(&[]);
    let events = admin_list(&server.url, "events").await;
    for id in [id, stream_id] {
        let event = events
            .iter()
            .find(|e| e["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("the event of {id} was lost: {events:?}"));
        assert_eq!(event["outcome"], "ok");
    }
}
