//! Session material: the cookies and storage a site's own front end uses, and the cookie jar
//! that replay sends from.
//!
//! Invariants:
//! - `SessionData` is only ever stored sealed (`store::sessions`); its `Debug` output shows
//!   names, never values.
//! - Imported files are accepted in the formats people have: the JSON array that browser
//!   cookie-export extensions write, Netscape `cookies.txt`, and Playwright's `storageState`
//!   (cookies plus localStorage).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionData {
    #[serde(default)]
    pub cookies: Vec<Cookie>,
    #[serde(default)]
    pub local_storage: BTreeMap<String, String>,
    #[serde(default)]
    pub session_storage: BTreeMap<String, String>,
    #[serde(default)]
    pub user_agent: Option<String>,
}

impl fmt::Debug for SessionData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionData")
            .field(
                "cookies",
                &self.cookies.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field("local_storage", &self.local_storage.keys())
            .field("session_storage", &self.session_storage.keys())
            .finish()
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    /// Host the cookie belongs to; a leading dot (or `host_only == false`) covers subdomains.
    pub domain: String,
    #[serde(default = "root_path")]
    pub path: String,
    /// Unix seconds; `None` for a session cookie.
    #[serde(default)]
    pub expires: Option<i64>,
    #[serde(default)]
    pub secure: bool,
    #[serde(default)]
    pub http_only: bool,
    #[serde(default)]
    pub host_only: bool,
}

fn root_path() -> String {
    "/".to_owned()
}

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cookie({}@{}{})", self.name, self.domain, self.path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "cookie file is neither a JSON cookie export, a Playwright storageState nor a Netscape cookies.txt: {0}"
    )]
    Unrecognized(String),
    #[error("cookie file holds no cookie for {0}")]
    Empty(String),
}

impl SessionData {
    /// Parses an imported cookie file. `site` fills in a missing domain and selects the
    /// localStorage of the matching origin in a storageState.
    pub fn import(text: &str, site: &Url) -> Result<Self, ImportError> {
        let host = site.host_str().unwrap_or_default().to_owned();
        let trimmed = text.trim_start();
        let mut data = if trimmed.starts_with('[') || trimmed.starts_with('{') {
            let value: Value = serde_json::from_str(trimmed)
                .map_err(|e| ImportError::Unrecognized(format!("invalid JSON: {e}")))?;
            Self::from_json_export(&value, site)?
        } else {
            Self::from_netscape(text)?
        };
        for cookie in &mut data.cookies {
            if cookie.domain.is_empty() {
                cookie.domain = host.clone();
                cookie.host_only = true;
            }
        }
        if data.cookies.is_empty() && data.local_storage.is_empty() {
            return Err(ImportError::Empty(host));
        }
        Ok(data)
    }

    fn from_json_export(value: &Value, site: &Url) -> Result<Self, ImportError> {
        let mut data = SessionData::default();
        let cookies = match value {
            Value::Array(items) => items.as_slice(),
            Value::Object(map) => {
                // Playwright storageState: {"cookies": [...], "origins": [{origin, localStorage}]}
                if let Some(Value::Array(origins)) = map.get("origins") {
                    let want = site.origin().ascii_serialization();
                    for origin in origins {
                        if origin.get("origin").and_then(Value::as_str) != Some(want.as_str()) {
                            continue;
                        }
                        for entry in origin
                            .get("localStorage")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                        {
                            if let (Some(k), Some(v)) = (
                                entry.get("name").and_then(Value::as_str),
                                entry.get("value").and_then(Value::as_str),
                            ) {
                                data.local_storage.insert(k.to_owned(), v.to_owned());
                            }
                        }
                    }
                }
                match map.get("cookies") {
                    Some(Value::Array(items)) => items.as_slice(),
                    _ => {
                        return Err(ImportError::Unrecognized(
                            "a JSON object without a `cookies` list".into(),
                        ));
                    }
                }
            }
            _ => return Err(ImportError::Unrecognized("JSON is not a list".into())),
        };
        for (index, item) in cookies.iter().enumerate() {
            let field = |name: &str| item.get(name);
            let text = |name: &str| field(name).and_then(Value::as_str).map(str::to_owned);
            let (Some(name), Some(value)) = (text("name"), text("value")) else {
                return Err(ImportError::Unrecognized(format!(
                    "cookie #{index} lacks `name` or `value`"
                )));
            };
            let expires = ["expirationDate", "expires", "expiry"]
                .iter()
                .find_map(|k| field(k).and_then(Value::as_f64))
                .filter(|e| *e > 0.0)
                .map(|e| e as i64);
            let domain = text("domain").unwrap_or_default();
            data.cookies.push(Cookie {
                host_only: field("hostOnly")
                    .and_then(Value::as_bool)
                    .unwrap_or(!domain.starts_with('.')),
                name,
                value,
                domain,
                path: text("path").unwrap_or_else(root_path),
                expires,
                secure: field("secure").and_then(Value::as_bool).unwrap_or(false),
                http_only: field("httpOnly").and_then(Value::as_bool).unwrap_or(false),
            });
        }
        Ok(data)
    }

