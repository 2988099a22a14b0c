//! The anti-bot interstitial: a Cloudflare-like challenge in front of the API, which the chat
//! page passes and direct replays of a recorded call do not.
//!
//! When it is on ([`DemoConfig::anti_bot`](super::DemoConfig::anti_bot), `demo-site
//! --anti-bot`, or `POST /__demo/anti-bot?on=true` while running), it checks every API call:
//! every request whose path starts with `/api/` or `/backend-api/` (the preflights, the
//! Claude organization lookup, every shape's chat endpoint, the WebSocket upgrade), except
//! `/api/login` (the scripts' login) and `/api/clearance` (the registration below). The rule:
//!
//! **A request passes when it has a valid (unexpired, registered) [`CLEARANCE_COOKIE`] cookie
//! AND (its [`CLEARANCE_HEADER`] header equals that cookie OR it has `sec-fetch-site:
//! same-origin`).** Browsers can add no header to a WebSocket handshake, and Chromium sends no
//! `sec-fetch-site` on it either, so for any request the [`CLEARANCE_QUERY`] query parameter
//! may stand for the header (the chat page puts it on its `/api/ws?…` URL).
//!
//! Every other request gets the challenge, before any other check (as a CDN in front of the
//! site would): HTTP 403, `content-type: text/html`, `cf-mitigated: challenge`, and a page
//! titled "Just a moment..." that loads nothing but names `/cdn-cgi/challenge-platform/…`.
//!
//! How the browser gets through: when the check is on, the chat page carries
//! `<meta name="demo-clearance-ttl" content="SECONDS">`; its script makes up a random token,
//! sets it as the `demo_clearance` cookie with `document.cookie`, registers it with `POST
//! /api/clearance` `{"token": T}` (the cookie must be sent along and equal `T`; the answer is
//! `{"token": T, "expires_in": SECONDS}`), exposes it as `window.__demoClearance`, and adds
//! `x-demo-clearance: T` to each API call (`&clearance=T` to the WebSocket URL). A token is valid for
//! [`DemoConfig::clearance_ttl`](super::DemoConfig::clearance_ttl) (60 s by default) after its
//! registration; the page registers a fresh one after half of that, and on every load.
//! (A page loaded while the check was off registers a token when a call of its own first
//! meets the challenge, then tries the call again.)
//!
//! So a replay of a recorded call made later carries a harvested cookie and a recorded header
//! whose token has expired, and gets the challenge; a `fetch()` made inside the page sends the
//! page's current cookie by itself and `Sec-Fetch-Site: same-origin` (which browsers add and
//! plain HTTP clients do not), and passes without the header. `POST /__demo/expire-clearances`
//! forgets every registered token at once.

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::site::{Shared, api_error, cookie};
use super::state::random_token;

/// The cookie holding the clearance token (set by the chat page's script).
pub const CLEARANCE_COOKIE: &str = "demo_clearance";
/// The header the chat page copies the clearance token into.
pub const CLEARANCE_HEADER: &str = "x-demo-clearance";
/// The query parameter that may carry the clearance token instead of the header (the
/// WebSocket upgrade).
pub const CLEARANCE_QUERY: &str = "clearance";
/// Where the chat page registers its clearance token.
pub const CLEARANCE_PATH: &str = "/api/clearance";

/// Whether the check applies to a request for `path`.
fn guarded(path: &str) -> bool {
    (path.starts_with("/api/") || path.starts_with("/backend-api/"))
        && path != "/api/login"
        && path != CLEARANCE_PATH
}

/// The rule of the module docs: a valid clearance cookie, and the same token in the header
/// (or the query parameter) or `sec-fetch-site: same-origin`.
pub(crate) fn passes(
    state: &super::state::AppState,
    headers: &HeaderMap,
    query: Option<&str>,
) -> bool {
    let Some(token) = cookie(headers, CLEARANCE_COOKIE).filter(|t| !t.is_empty()) else {
        return false;
    };
    if !state.clearance_valid(&token) {
        return false;
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let in_query = || {
        query
            .into_iter()
            .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()))
            .any(|(k, v)| k == CLEARANCE_QUERY && v == token.as_str())
    };
    text(CLEARANCE_HEADER) == Some(token.as_str())
        || in_query()
        || text("sec-fetch-site").is_some_and(|v| v.eq_ignore_ascii_case("same-origin"))
}

/// The middleware in front of every route: the challenge for guarded requests that fail
/// [`passes`] while the check is on.
pub(crate) async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if state.anti_bot()
        && guarded(request.uri().path())
        && !passes(&state, request.headers(), request.uri().query())
    {
        return challenge();
    }
    next.run(request).await
}

/// The interstitial: 403, HTML, `cf-mitigated: challenge`.
pub(crate) fn challenge() -> Response {
    let ray = random_token(8);
    let body = format!(
        r#"<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">
<meta name="robots" content="noindex,nofollow">
<meta name="viewport" content="width=device-width,initial-scale=1"></head>
<body><div class="main-wrapper" role="main"><div class="main-content">
<h1 class="zone-name-title h1">Demo Chat</h1>
<h2 class="h2" id="challenge-body-text">Checking if the site connection is secure</h2>
<noscript><div class="h2">Enable JavaScript and cookies to continue</div></noscript>
</div></div>
<script>window._cf_chl_opt={{cvId:'3',cType:'managed',cRay:'{ray}',cUPMDTk:'/?__cf_chl_tk={ray}',cOgUHash:'',chlApiUrl:'/cdn-cgi/challenge-platform/h/g/orchestrate/chl_page/v1?ray={ray}'}};</script>
</body></html>
"#
    );
    let mut response = (StatusCode::FORBIDDEN, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=UTF-8"),
    );
    headers.insert("cf-mitigated", HeaderValue::from_static("challenge"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=0, no-store, no-cache, must-revalidate"),
    );
    headers.insert(header::SERVER, HeaderValue::from_static("cloudflare"));
    if let Ok(ray) = HeaderValue::from_str(&format!("{ray}-DEMO")) {
        headers.insert("cf-ray", ray);
    }
    response
}

#[derive(Deserialize)]
struct Registration {
    #[serde(default)]
    token: String,
}

/// Whether `token` has the form the page makes: 16 to 128 of `[A-Za-z0-9_-]`.
fn plausible_token(token: &str) -> bool {
    (16..=128).contains(&token.len())
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `POST /api/clearance` `{"token": T}` with the cookie `demo_clearance=T`: registers `T` for
/// the clearance TTL; answers `{"token", "expires_in"}`.
pub(crate) async fn register(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = serde_json::from_slice::<Registration>(&body)
        .map(|r| r.token.trim().to_owned())
        .unwrap_or_default();
    if !plausible_token(&token) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected a JSON body {\"token\"} of 16 to 128 letters, digits, `-` or `_`.",
        );
    }
    if cookie(&headers, CLEARANCE_COOKIE).as_deref() != Some(token.as_str()) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "The `demo_clearance` cookie must hold the token.",
        );
    }
    state.register_clearance(&token);
    axum::Json(json!({
        "token": token,
        "expires_in": state.config.clearance_ttl.as_secs(),
    }))
    .into_response()
}
