//! The SQLite store (sqlx): one file in the data dir, WAL mode, migrations embedded.
//!
//! Invariants:
//! - Every secret column holds `vault` ciphertext bound to its table, column and row.
//! - Opening checks the master key against the database before anything else reads it, so a
//!   wrong key fails at startup with a clear message instead of on the first request.

pub mod accounts;
pub mod events;
pub mod flows;
pub mod history;
pub mod keys;
pub mod responses;
pub mod sessions;
pub mod traffic;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::vault::{Place, Vault, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

/// Handle to the database and the vault that seals its secrets. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) pool: SqlitePool,
    pub(crate) vault: Vault,
}

const CHECK_PLAINTEXT: &str = "computetower-vault-check";
const CHECK_PLACE: Place<'static> = Place {
    table: "vault_check",
    column: "sealed",
    row: "1",
};

impl Store {
    /// Opens (creating when absent) the database at `path`.
    pub async fn open(path: &Path, vault: Vault) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            // Owner-only when made here; a directory the operator made keeps its mode.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::DataDir {
                    path: dir.display().to_string(),
                    source,
                })?;
        }
        // SQLite gives the WAL and shared-memory files the database file's mode: creating it
        // owner-only keeps all three from other users.
        if !path.exists() {
            create_private(path)?;
        }
        restrict(path, 0o600)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A local file does not drop connections; the ping costs a round trip to the
            // connection's worker thread per query.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self { pool, vault };
        store.check_key().await?;
        store.strip_url_credentials().await?;
        Ok(store)
    }

    /// Account URLs are refused with a `user:pass@` part now; rows stored before that lose
    /// it here, so it is neither kept unsealed, listed, nor sent as Basic auth.
    async fn strip_url_credentials(&self) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, url FROM accounts WHERE url LIKE '%@%'")
                .fetch_all(&self.pool)
                .await?;
        for (id, text) in rows {
            let Ok(mut url) = url::Url::parse(&text) else {
                continue;
            };
            if url.username().is_empty() && url.password().is_none() {
                continue;
            }
            let _ = url.set_username("");
            let _ = url.set_password(None);
            sqlx::query("UPDATE accounts SET url = ? WHERE id = ?")
                .bind(url.as_str())
                .bind(&id)
                .execute(&self.pool)
                .await?;
            tracing::warn!(account = %id, "removed a user name and password from the account URL; give them with `account update --email … --password-stdin`");
        }
        Ok(())
    }

    async fn check_key(&self) -> Result<(), StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sealed FROM vault_check WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?;
        match sealed {
            Some(sealed) => {
                self.vault.open_sealed(CHECK_PLACE, &sealed)?;
            }
            None => {
                let sealed = self.vault.seal_str(CHECK_PLACE, CHECK_PLAINTEXT);
                sqlx::query("INSERT INTO vault_check (id, sealed) VALUES (1, ?)")
                    .bind(sealed)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Waits for pending writes and closes the pool (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Sets `path`'s mode (the data dir and the database hold sealed secrets and metadata that
/// are nobody else's business).
fn restrict(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        StoreError::DataDir {
            path: path.display().to_string(),
            source,
        }
    })
}

fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .map_err(|source| StoreError::DataDir {
            path: path.display().to_string(),
            source,
        })
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A short random id with a readable prefix (`a_…` account, `s_…` session, `k_…` key).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), Vault::from_key(&[1; 32]))
            .await
            .unwrap();
        (dir, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrong_master_key_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path, Vault::from_key(&[1; 32])).await.unwrap();
        store.close().await;
        let err = Store::open(&path, Vault::from_key(&[2; 32]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Vault(VaultError::WrongKey)),
            "{err}"
        );
        // The right key still opens it: nothing was lost.
        Store::open(&path, Vault::from_key(&[1; 32])).await.unwrap();
    }

    /// The data dir is owner-only, and so are the database and its WAL and shared-memory
    /// files.
    #[tokio::test]
    async fn the_data_dir_and_database_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let path = data.join("t.db");
        let store = Store::open(&path, Vault::from_key(&[1; 32])).await.unwrap();
        store.create_key(false, None).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        for file in std::fs::read_dir(&data).unwrap() {
            let file = file.unwrap().path();
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        assert!(data.join("t.db-wal").exists());
    }

    /// An account URL stored with `user:pass@` before such URLs were refused loses them on
    /// the next open: neither kept in clear, listed, nor sent as Basic auth.
    #[tokio::test]
    async fn credentials_in_stored_account_urls_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Store::open(&path, Vault::from_key(&[1; 32])).await.unwrap();
        sqlx::query(
            "INSERT INTO accounts (id, service, url, created_at, updated_at)
             VALUES ('a_1', 's', 'https://me:hunter2@chat.example.com/app', 0, 0)",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.close().await;
        let store = Store::open(&path, Vault::from_key(&[1; 32])).await.unwrap();
        let accounts = store.accounts().await.unwrap();
        assert_eq!(accounts[0].url, "https://chat.example.com/app");
    }
}
