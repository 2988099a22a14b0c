//! Browser login with Debian's Chromium against the demo site: every login pattern from URL,
//! email and password alone; the captcha handoff played by the test; a wrong password; a
//! session the site expires in the middle of use; no secret in trace logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::{
    Data, MASTER_KEY, PASSWORD, ask, demo_site, error_message, eventually, http, post_chat,
};
use computetower::demo::{Shape, reply_for};
use serde_json::{Value, json};

const LOGIN_WAIT: Duration = Duration::from_secs(90);

/// Adds an account from URL + email + password only, with the shape's hand-written flow.
fn add_account(data: &Data, site: &str, shape: &str, name: &str, email: Option<&str>) -> String {
    let mut args = vec!["account", "add", "--url", site, "--name", name];
    if let Some(email) = email {
        args.extend(["--email", email, "--password-stdin"]);
    }
    let out = data.ok(&args, email.map(|_| format!("{PASSWORD}\n")).as_deref());
    let id = out
        .split_whitespace()
        .find(|w| w.starts_with("a_"))
        .unwrap()
        .to_owned();
    let flow = common::repo().join(format!("flows/demo-{shape}.json"));
    data.ok(
        &["flows", "import", flow.to_str().unwrap(), "--service", name],
        None,
    );
    id
}

async fn admin_login(server: &str, account: &str) -> (u16, Value) {
    let response = http()
        .post(format!("{server}/admin/accounts/{account}/login"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn every_login_pattern_from_url_and_credentials_then_tier_1() {
    let patterns = [
        ("direct", "ndjson"),
        ("landing", "openai"),
        ("two-step", "patch"),
        ("open", "json"),
    ];
    let sites: Vec<_> = patterns
        .iter()
        .map(|(login, shape)| demo_site(shape, &["--login", login]))
        .collect();
    let data = Data::new();
    let mut accounts = Vec::new();
    for ((login, shape), site) in patterns.iter().zip(&sites) {
        let email = (*login != "open").then_some("who@example.com");
        let name = format!("site-{login}");
        accounts.push((
            add_account(&data, &site.url, shape, &name, email),
            name,
            *shape,
        ));
    }
    let server = data.serve(&[]);
    for (account, name, shape) in &accounts {
        let (status, body) = admin_login(&server.url, account).await;
        assert_eq!(status, 200, "{name}: {body}");
        let pages: Vec<&str> = body["login"]["pages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(pages.last(), Some(&"chat_interface"), "{name}: {body}");
        let cookies = body["session"]["cookies"].to_string();
        assert!(cookies.contains("demo_sid"), "{name}: {body}");
        let (status, reply) = post_chat(&server.url, None, ask(name, "after login")).await;
        assert_eq!(status, 200, "{name}: {reply}");
        let shape: Shape = shape.parse().unwrap();
        assert_eq!(
            reply["choices"][0]["message"]["content"],
            reply_for(shape, "after login").content,
            "{name}"
        );
    }
}

#[tokio::test]
async fn captcha_is_solved_through_the_admin_handoff() {
    let site = demo_site("openai", &["--login", "captcha"]);
    let data = Data::new();
    let account = add_account(&data, &site.url, "openai", "guarded", Some("h@example.com"));
    let server = data.serve(&[]);
    let login = tokio::spawn({
        let url = server.url.clone();
        let account = account.clone();
        async move { admin_login(&url, &account).await }
    });
    // The login waits for a person: it shows up as a live session.
    let live = eventually(LOGIN_WAIT, "a live session waiting for a human", || async {
        let list: Value = http()
            .get(format!("{}/admin/sessions", server.url))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        list["live"]
            .as_array()?
            .iter()
            .find(|s| s["state"] == "waiting_for_human")
            .cloned()
    })
    .await;
    let id = live["id"].as_str().unwrap();
    assert_eq!(live["account_id"], account.as_str());
    // The human looks at the screenshot …
    let shot = http()
        .get(format!("{}/admin/sessions/{id}/screenshot", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(shot.headers()["content-type"], "image/png");
    assert!(shot.bytes().await.unwrap().starts_with(b"\x89PNG"));
    // … sees the target (the demo site tells the test where it drew it) and clicks it.
    let target: Value = http()
        .get(format!("{}/__demo/captcha", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let click = http()
        .post(format!("{}/admin/sessions/{id}/click", server.url))
        .json(&json!({"x": target["x"], "y": target["y"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(click.status(), 204);
    let (status, body) = login.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, reply) = post_chat(&server.url, None, ask("guarded", "solved")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        reply_for(Shape::Openai, "solved").content
    );
}

#[tokio::test]
async fn captcha_with_nobody_there_fails_after_the_timeout() {
    let site = demo_site("openai", &["--login", "captcha"]);
    let data = Data::new();
    add_account(&data, &site.url, "openai", "guarded", Some("n@example.com"));
    let out = {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(["login", "guarded"])
            .env("COMPUTETOWER_DATA", data.path())
            .env("COMPUTETOWER_MASTER_KEY", MASTER_KEY)
            .env("COMPUTETOWER_CAPTCHA_HUMAN_TIMEOUT_SECS", "2");
        cmd.output().unwrap()
    };
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("captcha") && stderr.contains("2 s"),
        "{stderr}"
    );
    let listed = data.ok(&["account", "list"], None);
    assert!(
        listed.contains("none"),
        "no session may be stored: {listed}"
    );
}

#[tokio::test]
async fn wrong_password_gives_the_sites_message_and_stores_nothing() {
    let site = demo_site("json", &[]);
    let data = Data::new();
    let out = data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "wrong",
            "--email",
            "w@example.com",
            "--password-stdin",
        ],
        Some("not-the-password\n"),
    );
    assert!(out.contains("added account"));
    let out = data.cli(&["login", "wrong"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Incorrect email or password."), "{stderr}");
    assert!(stderr.contains("screenshot"), "{stderr}");
    assert!(!stderr.contains("not-the-password"));
    let shots = std::fs::read_dir(data.path().join("screenshots"))
        .unwrap()
        .count();
    assert!(shots >= 1);
    let listed = data.ok(&["account", "list", "--json"], None);
    assert!(!listed.contains("not-the-password"));
    let sessions = data.ok(&["account", "list"], None);
    assert!(sessions.contains("none"), "{sessions}");
}

#[tokio::test]
async fn an_expired_session_is_renewed_inside_the_request_and_logs_hold_no_secret() {
    let site = demo_site("cumulative", &[]);
    let data = Data::new();
    add_account(
        &data,
        &site.url,
        "cumulative",
        "renewing",
        Some("r@example.com"),
    );
    let server = data.serve(&[("RUST_LOG", "trace")]);
    // No session yet: the first request logs in with the browser, then answers.
    let (status, reply) = post_chat(&server.url, None, ask("renewing", "first")).await;
    assert_eq!(status, 200, "{reply}");
    // The site expires every session; the next request sees the 401, logs in again, answers.
    let expired = http()
        .post(format!("{}/__demo/expire-sessions", site.url))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 200);
    let (status, reply) = post_chat(&server.url, None, ask("renewing", "second")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        reply_for(Shape::Cumulative, "second").content
    );
    let sessions: Value = http()
        .get(format!("{}/admin/sessions", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored = sessions["data"].as_array().unwrap();
    assert_eq!(stored.len(), 2, "{sessions}");
    assert_eq!(
        stored[0]["authenticated"], false,
        "the expired one is marked"
    );
    assert_eq!(stored[1]["authenticated"], true);

    // The secrets: the password, and the harvested cookie values and token (read back from the
    // store with the master key, as the server would).
    let store = computetower::store::Store::open(
        &data.path().join("computetower.db"),
        computetower::vault::Vault::from_text(MASTER_KEY).unwrap(),
    )
    .await
    .unwrap();
    let account = store.account("renewing").await.unwrap();
    let session = store.latest_session(&account.id).await.unwrap().unwrap();
    let mut secrets = vec![PASSWORD.to_owned()];
    secrets.extend(session.data.cookies.iter().map(|c| c.value.clone()));
    secrets.extend(session.data.local_storage.values().cloned());
    let log = server.stderr();
    assert!(log.contains("TRACE"), "trace logging is off");
    assert!(log.contains("logging in with the browser"));
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !log.contains(secret.as_str()),
            "a secret appears in the trace log"
        );
    }
}

#[tokio::test]
async fn inline_credentials_are_refused_unless_enabled() {
    let data = Data::new();
    let server = data.serve(&[]);
    let body = json!({"model": "x", "messages": [
        {"role": "system", "content": "URL: http://127.0.0.1:9/ | Email: a@b.c | Password: hunter22"},
        {"role": "user", "content": "hi"}
    ]});
    let (status, reply) = post_chat(&server.url, None, body.to_string()).await;
    assert_eq!(status, 400, "{reply}");
    assert!(!error_message(&reply).contains("hunter22"));
    assert_eq!(reply["error"]["code"], "inline_credentials_disabled");
}

#[tokio::test]
async fn inline_credentials_add_the_account_and_log_in() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let server = data.serve(&[("COMPUTETOWER_ALLOW_INLINE_CREDENTIALS", "true")]);
    let host = url::Url::parse(&site.url).unwrap();
    let service = computetower::store::accounts::service_name_for(&host);
    let flow = common::repo().join("flows/demo-openai.json");
    data.ok(
        &[
            "flows",
            "import",
            flow.to_str().unwrap(),
            "--service",
            &service,
        ],
        None,
    );
    let body = json!({"model": "anything", "messages": [
        {"role": "system", "content": format!("URL: {} | Email: inline@example.com | Password: {PASSWORD}", site.url)},
        {"role": "user", "content": "inline"}
    ]});
    let (status, reply) = post_chat(&server.url, None, body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        reply_for(Shape::Openai, "inline").content
    );
    let listed = data.ok(&["account", "list"], None);
    assert!(listed.contains("inline@example.com"), "{listed}");
    assert!(!server.stderr().contains(PASSWORD));
}

/// Processes whose parent is `parent` and whose command line names Chromium.
fn chromium_children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid …`: the comm may hold spaces, so split after its `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("chromium") {
            found.push(pid);
        }
    }
    found
}

/// Running (a zombie nobody reaps has exited).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

#[tokio::test]
async fn chromium_exits_when_the_server_is_killed() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let account = add_account(&data, &site.url, "openai", "guarded", Some("g@example.com"));
    let mut server = data.serve(&[]);
    let (status, body) = admin_login(&server.url, &account).await;
    assert_eq!(status, 200, "{body}");
    let browsers = chromium_children(server.child.id());
    assert!(
        !browsers.is_empty(),
        "the login ran in a Chromium started by serve"
    );
    // SIGKILL: the server gets no chance to close the browser itself.
    server.kill();
    eventually(LOGIN_WAIT, "Chromium to exit with the server", || async {
        browsers.iter().all(|pid| !alive(*pid)).then_some(())
    })
    .await;
}
