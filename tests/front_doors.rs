//! The three front doors (chat completions, Responses, Messages) around the real binary:
//! inline credentials refused in every form at every door before anything is forwarded, each
//! door's error shape, the model list, and CORS for browser front ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::{Data, demo_site, get_json, http};
use serde_json::{Value, json};

const SECRET: &str = "hunter2-very-secret";

/// POSTs `body` to `path`; returns status and JSON.
async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn inline_credentials_are_refused_in_every_form_at_every_door() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "doors@example.com")
        .await;
    let server = data.serve(&[("COMPUTETOWER_LOG", "trace")]);
    let line = format!(
        "URL: {} | Login: thief@example.com | Password: {SECRET}",
        site.url
    );
    let lines = [
        line.clone(),
        format!(
            "please use\nURL: {}\nEmail: a@b.c\nPassword: {SECRET}",
            site.url
        ),
        format!("Password： {SECRET} ｜ Email： a@b.c ｜ URL： {}", site.url),
    ];
    let mut requests = Vec::new();
    for line in &lines {
        requests.extend([
            (
                "/v1/chat/completions",
                json!({"model": model, "messages": [
                    {"role": "system", "content": [{"type": "text", "text": line}]},
                    {"role": "user", "content": "hi"}]}),
            ),
            (
                "/v1/chat/completions",
                json!({"model": model, "messages": [{"role": "user", "content": format!("hello\n{line}")}]}),
            ),
            (
                "/v1/responses",
                json!({"model": model, "instructions": line, "input": "hi"}),
            ),
            (
                "/v1/responses",
                json!({"model": model, "input": [{"role": "user", "content": [{"type": "input_text", "text": line}]}]}),
            ),
            (
                "/v1/messages",
                json!({"model": model, "max_tokens": 10, "system": [{"type": "text", "text": line}],
                    "messages": [{"role": "user", "content": "hi"}]}),
            ),
            (
                "/v1/messages",
                json!({"model": model, "max_tokens": 10,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": line}]}]}),
            ),
        ]);
    }
    for (path, body) in requests {
        let (status, reply) = post(&server.url, path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {reply}");
        if path == "/v1/messages" {
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");
        } else {
            assert_eq!(
                reply["error"]["code"], "inline_credentials_disabled",
                "{reply}"
            );
        }
        assert!(!reply.to_string().contains(SECRET), "{reply}");
    }
    // Nothing reached the site, and the password is nowhere in the server's log.
    let stats = get_json(format!("{}/__demo/stats", site.url)).await;
    assert_eq!(stats["completed"], 0, "{stats}");
    assert!(!server.stderr().contains(SECRET));
}

#[tokio::test]
async fn each_door_answers_bad_input_in_its_own_shape() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "shapes@example.com")
        .await;
    // An account with no flow yet cannot serve: it is not listed.
    data.ok(
        &[
            "account",
            "add",
            "--url",
            "http://127.0.0.1:9/",
            "--name",
            "noflow",
        ],
        None,
    );
    let server = data.serve(&[]);
    let cases = [
        (
            "/v1/responses",
            json!({"model": model, "input": []}),
            "input",
        ),
        (
            "/v1/responses",
            json!({"model": model, "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            "/v1/responses",
            json!({"model": model, "input": "x", "temperature": 9}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "nope"}},
                "tools": [{"type": "function", "function": {"name": "real"}}]}),
            "tool_choice",
        ),
    ];
    for (path, body, param) in cases {
        let (status, reply) = post(&server.url, path, body).await;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["param"], param, "{reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");
    }
    let anthropic = [
        json!({"model": model, "messages": [{"role": "user", "content": "x"}]}),
        json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "mystery"}]}]}),
        json!({"model": model, "max_tokens": 5, "messages": []}),
    ];
    for body in anthropic {
        let (status, reply) = post(&server.url, "/v1/messages", body).await;
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["error"]["type"], "invalid_request_error", "{reply}");
        assert!(reply["error"]["message"].is_string());
    }
    let (status, reply) = post(&server.url, "/v1/messages/nope", json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(reply["error"]["type"], "not_found_error", "{reply}");
    let models = get_json(format!("{}/v1/models", server.url)).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [model.as_str()], "{models}");
    assert_eq!(models["data"][0]["owned_by"], "127.0.0.1");
    let one = get_json(format!("{}/v1/models/{model}", server.url)).await;
    assert_eq!(one["id"], model.as_str());
    let missing = http()
        .get(format!("{}/v1/models/noflow", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

#[tokio::test]
async fn cors_answers_preflights_for_listed_origins_only() {
    let data = Data::new();
    let key = data.ok(&["keys", "create"], None).trim().to_owned();
    let server = data.serve(&[(
        "COMPUTETOWER_CORS_ORIGINS",
        "http://localhost:3000, https://chat.example.org",
    )]);
    let preflight = |origin: &'static str| {
        http()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", server.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type, x-stainless-os",
            )
            .send()
    };
    let allowed = preflight("http://localhost:3000").await.unwrap();
    assert_eq!(
        allowed.status().as_u16(),
        200,
        "no key is needed for a preflight"
    );
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let allow_headers = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allow_headers.contains("x-stainless-os"), "{allow_headers}");
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let other = preflight("http://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A real request from a listed origin carries the header; errors too (401 here).
    let unauthorized = http()
        .get(format!("{}/v1/models", server.url))
        .header("origin", "https://chat.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);
    assert_eq!(
        unauthorized.headers()["access-control-allow-origin"],
        "https://chat.example.org"
    );
    let listed = http()
        .get(format!("{}/v1/models", server.url))
        .header("origin", "https://chat.example.org")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status().as_u16(), 200);
    assert!(
        listed
            .headers()
            .get("access-control-allow-origin")
            .is_some()
    );
}

#[tokio::test]
async fn any_origin_is_refused_off_loopback() {
    let data = Data::new();
    data.ok(&["keys", "create"], None);
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--bind", "0.0.0.0:0"])
        .env("COMPUTETOWER_DATA", data.path())
        .env("COMPUTETOWER_MASTER_KEY", common::MASTER_KEY)
        .env("COMPUTETOWER_CORS_ORIGINS", "*")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("api.cors_origins") && stderr.contains("loopback"),
        "{stderr}"
    );
}