    fn from_netscape(text: &str) -> Result<Self, ImportError> {
        let mut data = SessionData::default();
        for (number, line) in text.lines().enumerate() {
            // curl marks HttpOnly cookies with this prefix on an otherwise normal line.
            let (line, http_only) = match line.strip_prefix("#HttpOnly_") {
                Some(rest) => (rest, true),
                None => (line, false),
            };
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() < 7 {
                return Err(ImportError::Unrecognized(format!(
                    "line {}: expected 7 tab-separated fields, found {}",
                    number + 1,
                    fields.len()
                )));
            }
            let expires = fields[4].trim().parse::<i64>().ok().filter(|e| *e > 0);
            data.cookies.push(Cookie {
                domain: fields[0].to_owned(),
                host_only: !fields[1].eq_ignore_ascii_case("TRUE"),
                path: fields[2].to_owned(),
                secure: fields[3].eq_ignore_ascii_case("TRUE"),
                expires,
                name: fields[5].to_owned(),
                value: fields[6].trim_end_matches(['\r', '\n']).to_owned(),
                http_only,
            });
        }
        Ok(data)
    }

    /// The latest expiry among the cookies, when every cookie has one.
    pub fn latest_expiry(&self) -> Option<i64> {
        self.cookies
            .iter()
            .map(|c| c.expires)
            .collect::<Option<Vec<_>>>()
            .and_then(|e| e.into_iter().max())
    }
}

/// The cookies a request carries: the session's, plus what the site sets during this replay.
///
/// The storage and matching rules are RFC 6265's, from the `cookie_store` crate: a
/// `Domain` attribute the response's host does not domain-match is ignored, `Max-Age=0` (or a
/// past `Expires`) removes the cookie, `Max-Age` takes precedence over `Expires`, and `Secure`
/// cookies go to https (and loopback) only. No public-suffix list is loaded: a cookie set for
/// a whole suffix could only reach the origins a flow is pinned to (`pinning`).
#[derive(Clone, Default)]
pub struct CookieJar {
    store: cookie_store::CookieStore,
}

impl CookieJar {
    /// A jar holding `cookies` (as stored in a session). Cookies that are unusable as stored
    /// (no domain, say) are left out.
    pub fn new(cookies: Vec<Cookie>) -> Self {
        let mut store = cookie_store::CookieStore::default();
        for cookie in &cookies {
            let Some(url) = origin_url(cookie) else {
                continue;
            };
            let mut raw = cookie_store::RawCookie::new(cookie.name.clone(), cookie.value.clone());
            raw.set_path(cookie.path.clone());
            if !cookie.host_only || cookie.domain.starts_with('.') {
                raw.set_domain(cookie.domain.trim_start_matches('.').to_owned());
            }
            raw.set_secure(cookie.secure);
            raw.set_http_only(cookie.http_only);
            if let Some(at) = cookie
                .expires
                .and_then(|e| time::OffsetDateTime::from_unix_timestamp(e).ok())
            {
                raw.set_expires(at);
            }
            // A stored cookie that has since expired is simply not inserted.
            let _ = store.insert_raw(&raw, &url);
        }
        Self { store }
    }

