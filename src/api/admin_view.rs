//! What the admin page reads: one overview of accounts and services, recent traffic with
//! per-minute figures, job lines, and one server-sent event stream of requests, fallback
//! decisions and job progress as they happen.
//!
//! Invariant: nothing here holds a secret. Accounts are the store's redacted view, sessions
//! are named by id and state, events carry outcomes and timings, job lines name steps.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::AppState;
use super::error::ApiError;
use super::extract::Query;
use super::jobs::{JobLine, JobState, Started};
use crate::store::events::Observed;

/// Requests the overview reads to find each account's last error.
const LAST_ERRORS_WINDOW: i64 = 1000;
/// Most rows a traffic query reads.
const TRAFFIC_ROWS: i64 = 20_000;

/// `GET /admin/overview`: accounts with their session, load and last error; services with
/// whether they can serve and why not; the notices an operator should act on.
pub async fn overview(State(state): State<AppState>) -> Result<Response, ApiError> {
    let store = state.gateway.store();
    let now = crate::store::now();
    let accounts = store.accounts().await?;
    let sessions = store.sessions().await?;
    let loads = state.gateway.account_loads();
    let running = state.jobs.running();
    state.gateway.events().flush().await;
    let recent = store.traffic_since(0, LAST_ERRORS_WINDOW).await?;
    // Which instance does each account's browser work now (several may share the store).
    let instance = state
        .gateway
        .renewer()
        .map(|r| r.leases().instance().to_owned());
    let now_ms = crate::lease::system_clock()();
    let leases = store.leases(now_ms).await?;
    let limits = &state.config.limits;
    let mut notices = Vec::new();
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    let mut shown = Vec::new();
    for account in &accounts {
        let session = sessions.iter().rev().find(|s| s.account_id == account.id);
        let session_state = match session {
            None => "none",
            Some(s) if !s.authenticated => "rejected",
            Some(s) if s.expires_at.is_some_and(|e| e <= now) => "expired",
            Some(_) => "ok",
        };
        let load = loads.iter().find(|l| l.account_id == account.id);
        let lease = leases.iter().find(|l| l.account_id == account.id).map(|l| {
            json!({
                "instance": l.owner,
                "this_instance": instance.as_deref() == Some(l.owner.as_str()),
                "expires_in_ms": l.expires_at - now_ms,
            })
        });
        let last_error = recent
            .iter()
            .find(|r| r.account_id.as_deref() == Some(&account.id) && r.outcome != "ok")
            .map(|r| json!({ "outcome": r.outcome, "detail": r.detail, "at": r.created_at }));
        let queued = load.is_some_and(|l| l.waiting > 0 || l.queued_total > 0);
        let advice = queued.then(|| {
            crate::account_pool::waiting_advice(&account.id, limits.per_account_concurrency)
        });
        if let Some(advice) = &advice {
            notices.push(advice.clone());
        }
        let flow = store.active_flow(&account.service).await?;
        let entry = services.entry(account.service.clone()).or_insert_with(|| {
            json!({
                "name": account.service,
                "accounts": 0,
                "enabled_accounts": 0,
                "flow": flow.as_ref().map(|f| json!({ "id": f.id, "version": f.version })),
            })
        });
        entry["accounts"] = json!(entry["accounts"].as_u64().unwrap_or(0) + 1);
        if account.enabled {
            entry["enabled_accounts"] = json!(entry["enabled_accounts"].as_u64().unwrap_or(0) + 1);
        }
        shown.push(json!({
            "account": account,
            "session": session.map(|s| json!({
                "id": s.id, "state": session_state, "source": s.source,
                "created_at": s.created_at, "expires_at": s.expires_at,
                "cookies": s.cookies.len(),
            })),
            "session_state": session_state,
            "load": load,
            "lease": lease,
            "last_error": last_error,
            "has_flow": flow.is_some(),
            "job": running.get(&account.id),
            "notice": advice,
        }));
    }
    let services: Vec<Value> = services
        .into_values()
        .map(|mut s| {
            let why_not = if s["flow"].is_null() {
                Some(format!(
                    "no flow yet: learn it (`computetower learn {}`) or import one",
                    s["name"].as_str().unwrap_or_default()
                ))
            } else if s["enabled_accounts"] == 0 {
                Some("every account is disabled".to_owned())
            } else {
                None
            };
            s["serving"] = json!(why_not.is_none());
            s["why_not"] = json!(why_not);
            s
        })
        .collect();
    if accounts.is_empty() {
        notices.push(
            "No account yet: add one (a site's URL with a login, or a cookie file), then learn it."
                .to_owned(),
        );
    }
    let failure = state.gateway.events().write_failure();
    Ok(Json(json!({
        "server": {
            "version": env!("CARGO_PKG_VERSION"),
            "instance": instance,
            "browser": state.gateway.renewer().is_some(),
            "tiers": if state.gateway.renewer().is_some() { json!([1, 2, 3]) } else { json!([1]) },
            "limits": {
                "per_account_concurrency": limits.per_account_concurrency,
                "per_account_queue": limits.per_account_queue,
            },
            "store": { "state": if failure.is_some() { "failing" } else { "ok" }, "error": failure },
        },
        "accounts": shown,
        "services": services,
        "notices": notices,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
pub struct TrafficQuery {
    minutes: Option<i64>,
    limit: Option<i64>,
}

/// `GET /admin/traffic[?minutes=60&limit=200]`: the latest requests and decisions, and per
/// service and minute the request count and the p50/p95 time to first token.
pub async fn traffic(
    State(state): State<AppState>,
    Query(query): Query<TrafficQuery>,
) -> Result<Response, ApiError> {
    let minutes = query.minutes.unwrap_or(60).clamp(1, 24 * 60);
    let limit = query.limit.unwrap_or(200).clamp(1, 1000) as usize;
    state.gateway.events().flush().await;
    let store = state.gateway.store();
    let since = crate::store::now() - minutes * 60;
    let rows = store.traffic_since(since, TRAFFIC_ROWS).await?;
    let decisions = store.recent_decisions(100).await?;
    let series = per_minute(
        rows.iter()
            .map(|r| (r.service.as_str(), r.created_at, r.ttft_ms)),
    );
    Ok(Json(json!({
        "since": since,
        "minutes": minutes,
        "recent": rows.iter().take(limit).collect::<Vec<_>>(),
        "decisions": decisions,
        "series": series,
    }))
    .into_response())
}

/// Per service, per minute (unix minute): requests, and p50/p95 of the time to first token
/// of those that got one.
fn per_minute<'a>(rows: impl Iterator<Item = (&'a str, i64, Option<i64>)>) -> Value {
    let mut buckets: BTreeMap<&str, BTreeMap<i64, (u64, Vec<i64>)>> = BTreeMap::new();
    for (service, at, ttft) in rows {
        let bucket = buckets
            .entry(service)
            .or_default()
            .entry(at.div_euclid(60))
            .or_default();
        bucket.0 += 1;
        if let Some(ttft) = ttft {
            bucket.1.push(ttft);
        }
    }
    let series: BTreeMap<&str, Vec<Value>> = buckets
        .into_iter()
        .map(|(service, minutes)| {
            let points = minutes
                .into_iter()
                .map(|(minute, (count, mut ttfts))| {
                    ttfts.sort_unstable();
                    json!({
                        "minute": minute,
                        "requests": count,
                        "p50_ttft_ms": percentile(&ttfts, 50),
                        "p95_ttft_ms": percentile(&ttfts, 95),
                    })
                })
                .collect();
            (service, points)
        })
        .collect();
    json!(series)
}

/// The nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// `GET /admin/jobs`: the latest job lines and the jobs running now.
pub async fn jobs(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "lines": state.jobs.recent(), "running": state.jobs.running() }))
}

