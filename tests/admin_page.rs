//! The admin web page, driven in Debian's Chromium through chromiumoxide as a person would:
//! the admin key typed once, an account added from a cookie file picked from disk, a learn
//! whose progress lines arrive while it runs, a request that shows up in live traffic (pushed
//! by the stream, not polled), a flow's diff against an earlier version, and the captcha
//! handoff page reached from the Sessions view, which says the login is done once solved.
//! No secret may be anywhere in the page's HTML, its API responses or its event stream.
//! Screenshots of each view go to `target/admin-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chromiumoxide::cdp::browser_protocol::dom::SetFileInputFilesParams;
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig, Page};
use common::{Data, PASSWORD, ask, demo_site, eventually, http, post_chat, repo};
use futures_util::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// A Chromium of the test's own (fresh profile), its CDP handler drained for its whole life.
struct Chrome {
    browser: Browser,
    drain: tokio::task::JoinHandle<()>,
    _profile: tempfile::TempDir,
}

impl Chrome {
    async fn launch() -> Chrome {
        let profile = tempfile::tempdir().unwrap();
        let chrome = std::env::var("COMPUTETOWER_CHROME").unwrap_or("/usr/bin/chromium".into());
        let config = BrowserConfig::builder()
            .chrome_executable(chrome)
            .user_data_dir(profile.path())
            .no_sandbox()
            .args([
                "disable-gpu",
                "disable-quic",
                "no-first-run",
                "disable-background-networking",
                "disable-component-update",
                "disable-sync",
                "disable-dev-shm-usage",
            ])
            .window_size(1400, 1000)
            .viewport(Viewport {
                width: 1400,
                height: 1000,
                ..Viewport::default()
            })
            .request_timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let (browser, mut handler) = Browser::launch(config).await.unwrap();
        // An `Err` item must not end the loop: the handler stream is the browser's lifeline.
        let drain = tokio::spawn(async move { while handler.next().await.is_some() {} });
        Chrome {
            browser,
            drain,
            _profile: profile,
        }
    }

    async fn page(&self, url: &str) -> Page {
        self.browser.new_page(url).await.unwrap()
    }

    async fn close(mut self) {
        let _ = self.browser.close().await;
        let _ = self.browser.wait().await;
        self.drain.abort();
    }
}

/// Evaluates `js` and returns its value as JSON.
async fn eval(page: &Page, js: &str) -> Value {
    page.evaluate(js)
        .await
        .unwrap_or_else(|e| panic!("evaluating {js}: {e}"))
        .into_value::<Value>()
        .unwrap_or(Value::Null)
}

/// Waits until `js` evaluates to something other than null/false; returns it.
async fn wait_for(page: &Page, what: &str, js: &str) -> Value {
    eventually(WAIT, what, || async {
        let value = page.evaluate(js).await.ok()?.into_value::<Value>().ok()?;
        (!value.is_null() && value != Value::Bool(false)).then_some(value)
    })
    .await
}

async fn html(page: &Page) -> String {
    eval(page, "document.documentElement.outerHTML")
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

fn screenshots() -> PathBuf {
    let dir = repo().join("target/admin-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(page: &Page, name: &str) {
    let png = page
        .screenshot(
            ScreenshotParams::builder()
                .format(CaptureScreenshotFormat::Png)
                .full_page(true)
                .build(),
        )
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

async fn pick_file(page: &Page, selector: &str, path: &std::path::Path) {
    let input = page.find_element(selector).await.unwrap();
    let params = SetFileInputFilesParams::builder()
        .files(vec![path.to_string_lossy().into_owned()])
        .backend_node_id(input.backend_node_id)
        .build()
        .unwrap();
    page.execute(params).await.unwrap();
}

async fn fill(page: &Page, selector: &str, text: &str) {
    let input = page.find_element(selector).await.unwrap();
    input.click().await.unwrap();
    input.type_str(text).await.unwrap();
}

/// Reads `/admin/stream` for the test's whole run, keeping every byte it sends.
fn record_stream(base: &str, key: &str) -> (Arc<Mutex<String>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(String::new()));
    let sink = seen.clone();
    let request = http()
        .get(format!("{base}/admin/stream"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(600));
    let task = tokio::spawn(async move {
        let Ok(response) = request.send().await else {
            return;
        };
        let mut body = response.bytes_stream();
        while let Some(Ok(chunk)) = body.next().await {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk));
        }
    });
    (seen, task)
}

fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows a secret ({}…)",
            &secret[..secret.len().min(4)]
        );
    }
}

