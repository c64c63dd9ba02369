//! The reconciler: one worker per deployment drives the stages fetch → build → apply →
//! prune → health, one module per stage, each failing with its own [`StageError`] variant,
//! event and reason code; then watches for drift until the desired state changes. Every stage
//! result goes through the pure [`machine::transition`] and is committed with its events.

pub mod apply;
pub mod build;
pub mod drift;
pub mod fetch;
pub mod gate;
pub mod health;
pub mod machine;
pub mod prune;
pub mod remove;
pub mod rollback;

use std::sync::Arc;
use std::time::Duration;

use roost_runtime::Backoff;
use roost_schemas::{Problem, Reason, Rollout, RolloutRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::decide::Desired;
use crate::git::{GitCache, GitError};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{AgentMetrics, Stage, StageResult};
use crate::personalize::{PersonalizeError, Personalizer};
use crate::targets::{Target, TargetError};
use machine::{next_step, transition, Outcome, Step, Want};

/// Everything a worker needs.
pub struct Ctx<T: Target> {
    /// Configuration.
    pub cfg: Arc<AgentConfig>,
    /// Durable records, accepted rollouts and events.
    pub ledger: Ledger,
    /// Git cache.
    pub git: GitCache,
    /// Target.
    pub target: Arc<T>,
    /// Where stages, drift and rejections are counted.
    pub metrics: AgentMetrics,
    /// The store's context and identity: what makes its rendering its own.
    pub personalizer: Personalizer,
    /// Wall-clock time for operating windows (injected in tests).
    pub clock: Clock,
}

/// The wall clock operating windows are judged by: the system's, or (tests) a fixed instant
/// that advances with tokio's clock, so paused tests control it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    base: Option<(jiff::Timestamp, tokio::time::Instant)>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { base: None }
    }

    /// `at` now, advancing with `tokio::time` from here on.
    pub fn starting_at(at: jiff::Timestamp) -> Clock {
        Clock {
            base: Some((at, tokio::time::Instant::now())),
        }
    }

    /// The current instant.
    pub fn now(&self) -> jiff::Timestamp {
        match self.base {
            None => jiff::Timestamp::now(),
            Some((at, since)) => {
                let elapsed = jiff::SignedDuration::try_from(since.elapsed()).unwrap_or_default();
                at.checked_add(elapsed).unwrap_or(at)
            }
        }
    }
}

impl<T: Target> Clone for Ctx<T> {
    fn clone(&self) -> Self {
        Ctx {
            cfg: self.cfg.clone(),
            ledger: self.ledger.clone(),
            git: self.git.clone(),
            target: self.target.clone(),
            metrics: self.metrics.clone(),
            personalizer: self.personalizer.clone(),
            clock: self.clock,
        }
    }
}

impl<T: Target> Ctx<T> {
    /// Feeds one outcome through the state machine and commits the result with its events.
    pub async fn record(&self, deployment: &str, outcome: Outcome) -> Result<(), StageError> {
        let rec = self.ledger.record(deployment);
        let (next, events) = transition(&rec, outcome);
        self.metrics.events(&events);
        self.ledger
            .commit(next, events)
            .await
            .map_err(StageError::Ledger)
    }

    /// Runs one stage, counting it and its duration by result.
    pub async fn timed<R>(
        &self,
        stage: Stage,
        fut: impl std::future::Future<Output = Result<R, StageError>>,
    ) -> Result<R, StageError> {
        let t = std::time::Instant::now();
        let r = fut.await;
        self.metrics.stage(stage, stage_result(&r), t.elapsed());
        r
    }
}

/// The `result` label of a stage that ended with `r`.
pub fn stage_result<R>(r: &Result<R, StageError>) -> StageResult {
    match r {
        Ok(_) => StageResult::Ok,
        Err(StageError::Interrupted) => StageResult::Interrupted,
        Err(e) if e.is_rejection() => StageResult::Rejected,
        Err(_) => StageResult::Error,
    }
}

