//! Sessions: an account's cookies and storage, sealed, with an expiry.

use serde::Serialize;

use super::{Op, Store, StoreError, new_id, now, on_pool};
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
    /// Bumped each time the material is replaced in place (see `update_session_data`).
    pub version: i64,
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

/// A `sessions` row as stored.
#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    account_id: String,
    data_sealed: Vec<u8>,
    source: String,
    authenticated: bool,
    created_at: i64,
    expires_at: Option<i64>,
    version: i64,
}

const SELECT_SESSION: &str = "SELECT id, account_id, data_sealed, source, authenticated, \
     created_at, expires_at, version FROM sessions";

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
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO sessions (id, account_id, data_sealed, source, authenticated, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, TRUE, $5, $6)",
            )
            .bind(&id)
            .bind(account_id)
            .bind(&sealed)
            .bind(source)
            .bind(created_at)
            .bind(expires_at)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await?;
        Ok(Session {
            id,
            account_id: account_id.to_owned(),
            data: data.clone(),
            source: source.to_owned(),
            authenticated: true,
            created_at,
            expires_at,
            version: 1,
        })
    }

    /// The account's newest session, opened.
    pub async fn latest_session(&self, account_id: &str) -> Result<Option<Session>, StoreError> {
        // `rowid` orders sessions saved within the same second (PostgreSQL's table has one too).
        let row: Option<SessionRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(&format!(
                "{SELECT_SESSION} WHERE account_id = $1 ORDER BY created_at DESC, rowid DESC LIMIT 1"
            ))
            .bind(account_id)
            .fetch_optional(pool)
            .await?)
        })
        .await?;
        row.map(|row| self.session_from_row(row)).transpose()
    }

    pub async fn sessions(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let rows: Vec<SessionRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(&format!(
                "{SELECT_SESSION} ORDER BY account_id, created_at, rowid"
            ))
            .fetch_all(pool)
            .await?)
        })
        .await?;
        rows.into_iter()
            .map(|row| self.session_from_row(row).map(|s| SessionSummary::from(&s)))
            .collect()
    }

    fn session_from_row(&self, row: SessionRow) -> Result<Session, StoreError> {
        let json = self.vault.open_sealed(place(&row.id), &row.data_sealed)?;
        let data = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Invalid(format!("session {} data: {e}", row.id)))?;
        Ok(Session {
            account_id: row.account_id,
            source: row.source,
            authenticated: row.authenticated,
            created_at: row.created_at,
            expires_at: row.expires_at,
            version: row.version,
            data,
            id: row.id,
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
        on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "UPDATE sessions SET data_sealed = $1, last_used_at = $2, version = version + 1
                 WHERE id = $3",
            )
            .bind(&sealed)
            .bind(now())
            .bind(session_id)
            .execute(pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Records that the site rejected `version` of the session; false (and nothing changed)
    /// when its material was replaced since (by another instance, say), which the site may
    /// well accept.
    pub async fn reject_session(&self, session_id: &str, version: i64) -> Result<bool, StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let done = sqlx::query(
                "UPDATE sessions SET authenticated = FALSE WHERE id = $1 AND version = $2",
            )
            .bind(session_id)
            .bind(version)
            .execute(pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Records that the site rejected the session, so it is not used again.
    pub async fn mark_session_rejected(&self, session_id: &str) -> Result<(), StoreError> {
        on_pool!(self, Op::Write, |pool| {
            sqlx::query("UPDATE sessions SET authenticated = FALSE WHERE id = $1")
                .bind(session_id)
                .execute(pool)
                .await?;
            Ok(())
        })
        .await
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
    use crate::store::testing::on_both_engines;

    fn cookie(value: &str) -> SessionData {
        SessionData {
            cookies: vec![Cookie {
                name: "sid".into(),
                value: value.into(),
                domain: "x.example.com".into(),
                path: "/".into(),
                expires: None,
                secure: true,
                http_only: true,
                host_only: true,
            }],
            ..Default::default()
        }
    }

    on_both_engines! {
        async fn session_round_trips_sealed(_db, store) {
            let account = store
                .add_account(NewAccount {
                    url: "https://x.example.com".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let data = cookie("very-secret-cookie");
            store
                .save_session(&account.id, &data, "imported", None)
                .await
                .unwrap();
            let raw = store.raw_bytes("SELECT data_sealed FROM sessions").await;
            assert!(!raw[0].windows(6).any(|w| w == b"secret"));
            let session = store.latest_session(&account.id).await.unwrap().unwrap();
            assert_eq!(session.data, data);
            assert!(session.is_usable(now()));
            store.mark_session_rejected(&session.id).await.unwrap();
            let session = store.latest_session(&account.id).await.unwrap().unwrap();
            assert!(!session.is_usable(now()));
        }

        /// Within one second, the session saved last is the newest; rotated cookies replace
        /// a session's material in place.
        async fn the_newest_session_wins_and_rotations_are_kept(_db, store) {
            let account = store
                .add_account(NewAccount {
                    url: "https://x.example.com".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            for i in 0..5 {
                store
                    .save_session(&account.id, &cookie(&format!("c{i}")), "login", Some(i64::MAX))
                    .await
                    .unwrap();
            }
            let newest = store.latest_session(&account.id).await.unwrap().unwrap();
            assert_eq!(newest.data.cookies[0].value, "c4");
            assert_eq!(newest.expires_at, Some(i64::MAX));
            store
                .update_session_data(&newest.id, &cookie("rotated"))
                .await
                .unwrap();
            let newest = store.latest_session(&account.id).await.unwrap().unwrap();
            assert_eq!(newest.data.cookies[0].value, "rotated");
            let listed = store.sessions().await.unwrap();
            assert_eq!(listed.len(), 5);
            assert_eq!(listed[4].id, newest.id);
            assert_eq!(listed[0].cookies, ["sid"]);
        }

        /// A rejection of an older version of a session (its cookies were rotated since, by
        /// another instance say) leaves the newer one usable; the current version's is kept.
        async fn only_the_version_the_site_rejected_is_marked(_db, store) {
            let account = store
                .add_account(NewAccount {
                    url: "https://x.example.com".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            let first = store
                .save_session(&account.id, &cookie("c1"), "login", None)
                .await
                .unwrap();
            assert_eq!(first.version, 1);
            store.update_session_data(&first.id, &cookie("rotated")).await.unwrap();
            let rotated = store.latest_session(&account.id).await.unwrap().unwrap();
            assert_eq!((rotated.id.as_str(), rotated.version), (first.id.as_str(), 2));
            assert!(!store.reject_session(&first.id, first.version).await.unwrap());
            assert!(store.latest_session(&account.id).await.unwrap().unwrap().is_usable(now()));
            assert!(store.reject_session(&rotated.id, rotated.version).await.unwrap());
            assert!(!store.latest_session(&account.id).await.unwrap().unwrap().is_usable(now()));
        }
    }
}
