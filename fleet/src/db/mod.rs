//! The fleet database: the one module that defines its tables and writes them, on SQLite
//! (a file, the embedded default: `fleet.db`) or PostgreSQL (`postgres://USER@HOST:PORT/DB`,
//! shared by several `roost fleet` processes, one of which leads: [`leader`]).
//!
//! Every table is created by the numbered migrations of [`schema`], which [`FleetDb::open`]
//! applies, and written only by methods of [`FleetDb`], grouped by who calls them:
//!
//! | module | tables | written by |
//! |---|---|---|
//! | [`ingest`] | `events`, `counters`, `status`, `presence` | the fleet record's ingest ([`crate::record`]), on every instance |
//! | [`desired`] | `desired`, `sequences` | the ingest (what the broker shows) and the controller (what it publishes) |
//! | [`gitops`] | `gitops_sync`, `gitops_plans`, `gitops_published`, `gitops_requests`, `revisions` | the GitOps controller ([`crate::gitops`]), the leader only; requests also by the API and `roost plan` / `roost fleet sync` |
//! | [`inventory`] | `inventory`, `profiles` | the GitOps controller (the inventory with the fleet file of a good commit; each store profile it publishes) |
//! | [`audit`] | `broker_audit` | the broker audit of the leader |
//! | [`leader`] | `leader` | the leadership of the instances on one PostgreSQL database |
//! | [`notify`] | `notify_events`, `notify_messages` | events: the writers of the facts (plans, syncs, store events) in their transactions; messages: the leader's notifier ([`crate::notify`]) |
//! | [`schema`] | `schema_migrations` | [`FleetDb::open`] |
//!
//! Reads are methods too, or functions on a [`Conn`] ([`FleetDb::with_conn`]) where a
//! caller combines several in one consistent read. Each write method is one transaction;
//! every commit is durable before it returns (SQLite: `synchronous=FULL`; PostgreSQL: its
//! default `synchronous_commit = on`).
//!
//! ## Two engines, one set of statements
//!
//! - **Schema**: each [`schema::Migration`] is written once; [`Engine::render`] fills in
//!   the words that differ (SQLite's `INTEGER PRIMARY KEY AUTOINCREMENT` is PostgreSQL's
//!   `BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY`, `BLOB` is `BYTEA`, and an integer
//!   read as `i64` is `BIGINT`). Applied migrations are recorded in the table
//!   `schema_migrations` on both; only finding out whether that table exists differs
//!   (`sqlite_master`, `information_schema.tables`).
//! - **Statements**: written once, in the subset both accept: `INSERT … ON CONFLICT … DO
//!   UPDATE / DO NOTHING` (no `INSERT OR …`), `RETURNING`, `IS DISTINCT FROM`, no
//!   two-argument `MAX`, no bare columns beside `GROUP BY`. They run through [`sql::Conn`]:
//!   arguments are [`sql::Value`]s, rows come back as [`sql::Row`]s, and the placeholder
//!   is rendered per engine (`?1` for SQLite, `$1` for PostgreSQL).
//! - **Connection**: one connection behind a mutex on either engine (a PostgreSQL one is
//!   opened again when it was lost). Every statement of a write method runs in one
//!   transaction; [`FleetDb::with_conn`] runs reads in one (on PostgreSQL a transaction
//!   too, so several reads see one state).
//! - **Driver**: the blocking `postgres` crate (tokio-postgres underneath). Every
//!   `FleetDb` method was blocking and runs on the blocking pool ([`FleetDb::call`]), so the
//!   blocking client keeps every caller as it is and both engines behind the same methods;
//!   sqlx or tokio-postgres alone would have made every method async for one engine and
//!   left SQLite's blocking, i.e. two copies of the access layer. Its cost: its own small
//!   runtime per connection, so it must not be used from an async task (it is not: every
//!   caller is on the blocking pool or a thread of its own).
//! - **Fencing**: a [`FleetDb`] handle made by [`FleetDb::fenced`] (the controller's) checks,
//!   inside every write transaction, that the leader row still names this process's term;
//!   a write of a process that lost the leadership fails with [`DbError::Fenced`].

pub mod audit;
#[doc(hidden)]
pub mod conformance;
pub mod desired;
pub mod gitops;
pub mod ingest;
pub mod inventory;
pub mod leader;
pub mod notify;
pub mod schema;
pub mod sql;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use sql::Conn;

