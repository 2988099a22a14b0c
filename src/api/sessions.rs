//! `/admin/sessions`: stored sessions (names only, never values) and live browser sessions,
//! with the handoff a person uses to solve a captcha: a live screenshot and endpoints that
//! forward a click, typed text or a key press into the page.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;

use super::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::openai::{parse_json, read_body};
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

/// JSON for programs; for a browser (`Accept: text/html`), a page showing the live screenshot
/// where a click on the picture is forwarded to the site's page.
async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let live = pool(&state)?
        .live_sessions()
        .await
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| ApiError::not_found(format!("No live browser session `{id}`.")))?;
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html {
        return Ok(Html(HANDOFF_PAGE.replace("{{id}}", &live.id)).into_response());
    }
    Ok(Json(json!({
        "id": live.id, "account_id": live.account_id, "url": live.url,
        "state": live.state, "since": live.since,
        "screenshot": format!("/admin/sessions/{}/screenshot", live.id),
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

/// The handoff page: the screenshot refreshes every second; clicks and keys are forwarded.
/// An admin key, when needed, is taken from `#key=…` in the URL (never sent to the server
/// except as the Authorization header).
const HANDOFF_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Live session {{id}}</title>
<style>body{font:14px system-ui;margin:16px}img{border:1px solid #888;cursor:crosshair}</style></head>
<body><h1>Live browser session {{id}}</h1>
<p>Click on the picture to click in the page. Type below to type into the focused field.</p>
<img id="shot" alt="live screenshot"><p>
<input id="text" placeholder="text to type"> <button id="send">Type</button>
<button id="enter">Press Enter</button> <span id="status"></span></p>
<script>
const id = "{{id}}";
const key = new URLSearchParams(location.hash.slice(1)).get("key");
const auth = key ? { authorization: "Bearer " + key } : {};
const shot = document.getElementById("shot");
const status = document.getElementById("status");
async function refresh() {
  const r = await fetch(`/admin/sessions/${id}/screenshot`, { headers: auth });
  if (!r.ok) { status.textContent = "session ended"; return; }
  shot.src = URL.createObjectURL(await r.blob());
  setTimeout(refresh, 1000);
}
async function post(path, body) {
  await fetch(`/admin/sessions/${id}/${path}`, { method: "POST",
    headers: { ...auth, "content-type": "application/json" }, body: JSON.stringify(body) });
}
shot.addEventListener("click", (e) => {
  const scale = shot.naturalWidth / shot.clientWidth;
  post("click", { x: e.offsetX * scale, y: e.offsetY * scale });
});
document.getElementById("send").onclick = () => post("type", { text: document.getElementById("text").value });
document.getElementById("enter").onclick = () => post("key", { key: "Enter" });
refresh();
</script></body></html>
"#;
