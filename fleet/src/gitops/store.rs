//! The controller's tables in the fleet database: the fleet file's last sync (commit,
//! validity, reason), the last good file, each deployment's plan, every message the
//! controller published (topic, role, revision, sequence), and operator requests. Plus the
//! fleet view (stores, groups, presence, status) the wave engine judges by.

use std::collections::BTreeMap;

use roost_schemas::fleet::FleetFile;
use roost_schemas::{Presence, PresenceState, StatusDoc};
use rusqlite::{params, Connection, OptionalExtension};

use super::plan::{Plan, StoreView};
use crate::record::{FleetDb, FleetError};

/// Creates the controller's tables.
pub fn migrate(db: &FleetDb) -> Result<(), FleetError> {
    db.with_conn(|c| {
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS gitops_sync (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                repo TEXT NOT NULL,
                commit_id TEXT NOT NULL,
                ok INTEGER NOT NULL,
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
                remove INTEGER NOT NULL,
                sequence INTEGER NOT NULL,
                published_at TEXT NOT NULL
            );
            CREATE TABLE IF NOT EXISTS gitops_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT, action TEXT NOT NULL, at TEXT NOT NULL);",
        )?;
        Ok(())
    })
}

/// The last sync of the fleet file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncState {
    /// Fleet repository.
    pub repo: String,
    /// Commit last looked at.
    pub commit: String,
    /// Whether that commit's file was valid.
    pub ok: bool,
    /// Why not.
    pub reason: String,
    /// When.
    pub checked_at: String,
    /// The last good commit (in force).
    pub good_commit: Option<String>,
}

/// Reads the last sync and the good file.
pub fn sync_state(c: &Connection) -> Result<Option<(SyncState, Option<FleetFile>)>, FleetError> {
    let row = c
        .query_row(
            "SELECT repo, commit_id, ok, reason, checked_at, good_commit, good_file FROM gitops_sync WHERE id = 1",
            [],
            |r| {
                Ok((
                    SyncState {
                        repo: r.get(0)?,
                        commit: r.get(1)?,
                        ok: r.get::<_, i64>(2)? != 0,
                        reason: r.get(3)?,
                        checked_at: r.get(4)?,
                        good_commit: r.get(5)?,
                    },
                    r.get::<_, Option<String>>(6)?,
                ))
            },
        )
        .optional()?;
    Ok(row.map(|(s, f)| (s, f.and_then(|f| serde_json::from_str(&f).ok()))))
}

/// Records a sync: a good file replaces the one in force; a bad one only records why.
pub fn put_sync(
    c: &Connection,
    repo: &str,
    commit: &str,
    result: Result<&FleetFile, &str>,
) -> Result<(), FleetError> {
    let now = roost_schemas::now_rfc3339();
    match result {
        Ok(file) => {
            let json = serde_json::to_string(file).unwrap_or_default();
            c.execute(
                "INSERT INTO gitops_sync(id, repo, commit_id, ok, reason, checked_at, good_commit, good_file)
                 VALUES (1, ?1, ?2, 1, '', ?3, ?2, ?4)
                 ON CONFLICT(id) DO UPDATE SET repo = excluded.repo, commit_id = excluded.commit_id, ok = 1,
                   reason = '', checked_at = excluded.checked_at, good_commit = excluded.good_commit,
                   good_file = excluded.good_file",
                params![repo, commit, now, json],
            )?;
        }
        Err(reason) => {
            c.execute(
                "INSERT INTO gitops_sync(id, repo, commit_id, ok, reason, checked_at) VALUES (1, ?1, ?2, 0, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET repo = excluded.repo, commit_id = excluded.commit_id, ok = 0,
                   reason = excluded.reason, checked_at = excluded.checked_at",
                params![repo, commit, reason, now],
            )?;
        }
    }
    Ok(())
}

/// Marks a sync of an unchanged commit (so a waiting `roost fleet sync --wait` sees it ran).
pub fn touch_sync(c: &Connection) -> Result<(), FleetError> {
    c.execute(
        "UPDATE gitops_sync SET checked_at = ?1 WHERE id = 1",
        [roost_schemas::now_rfc3339()],
    )?;
    Ok(())
}

/// Every plan.
pub fn plans(c: &Connection) -> Result<BTreeMap<String, Plan>, FleetError> {
    let mut stmt = c.prepare("SELECT deployment, plan FROM gitops_plans ORDER BY deployment")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (d, json) = row?;
        if let Ok(p) = serde_json::from_str(&json) {
            out.insert(d, p);
        }
    }
    Ok(out)
}

