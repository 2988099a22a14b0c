//! Pages, login, the shared API checks, the preflight and the `/__demo/` controls.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{AppendHeaders, Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;

use super::state::{AppState, Challenge, ClickOutcome, Session, SessionProblem};
use super::{
    CAPTCHA_BOX, CSRF_HEADER, DEVICE_COOKIE, LoginPattern, SESSION_COOKIE, Shape, TOKEN_KEY,
    antibot, chat, shapes, uploads, ws,
};

const LANDING_HTML: &str = include_str!("assets/landing.html");
const INFO_HTML: &str = include_str!("assets/info.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const LOGIN_EMAIL_HTML: &str = include_str!("assets/login_email.html");
const LOGIN_PASSWORD_HTML: &str = include_str!("assets/login_password.html");
const CHALLENGE_HTML: &str = include_str!("assets/challenge.html");
const CHALLENGE_JS: &str = include_str!("assets/challenge.js");
const LOGGED_IN_HTML: &str = include_str!("assets/logged_in.html");
const CHAT_HTML: &str = include_str!("assets/chat.html");
const CHAT_JS: &str = include_str!("assets/chat.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
/// The composer's attach control: a button opening a hidden file input, as real sites have.
const ATTACH_HTML: &str = "<button id=\"attach-button\" type=\"button\" class=\"ghost\" \
     aria-label=\"Attach files\">Attach</button>\n    \
     <input type=\"file\" id=\"attach\" name=\"attach\" accept=\"image/*,text/plain\" multiple \
     style=\"display:none\">\n    ";
/// Where the page shows a chip per attached file.
const ATTACHMENTS_HTML: &str =
    "<div id=\"attachments\" class=\"attachments\" aria-live=\"polite\"></div>\n  ";

pub(crate) type Shared = Arc<AppState>;

pub(crate) fn routes(state: Shared) -> Router {
    let router = Router::new()
        .route("/", get(root))
        .route("/signup", get(signup))
        .route("/blog", get(blog))
        .route("/login", get(login_page).post(login_form))
        .route("/login/email", post(login_email))
        .route(
            "/login/challenge",
            get(challenge_page).post(challenge_click),
        )
        .route("/logout", get(logout))
        .route("/api/login", post(login_json))
        .route(antibot::CLEARANCE_PATH, post(antibot::register))
        .route("/chat", get(chat_page).post(chat_page_submitted))
        .route("/static/chat.js", get(chat_js))
        .route("/static/challenge.js", get(challenge_js))
        .route("/static/style.css", get(style_css))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }));
    // Every shape's preflight and chat routes exist, so that `/__demo/shape` can switch the
    // shape while running; only the current shape's answer, the others 404 like unknown paths.
    let mut router = router
        .route(
            "/api/organizations",
            get(|state: State<Shared>, headers: HeaderMap| async move {
                if state.shape() != Shape::Claude {
                    return StatusCode::NOT_FOUND.into_response();
                }
                organizations(state, headers).await
            }),
        )
        .route(
            Shape::Claude.create_conversation_path(),
            post(
                |state: State<Shared>, org: Path<String>, headers: HeaderMap, body: Bytes| async move {
                    if state.shape() != Shape::Claude {
                        return StatusCode::NOT_FOUND.into_response();
                    }
                    create_claude_conversation(state, org, headers, body).await
                },
            ),
        );
    let mut preflights: Vec<&'static str> = Vec::new();
    for shape in Shape::ALL {
        let path = shape.create_conversation_path();
        let generic = !matches!(shape, Shape::Claude | Shape::Newchat);
        if generic && !shape.creates_on_first_chat() && !preflights.contains(&path) {
            preflights.push(path);
            router = router.route(
                path,
                post(move |state: State<Shared>, headers: HeaderMap| async move {
                    let now = state.shape();
                    if now.create_conversation_path() != path || now.creates_on_first_chat() {
                        return StatusCode::NOT_FOUND.into_response();
                    }
                    create_conversation(state, headers).await
                }),
            );
        }
        if shape == Shape::Newchat {
            // The create call that carries the first message.
            router = router.route(path, post(shapes::new_chat));
        }
        router = match shape {
            Shape::Claude => router.route(shape.chat_path(), post(chat::handle_claude)),
            Shape::Think => router.route(shape.chat_path(), post(chat::handle_think)),
            Shape::Ws => router.route(shape.chat_path(), get(ws::upgrade)),
            _ => router.route(
                shape.chat_path(),
                post(
                    move |state: State<Shared>,
                          headers: HeaderMap,
                          query: RawQuery,
                          body: Bytes| {
                        chat::handle(shape, state, headers, query, body)
                    },
                ),
            ),
        };
    }
    router
        .route("/api/v1/auths/", get(shapes::auths))
        // The attach control's calls: 404 unless `DemoConfig::uploads` names their shape.
        .route("/api/files", post(uploads::post_file))
        .route("/api/uploads", post(uploads::create_upload))
        .route("/api/uploads/{upload_id}/confirm", post(uploads::confirm))
        .route("/blob/{token}", put(uploads::put_blob))
        .route("/__demo/expire-sessions", post(expire_sessions))
        .route(
            "/__demo/rotate-csrf",
            post(|State(state): State<Shared>| async move {
                axum::Json(json!({ "rotated": state.rotate_csrf() }))
            }),
        )
        .route("/__demo/revoke", post(revoke))
        .route("/__demo/captcha", get(latest_captcha))
        .route("/__demo/rate-limit", post(rate_limit))
        .route("/__demo/anti-bot", get(anti_bot).post(set_anti_bot))
        .route("/__demo/garbage", post(set_garbage))
        .route("/__demo/truncate", post(set_truncate))
        .route("/__demo/expire-clearances", post(expire_clearances))
        .route("/__demo/shape", get(current_shape).post(set_shape))
        .route(
            "/__demo/conversations",
            get(|State(state): State<Shared>| async move { axum::Json(state.conversations()) }),
        )
        .route(
            "/__demo/stats",
            get(
                |State(state): State<Shared>, Query(query): Query<StatsQuery>| async move {
                    if let Some(ms) = query.wait_idle_ms {
                        state
                            .streams
                            .wait_idle(std::time::Duration::from_millis(ms.min(60_000)))
                            .await;
                    }
                    axum::Json(state.streams.snapshot())
                },
            ),
        )
        .route(
            "/__demo/reset-stats",
            post(|State(state): State<Shared>| async move {
                state.streams.reset();
                axum::Json(state.streams.snapshot())
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            antibot::guard,
        ))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The error body real sites send: `{"error":{"message","code"}}`.
/// `GET /__demo/stats?wait_idle_ms=N`: answer once no reply streams (or after N ms).
#[derive(serde::Deserialize)]
struct StatsQuery {
    wait_idle_ms: Option<u64>,
}

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
    pub(crate) const fn new(status: StatusCode, code: &'static str, message: &'static str) -> Self {
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
pub(crate) fn api_session(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(String, Session), Refusal> {
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

/// `GET /`: where a visitor starts, per [`LoginPattern`].
async fn root(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let logged_in = cookie(&headers, SESSION_COOKIE).is_some_and(|sid| state.session(&sid).is_ok());
    match state.config.login {
        LoginPattern::Landing => (no_store(), Html(LANDING_HTML)).into_response(),
        LoginPattern::Open => Redirect::to("/chat").into_response(),
        LoginPattern::Direct | LoginPattern::TwoStep | LoginPattern::Captcha => {
            Redirect::to(if logged_in { "/chat" } else { "/login" }).into_response()
        }
    }
}

fn info_page(title: &str, text: &str) -> Html<String> {
    Html(
        INFO_HTML
            .replace("{{TITLE}}", &escape_html(title))
            .replace("{{TEXT}}", &escape_html(text)),
    )
}

async fn signup() -> Html<String> {
    info_page(
        "Sign-ups are closed",
        "Demo Chat is invite-only for now. Please check back later.",
    )
}

async fn blog() -> Html<String> {
    info_page("Blog", "No posts yet. Stay tuned!")
}

fn error_html(error: Option<&str>) -> String {
    error
        .map(|e| {
            format!(
                r#"<p class="error" id="login-error" role="alert">{}</p>"#,
                escape_html(e)
            )
        })
        .unwrap_or_default()
}

/// The one-page form (email and password).
fn render_login(email: &str, error: Option<&str>) -> Html<String> {
    Html(
        LOGIN_HTML
            .replace("{{ERROR}}", &error_html(error))
            .replace("{{EMAIL}}", &escape_html(email)),
    )
}

/// The two-step pattern's first step (email only).
fn render_email_step(email: &str, error: Option<&str>) -> Html<String> {
    Html(
        LOGIN_EMAIL_HTML
            .replace("{{ERROR}}", &error_html(error))
            .replace("{{EMAIL}}", &escape_html(email)),
    )
}

/// The two-step pattern's second step (email read-only, password).
fn render_password_step(email: &str, error: Option<&str>) -> Html<String> {
    Html(
        LOGIN_PASSWORD_HTML
            .replace("{{ERROR}}", &error_html(error))
            .replace("{{EMAIL}}", &escape_html(email)),
    )
}

async fn login_page(State(state): State<Shared>) -> Response {
    let page = match state.config.login {
        LoginPattern::TwoStep => render_email_step("", None),
        _ => render_login("", None),
    };
    (no_store(), page).into_response()
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
const BAD_EMAIL: &str = "Enter a valid email address.";

/// Whether `email` looks like one (something@something).
fn plausible_email(email: &str) -> bool {
    email
        .split_once('@')
        .is_some_and(|(user, domain)| !user.is_empty() && !domain.is_empty())
        && !email.chars().any(char::is_whitespace)
}

/// `POST /login/email`: the two-step pattern's first step; answers the password step.
async fn login_email(body: Bytes) -> Response {
    let (email, _) = form_fields(&body);
    if !plausible_email(&email) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            no_store(),
            render_email_step(&email, Some(BAD_EMAIL)),
        )
            .into_response();
    }
    (no_store(), render_password_step(&email, None)).into_response()
}

/// The page a successful login answers: it stores the bearer token and goes to `/chat`.
fn logged_in(state: &AppState, email: &str, headers: &HeaderMap) -> Response {
    let (sid, session) = state.login(email);
    let token_js = serde_json::to_string(&session.token).unwrap_or_else(|_| "\"\"".into());
    let key_js = serde_json::to_string(TOKEN_KEY).unwrap_or_else(|_| "\"\"".into());
    // The think shape's token is written by its chat page only, when it loads.
    let store = if state.shape() == Shape::Think {
        String::new()
    } else {
        format!("localStorage.setItem({key_js}, {token_js});")
    };
    let page = LOGGED_IN_HTML.replace("{{STORE_TOKEN}}", &store);
    (set_cookies(&sid, headers), no_store(), Html(page)).into_response()
}

async fn login_form(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let (email, password) = form_fields(&body);
    if email.is_empty() || password != state.config.password {
        let page = match state.config.login {
            LoginPattern::TwoStep if !email.is_empty() => {
                render_password_step(&email, Some(BAD_LOGIN))
            }
            LoginPattern::TwoStep => render_email_step(&email, Some(BAD_LOGIN)),
            _ => render_login(&email, Some(BAD_LOGIN)),
        };
        return (StatusCode::UNAUTHORIZED, no_store(), page).into_response();
    }
    if state.config.login == LoginPattern::Captcha {
        let (id, challenge) = state.new_challenge(&email);
        return (no_store(), render_challenge(&id, &challenge)).into_response();
    }
    logged_in(&state, &email, &headers)
}

// ---------------------------------------------------------------------------------------------
// Captcha

/// JSON for an inline `<script type="application/json">`: `<` escaped so that no `</script>`
/// can end it early.
fn script_json(value: &serde_json::Value) -> String {
    value.to_string().replace('<', "\\u003c")
}

/// The challenge page: the box absolutely positioned at [`CAPTCHA_BOX`]'s place.
fn render_challenge(id: &str, challenge: &Challenge) -> Html<String> {
    let r = CAPTCHA_BOX.target_radius;
    let mut shapes: Vec<serde_json::Value> = challenge
        .decoys
        .iter()
        .map(|&(x, y, color)| json!({ "x": x, "y": y, "r": r, "color": color }))
        .collect();
    let (x, y) = challenge.target;
    let at = (x as usize + y as usize) % (shapes.len() + 1);
    shapes.insert(at, json!({ "x": x, "y": y, "r": r, "color": "#12b76a" }));
    let data = json!({ "id": id, "token_key": TOKEN_KEY, "shapes": shapes });
    let b = CAPTCHA_BOX;
    Html(
        CHALLENGE_HTML
            .replace("{{LEFT}}", &b.left.to_string())
            .replace("{{TOP}}", &b.top.to_string())
            .replace("{{WIDTH}}", &b.width.to_string())
            .replace("{{HEIGHT}}", &b.height.to_string())
            .replace("{{BELOW}}", &(b.top + b.height + 16).to_string())
            .replace("{{DATA}}", &script_json(&data)),
    )
}

#[derive(Deserialize)]
struct ChallengeQuery {
    id: Option<String>,
}

/// `GET /login/challenge?id=…`: the challenge page again (a reload); `/login` once it is gone.
async fn challenge_page(State(state): State<Shared>, Query(q): Query<ChallengeQuery>) -> Response {
    let id = q.id.unwrap_or_default();
    match state.challenge(&id) {
        Some(challenge) => (no_store(), render_challenge(&id, &challenge)).into_response(),
        None => Redirect::to("/login").into_response(),
    }
}

#[derive(Deserialize)]
struct Click {
    id: String,
    x: f64,
    y: f64,
}

/// A click from a JSON body `{"id","x","y"}`, or the same fields form-encoded.
fn parse_click(headers: &HeaderMap, body: &[u8]) -> Option<Click> {
    let json_body = header_str(headers, header::CONTENT_TYPE.as_str())
        .is_none_or(|ct| ct.to_ascii_lowercase().contains("json"));
    if json_body {
        return serde_json::from_slice(body).ok();
    }
    let (mut id, mut x, mut y) = (None, None, None);
    for (k, v) in url::form_urlencoded::parse(body) {
        match k.as_ref() {
            "id" => id = Some(v.into_owned()),
            "x" => x = v.trim().parse::<f64>().ok(),
            "y" => y = v.trim().parse::<f64>().ok(),
            _ => {}
        }
    }
    Some(Click {
        id: id?,
        x: x?,
        y: y?,
    })
}

/// `POST /login/challenge`: a click in box coordinates. On target, logs in like `POST
/// /api/login` (cookies, `{"token", "redirect"}`); elsewhere, "Try again".
async fn challenge_click(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(click) = parse_click(&headers, &body) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected {\"id\", \"x\", \"y\"}.",
        );
    };
    match state.click(&click.id, click.x, click.y) {
        ClickOutcome::Passed { email } => {
            let (sid, session) = state.login(&email);
            (
                set_cookies(&sid, &headers),
                no_store(),
                axum::Json(json!({
                    "token": session.token,
                    "redirect": "/chat",
                    "user": { "email": session.email },
                })),
            )
                .into_response()
        }
        ClickOutcome::Missed => api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "challenge_failed",
            "Try again",
        ),
        ClickOutcome::Unknown => api_error(
            StatusCode::GONE,
            "challenge_expired",
            "This challenge has expired. Please log in again.",
        ),
    }
}

/// `GET /__demo/captcha[?id=…]`: where a person would click to pass the latest pending
/// challenge (or challenge `id`): the target's centre in page coordinates (CSS pixels from
/// the top-left of the viewport at scroll 0), plus the box and the target radius.
async fn latest_captcha(State(state): State<Shared>, Query(q): Query<ChallengeQuery>) -> Response {
    let found = match q.id {
        Some(id) => state.challenge(&id).map(|c| (id, c)),
        None => state.latest_challenge(),
    };
    let Some((id, challenge)) = found else {
        return api_error(StatusCode::NOT_FOUND, "not_found", "No pending challenge.");
    };
    let b = CAPTCHA_BOX;
    let (x, y) = challenge.target;
    axum::Json(json!({
        "id": id,
        "x": b.left + x,
        "y": b.top + y,
        "box": { "left": b.left, "top": b.top, "width": b.width, "height": b.height },
        "radius": b.target_radius,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct JsonLogin {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

/// `POST /api/login`: the scripts' login. Like many real sites' API logins it skips what the
/// browser pages put in front, the captcha challenge included.
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
    let next = match state.config.login {
        LoginPattern::Open | LoginPattern::Landing => "/",
        _ => "/login",
    };
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
        )],
        Redirect::to(next),
    )
        .into_response()
}

async fn chat_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let session = cookie(&headers, SESSION_COOKIE).and_then(|sid| state.session(&sid).ok());
    let (session, new_sid) = match session {
        Some(session) => (session, None),
        // The open pattern: a visitor without a (live) session gets an anonymous one.
        None if state.config.login == LoginPattern::Open => {
            let (sid, session) = state.login_anonymous();
            (session, Some(sid))
        }
        None => return Redirect::to("/login").into_response(),
    };
    state.streams.page();
    let shape = state.shape();
    let (user, logout, bootstrap) = if session.anonymous {
        let data = json!({ "token": session.token, "user": { "anonymous": true } });
        let script = format!(
            r#"<script id="session-bootstrap" type="application/json">{}</script>"#,
            script_json(&data)
        );
        ("Guest".to_owned(), "Start over", script)
    } else {
        (escape_html(&session.email), "Log out", String::new())
    };
    let signs = shape == Shape::Signed || state.config.signed;
    let bootstrap = if signs {
        bootstrap + &signing_script(&session.sign_key)
    } else {
        bootstrap
    };
    let mut metas = anti_bot_meta(&state);
    if state.config.signed {
        metas.push_str("<meta name=\"demo-signed\" content=\"1\">\n");
    }
    if let Some(suffix) = &state.config.render_suffix {
        metas.push_str(&format!(
            "<meta name=\"demo-render-suffix\" content=\"{}\">\n",
            escape_html(suffix)
        ));
    }
    // Only the shapes whose chat call carries the files show the attach control.
    let uploads = state
        .config
        .uploads
        .filter(|_| matches!(shape, Shape::Openai | Shape::Signed));
    let (attach, attachments) = match uploads {
        Some(uploads) => {
            metas.push_str(&format!(
                "<meta name=\"demo-uploads\" content=\"{uploads}\">\n"
            ));
            (ATTACH_HTML, ATTACHMENTS_HTML)
        }
        None => ("", ""),
    };
    let page = CHAT_HTML
        .replace("{{ATTACHMENTS}}", attachments)
        .replace("{{ATTACH}}", attach)
        .replace("{{CSRF}}", &escape_html(&session.csrf))
        .replace("{{SHAPE}}", shape.as_str())
        .replace("{{EMAIL}}", &user)
        .replace("{{LOGOUT}}", logout)
        .replace("{{ANTI_BOT}}", &metas)
        .replace("{{BOOTSTRAP}}", &bootstrap);
    match new_sid {
        Some(sid) => (set_cookies(&sid, &headers), no_store(), Html(page)).into_response(),
        None => (no_store(), Html(page)).into_response(),
    }
}

/// `POST /chat`: the composer form submitted natively (the fragile shape's page before its
/// script took over). Like a server that has no use for it, the site shows the chat page
/// again (Post/Redirect/Get): the typed message is gone.
async fn chat_page_submitted() -> Response {
    Redirect::to("/chat").into_response()
}

/// `<meta name="demo-clearance-ttl">` when the anti-bot check is on: it tells the page's
/// script to obtain clearance (see [`antibot`]) and how long a token lasts.
fn anti_bot_meta(state: &AppState) -> String {
    if !state.anti_bot() {
        return String::new();
    }
    format!(
        "<meta name=\"demo-clearance-ttl\" content=\"{}\">\n",
        state.config.clearance_ttl.as_secs()
    )
}

/// The signed shape's inline script: the session's signing key cut in four pieces, each
/// reversed, stored out of order, and reassembled by `window.__demoRt()` — the way a real
/// site would bury it in a bundle, so that it is in none of cookies, storage or meta tags.
fn signing_script(key: &str) -> String {
    // Position of each piece of the key in the stored list.
    const ORDER: [usize; 4] = [2, 0, 3, 1];
    let chars: Vec<char> = key.chars().collect();
    let size = chars.len().div_ceil(4).max(1);
    let pieces: Vec<String> = chars
        .chunks(size)
        .map(|c| c.iter().rev().collect())
        .collect();
    let mut stored = vec![String::new(); ORDER.len()];
    let mut order = Vec::new();
    for (i, piece) in pieces.into_iter().enumerate() {
        let at = ORDER.get(i).copied().unwrap_or(i);
        if at >= stored.len() {
            stored.resize(at + 1, String::new());
        }
        stored[at] = piece;
        order.push(at);
    }
    let stored = serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into());
    let order = serde_json::to_string(&order).unwrap_or_else(|_| "[]".into());
    format!(
        "<script>(function(w){{var p={stored},o={order};\
         w.__demoRt=function(){{return o.map(function(i){{\
         return p[i].split(\"\").reverse().join(\"\")}}).join(\"\")}}}})(window);</script>\n"
    )
}

