//! The account pool: which account of a service serves the next request.
//!
//! Invariants:
//! - At most `per_account` replies run on one account at once; up to `queue` more requests wait
//!   for a slot, and beyond that a request is refused (429) rather than piling up. With slots
//!   shared in the store (`slots`, on PostgreSQL), the limit holds across instances: a reply
//!   takes its local slot, then one in the store.
//! - An account that the site rate-limited cools down (for the site's `Retry-After`, else a
//!   default) and is not chosen until the cooldown passes.
//! - Among usable accounts, the least loaded wins; ties go to the one with the better recent
//!   record.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so cooldowns follow a paused clock in tests.
use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::slots::{SlotHold, Slots};

/// Outcomes remembered per account for its health score.
const HISTORY: usize = 20;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent replies per account.
    pub per_account: usize,
    /// Requests that may wait for a slot on one account.
    pub queue: usize,
    /// Cooldown after a rate limit when the site gives no `Retry-After`.
    pub cooldown: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_account: 4,
            queue: 64,
            cooldown: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct Slot {
    semaphore: Arc<Semaphore>,
    waiting: AtomicUsize,
    served: AtomicU64,
    queued_total: AtomicU64,
    /// How long a reply holds a slot, in ms, as a moving average (0 until one has ended):
    /// what a full queue's `Retry-After` is estimated from.
    avg_hold_ms: AtomicU64,
    /// Whether the first wait for a slot has been logged (once per account and process).
    wait_logged: std::sync::atomic::AtomicBool,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    cooldown_until: Option<Instant>,
    recent: VecDeque<bool>,
}

/// Why no slot was given.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Busy {
    #[error("account {account} is cooling down after a rate limit for {retry_after} s more")]
    CoolingDown { account: String, retry_after: u64 },
    #[error("account {account} has {waiting} requests waiting already")]
    QueueFull {
        account: String,
        waiting: usize,
        /// Seconds until the queue has drained enough to take one more.
        retry_after: u64,
    },
}

impl Busy {
    pub fn retry_after(&self) -> u64 {
        match self {
            Busy::CoolingDown { retry_after, .. } | Busy::QueueFull { retry_after, .. } => {
                *retry_after
            }
        }
    }
}

/// A running reply's hold on one of its account's slots; released on drop.
#[derive(Debug)]
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    /// The slot counted across instances (PostgreSQL), after the local one.
    _shared: Option<SlotHold>,
    slot: Arc<Slot>,
    acquired: Instant,
    /// How long the request waited for the slot.
    pub waited: Duration,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let held = self
            .acquired
            .elapsed()
            .as_millis()
            .min(u128::from(u32::MAX)) as u64;
        let held = held.max(1);
        // A lost race between two drops only skews one sample of an estimate.
        let old = self.slot.avg_hold_ms.load(Ordering::Relaxed);
        let new = if old == 0 { held } else { (old * 7 + held) / 8 };
        self.slot.avg_hold_ms.store(new.max(1), Ordering::Relaxed);
    }
}

fn clamp_cooldown(wait: Duration) -> Duration {
    wait.min(Duration::from_secs(
        crate::replay::client::MAX_RETRY_AFTER_SECS,
    ))
}

/// What an operator can do when requests queue for an account's slots (logged once, shown
/// on `/admin`).
pub fn waiting_advice(account: &str, per_account: usize) -> String {
    format!(
        "requests are waiting for a free slot on account {account} ({per_account} at once): \
         add accounts to its service (`computetower account add --name SERVICE …`) or raise \
         `[limits] per_account_concurrency` (COMPUTETOWER_PER_ACCOUNT_CONCURRENCY)"
    )
}

/// One account's load, for `/metrics` and `/admin`.
#[derive(Debug, Clone, Serialize)]
pub struct AccountLoad {
    pub account_id: String,
    pub active: usize,
    pub waiting: usize,
    pub served: u64,
    pub queued_total: u64,
    pub cooling_down_secs: Option<u64>,
    pub health: f64,
}

#[derive(Debug)]
pub struct AccountPool {
    limits: Limits,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Slots in the store, so the limit holds across instances (set on PostgreSQL).
    shared: std::sync::OnceLock<Arc<Slots>>,
}

