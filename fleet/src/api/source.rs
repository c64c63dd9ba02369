//! Where the API's snapshot comes from: the fleet view ([`crate::view`], the one stale rule
//! every fleet view uses) over the fleet database, flattened into store × deployment rows for
//! server-side filtering and paging, plus the controller's plans.

use std::collections::BTreeMap;

use super::model::{self, GapRange, Row, Snapshot, StoreInfo};
use crate::db::{DbError, FleetDb};
use crate::view;

/// Takes a snapshot of the fleet (blocking: call it on a blocking thread).
pub fn snapshot(db: &FleetDb) -> Result<Snapshot, DbError> {
    let inputs = view::load(db)?;
    let plans = db.with_conn(plans)?;
    Ok(from_view(&view::build(&inputs, crate::db::now_ms()), plans))
}

fn plans(c: &crate::db::Conn<'_>) -> Result<BTreeMap<String, model::PlanDoc>, DbError> {
    Ok(crate::db::gitops::plans(c)?
        .iter()
        .map(|(d, p)| (d.clone(), model::plan_doc(p)))
        .collect())
}

fn revision(r: &view::Revision) -> model::Revision {
    model::Revision {
        revision: r.revision.clone(),
        short: r.short.clone(),
        subject: r.subject.clone(),
        committed_at: r.committed_at.clone(),
        age_s: r.age_s,
    }
}

/// The view as the API serves it. Pure.
pub fn from_view(v: &view::FleetView, plans: BTreeMap<String, model::PlanDoc>) -> Snapshot {
    let mut snap = Snapshot {
        taken_at: v.generated_at.clone(),
        plans,
        summary: model::Summary {
            stores: v.summary.stores,
            deployments: v.summary.deployments.len(),
            rows: v.stores.iter().map(|s| s.deployments.len()).sum(),
            by_phase: v.summary.by_phase.clone(),
            online: v.summary.online,
            offline: v.summary.offline,
            stale: v.summary.stale,
            drifted: v.summary.drifted,
            with_gaps: v.summary.with_gaps,
        },
        broker_audit: v.broker_audit.clone(),
        notifications: v.notifications.clone(),
        ..Snapshot::default()
    };
    for s in &v.stores {
        let stale_reason = s.stale.as_ref().map(view::Staleness::text);
        let missing: u64 = s.gaps.iter().map(|[a, b]| b - a + 1).sum();
        for c in &s.deployments {
            snap.rows.push(Row {
                store: s.store.clone(),
                deployment: c.deployment.clone(),
                groups: s.groups.clone(),
                labels: s.labels.clone(),
                desired: c.desired.as_ref().map(|d| model::Desired {
                    revision: revision(&d.commit),
                    sequence: d.sequence,
                    scope: d.scope.clone(),
                    origin: d.origin.as_ref().map(|o| model::Origin {
                        repo: o.repo.clone(),
                        commit: o.commit.clone(),
                        short: o.commit.chars().take(12).collect(),
                    }),
                }),
                applied: c.applied.as_ref().map(revision),
                marker: match c.marker {
                    view::Marker::None => "?".into(),
                    m => m.as_str().into(),
                },
                phase: c.phase.clone(),
                shown: c.shown.clone(),
                drift: c.drift,
                presence: s.presence.state.clone(),
                last_heard: s.last_heard.clone(),
                last_heard_age_s: s.last_heard_age_s,
                stale: s.stale.is_some(),
                stale_reason: stale_reason.clone(),
                gaps: missing,
                message: c.message.clone(),
                next_window: c.next_window.clone(),
                waiting_for: c.waiting_for.clone(),
                failed_revision: c.failed_revision.clone(),
                note: crate::view::cell_note(c),
                reason: c.reason.clone(),
            });
        }
        snap.stores.insert(
            s.store.clone(),
            StoreInfo {
                store: s.store.clone(),
                groups: s.groups.clone(),
                labels: s.labels.clone(),
                presence: s.presence.state.clone(),
                last_heard: s.last_heard.clone(),
                agent_version: s.agent_version.clone(),
                outbox_backlog: s.outbox_backlog,
                gaps: s
                    .gaps
                    .iter()
                    .map(|[from, to]| GapRange {
                        from: *from,
                        to: *to,
                    })
                    .collect(),
                stale: s.stale.is_some(),
                stale_reason,
            },
        );
    }
    snap.rows
        .sort_by(|a, b| (&a.deployment, &a.store).cmp(&(&b.deployment, &b.store)));
    snap
}
