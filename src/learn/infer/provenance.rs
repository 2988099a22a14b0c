//! Where a value the page sent came from: an earlier response (JSON leaf, header, or text
//! found by a regex built from the markup around it), a cookie, a `<meta>` tag of the chat
//! page, or a storage entry (whole, or a leaf inside a JSON-encoded entry).

use serde_json::Value;

use crate::flow::Extract;
use crate::learn::decoder::strings;
use crate::recording::{Exchange, Recording};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Origin {
    /// The response of an earlier exchange.
    Response {
        exchange: usize,
        extract: Extract,
        /// The JSON key (or header name, or markup attribute) it sat under, for naming.
        key: Option<String>,
    },
    /// A `<meta>` tag of the chat page whose load the recording did not capture.
    Meta(String),
    Cookie(String),
    Storage {
        area: Area,
        key: String,
        /// A pointer inside the JSON-encoded entry.
        pointer: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Local,
    Session,
}

impl Origin {
    /// The template source for a value from the session (`None` for preflight values).
    pub(crate) fn session_source(&self) -> Option<String> {
        match self {
            Origin::Cookie(name) => Some(format!("session.cookie.{name}")),
            Origin::Storage { area, key, pointer } => {
                let area = match area {
                    Area::Local => "local",
                    Area::Session => "session",
                };
                let suffix = pointer
                    .as_deref()
                    .map(|p| format!("#{p}"))
                    .unwrap_or_default();
                Some(format!("session.{area}.{key}{suffix}"))
            }
            Origin::Response { .. } | Origin::Meta(_) => None,
        }
    }
}

/// Resource types whose responses may carry values the page reuses (not scripts, styles or
/// media: a value found there is static).
fn may_carry_values(exchange: &Exchange) -> bool {
    let kind = exchange.resource_type.to_ascii_lowercase();
    !matches!(
        kind.as_str(),
        "script"
            | "stylesheet"
            | "image"
            | "font"
            | "media"
            | "manifest"
            | "texttrack"
            | "ping"
            | "cspviolationreport"
            | "preflight"
            | "signedexchange"
    ) && !exchange.method.eq_ignore_ascii_case("OPTIONS")
        && exchange.error.is_none()
}

pub(crate) struct Sources<'r> {
    recording: &'r Recording,
    /// Each exchange's response body parsed as JSON, when it is JSON.
    json: Vec<Option<Value>>,
}

