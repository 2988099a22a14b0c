//! The fallback policy: what to do after a failure before the first token, as one pure
//! function of the tier, the failure, the attempt and the request's situation.
//!
//! The gateway carries the decision out (waits, switches tier, logs in again, moves to the
//! next account) and records it; nothing here does I/O or reads a clock, so the whole table
//! is unit-tested below.
//!
//! Invariants:
//! - A forced tier (`x-computetower-tier`) never changes tier and never raises a floor.
//! - A floor is raised only on evidence that a tier cannot work for the flow (a refusal, a
//!   reply it cannot read); a blip (network, 5xx) moves the one request and nothing else.
//! - Retries are bounded: network errors `NETWORK_ATTEMPTS` times with exponential backoff
//!   from `BACKOFF`, a 5xx status once; then the request fails.

use std::time::Duration;

use crate::replay::failure::FailureKind;

/// Tries of one tier on one account for network errors (with exponential backoff).
pub const NETWORK_ATTEMPTS: u32 = 3;
/// The first backoff; each further try waits twice as long.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// What the request does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The same tier on the same account again, after `after`.
    Retry { after: Duration },
    /// Another tier on the same account; `raise_floor` makes later requests start there too.
    Tier { to: u8, raise_floor: bool },
    /// The same tier without the remembered site conversation (the site forgot it).
    NewConversation,
    /// A fresh browser login for this account, then the same tier again.
    Relogin,
    /// The next account of the service; `rate_limited`: cool this one down first.
    NextAccount { rate_limited: bool },
    /// Give up with this error.
    Fail,
}

/// A decision and what to record of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub next: Next,
    /// The action as `/admin/decisions` and the metrics name it.
    pub action: &'static str,
    /// Re-learn the service in the background (the site changed its format).
    pub relearn: bool,
}

/// What the policy needs to know of the request besides the failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Situation {
    /// The client forced this tier.
    pub forced: bool,
    /// The request continues a remembered site conversation.
    pub continuing: bool,
    /// This account was already logged in again during this request.
    pub relogged: bool,
    /// The server runs the browser (tiers 2 and 3, re-login, re-learn).
    pub browser: bool,
    /// Sending the same call again is safe (`ReplayError::retry_safe`): a 5xx is worth one
    /// retry, an in-band error (the site took the message) is not.
    pub retry_safe: bool,
}

const fn decide(next: Next, action: &'static str) -> Decision {
    Decision {
        next,
        action,
        relearn: false,
    }
}

