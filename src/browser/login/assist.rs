//! Page-understanding assist: when the generic rules do not understand a page, a vision
//! model (any OpenAI-compatible `/chat/completions`) gets a screenshot and the page summary
//! and names the page type and the selectors to use.
//!
//! Invariants:
//! - Off unless configured; at most a couple of calls per login.
//! - The answer is advice: each selector is used only after the page confirms it matches a
//!   visible element, and anything malformed is ignored.
//! - The summary holds no field values; the API key is never logged.

use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{PageSummary, Targets};
use crate::browser::{AssistConfig, PageKind};

const ASSIST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest selector accepted from the model.
const MAX_SELECTOR: usize = 300;

const INSTRUCTIONS: &str = "You help a browser automation log in to a web chat site. \
You get a screenshot of the current page and a JSON summary of its visible inputs, buttons, \
links, iframes, headings and error texts, each with a CSS selector. Answer with one JSON \
object and nothing else: {\"page_type\": one of \"login_form\", \"landing_page\", \
\"two_step\", \"chat_interface\", \"captcha\", \"error\"; \"email_selector\", \
\"password_selector\", \"submit_selector\", \"login_control_selector\": a CSS selector or \
null}. Prefer selectors from the summary. login_control_selector is the control that opens \
the login (\"Log in\", \"Sign in\"), never \"Sign up\".";

/// The model's answer, before verification.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub(crate) struct AssistAnswer {
    pub page_type: Option<String>,
    pub email_selector: Option<String>,
    pub password_selector: Option<String>,
    pub submit_selector: Option<String>,
    pub login_control_selector: Option<String>,
}

impl AssistAnswer {
    /// The selectors to verify, in the order `verify` expects their visibility.
    pub(crate) fn selectors(&self) -> Vec<String> {
        [
            &self.email_selector,
            &self.password_selector,
            &self.submit_selector,
            &self.login_control_selector,
        ]
        .into_iter()
        .flatten()
        .filter(|s| plausible_selector(s))
        .cloned()
        .collect()
    }
}

/// What the login loop may use: the page type and only verified selectors.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Hints {
    pub page_type: Option<PageKind>,
    pub targets: Targets,
}

fn plausible_selector(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty() && s.len() <= MAX_SELECTOR && !s.contains(['{', '}', '\n'])
}

fn page_kind(name: &str) -> Option<PageKind> {
    Some(
        match name.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "login_form" => PageKind::LoginForm,
            "landing_page" | "landing" => PageKind::LandingPage,
            "two_step" => PageKind::TwoStep,
            "chat_interface" | "chat" => PageKind::ChatInterface,
            "captcha" => PageKind::Captcha,
            "error" => PageKind::Error,
            _ => return None,
        },
    )
}

/// Keeps the selectors of `answer` that `selectors` lists with `visible[i] == true` (the
/// page's verdict on `answer.selectors()`).
pub(crate) fn verify(answer: AssistAnswer, selectors: &[String], visible: &[bool]) -> Hints {
    let ok = |s: Option<String>| {
        s.filter(|s| {
            selectors
                .iter()
                .position(|x| x == s)
                .and_then(|i| visible.get(i).copied())
                .unwrap_or(false)
        })
    };
    Hints {
        page_type: answer.page_type.as_deref().and_then(page_kind),
        targets: Targets {
            identifier: ok(answer.email_selector),
            password: ok(answer.password_selector),
            submit: ok(answer.submit_selector),
            login_control: ok(answer.login_control_selector),
        },
    }
}

/// Reads the answer from a chat completion body: the first JSON object in the message
/// content (models wrap it in prose or code fences).
pub(crate) fn parse_completion(body: &Value) -> Option<AssistAnswer> {
    let content = body.pointer("/choices/0/message/content")?;
    let text = match content {
        Value::String(s) => s.clone(),
        // Some servers answer with content parts.
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => return None,
    };
    parse_answer_text(&text)
}

pub(crate) fn parse_answer_text(text: &str) -> Option<AssistAnswer> {
    let start = text.find('{')?;
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    serde_json::from_value(value).ok()
}

/// The chat completion request.
pub(crate) fn request_body(model: &str, png: &[u8], summary: &PageSummary) -> Value {
    let image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let summary = serde_json::to_string(summary).unwrap_or_default();
    json!({
        "model": model,
        "temperature": 0,
        "messages": [
            { "role": "system", "content": INSTRUCTIONS },
            { "role": "user", "content": [
                { "type": "text", "text": format!("Page summary:\n{summary}") },
                { "type": "image_url", "image_url": { "url": image } }
            ] }
        ]
    })
}

/// Asks the assist endpoint; `None` on any failure (the login goes on without it).
pub(crate) async fn ask(
    config: &AssistConfig,
    png: &[u8],
    summary: &PageSummary,
) -> Option<AssistAnswer> {
    crate::install_tls_provider();
    let url = format!("{}/chat/completions", config.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(ASSIST_TIMEOUT)
        .build()
        .ok()?;
    let mut request = client
        .post(&url)
        .json(&request_body(&config.model, png, summary));
    if !config.api_key.is_empty() {
        request = request.bearer_auth(&config.api_key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "the assist endpoint failed");
            return None;
        }
    };
    if !response.status().is_success() {
        tracing::warn!(status = %response.status(), "the assist endpoint refused");
        return None;
    }
    let body: Value = response.json().await.ok()?;
    let answer = parse_completion(&body);
    if answer.is_none() {
        tracing::warn!("the assist endpoint answered without the expected JSON");
    }
    answer
}

#[cfg(test)]
mod unit {
    use super::*;

    fn canned() -> Value {
        json!({"choices":[{"message":{"role":"assistant","content":
            "Sure! ```json\n{\"page_type\":\"landing_page\",\"email_selector\":null,\
             \"password_selector\":\"#pw\",\"submit_selector\":\"div > {bad}\",\
             \"login_control_selector\":\"a.login\"}\n```"}}]})
    }

    #[test]
    fn the_answer_is_found_inside_prose_and_fences() {
        let answer = parse_completion(&canned()).unwrap();
        assert_eq!(answer.page_type.as_deref(), Some("landing_page"));
        assert_eq!(answer.login_control_selector.as_deref(), Some("a.login"));
        assert!(parse_answer_text("no json here").is_none());
    }

    #[test]
    fn only_selectors_the_page_shows_are_kept() {
        let answer = parse_completion(&canned()).unwrap();
        let selectors = answer.selectors();
        // The malformed one is never even sent to the page.
        assert_eq!(selectors, vec!["#pw".to_owned(), "a.login".to_owned()]);
        // The page says "#pw" matches nothing visible.
        let hints = verify(answer, &selectors, &[false, true]);
        assert_eq!(hints.page_type, Some(PageKind::LandingPage));
        assert_eq!(hints.targets.password, None);
        assert_eq!(hints.targets.submit, None);
        assert_eq!(hints.targets.login_control.as_deref(), Some("a.login"));
    }

    #[test]
    fn the_request_carries_the_screenshot_as_a_data_url() {
        let body = request_body("vision-1", b"png", &PageSummary::default());
        let url = body
            .pointer("/messages/1/content/1/image_url/url")
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(url, "data:image/png;base64,cG5n");
        assert_eq!(body["model"], "vision-1");
    }
}
