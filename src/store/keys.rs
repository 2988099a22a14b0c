//! API keys: only a SHA-256 hash is stored; the key itself is shown once, at creation.

use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Op, Store, StoreError, new_id, now, on_pool};

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

/// An `api_keys` row as stored (the hash is not read back).
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    prefix: String,
    admin: bool,
    name: Option<String>,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl From<KeyRow> for ApiKey {
    fn from(row: KeyRow) -> Self {
        ApiKey {
            id: row.id,
            prefix: row.prefix,
            admin: row.admin,
            name: row.name,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}

const SELECT_KEY: &str = "SELECT id, prefix, admin, name, created_at, revoked_at FROM api_keys";

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
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO api_keys (id, key_hash, prefix, admin, name, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&id)
            .bind(hash_key(&key))
            .bind(&prefix)
            .bind(admin)
            .bind(&name)
            .bind(created_at)
            .execute(pool)
            .await?;
            Ok(())
        })
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
        let row: Option<KeyRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(&format!(
                "{SELECT_KEY} WHERE key_hash = $1 AND revoked_at IS NULL"
            ))
            .bind(hash)
            .fetch_optional(pool)
            .await?)
        })
        .await?;
        Ok(row.map(ApiKey::from))
    }

    pub async fn live_key_count(&self) -> Result<i64, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(
                sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
                    .fetch_one(pool)
                    .await?,
            )
        })
        .await
    }

    pub async fn keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows: Vec<KeyRow> = on_pool!(self, Op::Read, |pool| {
            Ok(
                sqlx::query_as(&format!("{SELECT_KEY} ORDER BY created_at, id"))
                    .fetch_all(pool)
                    .await?,
            )
        })
        .await?;
        Ok(rows.into_iter().map(ApiKey::from).collect())
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), StoreError> {
        let revoked = on_pool!(self, Op::Write, |pool| {
            Ok(sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now())
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected())
        })
        .await?;
        if revoked == 0 {
            return Err(StoreError::NotFound(format!("live key `{id}`")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    on_both_engines! {
        async fn only_the_hash_is_stored_and_revoked_keys_stop_working(_db, store) {
            let (info, key) = store.create_key(true, Some("ops".into())).await.unwrap();
            let (_, user_key) = store.create_key(false, None).await.unwrap();
            let stored = store.raw_texts("SELECT key_hash FROM api_keys").await;
            assert_eq!(stored.len(), 2);
            assert!(stored.iter().all(|s| *s != key && *s != user_key));
            let found = store.key_by_hash(&hash_key(&key)).await.unwrap().unwrap();
            assert!(found.admin);
            assert_eq!(found.name.as_deref(), Some("ops"));
            assert!(!store.key_by_hash(&hash_key(&user_key)).await.unwrap().unwrap().admin);
            assert_eq!(store.live_key_count().await.unwrap(), 2);
            store.revoke_key(&info.id).await.unwrap();
            assert!(store.key_by_hash(&hash_key(&key)).await.unwrap().is_none());
            assert_eq!(store.live_key_count().await.unwrap(), 1);
            assert!(matches!(
                store.revoke_key(&info.id).await,
                Err(StoreError::NotFound(_))
            ));
            let listed = store.keys().await.unwrap();
            assert_eq!(listed.len(), 2);
            assert!(listed.iter().any(|k| k.id == info.id && k.revoked_at.is_some()));
        }
    }
}
