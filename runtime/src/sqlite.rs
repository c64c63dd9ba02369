//! Opening SQLite files the way every roost component needs them: WAL journal (readers never
//! block the writer) and `synchronous=FULL` (a committed transaction has been fsynced to the
//! WAL, so it survives a power loss), with a busy timeout for concurrent connections.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

/// Opens (creating parent directories and the file if needed) a durable database.
pub fn open_durable(path: &Path) -> Result<Connection, rusqlite::Error> {
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
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
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
