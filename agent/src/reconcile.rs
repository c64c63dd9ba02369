//! The reconciler: one worker per deployment drives fetch → render → apply → prune → health,
//! one function per stage, each failure mapped to its event and reason code; then watches for
//! drift until the desired state changes.

use std::sync::Arc;
use std::time::Duration;

use roost_runtime::Backoff;
use roost_schemas::{DesiredRef, EventType, Phase, Reason, Rollout};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::decide::{plan, AppliedRecord, Desired, Plan};
use crate::git::{GitCache, GitError, RenderLimits, Rendered};
use crate::report::{Reporter, StatusBoard};
use crate::state::StateStore;
use crate::target::{Target, TargetError};

/// Everything a worker needs.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Configuration.
    pub cfg: Arc<AgentConfig>,
    /// Durable state.
    pub state: StateStore,
    /// Git cache.
    pub git: GitCache,
    /// Target.
    pub target: Arc<Target>,
    /// Events.
    pub reporter: Reporter,
    /// Status document.
    pub board: StatusBoard,
}

/// A failed stage.
#[derive(Debug, thiserror::Error)]
enum StageError {
    #[error(transparent)]
    Fetch(GitError),
    #[error(transparent)]
    Render(GitError),
    #[error(transparent)]
    Validate(TargetError),
    #[error(transparent)]
    Apply(TargetError),
    #[error(transparent)]
    Prune(TargetError),
    #[error("state: {0}")]
    State(String),
    /// The desired state changed or the agent is stopping: not a failure.
    #[error("interrupted")]
    Interrupted,
}

impl StageError {
    fn reason(&self) -> Reason {
        match self {
            StageError::Fetch(e) | StageError::Render(e) => e.reason(),
            StageError::Validate(e) | StageError::Apply(e) | StageError::Prune(e) => e.reason(),
            StageError::State(_) | StageError::Interrupted => Reason::Internal,
        }
    }

    /// Problems of the revision itself (not of the network or the cluster): retrying the
    /// same revision cannot help.
    fn is_permanent(&self) -> bool {
        matches!(
            self.reason(),
            Reason::InvalidManifest | Reason::PolicyDenied | Reason::TooLarge
        )
    }

    fn event(&self) -> EventType {
        match self {
            StageError::Fetch(_) => EventType::FetchFailed,
            StageError::Render(_) | StageError::Validate(_) => EventType::RolloutRejected,
            _ => EventType::ApplyFailed,
        }
    }
}

fn base_data(r: &Rollout) -> serde_json::Value {
    json!({
        "deployment": r.deployment,
        "revision": r.source.as_ref().map(|s| s.revision.clone()),
        "sequence": r.sequence,
        "scope": r.scope.key(),
    })
}

fn with(mut v: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(a), Some(b)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in b {
            a.insert(k.clone(), val.clone());
        }
    }
    v
}

/// What ended a wait.
enum Wake {
    Changed,
    Timer,
    Stop,
}

async fn wait(rx: &mut watch::Receiver<Desired>, d: Duration, cancel: &CancellationToken) -> Wake {
    tokio::select! {
        _ = cancel.cancelled() => Wake::Stop,
        r = rx.changed() => if r.is_ok() { Wake::Changed } else { Wake::Stop },
        _ = tokio::time::sleep(d) => Wake::Timer,
    }
}

