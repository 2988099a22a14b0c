//! Browser tests: the real Chromium (`/usr/bin/chromium`) against the real demo site, served
//! in-process on `127.0.0.1:0`.
//!
//! Each test owns its pool and shuts it down: the pool's tasks live on the runtime that
//! launched Chromium, and every `#[tokio::test]` has its own runtime, so a pool shared across
//! tests would outlive the runtime driving it. A semaphore keeps at most two Chromiums
//! running at once so the suite stays within a small machine's memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::*;
use crate::demo::{CSRF_HEADER, DemoConfig, LoginPattern, SESSION_COOKIE, Shape, TOKEN_KEY};
use crate::flow::{Flow, Transport};
use crate::learn::probe::{ProbeRequest, probe};
use crate::recording::{Exchange, Recording};
use crate::replay::decode::{Decoder, collect_text, decode_all};

pub(super) static BROWSERS: Semaphore = Semaphore::const_new(2);

pub(super) struct Site {
    pub(super) url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn site(login: LoginPattern, password: &str) -> Site {
    site_with(DemoConfig {
        login,
        password: password.to_owned(),
        ..DemoConfig::default()
    })
    .await
}

pub(super) async fn site_with(config: DemoConfig) -> Site {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = crate::demo::serve(listener, config).await;
    });
    Site {
        url: format!("http://{addr}/"),
        task,
    }
}

pub(super) fn config(data_dir: &std::path::Path) -> BrowserConfig {
    BrowserConfig {
        data_dir: data_dir.to_owned(),
        login_timeout: Duration::from_secs(30),
        typing: TypingMode::Paste,
        ..BrowserConfig::default()
    }
}

pub(super) fn request(account: &str, site: &Site, password: &str) -> LoginRequest {
    LoginRequest {
        account_id: account.to_owned(),
        url: site.url.clone(),
        email: Some(format!("{account}@example.com")),
        password: Some(password.to_owned()),
        proxy: None,
    }
}

pub(super) const PASSWORD: &str = "demo-password";

fn assert_demo_session(outcome: &LoginOutcome) {
    let sid = outcome
        .session
        .cookies
        .iter()
        .find(|c| c.name == SESSION_COOKIE)
        .expect("the HttpOnly session cookie is harvested");
    assert!(sid.http_only && !sid.value.is_empty(), "{sid:?}");
    let token = outcome.session.local_storage.get(TOKEN_KEY);
    assert!(
        token.is_some_and(|t| !t.is_empty()),
        "{:?}",
        outcome.session
    );
    let ua = outcome.session.user_agent.as_deref().unwrap_or_default();
    assert!(ua.contains("Chrome/") && !ua.contains("Headless"), "{ua}");
    assert!(outcome.chat_url.ends_with("/chat"), "{}", outcome.chat_url);
    let now = unix_now();
    let expires = outcome.expires_at.unwrap_or_default();
    assert!(expires > now && expires <= now + 24 * 3600, "{expires}");
}

