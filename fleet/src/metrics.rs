//! The fleet service's Prometheus series (`roost fleet --metrics-listen`): stores by phase,
//! presence, stale and drifted stores, events recorded and gaps, and each plan's wave
//! progress, all read from the fleet database right before a scrape (nothing is counted
//! twice, and `roost status` reads the same rows).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use roost_runtime::metrics::Refresh;
use tracing::warn;

use crate::db::{DbError, FleetDb};
use crate::gitops::plan::{PlanStatus, StoreOutcome};
use crate::view::{self, FleetView, Summary};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    deployment: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitingLabels {
    deployment: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlanStatusLabels {
    deployment: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaveLabels {
    deployment: String,
    outcome: &'static str,
}

/// A plan's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanProgress {
    /// Current wave (0-based).
    pub wave: usize,
    /// Number of waves.
    pub waves: usize,
    /// `running`, `paused`, `aborted` or `done`.
    pub status: &'static str,
    /// Stores of the current wave per outcome (`converged`, `failed`, `pending`, `deferred`,
    /// `waiting`).
    pub current: BTreeMap<&'static str, usize>,
}

/// What the gauges show, computed from the database in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The fleet view's summary (the same counts `roost status` and the dashboard show).
    pub summary: Summary,
    /// Deployment → stores reporting drift on it.
    pub drifted: BTreeMap<String, usize>,
    /// Distinct events recorded.
    pub events: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
    /// Missing roostseq ranges.
    pub gaps: usize,
    /// Events missing in those ranges.
    pub missing: u64,
    /// Deployment → its plan's progress.
    pub plans: BTreeMap<String, PlanProgress>,
    /// (deployment, reason) → fresh stores `Waiting` on it (`window`, `dependency`).
    pub waiting: BTreeMap<(String, String), usize>,
    /// Deployment → fresh stores `RolledBack` on it.
    pub rolled_back: BTreeMap<String, usize>,
    /// The last audit of the cloud broker's retained desired state.
    pub audit: Option<crate::db::audit::AuditRecord>,
    /// The notification messages by state ([`crate::notify`]).
    pub notifications: crate::db::notify::DeliveryCounts,
}

/// The view's figures: its summary, and drift per deployment from its rows.
pub fn from_view(view: &FleetView) -> Snapshot {
    let mut drifted: BTreeMap<String, usize> = BTreeMap::new();
    let mut waiting: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut rolled_back: BTreeMap<String, usize> = BTreeMap::new();
    for row in &view.stores {
        for c in row.deployments.iter().filter(|c| c.drift) {
            *drifted.entry(c.deployment.clone()).or_default() += 1;
        }
        for c in &row.deployments {
            match c.shown.as_str() {
                "Waiting" => {
                    let reason = c.reason.clone().unwrap_or_else(|| "window".into());
                    *waiting.entry((c.deployment.clone(), reason)).or_default() += 1;
                }
                "RolledBack" => *rolled_back.entry(c.deployment.clone()).or_default() += 1,
                _ => {}
            }
        }
    }
    Snapshot {
        summary: view.summary.clone(),
        drifted,
        waiting,
        rolled_back,
        audit: view.broker_audit.clone(),
        ..Snapshot::default()
    }
}

fn plan_progress(p: &crate::gitops::plan::Plan) -> PlanProgress {
    let mut current = BTreeMap::new();
    for store in p.wave_stores.get(p.wave).into_iter().flatten() {
        let k = p
            .outcomes
            .get(store)
            .copied()
            .unwrap_or(StoreOutcome::Pending)
            .as_str();
        *current.entry(k).or_default() += 1;
    }
    PlanProgress {
        wave: p.wave,
        waves: p.waves.len(),
        status: match p.status {
            PlanStatus::Running => "running",
            PlanStatus::Paused => "paused",
            PlanStatus::Aborted(_) => "aborted",
            PlanStatus::Done => "done",
        },
        current,
    }
}