#[tokio::test]
async fn an_operator_lives_in_the_admin_page() {
    let site = demo_site("openai", &["--token-delay-ms", "5"]);
    let data = Data::new();
    let key = data
        .ok(&["keys", "create", "--admin"], None)
        .trim()
        .to_owned();
    let server = data.serve(&[]);
    let (streamed, stream_task) = record_stream(&server.url, &key);

    // A cookie file as an export extension writes it (here: a Playwright storageState).
    computetower::server::install_tls_provider();
    let login = computetower::demo::json_login(&site.url, "op@example.com", PASSWORD)
        .await
        .unwrap();
    let host = url::Url::parse(&site.url)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    let state = json!({
        "cookies": login.cookies.iter().map(|(n, v)| json!({
            "name": n, "value": v, "domain": host, "path": "/", "expires": -1,
            "httpOnly": true, "secure": false, "sameSite": "Lax"
        })).collect::<Vec<_>>(),
        "origins": [{
            "origin": site.url.trim_end_matches('/'),
            "localStorage": login.local_storage.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>()
        }]
    });
    let files = tempfile::tempdir().unwrap();
    let cookie_file = files.path().join("cookies.json");
    std::fs::write(&cookie_file, state.to_string()).unwrap();
    let mut secrets = vec![PASSWORD.to_owned(), key.clone()];
    secrets.extend(login.cookies.iter().map(|(_, v)| v.clone()));
    secrets.extend(login.local_storage.iter().map(|(_, v)| v.clone()));

    let chrome = Chrome::launch().await;
    let page = chrome.page(&format!("{}/admin", server.url)).await;
    let mut pages_html = Vec::new();

    // The key is asked for once, and kept in the tab only.
    wait_for(
        &page,
        "the key dialog",
        "document.getElementById('key-dialog').open",
    )
    .await;
    fill(&page, "#key-input", &key).await;
    page.find_element("#key-input")
        .await
        .unwrap()
        .press_key("Enter")
        .await
        .unwrap();
    wait_for(
        &page,
        "the empty accounts view",
        "!document.getElementById('no-accounts').hidden && !document.getElementById('key-dialog').open",
    )
    .await;
    assert_eq!(
        eval(&page, "sessionStorage.getItem('computetower.admin_key')").await,
        json!(key)
    );
    screenshot(&page, "1-accounts-empty").await;

    // An account from a cookie file picked from disk, with a login to fall back on.
    fill(&page, "#add-account input[name=url]", &site.url).await;
    fill(&page, "#add-account input[name=name]", "demo").await;
    fill(&page, "#add-account input[name=email]", "op@example.com").await;
    fill(&page, "#add-account input[name=password]", PASSWORD).await;
    pick_file(&page, "#add-account input[name=cookies]", &cookie_file).await;
    page.find_element("#add-account button[type=submit]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let account = wait_for(
        &page,
        "the added account's row",
        "document.querySelector('tr[data-account]')?.dataset.account ?? null",
    )
    .await;
    let account = account.as_str().unwrap().to_owned();
    let row = eval(
        &page,
        "document.querySelector('tr[data-account]').innerText",
    )
    .await;
    let row = row.as_str().unwrap();
    assert!(
        row.contains("demo") && row.contains("logged in") && row.contains("no flow"),
        "{row}"
    );
    assert_eq!(
        eval(
            &page,
            "document.querySelector('#add-account input[name=password]').value"
        )
        .await,
        json!(""),
        "the form forgets the password once sent"
    );
    pages_html.push(html(&page).await);

    // Learn: its lines arrive while it runs (a line of a later step before the summary).
    page.find_element("button[data-action=learn]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let progress = "document.querySelector('tr[data-progress]')?.innerText ?? ''";
    wait_for(
        &page,
        "the probing line before the learn ends",
        &format!(
            "(({progress}).includes('probing') && !({progress}).includes('learned flow')) || null"
        ),
    )
    .await;
    screenshot(&page, "2-accounts-learning").await;
    let lines = wait_for(
        &page,
        "the learn's summary",
        &format!("({progress}).includes('verified') ? {progress} : null"),
    )
    .await;
    let lines = lines.as_str().unwrap();
    for step in [
        "learning `demo`",
        "probing",
        "inferring",
        "verifying",
        "saving",
        "learned flow",
    ] {
        assert!(lines.contains(step), "no `{step}` line in:\n{lines}");
    }
    wait_for(
        &page,
        "the row without `no flow`",
        "!document.querySelector('tr[data-account]').innerText.includes('no flow')",
    )
    .await;
    screenshot(&page, "3-accounts-learned").await;
    pages_html.push(html(&page).await);

    // Flows: import the hand-written flow as the next version through the page, then open
    // the diff of the learned version against it.
    eval(&page, "location.hash = 'flows'").await;
    wait_for(
        &page,
        "the flow card",
        "document.querySelector('.card[data-service=demo]') !== null",
    )
    .await;
    pick_file(
        &page,
        "#import-flow input[name=file]",
        &repo().join("flows/demo-openai.json"),
    )
    .await;
    fill(&page, "#import-flow input[name=service]", "demo").await;
    page.find_element("#import-flow button[type=submit]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &page,
        "an earlier version to diff",
        "document.querySelector('button[data-diff]') !== null",
    )
    .await;
    let card = eval(
        &page,
        "document.querySelector('.card[data-service=demo]').innerText",
    )
    .await;
    let card = card.as_str().unwrap();
    for part in [
        "Chat call",
        "/api/openai/v1/chat/completions",
        "Preflights",
        "Slots",
        "Decoder",
        "Tier floor",
        "Stats",
        "v2",
    ] {
        assert!(card.contains(part), "no `{part}` on the flow card:\n{card}");
    }
    page.find_element("button[data-diff]")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let diff = wait_for(
        &page,
        "the diff",
        "document.querySelector('.diff') ? [document.querySelectorAll('.diff .add').length, document.querySelectorAll('.diff .del').length, document.querySelector('.diff-box h4').innerText] : null",
    )
    .await;
    assert!(
        diff[0].as_u64().unwrap() > 0 && diff[1].as_u64().unwrap() > 0,
        "{diff}"
    );
    assert!(diff[2].as_str().unwrap().contains("v1 → v2"), "{diff}");
    screenshot(&page, "4-flows-diff").await;
    pages_html.push(html(&page).await);

    // Live traffic: a request served now shows up, pushed by the stream.
    eval(&page, "location.hash = 'traffic'").await;
    wait_for(
        &page,
        "the live stream",
        "document.body.dataset.stream === 'live'",
    )
    .await;
    let before = eval(&page, "document.querySelectorAll('#traffic tr').length").await;
    let (status, reply) = post_chat(&server.url, Some(&key), ask("demo", "hello admin")).await;
    assert_eq!(status, 200, "{reply}");
    let live_row = wait_for(
        &page,
        "the request in live traffic",
        "document.querySelector('#traffic tr[data-live=\"1\"]')?.innerText ?? null",
    )
    .await;
    let live_row = live_row.as_str().unwrap();
    assert!(
        live_row.contains("demo") && live_row.contains("tier 1") && live_row.contains("ok"),
        "{live_row}"
    );
    assert_eq!(
        eval(&page, "document.querySelectorAll('#traffic tr').length").await,
        json!(before.as_u64().unwrap() + 1),
        "the row is added to the table, not the table reloaded"
    );
    wait_for(
        &page,
        "the chart of the service",
        "document.querySelector('.chart[data-service=demo]')?.innerText.includes('requests in the last hour') || null",
    )
    .await;
    screenshot(&page, "5-traffic").await;
    pages_html.push(html(&page).await);

    eval(&page, "location.hash = 'sessions'").await;
    wait_for(
        &page,
        "the stored sessions",
        "document.querySelectorAll('#stored-sessions tr').length > 0 || null",
    )
    .await;
    screenshot(&page, "6-sessions").await;
    pages_html.push(html(&page).await);

    // No secret anywhere: the page at every view, every API answer it reads, the stream.
    for (i, text) in pages_html.iter().enumerate() {
        assert_no_secret(&format!("page {i}"), text, &secrets);
    }
    for path in [
        "/admin",
        "/admin/overview",
        "/admin/accounts",
        &format!("/admin/accounts/{account}"),
        "/admin/flows?all=true",
        "/admin/traffic",
        "/admin/events",
        "/admin/decisions",
        "/admin/sessions",
        "/admin/jobs",
        "/admin/ui/admin.js",
    ] {
        let text = http()
            .get(format!("{}{path}", server.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_no_secret(path, &text, &secrets);
    }
    let streamed = streamed.lock().unwrap().clone();
    assert!(streamed.contains("event: job") && streamed.contains("event: request"));
    assert_no_secret("/admin/stream", &streamed, &secrets);
    stream_task.abort();
    chrome.close().await;
}

#[tokio::test]
async fn a_captcha_is_solved_on_the_handoff_page_reached_from_the_sessions_view() {
    let site = demo_site("openai", &["--login", "captcha"]);
    let data = Data::new();
    let out = data.ok(
        &[
            "account",
            "add",
            "--url",
            &site.url,
            "--name",
            "guarded",
            "--email",
            "h@example.com",
            "--password-stdin",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    let account = out
        .split_whitespace()
        .find(|w| w.starts_with("a_"))
        .unwrap()
        .to_owned();
    let server = data.serve(&[]);
    let login = tokio::spawn({
        let url = format!("{}/admin/accounts/{account}/login", server.url);
        async move { http().post(url).send().await.unwrap().status().as_u16() }
    });

    let chrome = Chrome::launch().await;
    let page = chrome.page(&format!("{}/admin#sessions", server.url)).await;
    // Loopback without keys: no key is asked for.
    let link = wait_for(
        &page,
        "the live session's link",
        "document.querySelector('#live-sessions a')?.getAttribute('href') ?? null",
    )
    .await;
    screenshot(&page, "7-sessions-live").await;
    page.find_element("#live-sessions a")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &page,
        "the handoff page's screenshot",
        "(location.pathname.startsWith('/admin/sessions/') && document.getElementById('shot')?.naturalWidth > 0) || null",
    )
    .await;
    assert_eq!(eval(&page, "location.pathname").await, json!(link));
    screenshot(&page, "8-handoff").await;

    // The person clicks the target they see, on the picture.
    let target: Value = http()
        .get(format!("{}/__demo/captcha", site.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let at = eval(
        &page,
        &format!(
            "(() => {{ const img = document.getElementById('shot'); const r = img.getBoundingClientRect();
                 const scale = img.clientWidth / img.naturalWidth;
                 return [r.left + {x} * scale, r.top + {y} * scale]; }})()",
            x = target["x"],
            y = target["y"]
        ),
    )
    .await;
    page.click(chromiumoxide::layout::Point {
        x: at[0].as_f64().unwrap(),
        y: at[1].as_f64().unwrap(),
    })
    .await
    .unwrap();
    assert_eq!(login.await.unwrap(), 200);
    let done = wait_for(
        &page,
        "the page saying the login is done",
        "document.body.dataset.ended === '1' ? document.getElementById('handoff-done').innerText : null",
    )
    .await;
    let done = done.as_str().unwrap();
    assert!(
        done.contains("Login done") && done.contains(&account),
        "{done}"
    );
    assert_eq!(
        eval(&page, "document.getElementById('handoff-live').hidden").await,
        json!(true),
        "the last frame is no longer shown"
    );
    screenshot(&page, "9-handoff-done").await;
    chrome.close().await;
}
