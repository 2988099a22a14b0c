//! Site conversations remembered per exchange (`chat_history.prefix_hash` → sealed values).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::events::Record;
use super::{Op, Store, StoreError, on_pool};
use crate::vault::Place;

/// Where a site conversation stands after an exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continuation {
    pub account_id: String,
    /// Preflight values and reply ids of the exchange (see `replay::client::Target`).
    pub values: BTreeMap<String, String>,
}

fn place(request_id: &str) -> Place<'_> {
    Place {
        table: "chat_history",
        column: "site_conversation",
        row: request_id,
    }
}

impl Store {
    /// Stores an exchange's site conversation at once (the gateway batches it through the
    /// event writer instead).
    pub async fn save_continuation(
        &self,
        request_id: &str,
        service: &str,
        key: &str,
        continuation: &Continuation,
    ) -> Result<(), StoreError> {
        self.write_records(&[Record::Conversation {
            request_id: request_id.to_owned(),
            service: service.to_owned(),
            key: key.to_owned(),
            continuation: Arc::new(continuation.clone()),
        }])
        .await
    }

    /// The remembered values, sealed and bound to the exchange's request id.
    pub(super) fn seal_continuation(
        &self,
        request_id: &str,
        continuation: &Continuation,
    ) -> Result<Vec<u8>, StoreError> {
        let json = serde_json::to_vec(&continuation.values)
            .map_err(|e| StoreError::Invalid(format!("conversation: {e}")))?;
        Ok(self.vault.seal(place(request_id), &json))
    }

    pub async fn find_continuation(&self, key: &str) -> Result<Option<Continuation>, StoreError> {
        let row: Option<(String, String, Vec<u8>)> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT request_id, account_id, site_conversation FROM chat_history
                 WHERE prefix_hash = $1 AND site_conversation IS NOT NULL ORDER BY id DESC LIMIT 1",
            )
            .bind(key)
            .fetch_optional(pool)
            .await?)
        })
        .await?;
        let Some((request_id, account_id, sealed)) = row else {
            return Ok(None);
        };
        let json = self.vault.open_sealed(place(&request_id), &sealed)?;
        let values = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("conversation: {e}")))?;
        Ok(Some(Continuation { account_id, values }))
    }
}
