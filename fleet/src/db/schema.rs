//! The fleet database's schema: an ordered list of numbered [`MIGRATIONS`], applied in order
//! when a database opens and recorded in the table `schema_migrations` (version, name, when).
//!
//! A migration is written once, in SQL both engines accept, with the words that differ
//! between them as placeholders that [`Engine::render`] fills in: `{serial}` (a key the
//! database assigns and never reuses), `{int}` (a 64-bit integer) and `{bytes}`. A migration
//! whose statements differ beyond these words would carry its own text per engine.
//!
//! Migrations 1 and 2 are the tables as they were before migrations were numbered, when
//! `roost fleet` and the controller each ran `CREATE TABLE IF NOT EXISTS` at start: a
//! database from then records no version, has some or all of those tables, and migrates by
//! running them again (`IF NOT EXISTS` throughout). A later migration changes what the
//! earlier ones made and need not be idempotent: it runs once, in the same transaction as
//! its record. A migration once released is never edited; a database whose recorded version
//! is newer than [`latest`] is refused.

use rusqlite::{Connection, TransactionBehavior};

use super::sql::{args, Conn};
use super::DbError;

/// A database engine the schema is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite, the engine roost opens.
    Sqlite,
    /// PostgreSQL (`roost fleet --db postgres://…`).
    Postgres,
}

impl Engine {
    /// A migration's text for this engine: its placeholders replaced.
    pub fn render(self, text: &str) -> String {
        let (serial, int, bytes) = match self {
            Engine::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER", "BLOB"),
            Engine::Postgres => (
                "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                "BIGINT",
                "BYTEA",
            ),
        };
        text.replace("{serial}", serial)
            .replace("{int}", int)
            .replace("{bytes}", bytes)
    }
}

/// One step of the schema.
#[derive(Debug)]
pub struct Migration {
    /// Its number: 1, 2, … in the order they apply.
    pub version: u32,
    /// What it does.
    pub name: &'static str,
    /// Its statements, with the placeholders of [`Engine::render`].
    text: &'static str,
}