/// `GET /admin/stream`: server-sent events `request` (an execution event, as soon as it is
/// recorded), `decision` (a fallback decision) and `job` (a progress line), after a `hello`.
pub async fn stream(State(state): State<AppState>) -> impl IntoResponse {
    let traffic = broadcast_stream(state.gateway.events().subscribe()).filter_map(|o| async move {
        let event = match o {
            Observed::Execution { at_ms, event } => {
                let mut data = serde_json::to_value(&event).unwrap_or_default();
                data["at_ms"] = json!(at_ms);
                Event::default().event("request").json_data(data)
            }
            Observed::Decision(d) => Event::default().event("decision").json_data(d),
        };
        event.ok()
    });
    let lines = broadcast_stream(state.jobs.subscribe())
        .filter_map(|line| async move { Event::default().event("job").json_data(line).ok() });
    let hello = futures_util::stream::once(async {
        Event::default()
            .event("hello")
            .json_data(json!({ "at_ms": now_ms() }))
            .ok()
    })
    .filter_map(|e| async move { e });
    let events = hello
        .chain(futures_util::stream::select(traffic, lines))
        .map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The items of a broadcast channel; a watcher that fell behind skips what it missed.
fn broadcast_stream<T: Clone + Send + 'static>(
    rx: broadcast::Receiver<T>,
) -> impl Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(item) => return Some((item, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// One job's lines as `progress` events, then its `result` (or `error`, in the API's error
/// shape), then the end of the stream.
pub fn job_events(lines: broadcast::Receiver<JobLine>, started: Started) -> impl IntoResponse {
    let Started { job, result } = started;
    // Ends right after the job's last line, without waiting for another line to come.
    let progress = futures_util::stream::unfold(Some(lines), move |rx| {
        let job = job.clone();
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(line) if line.job == job => {
                        let last = line.state != JobState::Running;
                        return Some((line, (!last).then_some(rx)));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    })
    .filter_map(|line| async move { Event::default().event("progress").json_data(line).ok() });
    let end = futures_util::stream::once(async move {
        let event = match result.await {
            Ok(Ok(body)) => Event::default().event("result").json_data(body),
            Ok(Err(error)) => Event::default().event("error").json_data(error.body()),
            Err(_) => Event::default()
                .event("error")
                .json_data(ApiError::internal("The job ended without a result.").body()),
        };
        event.ok()
    })
    .filter_map(|e| async move { e });
    Sse::new(progress.chain(end).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 95), Some(7));
        let values: Vec<i64> = (1..=20).collect();
        assert_eq!(percentile(&values, 50), Some(10));
        assert_eq!(percentile(&values, 95), Some(19));
    }

    #[test]
    fn traffic_is_counted_per_service_and_minute() {
        let rows = [
            ("a", 120, Some(10)),
            ("a", 130, Some(30)),
            ("a", 130, None),
            ("a", 200, Some(5)),
            ("b", 61, Some(1)),
        ];
        let series = per_minute(rows.into_iter());
        assert_eq!(series["a"][0]["minute"], 2);
        assert_eq!(series["a"][0]["requests"], 3);
        assert_eq!(series["a"][0]["p50_ttft_ms"], 10);
        assert_eq!(series["a"][0]["p95_ttft_ms"], 30);
        assert_eq!(series["a"][1]["minute"], 3);
        assert_eq!(series["b"][0]["requests"], 1);
    }
}
