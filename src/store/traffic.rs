//! Recent traffic with its time, for the admin page's live view and charts: execution
//! events newest first, bounded by age and count (both use the primary key or the
//! `created_at` column only, so the queries stay cheap on a long history).

use serde::Serialize;

use super::{Op, Store, StoreError, on_pool};

/// One request as the traffic view shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TrafficRow {
    pub request_id: String,
    pub service: String,
    pub account_id: Option<String>,
    pub tier: Option<i64>,
    pub outcome: String,
    pub status: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub latency_ms: Option<i64>,
    pub queue_ms: Option<i64>,
    pub detail: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
}

impl Store {
    /// Execution events recorded at or after `since` (unix seconds), newest first, at most
    /// `limit`.
    pub async fn traffic_since(
        &self,
        since: i64,
        limit: i64,
    ) -> Result<Vec<TrafficRow>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT request_id, service, account_id, tier, outcome, status, ttft_ms,
                        latency_ms, queue_ms, detail, created_at
                 FROM execution_events WHERE created_at >= $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(since)
            .bind(limit)
            .fetch_all(pool)
            .await?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::events::{EventWriter, ExecutionEvent, Record};
    use crate::store::testing::store;

    #[tokio::test]
    async fn traffic_is_newest_first_with_its_time_and_bounded_by_age() {
        let (_dir, store) = store().await;
        let (writer, _task) = EventWriter::start(store.clone());
        for i in 0..3 {
            writer.record(Record::Execution(ExecutionEvent {
                request_id: format!("r{i}"),
                service: "svc".into(),
                account_id: Some("a_1".into()),
                flow_id: None,
                tier: Some(1),
                outcome: "ok".into(),
                status: Some(200),
                ttft_ms: Some(10 + i),
                latency_ms: Some(20),
                queue_ms: Some(0),
                detail: None,
            }));
        }
        writer.flush().await;
        let now = crate::store::now();
        let rows = store.traffic_since(now - 60, 2).await.unwrap();
        let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r2", "r1"]);
        assert!(rows[0].created_at >= now - 1 && rows[0].created_at <= now + 1);
        assert!(
            store
                .traffic_since(now + 3600, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
