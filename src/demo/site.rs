//! Pages, login, the shared API checks, the preflight and the `/__demo/` controls.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::state::{AppState, Session, SessionProblem};
use super::{CSRF_HEADER, DEVICE_COOKIE, SESSION_COOKIE, TOKEN_KEY, chat};

const LANDING_HTML: &str = include_str!("assets/landing.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const LOGGED_IN_HTML: &str = include_str!("assets/logged_in.html");
const CHAT_HTML: &str = include_str!("assets/chat.html");
const CHAT_JS: &str = include_str!("assets/chat.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

pub(crate) type Shared = Arc<AppState>;

pub(crate) fn routes(state: Shared) -> Router {
    let shape = state.config.shape;
    Router::new()
        .route("/", get(landing))
        .route("/login", get(login_page).post(login_form))
        .route("/logout", get(logout))
        .route("/api/login", post(login_json))
        .route("/chat", get(chat_page))
        .route("/static/chat.js", get(chat_js))
        .route("/static/style.css", get(style_css))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(shape.create_conversation_path(), post(create_conversation))
        .route(shape.chat_path(), post(chat::handle))
        .route("/__demo/expire-sessions", post(expire_sessions))
        .route("/__demo/revoke", post(revoke))
        .route(
            "/__demo/stats",
            get(|State(state): State<Shared>| async move { axum::Json(state.streams.snapshot()) }),
        )
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The error body real sites send: `{"error":{"message","code"}}`.
pub(crate) fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "message": message, "code": code } })),
    )
        .into_response()
}

/// A refusal of an API call, turned into [`api_error`]'s response.
pub(crate) struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
}

impl Refusal {
    const fn new(status: StatusCode, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            code,
            message,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        api_error(self.status, self.code, self.message)
    }
}

/// Escapes text for HTML content and attribute values.
pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The value of cookie `name` in the request.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().to_owned())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The session behind the request's cookie, or the 401 the API answers.
fn api_session(state: &AppState, headers: &HeaderMap) -> Result<(String, Session), Refusal> {
    let Some(sid) = cookie(headers, SESSION_COOKIE) else {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "You are not logged in.",
        ));
    };
    match state.session(&sid) {
        Ok(session) => Ok((sid, session)),
        Err(SessionProblem::Missing) => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Your session is not valid. Please log in again.",
        )),
        Err(SessionProblem::Expired) => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Your session has expired. Please log in again.",
        )),
    }
}

/// The checks every API call makes: session cookie (401), bearer token (401), CSRF header
/// (403). Returns the session id and session.
pub(crate) fn authorize(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(String, Session), Refusal> {
    let (sid, session) = api_session(state, headers)?;
    let bearer = header_str(headers, header::AUTHORIZATION.as_str())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if bearer != Some(session.token.as_str()) {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Missing or invalid bearer token.",
        ));
    }
    if header_str(headers, CSRF_HEADER) != Some(session.csrf.as_str()) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "csrf_failed",
            "CSRF token missing or invalid.",
        ));
    }
    Ok((sid, session))
}

fn set_cookies(sid: &str, headers: &HeaderMap) -> AppendHeaders<[(header::HeaderName, String); 2]> {
    let device = cookie(headers, DEVICE_COOKIE)
        .filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    AppendHeaders([
        (
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Lax"),
        ),
        (
            header::SET_COOKIE,
            format!("{DEVICE_COOKIE}={device}; Path=/; Max-Age=31536000; SameSite=Lax"),
        ),
    ])
}

fn no_store() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-store")]
}

// ---------------------------------------------------------------------------------------------
// Pages

async fn landing() -> Html<&'static str> {
    Html(LANDING_HTML)
}

fn render_login(email: &str, error: Option<&str>) -> Html<String> {
    let error_html = error
        .map(|e| {
            format!(
                r#"<p class="error" id="login-error" role="alert">{}</p>"#,
                escape_html(e)
            )
        })
        .unwrap_or_default();
    Html(
        LOGIN_HTML
            .replace("{{ERROR}}", &error_html)
            .replace("{{EMAIL}}", &escape_html(email)),
    )
}

async fn login_page() -> impl IntoResponse {
    (no_store(), render_login("", None))
}

/// Email and password from a form-encoded body.
fn form_fields(body: &[u8]) -> (String, String) {
    let mut email = String::new();
    let mut password = String::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        match k.as_ref() {
            "email" => email = v.into_owned(),
            "password" => password = v.into_owned(),
            _ => {}
        }
    }
    (email.trim().to_owned(), password)
}

const BAD_LOGIN: &str = "Incorrect email or password.";

async fn login_form(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (email, password) = form_fields(&body);
    if email.is_empty() || password != state.config.password {
        return (
            StatusCode::UNAUTHORIZED,
            no_store(),
            render_login(&email, Some(BAD_LOGIN)),
        )
            .into_response();
    }
    let (sid, session) = state.login(&email);
    let token_js = serde_json::to_string(&session.token).unwrap_or_else(|_| "\"\"".into());
    let key_js = serde_json::to_string(TOKEN_KEY).unwrap_or_else(|_| "\"\"".into());
    let page = LOGGED_IN_HTML
        .replace("{{TOKEN_KEY}}", &key_js)
        .replace("{{TOKEN}}", &token_js);
    (set_cookies(&sid, &headers), no_store(), Html(page)).into_response()
}

#[derive(Deserialize)]
struct JsonLogin {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

async fn login_json(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(login) = serde_json::from_slice::<JsonLogin>(&body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected a JSON body {\"email\", \"password\"}.",
        );
    };
    let email = login.email.trim();
    if email.is_empty() || login.password != state.config.password {
        return api_error(StatusCode::UNAUTHORIZED, "invalid_credentials", BAD_LOGIN);
    }
    let (sid, session) = state.login(email);
    (
        set_cookies(&sid, &headers),
        axum::Json(json!({ "token": session.token, "user": { "email": session.email } })),
    )
        .into_response()
}

async fn logout(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(sid) = cookie(&headers, SESSION_COOKIE) {
        state.logout(&sid);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn chat_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let session = cookie(&headers, SESSION_COOKIE).and_then(|sid| state.session(&sid).ok());
    let Some(session) = session else {
        return Redirect::to("/login").into_response();
    };
    let shape = state.config.shape;
    let page = CHAT_HTML
        .replace("{{CSRF}}", &escape_html(&session.csrf))
        .replace("{{SHAPE}}", shape.as_str())
        .replace("{{EMAIL}}", &escape_html(&session.email));
    (no_store(), Html(page)).into_response()
}

async fn chat_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CHAT_JS,
    )
}

async fn style_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
}

// ---------------------------------------------------------------------------------------------
// API

/// The "create conversation" preflight: `{"data":{"id":…}}`.
async fn create_conversation(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let (sid, _) = match authorize(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let id = state.create_conversation(&sid);
    let created_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    axum::Json(json!({
        "success": true,
        "data": { "id": id, "title": "New chat", "created_at": created_at }
    }))
    .into_response()
}

async fn expire_sessions(State(state): State<Shared>) -> Response {
    let n = state.expire_all();
    axum::Json(json!({ "expired": n })).into_response()
}

#[derive(Deserialize)]
struct RevokeQuery {
    email: Option<String>,
}

async fn revoke(State(state): State<Shared>, Query(q): Query<RevokeQuery>) -> Response {
    let Some(email) = q.email.filter(|e| !e.trim().is_empty()) else {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "Missing `email`.");
    };
    let n = state.revoke(email.trim());
    axum::Json(json!({ "revoked": n })).into_response()
}
