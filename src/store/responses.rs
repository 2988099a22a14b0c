//! Stored Responses API responses (`stored_responses`): the response object and the
//! conversation up to it, sealed.

use serde_json::Value;

use super::{Store, StoreError, now};
use crate::vault::Place;

fn place(id: &str) -> Place<'_> {
    Place {
        table: "stored_responses",
        column: "sealed",
        row: id,
    }
}

impl Store {
    pub async fn save_response(
        &self,
        id: &str,
        model: &str,
        body: &Value,
    ) -> Result<(), StoreError> {
        let json =
            serde_json::to_vec(body).map_err(|e| StoreError::Invalid(format!("response: {e}")))?;
        let sealed = self.vault.seal(place(id), &json);
        sqlx::query(
            "INSERT OR REPLACE INTO stored_responses (id, model, created_at, sealed) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(model)
        .bind(now())
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn find_response(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sealed FROM stored_responses WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let json = self.vault.open_sealed(place(id), &sealed)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|e| StoreError::Invalid(format!("response: {e}")))
    }

    /// Whether there was such a response.
    pub async fn delete_response(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM stored_responses WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[tokio::test]
    async fn responses_are_stored_sealed_and_found_again() {
        let (_dir, store) = crate::store::testing::store().await;
        let body =
            json!({"response": {"id": "resp_1"}, "conversation": [{"text": "secret-words"}]});
        store.save_response("resp_1", "m", &body).await.unwrap();
        let raw: Vec<u8> = sqlx::query_scalar("SELECT sealed FROM stored_responses")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(
            !raw.windows(12).any(|w| w == b"secret-words"),
            "stored sealed"
        );
        assert_eq!(store.find_response("resp_1").await.unwrap(), Some(body));
        assert_eq!(store.find_response("resp_2").await.unwrap(), None);
        assert!(store.delete_response("resp_1").await.unwrap());
        assert!(!store.delete_response("resp_1").await.unwrap());
    }
}
