//! Where the API's snapshot comes from: the fleet database (status, presence, events' gaps,
//! plans). The one place that turns the fleet record into [`Snapshot`] rows, so the API does
//! not care how the view is computed.

use std::collections::BTreeMap;

use roost_schemas::{Presence, PresenceState, StatusDoc};
use rusqlite::Connection;

use super::model::{self, GapRange, Row, Snapshot, StoreInfo};
use crate::fleet::{FleetDb, FleetError};

/// How long a store may be silent before it counts as stale: its presence is the broker's
/// word (the bridge's last will), so an `online` presence is fresh; a store without any
/// presence document is judged by its last status document.
pub const SILENT_STALE_S: u64 = 300;

/// Takes a snapshot of the fleet (blocking: call it on a blocking thread).
pub fn snapshot(db: &FleetDb) -> Result<Snapshot, FleetError> {
    let now = time::OffsetDateTime::now_utc();
    db.with_conn(|c| {
        let plans = plans(c)?;
        let mut snap = fleet(c, now)?;
        snap.plans = plans;
        Ok(snap)
    })
}

fn plans(c: &Connection) -> Result<BTreeMap<String, model::PlanDoc>, FleetError> {
    // A database without the controller's tables has no plans.
    let exists: bool = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'gitops_plans'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)?;
    if !exists {
        return Ok(BTreeMap::new());
    }
    Ok(crate::gitops::store::plans(c)?
        .iter()
        .map(|(d, p)| (d.clone(), model::plan_doc(p)))
        .collect())
}

fn fleet(c: &Connection, now: time::OffsetDateTime) -> Result<Snapshot, FleetError> {
    let age = |t: &str| -> Option<u64> {
        roost_schemas::parse_rfc3339(t).map(|t| (now - t).whole_seconds().max(0) as u64)
    };
    let mut presence: BTreeMap<String, (String, String)> = BTreeMap::new();
    {
        let mut stmt = c.prepare("SELECT store, json, received_at FROM presence")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let (s, json, at) = row?;
            let state = match serde_json::from_str::<Presence>(&json) {
                Ok(p) if p.state == PresenceState::Online => "online",
                Ok(_) => "offline",
                Err(_) => "unknown",
            };
            presence.insert(s, (state.to_owned(), at));
        }
    }
    let mut gaps: BTreeMap<String, Vec<GapRange>> = BTreeMap::new();
    for g in crate::fleet::gaps_in(c)? {
        gaps.entry(g.store).or_default().push(GapRange {
            from: g.from,
            to: g.to,
        });
    }
    let mut snap = Snapshot {
        taken_at: roost_schemas::format_rfc3339(now),
        ..Snapshot::default()
    };
    let mut stmt = c.prepare("SELECT store, json, received_at FROM status ORDER BY store")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    for row in rows {
        let (store, json, received) = row?;
        let Ok(doc) = serde_json::from_str::<StatusDoc>(&json) else {
            continue;
        };
        let (pres, pres_at) = presence
            .get(&store)
            .cloned()
            .unwrap_or_else(|| ("unknown".into(), String::new()));
        let last_heard = [received.as_str(), pres_at.as_str()]
            .into_iter()
            .filter(|t| !t.is_empty())
            .max()
            .map(str::to_owned);
        let silent = last_heard.as_deref().and_then(age);
        let stale_reason = match pres.as_str() {
            "offline" => Some(format!("offline since {pres_at}")),
            "online" => None,
            _ if silent.is_none_or(|s| s > SILENT_STALE_S) => Some(format!(
                "no presence and silent for over {SILENT_STALE_S} s"
            )),
            _ => None,
        };
        let store_gaps = gaps.remove(&store).unwrap_or_default();
        let missing: u64 = store_gaps.iter().map(|g| g.to - g.from + 1).sum();
        for (dep, st) in &doc.deployments {
            let applied = st.applied_revision.as_deref().map(model::revision);
            let marker = match (&st.desired, &st.applied_revision) {
                (Some(d), Some(a)) if d.revision == *a => "=",
                (Some(_), _) => ">",
                _ => "?",
            };
            let stale = stale_reason.is_some();
            snap.rows.push(Row {
                store: store.clone(),
                deployment: dep.clone(),
                groups: doc.groups.clone(),
                desired: st.desired.as_ref().map(|d| model::Desired {
                    revision: model::revision(&d.revision),
                    sequence: d.sequence,
                    scope: d.scope.clone(),
                    origin: d.origin.as_ref().map(|o| model::Origin {
                        repo: o.repo.clone(),
                        commit: o.commit.clone(),
                        short: o.commit[..o.commit.len().min(12)].to_owned(),
                    }),
                }),
                applied,
                marker: marker.into(),
                phase: st.phase.as_str().into(),
                shown: if stale {
                    "Stale".into()
                } else {
                    st.phase.as_str().into()
                },
                drift: st.drift,
                presence: pres.clone(),
                last_heard: last_heard.clone(),
                last_heard_age_s: silent,
                stale,
                stale_reason: stale_reason.clone(),
                gaps: missing,
                message: st.message.clone(),
                reason: st.reason.clone(),
            });
        }
        snap.stores.insert(
            store.clone(),
            StoreInfo {
                store: store.clone(),
                groups: doc.groups.clone(),
                presence: pres,
                last_heard,
                agent_version: Some(doc.agent_version.clone()),
                roostseq: doc.roostseq,
                gaps: store_gaps,
                stale: stale_reason.is_some(),
            },
        );
    }
    snap.rows
        .sort_by(|a, b| (&a.deployment, &a.store).cmp(&(&b.deployment, &b.store)));
    Ok(snap)
}
