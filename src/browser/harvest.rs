//! Turning a logged-in page into [`SessionData`].
//!
//! Invariants:
//! - Cookies come from CDP (`Storage.getCookies` of the account's browser context), so
//!   HttpOnly cookies are included; only those the browser would send to the chat page's host
//!   are kept (its own and its parent domains').
//! - Storage is read from the chat page's origin only.
//! - Nothing here logs a value: counts and names at most.

use std::time::Duration;

use chromiumoxide::Page;
use chromiumoxide::cdp::browser_protocol::browser::BrowserContextId;
use chromiumoxide::cdp::browser_protocol::network;
use chromiumoxide::cdp::browser_protocol::storage::GetCookiesParams;

use super::LoginError;
use super::page::{cdp_error, read_storage};
use super::process::Running;
use crate::session::{Cookie, SessionData};

pub(crate) struct Harvested {
    pub session: SessionData,
    /// The chat page's URL.
    pub url: String,
}

pub(crate) async fn harvest(
    running: &Running,
    context: &BrowserContextId,
    page: &Page,
) -> Result<Harvested, LoginError> {
    let storage = read_storage(page).await.map_err(cdp_error)?;
    let host = url::Url::parse(&storage.url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let params = GetCookiesParams::builder()
        .browser_context_id(context.clone())
        .build();
    let cookies = tokio::time::timeout(Duration::from_secs(15), running.execute(params))
        .await
        .map_err(|_| LoginError::Cdp("Chromium did not return the cookies in time".into()))?
        .map_err(cdp_error)?
        .cookies;
    let cookies: Vec<Cookie> = cookies
        .iter()
        .map(convert)
        .filter(|c| applies_to(c, &host))
        .collect();
    tracing::debug!(
        cookies = cookies.len(),
        local_storage = storage.local.len(),
        session_storage = storage.session.len(),
        "session harvested"
    );
    Ok(Harvested {
        session: SessionData {
            cookies,
            local_storage: storage.local,
            session_storage: storage.session,
            user_agent: Some(storage.ua),
        },
        url: storage.url,
    })
}

/// A CDP cookie as a session cookie. CDP marks session cookies with `expires == -1`.
pub(crate) fn convert(c: &network::Cookie) -> Cookie {
    Cookie {
        name: c.name.clone(),
        value: c.value.clone(),
        domain: c.domain.clone(),
        path: c.path.clone(),
        expires: (!c.session && c.expires > 0.0).then_some(c.expires as i64),
        secure: c.secure,
        http_only: c.http_only,
        host_only: !c.domain.starts_with('.'),
    }
}

/// Whether the browser would send `cookie` to `host`: same host, or a domain cookie of one
/// of its parent domains.
pub(crate) fn applies_to(cookie: &Cookie, host: &str) -> bool {
    let domain = cookie.domain.trim_start_matches('.');
    if host.eq_ignore_ascii_case(domain) {
        return true;
    }
    !cookie.host_only
        && host.len() > domain.len()
        && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
}

/// When the harvested session should be considered expired: the latest cookie expiry,
/// capped at `now + max` (session cookies live as long as the cap).
pub(crate) fn expires_at(cookies: &[Cookie], now: i64, max: Duration) -> i64 {
    let cap = now.saturating_add(max.as_secs() as i64);
    cookies
        .iter()
        .filter_map(|c| c.expires)
        .max()
        .map_or(cap, |latest| latest.min(cap))
}

#[cfg(test)]
mod unit {
    use super::*;

    fn cookie(domain: &str, expires: Option<i64>) -> Cookie {
        Cookie {
            name: "n".into(),
            value: "v".into(),
            domain: domain.into(),
            path: "/".into(),
            expires,
            secure: false,
            http_only: true,
            host_only: !domain.starts_with('.'),
        }
    }

    #[test]
    fn keeps_host_and_parent_domain_cookies_only() {
        assert!(applies_to(
            &cookie("chat.example.com", None),
            "chat.example.com"
        ));
        assert!(applies_to(
            &cookie(".example.com", None),
            "chat.example.com"
        ));
        assert!(!applies_to(
            &cookie("example.com", None),
            "chat.example.com"
        ));
        assert!(!applies_to(
            &cookie(".auth.example.com", None),
            "chat.example.com"
        ));
        assert!(!applies_to(&cookie(".ample.com", None), "chat.example.com"));
        assert!(applies_to(&cookie("127.0.0.1", None), "127.0.0.1"));
    }

    #[test]
    fn cdp_cookies_convert_with_session_cookies_unexpiring() {
        let json = serde_json::json!({
            "name": "demo_sid", "value": "s", "domain": "127.0.0.1", "path": "/",
            "expires": -1.0, "size": 9, "httpOnly": true, "secure": false, "session": true,
            "priority": "Medium", "sameParty": false, "sourceScheme": "NonSecure", "sourcePort": 80
        });
        let cdp: network::Cookie = serde_json::from_value(json).unwrap();
        let converted = convert(&cdp);
        assert_eq!(converted.expires, None);
        assert!(converted.http_only && converted.host_only);
    }

    #[test]
    fn expiry_is_the_latest_cookie_capped_by_max_session() {
        let day = Duration::from_secs(86_400);
        let cookies = [
            cookie("a", None),
            cookie("a", Some(1_000)),
            cookie("a", Some(500)),
        ];
        assert_eq!(expires_at(&cookies, 0, day), 1_000);
        assert_eq!(expires_at(&cookies, 0, Duration::from_secs(100)), 100);
        assert_eq!(expires_at(&[cookie("a", None)], 10, day), 86_410);
    }
}
