//! The HTTP API's documents (what `schemas/openapi.yaml` describes) and the snapshot they are
//! served from: the source-vs-target rows, the fleet summary, filters and paging, plans with
//! their waves. Pure: built from the fleet view and the plans, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gitops::plan::{Plan, PlanStatus, StoreOutcome};

/// A full revision with its short form and, where known, the commit's subject and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revision {
    /// 40 hex.
    pub revision: String,
    /// First 12 characters.
    pub short: String,
    /// The commit's subject line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The commit's time (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed_at: Option<String>,
    /// Seconds since the commit (at the snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_s: Option<u64>,
}

/// The fleet-repository commit a desired state came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Fleet repository.
    pub repo: String,
    /// Commit (40 hex).
    pub commit: String,
    /// First 12 characters.
    pub short: String,
}

/// What a store is told to run for one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// The revision.
    #[serde(flatten)]
    pub revision: Revision,
    /// The rollout's sequence.
    pub sequence: u64,
    /// The winning scope (`fleet`, `group:G`, `store:S`).
    pub scope: String,
    /// The fleet-repository commit it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// One row of the source-vs-target table: one store × one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Store.
    pub store: String,
    /// Deployment.
    pub deployment: String,
    /// The store's groups, in precedence order.
    pub groups: Vec<String>,
    /// The store's labels from the fleet repository's inventory.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: roost_schemas::Labels,
    /// Desired (source) revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<Desired>,
    /// Applied (target) revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<Revision>,
    /// `=` (applied is desired), `>` (desired is ahead of applied), `?` (unknown).
    pub marker: String,
    /// The phase the store reported.
    pub phase: String,
    /// What the table shows: the phase, or `Stale` (a stale store is never shown `Converged`).
    pub shown: String,
    /// Live state differs from what was applied.
    pub drift: bool,
    /// `online`, `offline` or `unknown`.
    pub presence: String,
    /// When the store was last heard from (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard: Option<String>,
    /// Seconds since then (at the snapshot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard_age_s: Option<u64>,
    /// The store's last word is too old, or its desired state is not confirmed fresh.
    pub stale: bool,
    /// Why it is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
    /// Events missing from the store's `roostseq` (count).
    pub gaps: u64,
    /// The store's message (problems).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The problem's reason code (while `Waiting`: `window` or `dependency`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While `Waiting` for a window: when it opens (RFC 3339, the store's offset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_window: Option<String>,
    /// While `Waiting` for dependencies: those not converged on the store yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// While `RolledBack`: the revision that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
    /// Why it waits or what it rolled back, for humans (`window: waits until …`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    /// The row's identity.
    pub fn key(&self) -> (String, String) {
        (self.store.clone(), self.deployment.clone())
    }

    /// Whether two rows differ in anything but their ages (which move every second): what
    /// the live stream reports as a change.
    pub fn changed_from(&self, other: &Row) -> bool {
        let mut a = self.clone();
        a.last_heard_age_s = other.last_heard_age_s;
        if let (Some(d), Some(o)) = (&mut a.desired, &other.desired) {
            d.revision.age_s = o.revision.age_s;
        }
        if let (Some(x), Some(o)) = (&mut a.applied, &other.applied) {
            x.age_s = o.age_s;
        }
        a != *other
    }
}

/// Stores by phase, offline, stale, drifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Summary {
    /// Stores known.
    pub stores: usize,
    /// Deployments known.
    pub deployments: usize,
    /// Rows (store × deployment).
    pub rows: usize,
    /// Rows by what the table shows (`Stale` counts a stale row, never its phase).
    pub by_phase: BTreeMap<String, usize>,
    /// Stores online.
    pub online: usize,
    /// Stores offline.
    pub offline: usize,
    /// Stores with at least one stale row.
    pub stale: usize,
    /// Stores with drift.
    pub drifted: usize,
    /// Stores with gaps in their `roostseq`.
    pub with_gaps: usize,
}

/// One store's presence in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreInfo {
    /// Store.
    pub store: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Labels from the fleet repository's inventory.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: roost_schemas::Labels,
    /// `online`, `offline` or `unknown`.
    pub presence: String,
    /// Last heard (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heard: Option<String>,
    /// Agent version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Events waiting in the agent's outbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_backlog: Option<u64>,
    /// Missing `roostseq` ranges.
    pub gaps: Vec<GapRange>,
    /// Stale.
    pub stale: bool,
    /// Why it is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}