impl Migration {
    /// The statements for `engine`.
    pub fn sql(&self, engine: Engine) -> String {
        engine.render(self.text)
    }
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "the fleet record",
        text: "CREATE TABLE IF NOT EXISTS events (
                arrival {serial},
                id TEXT NOT NULL UNIQUE,
                store TEXT NOT NULL,
                roostseq {int} NOT NULL,
                type TEXT NOT NULL,
                subject TEXT,
                time TEXT NOT NULL,
                json TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_store_seq ON events(store, roostseq);
            CREATE TABLE IF NOT EXISTS status (store TEXT PRIMARY KEY, json TEXT NOT NULL, received_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS presence (store TEXT PRIMARY KEY, json TEXT NOT NULL, received_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS desired (topic TEXT PRIMARY KEY, sequence {int} NOT NULL, payload {bytes} NOT NULL);
            CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value {int} NOT NULL);
            CREATE TABLE IF NOT EXISTS sequences (topic TEXT PRIMARY KEY, last {int} NOT NULL);
            CREATE TABLE IF NOT EXISTS revisions (revision TEXT PRIMARY KEY, url TEXT NOT NULL, subject TEXT NOT NULL, committed_at TEXT NOT NULL);",
    },
    Migration {
        version: 2,
        name: "the GitOps controller",
        text: "CREATE TABLE IF NOT EXISTS gitops_sync (
                id {int} PRIMARY KEY CHECK (id = 1),
                repo TEXT NOT NULL,
                commit_id TEXT NOT NULL,
                ok {int} NOT NULL,
                reason TEXT NOT NULL,
                checked_at TEXT NOT NULL,
                good_commit TEXT,
                good_file TEXT
            );
            CREATE TABLE IF NOT EXISTS gitops_plans (deployment TEXT PRIMARY KEY, plan TEXT NOT NULL, updated_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS gitops_published (
                topic TEXT PRIMARY KEY,
                deployment TEXT NOT NULL,
                role TEXT NOT NULL,
                revision TEXT,
                remove {int} NOT NULL,
                sequence {int} NOT NULL,
                published_at TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS gitops_requests (id {serial}, deployment TEXT, action TEXT NOT NULL, at TEXT NOT NULL);",
    },
    Migration {
        version: 3,
        name: "the store inventory and store profiles",
        text: "CREATE TABLE inventory (store TEXT PRIMARY KEY, entry TEXT NOT NULL);
            CREATE TABLE profiles (
                store TEXT PRIMARY KEY,
                digest TEXT NOT NULL,
                sequence {int} NOT NULL,
                in_inventory {int} NOT NULL,
                published_at TEXT NOT NULL
            );",
    },
    Migration {
        version: 4,
        name: "the broker audit",
        text: "CREATE TABLE broker_audit (
                id {int} PRIMARY KEY CHECK (id = 1),
                at TEXT NOT NULL,
                trigger TEXT NOT NULL,
                held {int} NOT NULL,
                repaired TEXT NOT NULL,
                audits {int} NOT NULL,
                repaired_total {int} NOT NULL
            );",
    },
    Migration {
        version: 5,
        name: "the controller's leadership",
        // One row: the leader's fencing term (incremented by every takeover), who holds it
        // (its PostgreSQL sessions' application_name) and until when its lease runs by the
        // database's clock. Written by [`super::leader`] only; every write transaction of
        // the controller checks the term ([`super::FleetDb::fenced`]).
        text: "CREATE TABLE leader (
                id {int} PRIMARY KEY CHECK (id = 1),
                term {int} NOT NULL,
                holder TEXT NOT NULL,
                lease_until_ms {int} NOT NULL,
                since TEXT NOT NULL
            );",
    },
    Migration {
        version: 6,
        name: "notifications",
        // What happened, once per key, until the leader's notifier takes it into messages;
        // and the messages: each sink's exact body and idempotency key, queued until the
        // sink takes it (or it is given up). Written by [`super::notify`] only.
        text: "CREATE TABLE notify_events (
                id {serial},
                key TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL,
                json TEXT NOT NULL,
                at_ms {int} NOT NULL,
                taken {int} NOT NULL
            );
            CREATE INDEX notify_events_taken ON notify_events(taken, id);
            CREATE TABLE notify_messages (
                id {serial},
                key TEXT NOT NULL UNIQUE,
                sink TEXT NOT NULL,
                target TEXT NOT NULL,
                events {int} NOT NULL,
                body TEXT NOT NULL,
                state TEXT NOT NULL,
                attempts {int} NOT NULL,
                next_ms {int} NOT NULL,
                last_error TEXT NOT NULL,
                created_ms {int} NOT NULL
            );
            CREATE INDEX notify_messages_due ON notify_messages(state, next_ms);",
    },
];

/// The table of applied migrations (rendered like a migration).
const SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version {int} PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

/// The newest schema version this roost knows.
pub fn latest() -> u32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// The key of the transaction-scoped advisory lock that makes instances starting at once on
/// one PostgreSQL database migrate it once.
const MIGRATION_LOCK: i64 = 0x726f_6f73_7400_0001;

/// The version a database records (0: none, a database from before migrations were
/// numbered, or a new one). Reads only.
pub fn version(c: &Conn<'_>) -> Result<i64, DbError> {
    if !has_table(c, "schema_migrations")? {
        return Ok(0);
    }
    applied(c)
}

fn applied(c: &Conn<'_>) -> Result<i64, DbError> {
    c.query_value(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        &[],
    )
}

fn check(found: i64) -> Result<(), DbError> {
    let known = latest();
    if found > i64::from(known) {
        Err(DbError::NewerSchema { found, known })
    } else {
        Ok(())
    }
}

