//! Per-account concurrency across instances: each running reply also holds one of its
//! account's numbered slots in the store (`store::slots`), renewed by this instance while it
//! runs and freed when it ends, so the limit holds over every instance on the store and a
//! crashed instance's slots free themselves after the lease lifetime.
//!
//! The in-process semaphore of `account_pool` stays in front (the queue, and the only limit
//! on SQLite); this is taken after it, on PostgreSQL.
//!
//! Invariants:
//! - A waiter looks again as soon as a slot of this instance is freed, and otherwise at a
//!   backoff of up to `MAX_BACKOFF`.
//! - When the store cannot be reached, a reply runs without a store slot (the local limit
//!   still holds): the store failing must not stop tier 1.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::lease::{Clock, LeaseSettings};
use crate::store::Store;

/// The longest pause between two looks of a waiter, when no local slot frees up.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

pub struct Slots {
    store: Store,
    instance: String,
    settings: LeaseSettings,
    clock: Clock,
    /// Holds alive, to skip renewals when there are none.
    held: AtomicUsize,
    /// A hold of this instance ended.
    freed: Notify,
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("instance", &self.instance)
            .field("held", &self.held.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A reply's slot in the store; freed on drop.
pub struct SlotHold {
    slots: Arc<Slots>,
    account: String,
    /// `None` when the store could not be asked.
    slot: Option<i64>,
    holder: String,
}

impl std::fmt::Debug for SlotHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotHold")
            .field("account", &self.account)
            .field("slot", &self.slot)
            .finish()
    }
}

impl Slots {
    /// Slots of instance `instance` (its lease owner id) on `store`, renewed every
    /// `settings.renew_every` until the last handle is dropped.
    pub fn start(
        store: Store,
        instance: String,
        settings: LeaseSettings,
        clock: Clock,
    ) -> Arc<Self> {
        let slots = Arc::new(Self {
            store,
            instance,
            settings,
            clock,
            held: AtomicUsize::new(0),
            freed: Notify::new(),
        });
        // Detached: it holds only a weak reference and ends with the slots.
        tokio::spawn(renew_while_alive(
            Arc::downgrade(&slots),
            settings.renew_every,
        ));
        slots
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// A slot of `account` below `limit`, waiting for one to free up (here or on another
    /// instance) as long as it takes: the caller bounds the wait.
    pub async fn take(self: &Arc<Self>, account: &str, limit: usize) -> SlotHold {
        let holder = crate::store::new_id("h");
        let mut backoff = Duration::from_millis(5);
        let mut logged = false;
        loop {
            // Registered before looking, so a release in between is not missed.
            let freed = self.freed.notified();
            let taken = self
                .store
                .take_slot(
                    account,
                    limit,
                    &self.instance,
                    &holder,
                    self.now(),
                    self.settings.ttl,
                )
                .await;
            match taken {
                Ok(Some(slot)) => return self.hold(account, Some(slot), holder),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(account, error = %e, "cannot count the account's replies across instances in the store; this one runs on the local limit alone");
                    return self.hold(account, None, holder);
                }
            }
            if !logged {
                tracing::debug!(
                    account,
                    "every slot of the account is held (across instances); waiting"
                );
                logged = true;
            }
            let _ = tokio::time::timeout(backoff, freed).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn hold(self: &Arc<Self>, account: &str, slot: Option<i64>, holder: String) -> SlotHold {
        self.held.fetch_add(1, Ordering::SeqCst);
        SlotHold {
            slots: self.clone(),
            account: account.to_owned(),
            slot,
            holder,
        }
    }

    async fn renew(&self) {
        if self.held.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Err(e) = self
            .store
            .renew_slots(&self.instance, self.now(), self.settings.ttl)
            .await
        {
            tracing::warn!(error = %e, "could not renew this instance's account slots");
        }
    }

    /// Frees every slot this instance holds (at shutdown).
    pub async fn release_all(&self) {
        if let Err(e) = self.store.release_slots(&self.instance).await {
            tracing::warn!(error = %e, "could not free this instance's account slots");
        }
    }
}

async fn renew_while_alive(slots: Weak<Slots>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(slots) = slots.upgrade() else {
            return;
        };
        slots.renew().await;
    }
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.slots.held.fetch_sub(1, Ordering::SeqCst);
        let Some(slot) = self.slot else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let slots = self.slots.clone();
        let account = std::mem::take(&mut self.account);
        let holder = std::mem::take(&mut self.holder);
        // Detached: a drop cannot wait; a release that fails leaves a slot that expires.
        runtime.spawn(async move {
            if let Err(e) = slots.store.release_slot(&account, slot, &holder).await {
                tracing::warn!(account = %account, error = %e, "could not free the account's slot; it expires on its own");
            }
            slots.freed.notify_waiters();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(3600),
            poll: Duration::from_millis(1),
        }
    }

    /// Two instances share an account's limit: a waiter on one gets the slot the other
    /// frees, and the slots of an instance that died once they expire.
    #[tokio::test]
    async fn two_instances_share_an_accounts_limit() {
        let (_dir, store) = crate::store::testing::store().await;
        let now = Arc::new(AtomicI64::new(1_000_000));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::SeqCst))
        };
        let a = Slots::start(store.clone(), "i_a".into(), settings(), clock.clone());
        let b = Slots::start(store.clone(), "i_b".into(), settings(), clock);
        let first = a.take("acc", 2).await;
        let second = a.take("acc", 2).await;
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.take("acc", 2).await }
        });
        drop(first);
        let third = waiting.await.unwrap();
        assert_eq!(third.slot, Some(0));
        assert_eq!(
            store
                .slots_held("acc", now.load(Ordering::SeqCst))
                .await
                .unwrap(),
            2
        );
        // A dies holding its second slot; B's next waiter gets it once it expires.
        std::mem::forget(second);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.take("acc", 2).await }
        });
        // B renews its own slot (as its task would); A's lapses at 15 s.
        now.fetch_add(10_000, Ordering::SeqCst);
        b.renew().await;
        now.fetch_add(5_000, Ordering::SeqCst);
        let fourth = waiting.await.unwrap();
        assert_eq!(fourth.slot, Some(1));
        drop((third, fourth));
    }
}
