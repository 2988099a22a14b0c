//! The first hour of a new user, trap by trap; each test fails without its fix:
//! - errors name only models that can serve, and say how to add one when there is none;
//! - `learn NAME` for an unknown account lists the accounts there are;
//! - `account add` on an IP address or localhost asks for `--name`;
//! - `serve` says what it serves (data dir, each model's flow and session), or that it has
//!   nothing yet;
//! - a `learn` whose output pipe is closed still stores its flow;
//! - requests queueing on one account are logged once, with what to do, and shown on /admin;
//! - a parameter accepted and ignored is logged once;
//! - `doctor` says what to fix;
//! - a captcha during a CLI login is solved on a handoff page the CLI serves itself, or on
//!   the running server's that the CLI hands the login to.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    Data, PASSWORD, ask, demo_site, error_message, eventually, get_json, http, post_chat,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// An account `name` on `site` with a login, and (with `flow`) the hand-written openai flow.
fn account(data: &Data, site: &str, name: &str, flow: bool) -> String {
    let out = data.ok(
        &[
            "account",
            "add",
            "--url",
            site,
            "--name",
            name,
            "--email",
            &format!("{name}@example.com"),
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    if flow {
        let file = common::repo().join("flows/demo-openai.json");
        data.ok(
            &["flows", "import", file.to_str().unwrap(), "--service", name],
            None,
        );
    }
    out.split_whitespace()
        .find(|w| w.starts_with("a_"))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn errors_name_only_models_that_can_serve_or_say_how_to_add_one() {
    let data = Data::new();
    let server = data.serve(&[]);
    let (status, body) = post_chat(&server.url, None, ask("nope", "hi")).await;
    assert_eq!(status, 404);
    let message = error_message(&body);
    assert!(
        message.contains("No model can serve yet") && message.contains("computetower account add"),
        "{message}"
    );
    drop(server);

    account(&data, "http://127.0.0.1:9/", "noflow", false);
    account(&data, "http://127.0.0.1:9/", "served", true);
    let server = data.serve(&[]);
    let models = get_json(format!("{}/v1/models", server.url)).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["served"]);
    let (status, body) = post_chat(&server.url, None, ask("nope", "hi")).await;
    assert_eq!(status, 404);
    let message = error_message(&body);
    assert!(message.contains("Available models: served."), "{message}");
    assert!(!message.contains("noflow"), "{message}");
    let model = http()
        .get(format!("{}/v1/models/nope", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), 404);
    let message = error_message(&model.json().await.unwrap());
    assert!(message.contains("Available models: served."), "{message}");
}

#[test]
fn learn_for_an_unknown_account_lists_the_accounts_there_are() {
    let data = Data::new();
    let out = data.cli(&["learn", "nope"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no account yet") && stderr.contains("computetower account add"),
        "{stderr}"
    );
    let first = account(&data, "http://127.0.0.1:9/", "alpha", false);
    let second = account(&data, "http://127.0.0.1:9/", "beta", false);
    for command in ["learn", "login"] {
        let out = data.cli(&[command, "nope"], None);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        for known in [&first, &second, "`alpha`", "`beta`"] {
            assert!(
                stderr.contains(known),
                "`{command}` does not name {known}: {stderr}"
            );
        }
    }
}

#[test]
fn account_add_on_an_ip_address_or_localhost_asks_for_a_name() {
    let data = Data::new();
    for url in [
        "http://127.0.0.1:18431/",
        "http://localhost:3000/",
        "http://[::1]:8080/",
    ] {
        let out = data.cli(&["account", "add", "--url", url], None);
        assert!(!out.status.success(), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--name"), "{stderr}");
        assert!(!stderr.contains("127-0-0-1"), "{stderr}");
    }
    let listed = data.ok(&["account", "list", "--json"], None);
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap(), json!([]));
    // A host name still gives the model its name.
    let out = data.ok(
        &["account", "add", "--url", "https://chat.example.com/"],
        None,
    );
    assert!(out.contains("model `example`"), "{out}");
    let out = http_add_without_name(&data);
    assert!(out.contains("name"), "{out}");
}

/// The admin API refuses the same, naming the field.
fn http_add_without_name(data: &Data) -> String {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = data.serve(&[]);
        let response = http()
            .post(format!("{}/admin/accounts", server.url))
            .json(&json!({"url": "http://10.0.0.1:8080/"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["param"], "name");
        error_message(&body)
    })
}

/// Starts `serve` on port 0 and returns it with every stdout line it printed up to (and
/// including) its `listening` line.
fn serve_printing(data: &Data) -> (Child, Vec<String>) {
    let mut child = data
        .command()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(WAIT) {
        let done = line.contains("listening on");
        lines.push(line);
        if done {
            return (child, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not announce itself: {lines:?}");
}

#[test]
fn serve_says_what_it_serves_or_that_it_has_nothing_yet() {
    let data = Data::new();
    let (mut child, lines) = serve_printing(&data);
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    let dir = std::fs::canonicalize(data.path()).unwrap();
    assert!(
        text.contains(&format!("data dir {} (new)", dir.display())),
        "{text}"
    );
    assert!(text.contains("no account in this data dir yet"), "{text}");
    assert!(text.contains("computetower account add"), "{text}");
    assert!(text.contains("/admin"), "{text}");

    account(&data, "http://127.0.0.1:9/", "noflow", false);
    account(&data, "http://127.0.0.1:9/", "served", true);
    let (mut child, lines) = serve_printing(&data);
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(!text.contains("(new)"), "{text}");
    let served = lines.iter().find(|l| l.contains("served")).expect(&text);
    assert!(
        served.contains("flow v1") && served.contains("no session yet"),
        "{served}"
    );
    let noflow = lines.iter().find(|l| l.contains("noflow")).expect(&text);
    assert!(
        noflow.contains("NO FLOW") && noflow.contains("computetower learn noflow"),
        "{noflow}"
    );
}

#[test]
fn a_learn_whose_output_is_closed_still_stores_its_flow() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    account(&data, &site.url, "closed", false);
    let mut child = data
        .command()
        .args(["learn", "closed"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads: every write to stdout or stderr fails with a broken pipe.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    let flows: Value = serde_json::from_str(&data.ok(&["flows", "list", "--json"], None)).unwrap();
    let services: Vec<&str> = flows
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["service"].as_str().unwrap())
        .collect();
    assert_eq!(
        services,
        ["closed"],
        "the learned flow is stored ({status})"
    );
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn requests_waiting_for_a_slot_are_logged_once_with_what_to_do_and_shown_on_admin() {
    let site = demo_site("openai", &["--token-delay-ms", "40"]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "one@example.com")
        .await;
    let server = data.serve(&[("COMPUTETOWER_PER_ACCOUNT_CONCURRENCY", "1")]);
    for _ in 0..2 {
        let requests =
            (0..3).map(|i| post_chat(&server.url, None, ask(&model, &format!("queue {i}"))));
        for (status, body) in futures_util::future::join_all(requests).await {
            assert_eq!(status, 200, "{body}");
        }
    }
    let overview = get_json(format!("{}/admin/overview", server.url)).await;
    let load = &overview["accounts"][0]["load"];
    assert!(load["queued_total"].as_u64().unwrap() >= 2, "{overview}");
    let notice = overview["accounts"][0]["notice"]
        .as_str()
        .unwrap_or_default();
    assert!(
        notice.contains("waiting for a free slot") && notice.contains("per_account_concurrency"),
        "{overview}"
    );
    assert!(
        overview["notices"]
            .to_string()
            .contains("computetower account add")
    );
    let log = server.stderr();
    assert_eq!(
        log.matches("requests are waiting for a free slot").count(),
        1,
        "logged once: {log}"
    );
}

#[tokio::test]
async fn a_parameter_accepted_and_ignored_is_logged_once() {
    let site = demo_site("openai", &[]);
    let data = Data::new();
    let model = data
        .add_demo_account(&site.url, "openai", "p@example.com")
        .await;
    let server = data.serve(&[]);
    let body = json!({
        "model": model, "temperature": 0.3, "seed": 7, "x_client_field": {"a": 1},
        "messages": [{"role": "user", "content": "hi", "x_ui_id": "m1"}],
    });
    for _ in 0..3 {
        let (status, reply) = post_chat(&server.url, None, body.to_string()).await;
        assert_eq!(status, 200, "{reply}");
    }
    let log = eventually(WAIT, "the log lines", || async {
        let log = server.stderr();
        log.contains("x_client_field").then_some(log)
    })
    .await;
    for field in [
        "temperature",
        "seed",
        "x_client_field",
        "messages[].x_ui_id",
    ] {
        let line = format!("parameter `{field}` is accepted and ignored");
        assert_eq!(log.matches(&line).count(), 1, "{field}: {log}");
    }
    assert!(!log.contains("parameter `model`"), "{log}");
}

#[test]
fn doctor_says_what_to_fix() {
    let data = Data::new();
    let out = data
        .command()
        .arg("doctor")
        .env("COMPUTETOWER_CHROME", "/nonexistent/chromium")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("no Chromium at /nonexistent/chromium"),
        "{stdout}"
    );
    assert!(stdout.contains("apt-get install chromium"), "{stdout}");
    assert!(stdout.contains("holds no database yet"), "{stdout}");
    assert!(stdout.contains("computetower account add"), "{stdout}");
    assert!(
        !data.path().join("computetower.db").exists(),
        "doctor creates nothing"
    );

    let fine = account(&data, "http://127.0.0.1:9/", "served", true);
    let cookies_only = {
        let file = data.path().join("cookies.txt");
        std::fs::write(
            &file,
            "# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsid\tx\n",
        )
        .unwrap();
        let out = data.ok(
            &[
                "account",
                "add",
                "--url",
                "http://127.0.0.1:9/",
                "--name",
                "stale",
                "--cookies",
                file.to_str().unwrap(),
            ],
            None,
        );
        out.split_whitespace()
            .find(|w| w.starts_with("a_"))
            .unwrap()
            .to_owned()
    };
    let out = data.cli(&["doctor"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("starts headless"), "{stdout}");
    assert!(stdout.contains("opens with its master key"), "{stdout}");
    let line_of = |id: &str| {
        stdout
            .lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(line_of(&fine).contains("flow v1"), "{stdout}");
    assert!(
        line_of(&fine).contains("logs in with its password"),
        "{stdout}"
    );
    let stale = line_of(&cookies_only);
    assert!(stale.contains("no flow"), "{stdout}");
    assert!(
        stdout.contains(&format!("computetower learn {cookies_only}")),
        "{stdout}"
    );
    assert!(
        !out.status.success(),
        "a model without a flow is something to fix"
    );
}

/// Starts a CLI command and hands back its stderr lines as they come.
fn spawn_cli(data: &Data, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = data
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Waits for the stderr line that links the handoff page; returns the page's URL.
fn handoff_url(lines: &mpsc::Receiver<String>) -> String {
    let mut seen = Vec::new();
    loop {
        let line = lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no handoff link in {seen:#?}"));
        if let Some(at) = line.find("solve it at ") {
            let url = line[at + "solve it at ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            return url;
        }
        seen.push(line);
    }
}

/// Plays the person: reads where the target is and clicks it through the handoff page's API.
async fn solve(site: &str, page: &str) {
    let (base, fragment) = page.split_once('#').unwrap_or((page, ""));
    let key = fragment.strip_prefix("key=");
    let with_key = |r: reqwest::RequestBuilder| match key {
        Some(key) => r.bearer_auth(key),
        None => r,
    };
    let live: Value = with_key(http().get(base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(live["state"], "waiting_for_human", "{live}");
    let target = get_json(format!("{site}/__demo/captcha")).await;
    let click = with_key(http().post(format!("{base}/click")))
        .json(&json!({"x": target["x"], "y": target["y"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(click.status(), 204);
}

#[tokio::test]
async fn a_captcha_in_a_cli_login_is_solved_on_the_page_the_cli_serves() {
    let site = demo_site("openai", &["--login", "captcha"]);
    let data = Data::new();
    account(&data, &site.url, "guarded", true);
    // With an API key in the store, the CLI's page must be opened with its own token.
    data.ok(&["keys", "create", "--admin"], None);
    let (child, lines) = spawn_cli(&data, &["login", "guarded"]);
    let page = handoff_url(&lines);
    assert!(page.starts_with("http://127.0.0.1:"), "{page}");
    assert!(
        page.contains("/admin/sessions/") && page.contains("#key="),
        "{page}"
    );
    let html = http()
        .get(page.split('#').next().unwrap())
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(html.status(), 200);
    assert!(html.text().await.unwrap().contains("handoff.js"));
    solve(&site.url, &page).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("logged in in"), "{stdout}");
    let listed = data.ok(&["account", "list"], None);
    assert!(listed.contains("login"), "the session is stored: {listed}");
}

#[tokio::test]
async fn a_cli_login_is_handed_to_the_server_running_on_the_same_data() {
    let site = demo_site("openai", &["--login", "captcha"]);
    let data = Data::new();
    let id = account(&data, &site.url, "guarded", true);
    let server = data.serve(&[]);
    let (child, lines) = spawn_cli(&data, &["login", "guarded"]);
    let first = lines.recv_timeout(WAIT).unwrap();
    assert!(
        first.contains("a server runs on this data") && first.contains(&server.url),
        "{first}"
    );
    let page = handoff_url(&lines);
    assert!(
        page.starts_with(&format!("{}/admin/sessions/", server.url)),
        "{page}"
    );
    // The login runs in the server: its live session is the server's.
    let sessions = get_json(format!("{}/admin/sessions", server.url)).await;
    assert_eq!(sessions["live"][0]["account_id"], id.as_str(), "{sessions}");
    solve(&site.url, &page).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("logged in in"));
    let (status, reply) = post_chat(&server.url, None, ask("guarded", "after the handoff")).await;
    assert_eq!(status, 200, "{reply}");
}
