//! Test support: a fresh store on either engine, and [`on_both_engines!`], which runs one test
//! body on each. PostgreSQL is the real server of `tests/common/postgres.rs`, one cluster per
//! test binary and one database per test.

use super::*;

#[path = "../../tests/common/postgres.rs"]
pub mod postgres;

/// A database for one test; it outlives the stores opened on it, so a test can reopen it.
pub enum TestDb {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl TestDb {
    pub async fn new(engine: Engine) -> Self {
        match engine {
            Engine::Sqlite => TestDb::Sqlite(tempfile::tempdir().unwrap()),
            Engine::Postgres => TestDb::Postgres(postgres::fresh_database().await),
        }
    }

    pub fn location(&self) -> Location {
        match self {
            TestDb::Sqlite(dir) => Location::Sqlite(dir.path().join("t.db")),
            TestDb::Postgres(url) => Location::Postgres(url.clone()),
        }
    }

    /// Opens a store on this database with the master key `[key; 32]`.
    pub async fn open(&self, key: u8) -> Result<Store, StoreError> {
        Store::connect(&self.location(), Vault::from_key(&[key; 32])).await
    }
}

/// A fresh store on `engine`, with the master key `[1; 32]`.
pub async fn fresh(engine: Engine) -> (TestDb, Store) {
    let db = TestDb::new(engine).await;
    let store = db.open(1).await.unwrap();
    (db, store)
}

/// A fresh SQLite store (tests of other modules, which need a store and not an engine).
pub async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db"), Vault::from_key(&[1; 32]))
        .await
        .unwrap();
    (dir, store)
}

impl Store {
    /// Runs `sql` as it is (planting rows the API would refuse, say).
    pub async fn execute_raw(&self, sql: &str) {
        on_pool!(self, Op::Write, |pool| {
            sqlx::raw_sql(sql).execute(pool).await?;
            Ok(())
        })
        .await
        .unwrap();
    }

    /// The bytes of the first column of every row `sql` returns: what is stored, to check it
    /// is sealed.
    pub async fn raw_bytes(&self, sql: &str) -> Vec<Vec<u8>> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(sql).fetch_all(pool).await?)
        })
        .await
        .unwrap()
    }

    /// The first column of every row `sql` returns, as text.
    pub async fn raw_texts(&self, sql: &str) -> Vec<String> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(sql).fetch_all(pool).await?)
        })
        .await
        .unwrap()
    }
}

/// Declares tests that run once on each engine: `async fn name(db, store) { … }` becomes
/// `name::sqlite` and `name::postgres`, each with a fresh database (`db`, to reopen it) and a
/// store open on it.
macro_rules! on_both_engines {
    ($( $(#[$meta:meta])* async fn $name:ident($db:ident, $store:ident) $body:block )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run(
                $db: $crate::store::testing::TestDb,
                $store: $crate::store::Store,
            ) $body

            #[tokio::test]
            async fn sqlite() {
                let (db, store) =
                    $crate::store::testing::fresh($crate::store::Engine::Sqlite).await;
                run(db, store).await
            }

            #[tokio::test]
            async fn postgres() {
                let (db, store) =
                    $crate::store::testing::fresh($crate::store::Engine::Postgres).await;
                run(db, store).await
            }
        }
    )*};
}
pub(crate) use on_both_engines;