/// Polls `f` every 50 ms until it yields `Some`, for at most `limit`.
/// Waits until `f` finds what it looks for in the pool, looking again at each change of
/// the pool's state (never on a timer).
async fn poll<T, F, Fut>(pool: &BrowserPool, limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let mut changes = pool.changes();
    let found = tokio::time::timeout(limit, async {
        loop {
            if let Some(value) = f().await {
                return value;
            }
            let _ = changes.changed().await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn direct_login_reaches_the_chat_and_harvests_the_httponly_cookie_and_token() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let outcome = pool.login(request("alice", &site, PASSWORD)).await;
    pool.shutdown().await;
    let outcome = outcome.unwrap();
    eprintln!("direct: launch → chat page in {:?}", outcome.elapsed);
    assert_eq!(
        outcome.page_kinds,
        vec![PageKind::LoginForm, PageKind::ChatInterface]
    );
    assert_demo_session(&outcome);
    // Only the demo site's own cookies.
    assert!(
        outcome
            .session
            .cookies
            .iter()
            .all(|c| c.domain == "127.0.0.1")
    );
    assert_eq!(pool.browser_pid().await, None, "shutdown closes Chromium");
}

#[tokio::test]
async fn a_wrong_password_is_wrong_credentials_with_the_sites_message_and_a_screenshot() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let result = pool.login(request("bob", &site, "not-the-password")).await;
    pool.shutdown().await;
    let error = result.unwrap_err();
    let LoginError::WrongCredentials {
        site_message,
        screenshot,
    } = &error
    else {
        panic!("expected WrongCredentials, got {error:?}");
    };
    assert_eq!(site_message, "Incorrect email or password.");
    let shot = screenshot.as_deref().expect("a failure screenshot");
    assert!(shot.starts_with(dir.path().join("screenshots")), "{shot:?}");
    assert!(
        shot.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("bob-")
    );
    let png = std::fs::read(shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let message = error.to_string();
    assert!(
        message.contains("Incorrect email or password."),
        "{message}"
    );
    assert!(!message.contains("not-the-password"), "{message}");
}

#[tokio::test]
async fn chromium_killed_mid_login_is_relaunched_and_the_login_retried() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    pool.login(request("carol", &site, PASSWORD)).await.unwrap();
    let first = pool.browser_pid().await.unwrap();

    // Kill Chromium the moment the next login sees the login form, before it types.
    let killed = Arc::new(Mutex::new(false));
    let flag = killed.clone();
    *pool.shared_for_tests().observer.lock().unwrap() = Some(Box::new(move |kind| {
        if kind != PageKind::LoginForm {
            return false;
        }
        kill(first);
        *flag.lock().unwrap() = true;
        true
    }));
    let outcome = pool.login(request("dave", &site, PASSWORD)).await;
    assert!(*killed.lock().unwrap(), "the hook ran");
    let outcome = outcome.unwrap();
    assert_demo_session(&outcome);
    let second = pool.browser_pid().await.unwrap();
    assert_ne!(first, second, "a new Chromium was launched");

    // Killed between logins: noticed on next use.
    kill(second);
    let outcome = pool.login(request("erin", &site, PASSWORD)).await.unwrap();
    assert_demo_session(&outcome);
    let third = pool.browser_pid().await.unwrap();
    assert!(third != second && third != first);
    pool.shutdown().await;
}

fn kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn an_unsolved_captcha_fails_after_the_human_timeout_naming_it() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Captcha, PASSWORD).await;
    let mut config = config(dir.path());
    config.captcha.human_timeout = Duration::from_secs(2);
    let pool = BrowserPool::new(config);
    let result = pool.login(request("frank", &site, PASSWORD)).await;
    pool.shutdown().await;
    let error = result.unwrap_err();
    assert!(matches!(error, LoginError::Captcha { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("nobody solved the challenge within 2 s"),
        "{message}"
    );
    // The live session is gone with this error: the message names it, and sends nobody to
    // its page.
    assert!(message.contains("live session "), "{message}");
    assert!(!message.contains("/admin/sessions/"), "{message}");
    assert!(error.screenshot().is_some());
}

/// The demo's `/__demo/captcha`: where a person would click.
async fn captcha_target(site: &Site) -> Option<(f64, f64)> {
    crate::server::install_tls_provider();
    let body: serde_json::Value = reqwest::get(format!("{}__demo/captcha", site.url))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some((body["x"].as_f64()?, body["y"].as_f64()?))
}

#[tokio::test]
async fn a_human_solves_the_captcha_through_the_live_session() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Captcha, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let login = tokio::spawn({
        let pool = pool.clone();
        let req = request("grace", &site, PASSWORD);
        async move { pool.login(req).await }
    });
    let live = poll(
        &pool,
        Duration::from_secs(30),
        "a live session waiting for a human",
        || {
            let pool = pool.clone();
            async move {
                pool.live_sessions()
                    .await
                    .into_iter()
                    .find(|s| s.state == "waiting_for_human")
            }
        },
    )
    .await;
    assert_eq!(live.account_id, "grace");
    let png = pool.screenshot(&live.id).await.unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let (x, y) = captcha_target(&site).await.expect("a pending challenge");
    pool.click(&live.id, x, y).await.unwrap();
    let outcome = login.await.unwrap();
    pool.shutdown().await;
    let outcome = outcome.unwrap();
    assert_eq!(
        outcome.page_kinds,
        vec![
            PageKind::LoginForm,
            PageKind::Captcha,
            PageKind::ChatInterface
        ]
    );
    assert_demo_session(&outcome);
    assert!(pool.live_sessions().await.is_empty());
}

#[tokio::test]
async fn closing_a_live_session_cancels_its_login() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Captcha, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let login = tokio::spawn({
        let pool = pool.clone();
        let req = request("heidi", &site, PASSWORD);
        async move { pool.login(req).await }
    });
    let live = poll(
        &pool,
        Duration::from_secs(30),
        "a live session waiting for a human",
        || {
            let pool = pool.clone();
            async move {
                pool.live_sessions()
                    .await
                    .into_iter()
                    .find(|s| s.state == "waiting_for_human")
            }
        },
    )
    .await;
    pool.close_live(&live.id).await.unwrap();
    let result = login.await.unwrap();
    pool.shutdown().await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, LoginError::Cancelled(ref id) if *id == live.id),
        "{error:?}"
    );
    assert!(matches!(
        pool.close_live(&live.id).await,
        Err(LoginError::NoSuchLiveSession(_))
    ));
}

