//! `/admin/sessions`: stored sessions (names only, never values) and live browser sessions,
//! with the handoff a person uses to solve a captcha: a live screenshot and endpoints that
//! forward a click, typed text or a key press into the page.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;

use super::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::{parse_json, read_body};
use crate::browser::{BrowserPool, LoginError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/sessions", get(list))
        .route("/admin/sessions/{id}", get(show).delete(close))
        .route("/admin/sessions/{id}/screenshot", get(screenshot))
        .route("/admin/sessions/{id}/click", post(click))
        .route("/admin/sessions/{id}/type", post(type_text))
        .route("/admin/sessions/{id}/key", post(press_key))
}

fn pool(state: &AppState) -> Result<&BrowserPool, ApiError> {
    state
        .gateway
        .renewer()
        .map(|r| r.pool())
        .ok_or_else(|| ApiError::not_found("The browser is not enabled on this server."))
}

fn live_error(e: LoginError) -> ApiError {
    match e {
        LoginError::NoSuchLiveSession(id) => {
            ApiError::not_found(format!("No live browser session `{id}`."))
        }
        other => ApiError::internal(other.to_string()),
    }
}

async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let stored = state.gateway.store().sessions().await?;
    let live: Vec<_> = match pool(&state) {
        Ok(pool) => pool
            .live_sessions()
            .await
            .into_iter()
            .map(|s| {
                state.jobs.remember_live(&s.id, &s.account_id, s.since);
                json!({
                    "id": s.id, "account_id": s.account_id, "url": s.url,
                    "state": s.state, "since": s.since,
                })
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    Ok(Json(json!({ "object": "list", "data": stored, "live": live })).into_response())
}

/// A live session id as the pool makes them; anything else is no session (and never reaches
/// the page's markup).
fn is_live_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `GET /admin/sessions/{id}` for a browser: the handoff page, which holds no data (it reads
/// the session with the admin key it asks for), so it needs no key itself.
pub fn is_handoff_page(path: &str, headers: &HeaderMap) -> bool {
    path.strip_prefix("/admin/sessions/")
        .is_some_and(|id| is_live_id(id) && super::admin_ui::wants_html(headers))
}

/// JSON for programs; for a browser (`Accept: text/html`), the handoff page: the live
/// screenshot, where a click on the picture is forwarded to the site's page. A session that
/// ended answers `state: ended` and whether its login stored a session (`logged_in`).
async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !is_live_id(&id) {
        return Err(ApiError::not_found(format!(
            "No live browser session `{id}`."
        )));
    }
    if super::admin_ui::wants_html(&headers) {
        return Ok(super::admin_ui::page(HANDOFF_PAGE.replace("{{id}}", &id)));
    }
    let live = pool(&state)?
        .live_sessions()
        .await
        .into_iter()
        .find(|s| s.id == id);
    if let Some(live) = live {
        state
            .jobs
            .remember_live(&live.id, &live.account_id, live.since);
        return Ok(Json(json!({
            "id": live.id, "account_id": live.account_id, "url": live.url,
            "state": live.state, "since": live.since,
            "screenshot": format!("/admin/sessions/{}/screenshot", live.id),
        }))
        .into_response());
    }
    let (account_id, since) = state
        .jobs
        .live_seen(&id)
        .ok_or_else(|| ApiError::not_found(format!("No live browser session `{id}`.")))?;
    // The login stored a session after this one started: it worked.
    let logged_in = state
        .gateway
        .store()
        .latest_session(&account_id)
        .await?
        .is_some_and(|s| s.authenticated && s.created_at >= since);
    Ok(Json(json!({
        "id": id, "account_id": account_id, "state": "ended", "since": since,
        "logged_in": logged_in,
    }))
    .into_response())
}

async fn screenshot(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let png = pool(&state)?.screenshot(&id).await.map_err(live_error)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Click {
    x: f64,
    y: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Text {
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Key {
    key: String,
}

async fn click(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let click: Click = parse_json(&read_body(body, &headers, 4096).await?)?;
    if !(click.x.is_finite() && click.y.is_finite() && click.x >= 0.0 && click.y >= 0.0) {
        return Err(ApiError::bad_request(
            "`x` and `y` must be non-negative numbers.",
        ));
    }
    pool(&state)?
        .click(&id, click.x, click.y)
        .await
        .map_err(live_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn type_text(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let text: Text = parse_json(&read_body(body, &headers, 64 * 1024).await?)?;
    pool(&state)?
        .type_text(&id, &text.text)
        .await
        .map_err(live_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn press_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key: Key = parse_json(&read_body(body, &headers, 4096).await?)?;
    pool(&state)?
        .press_key(&id, &key.key)
        .await
        .map_err(live_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn close(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    pool(&state)?.close_live(&id).await.map_err(live_error)?;
    Ok(Json(json!({ "id": id, "closed": true })).into_response())
}

/// The handoff page: the screenshot refreshes every second; clicks and keys are forwarded;
/// once the login ends, the page says how. Its script asks for the admin key when the server
/// wants one (or takes it from the admin page's tab, or `#key=…`).
const HANDOFF_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Live session · ComputeTower</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/admin/ui/admin.css"></head>
<body class="handoff" data-session="{{id}}">
<header class="top"><a class="brand" href="/admin#sessions">ComputeTower</a><span class="muted">live browser session {{id}}</span></header>
<main>
<section id="handoff-live">
<p>The site wants a person. Click on the picture to click in the page; type below to type into the focused field.</p>
<p id="handoff-state" class="muted">connecting…</p>
<img id="shot" alt="live screenshot of the site's page">
<form id="typing" class="row"><input id="text" autocomplete="off" placeholder="text to type">
<button type="submit">Type</button> <button type="button" id="enter">Press Enter</button>
<button type="button" id="tab">Press Tab</button></form>
</section>
<section id="handoff-done" hidden><h1 id="done-title"></h1><p id="done-text"></p>
<p><a href="/admin#accounts">Back to the admin page</a></p></section>
<dialog id="key-dialog"><form method="dialog" id="key-form"><h2>Admin key</h2>
<p>This server needs an admin key (<code>computetower keys create --admin</code>).</p>
<input id="key-input" type="password" autocomplete="off" placeholder="ct-…">
<button type="submit">Continue</button></form></dialog>
</main>
<script src="/admin/ui/handoff.js"></script>
</body></html>
"#;
