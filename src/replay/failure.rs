//! Why a replay failed, for every tier and transport: which call failed ([`Call`]), how the
//! gateway should handle it ([`FailureKind`]), where it came from ([`Source`]) and whether
//! trying the same thing again is safe ([`ReplayError::retry_safe`]), as Pingora's errors say.
//!
//! The classifiers here read what a site answered (status, a few headers, the start of the
//! body) and nothing else, so tier 1 (reqwest, tungstenite) and tier 2 (`fetch()` in the page)
//! classify the same answer the same way.
//!
//! Invariants:
//! - No error carries a secret: messages name calls, statuses and the site's own short error
//!   text (at most 200 characters of a JSON error message); bodies and URLs are not echoed.
//! - A site's `Retry-After` is clamped to [`MAX_RETRY_AFTER_SECS`].

use http::HeaderMap;
use serde_json::Value;

use super::decode::DecodeError;
use super::render::RenderError;

/// The most of an error body kept for classification.
pub const ERROR_EXCERPT: usize = 2048;

/// The longest wait a site's `Retry-After` is taken for. A site's value is untrusted input: a
/// day covers real quota resets, and nothing beyond it can overflow a clock.
pub const MAX_RETRY_AFTER_SECS: u64 = 24 * 3600;

/// Which call of a flow failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Preflight(usize),
    /// An upload step (`flow.upload.steps[step]`) sending the prompt's attachment `file`.
    Upload {
        step: usize,
        file: usize,
    },
    Chat,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Call::Preflight(i) => write!(f, "preflight step {}", i + 1),
            Call::Upload { step, file } => {
                write!(f, "upload step {} of file {}", step + 1, file + 1)
            }
            Call::Chat => f.write_str("chat call"),
        }
    }
}

/// How a failure should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The site no longer accepts the session (401/403, a login page, a missing token).
    Auth,
    /// 429 or equivalent.
    RateLimit,
    /// An anti-bot challenge page: direct replay is not welcome, a browser tier may be.
    AntiBot,
    /// The reply does not fit the flow's decoder: the site changed.
    FormatDrift,
    /// Connection failure or timeout.
    Network,
    /// The site failed (5xx) or reported an error in-band.
    Upstream,
    /// The flow itself cannot be rendered.
    Flow,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Auth => "auth",
            FailureKind::RateLimit => "rate_limit",
            FailureKind::AntiBot => "anti_bot",
            FailureKind::FormatDrift => "format_drift",
            FailureKind::Network => "network",
            FailureKind::Upstream => "upstream",
            FailureKind::Flow => "flow",
        }
    }
}

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The chat site, or the network on the way to it.
    Site,
    /// What the API client asked for: the site refused the request as too large.
    Client,
    /// ComputeTower itself: a flow it cannot render, its own browser.
    Inside,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Site => "site",
            Source::Client => "client",
            Source::Inside => "inside",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot build the {call}: {source}")]
    Render { call: Call, source: RenderError },
    #[error("{call} failed: {message}")]
    Network { call: Call, message: String },
    /// The browser running a tier 2 or 3 call failed (crashed, lost its page); the site may
    /// never have seen the call.
    #[error("{call} failed: {message}")]
    Browser { call: Call, message: String },
    #[error("{call}: the site answered HTTP {status}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Status {
        call: Call,
        status: u16,
        kind: FailureKind,
        retry_after: Option<u64>,
        detail: Option<String>,
    },
    #[error("{call}: {message}")]
    Unexpected {
        call: Call,
        kind: FailureKind,
        message: String,
    },
    #[error("the site reported an error: {0}")]
    InBand(String),
    /// The site refused a file the client sent (`at` names the part).
    #[error("the site refused the file at `{at}` (HTTP {status}{})", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    FileRefused {
        at: String,
        status: u16,
        detail: Option<String>,
    },
    #[error("the reply does not fit the flow: {0}")]
    Decode(String),
    #[error("reading the reply failed: {0}")]
    Body(String),
}