/// Runs the worker of one deployment until cancelled.
pub async fn run_worker(
    ctx: Ctx,
    deployment: String,
    mut rx: watch::Receiver<Desired>,
    cancel: CancellationToken,
) {
    let mut retry = Backoff::new(ctx.cfg.retry.0, ctx.cfg.retry.1);
    loop {
        let desired = rx.borrow_and_update().clone();
        let applied = match ctx.state.applied(&deployment) {
            Ok(a) => a,
            Err(error) => {
                warn!(%error, %deployment, "cannot read state");
                if let Wake::Stop = wait(&mut rx, retry.next_delay(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        set_desired(&ctx, &deployment, &desired, applied.as_ref());
        let outcome = match plan(&desired, applied.as_ref()) {
            Plan::Idle => match wait(&mut rx, Duration::from_secs(3600), &cancel).await {
                Wake::Stop => return,
                _ => continue,
            },
            Plan::Remove => remove(&ctx, &deployment, &desired).await,
            Plan::InSync => {
                let Desired::Apply { rollout } = &desired else {
                    continue;
                };
                match in_sync(&ctx, &deployment, rollout, &mut rx, &cancel).await {
                    Ok(Wake::Stop) => return,
                    Ok(_) => continue,
                    Err(e) => Err(e),
                }
            }
            Plan::Apply => {
                let Desired::Apply { rollout } = &desired else {
                    continue;
                };
                apply(&ctx, &deployment, rollout, &mut rx, &cancel).await
            }
        };
        match outcome {
            Ok(()) => retry.reset(),
            Err(StageError::Interrupted) => {
                if cancel.is_cancelled() {
                    return;
                }
            }
            Err(e) if e.is_permanent() => {
                // The same revision will fail the same way: wait for a new desired state.
                warn!(%deployment, error = %e, reason = %e.reason(), "rollout cannot be applied; waiting for a new one");
                if let Wake::Stop = wait(&mut rx, Duration::from_secs(24 * 3600), &cancel).await {
                    return;
                }
            }
            Err(e) => {
                let delay = retry.next_delay();
                warn!(%deployment, error = %e, reason = %e.reason(), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
                if let Wake::Stop = wait(&mut rx, delay, &cancel).await {
                    return;
                }
            }
        }
    }
}

fn set_desired(ctx: &Ctx, deployment: &str, desired: &Desired, applied: Option<&AppliedRecord>) {
    ctx.board.update(deployment, |s| {
        s.desired = match desired {
            Desired::Apply { rollout } => rollout.source.as_ref().map(|src| DesiredRef {
                revision: src.revision.clone(),
                sequence: rollout.sequence,
                scope: rollout.scope.key(),
            }),
            _ => None,
        };
        if let Some(a) = applied {
            s.applied_revision = (!a.removed).then(|| a.revision.clone());
        }
    });
}

async fn fetch_and_render(
    ctx: &Ctx,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
) -> Result<Rendered, StageError> {
    let Some(src) = &rollout.source else {
        return Err(StageError::State("rollout without source".into()));
    };
    ctx.board.update(&rollout.deployment, |s| {
        s.phase = Phase::Fetching;
        s.message = format!("fetching {}", short(&src.revision));
    });
    let fetch = ctx.git.ensure(&src.url, &src.revision);
    tokio::pin!(fetch);
    tokio::select! {
        r = &mut fetch => { r.map_err(StageError::Fetch)?; }
        _ = rx.changed() => return Err(StageError::Interrupted),
    }
    let limits = RenderLimits {
        max_bytes: ctx.cfg.file.limits.max_render_bytes,
        max_files: ctx.cfg.file.limits.max_objects,
    };
    let rendered = ctx
        .git
        .render(&src.url, &src.revision, &src.path, limits)
        .await
        .map_err(StageError::Render)?;
    ctx.target
        .validate(&rollout.deployment, &rendered)
        .await
        .map_err(StageError::Validate)?;
    Ok(rendered)
}

fn short(rev: &str) -> &str {
    &rev[..rev.len().min(12)]
}

async fn report_failure(ctx: &Ctx, rollout: &Rollout, e: &StageError, attempted: bool) {
    if matches!(e, StageError::Interrupted) {
        return;
    }
    let phase = Phase::Failed;
    ctx.board.update(&rollout.deployment, |s| {
        s.phase = phase;
        s.message = e.to_string();
        s.reason = Some(e.reason().as_str().to_owned());
        if attempted {
            s.last_attempted_revision = rollout.source.as_ref().map(|x| x.revision.clone());
        }
    });
    ctx.reporter
        .emit(
            e.event(),
            Some(&rollout.deployment),
            with(
                base_data(rollout),
                json!({"reason": e.reason(), "message": e.to_string()}),
            ),
        )
        .await;
}

/// fetch → render → (wait for not_before) → apply → prune → health.
async fn apply(
    ctx: &Ctx,
    deployment: &str,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    let rendered = match fetch_and_render(ctx, rollout, rx).await {
        Ok(r) => r,
        Err(e) => {
            report_failure(ctx, rollout, &e, false).await;
            return Err(e);
        }
    };
    if let Some(nb) = rollout
        .not_before
        .as_deref()
        .and_then(roost_schemas::parse_rfc3339)
    {
        let now = time::OffsetDateTime::now_utc();
        if nb > now {
            let d = Duration::try_from(nb - now).unwrap_or_default();
            info!(%deployment, not_before = %roost_schemas::format_rfc3339(nb), "staged; waiting");
            ctx.board.update(deployment, |s| {
                s.phase = Phase::Pending;
                s.message = format!("staged; activates at {}", roost_schemas::format_rfc3339(nb));
            });
            match wait(rx, d, cancel).await {
                Wake::Timer => {}
                _ => return Err(StageError::Interrupted),
            }
        }
    }
    let src_rev = rendered.revision.clone();
    ctx.board.update(deployment, |s| {
        s.phase = Phase::Applying;
        s.message = format!("applying {}", short(&src_rev));
        s.last_attempted_revision = Some(src_rev.clone());
        s.reason = None;
    });
    ctx.reporter
        .emit(
            EventType::ApplyStarted,
            Some(deployment),
            base_data(rollout),
        )
        .await;
    let previous = ctx
        .state
        .inventory(deployment)
        .map_err(|e| StageError::State(e.to_string()))?;
    let report = match ctx
        .target
        .apply(deployment, &rendered, &rollout.policy)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let e = StageError::Apply(e);
            report_failure(ctx, rollout, &e, true).await;
            return Err(e);
        }
    };
    let src = rollout
        .source
        .as_ref()
        .ok_or_else(|| StageError::State("no source".into()))?;
    let record = AppliedRecord {
        revision: src.revision.clone(),
        path: roost_schemas::rollout::normalize_path(&src.path).unwrap_or_default(),
        url: src.url.clone(),
        removed: false,
    };
    // The new inventory keeps what was not pruned, so a later prune still finds it.
    let mut inventory = report.inventory.clone();
    if rollout.policy.prune {
        match ctx.target.prune(deployment, &rendered, &previous).await {
            Ok(pruned) if !pruned.is_empty() => {
                ctx.reporter
                    .emit(
                        EventType::Pruned,
                        Some(deployment),
                        with(base_data(rollout), json!({"pruned": pruned})),
                    )
                    .await;
            }
            Ok(_) => {}
            Err(e) => {
                let e = StageError::Prune(e);
                report_failure(ctx, rollout, &e, true).await;
                keep_unpruned(&mut inventory, &previous);
            }
        }
    } else {
        keep_unpruned(&mut inventory, &previous);
    }
    ctx.state
        .set_inventory(deployment, &inventory)
        .map_err(|e| StageError::State(e.to_string()))?;
    ctx.board.update(deployment, |s| {
        s.applied_revision = Some(src.revision.clone());
        s.phase = Phase::Progressing;
        s.drift = false;
        s.message = format!("applied {}; waiting for health", short(&src.revision));
    });
    // Crash safety: apply.succeeded is stored before the apply is recorded as done, so a
    // crash in between re-applies (idempotent) and reports again, instead of finding itself
    // in sync with the outcome never reported. converged/degraded are recorded as reported
    // (see `health`), and `in_sync` reports them if a crash came first.
    ctx.reporter
        .emit(
            EventType::ApplySucceeded,
            Some(deployment),
            with(base_data(rollout), json!({"changed": report.changed})),
        )
        .await;
    ctx.state
        .set_applied(deployment, &record)
        .map_err(|e| StageError::State(e.to_string()))?;
    health(ctx, deployment, rollout, &rendered, rx, cancel).await
}

/// Adds to `inventory` what `previous` owned and was not pruned, so a later prune finds it.
fn keep_unpruned(inventory: &mut Vec<String>, previous: &[String]) {
    for p in previous {
        if !inventory.contains(p) {
            inventory.push(p.clone());
        }
    }
}

/// Waits for health up to the policy's timeout: `converged` or `degraded`.
async fn health(
    ctx: &Ctx,
    deployment: &str,
    rollout: &Rollout,
    rendered: &Rendered,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(rollout.policy.health_timeout_s);
    let mut interval = Duration::from_millis(200);
    loop {
        let h = ctx.target.health(deployment, rendered).await;
        match h {
            Ok(h) if h.ready => {
                ctx.board.update(deployment, |s| {
                    s.phase = Phase::Converged;
                    s.message = String::new();
                    s.reason = None;
                });
                ctx.reporter
                    .emit(EventType::Converged, Some(deployment), base_data(rollout))
                    .await;
                mark_reported(ctx, deployment, &rendered.revision);
                return Ok(());
            }
            Ok(h) if tokio::time::Instant::now() >= deadline => {
                let message = format!(
                    "not healthy after {} s: {}",
                    rollout.policy.health_timeout_s,
                    h.not_ready.join("; ")
                );
                ctx.board.update(deployment, |s| {
                    s.phase = Phase::Degraded;
                    s.message = message.clone();
                    s.reason = Some(Reason::HealthTimeout.as_str().into());
                });
                ctx.reporter
                    .emit(
                        EventType::Degraded,
                        Some(deployment),
                        with(base_data(rollout), json!({"reason": Reason::HealthTimeout, "message": message, "not_ready": h.not_ready})),
                    )
                    .await;
                mark_reported(ctx, deployment, &rendered.revision);
                return Ok(());
            }
            Ok(_) => {}
            Err(error) => warn!(%deployment, %error, "health check failed"),
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match wait(
            rx,
            interval.min(remaining.max(Duration::from_millis(10))),
            cancel,
        )
        .await
        {
            Wake::Timer => {}
            _ => return Err(StageError::Interrupted),
        }
        interval = (interval * 2).min(Duration::from_secs(5));
    }
}

fn mark_reported(ctx: &Ctx, deployment: &str, revision: &str) {
    if let Err(error) = ctx.state.set_reported(deployment, revision) {
        warn!(%deployment, %error, "cannot record the reported outcome");
    }
}

/// Applied and wanted: check drift on the timer and on target change signals.
async fn in_sync(
    ctx: &Ctx,
    deployment: &str,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<Wake, StageError> {
    let rendered = match fetch_and_render(ctx, rollout, rx).await {
        Ok(r) => r,
        Err(e) => {
            report_failure(ctx, rollout, &e, false).await;
            return Err(e);
        }
    };
    // Applied, but its outcome (converged/degraded) was never reported: the agent stopped
    // in between. Report it now.
    let reported = ctx
        .state
        .reported(deployment)
        .map_err(|e| StageError::State(e.to_string()))?;
    if reported.as_deref() != Some(rendered.revision.as_str()) {
        info!(%deployment, revision = %rendered.revision, "reporting the outcome of an apply finished before a restart");
        health(ctx, deployment, rollout, &rendered, rx, cancel).await?;
    }
    let mut signals = ctx.target.watch(deployment);
    let mut first = true;
    loop {
        let drift = ctx.target.drift(deployment, &rendered).await;
        match drift {
            Ok(None) => {
                let h = ctx
                    .target
                    .health(deployment, &rendered)
                    .await
                    .map(|h| h.ready)
                    .unwrap_or(false);
                ctx.board.update(deployment, |s| {
                    if s.drift || first || matches!(s.phase, Phase::Fetching | Phase::Pending) {
                        s.phase = if h { Phase::Converged } else { Phase::Degraded };
                        s.message.clear();
                        s.reason = None;
                    }
                    s.drift = false;
                    s.applied_revision = Some(rendered.revision.clone());
                });
            }
            Ok(Some(report)) => {
                ctx.board.update(deployment, |s| {
                    s.drift = true;
                    s.message = format!("drift: {}", report.items.join(", "));
                    s.reason = Some(Reason::Drift.as_str().into());
                });
                ctx.reporter
                    .emit(
                        EventType::DriftDetected,
                        Some(deployment),
                        with(base_data(rollout), json!({"reason": Reason::Drift, "message": "live state differs from the applied revision", "items": report.items})),
                    )
                    .await;
                if rollout.policy.self_heal {
                    match ctx
                        .target
                        .apply(deployment, &rendered, &rollout.policy)
                        .await
                    {
                        Ok(_) => {
                            ctx.board.update(deployment, |s| {
                                s.drift = false;
                                s.message.clear();
                                s.reason = None;
                            });
                            ctx.reporter
                                .emit(
                                    EventType::DriftCorrected,
                                    Some(deployment),
                                    with(base_data(rollout), json!({"items": report.items})),
                                )
                                .await;
                        }
                        Err(e) => {
                            let e = StageError::Apply(e);
                            report_failure(ctx, rollout, &e, true).await;
                        }
                    }
                }
            }
            Err(error) => warn!(%deployment, %error, "drift check failed"),
        }
        first = false;
        let sig = async {
            match signals.as_mut() {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                    // Let a burst of file-system events settle before checking.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    while s.try_recv().is_ok() {}
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return Ok(Wake::Stop),
            r = rx.changed() => return Ok(if r.is_ok() { Wake::Changed } else { Wake::Stop }),
            _ = tokio::time::sleep(ctx.cfg.drift_interval) => {}
            _ = sig => {}
        }
    }
}

/// Removes a deployment that no scope wants any more.
async fn remove(ctx: &Ctx, deployment: &str, desired: &Desired) -> Result<(), StageError> {
    let previous = ctx
        .state
        .inventory(deployment)
        .map_err(|e| StageError::State(e.to_string()))?;
    let applied = ctx
        .state
        .applied(deployment)
        .map_err(|e| StageError::State(e.to_string()))?;
    let data = match desired {
        Desired::Remove { rollout } => base_data(rollout),
        _ => json!({"deployment": deployment}),
    };
    match ctx.target.remove(deployment, &previous).await {
        Ok(deleted) => {
            if let Some(mut a) = applied {
                a.removed = true;
                ctx.state
                    .set_applied(deployment, &a)
                    .map_err(|e| StageError::State(e.to_string()))?;
            }
            ctx.state
                .set_inventory(deployment, &[])
                .map_err(|e| StageError::State(e.to_string()))?;
            if !deleted.is_empty() {
                ctx.reporter
                    .emit(
                        EventType::Pruned,
                        Some(deployment),
                        with(data.clone(), json!({"pruned": deleted})),
                    )
                    .await;
            }
            ctx.board.update(deployment, |s| {
                s.phase = Phase::Removed;
                s.applied_revision = None;
                s.drift = false;
                s.message.clear();
                s.reason = None;
            });
            ctx.reporter
                .emit(EventType::Removed, Some(deployment), data)
                .await;
            Ok(())
        }
        Err(e) => {
            let e = StageError::Prune(e);
            ctx.board.update(deployment, |s| {
                s.phase = Phase::Failed;
                s.message = e.to_string();
                s.reason = Some(e.reason().as_str().into());
            });
            ctx.reporter
                .emit(
                    EventType::ApplyFailed,
                    Some(deployment),
                    with(
                        data,
                        json!({"reason": e.reason(), "message": e.to_string()}),
                    ),
                )
                .await;
            Err(e)
        }
    }
}
