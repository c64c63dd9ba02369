//! The agent's Prometheus series: reconcile stages and their durations, drift, rejected
//! rollouts, git fetches; plus the shared MQTT link and outbox series. One [`AgentMetrics`]
//! per agent, passed to the code that counts (cloning it clones a few `Arc`s).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use roost_runtime::{LinkMetrics, OutboxMetrics};
use roost_schemas::EventData;

/// A reconcile stage, as the `stage` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Fetch the revision.
    Fetch,
    /// Render and build the plan.
    Build,
    /// Apply (including prune).
    Apply,
    /// Prune what the revision no longer holds.
    Prune,
    /// Wait for health.
    Health,
    /// One drift check.
    Drift,
    /// Remove the deployment.
    Remove,
}

impl Stage {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Build => "build",
            Stage::Apply => "apply",
            Stage::Prune => "prune",
            Stage::Health => "health",
            Stage::Drift => "drift",
            Stage::Remove => "remove",
        }
    }
}

/// How a stage ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageResult {
    /// Done.
    Ok,
    /// Failed; retried.
    Error,
    /// The revision cannot be applied (rejected; not retried).
    Rejected,
    /// Health: not healthy in time, or a failed hook.
    Degraded,
    /// A newer desired state or the agent stopping cut it short.
    Interrupted,
}

impl StageResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StageResult::Ok => "ok",
            StageResult::Error => "error",
            StageResult::Rejected => "rejected",
            StageResult::Degraded => "degraded",
            StageResult::Interrupted => "interrupted",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeploymentLabels {
    deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~65 s: a cached fetch to a slow health wait.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The agent's metrics.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    reconciles: Family<StageLabels, Counter>,
    durations: Family<StageLabels, Histogram, fn() -> Histogram>,
    drift_detected: Family<DeploymentLabels, Counter>,
    drift_corrected: Family<DeploymentLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    fetches: Family<ResultLabels, Histogram, fn() -> Histogram>,
    fetch_bytes: Counter,
    /// The edge link's connection series.
    pub link: LinkMetrics,
    /// The outbox's series.
    pub outbox: OutboxMetrics,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            reconciles: Family::default(),
            durations: Family::new_with_constructor(seconds_histogram),
            drift_detected: Family::default(),
            drift_corrected: Family::default(),
            rejected: Family::default(),
            fetches: Family::new_with_constructor(seconds_histogram),
            fetch_bytes: Counter::default(),
            link: LinkMetrics::default(),
            outbox: OutboxMetrics::default(),
        }
    }
}

impl AgentMetrics {
    /// Registers every series.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "roost_agent_reconciles",
            "Reconcile stages run, by stage and result",
            self.reconciles.clone(),
        );
        r.register(
            "roost_agent_reconcile_duration_seconds",
            "How long each reconcile stage took, by stage and result",
            self.durations.clone(),
        );
        r.register(
            "roost_agent_drift_detected",
            "Drift findings reported (drift.detected events), per deployment",
            self.drift_detected.clone(),
        );
        r.register(
            "roost_agent_drift_corrected",
            "Drift corrected by self-heal (drift.corrected events), per deployment",
            self.drift_corrected.clone(),
        );
        r.register(
            "roost_agent_rollouts_rejected",
            "Rollouts rejected (rollout.rejected events), by reason code",
            self.rejected.clone(),
        );
        r.register(
            "roost_agent_git_fetch_duration_seconds",
            "Git fetches from a source (cache misses), by result",
            self.fetches.clone(),
        );
        r.register(
            "roost_agent_git_fetch_bytes",
            "Bytes received by git fetches",
            self.fetch_bytes.clone(),
        );
        self.link.register(r);
        self.outbox.register(r);
    }

    /// A stage ended.
    pub fn stage(&self, stage: Stage, result: StageResult, took: Duration) {
        let l = StageLabels {
            stage: stage.as_str(),
            result: result.as_str(),
        };
        self.reconciles.get_or_create(&l).inc();
        self.durations.get_or_create(&l).observe(took.as_secs_f64());
    }

    /// Counts what the events committed report: drift found and corrected, rejections.
    pub fn events(&self, events: &[EventData]) {
        for e in events {
            match e {
                EventData::DriftDetected(d) => {
                    self.drift_detected.get_or_create(&DeploymentLabels {
                        deployment: d.rollout.deployment.clone(),
                    })
                }
                EventData::DriftCorrected(d) => {
                    self.drift_corrected.get_or_create(&DeploymentLabels {
                        deployment: d.rollout.deployment.clone(),
                    })
                }
                EventData::RolloutRejected(r) => self.rejected.get_or_create(&ReasonLabels {
                    reason: r.reason.as_str().to_owned(),
                }),
                _ => continue,
            }
            .inc();
        }
    }

    /// A git fetch ended (`bytes` received when it succeeded).
    pub fn fetched(&self, ok: bool, bytes: u64, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.fetches
            .get_or_create(&ResultLabels { result })
            .observe(took.as_secs_f64());
        self.fetch_bytes.inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn series_are_named_by_prometheus_conventions() {
        let m = AgentMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.stage(Stage::Apply, StageResult::Ok, Duration::from_millis(3));
        m.fetched(true, 1234, Duration::from_millis(40));
        let text = roost_runtime::Exporter::new(r).render().await;
        for want in [
            "roost_agent_reconciles_total{stage=\"apply\",result=\"ok\"} 1",
            "roost_agent_reconcile_duration_seconds_count{stage=\"apply\",result=\"ok\"} 1",
            "roost_agent_git_fetch_bytes_total 1234",
            "roost_agent_git_fetch_duration_seconds_count{result=\"ok\"} 1",
            "# TYPE roost_outbox_messages gauge",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
