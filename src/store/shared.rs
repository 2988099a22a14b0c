//! What instances sharing the store tell each other (`shared_events`): a rate-limited
//! account, a tier floor raised or lifted, a re-learned flow. Appended by the instance that
//! saw it, read by the others (`crate::shared`).
//!
//! Times are unix ms by the writer's clock, like the leases'.

use super::{Op, Store, StoreError, on_pool};

/// One thing an instance saw that the others should respect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The site rate-limited the account: skip it until then (unix ms).
    Cooldown { account: String, until_ms: i64 },
    /// Start requests on the flow at `tier` (see `tier_floor`).
    FloorRaised { flow: String, tier: u8 },
    /// The flow's floor is gone (a probe or a re-learn worked).
    FloorLifted { flow: String },
    /// The service's active flow changed (a re-learn): read it again.
    FlowChanged { service: String },
}

impl Change {
    fn parts(&self) -> (&'static str, &str, Option<i64>) {
        match self {
            Change::Cooldown { account, until_ms } => ("cooldown", account, Some(*until_ms)),
            Change::FloorRaised { flow, tier } => ("floor_raised", flow, Some(i64::from(*tier))),
            Change::FloorLifted { flow } => ("floor_lifted", flow, None),
            Change::FlowChanged { service } => ("flow_changed", service, None),
        }
    }

    /// A stored row back; `None` for a kind this binary does not know (a newer instance's).
    fn from_parts(kind: &str, subject: String, value: Option<i64>) -> Option<Change> {
        Some(match kind {
            "cooldown" => Change::Cooldown {
                account: subject,
                until_ms: value?,
            },
            "floor_raised" => Change::FloorRaised {
                flow: subject,
                tier: u8::try_from(value?).ok()?,
            },
            "floor_lifted" => Change::FloorLifted { flow: subject },
            "flow_changed" => Change::FlowChanged { service: subject },
            _ => return None,
        })
    }
}

/// A change as another instance recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEvent {
    pub id: i64,
    pub origin: String,
    pub change: Change,
    pub created_at: i64,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    origin: String,
    kind: String,
    subject: String,
    value: Option<i64>,
    created_at: i64,
}

impl Store {
    /// Records `change`, seen by instance `origin` at `now` (unix ms).
    pub async fn publish_change(
        &self,
        origin: &str,
        change: &Change,
        now: i64,
    ) -> Result<(), StoreError> {
        let (kind, subject, value) = change.parts();
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO shared_events (origin, kind, subject, value, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(origin)
            .bind(kind)
            .bind(subject)
            .bind(value)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// The changes other instances than `me` recorded at or after `since` (unix ms), in the
    /// order they were recorded.
    pub async fn changes_since(
        &self,
        since: i64,
        me: &str,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        let rows: Vec<Row> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT id, origin, kind, subject, value, created_at FROM shared_events
                 WHERE created_at >= $1 AND origin <> $2 ORDER BY id",
            )
            .bind(since)
            .bind(me)
            .fetch_all(pool)
            .await?)
        })
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                Some(SharedEvent {
                    change: Change::from_parts(&row.kind, row.subject, row.value)?,
                    id: row.id,
                    origin: row.origin,
                    created_at: row.created_at,
                })
            })
            .collect())
    }

    /// Deletes the changes recorded before `before` (unix ms).
    pub async fn prune_changes(&self, before: i64) -> Result<u64, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query("DELETE FROM shared_events WHERE created_at < $1")
                .bind(before)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    on_both_engines! {
        /// Each instance reads the others' changes, in order, and not its own; old ones are
        /// pruned.
        async fn changes_reach_the_other_instances_in_order(_db, store) {
            let changes = [
                Change::Cooldown { account: "a_1".into(), until_ms: 61_000 },
                Change::FloorRaised { flow: "f_1".into(), tier: 3 },
                Change::FloorLifted { flow: "f_1".into() },
                Change::FlowChanged { service: "svc".into() },
            ];
            for (i, change) in changes.iter().enumerate() {
                store.publish_change("i_a", change, 1_000 + i as i64).await.unwrap();
            }
            store
                .publish_change("i_b", &Change::FlowChanged { service: "mine".into() }, 1_000)
                .await
                .unwrap();
            let seen = store.changes_since(0, "i_b").await.unwrap();
            let read: Vec<Change> = seen.iter().map(|e| e.change.clone()).collect();
            assert_eq!(read, changes);
            assert!(seen.iter().all(|e| e.origin == "i_a"));
            assert!(seen.windows(2).all(|w| w[0].id < w[1].id));
            assert_eq!(store.changes_since(1_002, "i_b").await.unwrap().len(), 2);
            assert_eq!(store.changes_since(0, "i_a").await.unwrap().len(), 1);
            // A kind from a newer binary is skipped, not an error.
            store
                .execute_raw(
                    "INSERT INTO shared_events (origin, kind, subject, value, created_at)
                     VALUES ('i_c', 'from_the_future', 'x', NULL, 2000)",
                )
                .await;
            assert_eq!(store.changes_since(2_000, "i_b").await.unwrap(), []);
            assert_eq!(store.prune_changes(1_002).await.unwrap(), 3);
            assert_eq!(store.changes_since(0, "i_b").await.unwrap().len(), 2);
        }
    }
}