    /// The unexpired cookies, as a session stores them.
    pub fn cookies(&self) -> Vec<Cookie> {
        self.store
            .iter_unexpired()
            .filter_map(|c| {
                let domain = String::from(&c.domain);
                let host_only = matches!(c.domain, cookie_store::CookieDomain::HostOnly(_));
                Some(Cookie {
                    name: c.name().to_owned(),
                    value: c.value().to_owned(),
                    domain: if host_only {
                        domain
                    } else {
                        format!(".{domain}")
                    },
                    path: String::from(&c.path),
                    expires: match c.expires {
                        cookie_store::CookieExpiration::AtUtc(at) => Some(at.unix_timestamp()),
                        cookie_store::CookieExpiration::SessionEnd => None,
                    },
                    secure: c.secure().unwrap_or(false),
                    http_only: c.http_only().unwrap_or(false),
                    host_only,
                })
                .filter(|c| !c.domain.is_empty())
            })
            .collect()
    }

    /// The `Cookie` header value for `url`, or `None` when no cookie applies.
    pub fn header_for(&self, url: &Url) -> Option<String> {
        let mut header = String::new();
        for (name, value) in self.store.get_request_values(url) {
            if !header.is_empty() {
                header.push_str("; ");
            }
            header.push_str(name);
            header.push('=');
            header.push_str(value);
        }
        (!header.is_empty()).then_some(header)
    }

    /// Takes a `Set-Cookie` header received from `url`. Returns whether the jar changed (a
    /// site that sets the same value again changes nothing, so nothing needs storing).
    pub fn absorb(&mut self, set_cookie: &str, url: &Url) -> bool {
        let Ok(cookie) = cookie_store::Cookie::parse(set_cookie, url) else {
            return false;
        };
        let key = (
            String::from(&cookie.domain),
            String::from(&cookie.path),
            cookie.name().to_owned(),
        );
        let before = self
            .store
            .get(&key.0, &key.1, &key.2)
            .map(|c| (c.value().to_owned(), c.expires.clone()));
        let cookie = cookie.into_owned();
        if self.store.insert(cookie, url).is_err() {
            return false;
        }
        let after = self
            .store
            .get(&key.0, &key.1, &key.2)
            .map(|c| (c.value().to_owned(), c.expires.clone()));
        before != after
    }
}

