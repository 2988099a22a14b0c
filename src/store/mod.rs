//! The store: SQLite (one file in the data dir, WAL mode) by default, or PostgreSQL when
//! `database_url` names one, so that several instances can share it. Migrations for each
//! engine are embedded (`migrations/sqlite/`, `migrations/postgres/`, with the same versions)
//! and run at open.
//!
//! How the two engines are spoken: one pool enum ([`Db`]) and sqlx's native drivers, not its
//! `Any` driver. Each query is written once, in SQL both engines accept (`$N` placeholders,
//! `TRUE`/`FALSE`, `ON CONFLICT`), and [`on_pool!`] compiles it once per engine, so each runs
//! with its own driver's types (BOOLEAN, BYTEA), connection options (SQLite's WAL, busy
//! timeout and foreign keys exactly as before) and prepared-statement cache, with no
//! translation on the way. `Any` would convert every value into its own few types (a SQLite
//! integer flag does not read as a PostgreSQL boolean there), build SQLite's options from a
//! URL, and hide the PostgreSQL pool, which sharing accounts between instances needs for
//! PostgreSQL's own features (`LISTEN`/`NOTIFY`, advisory and row locks).
//!
//! Invariants:
//! - Every secret column holds `vault` ciphertext bound to its table, column and row, on
//!   either engine.
//! - Opening checks the master key against the database before anything else reads it, so a
//!   wrong key fails at startup with a clear message instead of on the first request.
//! - The database URL's password is never shown: errors and logs name the store by
//!   [`Location::describe`].
//! - Every operation is timed, per kind ([`Op`]), for `/metrics` (`telemetry::store_query`).

pub mod accounts;
pub mod events;
pub mod flows;
pub mod history;
pub mod keys;
pub mod leases;
pub mod responses;
pub mod sessions;
pub mod shared;
pub mod slots;
pub mod traffic;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::vault::{Place, Vault, VaultError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] MigrateError),
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
    #[error("cannot open the store ({place}): {source}")]
    Connect { place: String, source: sqlx::Error },
    #[error(
        "the master key does not open the store ({0}): its data was sealed with another key. \
         Set COMPUTETOWER_MASTER_KEY to the key it was created with (instances that share a \
         database all need that same key)"
    )]
    WrongKey(String),
    #[error(
        "the store ({place}) has schema version {found}, newer than this computetower knows \
         ({known}): upgrade this binary"
    )]
    NewerSchema {
        place: String,
        found: i64,
        known: i64,
    },
}

/// The database engine behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// The name `/health` and `/metrics` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// Where the store lives: the SQLite file, or a PostgreSQL URL (which may hold a password,
/// so `Debug` shows [`Location::describe`] instead).
#[derive(Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Location {
    /// `database_url` when it is set (a `postgres://` or `postgresql://` URL), else the SQLite
    /// file at `sqlite_path`.
    pub fn new(database_url: Option<&str>, sqlite_path: PathBuf) -> Result<Self, StoreError> {
        let Some(url) = database_url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Location::Sqlite(sqlite_path));
        };
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
            // The URL itself is not echoed: it may hold a password.
            return Err(StoreError::Invalid(
                "`database_url` must be a postgres:// (or postgresql://) URL; leave it unset to \
                 keep the SQLite file in the data dir"
                    .into(),
            ));
        }
        PgConnectOptions::from_str(url).map_err(|_| {
            StoreError::Invalid(
                "`database_url` is not a valid PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
                    .into(),
            )
        })?;
        Ok(Location::Postgres(url.to_owned()))
    }

    pub fn engine(&self) -> Engine {
        match self {
            Location::Sqlite(_) => Engine::Sqlite,
            Location::Postgres(_) => Engine::Postgres,
        }
    }

    /// For people and logs: the file, or the engine, server and database, never a user name
    /// or password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(path) => format!("sqlite {}", path.display()),
            Location::Postgres(url) => match PgConnectOptions::from_str(url) {
                Ok(options) => {
                    let host = options.get_host();
                    let port = options.get_port();
                    let database = options.get_database().unwrap_or("(default database)");
                    format!("postgres {host}:{port}/{database}")
                }
                Err(_) => "postgres (invalid URL)".to_owned(),
            },
        }
    }
}

/// The kind of a store operation, a low-cardinality metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A query that only reads.
    Read,
    /// A statement or transaction that writes (accounts, sessions, flows, keys, responses).
    Write,
    /// One batch of the event writer (execution events, decisions, conversations).
    Events,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Events => "events",
        }
    }
}