#[tokio::test]
async fn landing_two_step_and_open_sites_are_logged_in_generically() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let landing = site(LoginPattern::Landing, PASSWORD).await;
    let two_step = site(LoginPattern::TwoStep, PASSWORD).await;
    let open = site(LoginPattern::Open, PASSWORD).await;
    // Key events per character here; one insertText per character for the two-step site.
    let mut fast = config(dir.path());
    fast.typing = TypingMode::Fast;
    let fast = BrowserPool::new(fast);
    let outcome = fast.login(request("ivan", &landing, PASSWORD)).await;
    fast.shutdown().await;
    let outcome = outcome.unwrap();
    eprintln!("landing: {:?}", outcome.elapsed);
    assert_eq!(
        outcome.page_kinds,
        vec![
            PageKind::LandingPage,
            PageKind::LoginForm,
            PageKind::ChatInterface
        ]
    );
    assert_demo_session(&outcome);

    let mut config = config(dir.path());
    config.typing = TypingMode::Human {
        min_ms: 1,
        max_ms: 4,
    };
    let pool = BrowserPool::new(config);
    let outcome = pool.login(request("judy", &two_step, PASSWORD)).await;
    let outcome = outcome.unwrap();
    eprintln!("two-step: {:?}", outcome.elapsed);
    assert_eq!(
        outcome.page_kinds,
        vec![
            PageKind::TwoStep,
            PageKind::LoginForm,
            PageKind::ChatInterface
        ]
    );
    assert_demo_session(&outcome);

    let mut anonymous = request("mallory", &open, PASSWORD);
    anonymous.email = None;
    anonymous.password = None;
    let outcome = pool.login(anonymous).await;
    pool.shutdown().await;
    let outcome = outcome.unwrap();
    eprintln!("open: {:?}", outcome.elapsed);
    assert_eq!(outcome.page_kinds, vec![PageKind::ChatInterface]);
    assert_demo_session(&outcome);
}

#[tokio::test]
async fn a_login_form_without_credentials_is_no_credentials() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let mut req = request("niaj", &site, PASSWORD);
    req.password = None;
    let result = pool.login(req).await;
    pool.shutdown().await;
    assert!(
        matches!(result, Err(LoginError::NoCredentials)),
        "{result:?}"
    );
}

/// Everything logged while the filter of [`LOG_FILTER_DIRECTIVES`] applies, and everything
/// logged at all (to show the filter is what keeps the secrets out).
struct Captured {
    filtered: Arc<Mutex<Vec<u8>>>,
    unfiltered: Arc<Mutex<Vec<u8>>>,
}

#[derive(Clone)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> &'static Captured {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let filtered = Arc::new(Mutex::new(Vec::new()));
        let unfiltered = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (Buffer(filtered.clone()), Buffer(unfiltered.clone()));
        let filter = tracing_subscriber::EnvFilter::new(format!("trace,{LOG_FILTER_DIRECTIVES}"));
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || a.clone())
                    .with_filter(filter),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || b.clone())
                    .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
            );
        tracing::subscriber::set_global_default(subscriber).unwrap();
        Captured {
            filtered,
            unfiltered,
        }
    })
}