/// A failed stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Fetching the revision failed.
    #[error("fetch")]
    Fetch(#[source] GitError),
    /// Rendering the revision's files failed.
    #[error("render")]
    Render(#[source] GitError),
    /// Making the rendered files this store's (overlays, sealed files, substitution) failed.
    #[error("personalize")]
    Personalize(#[source] PersonalizeError),
    /// Building the plan failed (policy, manifests, discovery).
    #[error("build")]
    Build(#[source] TargetError),
    /// Applying failed.
    #[error("apply")]
    Apply(#[source] TargetError),
    /// Pruning failed.
    #[error("prune")]
    Prune(#[source] TargetError),
    /// Removing the deployment failed.
    #[error("remove")]
    Remove(#[source] TargetError),
    /// The ledger could not record an outcome.
    #[error("ledger")]
    Ledger(#[source] LedgerError),
    /// The desired state changed or the agent is stopping: not a failure.
    #[error("interrupted")]
    Interrupted,
}

impl StageError {
    /// The wire reason code.
    pub fn reason(&self) -> Reason {
        match self {
            StageError::Fetch(e) | StageError::Render(e) => e.reason(),
            StageError::Personalize(e) => e.reason(),
            StageError::Build(e) | StageError::Apply(e) => e.reason(),
            StageError::Prune(e) | StageError::Remove(e) => {
                if e.is_transient() {
                    Reason::TargetUnavailable
                } else {
                    Reason::PruneFailed
                }
            }
            StageError::Ledger(_) | StageError::Interrupted => Reason::Internal,
        }
    }

    /// A problem of the revision itself: retrying the same revision cannot help.
    pub fn is_rejection(&self) -> bool {
        match self {
            StageError::Render(e) => {
                matches!(e, GitError::InvalidManifest(_) | GitError::TooLarge(_))
            }
            StageError::Personalize(e) => e.is_rejection(),
            StageError::Build(e) => e.is_rejection(),
            _ => false,
        }
    }

    /// The stable `data.detail` code of a rejection, if any (`secret_not_for_this_store`).
    pub fn detail(&self) -> Option<&'static str> {
        match self {
            StageError::Personalize(e) => e.detail(),
            _ => None,
        }
    }

    /// The message with its causes.
    pub fn message(&self) -> String {
        match self {
            StageError::Fetch(e) | StageError::Render(e) => roost_runtime::error_chain(e),
            StageError::Personalize(e) => roost_runtime::error_chain(e),
            StageError::Build(e)
            | StageError::Apply(e)
            | StageError::Prune(e)
            | StageError::Remove(e) => e.chain(),
            other => roost_runtime::error_chain(other),
        }
    }

    /// The outcome that records this failure (None: nothing to record).
    fn outcome(&self, retry_in: Option<Duration>) -> Option<Outcome> {
        let problem = || Problem {
            reason: self.reason(),
            message: self.message(),
            retryable: retry_in.is_some(),
            retry_in_ms: retry_in.map(|d| d.as_millis() as u64),
        };
        match self {
            StageError::Interrupted | StageError::Ledger(_) => None,
            _ if self.is_rejection() => Some(Outcome::Rejected {
                reason: self.reason(),
                message: self.message(),
                detail: self.detail(),
            }),
            StageError::Fetch(_) | StageError::Render(_) => Some(Outcome::FetchFailed(problem())),
            _ => Some(Outcome::ApplyFailed(problem())),
        }
    }
}

/// How long the stages before apply took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Fetch (ms).
    pub fetch_ms: u64,
    /// Render and build (ms).
    pub build_ms: u64,
}

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The desired state changed.
    Changed,
    /// The time passed.
    Timer,
    /// The agent is stopping.
    Stop,
}

pub(crate) async fn wait(
    rx: &mut watch::Receiver<Desired>,
    d: Duration,
    cancel: &CancellationToken,
) -> Wake {
    tokio::select! {
        _ = cancel.cancelled() => Wake::Stop,
        r = rx.changed() => if r.is_ok() { Wake::Changed } else { Wake::Stop },
        _ = tokio::time::sleep(d) => Wake::Timer,
    }
}

/// The reconciler's view of the winning rollout.
pub fn want_of(desired: &Desired) -> Option<Want> {
    let (rollout, remove, context) = match desired {
        Desired::Unknown => return None,
        Desired::Remove { rollout } | Desired::Left { rollout } => (rollout, true, None),
        Desired::Apply { rollout, context } => (rollout, false, context.clone()),
    };
    Some(Want {
        rollout: RolloutRef::of(rollout),
        url: rollout
            .source
            .as_ref()
            .map(|s| s.url.clone())
            .unwrap_or_default(),
        path: rollout
            .source
            .as_ref()
            .and_then(|s| roost_schemas::rollout::normalize_path(&s.path).ok())
            .unwrap_or_default(),
        remove,
        origin: rollout.origin.clone(),
        context,
    })
}

/// Runs the worker of one deployment until cancelled.
pub async fn run_worker<T: Target>(
    ctx: Ctx<T>,
    deployment: String,
    mut rx: watch::Receiver<Desired>,
    cancel: CancellationToken,
) {
    let mut retry = Backoff::new(ctx.cfg.retry.0, ctx.cfg.retry.1);
    loop {
        let desired = rx.borrow_and_update().clone();
        if let Some(rollout) = desired.rollout() {
            let span = tracing::Span::current();
            if let Some(src) = &rollout.source {
                span.record("revision", src.revision.as_str());
            }
            span.record("sequence", rollout.sequence);
        }
        let res = match ctx
            .record(&deployment, Outcome::Wanted(want_of(&desired)))
            .await
        {
            Ok(()) => step(&ctx, &deployment, &desired, &mut rx, &cancel).await,
            Err(e) => Err(e),
        };
        let wake = match res {
            Ok(wake) => {
                retry.reset();
                wake
            }
            Err(StageError::Interrupted) => Wake::Changed,
            Err(e) if e.is_rejection() => {
                // The same revision fails the same way: wait for a new desired state.
                warn!(%deployment, error = %e.message(), reason = %e.reason(), "rollout cannot be applied; waiting for a new one");
                if let Some(o) = e.outcome(None) {
                    if let Err(error) = ctx.record(&deployment, o).await {
                        warn!(%deployment, error = %error.message(), "cannot record the rejection");
                    }
                }
                wait(&mut rx, Duration::from_secs(24 * 3600), &cancel).await
            }
            Err(e) => {
                let delay = retry.next_delay();
                warn!(%deployment, stage = %e, error = %e.message(), reason = %e.reason(), retry_in_ms = delay.as_millis() as u64, "reconcile failed");
                if let Some(o) = e.outcome(Some(delay)) {
                    if let Err(error) = ctx.record(&deployment, o).await {
                        warn!(%deployment, error = %error.message(), "cannot record the failure");
                    }
                }
                wait(&mut rx, delay, &cancel).await
            }
        };
        if matches!(wake, Wake::Stop) || cancel.is_cancelled() {
            return;
        }
    }
}

/// One step for the current desired state; returns what ended it.
async fn step<T: Target>(
    ctx: &Ctx<T>,
    deployment: &str,
    desired: &Desired,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<Wake, StageError> {
    let rec = ctx.ledger.record(deployment);
    match (next_step(&rec), desired) {
        (Step::Idle, _) | (Step::HoldRollback, _) => {
            Ok(wait(rx, Duration::from_secs(3600), cancel).await)
        }
        (Step::Remove, _) => {
            ctx.timed(Stage::Remove, remove::run(ctx, deployment))
                .await?;
            Ok(wait(rx, Duration::from_secs(3600), cancel).await)
        }
        (Step::Reconcile, Desired::Apply { rollout, .. }) => {
            let (plan, timing) = prepare(ctx, rollout, rx, true).await?;
            if let Wake::Changed | Wake::Stop = stage_until(ctx, rollout, rx, cancel).await? {
                return Err(StageError::Interrupted);
            }
            if let Wake::Changed | Wake::Stop = gate::run(ctx, rollout, rx, cancel).await? {
                return Err(StageError::Interrupted);
            }
            let applied = ctx
                .timed(Stage::Apply, apply::run(ctx, rollout, &plan, timing))
                .await;
            if let Err(e) = &applied {
                if rollback::wanted_for(ctx, rollout, e) {
                    let (reason, message) = (e.reason(), e.message());
                    if let Some(o) = e.outcome(None) {
                        ctx.record(deployment, o).await?;
                    }
                    if rollback::run(ctx, rollout, reason, message).await? {
                        return Ok(wait(rx, Duration::from_secs(3600), cancel).await);
                    }
                }
            }
            applied?;
            health_stage(ctx, deployment, rollout, &plan, rx, cancel).await?;
            if rollback::after_health(ctx, rollout).await? {
                return Ok(wait(rx, Duration::from_secs(3600), cancel).await);
            }
            drift::watch(ctx, rollout, &plan, rx, cancel).await
        }
        (Step::ReportHealth, Desired::Apply { rollout, .. }) => {
            let (plan, _) = prepare(ctx, rollout, rx, false).await?;
            info!(%deployment, revision = ?rec.applied.as_ref().map(|a| &a.revision), "reporting the outcome of an apply finished before a restart");
            health_stage(ctx, deployment, rollout, &plan, rx, cancel).await?;
            if rollback::after_health(ctx, rollout).await? {
                return Ok(wait(rx, Duration::from_secs(3600), cancel).await);
            }
            drift::watch(ctx, rollout, &plan, rx, cancel).await
        }
        (Step::InSync, Desired::Apply { rollout, .. }) => {
            let (plan, _) = prepare(ctx, rollout, rx, false).await?;
            drift::watch(ctx, rollout, &plan, rx, cancel).await
        }
        // A step that needs a rollout while none is wanted cannot happen (next_step reads the
        // same want); wait for the next change.
        _ => Ok(wait(rx, Duration::from_secs(3600), cancel).await),
    }
}

/// fetch → build: the revision as a plan.
async fn prepare<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    announce: bool,
) -> Result<(T::Plan, Timing), StageError> {
    let t = std::time::Instant::now();
    ctx.timed(Stage::Fetch, fetch::run(ctx, rollout, rx, announce))
        .await?;
    let fetch_ms = t.elapsed().as_millis() as u64;
    let t = std::time::Instant::now();
    let plan = ctx.timed(Stage::Build, build::run(ctx, rollout)).await?;
    Ok((
        plan,
        Timing {
            fetch_ms,
            build_ms: t.elapsed().as_millis() as u64,
        },
    ))
}

/// The health stage, counted: `degraded` when it recorded the deployment as degraded.
async fn health_stage<T: Target>(
    ctx: &Ctx<T>,
    deployment: &str,
    rollout: &Rollout,
    plan: &T::Plan,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    let t = std::time::Instant::now();
    let r = health::run(ctx, deployment, rollout, plan, rx, cancel).await;
    let result = match &r {
        Ok(()) if ctx.ledger.record(deployment).phase == roost_schemas::Phase::Degraded => {
            StageResult::Degraded
        }
        _ => stage_result(&r),
    };
    ctx.metrics.stage(Stage::Health, result, t.elapsed());
    r
}

/// Waits for `not_before` (staged rollouts): Timer when it is time to apply.
async fn stage_until<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<Wake, StageError> {
    let Some(nb) = rollout
        .not_before
        .as_deref()
        .and_then(roost_schemas::parse_rfc3339)
    else {
        return Ok(Wake::Timer);
    };
    let now = time::OffsetDateTime::now_utc();
    if nb <= now {
        return Ok(Wake::Timer);
    }
    let until = roost_schemas::format_rfc3339(nb);
    info!(deployment = %rollout.deployment, not_before = %until, "staged; waiting");
    ctx.record(&rollout.deployment, Outcome::Staged { until })
        .await?;
    let d = Duration::try_from(nb - now).unwrap_or_default();
    Ok(wait(rx, d, cancel).await)
}

#[cfg(test)]
mod tests;