/// Stores a plan.
pub fn put_plan(c: &Connection, plan: &Plan) -> Result<(), FleetError> {
    let json = serde_json::to_string(plan).unwrap_or_default();
    c.execute(
        "INSERT INTO gitops_plans(deployment, plan, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(deployment) DO UPDATE SET plan = excluded.plan, updated_at = excluded.updated_at",
        params![plan.deployment, json, roost_schemas::now_rfc3339()],
    )?;
    Ok(())
}

/// Deletes a plan (the deployment was removed).
pub fn delete_plan(c: &Connection, deployment: &str) -> Result<(), FleetError> {
    c.execute(
        "DELETE FROM gitops_plans WHERE deployment = ?1",
        [deployment],
    )?;
    Ok(())
}

/// A message the controller published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Topic.
    pub topic: String,
    /// Deployment.
    pub deployment: String,
    /// `wave`, `fleet` or `pin`.
    pub role: String,
    /// Revision (None for a tombstone).
    pub revision: Option<String>,
    /// A tombstone.
    pub remove: bool,
    /// Sequence.
    pub sequence: u64,
}

/// Everything the controller published.
pub fn published(c: &Connection) -> Result<Vec<Published>, FleetError> {
    let mut stmt = c.prepare(
        "SELECT topic, deployment, role, revision, remove, sequence FROM gitops_published ORDER BY topic",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Published {
            topic: r.get(0)?,
            deployment: r.get(1)?,
            role: r.get(2)?,
            revision: r.get(3)?,
            remove: r.get::<_, i64>(4)? != 0,
            sequence: r.get::<_, i64>(5)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records a publication.
pub fn put_published(c: &Connection, p: &Published) -> Result<(), FleetError> {
    c.execute(
        "INSERT INTO gitops_published(topic, deployment, role, revision, remove, sequence, published_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(topic) DO UPDATE SET deployment = excluded.deployment, role = excluded.role,
           revision = excluded.revision, remove = excluded.remove, sequence = excluded.sequence,
           published_at = excluded.published_at",
        params![
            p.topic,
            p.deployment,
            p.role,
            p.revision,
            p.remove as i64,
            p.sequence as i64,
            roost_schemas::now_rfc3339()
        ],
    )?;
    Ok(())
}

/// An operator request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Row id.
    pub id: i64,
    /// Deployment (None: `sync`).
    pub deployment: Option<String>,
    /// `sync`, `pause`, `resume`, `abort`.
    pub action: String,
}

/// Queues a request (from `roost plan …` / `roost fleet sync`).
pub fn request(c: &Connection, deployment: Option<&str>, action: &str) -> Result<i64, FleetError> {
    c.execute(
        "INSERT INTO gitops_requests(deployment, action, at) VALUES (?1, ?2, ?3)",
        params![deployment, action, roost_schemas::now_rfc3339()],
    )?;
    Ok(c.last_insert_rowid())
}

/// Takes every queued request.
pub fn take_requests(c: &Connection) -> Result<Vec<Request>, FleetError> {
    let mut stmt = c.prepare("SELECT id, deployment, action FROM gitops_requests ORDER BY id")?;
    let rows: Vec<Request> = stmt
        .query_map([], |r| {
            Ok(Request {
                id: r.get(0)?,
                deployment: r.get(1)?,
                action: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    if let Some(last) = rows.last() {
        c.execute("DELETE FROM gitops_requests WHERE id <= ?1", [last.id])?;
    }
    Ok(rows)
}

/// The fleet as the controller sees it for `deployment`: every store that sent a status
/// document, its groups and presence (no presence document counts as online: a store
/// without a bridge reports only its status).
pub fn view(c: &Connection, deployment: &str) -> Result<Vec<StoreView>, FleetError> {
    let mut presence: BTreeMap<String, bool> = BTreeMap::new();
    {
        let mut stmt = c.prepare("SELECT store, json FROM presence")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (s, json) = row?;
            if let Ok(p) = serde_json::from_str::<Presence>(&json) {
                presence.insert(s, p.state == PresenceState::Online);
            }
        }
    }
    let mut stmt = c.prepare("SELECT store, json FROM status ORDER BY store")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (store, json) = row?;
        let Ok(doc) = serde_json::from_str::<StatusDoc>(&json) else {
            continue;
        };
        out.push(StoreView {
            online: presence.get(&store).copied().unwrap_or(true),
            status: doc.deployments.get(deployment).cloned(),
            groups: doc.groups,
            labels: Default::default(),
            store,
        });
    }
    Ok(out)
}