impl ReplayError {
    pub fn kind(&self) -> FailureKind {
        match self {
            ReplayError::Render {
                source: RenderError::MissingSession(_),
                ..
            } => FailureKind::Auth,
            ReplayError::Render { .. } => FailureKind::Flow,
            ReplayError::Network { .. } | ReplayError::Browser { .. } | ReplayError::Body(_) => {
                FailureKind::Network
            }
            ReplayError::Status { kind, .. } | ReplayError::Unexpected { kind, .. } => *kind,
            ReplayError::InBand(_) | ReplayError::FileRefused { .. } => FailureKind::Upstream,
            ReplayError::Decode(_) => FailureKind::FormatDrift,
        }
    }

    /// Where the failure came from. A session the site no longer accepts is the site's
    /// answer; a session that lacks a value the flow needs is ours.
    pub fn came_from(&self) -> Source {
        match self {
            ReplayError::FileRefused { .. } => Source::Client,
            ReplayError::Render { .. } | ReplayError::Browser { .. } => Source::Inside,
            ReplayError::Unexpected {
                kind: FailureKind::Flow,
                ..
            } => Source::Inside,
            ReplayError::Status {
                status: 413 | 414 | 431,
                ..
            } => Source::Client,
            // The site refused a file the client sent (its type, its size, its content).
            ReplayError::Status {
                call: Call::Upload { .. },
                status: 400 | 404 | 409 | 415 | 422,
                ..
            } => Source::Client,
            _ => Source::Site,
        }
    }

    /// Whether the same call, sent again the same way, may succeed and cannot do harm: the
    /// site did not act on it (the connection failed, the browser failed, the site answered
    /// 5xx). An answer that refuses the session, the rate or the format will not change by
    /// asking again, and an in-band error means the site did take the message.
    pub fn retry_safe(&self) -> bool {
        match self {
            ReplayError::Network { .. } | ReplayError::Browser { .. } | ReplayError::Body(_) => {
                true
            }
            ReplayError::Status { status, kind, .. } => {
                *kind == FailureKind::Upstream && (500..600).contains(status)
            }
            ReplayError::Unexpected { kind, .. } => *kind == FailureKind::Network,
            ReplayError::Render { .. }
            | ReplayError::InBand(_)
            | ReplayError::Decode(_)
            | ReplayError::FileRefused { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ReplayError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl ReplayError {
    /// An upload step's refusal of a file, as [`ReplayError::FileRefused`] naming the part
    /// (`files` are the attachments the run sent, in order); any other error as it is.
    pub fn naming_file(self, files: &[crate::replay::render::PromptFile]) -> Self {
        if self.came_from() != Source::Client {
            return self;
        }
        match self {
            ReplayError::Status {
                call: Call::Upload { file, .. },
                status,
                ref detail,
                ..
            } if file < files.len() => ReplayError::FileRefused {
                at: files[file].file.at.clone(),
                status,
                detail: detail.clone(),
            },
            other => other,
        }
    }
}

impl From<DecodeError> for ReplayError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Upstream(m) => ReplayError::InBand(m),
            DecodeError::Malformed(m) => ReplayError::Decode(m),
            DecodeError::Body(m) => ReplayError::Body(m),
            DecodeError::Truncated => ReplayError::Body(DecodeError::Truncated.to_string()),
        }
    }
}

/// A non-2xx answer of `call`, classified from its status, headers and the start of its body
/// (at most [`ERROR_EXCERPT`] bytes are read). Every transport of every tier goes through
/// here, so the same answer means the same thing wherever it arrives.
pub fn status_error(call: Call, status: u16, headers: &HeaderMap, body: &[u8]) -> ReplayError {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(ERROR_EXCERPT)]);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let retry_after = header("retry-after").and_then(retry_after_secs);
    let challenge = headers.contains_key("cf-mitigated") || looks_like_challenge(&excerpt);
    // Redirects are not followed: a redirect to a sign-in page means the session is gone.
    // (`fetch()` follows them, so in the page a lost session shows as the login page.)
    let to_login = header("location").is_some_and(redirects_to_login);
    ReplayError::Status {
        call,
        status,
        kind: status_kind(status, challenge, to_login),
        retry_after,
        detail: if to_login && (300..400).contains(&status) {
            Some("redirected to the sign-in page".into())
        } else {
            error_message(&excerpt)
        },
    }
}