/// A missing `roostseq` range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapRange {
    /// First missing.
    pub from: u64,
    /// Last missing.
    pub to: u64,
}

/// The whole fleet at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Rows sorted by (deployment, store).
    pub rows: Vec<Row>,
    /// Stores by name.
    pub stores: BTreeMap<String, StoreInfo>,
    /// Plans by deployment.
    pub plans: BTreeMap<String, PlanDoc>,
    /// The fleet's counts (the view's, by its stale rule).
    pub summary: Summary,
    /// The last audit of the cloud broker's retained desired state.
    pub broker_audit: Option<crate::db::audit::AuditRecord>,
    /// Notification deliveries (counts, the newest failing).
    pub notifications: Option<crate::db::notify::Notifications>,
    /// When it was taken (RFC 3339).
    pub taken_at: String,
}

/// Filters of the rows (all optional; all given must hold).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RowFilter {
    /// Only this deployment.
    pub deployment: Option<String>,
    /// Only stores in this group.
    pub group: Option<String>,
    /// Only stores whose inventory labels match this selector (kubectl's `-l` form:
    /// `region=us-south,format in (drive-thru)`); a bad one is a 400.
    #[serde(default, deserialize_with = "selector")]
    pub selector: Option<roost_schemas::Selector>,
    /// Only rows showing this phase (`Stale` included), case-insensitive.
    pub phase: Option<String>,
    /// Only stale (true) or fresh (false) rows.
    pub stale: Option<bool>,
    /// Only drifted rows.
    pub drift: Option<bool>,
    /// Store names containing this text.
    pub q: Option<String>,
    /// Page (from 1).
    pub page: Option<usize>,
    /// Rows per page (1..=500, default 50).
    pub per_page: Option<usize>,
}

fn selector<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<roost_schemas::Selector>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e| serde::de::Error::custom(format!("selector {s:?}: {e}")))
        })
        .transpose()
}

/// Largest page.
pub const MAX_PER_PAGE: usize = 500;

impl RowFilter {
    /// Whether `r` passes.
    pub fn matches(&self, r: &Row) -> bool {
        self.deployment.as_ref().is_none_or(|d| *d == r.deployment)
            && self.group.as_ref().is_none_or(|g| r.groups.contains(g))
            && self.selector.as_ref().is_none_or(|s| s.matches(&r.labels))
            && self
                .phase
                .as_ref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&r.shown))
            && self.stale.is_none_or(|s| s == r.stale)
            && self.drift.is_none_or(|d| d == r.drift)
            && self.q.as_ref().is_none_or(|q| r.store.contains(q.as_str()))
    }

    /// The page (clamped).
    pub fn page(&self) -> (usize, usize) {
        (
            self.page.unwrap_or(1).max(1),
            self.per_page.unwrap_or(50).clamp(1, MAX_PER_PAGE),
        )
    }
}

/// One page of rows.
#[derive(Debug, Clone, Serialize)]
pub struct RowsPage {
    /// Rows matching the filter.
    pub total: usize,
    /// Page (from 1).
    pub page: usize,
    /// Rows per page.
    pub per_page: usize,
    /// Pages.
    pub pages: usize,
    /// This page's rows.
    pub rows: Vec<Row>,
    /// Snapshot time.
    pub taken_at: String,
}

/// Filters and pages `rows`.
pub fn page_rows(rows: &[Row], f: &RowFilter, taken_at: &str) -> RowsPage {
    let (page, per_page) = f.page();
    let matching: Vec<&Row> = rows.iter().filter(|r| f.matches(r)).collect();
    let total = matching.len();
    let rows = matching
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .cloned()
        .collect();
    RowsPage {
        total,
        page,
        per_page,
        pages: total.div_ceil(per_page),
        rows,
        taken_at: taken_at.to_owned(),
    }
}