/// The token an anonymous chat page hands its script (`<script id="session-bootstrap">`).
pub(crate) fn bootstrap_token(html: &str) -> Option<String> {
    const START: &str = r#"<script id="session-bootstrap" type="application/json">"#;
    let rest = &html[html.find(START)? + START.len()..];
    let json = &rest[..rest.find("</script>")?];
    let data: serde_json::Value = serde_json::from_str(json).ok()?;
    data.get("token")?.as_str().map(str::to_owned)
}

async fn chat_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CHAT_JS,
    )
}

async fn challenge_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CHALLENGE_JS,
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
    let (sid, session) = match authorize(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let id = state.create_conversation(&sid, &session.email);
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

/// The Claude shape's `GET /api/organizations`: the session's one organization.
async fn organizations(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let (_, session) = match authorize(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    axum::Json(json!([{
        "id": 1,
        "uuid": session.org,
        "name": "Personal",
        "settings": { "claude_console_privacy": "default_private" },
        "capabilities": ["chat"],
        "rate_limit_tier": "default_claude_ai",
        "created_at": iso_now(),
    }]))
    .into_response()
}

#[derive(Deserialize)]
struct NewClaudeConversation {
    uuid: String,
    #[serde(default)]
    name: String,
}

/// The Claude shape's `POST /api/organizations/{org}/chat_conversations` with
/// `{"uuid": <client uuid>, "name": ""}`. The server picks the conversation's id (unlike the
/// real site, which keeps the client's), so a client must read it from the answer's `uuid`.
async fn create_claude_conversation(
    State(state): State<Shared>,
    Path(org): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (sid, session) = match authorize(&state, &headers) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    if org != session.org {
        return api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Organization not found.",
        );
    }
    let request = match serde_json::from_slice::<NewClaudeConversation>(&body) {
        Ok(request) if !request.uuid.trim().is_empty() => request,
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "Expected a JSON body {\"uuid\", \"name\"}.",
            );
        }
    };
    let id = state.create_conversation(&sid, &session.email);
    let now = iso_now();
    axum::Json(json!({
        "uuid": id,
        "name": request.name,
        "summary": "",
        "model": null,
        "created_at": now,
        "updated_at": now,
        "settings": { "preview_feature_uses_artifacts": true },
        "is_starred": false,
        "current_leaf_message_uuid": null,
    }))
    .into_response()
}

