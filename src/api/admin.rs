//! `/admin`: accounts, sessions, flows and recent events. Never shows a secret: accounts show
//! whether a password is set, sessions show cookie names, flows hold references only (and any
//! literal credential a hand-written flow carries is masked).

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;

use super::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::{parse_json, read_body};
use crate::flow::Flow;
use crate::store::accounts::{AccountUpdate, NewAccount};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/accounts", get(list_accounts).post(add_account))
        .route(
            "/admin/accounts/{id}",
            get(show_account)
                .patch(update_account)
                .delete(remove_account),
        )
        .route("/admin/accounts/{id}/login", post(login_account))
        .route("/admin/accounts/{id}/learn", post(learn_account))
        .route("/admin/flows", get(list_flows).post(import_flow))
        .route("/admin/flows/{id}", get(show_flow).delete(delete_flow))
        .route("/admin/events", get(recent_events))
        .route("/admin/decisions", get(recent_decisions))
        .route("/admin/overview", get(super::admin_view::overview))
        .route("/admin/traffic", get(super::admin_view::traffic))
        .route("/admin/jobs", get(super::admin_view::jobs))
        .route("/admin/stream", get(super::admin_view::stream))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountBody {
    url: Option<String>,
    name: Option<String>,
    email: Option<String>,
    password: Option<String>,
    proxy: Option<String>,
    /// The content of a cookie file (extension JSON, Netscape, storageState).
    cookies: Option<String>,
    enabled: Option<bool>,
}

async fn list_accounts(State(state): State<AppState>) -> Result<Response, ApiError> {
    let accounts = state.gateway.store().accounts().await?;
    Ok(Json(json!({ "object": "list", "data": accounts })).into_response())
}

async fn show_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.gateway.store().account(&id).await?).into_response())
}

async fn add_account(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body: AccountBody =
        parse_json(&read_body(body, &headers, state.config.max_body_bytes).await?)?;
    let url = body
        .url
        .ok_or_else(|| ApiError::bad_request("`url` is required.").param("url"))?;
    // A bad URL (credentials in it, say) is told as such before anything else.
    crate::store::accounts::parse_site_url(&url)?;
    if body.name.is_none()
        && let Some(host) = unnamed_host(&url)
    {
        return Err(ApiError::bad_request(format!(
            "{host} has no name to call the model by: give the account a `name` (the model id \
             clients ask for, such as `local-chat`)."
        ))
        .param("name"));
    }
    let store = state.gateway.store();
    let account = store
        .add_account(NewAccount {
            url,
            service: body.name,
            email: body.email,
            password: body.password,
            proxy: body.proxy,
        })
        .await?;
    if let Some(cookies) = body.cookies
        && let Err(e) = store.import_session(&account, &cookies).await
    {
        // Keep the store as it was: no account without the session it was added with.
        store.remove_account(&account.id).await?;
        return Err(e.into());
    }
    state.gateway.invalidate();
    Ok((StatusCode::CREATED, Json(account)).into_response())
}

async fn update_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body: AccountBody =
        parse_json(&read_body(body, &headers, state.config.max_body_bytes).await?)?;
    let store = state.gateway.store();
    let account = store.account(&id).await?;
    if let Some(cookies) = &body.cookies {
        store.import_session(&account, cookies).await?;
    }
    let account = store
        .update_account(
            &account.id,
            AccountUpdate {
                url: body.url,
                service: body.name,
                email: body.email,
                password: body.password,
                proxy: body.proxy,
                enabled: body.enabled,
            },
        )
        .await?;
    state.gateway.invalidate();
    Ok(Json(account).into_response())
}

async fn remove_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let account = state.gateway.store().remove_account(&id).await?;
    state.gateway.invalidate();
    Ok(Json(json!({ "id": account.id, "deleted": true })).into_response())
}

/// Logs the account in with the browser now. While a captcha waits for a person, the login
/// is listed under `/admin/sessions` (`live`) and a progress line links its handoff page.
/// Asked as `text/event-stream`, it streams the progress lines and then the result.
async fn login_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let account = state.gateway.store().account(&id).await?;
    let lines = state.jobs.subscribe();
    let started = state.jobs.start_login(&state, account)?;
    answer_job(&headers, lines, started).await
}