pub use desired::now_ms;
pub use gitops::{Published, Request, SyncState};
pub use ingest::{BatchOutcome, FleetCounts, FleetItem, Gap, StoredEvent};
pub use schema::Engine;

/// Errors of the fleet database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A SQLite statement failed.
    #[error("fleet database")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement failed, or the connection to the server.
    #[error("fleet database (PostgreSQL)")]
    Postgres(#[from] postgres::Error),
    /// A migration failed (nothing of it was applied).
    #[error("fleet database: migration {version} ({name})")]
    Migration {
        /// Its number.
        version: u32,
        /// What it does.
        name: &'static str,
        /// Why.
        #[source]
        source: Box<DbError>,
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
    /// A column did not hold what the statement's reader expected.
    #[error("fleet database: column {index} is not {want} ({found})")]
    Column {
        /// Its index in the row.
        index: usize,
        /// What was expected.
        want: &'static str,
        /// What was there.
        found: String,
    },
    /// A write of the controller was refused: this process no longer holds the leadership
    /// term it wrote under (another instance took over).
    #[error("fleet database: not the leader (term {term} is no longer this process's)")]
    Fenced {
        /// The term this process wrote under (0: none).
        term: u64,
    },
    /// A blocking database task could not run to its end.
    #[error("fleet database task")]
    Task(#[from] tokio::task::JoinError),
}

/// Where the fleet database is: a SQLite file or a PostgreSQL server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection URL (`postgres://USER@HOST:PORT/DB`).
    Postgres(String),
}

impl Location {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; anything else a SQLite path.
    pub fn parse(s: &str) -> Location {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Location::Postgres(s.to_owned())
        } else {
            Location::Sqlite(s.into())
        }
    }

    /// A path given where a database is expected (`--db`): its text decides.
    pub fn of_path(p: &Path) -> Location {
        match p.to_str() {
            Some(s) => Location::parse(s),
            None => Location::Sqlite(p.to_owned()),
        }
    }
}

/// The connection of a PostgreSQL database: opened again when it was lost (a restarted
/// server, a session terminated by an instance taking the leadership over).
struct Pg {
    url: String,
    /// `application_name` of this process's sessions: what another instance terminates
    /// when it takes the leadership over from this one.
    app: String,
    /// Boxed: the client is large, and a SQLite `FleetDb` need not carry its size.
    client: Mutex<Option<Box<postgres::Client>>>,
}

impl Pg {
    fn connect(url: &str, app: &str) -> Result<postgres::Client, DbError> {
        let mut cfg: postgres::Config = url.parse()?;
        cfg.application_name(app);
        cfg.connect_timeout(std::time::Duration::from_secs(5));
        Ok(cfg.connect(postgres::NoTls)?)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The blocking client owns a small runtime, which must not be dropped on an async
        // task (the last handle may go there): a thread of its own drops it.
        let client = self
            .client
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some(c) = client {
            let _ = std::thread::Builder::new()
                .name("fleet-db-close".into())
                .spawn(move || drop(c));
        }
    }
}

enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres(Pg),
}

/// The term a fenced handle writes under ([`FleetDb::fenced`]).
pub trait Fence: Send + Sync {
    /// (term, holder) this process leads under now (None: it does not lead).
    fn current(&self) -> Option<(u64, String)>;
    /// The database refused a write under that term: this process must stop leading.
    fn lost(&self, term: u64);
}

/// The fleet database: one connection, shared by clones.
#[derive(Clone)]
pub struct FleetDb {
    backend: Arc<Backend>,
    fence: Option<Arc<dyn Fence>>,
}

impl std::fmt::Debug for FleetDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetDb")
    }
}

/// The `application_name` of this process's PostgreSQL sessions.
pub fn session_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        format!(
            "roost-fleet-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    })
    .clone()
}

impl FleetDb {
    /// Opens or creates the database and migrates it to the newest schema (a database from
    /// before the migrations were numbered included). A path that reads `postgres://…` is
    /// a PostgreSQL server ([`Location::of_path`]). Blocking: on PostgreSQL it must not run
    /// on an async task ([`FleetDb::open_blocking`] from one).
    pub fn open(path: &Path) -> Result<FleetDb, DbError> {
        FleetDb::open_at(&Location::of_path(path))
    }

