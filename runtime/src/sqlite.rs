//! Opening SQLite files the way every roost component needs them: WAL journal (readers never
//! block the writer) and `synchronous=FULL` (a committed transaction has been fsynced to the
//! WAL, so it survives a power loss), with a busy timeout for concurrent connections.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Opens (creating parent directories and the file if needed) a durable database.
pub fn open_durable(path: &Path) -> Result<Connection, rusqlite::Error> {
    open(path, false)
}

/// [`open_durable`] for a database that only this connection uses (the outbox's writer):
/// `locking_mode=EXCLUSIVE`, set before the first access, so SQLite keeps the WAL index in
/// the connection's memory instead of a shared `-shm` file and takes its file locks once,
/// not twice per transaction. Another process that opens the file while it is held gets
/// `database is locked` (after the busy timeout): two agents on one state directory fail
/// instead of sharing it. The lock ends with the connection (or the process).
pub fn open_exclusive(path: &Path) -> Result<Connection, rusqlite::Error> {
    open(path, true)
}

fn open(path: &Path, exclusive: bool) -> Result<Connection, rusqlite::Error> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("{}: {e}", dir.display())),
                )
            })?;
        }
    }
    let conn = Connection::open(path)?;
    if exclusive {
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // The query planner stability guarantee: a statement's plan never depends on the values
    // bound to it. Without it SQLite marks `LIMIT ?` (and other parameters the planner looks
    // at) so that every new binding prepares the statement again: the outbox's peek did that
    // on every call, the largest single cost of its writer thread.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(conn)
}

/// A transaction begun and ended with cached statements: rusqlite's `Transaction` hands
/// `BEGIN` and `COMMIT` to SQLite as text, parsed again for every transaction, which was
/// most of the outbox writer's remaining SQL parsing. Rolls back when dropped uncommitted
/// (an error on the way), like `Transaction`.
pub struct CachedTx<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> CachedTx<'c> {
    /// `BEGIN` (deferred).
    pub fn begin(conn: &'c Connection) -> Result<CachedTx<'c>, rusqlite::Error> {
        conn.prepare_cached("BEGIN")?.execute([])?;
        Ok(CachedTx { conn, open: true })
    }

    /// `COMMIT`; on an error the transaction is rolled back when `self` drops.
    pub fn commit(mut self) -> Result<(), rusqlite::Error> {
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for CachedTx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for CachedTx<'_> {
    fn drop(&mut self) {
        if self.open && !self.conn.is_autocommit() {
            let _ = self
                .conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]));
        }
    }
}

#[cfg(test)]
mod tests {
    /// Committed rows stay; a transaction dropped without commit leaves nothing.
    #[test]
    fn cached_transactions_commit_and_roll_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = super::open_durable(&dir.path().join("t.db")).expect("open");
        c.execute_batch("CREATE TABLE t (v INTEGER)")
            .expect("schema");
        for v in 0..3 {
            let tx = super::CachedTx::begin(&c).expect("begin");
            tx.execute("INSERT INTO t VALUES (?1)", [v])
                .expect("insert");
            tx.commit().expect("commit");
        }
        {
            let tx = super::CachedTx::begin(&c).expect("begin");
            tx.execute("INSERT INTO t VALUES (99)", []).expect("insert");
        }
        assert!(c.is_autocommit(), "rolled back, no transaction left open");
        let rows: Vec<i64> = c
            .prepare("SELECT v FROM t ORDER BY v")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(rows, vec![0, 1, 2]);
    }

    /// A cached statement with `LIMIT ?` runs with new values without being prepared again
    /// (SQLite's RePrepare counter of the statement); a plain connection does prepare it again.
    #[test]
    fn bound_values_do_not_prepare_statements_again() {
        use rusqlite::StatementStatus::RePrepare;
        let dir = tempfile::tempdir().expect("tmp");
        let run = |c: &rusqlite::Connection| {
            c.execute_batch("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
                .expect("schema");
            let sql = "SELECT id FROM t WHERE id > ?1 ORDER BY id LIMIT ?2";
            for limit in 1..=5i64 {
                let mut stmt = c.prepare_cached(sql).expect("prepare");
                let _ids: Vec<i64> = stmt
                    .query_map([0, limit], |r| r.get(0))
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows");
            }
            let stmt = c.prepare_cached(sql).expect("cached");
            stmt.get_status(RePrepare)
        };
        let durable = super::open_durable(&dir.path().join("d.db")).expect("open");
        assert_eq!(run(&durable), 0);
        let plain = rusqlite::Connection::open(dir.path().join("p.db")).expect("open");
        assert!(
            run(&plain) > 0,
            "the cause: SQLite's default prepares again"
        );
    }

    #[test]
    fn an_exclusive_database_is_refused_to_others_until_closed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("x.db");
        let c = super::open_exclusive(&path).expect("open");
        c.execute_batch("CREATE TABLE t(v); INSERT INTO t VALUES (1);")
            .expect("write");
        assert!(
            !dir.path().join("x.db-shm").exists(),
            "the WAL index lives in the connection's memory"
        );
        let other = rusqlite::Connection::open(&path).expect("open");
        other
            .busy_timeout(std::time::Duration::from_millis(10))
            .expect("timeout");
        let err = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .expect_err("held");
        assert!(err.to_string().contains("locked"), "{err}");
        drop(c);
        let n: i64 = other
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("free again");
        assert_eq!(n, 1);
    }

    #[test]
    fn opens_in_wal_with_full_sync() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = super::open_durable(&dir.path().join("a/b/x.db")).expect("open");
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        let sync: i64 = c
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("sync");
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "FULL");
    }
}
