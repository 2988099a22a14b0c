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
#[derive(Clone, Default)]
pub struct CookieJar {
    cookies: Vec<Cookie>,
}

impl CookieJar {
    pub fn new(cookies: Vec<Cookie>) -> Self {
        Self { cookies }
    }

    pub fn cookies(&self) -> &[Cookie] {
        &self.cookies
    }

    /// The `Cookie` header value for `url`, or `None` when no cookie applies.
    pub fn header_for(&self, url: &Url, now: i64) -> Option<String> {
        let host = url.host_str()?;
        let secure = url.scheme() == "https";
        let path = url.path();
        let mut header = String::new();
        for cookie in &self.cookies {
            if cookie.expires.is_some_and(|e| e <= now)
                || (cookie.secure && !secure && !is_loopback(host))
                || !domain_matches(cookie, host)
                || !path_matches(&cookie.path, path)
            {
                continue;
            }
            if !header.is_empty() {
                header.push_str("; ");
            }
            header.push_str(&cookie.name);
            header.push('=');
            header.push_str(&cookie.value);
        }
        (!header.is_empty()).then_some(header)
    }

    /// Takes a `Set-Cookie` header received from `url`. Returns whether the jar changed.
    pub fn absorb(&mut self, set_cookie: &str, url: &Url, now: i64) -> bool {
        let Some(cookie) = parse_set_cookie(set_cookie, url, now) else {
            return false;
        };
        let existing = self.cookies.iter().position(|c| {
            c.name == cookie.name && c.domain == cookie.domain && c.path == cookie.path
        });
        match existing {
            Some(i) if self.cookies[i] == cookie => false,
            Some(i) => {
                self.cookies[i] = cookie;
                true
            }
            None => {
                self.cookies.push(cookie);
                true
            }
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

fn domain_matches(cookie: &Cookie, host: &str) -> bool {
    let domain = cookie.domain.trim_start_matches('.');
    if cookie.host_only && !cookie.domain.starts_with('.') {
        return host.eq_ignore_ascii_case(domain);
    }
    host.eq_ignore_ascii_case(domain)
        || (host.len() > domain.len()
            && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
            && host.as_bytes()[host.len() - domain.len() - 1] == b'.')
}

fn path_matches(cookie_path: &str, path: &str) -> bool {
    path == cookie_path
        || (path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || path[cookie_path.len()..].starts_with('/')))
}

fn parse_set_cookie(header: &str, url: &Url, now: i64) -> Option<Cookie> {
    let mut parts = header.split(';');
    let (name, value) = parts.next()?.split_once('=')?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let mut cookie = Cookie {
        name: name.to_owned(),
        value: value.trim().trim_matches('"').to_owned(),
        domain: url.host_str()?.to_owned(),
        path: default_cookie_path(url.path()),
        expires: None,
        secure: false,
        http_only: false,
        host_only: true,
    };
    for attribute in parts {
        let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
        let val = val.trim();
        match key.trim().to_ascii_lowercase().as_str() {
            "domain" if !val.is_empty() => {
                cookie.domain = format!(".{}", val.trim_start_matches('.'));
                cookie.host_only = false;
            }
            "path" if val.starts_with('/') => cookie.path = val.to_owned(),
            "max-age" => {
                if let Ok(secs) = val.parse::<i64>() {
                    cookie.expires = Some(now.saturating_add(secs));
                }
            }
            "expires" if cookie.expires.is_none() => {
                cookie.expires = httpdate::parse_http_date(val).ok().map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64)
                });
            }
            "secure" => cookie.secure = true,
            "httponly" => cookie.http_only = true,
            _ => {}
        }
    }
    Some(cookie)
}

fn default_cookie_path(request_path: &str) -> String {
    match request_path.rfind('/') {
        Some(0) | None => "/".to_owned(),
        Some(i) => request_path[..i].to_owned(),
    }
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
        assert_eq!(jar.header_for(&url, 0).as_deref(), Some("a=1; b=1"));
        let url = Url::parse("https://chat.example.com/apiary").unwrap();
        assert_eq!(jar.header_for(&url, 0).as_deref(), Some("a=1"));
        let url = Url::parse("https://sub.chat.example.com/").unwrap();
        assert_eq!(jar.header_for(&url, 0).as_deref(), Some("a=1"));
    }

    #[test]
    fn jar_absorbs_set_cookie_and_drops_expired() {
        let mut jar = CookieJar::default();
        let url = Url::parse("http://127.0.0.1:9/api/x").unwrap();
        assert!(jar.absorb("sid=new; Path=/; HttpOnly; Max-Age=60", &url, 100));
        assert!(!jar.absorb("sid=new; Path=/; HttpOnly; Max-Age=60", &url, 100));
        assert_eq!(jar.header_for(&url, 150).as_deref(), Some("sid=new"));
        assert_eq!(jar.header_for(&url, 161), None);
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