/// Reads everything the gauges show.
pub fn snapshot(db: &FleetDb) -> Result<Snapshot, DbError> {
    let inputs = view::load(db)?;
    let gaps = inputs.gaps.clone();
    let mut s = from_view(&view::build(&inputs, crate::db::now_ms()));
    let counts = db.counts()?;
    s.events = counts.events;
    s.duplicates = counts.duplicates;
    s.gaps = gaps.len();
    s.missing = gaps.iter().map(|g| g.to - g.from + 1).sum();
    s.plans = db
        .with_conn(crate::db::gitops::plans)?
        .iter()
        .map(|(d, p)| (d.clone(), plan_progress(p)))
        .collect();
    s.notifications = db.with_conn(crate::db::notify::delivery_counts)?;
    Ok(s)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The fleet service's metrics.
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    total: Gauge,
    stores: Family<PhaseLabels, Gauge>,
    drifted: Family<DeploymentLabels, Gauge>,
    presence: Family<StateLabels, Gauge>,
    stale: Gauge,
    drifted_stores: Gauge,
    with_gaps: Gauge,
    events: Counter,
    events_seen: Arc<AtomicU64>,
    duplicates: Counter,
    duplicates_seen: Arc<AtomicU64>,
    gaps: Gauge,
    missing: Gauge,
    plan_wave: Family<DeploymentLabels, Gauge>,
    plan_waves: Family<DeploymentLabels, Gauge>,
    plan_status: Family<PlanStatusLabels, Gauge>,
    wave_stores: Family<WaveLabels, Gauge>,
    waiting: Family<WaitingLabels, Gauge>,
    rolled_back: Family<DeploymentLabels, Gauge>,
    audits: Gauge,
    audit_last: Gauge,
    audit_repaired_last: Gauge,
    audit_repaired: Gauge,
    notify_sent: Counter,
    notify_sent_seen: Arc<AtomicU64>,
    notify_failed: Counter,
    notify_failed_seen: Arc<AtomicU64>,
    notify_queued: Gauge,
    notify_given_up: Gauge,
}

/// Moves a counter up to a durable total.
fn follow(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.swap(total, Ordering::Relaxed);
    if total > before {
        counter.inc_by(total - before);
    }
}

