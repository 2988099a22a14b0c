//! API keys on `/v1` (any live key) and `/admin` (admin keys).
//!
//! Invariant: requests without a key are accepted only while no live key exists *and* the
//! server listens on a loopback address. Off loopback, a server whose last key was revoked
//! refuses every request (401) until a key is created: the start-up guard alone would leave
//! it open.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::store::Store;
use crate::store::keys::{ApiKey, hash_key};

/// Key lookups cached briefly: a revoked key stops working within this time.
const CACHE_TTL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct KeyCheck {
    store: Store,
    by_hash: moka::future::Cache<String, Option<Arc<ApiKey>>>,
    live_count: moka::future::Cache<(), i64>,
    budgets: Arc<KeyBudgets>,
    /// SHA-256 of this process's own admin token (see [`KeyCheck::allow_local_token`]).
    local: Arc<std::sync::OnceLock<String>>,
}

/// Requests per minute per key (0: unlimited), as token buckets.
#[derive(Debug, Default)]
struct KeyBudgets {
    per_minute: u32,
    buckets: std::sync::Mutex<std::collections::HashMap<String, Bucket>>,
}

/// A token bucket refilled continuously at `per_minute / 60` tokens a second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: tokio::time::Instant,
}

impl KeyCheck {
    pub fn new(store: Store, per_minute: u32) -> Self {
        Self {
            budgets: Arc::new(KeyBudgets {
                per_minute,
                buckets: Default::default(),
            }),
            store,
            by_hash: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(CACHE_TTL)
                .build(),
            live_count: moka::future::Cache::builder()
                .time_to_live(CACHE_TTL)
                .build(),
            local: Arc::default(),
        }
    }

    /// Accepts `token` as an admin key for this process's life: how a CLI on the same data
    /// dir hands a login to a running `serve` (the token is in a 0600 file beside the master
    /// key), and what the CLI's own handoff page is opened with. Set once.
    pub fn allow_local_token(&self, token: &str) {
        let _ = self.local.set(hash_key(token));
    }

    fn is_local_token(&self, presented: &str) -> bool {
        self.local.get().is_some_and(|h| *h == hash_key(presented))
    }

    async fn any_key_exists(&self) -> Result<bool, ApiError> {
        let store = self.store.clone();
        let count = self
            .live_count
            .try_get_with((), async move { store.live_key_count().await })
            .await
            .map_err(|e| ApiError::internal(format!("cannot check API keys: {e}")))?;
        Ok(count > 0)
    }

    async fn lookup(&self, key: &str) -> Result<Option<Arc<ApiKey>>, ApiError> {
        let hash = hash_key(key);
        let store = self.store.clone();
        self.by_hash
            .try_get_with(hash.clone(), async move {
                store.key_by_hash(&hash).await.map(|k| k.map(Arc::new))
            })
            .await
            .map_err(|e| ApiError::internal(format!("cannot check API keys: {e}")))
    }

    pub fn invalidate(&self) {
        self.by_hash.invalidate_all();
        self.live_count.invalidate_all();
    }
}

impl KeyBudgets {
    /// Takes one request from `key`'s budget; `Err(seconds)` until the next one is allowed.
    fn take(&self, key: &str) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.per_minute);
        let rate = capacity / 60.0;
        let now = tokio::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Read what is needed up front: `Request` is not `Sync`, so no reference to it may be
    // held across an await.
    let path = request.uri().path().to_owned();
    if super::admin_ui::is_public(request.method(), &path, request.headers()) {
        return next.run(request).await;
    }
    let presented = presented_key(request.headers());
    match check(&state, &path, presented.as_deref()).await {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// The key a request presents: `Authorization: Bearer <key>` (OpenAI clients) or
/// `x-api-key: <key>` (Anthropic clients).
fn presented_key(headers: &axum::http::HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let x_api_key = || headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer
        .or_else(x_api_key)
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
}

async fn check(state: &AppState, path: &str, presented: Option<&str>) -> Result<(), ApiError> {
    let admin = path.starts_with("/admin");
    if !(admin || path.starts_with("/v1") || path == "/metrics") {
        return Ok(());
    }
    if presented.is_some_and(|p| state.keys.is_local_token(p)) {
        return Ok(());
    }
    if !state.keys.any_key_exists().await? {
        if state.config.bind.ip().is_loopback() {
            return Ok(());
        }
        return Err(ApiError::unauthorized(format!(
            "This server listens on {}, off loopback, and has no live API key (the last one \
             was revoked), so it refuses every request. Create a key with `computetower keys \
             create` on this server's data.",
            state.config.bind
        ))
        .code("no_live_api_key"));
    }
    let Some(presented) = presented else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
        ));
    };
    let Some(key) = state.keys.lookup(presented).await? else {
        return Err(ApiError::unauthorized("Incorrect API key provided."));
    };
    if admin && !key.admin {
        return Err(ApiError::forbidden(
            "This key has no admin scope; create one with `computetower keys create --admin`.",
        ));
    }
    if !admin && let Err(retry_after) = state.keys.budgets.take(&key.id) {
        return Err(ApiError::key_rate_limited(retry_after));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_taken_from_bearer_or_x_api_key() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(presented_key(&headers), None);
        headers.insert("x-api-key", "ct-anthropic".parse().unwrap());
        assert_eq!(presented_key(&headers).as_deref(), Some("ct-anthropic"));
        headers.insert(header::AUTHORIZATION, "Bearer ct-openai".parse().unwrap());
        assert_eq!(presented_key(&headers).as_deref(), Some("ct-openai"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_over_its_budget_waits_for_the_refill() {
        let keys = KeyBudgets {
            per_minute: 2,
            ..Default::default()
        };
        assert!(keys.take("k").is_ok());
        assert!(keys.take("k").is_ok());
        let wait = keys.take("k").unwrap_err();
        assert_eq!(wait, 30);
        assert!(keys.take("other").is_ok());
        tokio::time::advance(std::time::Duration::from_secs(30)).await;
        assert!(keys.take("k").is_ok());
    }
}
