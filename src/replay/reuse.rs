//! Reusing preflight values that belong to the session, not to the request.
//!
//! Sites often make the page fetch a CSRF token or a build id before the chat call. Such a
//! value stays the same for the whole session, so fetching it again on every request only
//! adds a round trip. A preflight is reusable when it is a GET (or HEAD), extracts something,
//! and its request uses nothing per request: no body slots, and no placeholder but session
//! values and values of other reusable preflights. Its values are kept per session and flow
//! version for a while.
//!
//! A reused value can go stale before the session does; the replayer then drops the session's
//! reused values and runs the whole flow again once (see `Replayer::start`).

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::flow::{Flow, HttpTemplate};

/// Reusable preflight values per session, and which preflights are reusable per flow.
///
/// Keys are hashes (a lookup allocates nothing); each entry also holds what it was stored
/// for, and a lookup checks it, so a hash collision can never hand one session's values to
/// another.
pub struct Reused {
    values: moka::sync::Cache<u64, Arc<Entry>>,
    policies: moka::sync::Cache<u64, Arc<Policy>>,
}

struct Entry {
    session: String,
    flow: String,
    version: u32,
    step: usize,
    values: BTreeMap<String, String>,
}

struct Policy {
    flow: String,
    version: u32,
    reusable: Arc<[bool]>,
}

impl Reused {
    pub fn new(ttl: Duration) -> Self {
        Self {
            values: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            policies: moka::sync::Cache::builder().max_capacity(1024).build(),
        }
    }

    /// Which preflights of `flow` are reusable, by index (worked out once per flow version).
    pub fn steps(&self, flow: &Flow) -> Arc<[bool]> {
        let key = hash(&(&flow.id, flow.version));
        if let Some(policy) = self.policies.get(&key)
            && policy.flow == flow.id
            && policy.version == flow.version
        {
            return policy.reusable.clone();
        }
        let reusable: Arc<[bool]> = reusable_steps(flow).into();
        self.policies.insert(
            key,
            Arc::new(Policy {
                flow: flow.id.clone(),
                version: flow.version,
                reusable: reusable.clone(),
            }),
        );
        reusable
    }

    pub fn get(
        &self,
        session: &str,
        flow: &Flow,
        step: usize,
    ) -> Option<impl std::ops::Deref<Target = BTreeMap<String, String>> + use<>> {
        let entry = self.values.get(&value_key(session, flow, step))?;
        let fits = entry.session == session
            && entry.flow == flow.id
            && entry.version == flow.version
            && entry.step == step;
        fits.then_some(Values(entry))
    }

    pub fn put(&self, session: &str, flow: &Flow, step: usize, values: BTreeMap<String, String>) {
        self.values.insert(
            value_key(session, flow, step),
            Arc::new(Entry {
                session: session.to_owned(),
                flow: flow.id.clone(),
                version: flow.version,
                step,
                values,
            }),
        );
    }

    /// Forgets what `session` reused on `flow` (a call failed after using it).
    pub fn forget(&self, session: &str, flow: &Flow) {
        for step in 0..flow.preflight.len() {
            self.values.invalidate(&value_key(session, flow, step));
        }
    }
}

/// The values of one reused preflight.
struct Values(Arc<Entry>);

impl std::ops::Deref for Values {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0.values
    }
}