#[tokio::test]
async fn trace_logs_under_the_recommended_filter_hold_no_password_cookie_or_token() {
    let captured = capture_logs();
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A non-ASCII password also shows that pasting types any Unicode.
    let password = "s3cret-Pässwörd-λ42";
    let site = site(LoginPattern::Direct, password).await;
    let pool = BrowserPool::new(config(dir.path()));
    let outcome = pool.login(request("olivia", &site, password)).await;
    pool.shutdown().await;
    let outcome = outcome.unwrap();
    let sid = outcome
        .session
        .cookies
        .iter()
        .find(|c| c.name == SESSION_COOKIE)
        .map(|c| c.value.clone())
        .unwrap();
    let token = outcome.session.local_storage[TOKEN_KEY].clone();
    let filtered = String::from_utf8_lossy(&captured.filtered.lock().unwrap()).into_owned();
    let unfiltered = String::from_utf8_lossy(&captured.unfiltered.lock().unwrap()).into_owned();
    assert!(
        filtered.contains("logged in"),
        "our own logs pass the filter"
    );
    for secret in [password, sid.as_str(), token.as_str()] {
        assert!(!filtered.contains(secret), "a secret leaked into the logs");
    }
    // Without the filter, chromiumoxide's trace logs carry the typed password: the filter
    // is what keeps it out.
    assert!(unfiltered.contains("Pässwörd") || unfiltered.contains("P\\u00e4ssw"));
}

#[tokio::test]
async fn contexts_are_bounded_evicted_when_idle_and_reaped_after_the_idle_timeout() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let mut config = config(dir.path());
    config.max_contexts = 1;
    config.idle_timeout = Duration::from_millis(300);
    let pool = BrowserPool::new(config);
    pool.login(request("peggy", &site, PASSWORD)).await.unwrap();
    // The only slot is taken by peggy's idle context: it is evicted for rupert.
    let outcome = pool
        .login(request("rupert", &site, PASSWORD))
        .await
        .unwrap();
    assert_demo_session(&outcome);
    assert_eq!(pool.context_count(), 1);
    poll(
        &pool,
        Duration::from_secs(10),
        "the idle context to be closed",
        || {
            let pool = pool.clone();
            async move { (pool.context_count() == 0).then_some(()) }
        },
    )
    .await;
    pool.shutdown().await;
}

