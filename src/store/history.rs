//! Site conversations remembered per exchange (`chat_history.prefix_hash` → sealed values).

use super::{Store, StoreError, now};
use crate::conversations::Continuation;
use crate::vault::Place;

fn place(request_id: &str) -> Place<'_> {
    Place {
        table: "chat_history",
        column: "site_conversation",
        row: request_id,
    }
}

impl Store {
    pub async fn save_continuation(
        &self,
        request_id: &str,
        service: &str,
        key: &str,
        continuation: &Continuation,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.insert_continuation(&mut conn, request_id, service, key, continuation)
            .await
    }

    /// Inserts on `conn`, so the event writer can batch it with other records.
    pub(super) async fn insert_continuation(
        &self,
        conn: &mut sqlx::SqliteConnection,
        request_id: &str,
        service: &str,
        key: &str,
        continuation: &Continuation,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(&continuation.values)
            .map_err(|e| StoreError::Invalid(format!("conversation: {e}")))?;
        let sealed = self.vault.seal(place(request_id), &json);
        sqlx::query(
            "INSERT INTO chat_history (request_id, service, account_id, prefix_hash, site_conversation, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(request_id)
        .bind(service)
        .bind(&continuation.account_id)
        .bind(key)
        .bind(sealed)
        .bind(now())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    pub async fn find_continuation(&self, key: &str) -> Result<Option<Continuation>, StoreError> {
        let row: Option<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT request_id, account_id, site_conversation FROM chat_history
             WHERE prefix_hash = ? AND site_conversation IS NOT NULL ORDER BY id DESC LIMIT 1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
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
