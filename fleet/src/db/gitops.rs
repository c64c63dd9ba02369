//! The GitOps controller's tables: the fleet file's last sync (commit, validity, reason, the
//! last good file), each deployment's plan, every message the controller published (topic,
//! role, revision, sequence), operator requests from other processes, and the subject and
//! time of the commits it rolls out. Plus the fleet as the wave engine sees it (stores,
//! groups, presence, status), read from the record's tables.
//!
//! Reads are functions on a connection ([`FleetDb::with_conn`]); writes are methods of
//! [`FleetDb`]. What the controller publishes is recorded by
//! [`FleetDb::record_publications`] in one transaction with the sequences and the desired
//! state, before it goes out.

use std::collections::{BTreeMap, HashMap};

use super::desired::{next_sequence_in, store};
use super::sql::{args, Conn};
use super::{DbError, FleetDb};
use crate::gitops::plan::{Plan, StoreView};
use roost_schemas::fleet::FleetFile;
use roost_schemas::{Presence, PresenceState, StatusDoc};

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
pub fn sync_state(c: &Conn<'_>) -> Result<Option<(SyncState, Option<FleetFile>)>, DbError> {
    let row = c
        .query_opt(
            "SELECT repo, commit_id, ok, reason, checked_at, good_commit, good_file FROM gitops_sync WHERE id = 1",
            &[],
        )?
        .map(|r| {
            Ok::<_, DbError>((
                SyncState {
                    repo: r.get(0)?,
                    commit: r.get(1)?,
                    ok: r.get(2)?,
                    reason: r.get(3)?,
                    checked_at: r.get(4)?,
                    good_commit: r.get(5)?,
                },
                r.get::<Option<String>>(6)?,
            ))
        })
        .transpose()?;
    Ok(row.map(|(s, f)| (s, f.and_then(|f| serde_json::from_str(&f).ok()))))
}

/// Every plan.
pub fn plans(c: &Conn<'_>) -> Result<BTreeMap<String, Plan>, DbError> {
    let rows = c.query(
        "SELECT deployment, plan FROM gitops_plans ORDER BY deployment",
        &[],
    )?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (d, json): (String, String) = (row.get(0)?, row.get(1)?);
        if let Ok(p) = serde_json::from_str(&json) {
            out.insert(d, p);
        }
    }
    Ok(out)
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
pub fn published(c: &Conn<'_>) -> Result<Vec<Published>, DbError> {
    c.query(
        "SELECT topic, deployment, role, revision, remove, sequence FROM gitops_published ORDER BY topic",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(Published {
            topic: r.get(0)?,
            deployment: r.get(1)?,
            role: r.get(2)?,
            revision: r.get(3)?,
            remove: r.get(4)?,
            sequence: r.get(5)?,
        })
    })
    .collect()
}

/// An operator's request to the controller: from the API and the webhook in the controller's
/// process over its channel (`crate::gitops::ControllerHandle`), from another process
/// (`roost plan pause`, `roost fleet sync`) through the table `gitops_requests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Look at the fleet repository now.
    Sync,
    /// Pause a deployment's running plan.
    Pause(String),
    /// Resume a deployment's paused plan.
    Resume(String),
    /// Abort a deployment's plan (the previous release is restored).
    Abort(String),
}

impl Request {
    /// The request for `action` on `deployment` (None: no such action, or a plan action
    /// without a deployment).
    pub fn new(action: &str, deployment: Option<String>) -> Option<Request> {
        Some(match (action, deployment) {
            ("sync", _) => Request::Sync,
            ("pause", Some(d)) => Request::Pause(d),
            ("resume", Some(d)) => Request::Resume(d),
            ("abort", Some(d)) => Request::Abort(d),
            _ => return None,
        })
    }

    /// The action's name as the table and the API spell it.
    pub fn action(&self) -> &'static str {
        match self {
            Request::Sync => "sync",
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
            Request::Abort(_) => "abort",
        }
    }

    /// The deployment a plan action is for.
    pub fn deployment(&self) -> Option<&str> {
        match self {
            Request::Sync => None,
            Request::Pause(d) | Request::Resume(d) | Request::Abort(d) => Some(d),
        }
    }
}

