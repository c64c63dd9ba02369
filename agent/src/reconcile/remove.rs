//! Removal: when no scope wants the deployment any more, deletes everything its inventory
//! holds (recovered from the target once if the inventory is unknown) and records `removed`.

use super::{Ctx, Outcome, StageError};
use crate::targets::{ObjectRef, Target};

/// Removes the deployment.
pub async fn run<T: Target>(ctx: &Ctx<T>, deployment: &str) -> Result<(), StageError> {
    let rec = ctx.ledger.record(deployment);
    let mut objects: Vec<ObjectRef> = rec.inventory.iter().map(|e| e.object.clone()).collect();
    if !rec.inventory_known {
        for o in ctx
            .target
            .recover(deployment, None)
            .await
            .map_err(StageError::Remove)?
        {
            if !objects.contains(&o) {
                objects.push(o);
            }
        }
    }
    let deleted = ctx
        .target
        .remove(deployment, &objects)
        .await
        .map_err(StageError::Remove)?;
    ctx.record(
        deployment,
        Outcome::Removed {
            deleted: deleted.iter().map(ToString::to_string).collect(),
        },
    )
    .await
}