impl FleetMetrics {
    /// Registers every series.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "roost_fleet_stores",
            "Stores known (a status or presence document)",
            self.total.clone(),
        );
        r.register(
            "roost_fleet_stores_by_phase",
            "Stores per deployment and shown phase (Stale for a stale store, never Converged)",
            self.stores.clone(),
        );
        r.register(
            "roost_fleet_stores_drifted",
            "Stores reporting drift, per deployment",
            self.drifted.clone(),
        );
        r.register(
            "roost_fleet_stores_presence",
            "Stores by presence: online (or no presence and not silent), offline",
            self.presence.clone(),
        );
        r.register(
            "roost_fleet_stores_stale",
            "Stale stores: offline, silent past their heartbeat, or desired state not confirmed fresh",
            self.stale.clone(),
        );
        r.register(
            "roost_fleet_stores_drifted_any",
            "Stores with at least one drifted deployment",
            self.drifted_stores.clone(),
        );
        r.register(
            "roost_fleet_stores_with_gaps",
            "Stores with gaps in their event sequence",
            self.with_gaps.clone(),
        );
        r.register(
            "roost_fleet_events_recorded",
            "Distinct events recorded in the fleet database",
            self.events.clone(),
        );
        r.register(
            "roost_fleet_event_duplicates",
            "Duplicate event deliveries dropped",
            self.duplicates.clone(),
        );
        r.register(
            "roost_fleet_event_gaps",
            "Missing roostseq ranges over all stores",
            self.gaps.clone(),
        );
        r.register(
            "roost_fleet_events_missing",
            "Events missing in those ranges",
            self.missing.clone(),
        );
        r.register(
            "roost_fleet_plan_wave",
            "Current wave of each deployment's plan (0-based)",
            self.plan_wave.clone(),
        );
        r.register(
            "roost_fleet_plan_waves",
            "Number of waves of each deployment's plan",
            self.plan_waves.clone(),
        );
        r.register(
            "roost_fleet_plan_status",
            "1 for the status of each deployment's plan (running, paused, aborted, done)",
            self.plan_status.clone(),
        );
        r.register(
            "roost_fleet_wave_stores",
            "Stores of each plan's current wave by outcome (converged, failed, pending, deferred, waiting)",
            self.wave_stores.clone(),
        );
        r.register(
            "roost_fleet_stores_waiting",
            "Fresh stores Waiting to apply a deployment, by reason (window, dependency)",
            self.waiting.clone(),
        );
        r.register(
            "roost_fleet_stores_rolled_back",
            "Fresh stores that rolled a deployment back to their last good revision",
            self.rolled_back.clone(),
        );
        r.register(
            "roost_fleet_broker_audits",
            "Audits of the cloud broker's retained desired state finished (since the database was created)",
            self.audits.clone(),
        );
        r.register(
            "roost_fleet_broker_audit_last_timestamp_seconds",
            "When the last audit of the cloud broker's retained desired state finished (Unix time; 0: none yet)",
            self.audit_last.clone(),
        );
        r.register(
            "roost_fleet_broker_audit_repaired_last",
            "Deployment topics the last audit republished (missing on the broker, or older there)",
            self.audit_repaired_last.clone(),
        );
        r.register(
            "roost_fleet_broker_audit_repaired",
            "Deployment topics republished by every audit together",
            self.audit_repaired.clone(),
        );
        r.register(
            "roost_notifications_sent",
            "Notification messages delivered (the sink answered 2xx)",
            self.notify_sent.clone(),
        );
        r.register(
            "roost_notifications_failed",
            "Notification delivery attempts that failed (each retry counts)",
            self.notify_failed.clone(),
        );
        r.register(
            "roost_notifications_queued",
            "Notification messages waiting to be delivered (also those being retried)",
            self.notify_queued.clone(),
        );
        r.register(
            "roost_notifications_given_up",
            "Notification messages given up after their last attempt (kept 7 days)",
            self.notify_given_up.clone(),
        );
    }

    /// Shows `s`.
    pub fn set(&self, s: &Snapshot) {
        let sum = &s.summary;
        self.total.set(gauge(sum.stores));
        // Series of stores, deployments or plans that are gone must not linger.
        self.stores.clear();
        for (deployment, d) in &sum.deployments {
            for (phase, n) in &d.by_phase {
                self.stores
                    .get_or_create(&PhaseLabels {
                        deployment: deployment.clone(),
                        phase: phase.clone(),
                    })
                    .set(gauge(*n));
            }
        }
        self.waiting.clear();
        for ((deployment, reason), n) in &s.waiting {
            self.waiting
                .get_or_create(&WaitingLabels {
                    deployment: deployment.clone(),
                    reason: reason.clone(),
                })
                .set(gauge(*n));
        }
        self.rolled_back.clear();
        for (deployment, n) in &s.rolled_back {
            self.rolled_back
                .get_or_create(&DeploymentLabels {
                    deployment: deployment.clone(),
                })
                .set(gauge(*n));
        }
        self.drifted.clear();
        for (deployment, n) in &s.drifted {
            self.drifted
                .get_or_create(&DeploymentLabels {
                    deployment: deployment.clone(),
                })
                .set(gauge(*n));
        }
        for (state, n) in [("online", sum.online), ("offline", sum.offline)] {
            self.presence
                .get_or_create(&StateLabels { state })
                .set(gauge(n));
        }
        self.stale.set(gauge(sum.stale));
        self.drifted_stores.set(gauge(sum.drifted));
        self.with_gaps.set(gauge(sum.with_gaps));
        follow(&self.events, &self.events_seen, s.events);
        follow(&self.duplicates, &self.duplicates_seen, s.duplicates);
        self.gaps.set(gauge(s.gaps));
        let a = s.audit.clone().unwrap_or_default();
        self.audits.set(i64::try_from(a.audits).unwrap_or(i64::MAX));
        self.audit_last
            .set(roost_schemas::parse_rfc3339(&a.at).map_or(0, |t| t.unix_timestamp()));
        self.audit_repaired_last.set(gauge(a.repaired.len()));
        self.audit_repaired
            .set(i64::try_from(a.repaired_total).unwrap_or(i64::MAX));
        self.missing
            .set(i64::try_from(s.missing).unwrap_or(i64::MAX));
        let n = &s.notifications;
        follow(&self.notify_sent, &self.notify_sent_seen, n.sent);
        follow(
            &self.notify_failed,
            &self.notify_failed_seen,
            n.failed_attempts,
        );
        self.notify_queued
            .set(i64::try_from(n.queued).unwrap_or(i64::MAX));
        self.notify_given_up
            .set(i64::try_from(n.failed).unwrap_or(i64::MAX));
        self.plan_wave.clear();
        self.plan_waves.clear();
        self.plan_status.clear();
        self.wave_stores.clear();
        for (deployment, p) in &s.plans {
            let d = DeploymentLabels {
                deployment: deployment.clone(),
            };
            self.plan_wave.get_or_create(&d).set(gauge(p.wave));
            self.plan_waves.get_or_create(&d).set(gauge(p.waves));
            self.plan_status
                .get_or_create(&PlanStatusLabels {
                    deployment: deployment.clone(),
                    status: p.status,
                })
                .set(1);
            for outcome in StoreOutcome::ALL.map(StoreOutcome::as_str) {
                self.wave_stores
                    .get_or_create(&WaveLabels {
                        deployment: deployment.clone(),
                        outcome,
                    })
                    .set(gauge(p.current.get(outcome).copied().unwrap_or(0)));
            }
        }
    }

    /// A refresh hook reading `db` (on a blocking thread: it is SQLite).
    pub fn refresh_hook(&self, db: FleetDb) -> Refresh {
        let me = self.clone();
        Arc::new(move || {
            let (me, db) = (me.clone(), db.clone());
            Box::pin(async move {
                match tokio::task::spawn_blocking(move || snapshot(&db)).await {
                    Ok(Ok(s)) => me.set(&s),
                    Ok(Err(error)) => {
                        warn!(error = %roost_runtime::error_chain(&error), "cannot read the fleet database for metrics")
                    }
                    Err(error) => warn!(%error, "fleet metrics job failed"),
                }
            })
        })
    }

    /// The exporter for `db`.
    pub fn exporter(db: FleetDb) -> roost_runtime::Exporter {
        let me = FleetMetrics::default();
        let mut r = Registry::default();
        me.register(&mut r);
        roost_runtime::Exporter::new(r).with_refresh(me.refresh_hook(db))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(store: &str, phase: &str, drift: bool) -> view::Doc {
        view::Doc {
            store: store.into(),
            json: serde_json::json!({
                "store": store, "agent_version": "0", "updated_at": roost_schemas::now_rfc3339(),
                "roostseq": 1, "outbox_backlog": 0,
                "deployments": {"web": {"phase": phase, "drift": drift, "message": ""}}
            })
            .to_string(),
            received_at: Some(roost_schemas::now_rfc3339()),
        }
    }

    fn presence(store: &str, state: &str) -> view::Doc {
        view::Doc {
            store: store.into(),
            json: serde_json::json!({"state": state, "since": roost_schemas::now_rfc3339()})
                .to_string(),
            received_at: Some(roost_schemas::now_rfc3339()),
        }
    }

    /// The gauges show the view's summary: an offline store is stale and not Converged.
    #[tokio::test]
    async fn gauges_show_the_fleet_view() {
        let inputs = view::Inputs {
            status: vec![
                status("s1", "Converged", false),
                status("s2", "Converged", true),
                status("s3", "Failed", false),
            ],
            presence: vec![
                presence("s1", "online"),
                presence("s2", "offline"),
                presence("s3", "online"),
            ],
            ..Default::default()
        };
        let mut inputs = inputs;
        inputs.audit = Some(crate::db::audit::AuditRecord {
            at: "2026-12-06T05:00:00Z".into(),
            trigger: "interval".into(),
            held: 4,
            repaired: vec!["roost/v1/fleet/deployments/web".into()],
            audits: 7,
            repaired_total: 3,
        });
        let mut snap = from_view(&view::build(&inputs, crate::db::now_ms()));
        snap.notifications = crate::db::notify::DeliveryCounts {
            queued: 2,
            retrying: 1,
            sent: 5,
            failed: 1,
            failed_attempts: 4,
        };
        let m = FleetMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.set(&snap);
        let text = roost_runtime::Exporter::new(r).render().await;
        for want in [
            "roost_fleet_stores 3",
            "roost_fleet_stores_by_phase{deployment=\"web\",phase=\"Converged\"} 1",
            "roost_fleet_stores_by_phase{deployment=\"web\",phase=\"Failed\"} 1",
            "roost_fleet_stores_by_phase{deployment=\"web\",phase=\"Stale\"} 1",
            "roost_fleet_stores_presence{state=\"offline\"} 1",
            "roost_fleet_stores_presence{state=\"online\"} 2",
            "roost_fleet_stores_stale 1",
            "roost_fleet_stores_drifted{deployment=\"web\"} 1",
            "roost_fleet_broker_audits 7",
            "roost_fleet_broker_audit_last_timestamp_seconds 1796533200",
            "roost_fleet_broker_audit_repaired_last 1",
            "roost_fleet_broker_audit_repaired 3",
            "roost_notifications_sent_total 5",
            "roost_notifications_failed_total 4",
            "roost_notifications_queued 2",
            "roost_notifications_given_up 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
