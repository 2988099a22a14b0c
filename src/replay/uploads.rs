//! Files already uploaded, per session and flow, by content hash: a history that resends
//! the same image names the site's file again instead of uploading it again.
//!
//! Keys are hashes; each entry holds what it was stored for, and a lookup checks it, so a
//! collision never hands one session's file ids to another.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// How long a site's file id is taken to stay valid.
pub const UPLOAD_TTL: Duration = Duration::from_secs(3600);

pub struct Uploaded {
    cache: moka::sync::Cache<u64, Arc<Entry>>,
}

struct Entry {
    session: String,
    flow: String,
    sha256: String,
    values: BTreeMap<String, String>,
}

impl Default for Uploaded {
    fn default() -> Self {
        Self::new(UPLOAD_TTL)
    }
}

impl Uploaded {
    pub fn new(ttl: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(20_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The values the upload steps extracted for this file, if it was uploaded before.
    pub fn get(&self, session: &str, flow: &str, sha256: &str) -> Option<BTreeMap<String, String>> {
        let entry = self.cache.get(&key(session, flow, sha256))?;
        (entry.session == session && entry.flow == flow && entry.sha256 == sha256)
            .then(|| entry.values.clone())
    }

    pub fn put(&self, session: &str, flow: &str, sha256: &str, values: BTreeMap<String, String>) {
        self.cache.insert(
            key(session, flow, sha256),
            Arc::new(Entry {
                session: session.to_owned(),
                flow: flow.to_owned(),
                sha256: sha256.to_owned(),
                values,
            }),
        );
    }

    /// Forgets one file's upload in a session and flow (the site no longer knows it). Not
    /// called yet: a failed chat call after a cached upload does not forget it.
    pub fn forget(&self, session: &str, flow: &str, sha256: &str) {
        self.cache.invalidate(&key(session, flow, sha256));
    }
}

/// The first turn and a later turn of a flow upload the same way: one key for both.
pub fn flow_key(flow_id: &str) -> &str {
    flow_id.split('+').next().unwrap_or(flow_id)
}

fn key(session: &str, flow: &str, sha256: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (session, flow, sha256).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_per_session_flow_and_content() {
        let uploaded = Uploaded::default();
        let values: BTreeMap<String, String> = [("id".to_owned(), "file-1".to_owned())].into();
        uploaded.put("s1", flow_key("f_1+follow_up"), "abc", values.clone());
        assert_eq!(uploaded.get("s1", "f_1", "abc"), Some(values));
        assert_eq!(uploaded.get("s2", "f_1", "abc"), None);
        assert_eq!(uploaded.get("s1", "f_2", "abc"), None);
        assert_eq!(uploaded.get("s1", "f_1", "abd"), None);
        uploaded.forget("s1", "f_1", "abc");
        assert_eq!(uploaded.get("s1", "f_1", "abc"), None);
    }
}