/// Applies every migration the database lacks, in order, with their records, inside the
/// caller's transaction.
fn apply(c: &Conn<'_>) -> Result<(), DbError> {
    c.batch(&c.engine().render(SCHEMA_MIGRATIONS))?;
    let found = applied(c)?;
    check(found)?;
    for m in MIGRATIONS.iter().filter(|m| i64::from(m.version) > found) {
        c.batch(&m.sql(c.engine()))
            .map_err(|source| DbError::Migration {
                version: m.version,
                name: m.name,
                source: Box::new(source),
            })?;
        c.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?1, ?2, ?3)",
            args![m.version, m.name, roost_schemas::now_rfc3339()],
        )?;
    }
    Ok(())
}

/// Brings a SQLite database to [`latest`]: every migration it lacks, in order, in one
/// transaction with their records. A database already there is only read; two processes
/// opening one file at once migrate it once (the second waits for the first's write lock,
/// then finds nothing to do). Returns the version it is at.
pub(super) fn migrate_sqlite(c: &mut Connection) -> Result<u32, DbError> {
    let found = version(&Conn::sqlite(c))?;
    check(found)?;
    if found == i64::from(latest()) {
        return Ok(latest());
    }
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    apply(&Conn::sqlite(&tx))?;
    tx.commit()?;
    Ok(latest())
}

/// Brings a PostgreSQL database to [`latest`], as [`migrate_sqlite`]: in one transaction
/// (PostgreSQL's DDL is transactional), under an advisory lock so that instances starting
/// at once migrate it once.
pub(super) fn migrate_postgres(client: &mut postgres::Client) -> Result<u32, DbError> {
    let c = Conn::postgres(client.transaction()?);
    c.batch(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))?;
    let found = version(&c)?;
    check(found)?;
    if found < i64::from(latest()) {
        apply(&c)?;
    }
    c.commit()?;
    Ok(latest())
}

/// When each recorded migration was applied: (version, name, applied_at), in order.
pub fn history(c: &Conn<'_>) -> Result<Vec<(u32, String, String)>, DbError> {
    if version(c)? == 0 {
        return Ok(Vec::new());
    }
    c.query(
        "SELECT version, name, applied_at FROM schema_migrations ORDER BY version",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.get::<i64>(0)? as u32, r.get(1)?, r.get(2)?)))
    .collect()
}