/// A 2xx HTML page where the flow expects data: usually the login page after a lost session.
pub fn html_error(call: Call, body: &[u8]) -> ReplayError {
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(ERROR_EXCERPT)]);
    let (kind, message) = classify_html(&excerpt);
    ReplayError::Unexpected {
        call,
        kind,
        message: message.to_owned(),
    }
}

/// Whether a 2xx answer with this content type is a page where the flow expects data.
pub fn is_page_instead_of_data(content_type: &str, expects_data: bool) -> bool {
    expects_data
        && content_type
            .trim()
            .to_ascii_lowercase()
            .starts_with("text/html")
}

fn redirects_to_login(location: &str) -> bool {
    let lower = location.to_ascii_lowercase();
    ["login", "signin", "sign-in", "sign_in", "auth"]
        .iter()
        .any(|word| lower.contains(word))
}

/// A `Retry-After` value (seconds, or an HTTP date) in seconds from now, clamped to
/// [`MAX_RETRY_AFTER_SECS`].
pub fn retry_after_secs(value: &str) -> Option<u64> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        // Digits that overflow u64 still mean "a long time".
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now())
                .map_or(0, |d| d.as_secs())
        }
    };
    Some(secs.min(MAX_RETRY_AFTER_SECS))
}

/// What an HTTP error status means for the gateway.
pub fn status_kind(code: u16, challenge: bool, to_login: bool) -> FailureKind {
    match code {
        _ if challenge && matches!(code, 403 | 429 | 503) => FailureKind::AntiBot,
        401 | 403 | 419 | 440 => FailureKind::Auth,
        300..=399 if to_login => FailureKind::Auth,
        300..=399 => FailureKind::FormatDrift,
        429 => FailureKind::RateLimit,
        500..=599 => FailureKind::Upstream,
        404 | 405 | 400 | 410 | 415 | 422 => FailureKind::FormatDrift,
        _ => FailureKind::Upstream,
    }
}

/// Whether a body is an anti-bot challenge page.
pub fn looks_like_challenge(body: &str) -> bool {
    let lower = body.to_ascii_lowercase();
    [
        "challenge-platform",
        "cf-chl",
        "just a moment...",
        "verify you are human",
        "checking your browser",
        "captcha",
    ]
    .iter()
    .any(|marker| lower.contains(marker))
}

/// What an HTML page where data was expected means, and the message saying so.
pub fn classify_html(body: &str) -> (FailureKind, &'static str) {
    let lower = body.to_ascii_lowercase();
    if looks_like_challenge(body) {
        (
            FailureKind::AntiBot,
            "the site answered with an anti-bot challenge page",
        )
    } else if lower.contains("type=\"password\"") || lower.contains("type=password") {
        (
            FailureKind::Auth,
            "the site answered with its login page: the session is no longer valid",
        )
    } else {
        (
            FailureKind::FormatDrift,
            "the site answered with an HTML page where the flow expects data",
        )
    }
}