/// Now as `YYYY-MM-DDTHH:MM:SS.000000Z` (UTC), the way real APIs date records.
fn iso_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rest = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000000Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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

#[derive(Deserialize)]
struct RateLimitQuery {
    email: Option<String>,
    seconds: Option<u64>,
    retry_after: Option<String>,
}

/// `POST /__demo/rate-limit?email=E&seconds=S[&retry_after=TEXT]`: every chat call of account
/// `E` gets 429 for the next `S` seconds (`Retry-After` = the seconds left, or `TEXT` as is);
/// `seconds=0` lifts it.
async fn rate_limit(State(state): State<Shared>, Query(q): Query<RateLimitQuery>) -> Response {
    let Some(email) = q.email.filter(|e| !e.trim().is_empty()) else {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "Missing `email`.");
    };
    let Some(seconds) = q.seconds else {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "Missing `seconds`.");
    };
    state.block(&email, seconds, q.retry_after);
    axum::Json(json!({ "email": email.trim(), "seconds": seconds })).into_response()
}

#[derive(Deserialize)]
struct GarbageQuery {
    count: Option<usize>,
}

/// `POST /__demo/garbage?count=N`: the next `N` chat calls answer 200 with an HTML page
/// instead of the shape's reply (a site that answers garbage, then recovers).
async fn set_garbage(State(state): State<Shared>, Query(q): Query<GarbageQuery>) -> Response {
    let count = q.count.unwrap_or(1);
    state.set_garbage(count);
    axum::Json(json!({ "garbage": count })).into_response()
}