/// A URL on the cookie's own host and path: what it is inserted as received from.
fn origin_url(cookie: &Cookie) -> Option<Url> {
    let host = cookie.domain.trim_start_matches('.');
    if host.is_empty() {
        return None;
    }
    let scheme = if cookie.secure { "https" } else { "http" };
    Url::parse(&format!("{scheme}://{host}{}", cookie.path)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> Url {
        Url::parse("https://chat.example.com/").unwrap()
    }

    #[test]
    fn imports_extension_json_export() {
        let text = r#"[{"domain":".example.com","expirationDate":1900000000.5,"hostOnly":false,
            "httpOnly":true,"name":"sid","path":"/","secure":true,"value":"abc"}]"#;
        let data = SessionData::import(text, &site()).unwrap();
        assert_eq!(data.cookies.len(), 1);
        let cookie = &data.cookies[0];
        assert_eq!(
            (cookie.name.as_str(), cookie.value.as_str()),
            ("sid", "abc")
        );
        assert!(cookie.http_only && cookie.secure && !cookie.host_only);
        assert_eq!(cookie.expires, Some(1_900_000_000));
    }

    #[test]
    fn imports_netscape_cookies_txt_with_httponly_prefix() {
        let text = "# Netscape HTTP Cookie File\n\
            #HttpOnly_chat.example.com\tFALSE\t/\tTRUE\t0\tsid\tabc\n\
            .example.com\tTRUE\t/\tFALSE\t1900000000\ttheme\tdark\n";
        let data = SessionData::import(text, &site()).unwrap();
        assert_eq!(data.cookies.len(), 2);
        assert!(data.cookies[0].http_only && data.cookies[0].host_only);
        assert_eq!(data.cookies[0].expires, None);
        assert_eq!(data.cookies[1].expires, Some(1_900_000_000));
    }

    #[test]
    fn imports_storage_state_with_local_storage_of_the_site() {
        let text = r#"{"cookies":[{"name":"sid","value":"abc","domain":"chat.example.com","path":"/","expires":-1}],
            "origins":[{"origin":"https://chat.example.com","localStorage":[{"name":"token","value":"t1"}]},
                       {"origin":"https://other.test","localStorage":[{"name":"token","value":"no"}]}]}"#;
        let data = SessionData::import(text, &site()).unwrap();
        assert_eq!(
            data.local_storage.get("token").map(String::as_str),
            Some("t1")
        );
        assert_eq!(data.cookies[0].expires, None);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = SessionData::import("hello world", &site()).unwrap_err();
        assert!(err.to_string().contains("tab-separated"), "{err}");
        assert!(SessionData::import("[]", &site()).is_err());
    }

    #[test]
    fn jar_sends_matching_cookies_only() {
        let jar = CookieJar::new(vec![
            cookie("a", ".example.com", "/", false),
            cookie("b", "chat.example.com", "/api", true),
            cookie("c", "other.com", "/", false),
        ]);
        let url = Url::parse("https://chat.example.com/api/chat").unwrap();
        let mut sent = jar.header_for(&url).unwrap();
        sent = sort_pairs(&sent);
        assert_eq!(sent, "a=1; b=1");
        let url = Url::parse("https://chat.example.com/apiary").unwrap();
        assert_eq!(jar.header_for(&url).as_deref(), Some("a=1"));
        let url = Url::parse("https://sub.chat.example.com/").unwrap();
        assert_eq!(jar.header_for(&url).as_deref(), Some("a=1"));
        let url = Url::parse("https://evil.test/").unwrap();
        assert_eq!(jar.header_for(&url), None);
    }

    fn sort_pairs(header: &str) -> String {
        let mut pairs: Vec<&str> = header.split("; ").collect();
        pairs.sort();
        pairs.join("; ")
    }

    /// RFC 6265's storage rules: a foreign `Domain` is ignored, `Max-Age<=0` deletes, and
    /// setting the same value again is no change.
    #[test]
    fn jar_follows_the_storage_rules() {
        let mut jar = CookieJar::default();
        let url = Url::parse("http://127.0.0.1:9/api/x").unwrap();
        assert!(jar.absorb("sid=new; Path=/; HttpOnly; Max-Age=60", &url));
        assert!(!jar.absorb("sid=new; Path=/; HttpOnly; Max-Age=60", &url));
        assert_eq!(jar.header_for(&url).as_deref(), Some("sid=new"));
        assert!(jar.absorb("sid=gone; Path=/; Max-Age=0", &url));
        assert_eq!(jar.header_for(&url), None);
        assert!(jar.cookies().is_empty());

        let site = Url::parse("https://chat.example.com/").unwrap();
        assert!(!jar.absorb("x=1; Domain=evil.test; Path=/", &site));
        assert!(!jar.absorb("x=1; Domain=other-example.com; Path=/", &site));
        assert!(jar.absorb("wide=1; Domain=example.com; Path=/", &site));
        // An already-expired cookie for a name the jar lacks is not stored.
        assert!(!jar.absorb("t=1; Path=/; Max-Age=-5", &site));
        let api = Url::parse("https://api.example.com/").unwrap();
        assert_eq!(jar.header_for(&api).as_deref(), Some("wide=1"));
        assert!(jar.absorb("secret=1; Path=/; Secure", &site));
        let plain = Url::parse("http://chat.example.com/").unwrap();
        assert!(
            !jar.header_for(&plain)
                .unwrap_or_default()
                .contains("secret")
        );
        // Max-Age wins over Expires, whichever comes first.
        assert!(jar.absorb(
            "m=1; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Max-Age=60",
            &site
        ));
        assert!(jar.header_for(&site).unwrap().contains("m=1"));
        // What the jar keeps round-trips through a session.
        let kept = jar.cookies();
        let again = CookieJar::new(kept.clone());
        assert_eq!(
            sort_pairs(&again.header_for(&site).unwrap()),
            sort_pairs(&jar.header_for(&site).unwrap())
        );
        assert!(
            kept.iter()
                .any(|c| c.name == "wide" && c.domain == ".example.com")
        );
    }

    #[test]
    fn debug_output_holds_no_values() {
        let data = SessionData {
            cookies: vec![cookie("sid", "x.com", "/", false)],
            local_storage: [("token".to_owned(), "s3cret".to_owned())].into(),
            ..Default::default()
        };
        let shown = format!("{data:?}");
        assert!(shown.contains("sid") && !shown.contains("s3cret"));
    }

    fn cookie(name: &str, domain: &str, path: &str, host_only: bool) -> Cookie {
        Cookie {
            name: name.into(),
            value: "1".into(),
            domain: domain.into(),
            path: path.into(),
            expires: None,
            secure: false,
            http_only: false,
            host_only,
        }
    }
}