/// One wave of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaveDoc {
    /// Index (from 0).
    pub index: usize,
    /// Name.
    pub name: String,
    /// What it targets, e.g. `group canary`, `50 %`, `fleet`, `stores a, b`.
    pub target: String,
    /// `done`, `current` (published) or `waiting`.
    pub state: String,
    /// Stores it targets.
    pub stores: usize,
    /// Of them converged.
    pub converged: usize,
    /// Failed or degraded.
    pub failed: usize,
    /// Offline when judged.
    pub deferred: usize,
    /// Deferred by the store itself: waiting for its operating window or dependencies.
    pub waiting: usize,
    /// Not there yet.
    pub pending: usize,
    /// Share of online stores that must converge.
    pub converged_pct: u32,
    /// Soak after the share is met (s).
    pub soak_s: u64,
}

/// A deployment's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanDoc {
    /// Deployment.
    pub deployment: String,
    /// `running`, `paused`, `aborted` or `done`.
    pub status: String,
    /// Why it aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What it rolls out.
    pub revision: Revision,
    /// Source repository and path.
    pub source: String,
    /// What ran before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<Revision>,
    /// The fleet-repository commit that caused it.
    pub origin: String,
    /// Current wave (index).
    pub wave: usize,
    /// Waves.
    pub waves: Vec<WaveDoc>,
    /// What it waits for.
    pub waiting: String,
    /// Stores waiting to apply the release, with why and until when (`window until …`,
    /// `dependency on …`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub waits: BTreeMap<String, String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Pause, resume and abort apply (running or paused).
    pub actionable: bool,
}

/// A revision without its commit's details.
pub fn revision(full: &str) -> Revision {
    Revision {
        revision: full.to_owned(),
        short: full[..full.len().min(12)].to_owned(),
        subject: None,
        committed_at: None,
        age_s: None,
    }
}

fn ms_rfc3339(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map(roost_schemas::format_rfc3339)
        .unwrap_or_default()
}

/// A plan as the API shows it.
pub fn plan_doc(p: &Plan) -> PlanDoc {
    let (status, reason) = match &p.status {
        PlanStatus::Running => ("running", None),
        PlanStatus::Paused => ("paused", None),
        PlanStatus::Aborted(r) => ("aborted", Some(r.clone())),
        PlanStatus::Done => ("done", None),
    };
    let waves = p
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let stores = p.wave_stores.get(i).cloned().unwrap_or_default();
            let count = |o: StoreOutcome| {
                stores
                    .iter()
                    .filter(|s| p.outcomes.get(*s).copied().unwrap_or(StoreOutcome::Pending) == o)
                    .count()
            };
            let state = if i < p.wave || p.status == PlanStatus::Done {
                "done"
            } else if i == p.wave && p.wave_published {
                "current"
            } else {
                "waiting"
            };
            let target = match w.target() {
                Some(roost_schemas::fleet::WaveTarget::Group(g)) => format!("group {g}"),
                Some(roost_schemas::fleet::WaveTarget::Percent(n)) => format!("{n} %"),
                Some(roost_schemas::fleet::WaveTarget::Stores(s)) => {
                    format!("stores {}", s.join(", "))
                }
                Some(roost_schemas::fleet::WaveTarget::Fleet) => "fleet".into(),
                Some(roost_schemas::fleet::WaveTarget::Selector(s)) => format!("selector {s}"),
                None => "?".into(),
            };
            WaveDoc {
                index: i,
                name: w.name.clone(),
                target,
                state: state.into(),
                stores: stores.len(),
                converged: count(StoreOutcome::Converged),
                failed: count(StoreOutcome::Failed),
                deferred: count(StoreOutcome::Deferred),
                waiting: count(StoreOutcome::Waiting),
                pending: count(StoreOutcome::Pending),
                converged_pct: w.converged_pct.unwrap_or(100),
                soak_s: w.soak_s.unwrap_or(0),
            }
        })
        .collect();
    PlanDoc {
        deployment: p.deployment.clone(),
        status: status.into(),
        reason,
        revision: revision(&p.release.revision),
        source: format!("{} {}", p.release.url, p.release.path),
        previous: p.previous.as_ref().map(|r| revision(&r.revision)),
        origin: p.origin.clone(),
        wave: p.wave,
        waves,
        waiting: p.waiting.clone(),
        waits: p.waits.clone(),
        created_at: ms_rfc3339(p.created_ms),
        actionable: matches!(p.status, PlanStatus::Running | PlanStatus::Paused),
    }
}