impl<'r> Sources<'r> {
    pub(crate) fn new(recording: &'r Recording) -> Self {
        let json = recording
            .exchanges
            .iter()
            .map(|e| {
                e.response_body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(&b.0).ok())
            })
            .collect();
        Self { recording, json }
    }

    /// Where `value`, sent by exchange `consumer` at `at_ms` (recording time), came from.
    /// Earlier responses are searched first (the earliest that holds the value without having
    /// been sent it, else the earliest that echoes it), then cookies, the chat page's `<meta>`
    /// tags, localStorage and sessionStorage.
    pub(crate) fn find(&self, value: &str, consumer: usize, at_ms: f64) -> Option<Origin> {
        if value.is_empty() {
            return None;
        }
        // A response that made the value up first; failing that, one that echoes what its
        // request sent (a client-made id the server confirms: replaying that step makes a new
        // one, and its response tells which).
        for echoes in [false, true] {
            for (i, exchange) in self.recording.exchanges.iter().enumerate() {
                if i == consumer || exchange.started_ms > at_ms || !may_carry_values(exchange) {
                    continue;
                }
                if exchange.finished_ms.is_some_and(|f| f > at_ms + 1.0) {
                    continue;
                }
                if sent(exchange, value) != echoes {
                    continue;
                }
                if let Some((extract, key)) = self.in_response(i, exchange, value) {
                    return Some(Origin::Response {
                        exchange: i,
                        extract,
                        key,
                    });
                }
            }
        }
        self.find_in_session(value)
    }

    /// Where `value` came from when the session holds it: a cookie, a `<meta>` tag of the
    /// chat page, localStorage or sessionStorage (whole, or a leaf of a JSON entry).
    pub(crate) fn find_in_session(&self, value: &str) -> Option<Origin> {
        if value.is_empty() {
            return None;
        }
        let storage = &self.recording.storage;
        for (name, cookie) in &storage.cookies {
            let decoded = percent_encoding::percent_decode_str(cookie).decode_utf8_lossy();
            if cookie == value || decoded == value {
                return Some(Origin::Cookie(name.clone()));
            }
        }
        for (name, content) in &storage.meta {
            if content == value {
                return Some(Origin::Meta(name.clone()));
            }
        }
        for (area, entries) in [
            (Area::Local, &storage.local_storage),
            (Area::Session, &storage.session_storage),
        ] {
            for (key, entry) in entries {
                if entry == value {
                    return Some(Origin::Storage {
                        area,
                        key: key.clone(),
                        pointer: None,
                    });
                }
            }
            for (key, entry) in entries {
                let Ok(doc) = serde_json::from_str::<Value>(entry) else {
                    continue;
                };
                if let Some((pointer, _)) = strings(&doc).into_iter().find(|(_, s)| *s == value) {
                    return Some(Origin::Storage {
                        area,
                        key: key.clone(),
                        pointer: Some(pointer),
                    });
                }
            }
        }
        None
    }

    fn in_response(
        &self,
        index: usize,
        exchange: &Exchange,
        value: &str,
    ) -> Option<(Extract, Option<String>)> {
        for (name, header) in &exchange.response_headers {
            if name.eq_ignore_ascii_case("set-cookie") {
                continue;
            }
            if header == value {
                return Some((
                    Extract::Header {
                        header: name.to_ascii_lowercase(),
                    },
                    Some(name.to_ascii_lowercase()),
                ));
            }
        }
        let body = exchange.response_body.as_ref()?;
        if let Some(Some(doc)) = self.json.get(index) {
            for (pointer, leaf) in crate::learn::decoder::scalars(doc) {
                let matches = match leaf {
                    Value::String(s) => s == value,
                    Value::Number(n) => n.to_string() == value,
                    _ => false,
                };
                if matches {
                    let key = pointer.rsplit('/').next().map(unescape);
                    return Some((Extract::Pointer(pointer), key));
                }
            }
        }
        let text = std::str::from_utf8(&body.0).ok()?;
        if !text.contains(value) {
            return None;
        }
        let regex = regex_for(text, value)?;
        let key = markup_key(text, value);
        Some((Extract::Regex { regex }, key))
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Whether the exchange's request carried `value` (then its response only echoes it).
fn sent(exchange: &Exchange, value: &str) -> bool {
    let decoded_url = percent_encoding::percent_decode_str(&exchange.url).decode_utf8_lossy();
    decoded_url.contains(value)
        || exchange
            .request_body
            .as_ref()
            .and_then(|b| b.as_str())
            .is_some_and(|b| b.contains(value))
        || exchange
            .request_headers
            .iter()
            .any(|(n, v)| !n.eq_ignore_ascii_case("cookie") && v.contains(value))
}

/// Escapes regex metacharacters (only those; `-` and `"` stay readable).
pub(crate) fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(
            c,
            '\\' | '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn class_escape(c: char) -> String {
    if matches!(c, ']' | '\\' | '^' | '-' | '[') {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

/// A regex whose first capture group, over `text`, is `value`: the markup before the value
/// (from the tag it sits in, e.g. `<meta name="request-token" content="`), then everything up to
/// the character that ends it.
pub(crate) fn regex_for(text: &str, value: &str) -> Option<String> {
    let at = text.find(value)?;
    let before = &text[..at];
    let after = &text[at + value.len()..];
    let (capture, end, end_len) = match after.chars().next() {
        Some(c) if !c.is_alphanumeric() && c != '_' => (
            format!("([^{}]+)", class_escape(c)),
            regex_escape(&c.to_string()),
            c.len_utf8(),
        ),
        _ => ("([A-Za-z0-9_-]+)".to_owned(), String::new(), 0),
    };
    // (prefix, text after the end character): the value's own tag; the same with the rest
    // of the tag after the value (attributes in another order); the tag before as well; then
    // plain character windows.
    let rest_of_tag = after
        .get(end_len..)
        .and_then(|rest| rest.find('>').map(|gt| &rest[..=gt]))
        .unwrap_or_default();
    let mut candidates: Vec<(&str, &str)> = Vec::new();
    if let Some(lt) = before.rfind('<')
        && at - lt <= 200
    {
        candidates.push((&before[lt..], ""));
        candidates.push((&before[lt..], rest_of_tag));
        if let Some(lt2) = before[..lt].rfind('<')
            && at - lt2 <= 400
        {
            candidates.push((&before[lt2..], ""));
        }
    }
    for len in [24usize, 48, 96] {
        let start = before
            .char_indices()
            .rev()
            .nth(len.saturating_sub(1))
            .map_or(0, |(i, _)| i);
        candidates.push((&before[start..], ""));
    }
    for (prefix, suffix) in candidates {
        if prefix.is_empty() {
            continue;
        }
        let candidate = format!(
            "{}{capture}{end}{}",
            regex_escape(prefix),
            regex_escape(suffix)
        );
        let Ok(regex) = regex::Regex::new(&candidate) else {
            continue;
        };
        if regex
            .captures(text)
            .and_then(|c| c.get(1))
            .is_some_and(|m| m.as_str() == value)
        {
            return Some(candidate);
        }
    }
    None
}

/// A name for a value found in markup: the `name`/`id`/`property` attribute of its tag.
fn markup_key(text: &str, value: &str) -> Option<String> {
    let at = text.find(value)?;
    let lt = text[..at].rfind('<')?;
    let gt = text[at..].find('>').map_or(text.len(), |g| at + g);
    let tag = &text[lt..gt];
    for attribute in ["name=\"", "id=\"", "property=\"", "name='", "id='"] {
        if let Some(start) = tag.find(attribute) {
            let rest = &tag[start + attribute.len()..];
            let quote = attribute.chars().last().unwrap_or('"');
            if let Some(end) = rest.find(quote) {
                let name = &rest[..end];
                if !name.is_empty() && !name.contains(value) {
                    return Some(name.to_owned());
                }
            }
        }
    }
    None
}

/// The regex that reads `<meta name="NAME" content="…">`.
pub(crate) fn meta_regex(name: &str) -> String {
    format!("<meta name=\"{}\" content=\"([^\"]+)\"", regex_escape(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_are_built_from_the_surrounding_markup() {
        let html = r#"<head><meta charset="utf-8"><meta name="request-token" content="abc123XYZ"><meta name="x" content="1"></head>"#;
        let regex = regex_for(html, "abc123XYZ").unwrap();
        assert_eq!(regex, r#"<meta name="request-token" content="([^"]+)""#);
        assert_eq!(regex, meta_regex("request-token"));
        assert_eq!(
            markup_key(html, "abc123XYZ").as_deref(),
            Some("request-token")
        );
        // Content before name: the value's own tag start is not unique, a longer prefix is.
        let html = r#"<meta content="zzz"><meta content="tok999abc" name="csrf">"#;
        let regex = regex_for(html, "tok999abc").unwrap();
        assert_eq!(regex, r#"<meta content="([^"]+)" name="csrf">"#);
        let found = regex::Regex::new(&regex).unwrap().captures(html).unwrap();
        assert_eq!(&found[1], "tok999abc");
        let script = r#"<script>window.__boot = {"user":"u1","token":"t0k3n.abc"};</script>"#;
        let regex = regex_for(script, "t0k3n.abc").unwrap();
        let found = regex::Regex::new(&regex).unwrap().captures(script).unwrap();
        assert_eq!(&found[1], "t0k3n.abc");
    }
}
