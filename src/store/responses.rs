//! Stored Responses API responses (`stored_responses`): the response object and the
//! conversation up to it, sealed.

use serde_json::Value;

use super::{Op, Store, StoreError, now, on_pool};
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
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO stored_responses (id, model, created_at, sealed) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET model = excluded.model,
                     created_at = excluded.created_at, sealed = excluded.sealed",
            )
            .bind(id)
            .bind(model)
            .bind(now())
            .bind(&sealed)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn find_response(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let sealed: Option<Vec<u8>> = on_pool!(self, Op::Read, |pool| {
            Ok(
                sqlx::query_scalar("SELECT sealed FROM stored_responses WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?,
            )
        })
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
        let deleted = on_pool!(self, Op::Write, |pool| {
            Ok(sqlx::query("DELETE FROM stored_responses WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?
                .rows_affected())
        })
        .await?;
        Ok(deleted > 0)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::store::testing::on_both_engines;

    on_both_engines! {
        async fn responses_are_stored_sealed_and_found_again(_db, store) {
            let body =
                json!({"response": {"id": "resp_1"}, "conversation": [{"text": "secret-words"}]});
            store.save_response("resp_1", "m", &body).await.unwrap();
            let raw = store.raw_bytes("SELECT sealed FROM stored_responses").await;
            assert!(
                !raw[0].windows(12).any(|w| w == b"secret-words"),
                "stored sealed"
            );
            assert_eq!(store.find_response("resp_1").await.unwrap(), Some(body));
            // Saving the same id again replaces it.
            let newer = json!({"response": {"id": "resp_1", "v": 2}});
            store.save_response("resp_1", "m", &newer).await.unwrap();
            assert_eq!(store.find_response("resp_1").await.unwrap(), Some(newer));
            assert_eq!(store.find_response("resp_2").await.unwrap(), None);
            assert!(store.delete_response("resp_1").await.unwrap());
            assert!(!store.delete_response("resp_1").await.unwrap());
        }
    }
}
