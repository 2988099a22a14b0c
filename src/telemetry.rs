//! Prometheus metrics through the `metrics` facade: one recorder per process, rendered by
//! `GET /metrics`.
//!
//! What is recorded, and where:
//! - `computetower_requests_total{service,tier,outcome}`: every reply's end (`gateway`);
//! - `computetower_ttft_seconds{service,tier}`: time to the site's first token (`gateway`);
//! - `computetower_decisions_total{service,failure,action}`: every fallback decision;
//! - `computetower_attempt_failures_total{service,tier,kind}`: every failed try of a tier;
//! - `computetower_account_*{account}` and `computetower_events_dropped_total`: set from the
//!   account pool and the event writer when `/metrics` is read.
//!
//! Labels are low-cardinality by construction: services, tiers, failure kinds and actions are
//! few; request ids and messages never become labels.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Time-to-first-token buckets, in seconds: tier 1 answers in milliseconds, tier 3 in a
/// second or more.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls reuse it) and returns its handle.
/// `None` when another recorder was installed first (an embedding program's).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), TTFT_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text of everything recorded so far.
pub fn render() -> String {
    install().map(PrometheusHandle::render).unwrap_or_default()
}

/// A reply ended (`outcome`: `ok`, `cancelled`, or a failure kind).
pub fn reply_ended(service: &str, tier: u8, outcome: &str) {
    metrics::counter!(
        "computetower_requests_total",
        "service" => service.to_owned(),
        "tier" => tier.to_string(),
        "outcome" => outcome.to_owned()
    )
    .increment(1);
}

/// One try of a tier failed before the first token (the request may still be served).
pub fn attempt_failed(service: &str, tier: u8, kind: &str) {
    metrics::counter!(
        "computetower_attempt_failures_total",
        "service" => service.to_owned(),
        "tier" => tier.to_string(),
        "kind" => kind.to_owned()
    )
    .increment(1);
}

/// The site's first token arrived `seconds` after the request did.
pub fn first_token(service: &str, tier: u8, seconds: f64) {
    metrics::histogram!(
        "computetower_ttft_seconds",
        "service" => service.to_owned(),
        "tier" => tier.to_string()
    )
    .record(seconds);
}

/// A fallback decision was taken.
pub fn decision(service: &str, failure: &str, action: &str) {
    metrics::counter!(
        "computetower_decisions_total",
        "service" => service.to_owned(),
        "failure" => failure.to_owned(),
        "action" => action.to_owned()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_replies_and_first_tokens_show_in_the_text() {
        install();
        decision("svc-telemetry", "rate_limit", "next_account");
        reply_ended("svc-telemetry", 1, "ok");
        first_token("svc-telemetry", 1, 0.012);
        let text = render();
        assert!(
            text.contains(
                "computetower_decisions_total{service=\"svc-telemetry\",failure=\"rate_limit\",action=\"next_account\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "computetower_requests_total{service=\"svc-telemetry\",tier=\"1\",outcome=\"ok\"} 1"
        ));
        assert!(text.contains("computetower_ttft_seconds_bucket{service=\"svc-telemetry\",tier=\"1\",le=\"0.025\"} 1"), "{text}");
    }
}
