//! `roost bench latency`: one bridged store of real processes. Per trial: a new commit is
//! rolled out (signed, published retained at the cloud broker) and timed until its
//! `converged` event arrives at the cloud; then a file of the live revision is edited and
//! timed until `drift.detected` arrives at the cloud (the agent then corrects it).

use std::time::{Duration, Instant};

use roost_schemas::EventType;

use super::rig::{Rig, RigOptions};
use super::{summary_ms, BenchError};

/// Options.
#[derive(Debug, Clone)]
pub struct LatencyOptions {
    /// Trials.
    pub trials: usize,
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(opts: &LatencyOptions) -> Result<serde_json::Value, BenchError> {
    let mut rig = Rig::start(&RigOptions {
        objects: 4,
        agent_bin: None,
    })
    .await?;
    // The first rollout also connects everything (bridge, agent sessions): not a trial.
    let first = rig.commit(0)?;
    let warmup = rig.converge(&first, Duration::from_secs(60)).await?;
    let mut rollout = Vec::new();
    let mut drift = Vec::new();
    for round in 1..=opts.trials as u64 {
        let revision = rig.commit(round)?;
        let d = rig.converge(&revision, Duration::from_secs(30)).await?;
        rollout.push(d.as_secs_f64() * 1000.0);
        // An out-of-band edit of the live revision.
        let file = rig.current().join("cm-001.yaml");
        let t0 = Instant::now();
        std::fs::write(&file, format!("edited out of band {round}\n"))
            .map_err(super::setup("drift edit"))?;
        let at = rig
            .wait_event(EventType::DriftDetected, None, t0, Duration::from_secs(60))
            .await?;
        drift.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        rig.wait_event(EventType::DriftCorrected, None, t0, Duration::from_secs(60))
            .await?;
    }
    rig.stop();
    Ok(serde_json::json!({
        "bench": "latency",
        "trials": opts.trials,
        "first_rollout_ms": warmup.as_millis() as u64,
        "rollout_to_converged_ms": summary_ms(&mut rollout),
        "drift_edit_to_detected_ms": summary_ms(&mut drift),
    }))
}
