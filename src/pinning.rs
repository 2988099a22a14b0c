//! Origin pinning: which origins a flow's calls may reach with an account's session.
//!
//! Flow files are meant to be shared, so a flow must not be able to carry the sealed session
//! elsewhere. Every call of a flow (preflights, the chat call, a WebSocket) is pinned to the
//! account's own origin, plus the origins the operator lists for the service
//! (`[services.NAME] allowed_origins`) and those the learner saw the site's own page call
//! (kept in the store beside the flow, never in the flow file).
//!
//! Invariants:
//! - The check runs on the URL before any header or body is expanded, so a session
//!   reference is never expanded for a call that is refused.
//! - A URL whose host is built from session values is refused outright.
//! - `ws`/`wss` count as the origins of `http`/`https` on the same host and port.
//! - Errors name the origin, never the full URL (its query may carry values).

use url::Url;

use crate::flow::Flow;

/// The origins a flow's calls may reach for one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// ASCII serializations (`https://chat.example.com`), after the ws → http mapping.
    origins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error(
        "the call goes to {origin}, which is not the account's origin ({allowed}); list it under \
         `[services.<name>] allowed_origins` in the config if the site really calls it"
    )]
    Foreign { origin: String, allowed: String },
    #[error("the call's host is built from session values, which is never allowed")]
    HostFromSession,
}

impl Pins {
    /// The account's origin plus `extra` origins (URLs or bare origins; unparsable ones are
    /// ignored, as they could match nothing).
    pub fn new<'a>(account: &Url, extra: impl IntoIterator<Item = &'a str>) -> Self {
        let mut origins = vec![origin_of(account)];
        for text in extra {
            if let Ok(url) = Url::parse(text.trim()) {
                let origin = origin_of(&url);
                if origin != "null" && !origins.contains(&origin) {
                    origins.push(origin);
                }
            }
        }
        Self { origins }
    }

    /// Whether `url` is on one of the pinned origins.
    pub fn allows(&self, url: &Url) -> bool {
        let origin = origin_of(url);
        origin != "null" && self.origins.contains(&origin)
    }

    /// `Ok` when `url` may be called.
    pub fn check(&self, url: &Url) -> Result<(), PinError> {
        if self.allows(url) {
            return Ok(());
        }
        Err(PinError::Foreign {
            origin: origin_of(url),
            allowed: self.origins.join(", "),
        })
    }

    pub fn origins(&self) -> &[String] {
        &self.origins
    }
}

/// The origin of `url` as text, with WebSocket schemes mapped to their HTTP counterparts.
pub fn origin_of(url: &Url) -> String {
    let mapped;
    let url = match url.scheme() {
        "ws" | "wss" => {
            let mut copy = url.clone();
            let scheme = if url.scheme() == "ws" {
                "http"
            } else {
                "https"
            };
            // `set_scheme` refuses special ↔ special changes only when they are invalid;
            // ws ↔ http both are special schemes, so this succeeds.
            let _ = copy.set_scheme(scheme);
            mapped = copy;
            &mapped
        }
        _ => url,
    };
    url.origin().ascii_serialization()
}

/// The origins of a flow's calls that can be known without rendering: for every call whose
/// URL is absolute (or scheme-relative), its origin. Relative URLs resolve against the
/// account's URL and are always on its origin.
pub fn static_origins(flow: &Flow) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let later = flow.follow_up.iter().flat_map(|f| {
        f.preflight
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    format!("later turn's preflight step {}", i + 1),
                    &s.http.url,
                )
            })
            .chain(std::iter::once((
                "later turn's chat call".to_owned(),
                &f.request.url,
            )))
    });
    let calls = flow
        .preflight
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("preflight step {}", i + 1), &s.http.url))
        .chain(std::iter::once(("chat call".to_owned(), &flow.request.url)))
        .chain(later)
        .chain(flow.upload.iter().flat_map(|u| {
            u.steps
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("upload step {}", i + 1), &s.http.url))
        }));
    // A base that no real URL has: a relative URL joined to it stays on it.
    let probe = Url::parse("http://relative.invalid/").map_err(|e| e.to_string())?;
    for (call, template) in calls {
        let head = template.split(['/', '?', '#']).take(3).collect::<Vec<_>>();
        let absolute = template.contains("://") || template.starts_with("//");
        if absolute && head.iter().any(|part| part.contains("{{")) {
            return Err(format!(
                "the {call}'s scheme or host is templated; a call's origin must be fixed"
            ));
        }
        let Ok(url) = probe.join(template) else {
            continue;
        };
        if url.host_str() != Some("relative.invalid") {
            out.push((call, origin_of(&url)));
        }
    }
    Ok(out)
}

/// Checks a flow being imported: every call with a fixed origin must be on the origin of an
/// account of its service or on one the operator lists (`extra`). Imported flows get no
/// learned origins: those come only from this machine's own learning.
pub fn check_import<'a>(
    flow: &Flow,
    account_urls: impl IntoIterator<Item = &'a Url>,
    extra: &[String],
) -> Result<(), String> {
    let mut allowed: Vec<String> = account_urls.into_iter().map(origin_of).collect();
    allowed.extend(
        extra
            .iter()
            .filter_map(|e| Url::parse(e.trim()).ok())
            .map(|u| origin_of(&u)),
    );
    for (call, origin) in static_origins(flow)? {
        if !allowed.contains(&origin) {
            return Err(format!(
                "the {call} goes to {origin}, which is neither the origin of an account of \
                 `{}` nor listed under `[services.{}] allowed_origins`; a flow may only call \
                 its account's own site (add the account first, or list the origin)",
                flow.service, flow.service
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn the_account_origin_and_listed_ones_are_allowed() {
        let pins = Pins::new(
            &url("https://chat.example.com/app"),
            ["https://api.example.com", "not a url"],
        );
        assert!(pins.allows(&url("https://chat.example.com/api/x?q=1")));
        assert!(pins.allows(&url("wss://chat.example.com/ws")));
        assert!(pins.allows(&url("https://api.example.com/v1")));
        for bad in [
            "http://chat.example.com/",
            "https://chat.example.com:8443/",
            "https://evil.test/",
            "https://chat.example.com.evil.test/",
            "ws://chat.example.com/",
            "data:text/plain,x",
        ] {
            assert!(!pins.allows(&url(bad)), "{bad}");
        }
        let err = pins
            .check(&url("https://evil.test/steal?token=s3cr3t"))
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("https://evil.test"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn static_origins_of_a_flow() {
        let flow = Flow::from_json(
            r#"{"service":"s","preflight":[{"url":"/chat"},{"url":"//cdn.test/x"}],
                "request":{"url":"https://api.test/chat"},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        assert_eq!(
            static_origins(&flow).unwrap(),
            vec![
                ("preflight step 2".to_owned(), "http://cdn.test".to_owned()),
                ("chat call".to_owned(), "https://api.test".to_owned()),
            ]
        );
        let later = Flow::from_json(
            r#"{"service":"s","request":{"url":"/chat"},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}},
                "follow_up":{"request":{"url":"https://other.test/next"}}}"#,
        )
        .unwrap();
        assert_eq!(
            static_origins(&later).unwrap(),
            vec![(
                "later turn's chat call".to_owned(),
                "https://other.test".to_owned()
            )]
        );
        let templated = Flow::from_json(
            r#"{"service":"s","request":{"url":"https://{{preflight.host}}/chat"},
                "response":{"transport":"sse","text":{"path":"/t","mode":"delta"}}}"#,
        )
        .unwrap();
        assert!(
            static_origins(&templated)
                .unwrap_err()
                .contains("templated")
        );
    }
}
