//! The HTTP surface: the OpenAI API under `/v1`, administration under `/admin`, `/health`.
//!
//! Three front doors share one internal request and reply stream ([`crate::chat`]): OpenAI
//! chat completions (`openai.rs`), the OpenAI Responses API (`responses.rs`) and the Anthropic
//! Messages API (`anthropic.rs`); `front.rs` holds what they share.
//!
//! Every cross-cutting behaviour is in [`router`]'s one layer stack: panics become a 500 in
//! the OpenAI error shape, credentials are marked sensitive before tracing sees them, errors
//! on Anthropic's paths take Anthropic's shape, API keys are checked, and unknown paths get a
//! JSON 404.

pub mod admin;
pub mod admin_ui;
pub mod admin_view;
pub mod anthropic;
pub mod auth;
pub mod error;
pub mod extract;
pub mod front;
pub mod jobs;
pub mod media;
pub mod openai;
pub mod responses;
pub mod sessions;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::gateway::Gateway;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub gateway: Arc<Gateway>,
    /// Learns flows with the browser (`POST /admin/accounts/{id}/learn`).
    pub learner: Option<Arc<crate::learn::Learner>>,
    pub keys: auth::KeyCheck,
    /// Learn and login jobs with their progress lines.
    pub jobs: Arc<jobs::Jobs>,
}

pub fn router(state: AppState) -> Router {
    let cors = cors(&state.config);
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .merge(admin::routes())
        .merge(admin_ui::routes())
        .merge(sessions::routes());
    let router = layered(routes, state);
    // Outermost, so a browser's preflight (which carries no key) is answered.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// What a CLI serves on loopback while its own login waits for a person: the captcha handoff
/// (`/admin/sessions…`) and the page assets, behind the same layers as the full API.
pub fn handoff_router(state: AppState) -> Router {
    let routes = Router::new()
        .merge(admin_ui::routes())
        .merge(sessions::routes());
    layered(routes, state)
}

/// `routes` behind the one layer stack every route has.
fn layered(routes: Router<AppState>, state: AppState) -> Router {
    let layers = ServiceBuilder::new()
        .layer(middleware::from_fn(error::anthropic_shape))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("The server failed while handling this request.").into_response()
        }))
        .layer(SetSensitiveHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
            header::SET_COOKIE,
            header::HeaderName::from_static("x-api-key"),
        ]))
        .layer(TraceLayer::new_for_http())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(layers)
        .with_state(state)
}

/// CORS for browser front ends, from `[api] cors_origins` (none by default). `*` is honoured
/// on a loopback bind only (`Config::check` refuses it elsewhere; this is the second guard).
fn cors(config: &Config) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    let origins = &config.api.cors_origins;
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        if !config.bind.ip().is_loopback() {
            tracing::error!("`api.cors_origins = [\"*\"]` is ignored off loopback");
            return None;
        }
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| header::HeaderValue::from_str(o.trim()).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
            ])
            // SDKs in a browser send their own headers (x-stainless-*, anthropic-version).
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                header::HeaderName::from_static(extract::TIER_HEADER),
                header::RETRY_AFTER,
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Liveness, the tiers this server can run (2 and 3 need the browser), and whether the store
/// writes.
async fn health(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<serde_json::Value> {
    let tiers: &[u8] = match state.gateway.renewer() {
        Some(_) => &[1, 2, 3],
        None => &[1],
    };
    let failure = state.gateway.events().write_failure();
    let engine = state.gateway.store().engine().as_str();
    let store = match &failure {
        None => serde_json::json!({ "engine": engine, "state": "ok" }),
        Some(error) => {
            serde_json::json!({ "engine": engine, "state": "failing", "error": error })
        }
    };
    // Degraded, not down: tier 1 serves from memory while the store cannot write.
    let status = if failure.is_some() { "degraded" } else { "ok" };
    axum::Json(serde_json::json!({ "status": status, "tiers": tiers, "store": store }))
}

/// Prometheus text (see `telemetry`): requests, time to first token and fallback decisions
/// per service and tier, per-account load, queues and cooldowns, and dropped event records.
async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    crate::telemetry::install();
    for load in state.gateway.account_loads() {
        let account = load.account_id.clone();
        let gauge = |name: &'static str, value: f64| {
            metrics::gauge!(name, "account" => account.clone()).set(value);
        };
        gauge("computetower_account_active", load.active as f64);
        gauge("computetower_account_waiting", load.waiting as f64);
        gauge(
            "computetower_account_cooling_down",
            f64::from(u8::from(load.cooling_down_secs.is_some())),
        );
        gauge("computetower_account_health", load.health);
        metrics::counter!("computetower_account_served_total", "account" => account.clone())
            .absolute(load.served);
        metrics::counter!("computetower_account_queued_total", "account" => account.clone())
            .absolute(load.queued_total);
    }
    metrics::counter!("computetower_events_dropped_total")
        .absolute(state.gateway.events().dropped());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::not_found("Unknown path.").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_response()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::store::accounts::NewAccount;

    async fn json_of(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// A server without a browser offers tier 1 alone, and a forced browser tier is refused
    /// with a reason instead of being tried.
    #[tokio::test]
    async fn without_a_browser_only_tier_1_is_offered() {
        let (_dir, store) = crate::store::testing::store().await;
        store
            .add_account(NewAccount {
                url: "http://127.0.0.1:9/".into(),
                service: Some("site".into()),
                email: None,
                password: None,
                proxy: None,
            })
            .await
            .unwrap();
        let mut flow =
            crate::flow::Flow::from_json(include_str!("../../flows/demo-openai.json")).unwrap();
        flow.service = "site".into();
        store.save_flow(flow).await.unwrap();
        let (events, _writer) = crate::store::events::EventWriter::start(store.clone());
        let config = Config::default();
        let gateway = Gateway::new(
            store.clone(),
            crate::server::replayer(&config),
            events,
            None,
            None,
            crate::account_pool::Limits {
                per_account: 1,
                queue: 1,
                cooldown: Duration::from_secs(1),
            },
        );
        let app = router(AppState {
            config: Arc::new(config),
            gateway: Arc::new(gateway),
            learner: None,
            keys: auth::KeyCheck::new(store, 0),
            jobs: Arc::new(jobs::Jobs::new()),
        });
        let health = app
            .clone()
            .oneshot(Request::get("/health").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(json_of(health).await["tiers"], serde_json::json!([1]));
        let chat = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header(extract::TIER_HEADER, "2")
            .body(Body::from(
                r#"{"model":"site","messages":[{"role":"user","content":"hi"}]}"#,
            ))
            .unwrap();
        let response = app.oneshot(chat).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = json_of(response).await;
        assert_eq!(body["error"]["code"], "needs_browser", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("tier 2"),
            "{body}"
        );
    }
}
