//! Sessions: an account's cookies and storage, sealed, with an expiry.

use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreError, new_id, now};
use crate::session::SessionData;
use crate::vault::Place;

/// A session with its material opened.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub account_id: String,
    pub data: SessionData,
    pub source: String,
    pub authenticated: bool,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl Session {
    /// Usable for replay: authenticated and not past its expiry.
    pub fn is_usable(&self, now: i64) -> bool {
        self.authenticated && self.expires_at.is_none_or(|e| e > now)
    }
}

/// What listings show of a session: no cookie or storage values.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    pub id: String,
    pub account_id: String,
    pub source: String,
    pub authenticated: bool,
    pub cookies: Vec<String>,
    pub local_storage: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

impl From<&Session> for SessionSummary {
    fn from(s: &Session) -> Self {
        Self {
            id: s.id.clone(),
            account_id: s.account_id.clone(),
            source: s.source.clone(),
            authenticated: s.authenticated,
            cookies: s.data.cookies.iter().map(|c| c.name.clone()).collect(),
            local_storage: s.data.local_storage.keys().cloned().collect(),
            created_at: s.created_at,
            expires_at: s.expires_at,
        }
    }
}

fn place(id: &str) -> Place<'_> {
    Place {
        table: "sessions",
        column: "data_sealed",
        row: id,
    }
}

impl Store {
    /// Stores a new session for the account; it becomes the one replay uses.
    pub async fn save_session(
        &self,
        account_id: &str,
        data: &SessionData,
        source: &str,
        expires_at: Option<i64>,
    ) -> Result<Session, StoreError> {
        let id = new_id("s");
        let json = serde_json::to_vec(data)
            .map_err(|e| StoreError::Invalid(format!("session data: {e}")))?;
        let sealed = self.vault.seal(place(&id), &json);
        let created_at = now();
        sqlx::query(
            "INSERT INTO sessions (id, account_id, data_sealed, source, authenticated, created_at, expires_at)
             VALUES (?, ?, ?, ?, 1, ?, ?)",
        )
        .bind(&id)
        .bind(account_id)
        .bind(sealed)
        .bind(source)
        .bind(created_at)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(Session {
            id,
            account_id: account_id.to_owned(),
            data: data.clone(),
            source: source.to_owned(),
            authenticated: true,
            created_at,
            expires_at,
        })
    }

    /// The account's newest session, opened.
    pub async fn latest_session(&self, account_id: &str) -> Result<Option<Session>, StoreError> {
        let row = sqlx::query(
            "SELECT * FROM sessions WHERE account_id = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| self.session_from_row(&row)).transpose()
    }

    pub async fn sessions(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let rows = sqlx::query("SELECT * FROM sessions ORDER BY account_id, created_at")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| self.session_from_row(row).map(|s| SessionSummary::from(&s)))
            .collect()
    }

    fn session_from_row(&self, row: &sqlx::sqlite::SqliteRow) -> Result<Session, StoreError> {
        let id: String = row.try_get("id")?;
        let sealed: Vec<u8> = row.try_get("data_sealed")?;
        let json = self.vault.open_sealed(place(&id), &sealed)?;
        let data = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("session {id} data: {e}")))?;
        Ok(Session {
            account_id: row.try_get("account_id")?,
            source: row.try_get("source")?,
            authenticated: row.try_get::<i64, _>("authenticated")? != 0,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            data,
            id,
        })
    }

    /// Replaces a session's material (cookies the site rotated during replay).
    pub async fn update_session_data(
        &self,
        session_id: &str,
        data: &SessionData,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(data)
            .map_err(|e| StoreError::Invalid(format!("session data: {e}")))?;
        let sealed = self.vault.seal(place(session_id), &json);
        sqlx::query("UPDATE sessions SET data_sealed = ?, last_used_at = ? WHERE id = ?")
            .bind(sealed)
            .bind(now())
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records that the site rejected the session, so it is not used again.
    pub async fn mark_session_rejected(&self, session_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET authenticated = 0 WHERE id = ?")
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl Store {
    /// Stores an imported cookie file (any format `SessionData::import` reads) as the
    /// account's session. The file is parsed before anything is written.
    pub async fn import_session(
        &self,
        account: &crate::store::accounts::Account,
        text: &str,
    ) -> Result<Session, StoreError> {
        let site = crate::store::accounts::parse_site_url(&account.url)?;
        let data =
            SessionData::import(text, &site).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let expires_at = data.latest_expiry();
        self.save_session(&account.id, &data, "imported", expires_at)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Cookie;
    use crate::store::accounts::NewAccount;
    use crate::store::testing::store;

    #[tokio::test]
    async fn session_round_trips_sealed() {
        let (_dir, store) = store().await;
        let account = store
            .add_account(NewAccount {
                url: "https://x.example.com".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let data = SessionData {
            cookies: vec![Cookie {
                name: "sid".into(),
                value: "very-secret-cookie".into(),
                domain: "x.example.com".into(),
                path: "/".into(),
                expires: None,
                secure: true,
                http_only: true,
                host_only: true,
            }],
            ..Default::default()
        };
        store
            .save_session(&account.id, &data, "imported", None)
            .await
            .unwrap();
        let raw: Vec<u8> = sqlx::query_scalar("SELECT data_sealed FROM sessions")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        let session = store.latest_session(&account.id).await.unwrap().unwrap();
        assert_eq!(session.data, data);
        assert!(session.is_usable(now()));
        store.mark_session_rejected(&session.id).await.unwrap();
        let session = store.latest_session(&account.id).await.unwrap().unwrap();
        assert!(!session.is_usable(now()));
    }
}
