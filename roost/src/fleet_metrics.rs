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
use roost_schemas::{Presence, PresenceState, StatusDoc, Topics};
use tracing::warn;

use crate::fleet::{FleetDb, FleetError};
use crate::gitops::plan::{PlanStatus, StoreOutcome};

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
    /// Stores of the current wave per outcome (`converged`, `failed`, `pending`, `deferred`).
    pub current: BTreeMap<&'static str, usize>,
}

/// What the gauges show, computed from the database in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// (deployment, phase) → stores.
    pub by_phase: BTreeMap<(String, String), usize>,
    /// Deployment → stores reporting drift.
    pub drifted: BTreeMap<String, usize>,
    /// Stores per presence: online, offline, unknown (no presence document).
    pub presence: BTreeMap<&'static str, usize>,
    /// Stores whose last report cannot be trusted as current (offline: their status is
    /// their last word, not the present).
    pub stale: usize,
    /// Distinct events recorded.
    pub events: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
    /// Missing roostseq ranges, and the events in them.
    pub gaps: usize,
    /// Events missing in the gaps.
    pub missing: u64,
    /// Deployment → its plan's progress.
    pub plans: BTreeMap<String, PlanProgress>,
}

/// Counts stores by phase, presence and drift from their retained documents (topic, JSON).
pub fn summarize(topics: &Topics, msgs: &[(String, Vec<u8>)]) -> Snapshot {
    let mut presence: BTreeMap<String, PresenceState> = BTreeMap::new();
    let mut docs: BTreeMap<String, StatusDoc> = BTreeMap::new();
    for (topic, payload) in msgs {
        let Some((store, kind)) = topics.parse_store_topic(topic) else {
            continue;
        };
        match kind {
            roost_schemas::topics::StoreTopicKind::Presence => {
                if let Ok(p) = serde_json::from_slice::<Presence>(payload) {
                    presence.insert(store, p.state);
                }
            }
            roost_schemas::topics::StoreTopicKind::Status => {
                if let Ok(d) = serde_json::from_slice::<StatusDoc>(payload) {
                    docs.insert(store, d);
                }
            }
            _ => {}
        }
    }
    let mut s = Snapshot::default();
    let mut stores: std::collections::BTreeSet<&String> = docs.keys().collect();
    stores.extend(presence.keys());
    for store in stores {
        let state = match presence.get(store) {
            Some(PresenceState::Online) => "online",
            Some(PresenceState::Offline) => "offline",
            None => "unknown",
        };
        *s.presence.entry(state).or_default() += 1;
        if state == "offline" {
            s.stale += 1;
        }
        for (d, st) in docs
            .get(store)
            .map(|d| &d.deployments)
            .into_iter()
            .flatten()
        {
            *s.by_phase
                .entry((d.clone(), st.phase.as_str().to_owned()))
                .or_default() += 1;
            if st.drift {
                *s.drifted.entry(d.clone()).or_default() += 1;
            }
        }
    }
    s
}

