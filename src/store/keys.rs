//! API keys: only a SHA-256 hash is stored; the key itself is shown once, at creation.

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Store, StoreError, new_id, now};

#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: String,
    /// The key's first characters, to recognise it.
    pub prefix: String,
    pub admin: bool,
    pub name: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Store {
    /// Creates a key; returns it with the only copy of its secret.
    pub async fn create_key(
        &self,
        admin: bool,
        name: Option<String>,
    ) -> Result<(ApiKey, String), StoreError> {
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        let key = format!("ct-{}", hex::encode(secret));
        let id = new_id("k");
        let prefix = key[..7].to_owned();
        let created_at = now();
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, prefix, admin, name, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(hash_key(&key))
        .bind(&prefix)
        .bind(admin)
        .bind(&name)
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        let info = ApiKey {
            id,
            prefix,
            admin,
            name,
            created_at,
            revoked_at: None,
        };
        Ok((info, key))
    }

    /// The live key whose hash is `hash`.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| key_from_row(&r)).transpose()
    }

    pub async fn live_key_count(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query("SELECT * FROM api_keys ORDER BY created_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("live key `{id}`")));
        }
        Ok(())
    }
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        prefix: row.try_get("prefix")?,
        admin: row.try_get::<i64, _>("admin")? != 0,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::store;

    #[tokio::test]
    async fn only_the_hash_is_stored_and_revoked_keys_stop_working() {
        let (_dir, store) = store().await;
        let (info, key) = store.create_key(true, None).await.unwrap();
        let stored: String = sqlx::query_scalar("SELECT key_hash FROM api_keys")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_ne!(stored, key);
        assert!(
            store
                .key_by_hash(&hash_key(&key))
                .await
                .unwrap()
                .unwrap()
                .admin
        );
        assert_eq!(store.live_key_count().await.unwrap(), 1);
        store.revoke_key(&info.id).await.unwrap();
        assert!(store.key_by_hash(&hash_key(&key)).await.unwrap().is_none());
        assert_eq!(store.live_key_count().await.unwrap(), 0);
    }
}
