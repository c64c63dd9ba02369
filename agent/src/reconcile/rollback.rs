//! Rollback at the store (v1.2, `policy.on_failure: rollback`): when the wanted revision
//! fails (an apply error, or health not reached within `health_timeout_s`), the last revision
//! that converged on this store (the record's `last_good`) is built and applied again, what
//! only the failed revision had is pruned, and the deployment is `RolledBack` with a
//! `dev.roost.rolled_back` event. The failed rollout is not retried until a new one arrives
//! (`Record::holds_rollback`). Everything it needs is local: the Git cache already holds the
//! restored revision, so it works with the uplink cut.

use roost_schemas::{OnFailure, Reason, Rollout, Source};
use tracing::{info, warn};

use super::{build, prune, Ctx, Outcome, StageError};
use crate::metrics::Stage;
use crate::targets::Target;

/// Whether `error` of the apply stage is a failure to roll back from: the policy asks for
/// it, and the failure is neither transient (retried as before) nor an interruption.
pub fn wanted_for<T: Target>(_ctx: &Ctx<T>, rollout: &Rollout, error: &StageError) -> bool {
    rollout.policy.on_failure() == OnFailure::Rollback
        && match error {
            StageError::Apply(e) | StageError::Prune(e) => !e.is_transient(),
            _ => false,
        }
}

/// After the health stage: rolls back when the policy asks for it and the revision was
/// recorded `Degraded` (health not reached in time, or a failed hook). `Ok(true)`: rolled back.
pub async fn after_health<T: Target>(ctx: &Ctx<T>, rollout: &Rollout) -> Result<bool, StageError> {
    let rec = ctx.ledger.record(&rollout.deployment);
    if rec.phase != roost_schemas::Phase::Degraded
        || rollout.policy.on_failure() != OnFailure::Rollback
    {
        return Ok(false);
    }
    let reason = rec.reason.unwrap_or(Reason::HealthTimeout);
    run(ctx, rollout, reason, rec.message).await
}

/// Restores the last good revision. `Ok(false)`: there is none (or it is the failed one), so
/// the deployment stays as it failed.
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    reason: Reason,
    message: String,
) -> Result<bool, StageError> {
    let deployment = &rollout.deployment;
    let rec = ctx.ledger.record(deployment);
    let Some(good) = rec.last_good.clone() else {
        warn!(%deployment, %reason, "revision failed; nothing converged here before, nothing to roll back to");
        return Ok(false);
    };
    let failed = rollout
        .source
        .as_ref()
        .map(|s| s.revision.clone())
        .unwrap_or_default();
    if good.revision == failed && rec.applied.as_ref().map(|a| &a.context) == Some(&good.context) {
        return Ok(false);
    }
    info!(%deployment, failed_revision = %failed, restored_revision = %good.revision, %reason, "rolling back");
    let mut restore = rollout.clone();
    restore.source = Some(Source {
        url: good.url.clone(),
        revision: good.revision.clone(),
        path: good.path.clone(),
    });
    let plan = ctx.timed(Stage::Build, build::run(ctx, &restore)).await?;
    let entries = ctx.target.entries(&plan);
    let inventory = ctx.ledger.record(deployment).inventory;
    ctx.timed(Stage::Apply, async {
        ctx.target
            .apply(&plan, &inventory)
            .await
            .map_err(StageError::Apply)
    })
    .await?;
    let pruned = ctx
        .timed(
            Stage::Prune,
            prune::run(ctx, &restore, &inventory, &entries),
        )
        .await?;
    let mut next = entries;
    next.extend(pruned.kept);
    ctx.record(
        deployment,
        Outcome::RolledBack {
            reason,
            message,
            pruned: pruned.deleted.iter().map(ToString::to_string).collect(),
            inventory: next,
        },
    )
    .await?;
    Ok(true)
}
