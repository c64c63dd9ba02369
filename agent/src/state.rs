//! The agent's durable state in SQLite: the last accepted rollout per (scope, deployment)
//! (the replay guard and the inputs to precedence), and what was applied per deployment.

use std::path::Path;
use std::sync::{Arc, Mutex};

use roost_schemas::{Rollout, Scope};
use rusqlite::{params, Connection, OptionalExtension};

use crate::decide::AppliedRecord;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored JSON is unreadable.
    #[error("state database holds an unreadable rollout: {0}")]
    Json(#[from] serde_json::Error),
    /// The lock was poisoned by a panic elsewhere.
    #[error("state database lock poisoned")]
    Poisoned,
}

/// The last accepted envelope of one scope slot.
#[derive(Debug, Clone)]
pub struct AcceptedSlot {
    /// The rollout.
    pub rollout: Rollout,
    /// SHA-256 of the payload bytes.
    pub digest: String,
    /// The raw envelope as received (JSON), for re-publishing.
    pub envelope: Vec<u8>,
}

/// Handle to the state database. Clone freely; calls are short and serialized by a mutex.
#[derive(Clone)]
pub struct StateStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateStore")
    }
}

impl StateStore {
    /// Opens or creates the database.
    pub fn open(path: &Path) -> Result<StateStore, StoreError> {
        let conn = roost_runtime::sqlite::open_durable(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS accepted (
                scope TEXT NOT NULL,
                deployment TEXT NOT NULL,
                sequence INTEGER NOT NULL,
                digest TEXT NOT NULL,
                rollout TEXT NOT NULL,
                envelope BLOB NOT NULL,
                PRIMARY KEY (scope, deployment)
            );
            CREATE TABLE IF NOT EXISTS applied (
                deployment TEXT PRIMARY KEY,
                revision TEXT NOT NULL,
                path TEXT NOT NULL,
                url TEXT NOT NULL,
                removed INTEGER NOT NULL DEFAULT 0,
                updated_at TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS reported (
                deployment TEXT PRIMARY KEY,
                revision TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS inventory (
                deployment TEXT NOT NULL,
                item TEXT NOT NULL,
                PRIMARY KEY (deployment, item)
            );",
        )?;
        Ok(StateStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut c)
    }

    /// The last accepted (sequence, digest) for a slot.
    pub fn last_sequence(
        &self,
        scope: &Scope,
        deployment: &str,
    ) -> Result<Option<(u64, String)>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT sequence, digest FROM accepted WHERE scope = ?1 AND deployment = ?2",
                params![scope.key(), deployment],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
            )
            .optional()?)
        })
    }

    /// Records an accepted envelope (replacing the slot's previous one).
    pub fn accept(
        &self,
        rollout: &Rollout,
        digest: &str,
        envelope: &[u8],
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(rollout)?;
        self.with(|c| {
            c.execute(
                "INSERT INTO accepted(scope, deployment, sequence, digest, rollout, envelope)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(scope, deployment) DO UPDATE SET sequence = excluded.sequence,
                   digest = excluded.digest, rollout = excluded.rollout, envelope = excluded.envelope",
                params![rollout.scope.key(), rollout.deployment, rollout.sequence as i64, digest, json, envelope],
            )?;
            Ok(())
        })
    }

    /// Every accepted slot for a deployment.
    pub fn slots(&self, deployment: &str) -> Result<Vec<AcceptedSlot>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT rollout, digest, envelope FROM accepted WHERE deployment = ?1 ORDER BY scope",
            )?;
            let rows = stmt.query_map([deployment], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (json, digest, envelope) = row?;
                out.push(AcceptedSlot {
                    rollout: serde_json::from_str(&json)?,
                    digest,
                    envelope,
                });
            }
            Ok(out)
        })
    }

    /// Every deployment with an accepted slot or an applied record.
    pub fn deployments(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT deployment FROM accepted UNION SELECT deployment FROM applied ORDER BY 1",
            )?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// What was last applied for a deployment.
    pub fn applied(&self, deployment: &str) -> Result<Option<AppliedRecord>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT revision, path, url, removed FROM applied WHERE deployment = ?1",
                [deployment],
                |r| {
                    Ok(AppliedRecord {
                        revision: r.get(0)?,
                        path: r.get(1)?,
                        url: r.get(2)?,
                        removed: r.get::<_, i64>(3)? != 0,
                    })
                },
            )
            .optional()?)
        })
    }

    /// Records a finished apply or removal.
    pub fn set_applied(&self, deployment: &str, rec: &AppliedRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO applied(deployment, revision, path, url, removed, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(deployment) DO UPDATE SET revision = excluded.revision,
                   path = excluded.path, url = excluded.url, removed = excluded.removed,
                   updated_at = excluded.updated_at",
                params![
                    deployment,
                    rec.revision,
                    rec.path,
                    rec.url,
                    rec.removed as i64,
                    roost_schemas::now_rfc3339()
                ],
            )?;
            Ok(())
        })
    }

    /// The revision whose outcome (converged/degraded) was last reported.
    pub fn reported(&self, deployment: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT revision FROM reported WHERE deployment = ?1",
                [deployment],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    /// Records that the outcome for `revision` was reported (the event is in the outbox).
    pub fn set_reported(&self, deployment: &str, revision: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO reported(deployment, revision) VALUES (?1, ?2)
                 ON CONFLICT(deployment) DO UPDATE SET revision = excluded.revision",
                params![deployment, revision],
            )?;
            Ok(())
        })
    }

    /// The stored inventory (target-specific item strings) of a deployment.
    pub fn inventory(&self, deployment: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT item FROM inventory WHERE deployment = ?1 ORDER BY item")?;
            let rows = stmt.query_map([deployment], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Replaces a deployment's inventory.
    pub fn set_inventory(&self, deployment: &str, items: &[String]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM inventory WHERE deployment = ?1", [deployment])?;
            for i in items {
                tx.execute(
                    "INSERT OR IGNORE INTO inventory(deployment, item) VALUES (?1, ?2)",
                    params![deployment, i],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}