/// The fleet as the controller sees it for `deployment`: every store that sent a status
/// document, its groups, its inventory labels and whether it is online by the one presence rule
/// ([`crate::judge::online`]: its presence does not say offline and it was heard within its
/// heartbeat allowance; no presence document counts as online while the store is heard: a
/// store without a bridge reports only its status).
pub fn view(c: &Conn<'_>, deployment: &str) -> Result<Vec<StoreView>, DbError> {
    let now_s = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    let secs = |t: &str| roost_schemas::parse_rfc3339(t).map(|t| t.unix_timestamp().max(0) as u64);
    let mut presence: BTreeMap<String, (PresenceState, Option<u64>)> = BTreeMap::new();
    {
        for row in c.query("SELECT store, json, received_at FROM presence", &[])? {
            let (s, json, at): (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
            if let Ok(p) = serde_json::from_str::<Presence>(&json) {
                presence.insert(s, (p.state, secs(&at)));
            }
        }
    }
    let mut labels = super::inventory::labels(c)?;
    let mut out = Vec::new();
    for row in c.query(
        "SELECT store, json, received_at FROM status ORDER BY store",
        &[],
    )? {
        let (store, json, at): (String, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        let Ok(doc) = serde_json::from_str::<StatusDoc>(&json) else {
            continue;
        };
        let p = presence.get(&store);
        let heard = secs(&at).max(p.and_then(|(_, t)| *t));
        let heartbeat_s = doc.heartbeat_s.unwrap_or(crate::view::DEFAULT_HEARTBEAT_S);
        out.push(StoreView {
            online: crate::judge::online(p.map(|(s, _)| *s), heard, heartbeat_s, now_s),
            status: doc.deployments.get(deployment).cloned(),
            groups: doc.groups,
            labels: labels.remove(&store).unwrap_or_default(),
            store,
        });
    }
    Ok(out)
}

fn put_plan(c: &Conn<'_>, plan: &Plan) -> Result<(), DbError> {
    let json = serde_json::to_string(plan).map_err(|source| DbError::Encode {
        what: "a plan",
        source,
    })?;
    // What the transition from the plan held to this one tells, recorded with it.
    let before: Option<Plan> = c
        .query_opt(
            "SELECT plan FROM gitops_plans WHERE deployment = ?1",
            args![&plan.deployment],
        )?
        .map(|r| r.get::<String>(0))
        .transpose()?
        .and_then(|j| serde_json::from_str(&j).ok());
    let events = crate::notify::plan_events(before.as_ref(), plan, |store| {
        failure_reason(c, store, &plan.deployment)
    });
    super::notify::record_events(c, &events)?;
    c.execute(
        "INSERT INTO gitops_plans(deployment, plan, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(deployment) DO UPDATE SET plan = excluded.plan, updated_at = excluded.updated_at",
        args![&plan.deployment, json, roost_schemas::now_rfc3339()],
    )?;
    Ok(())
}

/// A store's reason and message for `deployment`, as its status document says (empty when
/// it says none).
fn failure_reason(c: &Conn<'_>, store: &str, deployment: &str) -> String {
    let json: Option<String> = c
        .query_opt("SELECT json FROM status WHERE store = ?1", args![store])
        .ok()
        .flatten()
        .and_then(|r| r.get(0).ok());
    let Some(doc) = json.and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok()) else {
        return String::new();
    };
    let d = &doc["deployments"][deployment];
    let field = |f: &str| d[f].as_str().unwrap_or_default().to_owned();
    match (field("reason"), field("message")) {
        (r, m) if m.is_empty() => r,
        (r, m) if r.is_empty() => m,
        (r, m) => format!("{r}: {m}"),
    }
}

fn put_published(c: &Conn<'_>, p: &Published) -> Result<(), DbError> {
    c.execute(
        "INSERT INTO gitops_published(topic, deployment, role, revision, remove, sequence, published_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(topic) DO UPDATE SET deployment = excluded.deployment, role = excluded.role,
           revision = excluded.revision, remove = excluded.remove, sequence = excluded.sequence,
           published_at = excluded.published_at",
        args![
            &p.topic,
            &p.deployment,
            &p.role,
            &p.revision,
            p.remove,
            p.sequence,
            roost_schemas::now_rfc3339()
        ],
    )?;
    Ok(())
}

impl FleetDb {
    /// Records a sync: a good commit's file and inventory replace the ones in force, in one
    /// transaction (inventory None: the commit's `stores/` is the tree of the inventory in
    /// force, which stays); a bad one only records why.
    pub fn put_sync(
        &self,
        repo: &str,
        commit: &str,
        result: Result<(&FleetFile, Option<&crate::inventory::Inventory>), &str>,
    ) -> Result<(), DbError> {
        let now = roost_schemas::now_rfc3339();
        self.transaction(|c| {
        match result {
            Ok((file, inventory)) => {
                if let Some(inventory) = inventory {
                    super::inventory::replace_inventory(c, inventory)?;
                }
                let json = serde_json::to_string(file).map_err(|source| DbError::Encode {
                    what: "the fleet file",
                    source,
                })?;
                c.execute(
                    "INSERT INTO gitops_sync(id, repo, commit_id, ok, reason, checked_at, good_commit, good_file)
                     VALUES (1, ?1, ?2, 1, '', ?3, ?2, ?4)
                     ON CONFLICT(id) DO UPDATE SET repo = excluded.repo, commit_id = excluded.commit_id, ok = 1,
                       reason = '', checked_at = excluded.checked_at, good_commit = excluded.good_commit,
                       good_file = excluded.good_file",
                    args![repo, commit, &now, json],
                )?;
            }
            Err(reason) => {
                super::notify::record_events(
                    c,
                    &[crate::notify::invalid_commit_event(repo, commit, reason)],
                )?;
                c.execute(
                    "INSERT INTO gitops_sync(id, repo, commit_id, ok, reason, checked_at) VALUES (1, ?1, ?2, 0, ?3, ?4)
                     ON CONFLICT(id) DO UPDATE SET repo = excluded.repo, commit_id = excluded.commit_id, ok = 0,
                       reason = excluded.reason, checked_at = excluded.checked_at",
                    args![repo, commit, reason, &now],
                )?;
            }
        }
        Ok(())
        })
    }

    /// Marks a sync of an unchanged commit (so a waiting `roost fleet sync --wait` sees it ran).
    pub fn touch_sync(&self) -> Result<(), DbError> {
        self.transaction(|c| {
            c.execute(
                "UPDATE gitops_sync SET checked_at = ?1 WHERE id = 1",
                args![roost_schemas::now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Records what the controller is about to publish, in one transaction: for each message
    /// the next sequence on its topic (replacing the `sequence` given), the envelope
    /// `sign(index, publication)` makes as the topic's desired state, and the publication;
    /// then `plan`. Returns (topic, envelope) to publish, in order. Nothing is recorded if
    /// signing fails.
    pub fn record_publications<E: From<DbError>>(
        &self,
        mut publications: Vec<Published>,
        plan: Option<&Plan>,
        mut sign: impl FnMut(usize, &Published) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<(String, Vec<u8>)>, E> {
        self.transaction(|tx| {
            let mut out = Vec::with_capacity(publications.len());
            for (i, p) in publications.iter_mut().enumerate() {
                p.sequence = next_sequence_in(tx, &p.topic)?;
                let envelope = sign(i, p)?;
                store(tx, &p.topic, p.sequence, &envelope)?;
                put_published(tx, p)?;
                out.push((p.topic.clone(), envelope));
            }
            if let Some(plan) = plan {
                put_plan(tx, plan)?;
            }
            Ok(out)
        })
    }

    /// Deletes a plan (the deployment was removed).
    pub fn delete_plan(&self, deployment: &str) -> Result<(), DbError> {
        self.transaction(|c| {
            c.execute(
                "DELETE FROM gitops_plans WHERE deployment = ?1",
                args![deployment],
            )?;
            Ok(())
        })
    }

    /// Queues a request for a controller in another process, which takes it within its
    /// poll (500 ms).
    pub fn request(&self, request: &Request) -> Result<(), DbError> {
        // Not fenced: any instance (or `roost plan`) queues a request for the leader.
        let c = FleetDb {
            backend: self.backend.clone(),
            fence: None,
        };
        c.transaction(|c| {
            c.execute(
                "INSERT INTO gitops_requests(deployment, action, at) VALUES (?1, ?2, ?3)",
                args![
                    request.deployment(),
                    request.action(),
                    roost_schemas::now_rfc3339()
                ],
            )?;
            Ok(())
        })
    }

    /// Takes every queued request, oldest first (rows with an unknown action are dropped).
    pub fn take_requests(&self) -> Result<Vec<Request>, DbError> {
        let rows: Vec<(i64, Option<String>, String)> = self.transaction(|c| {
            let rows = c
                .query(
                    "SELECT id, deployment, action FROM gitops_requests ORDER BY id",
                    &[],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<Vec<_>, DbError>>()?;
            if let Some((last, _, _)) = rows.last() {
                c.execute("DELETE FROM gitops_requests WHERE id <= ?1", args![*last])?;
            }
            Ok::<_, DbError>(rows)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, d, action)| {
                let r = Request::new(&action, d);
                if r.is_none() {
                    tracing::warn!(%action, "unknown controller request; dropped");
                }
                r
            })
            .collect())
    }

    /// Remembers a commit's subject line and time (RFC 3339), for the fleet's views.
    pub fn put_revision(
        &self,
        revision: &str,
        url: &str,
        subject: &str,
        committed_at: &str,
    ) -> Result<(), DbError> {
        self.transaction(|c| {
            c.execute(
                "INSERT INTO revisions(revision, url, subject, committed_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(revision) DO UPDATE SET url = excluded.url, subject = excluded.subject,
                   committed_at = excluded.committed_at",
                args![revision, url, subject, committed_at],
            )?;
            Ok(())
        })
    }

    /// Every known commit: revision -> (subject, committed_at).
    pub fn revisions(&self) -> Result<HashMap<String, (String, String)>, DbError> {
        self.with_conn(|c| {
            c.query("SELECT revision, subject, committed_at FROM revisions", &[])?
                .iter()
                .map(|r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_the_table_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        let sent = vec![
            Request::Pause("web".into()),
            Request::Sync,
            Request::Resume("web".into()),
            Request::Abort("menu".into()),
        ];
        for r in &sent {
            db.request(r).expect("request");
            assert_eq!(
                Request::new(r.action(), r.deployment().map(str::to_owned)).as_ref(),
                Some(r)
            );
        }
        assert_eq!(db.take_requests().expect("take"), sent);
        assert!(db.take_requests().expect("take").is_empty(), "taken once");
        assert_eq!(Request::new("pause", None), None);
        assert_eq!(Request::new("reboot", Some("web".into())), None);
    }
}
