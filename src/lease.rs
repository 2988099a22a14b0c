//! This instance's account leases: the right to do an account's browser work (login,
//! re-login, learn, tiers 2 and 3) while other instances share the store.
//!
//! Each process gets a random instance id at start. A lease is a row in the store
//! (`store::leases`) that one instance holds until it expires; while any task of this
//! instance holds a [`LeaseGuard`] for an account, a background task renews the row every
//! `renew_every`, and when the last guard is dropped the row is deleted. An instance that
//! dies stops renewing, and its leases can be taken `ttl` after their last renewal.
//!
//! Invariants:
//! - Within one process, guards for one account share the one lease (a learn holds it and
//!   logs in under it; tier 2 requests on one account run side by side).
//! - Taking and releasing an account's row are serialized within the process, so a release
//!   never deletes a lease taken again after it was decided.
//! - The clock is injectable: the rules are tested on tokio's paused clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::store::{Store, StoreError};

/// Unix milliseconds now, as this instance reckons it.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock in unix ms.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// How long leases last and how often they are renewed and retried.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// A lease not renewed for this long can be taken by another instance.
    pub ttl: Duration,
    /// How often held leases are renewed (well under `ttl`, so one slow renewal is not a loss).
    pub renew_every: Duration,
    /// How often a task waiting for another instance's lease looks again.
    pub poll: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            poll: Duration::from_millis(250),
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Serializes taking and releasing this account's row within the process.
    turn: tokio::sync::Mutex<()>,
    /// Guards alive; the row is this instance's while it is above zero (unless lost).
    holders: Mutex<usize>,
    /// The last renewal found the row gone or another's: the next guard must take it again.
    lost: std::sync::atomic::AtomicBool,
}

