//! Tier floors: the lowest tier worth trying for a flow, raised on evidence and lifted on
//! evidence.
//!
//! A site that refuses direct replay (an anti-bot page) or answers in a shape the flow does
//! not read (format drift) raises its flow's floor, so later requests skip the tier that just
//! failed. One bad reply is weak evidence, though, so a raised floor is probed: after a short
//! interval that doubles on every failed probe, one request (and only one at a time) tries
//! the lowest tier again. A probe that works lifts the floor; so does a re-learn that works
//! (a new flow version has a new id, and thus no floor).
//!
//! Invariants:
//! - At most one request per flow probes at a time; the others keep to the floor.
//! - The probe interval grows from `first_probe` to `max_probe` and resets when the floor is
//!   lifted.
//! - tokio's clock: the rules are tested on a paused clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most flows a server tracks floors for; beyond it, the floor probed longest ago is dropped.
const MAX_FLOWS: usize = 10_000;
/// A probe not reported within this time (its client went away) no longer blocks the next.
const PROBE_STALE: Duration = Duration::from_secs(120);

/// Where a request on a flow starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At this tier (1 when the flow has no floor).
    At(u8),
    /// At tier 1 despite a floor at `floor`: this request probes whether the floor can go.
    /// Report the outcome with [`TierFloors::probe_worked`] or [`TierFloors::probe_failed`].
    Probe { floor: u8 },
}

#[derive(Debug, Clone, Copy)]
struct Floor {
    tier: u8,
    interval: Duration,
    next_probe: Instant,
    probing: bool,
}

#[derive(Debug)]
pub struct TierFloors {
    first_probe: Duration,
    max_probe: Duration,
    floors: Mutex<HashMap<String, Floor>>,
}

/// A floor as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FloorView {
    pub tier: u8,
    /// Seconds until the next probe of a lower tier (0: due).
    pub next_probe_secs: u64,
}

impl TierFloors {
    pub fn new(first_probe: Duration, max_probe: Duration) -> Self {
        Self {
            first_probe,
            max_probe: max_probe.max(first_probe),
            floors: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Floor>> {
        self.floors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the next request on `flow` starts.
    pub fn start(&self, flow: &str) -> Start {
        let mut floors = self.lock();
        let Some(floor) = floors.get_mut(flow) else {
            return Start::At(1);
        };
        let now = Instant::now();
        let stale = now >= floor.next_probe + PROBE_STALE;
        if (!floor.probing || stale) && now >= floor.next_probe {
            floor.probing = true;
            return Start::Probe { floor: floor.tier };
        }
        Start::At(floor.tier)
    }

    /// `tier` failed on `flow` in a way that says it will keep failing: requests start at
    /// `tier + 1` until a probe or a re-learn says otherwise. A lower floor is not lowered.
    pub fn raise(&self, flow: &str, to: u8) {
        let mut floors = self.lock();
        let now = Instant::now();
        if let Some(floor) = floors.get_mut(flow) {
            if to > floor.tier {
                floor.tier = to;
            }
            return;
        }
        if floors.len() >= MAX_FLOWS
            && let Some(oldest) = floors
                .iter()
                .min_by_key(|(_, f)| f.next_probe)
                .map(|(k, _)| k.clone())
        {
            floors.remove(&oldest);
        }
        floors.insert(
            flow.to_owned(),
            Floor {
                tier: to,
                interval: self.first_probe,
                next_probe: now + self.first_probe,
                probing: false,
            },
        );
    }

    /// The probe worked: the flow has no floor any more.
    pub fn probe_worked(&self, flow: &str) {
        self.lift(flow);
    }

    /// The probe failed: the floor stays, and the next probe waits twice as long.
    pub fn probe_failed(&self, flow: &str) {
        if let Some(floor) = self.lock().get_mut(flow) {
            floor.probing = false;
            floor.interval = (floor.interval * 2).min(self.max_probe);
            floor.next_probe = Instant::now() + floor.interval;
        }
    }

    /// Lifts `flow`'s floor (a probe or a re-learn worked).
    pub fn lift(&self, flow: &str) {
        self.lock().remove(flow);
    }

    pub fn floor(&self, flow: &str) -> Option<FloorView> {
        let floors = self.lock();
        let floor = floors.get(flow)?;
        Some(FloorView {
            tier: floor.tier,
            next_probe_secs: floor
                .next_probe
                .saturating_duration_since(Instant::now())
                .as_secs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floors() -> TierFloors {
        TierFloors::new(Duration::from_secs(5), Duration::from_secs(40))
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_floor_is_probed_after_a_growing_interval_and_lifted_when_it_works() {
        let floors = floors();
        assert_eq!(floors.start("f"), Start::At(1));
        floors.raise("f", 3);
        assert_eq!(floors.start("f"), Start::At(3));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(floors.start("f"), Start::Probe { floor: 3 });
        // One probe at a time: the others keep to the floor meanwhile.
        assert_eq!(floors.start("f"), Start::At(3));
        floors.probe_failed("f");
        // The next probe waits twice as long: 10 s, then 20, then 40 (the cap), then 40.
        for wait in [10, 20, 40, 40] {
            tokio::time::advance(Duration::from_secs(wait - 1)).await;
            assert_eq!(floors.start("f"), Start::At(3), "before {wait} s");
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(
                floors.start("f"),
                Start::Probe { floor: 3 },
                "after {wait} s"
            );
            floors.probe_failed("f");
        }
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(floors.start("f"), Start::Probe { floor: 3 });
        // A probe never reported (its client went away) stops blocking others after a while.
        tokio::time::advance(PROBE_STALE).await;
        assert_eq!(floors.start("f"), Start::Probe { floor: 3 });
        floors.probe_worked("f");
        assert_eq!(floors.start("f"), Start::At(1));
        // Raised again later, the interval starts short again.
        floors.raise("f", 2);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(floors.start("f"), Start::Probe { floor: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn floors_only_go_up_until_lifted_and_are_per_flow() {
        let floors = floors();
        floors.raise("f", 3);
        floors.raise("f", 2);
        assert_eq!(floors.floor("f").unwrap().tier, 3);
        assert_eq!(floors.start("g"), Start::At(1));
        floors.raise("g", 2);
        floors.lift("f");
        assert_eq!(floors.start("f"), Start::At(1));
        assert_eq!(floors.start("g"), Start::At(2));
        assert_eq!(floors.floor("g").unwrap().next_probe_secs, 5);
    }
}
