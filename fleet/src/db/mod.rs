//! The fleet database (`fleet.db`): the one module that defines its tables and writes them.
//!
//! Every table is created by the numbered migrations of [`schema`], which [`FleetDb::open`]
//! applies, and written only by methods of [`FleetDb`], grouped by who calls them:
//!
//! | module | tables | written by |
//! |---|---|---|
//! | [`ingest`] | `events`, `counters`, `status`, `presence` | the fleet record's ingest ([`crate::record`]) |
//! | [`desired`] | `desired`, `sequences` | the ingest (what the broker shows) and the controller (what it publishes) |
//! | [`gitops`] | `gitops_sync`, `gitops_plans`, `gitops_published`, `gitops_requests`, `revisions` | the GitOps controller ([`crate::gitops`]); requests also by the API and `roost plan` / `roost fleet sync` |
//! | [`inventory`] | `inventory`, `profiles` | the GitOps controller (the inventory with the fleet file of a good commit; each store profile it publishes) |
//! | [`schema`] | `schema_migrations` | [`FleetDb::open`] |
//!
//! Reads are methods too, or functions on a connection ([`FleetDb::with_conn`]) where a
//! caller combines several in one consistent read. Each write method is one transaction;
//! every commit is durable (`synchronous=FULL`) before it returns.
//!
//! ## Engines: SQLite now, PostgreSQL next
//!
//! roost opens SQLite files only; the schema is written for PostgreSQL too, so that the
//! cloud tier can move to it without a second schema. Where the engines differ:
//!
//! - **Schema**: each [`schema::Migration`] is written once; [`Engine::render`] fills in
//!   the words that differ (SQLite's `INTEGER PRIMARY KEY AUTOINCREMENT` is PostgreSQL's
//!   `BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY`, `BLOB` is `BYTEA`, and an integer
//!   read as `i64` is `BIGINT`). Applied migrations are recorded in the table
//!   `schema_migrations`, which works the same on both (not SQLite's `PRAGMA
//!   user_version`). Only finding out whether that table exists is SQLite's own
//!   (`sqlite_master`; `information_schema.tables` there).
//! - **Statements**: the SQL of this module stays in the subset both accept: `INSERT … ON
//!   CONFLICT … DO UPDATE / DO NOTHING` (no `INSERT OR …`), `RETURNING`, `IS DISTINCT FROM`,
//!   no two-argument `MAX`. What still differs is the placeholder: `?1` here, `$1` there.
//! - **Connection**: [`FleetDb`] holds one rusqlite connection behind a mutex; a PostgreSQL
//!   `FleetDb` would hold a driver's pool and implement the same methods (no driver is a
//!   dependency yet). [`FleetDb::with_conn`] hands out the SQLite connection itself: its
//!   callers outside this module (the fleet view, the API's event pages and stream, the
//!   simulator) are the reads a PostgreSQL engine would have to bring in here first.
//! - **Durability**: WAL with `synchronous=FULL` ([`roost_runtime::sqlite::open_durable`])
//!   is PostgreSQL's default `synchronous_commit = on`.

pub mod audit;
pub mod desired;
pub mod gitops;
pub mod ingest;
pub mod inventory;
pub mod schema;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use desired::now_ms;
pub use gitops::{Published, Request, SyncState};
pub use ingest::{BatchOutcome, FleetCounts, FleetItem, Gap, StoredEvent};
pub use schema::Engine;

/// Errors of the fleet database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A statement failed.
    #[error("fleet database")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed (nothing of it was applied).
    #[error("fleet database: migration {version} ({name})")]
    Migration {
        /// Its number.
        version: u32,
        /// What it does.
        name: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was migrated by a newer roost than this one.
    #[error("fleet database: schema version {found}, newer than this roost's {known}; use a newer roost")]
    NewerSchema {
        /// The version the database records.
        found: i64,
        /// The newest this roost knows.
        known: u32,
    },
    /// A value could not be encoded for a column.
    #[error("fleet database: cannot encode {what}")]
    Encode {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking database task could not run to its end.
    #[error("fleet database task")]
    Task(#[from] tokio::task::JoinError),
}

/// The fleet database: one connection, shared by clones.
#[derive(Clone)]
pub struct FleetDb {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for FleetDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetDb")
    }
}

impl FleetDb {
    /// Opens or creates the database and migrates it to the newest schema (a database from
    /// before the migrations were numbered included).
    pub fn open(path: &Path) -> Result<FleetDb, DbError> {
        // Durable like the outboxes: events are acknowledged to the broker only after they
        // are recorded here.
        let mut conn = roost_runtime::sqlite::open_durable(path)?;
        schema::migrate(&mut conn)?;
        Ok(FleetDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the blocking thread pool: every call of this database may fsync, which
    /// must not stall the async runtime. For async callers.
    pub async fn call<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&FleetDb) -> Result<T, E> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| E::from(DbError::Task(e)))?
    }

    /// Runs `f` on the connection, for reads (blocking: call it from a blocking thread).
    /// Every write is a method of this module.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        f(&self.lock())
    }

    /// Runs `f` in one transaction, committed if `f` succeeds (blocking).
    fn transaction<T, E: From<DbError>>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut c = self.lock();
        let tx = c.transaction().map_err(DbError::from)?;
        let out = f(&tx)?;
        tx.commit().map_err(DbError::from)?;
        Ok(out)
    }
}
