//! Per-account slots held in the store (`account_slots`), so that an account's concurrency
//! limit holds across instances. Times are unix ms from the caller, as for leases.
//!
//! Invariants:
//! - At most `limit` unexpired rows per account: each is one of the numbered slots below the
//!   limit, and a slot is taken in one statement that inserts it or updates it only when
//!   expired.
//! - A release deletes only the caller's own hold (`holder`), never a slot that expired and
//!   was taken by someone else meanwhile.

use std::time::Duration;

use super::{Op, Store, StoreError, on_pool};

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes a free (or expired) slot of `account_id` below `limit` for `holder` of instance
    /// `owner`, until `now + ttl`; the slot's number, or `None` when all are held.
    pub async fn take_slot(
        &self,
        account_id: &str,
        limit: usize,
        owner: &str,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let held: Vec<i64> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(
                "SELECT slot FROM account_slots WHERE account_id = $1 AND expires_at > $2",
            )
            .bind(account_id)
            .bind(now)
            .fetch_all(pool)
            .await?)
        })
        .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let expires_at = now.saturating_add(ms(ttl));
        // Another instance may take a slot between the read and the write: then that write
        // changes nothing and the next free one is tried.
        for slot in (0..limit).filter(|s| !held.contains(s)) {
            let taken = on_pool!(self, Op::Write, |pool| {
                let done = sqlx::query(
                    "INSERT INTO account_slots (account_id, slot, owner, holder, expires_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (account_id, slot) DO UPDATE SET
                         owner = excluded.owner,
                         holder = excluded.holder,
                         expires_at = excluded.expires_at
                     WHERE account_slots.expires_at <= $6",
                )
                .bind(account_id)
                .bind(slot)
                .bind(owner)
                .bind(holder)
                .bind(expires_at)
                .bind(now)
                .execute(pool)
                .await?;
                Ok(done.rows_affected() == 1)
            })
            .await?;
            if taken {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }

    /// Extends every slot instance `owner` holds to `now + ttl`; how many it holds.
    pub async fn renew_slots(
        &self,
        owner: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        let expires_at = now.saturating_add(ms(ttl));
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query("UPDATE account_slots SET expires_at = $1 WHERE owner = $2")
                .bind(expires_at)
                .bind(owner)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// Frees `holder`'s slot, if it still has it.
    pub async fn release_slot(
        &self,
        account_id: &str,
        slot: i64,
        holder: &str,
    ) -> Result<bool, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query(
                "DELETE FROM account_slots WHERE account_id = $1 AND slot = $2 AND holder = $3",
            )
            .bind(account_id)
            .bind(slot)
            .bind(holder)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Frees every slot instance `owner` holds (at shutdown).
    pub async fn release_slots(&self, owner: &str) -> Result<u64, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query("DELETE FROM account_slots WHERE owner = $1")
                .bind(owner)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// How many of the account's slots are held at `now`, by any instance.
    pub async fn slots_held(&self, account_id: &str, now: i64) -> Result<i64, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(
                "SELECT COUNT(*) FROM account_slots WHERE account_id = $1 AND expires_at > $2",
            )
            .bind(account_id)
            .bind(now)
            .fetch_one(pool)
            .await?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    const TTL: Duration = Duration::from_secs(15);

    on_both_engines! {
        /// Up to the limit, across instances; a freed slot is taken again; a crashed
        /// instance's slots are free once expired, unless it renewed them.
        async fn an_accounts_slots_are_counted_across_instances_and_expire(_db, store) {
            let t0 = 1_000_000;
            assert_eq!(store.take_slot("a_1", 2, "i_a", "h1", t0, TTL).await.unwrap(), Some(0));
            assert_eq!(store.take_slot("a_1", 2, "i_b", "h2", t0, TTL).await.unwrap(), Some(1));
            assert_eq!(store.take_slot("a_1", 2, "i_b", "h3", t0, TTL).await.unwrap(), None);
            assert_eq!(store.take_slot("a_2", 2, "i_b", "h4", t0, TTL).await.unwrap(), Some(0));
            assert_eq!(store.slots_held("a_1", t0).await.unwrap(), 2);
            // Only its holder frees a slot.
            assert!(!store.release_slot("a_1", 0, "h2").await.unwrap());
            assert!(store.release_slot("a_1", 0, "h1").await.unwrap());
            assert_eq!(store.take_slot("a_1", 2, "i_b", "h5", t0 + 1, TTL).await.unwrap(), Some(0));
            // B renews at 10 s; A held nothing more. At 20 s B's slots still count.
            assert_eq!(store.renew_slots("i_b", t0 + 10_000, TTL).await.unwrap(), 3);
            assert_eq!(store.take_slot("a_1", 2, "i_a", "h6", t0 + 20_000, TTL).await.unwrap(), None);
            // B dies: at 25 s its slots are free for A.
            assert_eq!(store.slots_held("a_1", t0 + 25_000).await.unwrap(), 0);
            assert_eq!(store.take_slot("a_1", 2, "i_a", "h7", t0 + 25_000, TTL).await.unwrap(), Some(0));
            // B's late release of an expired and retaken slot changes nothing.
            assert!(!store.release_slot("a_1", 0, "h5").await.unwrap());
            assert_eq!(store.slots_held("a_1", t0 + 25_000).await.unwrap(), 1);
            assert_eq!(store.release_slots("i_a").await.unwrap(), 1);
        }

        /// Instances racing for the last slots: never more holders than the limit.
        async fn racing_takers_never_exceed_the_limit(_db, store) {
            let t0 = 2_000_000;
            let tries = (0..10).map(|i| {
                let store = store.clone();
                async move {
                    store
                        .take_slot("a_1", 3, &format!("i_{}", i % 2), &format!("h{i}"), t0, TTL)
                        .await
                        .unwrap()
                }
            });
            let taken: Vec<Option<i64>> = futures_util::future::join_all(tries).await;
            let mut slots: Vec<i64> = taken.into_iter().flatten().collect();
            slots.sort();
            assert_eq!(slots, [0, 1, 2]);
        }
    }
}