/// The engine's pool. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the store's pool, compiled once per engine (so each
/// runs with its own driver's types), and times it as `$op`. `$body` evaluates to
/// `Result<T, StoreError>` and may `?`.
macro_rules! on_pool {
    ($store:expr, $op:expr, |$pool:ident| $body:expr) => {
        $store.timed($op, async {
            match &$store.db {
                $crate::store::Db::Sqlite($pool) => $body,
                $crate::store::Db::Postgres($pool) => $body,
            }
        })
    };
}
pub(crate) use on_pool;

/// A transaction that reads and then writes what it read (the next version number, say),
/// serialized with every other such transaction on the same key.
pub(crate) trait SerializedBegin {
    type Database: sqlx::Database;

    async fn begin_serialized(
        &self,
        key: &str,
    ) -> Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>;
}

impl SerializedBegin for SqlitePool {
    type Database = sqlx::Sqlite;

    /// Takes the write lock at the start: a deferred transaction that reads first fails with
    /// `database is locked` when another writes in between.
    async fn begin_serialized(
        &self,
        _key: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl SerializedBegin for PgPool {
    type Database = sqlx::Postgres;

    /// An advisory lock on the key, held until the transaction ends, serializes instances too.
    async fn begin_serialized(
        &self,
        key: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(key)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// What opening did to the schema: the version now, and the migrations this open applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Schema {
    pub version: i64,
    pub applied_now: Vec<i64>,
}

/// Handle to the database and the vault that seals its secrets. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) db: Db,
    pub(crate) vault: Vault,
    schema: Arc<Schema>,
}

const CHECK_PLAINTEXT: &str = "computetower-vault-check";
const CHECK_PLACE: Place<'static> = Place {
    table: "vault_check",
    column: "sealed",
    row: "1",
};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

impl Store {
    /// Opens (creating when absent) the SQLite database at `path`.
    pub async fn open(path: &Path, vault: Vault) -> Result<Self, StoreError> {
        Self::connect(&Location::Sqlite(path.to_owned()), vault).await
    }

    /// Opens the store at `location`, applies the migrations it lacks, and checks the master
    /// key against it.
    pub async fn connect(location: &Location, vault: Vault) -> Result<Self, StoreError> {
        let place = location.describe();
        let (db, schema) = match location {
            Location::Sqlite(path) => {
                let pool = open_sqlite(path).await?;
                // SQLite has no migration lock of its own: processes opening a new file
                // together (`serve` and a CLI command, say) take turns on a lock.
                let _turn = lock_dir_of(path).await?;
                let schema = migrate(&pool, &SQLITE_MIGRATIONS, &place).await?;
                (Db::Sqlite(pool), schema)
            }
            Location::Postgres(url) => {
                let pool = open_postgres(url)
                    .await
                    .map_err(|source| StoreError::Connect {
                        place: place.clone(),
                        source,
                    })?;
                let schema = migrate(&pool, &POSTGRES_MIGRATIONS, &place).await?;
                (Db::Postgres(pool), schema)
            }
        };
        let store = Self {
            db,
            vault,
            schema: Arc::new(schema),
        };
        for op in [Op::Read, Op::Write, Op::Events] {
            crate::telemetry::store_errors_seen(store.engine().as_str(), op.label());
        }
        store.check_key(&place).await?;
        store.strip_url_credentials().await?;
        Ok(store)
    }

    pub fn engine(&self) -> Engine {
        match self.db {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// The schema version, and what opening applied.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Awaits `work` and records its time (and whether it failed) under `op`.
    pub(crate) async fn timed<T>(
        &self,
        op: Op,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = work.await;
        // Not found and invalid input are answers, not failures of the store.
        let failed = matches!(
            result,
            Err(StoreError::Db(_) | StoreError::Vault(_) | StoreError::DataDir { .. })
        );
        crate::telemetry::store_query(
            self.engine().as_str(),
            op.label(),
            started.elapsed().as_secs_f64(),
            failed,
        );
        result
    }

    /// Account URLs are refused with a `user:pass@` part now; rows stored before that lose
    /// it here, so it is neither kept unsealed, listed, nor sent as Basic auth.
    async fn strip_url_credentials(&self) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> = on_pool!(self, Op::Read, |pool| {
            Ok(
                sqlx::query_as("SELECT id, url FROM accounts WHERE url LIKE '%@%'")
                    .fetch_all(pool)
                    .await?,
            )
        })
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
            on_pool!(self, Op::Write, |pool| {
                sqlx::query("UPDATE accounts SET url = $1 WHERE id = $2")
                    .bind(url.as_str())
                    .bind(&id)
                    .execute(pool)
                    .await?;
                Ok(())
            })
            .await?;
            tracing::warn!(account = %id, "removed a user name and password from the account URL; give them with `account update --email … --password-stdin`");
        }
        Ok(())
    }