/// Learns the account's flow now: probe, infer, verify, store (the previous version is kept).
/// Asked as `text/event-stream`, it streams the progress lines and then the result.
async fn learn_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LearnQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let account = state.gateway.store().account(&id).await?;
    let lines = state.jobs.subscribe();
    let started = state.jobs.start_learn(&state, account, query.explain)?;
    answer_job(&headers, lines, started).await
}

#[derive(Debug, Deserialize)]
struct LearnQuery {
    /// Also say why each recorded call was or was not taken.
    #[serde(default)]
    explain: bool,
}

/// The job's result as JSON once it ends, or (for `Accept: text/event-stream`) its lines as
/// `progress` events, then a `result` or `error` event.
async fn answer_job(
    headers: &HeaderMap,
    lines: tokio::sync::broadcast::Receiver<super::jobs::JobLine>,
    started: super::jobs::Started,
) -> Result<Response, ApiError> {
    let streamed = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if streamed {
        return Ok(super::admin_view::job_events(lines, started).into_response());
    }
    drop(lines);
    let result = started
        .result
        .await
        .map_err(|_| ApiError::internal("The job ended without a result."))?;
    Ok(Json(result?).into_response())
}

/// The host of an IP-address or `localhost` URL: nothing readable to name a model after.
pub(crate) fn unnamed_host(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url.trim()).ok()?;
    let named = matches!(parsed.host(), Some(url::Host::Domain(d)) if d != "localhost");
    (!named).then(|| match parsed.port() {
        Some(port) => format!("{}:{port}", parsed.host_str().unwrap_or_default()),
        None => parsed.host_str().unwrap_or_default().to_owned(),
    })
}

#[derive(Debug, Deserialize)]
struct FlowQuery {
    #[serde(default)]
    all: bool,
    service: Option<String>,
}

async fn list_flows(
    State(state): State<AppState>,
    Query(query): Query<FlowQuery>,
) -> Result<Response, ApiError> {
    let flows: Vec<_> = state
        .gateway
        .store()
        .flows(query.all)
        .await?
        .into_iter()
        .filter(|stored| {
            query
                .service
                .as_ref()
                .is_none_or(|s| *s == stored.flow.service)
        })
        .map(|stored| shown_flow(&state, stored))
        .collect();
    Ok(Json(json!({ "object": "list", "data": flows })).into_response())
}

async fn show_flow(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = state.gateway.store().flow(&id).await?;
    Ok(Json(shown_flow(&state, stored)).into_response())
}

/// A stored flow as listings show it: redacted, with its tier floor (when one is raised) and
/// what learning found (when this server learned it).
fn shown_flow(state: &AppState, mut stored: crate::store::flows::StoredFlow) -> serde_json::Value {
    stored.flow = stored.flow.redacted();
    let floor = state.gateway.tier_floor(&stored.flow.id);
    let findings = state.jobs.findings(&stored.flow.id);
    let mut shown = serde_json::to_value(&stored).unwrap_or_default();
    shown["tier_floor"] = json!(floor);
    shown["findings"] = json!(findings);
    shown
}

async fn import_flow(
    State(state): State<AppState>,
    Query(query): Query<FlowQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("The flow is not UTF-8 text."))?;
    let mut flow = Flow::from_json(text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(service) = query.service {
        flow.service = service;
    }
    let allowed = state.config.allowed_origins(&flow.service).to_vec();
    let flow = state.gateway.store().import_flow(flow, &allowed).await?;
    state.gateway.invalidate();
    Ok((StatusCode::CREATED, Json(flow.redacted())).into_response())
}

async fn delete_flow(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = state.gateway.store().delete_flow(&id).await?;
    state.gateway.invalidate();
    Ok(Json(json!({ "id": stored.flow.id, "deleted": true })).into_response())
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<i64>,
}

async fn recent_events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    // Records are written in batches: show the ones already handed to the writer.
    state.gateway.events().flush().await;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let events = state.gateway.store().recent_events(limit).await?;
    Ok(Json(json!({ "object": "list", "data": events })).into_response())
}

async fn recent_decisions(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    // Records are written in batches: show the ones already handed to the writer.
    state.gateway.events().flush().await;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let decisions = state.gateway.store().recent_decisions(limit).await?;
    Ok(Json(json!({ "object": "list", "data": decisions })).into_response())
}
