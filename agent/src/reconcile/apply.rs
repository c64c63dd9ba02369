//! Stage 3, apply: records what the apply may create in the inventory first (recovering a
//! lost inventory from the target once), applies the plan (the target writes only objects
//! whose manifest changed), runs the prune stage, and records the new inventory with
//! `apply.succeeded` (written / unchanged) and `pruned`.

use roost_schemas::Rollout;

use super::{prune, Ctx, Outcome, StageError};
use crate::targets::{InventoryEntry, Target};

/// Applies and prunes; the deployment is applied once this returns Ok.
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    plan: &T::Plan,
    timing: super::Timing,
) -> Result<(), StageError> {
    let deployment = &rollout.deployment;
    let rec = ctx.ledger.record(deployment);
    let entries: Vec<InventoryEntry> = ctx.target.entries(plan);
    // A label scan only when the inventory is unknown (first apply, or the agent's state was
    // lost); otherwise the inventory is the authority.
    let recovered = if rec.inventory_known {
        Vec::new()
    } else {
        ctx.target
            .recover(deployment, Some(plan))
            .await
            .map_err(StageError::Apply)?
    };
    ctx.record(
        deployment,
        Outcome::ApplyStarted {
            objects: entries.len() as u64,
            planned: entries.iter().map(|e| e.object.clone()).collect(),
            recovered,
            fetch_ms: timing.fetch_ms,
            build_ms: timing.build_ms,
        },
    )
    .await?;
    let inventory = ctx.ledger.record(deployment).inventory;
    let report = ctx
        .target
        .apply(plan, &inventory)
        .await
        .map_err(StageError::Apply)?;
    let pruned = ctx
        .timed(
            crate::metrics::Stage::Prune,
            prune::run(ctx, rollout, &inventory, &entries),
        )
        .await?;
    let mut next = entries;
    next.extend(pruned.kept);
    ctx.record(
        deployment,
        Outcome::Applied {
            changed: report.changed.iter().map(ToString::to_string).collect(),
            unchanged: report.unchanged as u64,
            pruned: pruned.deleted.iter().map(ToString::to_string).collect(),
            inventory: next,
        },
    )
    .await
}