fn plan_progress(p: &crate::gitops::plan::Plan) -> PlanProgress {
    let mut current = BTreeMap::new();
    for store in p.wave_stores.get(p.wave).into_iter().flatten() {
        let k = match p
            .outcomes
            .get(store)
            .copied()
            .unwrap_or(StoreOutcome::Pending)
        {
            StoreOutcome::Pending => "pending",
            StoreOutcome::Converged => "converged",
            StoreOutcome::Failed => "failed",
            StoreOutcome::Deferred => "deferred",
        };
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
pub fn snapshot(db: &FleetDb) -> Result<Snapshot, FleetError> {
    let topics = Topics::default();
    let mut s = summarize(&topics, &db.status_messages(&topics)?);
    let counts = db.counts()?;
    s.events = counts.events;
    s.duplicates = counts.duplicates;
    let gaps = db.gaps()?;
    s.gaps = gaps.len();
    s.missing = gaps.iter().map(|g| g.to - g.from + 1).sum();
    s.plans = db
        .with_conn(crate::gitops::store::plans)?
        .iter()
        .map(|(d, p)| (d.clone(), plan_progress(p)))
        .collect();
    Ok(s)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The fleet service's metrics.
#[derive(Clone, Debug, Default)]
pub struct FleetMetrics {
    stores: Family<PhaseLabels, Gauge>,
    drifted: Family<DeploymentLabels, Gauge>,
    presence: Family<StateLabels, Gauge>,
    stale: Gauge,
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
            "Stores per deployment and reported phase",
            self.stores.clone(),
        );
        r.register(
            "roost_fleet_stores_drifted",
            "Stores reporting drift, per deployment",
            self.drifted.clone(),
        );
        r.register(
            "roost_fleet_stores_presence",
            "Stores by presence: online, offline, unknown (no presence document)",
            self.presence.clone(),
        );
        r.register(
            "roost_fleet_stores_stale",
            "Stores whose last report is not current (offline): their phase is their last word",
            self.stale.clone(),
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
            "Stores of each plan's current wave by outcome (converged, failed, pending, deferred)",
            self.wave_stores.clone(),
        );
    }

    /// Shows `s`.
    pub fn set(&self, s: &Snapshot) {
        // Series of stores, deployments or plans that are gone must not linger.
        self.stores.clear();
        for ((deployment, phase), n) in &s.by_phase {
            self.stores
                .get_or_create(&PhaseLabels {
                    deployment: deployment.clone(),
                    phase: phase.clone(),
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
        for state in ["online", "offline", "unknown"] {
            self.presence
                .get_or_create(&StateLabels { state })
                .set(gauge(s.presence.get(state).copied().unwrap_or(0)));
        }
        self.stale.set(gauge(s.stale));
        follow(&self.events, &self.events_seen, s.events);
        follow(&self.duplicates, &self.duplicates_seen, s.duplicates);
        self.gaps.set(gauge(s.gaps));
        self.missing
            .set(i64::try_from(s.missing).unwrap_or(i64::MAX));
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
            for outcome in ["converged", "failed", "pending", "deferred"] {
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
    pub fn exporter(db: FleetDb) -> Result<roost_runtime::Exporter, FleetError> {
        // The plan tables exist also without the controller (then they are empty).
        crate::gitops::store::migrate(&db)?;
        let me = FleetMetrics::default();
        let mut r = Registry::default();
        me.register(&mut r);
        Ok(roost_runtime::Exporter::new(r).with_refresh(me.refresh_hook(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(store: &str, phase: &str, drift: bool) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "store": store, "agent_version": "0", "updated_at": "2026-12-01T00:00:00Z",
            "roostseq": 1, "outbox_backlog": 0,
            "deployments": {"web": {"phase": phase, "drift": drift, "message": ""}}
        }))
        .expect("json")
    }

    fn presence(state: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"state": state, "since": "2026-12-01T00:00:00Z"}))
            .expect("json")
    }

    #[test]
    fn summary_counts_phases_presence_drift_and_offline_as_stale() {
        let t = Topics::default();
        let msgs = vec![
            (t.status("s1"), status("s1", "Converged", false)),
            (t.presence("s1"), presence("online")),
            (t.status("s2"), status("s2", "Converged", true)),
            (t.presence("s2"), presence("offline")),
            (t.status("s3"), status("s3", "Failed", false)),
            (t.presence("s4"), presence("online")),
        ];
        let s = summarize(&t, &msgs);
        assert_eq!(s.by_phase[&("web".into(), "Converged".into())], 2);
        assert_eq!(s.by_phase[&("web".into(), "Failed".into())], 1);
        assert_eq!(s.drifted["web"], 1);
        assert_eq!(s.presence["online"], 2);
        assert_eq!(s.presence["offline"], 1);
        assert_eq!(s.presence["unknown"], 1);
        assert_eq!(s.stale, 1);
    }
}
