//! Account leases: which instance does an account's browser work now (`account_leases`).
//!
//! Every call takes the time (`now`, unix ms) from its caller, so the rules are tested on
//! explicit timestamps; instances sharing a store must keep their clocks within a fraction
//! of a lease's lifetime (NTP does).
//!
//! Invariants:
//! - At most one owner per account at any `now`: taking is one statement that inserts the row
//!   or updates it only when it is expired or already the caller's.
//! - Renewing and releasing touch only the caller's own rows, so an instance that lost a
//!   lease (it stopped renewing and another took it) cannot take it back by renewing.

use std::time::Duration;

use serde::Serialize;

use super::{Op, Store, StoreError, on_pool};

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Lease {
    pub account_id: String,
    /// The holding instance's id.
    pub owner: String,
    /// Unix ms; past it, any instance may take the lease.
    pub expires_at: i64,
    /// Unix ms when this owner took it (renewals keep it).
    pub taken_at: i64,
}

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes (or, when `owner` has it already, renews) the lease on `account_id` until
    /// `now + ttl`. False when another owner holds it unexpired.
    pub async fn take_lease(
        &self,
        account_id: &str,
        owner: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let expires_at = now.saturating_add(ms(ttl));
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query(
                "INSERT INTO account_leases (account_id, owner, expires_at, taken_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account_id) DO UPDATE SET
                     owner = excluded.owner,
                     expires_at = excluded.expires_at,
                     taken_at = CASE WHEN account_leases.owner = excluded.owner
                                     THEN account_leases.taken_at ELSE excluded.taken_at END
                 WHERE account_leases.owner = excluded.owner
                    OR account_leases.expires_at <= excluded.taken_at",
            )
            .bind(account_id)
            .bind(owner)
            .bind(expires_at)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Extends every lease `owner` still holds to `now + ttl`; returns their accounts (a
    /// lease missing from the answer was lost to another instance, or released).
    pub async fn renew_leases(
        &self,
        owner: &str,
        now: i64,
        ttl: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let expires_at = now.saturating_add(ms(ttl));
        on_pool!(self, Op::Write, |pool| {
            Ok(sqlx::query_scalar(
                "UPDATE account_leases SET expires_at = $1 WHERE owner = $2 RETURNING account_id",
            )
            .bind(expires_at)
            .bind(owner)
            .fetch_all(pool)
            .await?)
        })
        .await
    }

    /// Gives the lease up, if `owner` holds it; true when it did.
    pub async fn release_lease(&self, account_id: &str, owner: &str) -> Result<bool, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done =
                sqlx::query("DELETE FROM account_leases WHERE account_id = $1 AND owner = $2")
                    .bind(account_id)
                    .bind(owner)
                    .execute(pool)
                    .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Gives up every lease `owner` holds (an instance shutting down).
    pub async fn release_leases(&self, owner: &str) -> Result<u64, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query("DELETE FROM account_leases WHERE owner = $1")
                .bind(owner)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// The lease on `account_id` as stored, expired or not.
    pub async fn lease(&self, account_id: &str) -> Result<Option<Lease>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT account_id, owner, expires_at, taken_at FROM account_leases
                 WHERE account_id = $1",
            )
            .bind(account_id)
            .fetch_optional(pool)
            .await?)
        })
        .await
    }

    /// The leases unexpired at `now`, by account.
    pub async fn leases(&self, now: i64) -> Result<Vec<Lease>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT account_id, owner, expires_at, taken_at FROM account_leases
                 WHERE expires_at > $1 ORDER BY account_id",
            )
            .bind(now)
            .fetch_all(pool)
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
        /// Taken when free; refused to another owner while unexpired; renewed by its owner
        /// (who keeps the time it took it); taken over once expired.
        async fn a_lease_is_taken_renewed_and_taken_over_once_expired(_db, store) {
            let t0 = 1_000_000;
            assert!(store.take_lease("a_1", "i_a", t0, TTL).await.unwrap());
            assert!(!store.take_lease("a_1", "i_b", t0 + 1, TTL).await.unwrap());
            // Renewed at 10 s: still A's at 20 s, past the first expiry.
            assert!(store.take_lease("a_1", "i_a", t0 + 10_000, TTL).await.unwrap());
            assert!(!store.take_lease("a_1", "i_b", t0 + 20_000, TTL).await.unwrap());
            let held = store.lease("a_1").await.unwrap().unwrap();
            assert_eq!(
                held,
                Lease {
                    account_id: "a_1".into(),
                    owner: "i_a".into(),
                    expires_at: t0 + 25_000,
                    taken_at: t0,
                }
            );
            // A stops renewing: at its expiry B takes over, and A cannot take it back.
            assert!(store.take_lease("a_1", "i_b", t0 + 25_000, TTL).await.unwrap());
            assert!(!store.take_lease("a_1", "i_a", t0 + 25_001, TTL).await.unwrap());
            let held = store.lease("a_1").await.unwrap().unwrap();
            assert_eq!((held.owner.as_str(), held.taken_at), ("i_b", t0 + 25_000));
            // Other accounts are independent.
            assert!(store.take_lease("a_2", "i_a", t0 + 25_001, TTL).await.unwrap());
        }

        /// Renewing extends only the caller's leases and names them: one lost to another
        /// instance is not among them, and is not taken back.
        async fn renewing_extends_only_what_the_owner_still_holds(_db, store) {
            let t0 = 5_000_000;
            store.take_lease("a_1", "i_a", t0, TTL).await.unwrap();
            store.take_lease("a_2", "i_a", t0, TTL).await.unwrap();
            store.take_lease("a_3", "i_b", t0, TTL).await.unwrap();
            // A stalled past a_2's expiry, and B took it meanwhile.
            assert!(store.take_lease("a_2", "i_b", t0 + 15_000, TTL).await.unwrap());
            let mut renewed = store.renew_leases("i_a", t0 + 16_000, TTL).await.unwrap();
            renewed.sort();
            assert_eq!(renewed, ["a_1"]);
            assert_eq!(store.lease("a_1").await.unwrap().unwrap().expires_at, t0 + 31_000);
            assert_eq!(store.lease("a_2").await.unwrap().unwrap().owner, "i_b");
            let live: Vec<(String, String)> = store
                .leases(t0 + 16_000)
                .await
                .unwrap()
                .into_iter()
                .map(|l| (l.account_id, l.owner))
                .collect();
            // a_3 expired at 15 s.
            assert_eq!(live, [("a_1".into(), "i_a".into()), ("a_2".into(), "i_b".into())]);
            assert_eq!(store.leases(t0 + 40_000).await.unwrap().len(), 0);
        }

        /// Releasing frees the lease for anyone at once; only its owner can release it.
        async fn a_released_lease_is_free_at_once(_db, store) {
            let t0 = 9_000_000;
            store.take_lease("a_1", "i_a", t0, TTL).await.unwrap();
            assert!(!store.release_lease("a_1", "i_b").await.unwrap());
            assert!(!store.take_lease("a_1", "i_b", t0 + 1, TTL).await.unwrap());
            assert!(store.release_lease("a_1", "i_a").await.unwrap());
            assert!(store.lease("a_1").await.unwrap().is_none());
            assert!(store.take_lease("a_1", "i_b", t0 + 2, TTL).await.unwrap());
        }

        /// Instances racing for a free lease: exactly one wins.
        async fn racing_instances_take_a_lease_once(_db, store) {
            let t0 = 12_000_000;
            let tries = (0..8).map(|i| {
                let store = store.clone();
                async move { store.take_lease("a_1", &format!("i_{i}"), t0, TTL).await.unwrap() }
            });
            let won = futures_util::future::join_all(tries).await;
            assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        }
    }
}