/// What to do after `kind` failed `tier` on its `attempt`-th try (1-based).
pub fn next(tier: u8, kind: FailureKind, attempt: u32, situation: &Situation) -> Decision {
    use FailureKind::*;
    // Tier fallback first: a refusal of one tier is not the account's fault.
    if !situation.forced {
        let to = |to: u8, raise_floor: bool| Next::Tier { to, raise_floor };
        match (tier, kind) {
            (1, AntiBot) if situation.browser => return decide(to(2, true), "tier_2"),
            (1, FormatDrift) if situation.browser => {
                return Decision {
                    next: to(3, true),
                    action: "tier_3_and_relearn",
                    relearn: true,
                };
            }
            (2, AntiBot | FormatDrift | Flow) => return decide(to(3, true), "tier_3"),
            // The page's own UI logs in as needed and computes what a fetch lacks (a
            // signature refused as 401/403), so an auth failure of tier 2 goes to tier 3 too.
            (2, Network | Upstream | Auth) => return decide(to(3, false), "tier_3"),
            _ => {}
        }
    }
    if situation.continuing && matches!(kind, FormatDrift | Upstream | Flow) {
        return decide(Next::NewConversation, "new_conversation");
    }
    match kind {
        Network if attempt < NETWORK_ATTEMPTS => decide(
            Next::Retry {
                after: BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1)),
            },
            "retry",
        ),
        Upstream if attempt < 2 && situation.retry_safe => decide(
            Next::Retry {
                after: Duration::ZERO,
            },
            "retry",
        ),
        Auth if situation.browser && !situation.relogged => decide(Next::Relogin, "relogin"),
        Auth => decide(
            Next::NextAccount {
                rate_limited: false,
            },
            "next_account",
        ),
        RateLimit => decide(Next::NextAccount { rate_limited: true }, "next_account"),
        _ => decide(Next::Fail, "fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureKind::*;

    const KINDS: [FailureKind; 7] = [
        Auth,
        RateLimit,
        AntiBot,
        FormatDrift,
        Network,
        Upstream,
        Flow,
    ];

    fn plain() -> Situation {
        Situation {
            browser: true,
            retry_safe: true,
            ..Situation::default()
        }
    }

    fn tier(to: u8, raise_floor: bool) -> Next {
        Next::Tier { to, raise_floor }
    }

    /// The whole table for a first try with the browser on and a plain request.
    #[test]
    fn every_failure_on_every_tier() {
        let retry = Next::Retry { after: BACKOFF };
        let once = Next::Retry {
            after: Duration::ZERO,
        };
        let cooled = Next::NextAccount { rate_limited: true };
        #[rustfmt::skip]
        let table: [(u8, FailureKind, Next, &str); 21] = [
            (1, Auth, Next::Relogin, "relogin"),
            (1, RateLimit, cooled, "next_account"),
            (1, AntiBot, tier(2, true), "tier_2"),
            (1, FormatDrift, tier(3, true), "tier_3_and_relearn"),
            (1, Network, retry, "retry"),
            (1, Upstream, once, "retry"),
            (1, Flow, Next::Fail, "fail"),
            (2, Auth, tier(3, false), "tier_3"),
            (2, RateLimit, cooled, "next_account"),
            (2, AntiBot, tier(3, true), "tier_3"),
            (2, FormatDrift, tier(3, true), "tier_3"),
            (2, Network, tier(3, false), "tier_3"),
            (2, Upstream, tier(3, false), "tier_3"),
            (2, Flow, tier(3, true), "tier_3"),
            (3, Auth, Next::Relogin, "relogin"),
            (3, RateLimit, cooled, "next_account"),
            (3, AntiBot, Next::Fail, "fail"),
            (3, FormatDrift, Next::Fail, "fail"),
            (3, Network, retry, "retry"),
            (3, Upstream, once, "retry"),
            (3, Flow, Next::Fail, "fail"),
        ];
        for (t, kind, expected, action) in table {
            let decision = next(t, kind, 1, &plain());
            assert_eq!(decision.next, expected, "tier {t}, {kind:?}");
            assert_eq!(decision.action, action, "tier {t}, {kind:?}");
            assert_eq!(decision.relearn, t == 1 && kind == FormatDrift);
        }
    }

    #[test]
    fn retries_back_off_and_end() {
        let waits: Vec<Next> = (1..=3)
            .map(|a| next(1, Network, a, &plain()).next)
            .collect();
        assert_eq!(
            waits,
            [
                Next::Retry { after: BACKOFF },
                Next::Retry { after: BACKOFF * 2 },
                Next::Fail
            ]
        );
        assert_eq!(next(1, Upstream, 2, &plain()).next, Next::Fail);
        // An in-band error is the site's answer: no retry.
        let in_band = Situation {
            retry_safe: false,
            ..plain()
        };
        assert_eq!(next(1, Upstream, 1, &in_band).next, Next::Fail);
    }

    #[test]
    fn a_forced_tier_stays_put_and_raises_nothing() {
        let forced = Situation {
            forced: true,
            ..plain()
        };
        for t in 1..=3 {
            for kind in KINDS {
                let decision = next(t, kind, 1, &forced);
                assert!(
                    !matches!(decision.next, Next::Tier { .. }),
                    "tier {t} {kind:?}: {decision:?}"
                );
                assert!(!decision.relearn);
            }
        }
    }

    #[test]
    fn without_the_browser_there_is_no_tier_login_or_relearn() {
        let bare = Situation {
            browser: false,
            ..plain()
        };
        assert_eq!(next(1, AntiBot, 1, &bare).next, Next::Fail);
        assert_eq!(next(1, FormatDrift, 1, &bare).next, Next::Fail);
        assert_eq!(
            next(1, Auth, 1, &bare).next,
            Next::NextAccount {
                rate_limited: false
            }
        );
    }

    #[test]
    fn a_forgotten_conversation_starts_a_new_one_and_one_relogin_per_account() {
        let continuing = Situation {
            continuing: true,
            forced: true,
            ..plain()
        };
        for kind in [FormatDrift, Upstream, Flow] {
            assert_eq!(next(1, kind, 1, &continuing).next, Next::NewConversation);
        }
        let relogged = Situation {
            relogged: true,
            ..plain()
        };
        assert_eq!(
            next(1, Auth, 1, &relogged).next,
            Next::NextAccount {
                rate_limited: false
            }
        );
    }
}
