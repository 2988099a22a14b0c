//! Continuing a site's own conversation when an OpenAI client resends a history that extends
//! an earlier exchange.
//!
//! A finished reply is remembered under a hash of the whole exchange (the request's messages
//! plus the reply text, hashed as it streams — the reply is never buffered for this). A later
//! request whose messages, minus the new user turn, hash to that key continues the same site
//! conversation on the same account, sending only the new turn. An edited history hashes to
//! nothing known and starts a new conversation.
//!
//! Invariant: the remembered values (conversation ids, and whatever preflight values the
//! exchange used, which may include tokens) are stored sealed.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::role::Role;
use crate::store::Store;
use crate::store::events::{EventWriter, Record};
pub use crate::store::history::Continuation;

/// How long a conversation can be continued from memory; the store keeps it longer.
const CACHE_TTL: Duration = Duration::from_secs(3600);

/// Builds the key of a conversation, message by message.
#[derive(Clone)]
pub struct KeyBuilder(Sha256);

impl Default for KeyBuilder {
    fn default() -> Self {
        Self(Sha256::new())
    }
}

impl KeyBuilder {
    pub fn push(&mut self, role: Role, text: &str) {
        self.open(role);
        self.text(text);
        self.close();
    }

    /// Starts a message whose text arrives in pieces.
    pub fn open(&mut self, role: Role) {
        self.0.update(role.label().as_bytes());
        self.0.update([0]);
    }

    pub fn text(&mut self, piece: &str) {
        self.0.update(piece.as_bytes());
    }

    pub fn close(&mut self) {
        self.0.update([0, 0]);
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// The key of a message list.
pub fn key_of(messages: &[(Role, String)]) -> String {
    let mut key = KeyBuilder::default();
    for (role, text) in messages {
        key.push(*role, text);
    }
    key.finish()
}

pub struct Conversations {
    store: Store,
    writer: EventWriter,
    cache: moka::future::Cache<String, Arc<Continuation>>,
}

impl Conversations {
    pub fn new(store: Store, writer: EventWriter) -> Self {
        Self {
            store,
            writer,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// The conversation whose exchange hashed to `key`, from memory or the store.
    pub async fn find(&self, key: &str) -> Option<Arc<Continuation>> {
        if let Some(found) = self.cache.get(key).await {
            return Some(found);
        }
        match self.store.find_continuation(key).await {
            Ok(Some(found)) => {
                let found = Arc::new(found);
                self.cache.insert(key.to_owned(), found.clone()).await;
                Some(found)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a remembered conversation");
                None
            }
        }
    }

    /// Remembers an exchange; the store write is batched by the event writer, off the
    /// reply's path.
    pub fn remember(
        self: &Arc<Self>,
        request_id: String,
        service: String,
        key: String,
        continuation: Continuation,
    ) {
        let continuation = Arc::new(continuation);
        self.writer.record(Record::Conversation {
            request_id,
            service,
            key: key.clone(),
            continuation: continuation.clone(),
        });
        let cache = self.cache.clone();
        // Detached: the reply is complete; the cache makes the next turn independent of the
        // batched write. Losing both only means the next turn starts a new site conversation.
        tokio::spawn(async move { cache.insert(key, continuation).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_pieces_hash_like_the_whole_message() {
        let mut streamed = KeyBuilder::default();
        streamed.push(Role::User, "hi");
        streamed.open(Role::Assistant);
        streamed.text("hel");
        streamed.text("lo");
        streamed.close();
        let whole = key_of(&[
            (Role::User, "hi".to_owned()),
            (Role::Assistant, "hello".to_owned()),
        ]);
        assert_eq!(streamed.finish(), whole);
        let edited = key_of(&[
            (Role::User, "hi!".to_owned()),
            (Role::Assistant, "hello".to_owned()),
        ]);
        assert_ne!(edited, whole);
    }

    #[tokio::test]
    async fn remembered_conversations_survive_the_cache() {
        let (_dir, store) = crate::store::testing::store().await;
        let (writer, _task) = EventWriter::start(store.clone());
        let conversations = Arc::new(Conversations::new(store.clone(), writer));
        let continuation = Continuation {
            account_id: "a_1".into(),
            values: [("conversation_id".to_owned(), "c-secret-42".to_owned())].into(),
        };
        store
            .save_continuation("r1", "svc", "k1", &continuation)
            .await
            .unwrap();
        let raw = store
            .raw_bytes("SELECT site_conversation FROM chat_history")
            .await
            .remove(0);
        assert!(!raw.windows(9).any(|w| w == b"c-secret-"), "stored sealed");
        let found = conversations.find("k1").await.unwrap();
        assert_eq!(*found, continuation);
        assert!(conversations.find("k2").await.is_none());
    }
}