/// A short, human message from an error body: a JSON error message, else nothing (HTML pages
/// and long bodies are not worth echoing).
pub fn error_message(body: &str) -> Option<String> {
    let json: Value = serde_json::from_str(body.trim()).ok()?;
    let candidates = [
        "/error/message",
        "/error",
        "/message",
        "/detail",
        "/msg",
        "/error_description",
    ];
    candidates.iter().find_map(|p| {
        json.pointer(p)
            .and_then(Value::as_str)
            .map(|s| s.chars().take(200).collect())
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;
    use FailureKind::*;

    #[test]
    fn statuses_mean_what_the_table_says() {
        // (status, challenge, redirect to login) → kind
        let table = [
            (401, false, false, Auth),
            (403, false, false, Auth),
            (419, false, false, Auth),
            (440, false, false, Auth),
            (403, true, false, AntiBot),
            (429, true, false, AntiBot),
            (503, true, false, AntiBot),
            (401, true, false, Auth),
            (302, false, true, Auth),
            (302, false, false, FormatDrift),
            (429, false, false, RateLimit),
            (500, false, false, Upstream),
            (503, false, false, Upstream),
            (400, false, false, FormatDrift),
            (404, false, false, FormatDrift),
            (405, false, false, FormatDrift),
            (410, false, false, FormatDrift),
            (415, false, false, FormatDrift),
            (422, false, false, FormatDrift),
            (413, false, false, Upstream),
            (418, false, false, Upstream),
        ];
        for (code, challenge, to_login, kind) in table {
            assert_eq!(
                status_kind(code, challenge, to_login),
                kind,
                "{code} challenge={challenge} to_login={to_login}"
            );
        }
    }

    #[test]
    fn challenge_pages_are_recognised_by_their_markers() {
        let table = [
            ("<title>Just a moment...</title>", true),
            ("<div id=\"cf-chl-widget\">", true),
            ("<script src=\"/cdn-cgi/challenge-platform/x.js\">", true),
            ("Please verify you are human", true),
            ("Checking your browser before accessing", true),
            ("<div class=\"g-recaptcha\" data-captcha>", true),
            ("<p>hello</p>", false),
            ("{\"error\":\"slow down\"}", false),
        ];
        for (body, challenge) in table {
            assert_eq!(looks_like_challenge(body), challenge, "{body}");
        }
    }

    #[test]
    fn html_answers_are_classified() {
        let table = [
            ("<form><input type=\"password\"></form>", Auth),
            ("<input type=password name=p>", Auth),
            ("<title>Just a moment...</title>", AntiBot),
            ("<p>hello</p>", FormatDrift),
        ];
        for (body, kind) in table {
            assert_eq!(classify_html(body).0, kind, "{body}");
        }
    }

    #[test]
    fn error_bodies_give_short_messages() {
        let long = format!("{{\"message\":\"{}\"}}", "x".repeat(500));
        let table = [
            (r#"{"error":{"message":"slow down"}}"#, Some("slow down")),
            (r#"{"error":"bad token"}"#, Some("bad token")),
            (r#" {"detail":"nope"} "#, Some("nope")),
            (r#"{"msg":"m"}"#, Some("m")),
            (r#"{"error_description":"d"}"#, Some("d")),
            (r#"{"error":{"code":5}}"#, None),
            ("<html>", None),
            ("", None),
        ];
        for (body, message) in table {
            assert_eq!(error_message(body).as_deref(), message, "{body}");
        }
        assert_eq!(error_message(&long).map(|m| m.len()), Some(200));
    }

    #[test]
    fn retry_after_is_clamped_whatever_the_site_sends() {
        let table = [
            (" 7 ", Some(7)),
            ("0", Some(0)),
            ("18446744073709551615", Some(MAX_RETRY_AFTER_SECS)),
            ("99999999999999999999999", Some(MAX_RETRY_AFTER_SECS)),
            ("Wed, 21 Oct 2015 07:28:00 GMT", Some(0)),
            ("-1", None),
            ("soon", None),
            ("", None),
        ];
        for (value, secs) in table {
            assert_eq!(retry_after_secs(value), secs, "{value:?}");
        }
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let secs = retry_after_secs(&httpdate::fmt_http_date(later)).unwrap();
        assert!((100..=120).contains(&secs), "{secs}");
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn status_errors_read_the_headers_and_body_that_matter() {
        let e = status_error(Call::Chat, 429, &headers(&[("retry-after", "7")]), b"");
        assert_eq!((e.kind(), e.retry_after()), (RateLimit, Some(7)));
        let e = status_error(
            Call::Preflight(1),
            401,
            &HeaderMap::new(),
            br#"{"error":{"message":"no"}}"#,
        );
        assert_eq!(e.kind(), Auth);
        assert_eq!(
            e.to_string(),
            "preflight step 2: the site answered HTTP 401 (no)"
        );
        let e = status_error(
            Call::Chat,
            403,
            &HeaderMap::new(),
            b"<title>Just a moment...</title>",
        );
        assert_eq!(e.kind(), AntiBot);
        let e = status_error(
            Call::Chat,
            403,
            &headers(&[("cf-mitigated", "challenge")]),
            b"",
        );
        assert_eq!(e.kind(), AntiBot);
        let e = status_error(
            Call::Chat,
            302,
            &headers(&[("location", "/auth/login?next=/")]),
            b"",
        );
        assert_eq!(e.kind(), Auth);
        assert!(
            e.to_string().contains("redirected to the sign-in page"),
            "{e}"
        );
        let e = status_error(
            Call::Chat,
            302,
            &headers(&[("location", "/elsewhere")]),
            b"",
        );
        assert_eq!(e.kind(), FormatDrift);
    }

    #[test]
    fn pages_where_data_was_expected_are_errors_of_their_kind() {
        assert!(is_page_instead_of_data("Text/HTML; charset=utf-8", true));
        assert!(!is_page_instead_of_data("text/html", false));
        assert!(!is_page_instead_of_data("text/event-stream", true));
        let e = html_error(Call::Chat, b"<input type=\"password\">");
        assert_eq!(e.kind(), Auth);
    }

    #[test]
    fn errors_say_where_they_came_from_and_whether_a_retry_is_safe() {
        let status = |status, kind| ReplayError::Status {
            call: Call::Chat,
            status,
            kind,
            retry_after: None,
            detail: None,
        };
        let unexpected = |kind| ReplayError::Unexpected {
            call: Call::Chat,
            kind,
            message: String::new(),
        };
        let network = ReplayError::Network {
            call: Call::Chat,
            message: String::new(),
        };
        let browser = ReplayError::Browser {
            call: Call::Chat,
            message: String::new(),
        };
        let render = ReplayError::Render {
            call: Call::Chat,
            source: RenderError::UnknownSource("x".into()),
        };
        let missing = ReplayError::Render {
            call: Call::Chat,
            source: RenderError::MissingSession("cookie".into()),
        };
        // (error, kind, source, retry safe)
        let table = [
            (network, Network, Source::Site, true),
            (browser, Network, Source::Inside, true),
            (
                ReplayError::Body(String::new()),
                Network,
                Source::Site,
                true,
            ),
            (status(500, Upstream), Upstream, Source::Site, true),
            (status(503, Upstream), Upstream, Source::Site, true),
            (status(503, AntiBot), AntiBot, Source::Site, false),
            (status(418, Upstream), Upstream, Source::Site, false),
            (status(413, Upstream), Upstream, Source::Client, false),
            (status(401, Auth), Auth, Source::Site, false),
            (status(429, RateLimit), RateLimit, Source::Site, false),
            (
                ReplayError::InBand(String::new()),
                Upstream,
                Source::Site,
                false,
            ),
            (
                ReplayError::Decode(String::new()),
                FormatDrift,
                Source::Site,
                false,
            ),
            (unexpected(Flow), Flow, Source::Inside, false),
            (unexpected(Auth), Auth, Source::Site, false),
            (unexpected(Network), Network, Source::Site, true),
            (render, Flow, Source::Inside, false),
            (missing, Auth, Source::Inside, false),
        ];
        for (error, kind, source, safe) in table {
            assert_eq!(
                (error.kind(), error.came_from(), error.retry_safe()),
                (kind, source, safe),
                "{error:?}"
            );
        }
    }

    #[test]
    fn decode_errors_become_replay_errors_of_their_kind() {
        let table = [
            (DecodeError::Upstream("x".into()), Upstream),
            (DecodeError::Malformed("x".into()), FormatDrift),
            (DecodeError::Body("x".into()), Network),
            (DecodeError::Truncated, Network),
        ];
        for (decode, kind) in table {
            assert_eq!(ReplayError::from(decode).kind(), kind);
        }
    }
}