/// What changed between two snapshots' rows: rows new or changed (not only older), and the
/// keys of rows gone.
pub fn diff_rows(before: &[Row], after: &[Row]) -> (Vec<Row>, Vec<(String, String)>) {
    let old: BTreeMap<(String, String), &Row> = before.iter().map(|r| (r.key(), r)).collect();
    let new: BTreeMap<(String, String), &Row> = after.iter().map(|r| (r.key(), r)).collect();
    let changed = after
        .iter()
        .filter(|r| old.get(&r.key()).is_none_or(|o| r.changed_from(o)))
        .cloned()
        .collect();
    let gone = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (changed, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(store: &str, dep: &str, shown: &str, stale: bool) -> Row {
        Row {
            store: store.into(),
            deployment: dep.into(),
            groups: if store.ends_with('1') {
                vec!["canary".into()]
            } else {
                vec![]
            },
            labels: if store.ends_with('2') {
                [("region".to_owned(), "us-south".to_owned())].into()
            } else {
                Default::default()
            },
            desired: None,
            applied: None,
            marker: "?".into(),
            phase: "Converged".into(),
            shown: shown.into(),
            drift: false,
            presence: "online".into(),
            last_heard: None,
            last_heard_age_s: Some(1),
            stale,
            stale_reason: None,
            gaps: 0,
            message: String::new(),
            reason: None,
            next_window: None,
            waiting_for: Vec::new(),
            failed_revision: None,
            note: None,
        }
    }

    #[test]
    fn filters_and_pages() {
        let rows: Vec<Row> = (1..=120)
            .map(|i| {
                row(
                    &format!("s{i:03}"),
                    if i % 2 == 0 { "a" } else { "b" },
                    if i % 10 == 0 { "Stale" } else { "Converged" },
                    i % 10 == 0,
                )
            })
            .collect();
        let f = |q: &str| -> RowFilter {
            serde_json::from_value(serde_json::from_str(q).expect("json")).expect("filter")
        };
        let cases: &[(&str, usize, usize, usize)] = &[
            // (filter, total, rows on the page, pages)
            (r#"{}"#, 120, 50, 3),
            (r#"{"page": 3}"#, 120, 20, 3),
            (r#"{"page": 4}"#, 120, 0, 3),
            (r#"{"deployment": "a"}"#, 60, 50, 2),
            (r#"{"stale": true}"#, 12, 12, 1),
            (r#"{"phase": "stale"}"#, 12, 12, 1),
            (r#"{"phase": "Converged", "deployment": "b"}"#, 60, 50, 2),
            (r#"{"group": "canary"}"#, 12, 12, 1),
            (r#"{"selector": "region=us-south"}"#, 12, 12, 1),
            (r#"{"selector": "region notin (us-south)"}"#, 108, 50, 3),
            (r#"{"selector": ""}"#, 120, 50, 3),
            (r#"{"q": "s11", "per_page": 5}"#, 10, 5, 2),
            (r#"{"per_page": 100000}"#, 120, 120, 1),
            (r#"{"per_page": 0, "page": 0}"#, 120, 1, 120),
        ];
        for (q, total, n, pages) in cases {
            let p = page_rows(&rows, &f(q), "t");
            assert_eq!(
                (p.total, p.rows.len(), p.pages),
                (*total, *n, *pages),
                "{q}"
            );
        }
        let bad = serde_json::from_value::<RowFilter>(serde_json::json!({"selector": "a b c"}))
            .expect_err("a bad selector is refused");
        assert!(bad.to_string().contains("selector"), "{bad}");
    }

    #[test]
    fn a_diff_ignores_ages_and_sees_changes_and_removals() {
        let a = vec![
            row("s1", "d", "Converged", false),
            row("s2", "d", "Converged", false),
        ];
        let mut b = a.clone();
        b[0].last_heard_age_s = Some(99);
        b.pop();
        b.push(row("s3", "d", "Pending", false));
        let (changed, gone) = diff_rows(&a, &b);
        assert_eq!(
            changed.iter().map(|r| r.store.as_str()).collect::<Vec<_>>(),
            ["s3"]
        );
        assert_eq!(gone, vec![("s2".to_string(), "d".to_string())]);
        let mut c = b.clone();
        c[0].stale = true;
        c[0].shown = "Stale".into();
        assert_eq!(diff_rows(&b, &c).0.len(), 1, "a store that went stale");
    }
}