    /// [`FleetDb::open`] on the blocking pool, for async callers.
    pub async fn open_blocking(path: &Path) -> Result<FleetDb, DbError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || FleetDb::open(&path)).await?
    }

    /// Opens the database at `location` and migrates it.
    pub fn open_at(location: &Location) -> Result<FleetDb, DbError> {
        let backend = match location {
            Location::Sqlite(path) => {
                // Durable like the outboxes: events are acknowledged to the broker only
                // after they are recorded here.
                let mut conn = roost_runtime::sqlite::open_durable(path)?;
                schema::migrate_sqlite(&mut conn)?;
                Backend::Sqlite(Mutex::new(conn))
            }
            Location::Postgres(url) => {
                let app = session_name();
                let mut client = Pg::connect(url, &app)?;
                schema::migrate_postgres(&mut client)?;
                Backend::Postgres(Pg {
                    url: url.clone(),
                    app,
                    client: Mutex::new(Some(Box::new(client))),
                })
            }
        };
        Ok(FleetDb {
            backend: Arc::new(backend),
            fence: None,
        })
    }

    /// The engine behind it.
    pub fn engine(&self) -> Engine {
        match *self.backend {
            Backend::Sqlite(_) => Engine::Sqlite,
            Backend::Postgres(_) => Engine::Postgres,
        }
    }

    /// The PostgreSQL URL it was opened with (None: SQLite).
    pub fn postgres_url(&self) -> Option<&str> {
        match &*self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(pg) => Some(&pg.url),
        }
    }

    /// A handle on the same connection whose every write transaction first checks that
    /// `fence`'s term is still the leader's, and fails with [`DbError::Fenced`] (telling
    /// the fence) when it is not: the controller's handle.
    pub fn fenced(&self, fence: Arc<dyn Fence>) -> FleetDb {
        FleetDb {
            backend: self.backend.clone(),
            fence: Some(fence),
        }
    }

    /// Runs `f` on the blocking thread pool: every call of this database may fsync or
    /// wait for the server, which must not stall the async runtime. For async callers.
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

    /// Runs `f` on the connection, for reads (blocking: call it from a blocking thread);
    /// on PostgreSQL in one transaction, so several reads see one state. Every write is a
    /// method of this module.
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Conn<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.run(false, |c| f(c))
    }

    /// Runs `f` in one transaction, committed if `f` succeeds (blocking); a fenced handle
    /// checks its term first.
    fn transaction<T, E: From<DbError>>(
        &self,
        f: impl FnOnce(&Conn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.run(true, f)
    }

    fn run<T, E: From<DbError>>(
        &self,
        write: bool,
        f: impl FnOnce(&Conn<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        match &*self.backend {
            Backend::Sqlite(m) => {
                let mut c = m.lock().unwrap_or_else(|p| p.into_inner());
                if !write {
                    return f(&Conn::sqlite(&c));
                }
                let tx = c.transaction().map_err(DbError::from)?;
                let out = {
                    let conn = Conn::sqlite(&tx);
                    self.check_fence(&conn)?;
                    f(&conn)?
                };
                tx.commit().map_err(DbError::from)?;
                Ok(out)
            }
            Backend::Postgres(pg) => {
                let mut guard = pg.client.lock().unwrap_or_else(|p| p.into_inner());
                if guard.as_ref().is_none_or(|c| c.is_closed()) {
                    *guard = None;
                    *guard = Some(Box::new(Pg::connect(&pg.url, &pg.app)?));
                }
                let Some(client) = guard.as_mut() else {
                    return Err(E::from(DbError::Fenced { term: 0 }));
                };
                let tx = client.transaction().map_err(DbError::from)?;
                let conn = Conn::postgres(tx);
                if write {
                    self.check_fence(&conn)?;
                }
                let out = f(&conn)?;
                conn.commit()?;
                Ok(out)
            }
        }
    }

    /// Inside a write transaction of a fenced handle: the leader row must still name this
    /// process's term. The UPDATE takes the row's lock, so a takeover (which increments the
    /// term under the same lock) is ordered before or after this whole transaction.
    fn check_fence(&self, c: &Conn<'_>) -> Result<(), DbError> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        let Some((term, holder)) = fence.current() else {
            return Err(DbError::Fenced { term: 0 });
        };
        if leader::fence(c, term, &holder)? {
            Ok(())
        } else {
            fence.lost(term);
            Err(DbError::Fenced { term })
        }
    }
}