impl AccountPool {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            slots: Mutex::new(HashMap::new()),
            shared: std::sync::OnceLock::new(),
        }
    }

    /// Counts every reply against its account's limit in the store too, across the
    /// instances sharing it. Set once; later calls are ignored.
    pub fn share_slots(&self, slots: Arc<Slots>) {
        let _ = self.shared.set(slots);
    }

    /// Frees this instance's slots in the store (at shutdown), so others need not wait for
    /// them to expire.
    pub async fn release_shared(&self) {
        if let Some(shared) = self.shared.get() {
            shared.release_all().await;
        }
    }

    /// The store slot, after the local one (waiting counts as queued).
    async fn shared_slot(&self, slot: &Slot, account: &str) -> Option<SlotHold> {
        let shared = self.shared.get()?;
        slot.waiting.fetch_add(1, Ordering::SeqCst);
        let hold = shared.take(account, self.limits.per_account.max(1)).await;
        slot.waiting.fetch_sub(1, Ordering::SeqCst);
        Some(hold)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn slot(&self, account: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(account.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    semaphore: Arc::new(Semaphore::new(self.limits.per_account.max(1))),
                    waiting: AtomicUsize::new(0),
                    served: AtomicU64::new(0),
                    queued_total: AtomicU64::new(0),
                    avg_hold_ms: AtomicU64::new(0),
                    wait_logged: std::sync::atomic::AtomicBool::new(false),
                    state: Mutex::new(SlotState::default()),
                })
            })
            .clone()
    }

    /// Seconds of cooldown left, if any.
    fn cooldown_left(slot: &Slot) -> Option<u64> {
        let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let left = state
            .cooldown_until?
            .checked_duration_since(Instant::now())?;
        Some(left.as_secs().max(1))
    }

    fn health(slot: &Slot) -> f64 {
        let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.recent.is_empty() {
            return 1.0;
        }
        state.recent.iter().filter(|ok| **ok).count() as f64 / state.recent.len() as f64
    }

    fn active(&self, slot: &Slot) -> usize {
        self.limits.per_account.max(1) - slot.semaphore.available_permits()
    }

    /// Indices of `accounts` in the order to try them: usable before cooling down, then least
    /// loaded (running + waiting), then healthiest.
    pub fn order(&self, accounts: &[&str]) -> Vec<usize> {
        let mut keyed: Vec<(usize, bool, usize, i64)> = accounts
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let slot = self.slot(id);
                let cooling = Self::cooldown_left(&slot).is_some();
                let load = self.active(&slot) + slot.waiting.load(Ordering::Relaxed);
                let health = (Self::health(&slot) * 1000.0) as i64;
                (i, cooling, load, -health)
            })
            .collect();
        keyed.sort_by_key(|(i, cooling, load, health)| (*cooling, *load, *health, *i));
        keyed.into_iter().map(|(i, ..)| i).collect()
    }

    /// A slot on `account`, waiting in its queue when all are taken.
    pub async fn acquire(&self, account: &str) -> Result<Permit, Busy> {
        let slot = self.slot(account);
        if let Some(retry_after) = Self::cooldown_left(&slot) {
            return Err(Busy::CoolingDown {
                account: account.to_owned(),
                retry_after,
            });
        }
        let started = Instant::now();
        if let Ok(permit) = slot.semaphore.clone().try_acquire_owned() {
            let shared = self.shared_slot(&slot, account).await;
            slot.served.fetch_add(1, Ordering::Relaxed);
            return Ok(Permit {
                _permit: permit,
                _shared: shared,
                slot,
                acquired: Instant::now(),
                waited: started.elapsed(),
            });
        }
        let waiting = slot.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.limits.queue {
            slot.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy::QueueFull {
                account: account.to_owned(),
                waiting,
                retry_after: self.drain_secs(&slot, waiting),
            });
        }
        slot.queued_total.fetch_add(1, Ordering::Relaxed);
        if !slot.wait_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                account,
                per_account_concurrency = self.limits.per_account,
                "{}",
                waiting_advice(account, self.limits.per_account)
            );
        }
        // The semaphore is never closed, so acquiring only fails if it were.
        let permit = slot.semaphore.clone().acquire_owned().await;
        slot.waiting.fetch_sub(1, Ordering::SeqCst);
        let permit = permit.map_err(|_| Busy::QueueFull {
            account: account.to_owned(),
            waiting: 0,
            retry_after: 1,
        })?;
        let shared = self.shared_slot(&slot, account).await;
        slot.served.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            _permit: permit,
            _shared: shared,
            slot,
            acquired: Instant::now(),
            waited: started.elapsed(),
        })
    }

    /// Seconds until `waiting` queued requests (plus one more) have been given a slot: each
    /// slot serves one reply per average hold time.
    fn drain_secs(&self, slot: &Slot, waiting: usize) -> u64 {
        let hold_ms = slot.avg_hold_ms.load(Ordering::Relaxed).max(1);
        let per_account = self.limits.per_account.max(1) as u64;
        let ahead = waiting as u64 + 1;
        (ahead.saturating_mul(hold_ms) / per_account)
            .div_ceil(1000)
            .clamp(1, crate::replay::client::MAX_RETRY_AFTER_SECS)
    }

    /// Takes `account` out of rotation for `retry_after` (or the default cooldown); returns
    /// for how long.
    pub fn cool_down(&self, account: &str, retry_after: Option<Duration>) -> Duration {
        let slot = self.slot(account);
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let wait = clamp_cooldown(retry_after.unwrap_or(self.limits.cooldown));
        let now = Instant::now();
        // Clamped above, so this cannot overflow; `checked_add` keeps it so if that changes.
        state.cooldown_until = Some(now.checked_add(wait).unwrap_or(now));
        wait
    }

    /// Keeps `account` out of rotation for at least `wait` (a cooldown another instance
    /// saw); a longer one it has already stays.
    pub fn cool_down_at_least(&self, account: &str, wait: Duration) {
        let slot = self.slot(account);
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let until = now.checked_add(clamp_cooldown(wait)).unwrap_or(now);
        if state.cooldown_until.is_none_or(|current| current < until) {
            state.cooldown_until = Some(until);
        }
    }

    /// Remembers how a request on `account` went.
    pub fn record(&self, account: &str, ok: bool) {
        let slot = self.slot(account);
        let mut state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.recent.len() == HISTORY {
            state.recent.pop_front();
        }
        state.recent.push_back(ok);
    }

    pub fn loads(&self) -> Vec<AccountLoad> {
        let slots: Vec<(String, Arc<Slot>)> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut loads: Vec<AccountLoad> = slots
            .into_iter()
            .map(|(account_id, slot)| AccountLoad {
                active: self.active(&slot),
                waiting: slot.waiting.load(Ordering::Relaxed),
                served: slot.served.load(Ordering::Relaxed),
                queued_total: slot.queued_total.load(Ordering::Relaxed),
                cooling_down_secs: Self::cooldown_left(&slot),
                health: Self::health(&slot),
                account_id,
            })
            .collect();
        loads.sort_by(|a, b| a.account_id.cmp(&b.account_id));
        loads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(per_account: usize, queue: usize) -> AccountPool {
        AccountPool::new(Limits {
            per_account,
            queue,
            cooldown: Duration::from_secs(30),
        })
    }

    #[tokio::test]
    async fn the_limit_queues_then_refuses() {
        let pool = pool(2, 1);
        let a = pool.acquire("a").await.unwrap();
        let _b = pool.acquire("a").await.unwrap();
        // The third waits in the queue until a slot frees up.
        let pool = Arc::new(pool);
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire("a").await.map(|p| p.waited) }
        });
        while pool.loads()[0].waiting == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (of one) is full: a fourth is refused at once.
        assert!(matches!(
            pool.acquire("a").await,
            Err(Busy::QueueFull { .. })
        ));
        drop(a);
        assert!(waiter.await.unwrap().is_ok());
        assert_eq!(pool.loads()[0].queued_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_account_cools_down_and_comes_back() {
        let pool = pool(4, 4);
        pool.cool_down("a", Some(Duration::from_secs(10)));
        let err = pool.acquire("a").await.unwrap_err();
        assert_eq!(err.retry_after(), 10);
        assert_eq!(pool.order(&["a", "b"]), vec![1, 0]);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(pool.acquire("a").await.is_ok());
        assert_eq!(pool.order(&["a", "b"]), vec![0, 1]);
    }

    /// A site's absurd `Retry-After` cannot overflow the clock, and a full queue's
    /// `Retry-After` says how long it really takes to drain.
    #[tokio::test(start_paused = true)]
    async fn retry_after_is_clamped_and_a_full_queue_estimates_its_drain() {
        let pool = Arc::new(pool(2, 4));
        pool.cool_down("x", Some(Duration::from_secs(u64::MAX)));
        let err = pool.acquire("x").await.unwrap_err();
        assert_eq!(
            err.retry_after(),
            crate::replay::client::MAX_RETRY_AFTER_SECS
        );
        // Replies on `a` take 10 s each.
        for _ in 0..2 {
            let held = pool.acquire("a").await.unwrap();
            tokio::time::advance(Duration::from_secs(10)).await;
            drop(held);
        }
        let _running = [
            pool.acquire("a").await.unwrap(),
            pool.acquire("a").await.unwrap(),
        ];
        let mut waiters = Vec::new();
        for _ in 0..4 {
            let pool = pool.clone();
            waiters.push(tokio::spawn(async move { pool.acquire("a").await.is_ok() }));
        }
        while pool
            .loads()
            .iter()
            .find(|l| l.account_id == "a")
            .unwrap()
            .waiting
            < 4
        {
            tokio::task::yield_now().await;
        }
        // Four ahead plus this one, two slots, 10 s each: 25 s.
        let err = pool.acquire("a").await.unwrap_err();
        assert!(matches!(err, Busy::QueueFull { .. }), "{err}");
        assert_eq!(err.retry_after(), 25);
    }

    /// Another instance's cooldown extends this one's, never shortens it.
    #[tokio::test(start_paused = true)]
    async fn a_cooldown_seen_elsewhere_only_lengthens() {
        let pool = pool(4, 4);
        assert_eq!(
            pool.cool_down("a", Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        pool.cool_down_at_least("a", Duration::from_secs(10));
        assert_eq!(pool.acquire("a").await.unwrap_err().retry_after(), 30);
        pool.cool_down_at_least("a", Duration::from_secs(50));
        assert_eq!(pool.acquire("a").await.unwrap_err().retry_after(), 50);
        pool.cool_down_at_least("b", Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(pool.acquire("b").await.is_ok());
    }

    #[tokio::test]
    async fn least_loaded_then_healthiest_first() {
        let pool = pool(4, 4);
        let _busy = pool.acquire("a").await.unwrap();
        assert_eq!(pool.order(&["a", "b"]), vec![1, 0]);
        pool.record("c", false);
        pool.record("b", true);
        assert_eq!(pool.order(&["c", "b"]), vec![1, 0]);
    }
}