impl Entry {
    fn holders(&self) -> std::sync::MutexGuard<'_, usize> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Another instance holds the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "account {account}'s browser work is held by instance {holder}, which did not finish \
         within {waited_secs} s"
    )]
    Held {
        account: String,
        holder: String,
        waited_secs: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Leases {
    store: Store,
    instance: String,
    settings: LeaseSettings,
    clock: Clock,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("instance", &self.instance)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// This process's hold on an account's lease; the lease is released when the last one is
/// dropped.
pub struct LeaseGuard {
    leases: Arc<Leases>,
    account: String,
    entry: Arc<Entry>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("account", &self.account)
            .finish()
    }
}

impl Leases {
    /// Leases for a new instance (a random id) on `store`, renewed by a task that ends when
    /// the returned handle's last clone is dropped.
    pub fn start(store: Store, settings: LeaseSettings, clock: Clock) -> Arc<Self> {
        let leases = Arc::new(Self {
            store,
            instance: crate::store::new_id("i"),
            settings,
            clock,
            entries: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&leases);
        // Detached: it holds only a weak reference and ends with the leases.
        tokio::spawn(renew_while_alive(weak, settings.renew_every));
        leases
    }

    /// This instance's id, as lease rows name their owner.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Unix ms by this instance's clock.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    fn entry(&self, account: &str) -> Arc<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    /// The account's lease, if this instance has it or can take it now.
    pub async fn try_take(
        self: &Arc<Self>,
        account: &str,
    ) -> Result<Option<LeaseGuard>, StoreError> {
        let entry = self.entry(account);
        let _turn = entry.turn.lock().await;
        let lost = entry.lost.load(std::sync::atomic::Ordering::SeqCst);
        if !lost {
            let mut holders = entry.holders();
            if *holders > 0 {
                *holders += 1;
                drop(holders);
                return Ok(Some(self.guard(account, entry.clone())));
            }
        }
        let taken = self
            .store
            .take_lease(account, &self.instance, self.now(), self.settings.ttl)
            .await?;
        if !taken {
            return Ok(None);
        }
        if lost {
            tracing::info!(account, instance = %self.instance, "took the account's lease again");
        }
        entry.lost.store(false, std::sync::atomic::Ordering::SeqCst);
        *entry.holders() += 1;
        Ok(Some(self.guard(account, entry.clone())))
    }

    /// The account's lease, waiting up to `within` for another instance to release it or to
    /// stop renewing it.
    pub async fn take(
        self: &Arc<Self>,
        account: &str,
        within: Duration,
    ) -> Result<LeaseGuard, LeaseError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(guard) = self.try_take(account).await? {
                return Ok(guard);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.held_error(account, within).await);
            }
            tokio::time::sleep(self.settings.poll).await;
        }
    }

    /// Why a lease could not be had: who holds it.
    pub async fn held_error(&self, account: &str, waited: Duration) -> LeaseError {
        let holder = match self.store.lease(account).await {
            Ok(Some(lease)) => lease.owner,
            Ok(None) => "(none now)".to_owned(),
            Err(e) => return e.into(),
        };
        LeaseError::Held {
            account: account.to_owned(),
            holder,
            waited_secs: waited.as_secs(),
        }
    }

    fn guard(self: &Arc<Self>, account: &str, entry: Arc<Entry>) -> LeaseGuard {
        LeaseGuard {
            leases: self.clone(),
            account: account.to_owned(),
            entry,
        }
    }

    /// Renews the leases this instance holds; a lease found lost is taken afresh by the next
    /// guard (the running ones cannot be stopped, so it is only logged).
    async fn renew(&self) {
        let held: Vec<(String, Arc<Entry>)> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, entry)| *entry.holders() > 0)
            .map(|(account, entry)| (account.clone(), entry.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let renewed = match self
            .store
            .renew_leases(&self.instance, self.now(), self.settings.ttl)
            .await
        {
            Ok(renewed) => renewed,
            Err(e) => {
                tracing::warn!(error = %e, "could not renew this instance's account leases");
                return;
            }
        };
        for (account, entry) in held {
            if !renewed.contains(&account) && *entry.holders() > 0 {
                tracing::warn!(account = %account, instance = %self.instance, "lost the account's lease (not renewed in time); another instance may do its browser work now");
                entry.lost.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Gives up every lease this instance holds (at shutdown), so other instances need not
    /// wait for them to expire.
    pub async fn release_all(&self) {
        if let Err(e) = self.store.release_leases(&self.instance).await {
            tracing::warn!(error = %e, "could not release this instance's account leases");
        }
    }
}

async fn renew_while_alive(leases: Weak<Leases>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        leases.renew().await;
    }
}

impl LeaseGuard {
    pub fn account(&self) -> &str {
        &self.account
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        {
            let mut holders = self.entry.holders();
            *holders = holders.saturating_sub(1);
            if *holders > 0 {
                return;
            }
        }
        // Without a runtime (the process is ending) the lease simply expires.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let leases = self.leases.clone();
        let entry = self.entry.clone();
        let account = std::mem::take(&mut self.account);
        // Detached: a drop cannot wait. Under the account's turn, and only if nobody took a
        // guard meanwhile, so the row deleted is never one a newer guard relies on.
        runtime.spawn(async move {
            let _turn = entry.turn.lock().await;
            if *entry.holders() > 0 {
                return;
            }
            if let Err(e) = leases.store.release_lease(&account, &leases.instance).await {
                tracing::warn!(account = %account, error = %e, "could not release the account's lease; it expires on its own");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// Lease times by a hand-moved clock (unix ms); the tests call `renew` themselves.
    fn clock() -> (Arc<AtomicI64>, Clock) {
        let now = Arc::new(AtomicI64::new(1_000_000));
        let read = now.clone();
        (now, Arc::new(move || read.load(Ordering::SeqCst)))
    }

    fn settings() -> LeaseSettings {
        LeaseSettings {
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(3600),
            poll: Duration::from_millis(1),
        }
    }

    /// Waits (polling the store) until the account's lease is `owner`'s: a release runs in a
    /// task of its own.
    async fn until_owner(store: &Store, account: &str, owner: Option<&str>) {
        for _ in 0..5000 {
            let now = store.lease(account).await.unwrap().map(|l| l.owner);
            if now.as_deref() == owner {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the lease of {account} never became {owner:?}");
    }

    #[tokio::test]
    async fn guards_share_the_lease_and_the_last_one_releases_it() {
        let (_dir, store) = crate::store::testing::store().await;
        let (_now, clock) = clock();
        let a = Leases::start(store.clone(), settings(), clock.clone());
        let b = Leases::start(store.clone(), settings(), clock);
        let first = a.try_take("acc").await.unwrap().unwrap();
        let second = a.try_take("acc").await.unwrap().unwrap();
        assert!(b.try_take("acc").await.unwrap().is_none());
        drop(first);
        assert!(
            b.try_take("acc").await.unwrap().is_none(),
            "still held by the second"
        );
        drop(second);
        until_owner(&store, "acc", None).await;
        assert!(b.try_take("acc").await.unwrap().is_some());
    }

    /// Held for longer than its lifetime, a lease stays its holder's through renewals; once
    /// the holder stops renewing (it died), another instance takes it over at its expiry.
    #[tokio::test]
    async fn a_held_lease_is_renewed_and_taken_over_when_its_holder_dies() {
        let (_dir, store) = crate::store::testing::store().await;
        let (now, clock) = clock();
        let a = Leases::start(store.clone(), settings(), clock.clone());
        let b = Leases::start(store.clone(), settings(), clock);
        let held = a.try_take("acc").await.unwrap().unwrap();
        for _ in 0..8 {
            now.fetch_add(5_000, Ordering::SeqCst);
            a.renew().await;
            assert!(b.try_take("acc").await.unwrap().is_none(), "renewed");
        }
        let expires_at = store.lease("acc").await.unwrap().unwrap().expires_at;
        assert_eq!(expires_at, 1_000_000 + 40_000 + 15_000);
        // A dies: no more renewals, no release.
        std::mem::forget(held);
        now.store(expires_at - 1, Ordering::SeqCst);
        assert!(b.try_take("acc").await.unwrap().is_none());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.take("acc", Duration::from_secs(60)).await }
        });
        now.store(expires_at, Ordering::SeqCst);
        let _taken = waiting.await.unwrap().unwrap();
        assert_eq!(
            store.lease("acc").await.unwrap().unwrap().owner,
            b.instance()
        );
    }

    /// Waiting has a limit, and the error names the holder; released at shutdown, the lease
    /// is free at once.
    #[tokio::test]
    async fn waiting_for_a_held_lease_gives_up_naming_its_holder() {
        let (_dir, store) = crate::store::testing::store().await;
        let (_now, clock) = clock();
        let a = Leases::start(store.clone(), settings(), clock.clone());
        let b = Leases::start(store.clone(), settings(), clock);
        let _held = a.try_take("acc").await.unwrap().unwrap();
        let err = b.take("acc", Duration::from_millis(20)).await.unwrap_err();
        assert!(
            matches!(&err, LeaseError::Held { holder, .. } if holder == a.instance()),
            "{err}"
        );
        a.release_all().await;
        assert!(b.try_take("acc").await.unwrap().is_some());
    }

    /// A lease lost while held (the holder stalled past its ttl and another took it) is
    /// noticed at the next renewal and not assumed held by later guards.
    #[tokio::test]
    async fn a_lost_lease_is_not_assumed_held() {
        let (_dir, store) = crate::store::testing::store().await;
        let (now, clock) = clock();
        let a = Leases::start(store.clone(), settings(), clock);
        let _held = a.try_take("acc").await.unwrap().unwrap();
        now.fetch_add(20_000, Ordering::SeqCst);
        assert!(
            store
                .take_lease("acc", "i_other", a.now(), Duration::from_secs(60))
                .await
                .unwrap()
        );
        a.renew().await;
        assert!(a.try_take("acc").await.unwrap().is_none());
    }
}