    /// Seals a known text on first open; every later open (by any instance) must open it.
    async fn check_key(&self, place: &str) -> Result<(), StoreError> {
        let sealed = self.vault.seal_str(CHECK_PLACE, CHECK_PLAINTEXT);
        // Instances starting together on a new database race to seal it: the first one's
        // row stays, and every one (the first included) then checks its key against it.
        let stored: Vec<u8> = on_pool!(self, Op::Write, |pool| {
            sqlx::query(
                "INSERT INTO vault_check (id, sealed) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&sealed)
            .execute(pool)
            .await?;
            Ok(
                sqlx::query_scalar("SELECT sealed FROM vault_check WHERE id = 1")
                    .fetch_one(pool)
                    .await?,
            )
        })
        .await?;
        match self.vault.open_sealed(CHECK_PLACE, &stored) {
            Ok(_) => Ok(()),
            Err(VaultError::WrongKey) => Err(StoreError::WrongKey(place.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for pending writes and closes the pool (checkpointing SQLite's WAL).
    pub async fn close(&self) {
        match &self.db {
            Db::Sqlite(pool) => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

async fn open_sqlite(path: &Path) -> Result<SqlitePool, StoreError> {
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
    Ok(SqlitePoolOptions::new()
        .max_connections(8)
        // A local file does not drop connections; the ping costs a round trip to the
        // connection's worker thread per query.
        .test_before_acquire(false)
        .connect_with(options)
        .await?)
}

/// An exclusive `flock` on the directory of the database at `path`, held until the returned
/// handle is dropped. Not on the database file itself: closing any descriptor of that file
/// would drop the POSIX locks SQLite holds on it in this process, and another process could
/// then write under its feet.
async fn lock_dir_of(path: &Path) -> Result<std::fs::File, StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let locked = tokio::task::spawn_blocking(move || {
        let handle = std::fs::File::open(&dir)?;
        handle.lock()?;
        Ok::<_, std::io::Error>(handle)
    })
    .await
    .map_err(std::io::Error::other);
    locked
        .and_then(|r| r)
        .map_err(|source| StoreError::DataDir {
            path: "the database's directory (locking it for migrations)".to_owned(),
            source,
        })
}

async fn open_postgres(url: &str) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.application_name("computetower");
    // Unlike a local file, a server's connections can drop (a restart, a failover): the
    // ping before reuse replaces a dead one instead of failing a request with it.
    PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(true)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Applies what `migrator` has that the database lacks, under the engine's migration lock
/// (PostgreSQL: an advisory lock, so instances starting together migrate once).
async fn migrate<DB>(
    pool: &sqlx::Pool<DB>,
    migrator: &Migrator,
    place: &str,
) -> Result<Schema, StoreError>
where
    DB: sqlx::Database,
    DB::Connection: Migrate,
{
    let mut conn = pool.acquire().await?;
    conn.lock().await?;
    let result = async {
        conn.ensure_migrations_table().await?;
        let before: Vec<i64> = conn
            .list_applied_migrations()
            .await?
            .iter()
            .map(|m| m.version)
            .collect();
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        if let Some(&found) = before.iter().filter(|&&v| v > known).max() {
            return Err(StoreError::NewerSchema {
                place: place.to_owned(),
                found,
                known,
            });
        }
        migrator.run_direct(&mut *conn).await?;
        let after: Vec<i64> = conn
            .list_applied_migrations()
            .await?
            .iter()
            .map(|m| m.version)
            .collect();
        Ok(Schema {
            version: after.iter().copied().max().unwrap_or(0),
            applied_now: after.into_iter().filter(|v| !before.contains(v)).collect(),
        })
    }
    .await;
    let _ = conn.unlock().await;
    result
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
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{TestDb, on_both_engines};
    use super::*;

    on_both_engines! {
        async fn wrong_master_key_fails_at_open(db, store) {
            store.close().await;
            let err = db.open(2).await.unwrap_err();
            assert!(matches!(err, StoreError::WrongKey(_)), "{err}");
            let message = err.to_string();
            assert!(message.contains("master key does not open"), "{message}");
            if let TestDb::Postgres(_) = &db {
                let password = &postgres_cluster().password;
                assert!(!message.contains(password.as_str()), "{message}");
            }
            // The right key still opens it: nothing was lost.
            db.open(1).await.unwrap();
        }

        /// An account URL stored with `user:pass@` before such URLs were refused loses them
        /// on the next open: neither kept in clear, listed, nor sent as Basic auth.
        async fn credentials_in_stored_account_urls_are_removed(db, store) {
            store
                .execute_raw(
                    "INSERT INTO accounts (id, service, url, created_at, updated_at)
                     VALUES ('a_1', 's', 'https://me:hunter2@chat.example.com/app', 0, 0)",
                )
                .await;
            store.close().await;
            let store = db.open(1).await.unwrap();
            let accounts = store.accounts().await.unwrap();
            assert_eq!(accounts[0].url, "https://chat.example.com/app");
        }

        /// The first open applies every migration; later ones apply none and report the
        /// same version.
        async fn opening_reports_the_schema_version_and_what_it_applied(db, store) {
            assert_eq!(store.schema().version, latest());
            assert_eq!(store.schema().applied_now, all_versions());
            store.close().await;
            let again = db.open(1).await.unwrap();
            assert_eq!(again.schema().version, latest());
            assert!(again.schema().applied_now.is_empty());
        }

        /// Instances starting together on one database: the migrations run once, one of
        /// them seals the key check, and all open it.
        async fn stores_opened_together_migrate_once_and_share_the_key_check(_db, store) {
            let fresh = TestDb::new(store.engine()).await;
            let opened = futures_util::future::join_all((0..4).map(|_| fresh.open(1))).await;
            let mut applied = Vec::new();
            for store in opened {
                let store = store.unwrap();
                applied.extend(store.schema().applied_now.clone());
                assert_eq!(store.schema().version, latest());
            }
            applied.sort();
            assert_eq!(applied, all_versions(), "each migration applied once");
            let checks = fresh.open(1).await.unwrap().raw_bytes("SELECT sealed FROM vault_check").await;
            assert_eq!(checks.len(), 1);
            assert!(matches!(fresh.open(3).await, Err(StoreError::WrongKey(_))));
        }

        /// A database migrated by a newer computetower is refused, not used half-understood.
        async fn a_newer_schema_is_refused(db, store) {
            let checksum = match store.engine() {
                Engine::Sqlite => "X'00'",
                Engine::Postgres => "'\\x00'::bytea",
            };
            store
                .execute_raw(&format!(
                    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
                     VALUES (99, 'from the future', TRUE, {checksum}, 0)"
                ))
                .await;
            store.close().await;
            let err = db.open(1).await.unwrap_err();
            assert!(matches!(err, StoreError::NewerSchema { found: 99, known, .. } if known == latest()), "{err}");
            assert!(err.to_string().contains("upgrade"), "{err}");
        }
    }

    /// Each operation is timed by engine and kind in `/metrics`, with buckets fine enough
    /// for a local read, and a failed one is counted.
    #[tokio::test]
    async fn operations_show_in_the_metrics_by_engine_and_kind() {
        crate::telemetry::install();
        let (_dir, store) = testing::store().await;
        store.accounts().await.unwrap();
        store.close().await;
        assert!(matches!(store.accounts().await, Err(StoreError::Db(_))));
        let text = crate::telemetry::render();
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
        };
        let read = "engine=\"sqlite\",op=\"read\"";
        assert!(value(&format!("computetower_store_query_seconds_count{{{read}}}")) >= 2.0);
        value(&format!(
            "computetower_store_query_seconds_bucket{{{read},le=\"0.0001\"}}"
        ));
        assert!(value(&format!("computetower_store_errors_total{{{read}}}")) >= 1.0);
        value("computetower_store_errors_total{engine=\"sqlite\",op=\"events\"}");
    }

    /// Connections the server dropped (a restart, a failover, an operator's
    /// `pg_terminate_backend`) are replaced before reuse, not handed to a request.
    #[tokio::test]
    async fn dropped_postgres_connections_are_replaced() {
        let (db, store) = testing::fresh(Engine::Postgres).await;
        store.create_key(false, None).await.unwrap();
        let other = db.open(1).await.unwrap();
        other
            .execute_raw(
                // This test's database only: the cluster is shared with the tests running
                // beside it, whose connections must live.
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'computetower' AND pid <> pg_backend_pid()
                   AND datname = current_database()",
            )
            .await;
        for _ in 0..3 {
            assert_eq!(store.live_key_count().await.unwrap(), 1);
        }
    }

    /// Every migration's version, in order (the same on both engines, see below).
    fn all_versions() -> Vec<i64> {
        SQLITE_MIGRATIONS.iter().map(|m| m.version).collect()
    }

    fn latest() -> i64 {
        all_versions().into_iter().max().unwrap()
    }

    fn postgres_cluster() -> &'static testing::postgres::Cluster {
        testing::postgres::cluster()
    }

    /// Every migration has its twin on the other engine, with the same version and name, so
    /// a schema version means the same on both.
    #[test]
    fn both_engines_have_the_same_migrations() {
        let list = |m: &Migrator| -> Vec<(i64, String)> {
            m.iter()
                .map(|m| (m.version, m.description.to_string()))
                .collect()
        };
        assert_eq!(list(&SQLITE_MIGRATIONS), list(&POSTGRES_MIGRATIONS));
        assert!(SQLITE_MIGRATIONS.iter().count() >= 5);
    }

    #[test]
    fn the_database_url_picks_the_engine_and_is_never_shown() {
        let sqlite = PathBuf::from("/data/computetower.db");
        let unset = Location::new(None, sqlite.clone()).unwrap();
        assert!(matches!(&unset, Location::Sqlite(p) if *p == sqlite));
        assert_eq!(
            Location::new(Some("  "), sqlite.clone()).unwrap().engine(),
            Engine::Sqlite
        );
        for url in [
            "postgres://ct:s3cret-pw@db.internal:6543/tower",
            "postgresql://ct:s3cret-pw@db.internal:6543/tower",
        ] {
            let location = Location::new(Some(url), sqlite.clone()).unwrap();
            assert_eq!(location.engine(), Engine::Postgres);
            assert_eq!(location.describe(), "postgres db.internal:6543/tower");
            assert!(!format!("{location:?}").contains("s3cret"));
        }
        for bad in [
            "mysql://ct:s3cret-pw@db/x",
            "db.internal:5432",
            "sqlite:///x.db",
        ] {
            let err = Location::new(Some(bad), sqlite.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains("postgres://"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
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

    /// `tests/fixtures/store/v0005.db` was made by the code before PostgreSQL support (commit
    /// 8643fb6, with `migrations/` not yet split per engine): it opens with its checksums
    /// intact, every row readable, and takes new writes.
    #[tokio::test]
    async fn a_database_made_before_the_engine_split_opens_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("computetower.db");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store/v0005.db"),
            &path,
        )
        .unwrap();
        let wrong = Store::open(&path, Vault::from_key(&[1; 32])).await;
        assert!(matches!(wrong, Err(StoreError::WrongKey(_))));
        let store = Store::open(&path, Vault::from_key(&[7; 32])).await.unwrap();
        // The migrations after 5 were applied by the first open (they run before the key
        // check); its own rows are untouched.
        assert_eq!(store.schema().version, latest());
        assert!(store.schema().applied_now.is_empty());

        let account = store.account("site").await.unwrap();
        assert_eq!(account.email.as_deref(), Some("me@site.test"));
        assert_eq!(
            store
                .account_password(&account.id)
                .await
                .unwrap()
                .as_deref(),
            Some("fixture-password-1")
        );
        assert_eq!(
            store.account_proxy(&account.id).await.unwrap().as_deref(),
            Some("http://puser:ppass@proxy.test:3128/")
        );
        let session = store.latest_session(&account.id).await.unwrap().unwrap();
        assert_eq!(session.data.cookies[0].value, "fixture-cookie-1");
        assert!(session.authenticated);
        assert_eq!(store.flows(true).await.unwrap().len(), 2);
        let active = store.active_flow("site").await.unwrap().unwrap();
        assert_eq!((active.id.as_str(), active.version), ("f_fixture2", 2));
        assert_eq!(
            store.trusted_flow_origins("f_fixture2").await.unwrap(),
            ["https://api.site.test"]
        );
        let key = store
            .key_by_hash(&keys::hash_key(
                "ct-41fe9d1e9edb9a956d5c63de8897ac2d9181d54dd5efd4ba",
            ))
            .await
            .unwrap()
            .unwrap();
        assert!(key.admin);
        let events = store.recent_events(10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].request_id.as_str(), events[0].queue_ms),
            ("r_fixture1", Some(5))
        );
        let decisions = store.recent_decisions(10).await.unwrap();
        assert_eq!(decisions[0].action, "next_account");
        let continuation = store.find_continuation("k_fixture").await.unwrap().unwrap();
        assert_eq!(continuation.values["conversation_id"], "c-fixture-1");
        assert!(store.find_response("resp_fixture").await.unwrap().is_some());

        let mut flow = active.clone();
        flow.id.clear();
        assert_eq!(store.save_flow(flow).await.unwrap().version, 3);
        store.mark_session_rejected(&session.id).await.unwrap();
        store.close().await;
        let reopened = Store::open(&path, Vault::from_key(&[7; 32])).await.unwrap();
        assert_eq!(
            reopened.active_flow("site").await.unwrap().unwrap().version,
            3
        );
    }
}
