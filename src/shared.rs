//! State instances sharing a PostgreSQL store keep in common, besides what the store holds
//! anyway (accounts, sessions, flows): what one instance saw of a site that the others
//! should respect too — a 429 cooldown, a tier floor raised or lifted, a re-learned flow.
//!
//! The instance that sees it appends a row (`store::shared`); every instance reads the
//! others' rows about once a second (`poll`) and applies them to its own account pool, tier
//! floors and caches. So the others follow within about `poll` plus one query.
//!
//! Why a polled table and not `LISTEN`/`NOTIFY`: the rows are few (only failures make them),
//! a cheap indexed read a second is nothing to PostgreSQL, and a table keeps what happened
//! while an instance was starting or disconnected, so it catches up on start (the last
//! hour's rows, in order) instead of missing a notification.
//!
//! Invariants:
//! - An instance never applies its own rows, and applies each other row once: rows are read
//!   with an overlap (a row committed late, or by a slightly skewed clock, is still read) and
//!   remembered by id over that overlap.
//! - Publishing never delays the request that saw the change (the write is detached).
//! - On SQLite (one instance) none of this runs: behaviour there is as without it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::lease::Clock;
use crate::store::Store;
pub use crate::store::shared::Change;

/// How far back an instance reads on start, and how long rows are kept.
pub const HISTORY: Duration = Duration::from_secs(3600);
/// Each read goes back this far before the previous one, for rows committed late.
const OVERLAP: Duration = Duration::from_secs(10);
/// How often old rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

fn ms(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

pub struct Shared {
    store: Store,
    instance: String,
    clock: Clock,
    poll: Duration,
    /// Bumped after each round of reading the others' changes (see [`Shared::polled`]).
    rounds: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("instance", &self.instance)
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The shared state of instance `instance` (its lease owner id) on `store`.
    pub fn new(store: Store, instance: String, clock: Clock, poll: Duration) -> Arc<Self> {
        Arc::new(Self {
            store,
            instance,
            clock,
            poll: poll.max(Duration::from_millis(10)),
            rounds: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Tells of each round of reading and applying the others' changes: whoever waits for a
    /// change to arrive waits on this, not on a timer.
    pub fn polled(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rounds.subscribe()
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Unix ms by this instance's clock.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Tells the other instances about `change`.
    pub fn publish(&self, change: Change) {
        let store = self.store.clone();
        let origin = self.instance.clone();
        let now = self.now();
        // Detached: the request that saw the change goes on at once; a lost write only means
        // the others find out for themselves.
        tokio::spawn(async move {
            if let Err(e) = store.publish_change(&origin, &change, now).await {
                tracing::warn!(error = %e, ?change, "could not tell the other instances");
            }
        });
    }

    /// Applies the other instances' changes to `target` with `apply`, about every `poll`,
    /// until `target` is dropped.
    pub fn follow<T, F>(self: Arc<Self>, target: Weak<T>, apply: F) -> tokio::task::JoinHandle<()>
    where
        T: Send + Sync + 'static,
        F: Fn(&T, &Change) + Send + 'static,
    {
        tokio::spawn(async move {
            let mut follower = Follower::new(self.now());
            let mut ticks = tokio::time::interval(self.poll);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(target) = target.upgrade() else {
                    return;
                };
                for change in follower.poll(&self).await {
                    apply(&target, &change);
                }
                self.rounds.send_modify(|n| *n = n.wrapping_add(1));
            }
        })
    }
}

/// What an instance has read of the others' changes.
struct Follower {
    /// The next read starts here (unix ms).
    since: i64,
    /// Rows applied, by id, with their time (forgotten once older than `since`).
    seen: HashMap<i64, i64>,
    last_prune: i64,
    failing: bool,
}

impl Follower {
    fn new(now: i64) -> Self {
        Self {
            since: now.saturating_sub(ms(HISTORY)),
            seen: HashMap::new(),
            last_prune: now,
            failing: false,
        }
    }

    /// The changes not applied yet, in order.
    async fn poll(&mut self, shared: &Shared) -> Vec<Change> {
        let polled_at = shared.now();
        let events = match shared
            .store
            .changes_since(self.since, &shared.instance)
            .await
        {
            Ok(events) => events,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, "cannot read the other instances' changes; retrying");
                }
                return Vec::new();
            }
        };
        if std::mem::take(&mut self.failing) {
            tracing::info!("reading the other instances' changes again");
        }
        let mut fresh = Vec::new();
        for event in events {
            if self.seen.insert(event.id, event.created_at).is_none() {
                fresh.push(event.change);
            }
        }
        self.since = self.since.max(polled_at.saturating_sub(ms(OVERLAP)));
        let since = self.since;
        self.seen.retain(|_, created| *created >= since);
        if polled_at.saturating_sub(self.last_prune) >= ms(PRUNE_EVERY) {
            self.last_prune = polled_at;
            if let Err(e) = shared
                .store
                .prune_changes(polled_at.saturating_sub(ms(HISTORY)))
                .await
            {
                tracing::debug!(error = %e, "could not prune old shared changes");
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn shared(store: &Store, instance: &str, now: &Arc<AtomicI64>) -> Arc<Shared> {
        let now = now.clone();
        Shared::new(
            store.clone(),
            instance.into(),
            Arc::new(move || now.load(Ordering::SeqCst)),
            Duration::from_millis(10),
        )
    }

    /// A follower applies each of the others' changes once, catches up on the last hour at
    /// start, and reads rows committed a little late (within the overlap).
    #[tokio::test]
    async fn each_change_of_the_others_is_applied_once() {
        let (_dir, store) = crate::store::testing::store().await;
        let now = Arc::new(AtomicI64::new(10_000_000));
        let a = shared(&store, "i_a", &now);
        let b = shared(&store, "i_b", &now);
        let old = Change::FlowChanged {
            service: "before".into(),
        };
        store
            .publish_change("i_a", &old, 10_000_000 - ms(HISTORY) - 1)
            .await
            .unwrap();
        let recent = Change::FloorRaised {
            flow: "f".into(),
            tier: 2,
        };
        store
            .publish_change("i_a", &recent, 10_000_000 - 60_000)
            .await
            .unwrap();
        let mut follower = Follower::new(b.now());
        assert_eq!(
            follower.poll(&b).await,
            [recent],
            "the last hour, not older"
        );
        assert_eq!(follower.poll(&b).await, []);
        // Its own changes are not read back; a late row within the overlap is.
        store
            .publish_change(
                "i_b",
                &Change::FloorLifted { flow: "f".into() },
                now.load(Ordering::SeqCst),
            )
            .await
            .unwrap();
        now.fetch_add(5_000, Ordering::SeqCst);
        let cooldown = Change::Cooldown {
            account: "a_1".into(),
            until_ms: 99,
        };
        store
            .publish_change(a.instance(), &cooldown, now.load(Ordering::SeqCst) - 8_000)
            .await
            .unwrap();
        assert_eq!(follower.poll(&b).await, [cooldown]);
        assert_eq!(follower.poll(&b).await, []);
    }
}