/// `POST /__demo/truncate?count=N`: the next `N` replies stop after a few pieces, without
/// their end marker (a site that drops the connection mid-reply).
async fn set_truncate(State(state): State<Shared>, Query(q): Query<GarbageQuery>) -> Response {
    let count = q.count.unwrap_or(1);
    state.set_truncate(count);
    axum::Json(json!({ "truncate": count })).into_response()
}

#[derive(Deserialize)]
struct AntiBotQuery {
    on: Option<bool>,
}

async fn anti_bot(State(state): State<Shared>) -> Response {
    axum::Json(json!({ "anti_bot": state.anti_bot() })).into_response()
}

/// `POST /__demo/anti-bot?on=true|false`: turns the anti-bot check on or off.
async fn set_anti_bot(State(state): State<Shared>, Query(q): Query<AntiBotQuery>) -> Response {
    let Some(on) = q.on else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Expected `on=true` or `on=false`.",
        );
    };
    state.set_anti_bot(on);
    axum::Json(json!({ "anti_bot": on })).into_response()
}

/// `POST /__demo/expire-clearances`: forgets every anti-bot clearance token.
async fn expire_clearances(State(state): State<Shared>) -> Response {
    let n = state.expire_clearances();
    axum::Json(json!({ "expired": n })).into_response()
}

#[derive(Deserialize)]
struct ShapeQuery {
    to: Option<String>,
}

async fn current_shape(State(state): State<Shared>) -> Response {
    axum::Json(json!({ "shape": state.shape().as_str() })).into_response()
}

/// `POST /__demo/shape?to=SHAPE`: serves `SHAPE` from now on (its chat and preflight
/// routes; the chat page loaded next speaks it). Answers `{"shape", "previous"}`.
async fn set_shape(State(state): State<Shared>, Query(q): Query<ShapeQuery>) -> Response {
    let Some(to) = q.to else {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", "Missing `to`.");
    };
    let shape = match to.parse::<Shape>() {
        Ok(shape) => shape,
        Err(e) => return api_error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    let previous = state.set_shape(shape);
    axum::Json(json!({ "shape": shape.as_str(), "previous": previous.as_str() })).into_response()
}