fn value_key(session: &str, flow: &Flow, step: usize) -> u64 {
    hash(&(session, &flow.id, flow.version, step))
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Which preflights of `flow` are reusable, by index.
pub fn reusable_steps(flow: &Flow) -> Vec<bool> {
    // Values extracted by per-request preflights: a step that uses one is per request too.
    let mut per_request: HashSet<&str> = HashSet::new();
    flow.preflight
        .iter()
        .map(|step| {
            let http = &step.http;
            let safe = matches!(http.method.to_ascii_uppercase().as_str(), "GET" | "HEAD");
            let reusable = safe
                && !step.extract.is_empty()
                && http.slots.is_empty()
                && sources(http).iter().all(|source| {
                    source.starts_with("session.")
                        || source
                            .strip_prefix("preflight.")
                            .is_some_and(|name| !per_request.contains(name))
                });
            if !reusable {
                per_request.extend(step.extract.keys().map(String::as_str));
            }
            reusable
        })
        .collect()
}

/// Every `{{source}}` the template's URL, headers and body name (`#pointer` suffixes dropped).
fn sources(http: &HttpTemplate) -> Vec<String> {
    let mut found = Vec::new();
    collect(&http.url, &mut found);
    for value in http.headers.values() {
        collect(value, &mut found);
    }
    if let Some(body) = &http.body {
        collect_value(body, &mut found);
    }
    found
}

fn collect_value(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(s) => collect(s, found),
        Value::Array(items) => items.iter().for_each(|v| collect_value(v, found)),
        Value::Object(map) => map.values().for_each(|v| collect_value(v, found)),
        _ => {}
    }
}

fn collect(text: &str, found: &mut Vec<String>) {
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            // Unclosed: rendering refuses it; count it as per request to be safe.
            found.push(String::new());
            return;
        };
        let source = after[..end].trim();
        found.push(source.split('#').next().unwrap_or(source).to_owned());
        rest = &after[end + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(preflight: Value) -> Flow {
        serde_json::from_value(serde_json::json!({
            "service": "s",
            "name": "chat",
            "preflight": preflight,
            "request": {"method": "POST", "url": "/chat", "body_kind": "json", "body": {}},
            "response": {"transport": "sse", "text": {"path": "/t", "mode": "delta"}},
        }))
        .unwrap()
    }

    #[test]
    fn only_session_wide_reads_are_reusable() {
        let flow = flow(serde_json::json!([
            // A page read for a CSRF token: reusable.
            {"method": "GET", "url": "/chat", "headers": {"authorization": "Bearer {{session.local.t}}"},
             "extract": {"csrf": {"regex": "c=(\\w+)"}}},
            // Creates a conversation: a POST is never reused.
            {"method": "POST", "url": "/api/conversations", "headers": {"x-csrf": "{{preflight.csrf}}"},
             "body_kind": "json", "body": {"title": "New"}, "extract": {"cid": "/id"}},
            // Reads per-request state (the new conversation): per request.
            {"method": "GET", "url": "/api/conversations/{{preflight.cid}}", "extract": {"parent": "/p"}},
            // Depends on the time: per request.
            {"method": "GET", "url": "/nonce?t={{now_ms}}", "extract": {"nonce": "/n"}},
            // Extracts nothing (it is there for its cookies): always run.
            {"method": "GET", "url": "/warmup"},
            // Builds on a reusable value only: reusable.
            {"method": "GET", "url": "/cfg?c={{preflight.csrf}}", "extract": {"build": "/b"}},
        ]));
        assert_eq!(
            reusable_steps(&flow),
            [true, false, false, false, false, true]
        );
    }

    #[test]
    fn values_are_kept_per_session_and_forgotten_on_demand() {
        let flow = flow(serde_json::json!([
            {"method": "GET", "url": "/chat", "extract": {"csrf": {"regex": "c=(\\w+)"}}},
        ]));
        let reused = Reused::new(Duration::from_secs(60));
        reused.put("s1", &flow, 0, [("csrf".to_owned(), "a".to_owned())].into());
        assert_eq!(reused.get("s1", &flow, 0).unwrap()["csrf"], "a");
        assert_eq!(&*reused.steps(&flow), &[true]);
        assert!(reused.get("s2", &flow, 0).is_none());
        let mut next = flow.clone();
        next.version += 1;
        assert!(reused.get("s1", &next, 0).is_none(), "a new flow version");
        reused.forget("s1", &flow);
        assert!(reused.get("s1", &flow, 0).is_none());
    }
}