/// Whether `table` exists (for tests and diagnostics).
pub fn has_table(c: &Conn<'_>, table: &str) -> Result<bool, DbError> {
    let sql = match c.engine() {
        Engine::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        Engine::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?1"
        }
    };
    Ok(c.query_value::<i64>(sql, args![table])? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::FleetDb;

    #[test]
    fn migrations_are_numbered_in_order_and_written_for_every_engine() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
            for engine in [Engine::Sqlite, Engine::Postgres] {
                let sql = m.sql(engine);
                assert!(
                    !sql.contains('{'),
                    "{} {engine:?}: a placeholder left",
                    m.name
                );
            }
            // The SQLite text is SQLite's, the PostgreSQL text PostgreSQL's.
            let pg = m.sql(Engine::Postgres);
            assert!(
                !pg.contains("AUTOINCREMENT") && !pg.contains("BLOB") && !pg.contains("INTEGER")
            );
        }
    }

    #[test]
    fn every_write_and_read_path_round_trips_on_sqlite() {
        let dir = tempfile::tempdir().expect("tmp");
        crate::db::conformance::round_trip(&FleetDb::open(&dir.path().join("f.db")).expect("open"));
    }

    #[test]
    fn a_new_database_gets_every_table_and_its_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.db");
        let db = FleetDb::open(&path).expect("open");
        db.with_conn(|c| {
            assert_eq!(version(c)?, i64::from(latest()));
            for t in [
                "events",
                "status",
                "presence",
                "desired",
                "counters",
                "sequences",
                "revisions",
                "gitops_sync",
                "gitops_plans",
                "gitops_published",
                "gitops_requests",
                "broker_audit",
                "leader",
                "notify_events",
                "notify_messages",
            ] {
                assert!(has_table(c, t)?, "{t}");
            }
            let names: Vec<u32> = history(c)?.into_iter().map(|(v, _, _)| v).collect();
            assert_eq!(names, (1..=latest()).collect::<Vec<_>>());
            Ok(())
        })
        .expect("schema");
        drop(db);
        // Opening again changes nothing.
        let db = FleetDb::open(&path).expect("reopen");
        let n = db.with_conn(|c| Ok(history(c)?.len())).expect("history");
        assert_eq!(n, MIGRATIONS.len());
    }

    /// Makes a database as roost made it before migrations were numbered: `roost fleet`
    /// ran migration 1's text at every start, the controller (and the API) migration 2's;
    /// nothing recorded a version.
    fn unversioned(path: &std::path::Path, with_controller: bool) -> Connection {
        let c = Connection::open(path).expect("old");
        c.execute_batch(&MIGRATIONS[0].sql(Engine::Sqlite))
            .expect("record tables");
        if with_controller {
            c.execute_batch(&MIGRATIONS[1].sql(Engine::Sqlite))
                .expect("gitops tables");
        }
        c
    }

    #[test]
    fn a_database_from_before_versions_migrates_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tmp");
        // A controller's database: both sets of tables, with rows.
        let both = dir.path().join("controller.db");
        {
            let c = unversioned(&both, true);
            c.execute_batch(
                "INSERT INTO events(id, store, roostseq, type, subject, time, json)
                   VALUES ('e1', 's1', 1, 'dev.roost.converged', NULL, '2024-01-01T00:00:00Z', '{}');
                 INSERT INTO status(store, json, received_at) VALUES ('s1', '{}', '2024-01-01T00:00:00Z');
                 INSERT INTO desired(topic, sequence, payload) VALUES ('t', 7, x'01');
                 INSERT INTO sequences(topic, last) VALUES ('t', 7);
                 INSERT INTO gitops_plans(deployment, plan, updated_at) VALUES ('web', '{}', '2024-01-01T00:00:00Z');
                 INSERT INTO gitops_requests(deployment, action, at) VALUES ('web', 'pause', '2024-01-01T00:00:00Z');",
            )
            .expect("rows");
        }
        // A fleet record's database that never ran a controller: no gitops tables.
        let record_only = dir.path().join("record.db");
        {
            let c = unversioned(&record_only, false);
            c.execute(
                "INSERT INTO desired(topic, sequence, payload) VALUES ('t', 3, x'02')",
                [],
            )
            .expect("row");
        }
        for path in [&both, &record_only] {
            let db = FleetDb::open(path).expect("open an unversioned database");
            db.with_conn(|c| {
                assert_eq!(version(c)?, i64::from(latest()), "{}", path.display());
                assert!(has_table(c, "gitops_requests")?);
                Ok(())
            })
            .expect("migrated");
        }
        let db = FleetDb::open(&both).expect("open");
        assert_eq!(db.events("s1").expect("events")[0].id, "e1");
        assert_eq!(db.desired().expect("desired"), vec![("t".into(), vec![1])]);
        let last = db
            .with_conn(|c| {
                c.query_value::<i64>("SELECT last FROM sequences WHERE topic = 't'", &[])
            })
            .expect("sequences");
        assert_eq!(last, 7);
        assert!(db
            .with_conn(crate::db::gitops::plans)
            .expect("plans")
            .is_empty());
        assert_eq!(
            db.take_requests().expect("requests"),
            vec![crate::db::Request::Pause("web".into())]
        );
        let db = FleetDb::open(&record_only).expect("open");
        assert_eq!(db.desired().expect("desired"), vec![("t".into(), vec![2])]);
    }

    #[test]
    fn a_database_from_a_newer_roost_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.db");
        drop(FleetDb::open(&path).expect("open"));
        Connection::open(&path)
            .expect("raw")
            .execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?1, 'future', '')",
                [latest() + 1],
            )
            .expect("future");
        match FleetDb::open(&path) {
            Err(DbError::NewerSchema { found, known }) => {
                assert_eq!((found, known), (i64::from(latest()) + 1, latest()))
            }
            other => panic!("{other:?}"),
        }
    }
}