/// A stand-in for an OpenAI-compatible vision endpoint: answers every chat completion with
/// `answer` and keeps the requests.
async fn vision_mock(answer: serde_json::Value) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use axum::routing::post;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        post({
            let seen = seen.clone();
            move |axum::Json(body): axum::Json<serde_json::Value>| {
                let seen = seen.clone();
                let answer = answer.clone();
                async move {
                    seen.lock().unwrap().push(body);
                    let content = answer.to_string();
                    axum::Json(serde_json::json!({
                        "choices": [{ "message": { "role": "assistant", "content": content } }]
                    }))
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{addr}/v1"), seen)
}

#[tokio::test]
async fn the_assist_finds_a_login_control_the_rules_cannot_and_bad_selectors_are_ignored() {
    use axum::response::Html;
    use axum::routing::get;
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let demo = site(LoginPattern::Direct, PASSWORD).await;
    // A front page whose only way in is an unlabelled icon: no rule can tell what it is.
    let page = format!(
        r#"<!doctype html><title>Welcome</title><div id="door" onclick="location.href='{}login'"
        style="width:48px;height:48px;background:#222;cursor:pointer"></div>"#,
        demo.url
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = format!("http://{}/", listener.local_addr().unwrap());
    let front_task = tokio::spawn(async move {
        let router = axum::Router::new().route("/", get(move || async move { Html(page) }));
        let _ = axum::serve(listener, router).await;
    });
    let (assist_url, seen) = vision_mock(serde_json::json!({
        "page_type": "landing_page",
        "login_control_selector": "#door",
        "password_selector": "#does-not-exist"
    }))
    .await;
    let mut config = config(dir.path());
    config.assist = Some(AssistConfig {
        url: assist_url,
        api_key: "test-key".into(),
        model: "vision-test".into(),
    });
    let pool = BrowserPool::new(config);
    let mut req = request("sybil", &demo, PASSWORD);
    req.url = front;
    let outcome = pool.login(req).await;
    pool.shutdown().await;
    front_task.abort();
    let outcome = outcome.unwrap();
    assert_eq!(
        outcome.page_kinds,
        vec![
            PageKind::Error,
            PageKind::LoginForm,
            PageKind::ChatInterface
        ]
    );
    assert_demo_session(&outcome);
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "one question for the one page the rules did not know"
    );
    assert_eq!(seen[0]["model"], "vision-test");
    let image = seen[0]
        .pointer("/messages/1/content/1/image_url/url")
        .and_then(|v| v.as_str())
        .unwrap();
    assert!(image.starts_with("data:image/png;base64,"));
}

// ---------------------------------------------------------------------------------------------
// Recording and probing

/// What the tests compare rendered text by: whitespace collapsed, markdown symbols (`*`,
/// `` ` ``, a leading `- `) dropped.
fn normalized(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.trim_start();
            line.strip_prefix("- ")
                .unwrap_or(line)
                .replace(['*', '`'], "")
        })
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn flow_of(shape: Shape) -> Flow {
    let path = format!("{}/flows/demo-{shape}.json", env!("CARGO_MANIFEST_DIR"));
    Flow::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Whether `path` matches a route in which `{…}` segments stand for any one segment.
fn route_matches(route: &str, path: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (route.split('/').collect(), path.split('/').collect());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(r, p)| (r.starts_with('{') && r.ends_with('}')) || r == p)
}

fn path_of(exchange: &Exchange) -> String {
    url::Url::parse(&exchange.url).unwrap().path().to_owned()
}

fn carries(exchange: &Exchange, marker: &str) -> bool {
    // A navigation (the form submitted natively) carries it but is no API call.
    !exchange.resource_type.eq_ignore_ascii_case("document") && exchange.url.contains(marker)
        || !exchange.resource_type.eq_ignore_ascii_case("document")
            && exchange
                .request_body
                .as_ref()
                .is_some_and(|b| String::from_utf8_lossy(&b.0).contains(marker))
        || exchange
            .frames
            .iter()
            .any(|f| f.sent && f.payload.contains(marker))
}

/// The reply decoded from the recorded chat call with the shape's hand-written flow.
fn decode_recorded(flow: &Flow, chat: &Exchange) -> (String, String) {
    let deltas = if flow.response.transport == Transport::Websocket {
        let mut decoder = Decoder::new(&flow.response);
        let mut out = Vec::new();
        for frame in chat.frames.iter().filter(|f| !f.sent) {
            decoder
                .feed_message(None, &frame.payload, &mut out)
                .unwrap();
        }
        decoder.finish(&mut out).unwrap();
        out
    } else {
        let body = chat.response_body.as_ref().expect("the chat call's body");
        decode_all(&flow.response, &body.0).unwrap()
    };
    collect_text(&deltas)
}

fn assert_recording(shape: Shape, recording: &Recording) {
    let marker = &recording.marker;
    assert!(
        marker.len() == 12
            && marker.starts_with("ct")
            && marker[2..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "{marker}"
    );
    assert!(recording.probe.contains(marker.as_str()));
    let carrying: Vec<&Exchange> = recording
        .exchanges
        .iter()
        .filter(|e| carries(e, marker))
        .collect();
    assert_eq!(
        carrying.len(),
        1,
        "{shape}: exactly one exchange carries the marker"
    );
    // The chat call carries the marker, except where a create call carries it and the
    // reply streams from a later call (newchat).
    let chat = if route_matches(shape.chat_path(), &path_of(carrying[0])) {
        carrying[0]
    } else {
        recording
            .exchanges
            .iter()
            .find(|e| {
                route_matches(shape.chat_path(), &path_of(e))
                    && e.started_ms >= carrying[0].started_ms
            })
            .unwrap_or_else(|| panic!("{shape}: no chat call after {}", carrying[0].url))
    };
    assert_eq!(
        chat.status,
        Some(if shape == Shape::Ws { 101 } else { 200 }),
        "{shape}"
    );
    assert!(
        chat.first_byte_ms.is_some() && chat.started_ms >= 0.0,
        "{shape}"
    );

    // The complete reply is in the recording: the hand-written flow decodes it.
    let expected = crate::demo::reply_for(shape, &recording.probe);
    let (text, reasoning) = decode_recorded(&flow_of(shape), chat);
    assert_eq!(text, expected.content, "{shape}: decoded text");
    assert_eq!(
        reasoning,
        expected.reasoning.clone().unwrap_or_default(),
        "{shape}: decoded reasoning"
    );

    // The create-conversation preflight, made on send, came before with its answer (where
    // the shape has one: others create it with the first chat call).
    if !shape.creates_on_first_chat() {
        let create = recording
            .exchanges
            .iter()
            .find(|e| {
                e.method == "POST" && route_matches(shape.create_conversation_path(), &path_of(e))
            })
            .unwrap_or_else(|| panic!("{shape}: no create-conversation exchange"));
        assert!(create.started_ms <= chat.started_ms, "{shape}");
        let answer: serde_json::Value =
            serde_json::from_slice(&create.response_body.as_ref().unwrap().0).unwrap();
        assert!(
            answer
                .pointer("/data/id")
                .or(answer.get("uuid"))
                .or(answer.pointer("/0/result/data/json/chatId"))
                .is_some(),
            "{shape}: {answer}"
        );
    }

    // Headers as actually sent, cookie included.
    let cookie = chat.request_header("cookie").unwrap_or_default();
    assert!(
        cookie.contains(&format!("{SESSION_COOKIE}=")),
        "{shape}: cookie header"
    );
    if shape == Shape::Ws {
        assert!(
            chat.frames.iter().any(|f| f.sent)
                && chat.frames.iter().filter(|f| !f.sent).count() > 3
        );
        assert!(chat.frames.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    } else {
        let auth = chat.request_header("authorization").unwrap_or_default();
        assert!(auth.starts_with("Bearer ") && auth.len() > 10, "{shape}");
        assert!(
            chat.request_header(CSRF_HEADER)
                .is_some_and(|v| !v.is_empty()),
            "{shape}"
        );
        let (first, last) = (chat.first_byte_ms.unwrap(), chat.finished_ms.unwrap());
        assert!(
            last >= first,
            "{shape}: first byte {first} ms, finished {last} ms"
        );
    }

    // What the page rendered.
    assert_eq!(
        normalized(&recording.rendered_reply),
        normalized(&expected.content),
        "{shape}: rendered reply"
    );
    assert_eq!(
        recording.rendered_reasoning.as_deref().map(normalized),
        expected.reasoning.as_deref().map(normalized),
        "{shape}: rendered reasoning"
    );

    // The session material.
    let storage = &recording.storage;
    // The think shape's page stored its token when it loaded, wrapped.
    let token_key = if shape == Shape::Think {
        crate::demo::WRAPPED_TOKEN_KEY
    } else {
        TOKEN_KEY
    };
    assert!(
        storage
            .local_storage
            .get(token_key)
            .is_some_and(|t| !t.is_empty()),
        "{shape}: the stored token"
    );
    assert!(
        storage
            .meta
            .get("csrf-token")
            .is_some_and(|t| !t.is_empty())
    );
    assert!(
        storage.cookies.contains_key(SESSION_COOKIE),
        "HttpOnly cookie included"
    );
    assert!(
        storage
            .user_agent
            .as_deref()
            .is_some_and(|ua| !ua.contains("Headless"))
    );
    assert!(
        recording.page_url.ends_with("/chat"),
        "{}",
        recording.page_url
    );
    let starts: Vec<f64> = recording.exchanges.iter().map(|e| e.started_ms).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "ordered by start");
}

fn probe_request(account: &str) -> ProbeRequest {
    ProbeRequest {
        timeout: Duration::from_secs(60),
        ..ProbeRequest::new(account)
    }
}

#[tokio::test]
async fn every_demo_shape_is_probed_and_its_chat_call_recorded_completely() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = BrowserPool::new(config(dir.path()));
    let mut failures = Vec::new();
    for shape in Shape::ALL {
        let site = site_with(DemoConfig {
            shape,
            ..DemoConfig::default()
        })
        .await;
        let account = format!("probe-{shape}");
        pool.login(request(&account, &site, PASSWORD))
            .await
            .unwrap();
        let started = Instant::now();
        let recording = probe(&pool, &probe_request(&account)).await;
        let elapsed = started.elapsed();
        match recording {
            Ok(recording) => {
                eprintln!(
                    "probe {shape}: {elapsed:?}, {} exchanges",
                    recording.exchanges.len()
                );
                let checked = std::panic::catch_unwind(|| assert_recording(shape, &recording));
                if let Err(e) = checked {
                    let message = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{shape}: {message}"));
                }
            }
            Err(e) => failures.push(format!("{shape}: probe failed: {e}")),
        }
    }
    pool.shutdown().await;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn a_probe_injects_a_saved_session_into_a_new_context_and_logs_in_when_it_is_stale() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site(LoginPattern::Direct, PASSWORD).await;
    let pool = BrowserPool::new(config(dir.path()));
    let outcome = pool.login(request("quinn", &site, PASSWORD)).await.unwrap();
    // Another pool (no context for the account): the saved session is injected.
    let other = BrowserPool::new(config(dir.path()));
    pool.shutdown().await;
    let recording = probe(
        &other,
        &ProbeRequest {
            session: Some(outcome.session.clone()),
            chat_url: Some(outcome.chat_url.clone()),
            ..probe_request("quinn")
        },
    )
    .await
    .unwrap();
    assert_recording(Shape::Openai, &recording);

    // No context, no session, no login: the chat page redirects to the login form.
    let error = probe(
        &other,
        &ProbeRequest {
            chat_url: Some(format!("{}chat", site.url)),
            ..probe_request("rose")
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            PageError::NotLoggedIn {
                kind: PageKind::LoginForm,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.screenshot().is_some());

    // With a login: it logs in first, then probes.
    let recording = probe(
        &other,
        &ProbeRequest {
            login: Some(request("rose", &site, PASSWORD)),
            ..probe_request("rose")
        },
    )
    .await
    .unwrap();
    other.shutdown().await;
    assert_recording(Shape::Openai, &recording);
}

#[tokio::test]
async fn the_live_feed_delivers_body_chunks_while_the_reply_streams() {
    let _slot = BROWSERS.acquire().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let site = site_with(DemoConfig {
        token_delay: Duration::from_millis(50),
        ..DemoConfig::default()
    })
    .await;
    let pool = BrowserPool::new(config(dir.path()));
    pool.login(request("sam", &site, PASSWORD)).await.unwrap();
    let (page, taps) = pool.page_for_tests("sam").await;
    page.goto(format!("{}chat", site.url)).await.unwrap();
    // The page itself says when its composer exists.
    let ready = page::evaluate_string(
        &page,
        "new Promise((done) => { const found = () => document.getElementById('prompt'); \
         if (found()) return done('true'); new MutationObserver((_, o) => { if (found()) { \
         o.disconnect(); done('true'); } }).observe(document, { childList: true, subtree: true }); })",
    );
    let ready = tokio::time::timeout(Duration::from_secs(10), ready).await;
    assert_eq!(
        ready.ok().and_then(Result::ok).as_deref(),
        Some("true"),
        "the chat page"
    );
    let recorder = recorder::Recorder::start(&page, &taps).await.unwrap();
    let mut feed = recorder.subscribe();
    page::evaluate_string(
        &page,
        "document.getElementById('prompt').value = 'stream me ctfeed000001'; \
         document.getElementById('composer').requestSubmit(); 'ok'",
    )
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut chat = None;
    let mut chunks: Vec<(Instant, bytes::Bytes)> = Vec::new();
    let finished_at = loop {
        let event = tokio::time::timeout_at(deadline, feed.recv())
            .await
            .expect("the chat call finishes in time")
            .expect("the feed stays open");
        match event {
            RecorderEvent::Request { id, body, .. }
                if body
                    .as_deref()
                    .is_some_and(|b| String::from_utf8_lossy(b).contains("ctfeed000001")) =>
            {
                chat = Some(id)
            }
            RecorderEvent::Data { id, bytes } if Some(&id) == chat.as_ref() => {
                chunks.push((Instant::now(), bytes))
            }
            RecorderEvent::Finished { id } if Some(&id) == chat.as_ref() => break Instant::now(),
            RecorderEvent::Failed { id, error } if Some(&id) == chat.as_ref() => {
                panic!("the chat call failed: {error}")
            }
            _ => {}
        }
    };
    let exchanges = recorder.stop().await;
    page.close().await.unwrap();
    pool.shutdown().await;

    assert!(chunks.len() >= 5, "several chunks: {}", chunks.len());
    // ~60 tokens 50 ms apart: the first chunk arrives seconds before the end.
    assert!(
        finished_at - chunks[0].0 > Duration::from_secs(1),
        "the first chunk came {:?} before the end",
        finished_at - chunks[0].0
    );
    let streamed: Vec<u8> = chunks.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let chat = chat.unwrap();
    let recorded = exchanges.iter().find(|e| e.id == chat).unwrap();
    assert_eq!(
        recorded.response_body.as_ref().unwrap().0,
        streamed,
        "the feed's chunks add up to the recorded body"
    );
    let text = String::from_utf8(streamed).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}
