//! Stage 4, prune: deletes what the inventory holds and the new revision does not (only with
//! `policy.prune`; otherwise those objects stay in the inventory, so a later prune still
//! finds them). The target deletes only objects that are still roost's.

use roost_schemas::Rollout;

use super::{Ctx, StageError};
use crate::targets::{InventoryEntry, ObjectRef, Target};

/// What pruning did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Deleted objects.
    pub deleted: Vec<ObjectRef>,
    /// Stale objects kept (prune disabled): they stay in the inventory.
    pub kept: Vec<InventoryEntry>,
}

/// The inventory entries `planned` does not hold.
pub fn stale(inventory: &[InventoryEntry], planned: &[InventoryEntry]) -> Vec<InventoryEntry> {
    inventory
        .iter()
        .filter(|e| !planned.iter().any(|p| p.object == e.object))
        .cloned()
        .collect()
}

/// Prunes the stale part of `inventory`.
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    inventory: &[InventoryEntry],
    planned: &[InventoryEntry],
) -> Result<Pruned, StageError> {
    let stale = stale(inventory, planned);
    if stale.is_empty() {
        return Ok(Pruned::default());
    }
    if !rollout.policy.prune {
        return Ok(Pruned {
            deleted: Vec::new(),
            kept: stale,
        });
    }
    let refs: Vec<ObjectRef> = stale.iter().map(|e| e.object.clone()).collect();
    let deleted = ctx
        .target
        .prune(&rollout.deployment, &refs)
        .await
        .map_err(StageError::Prune)?;
    Ok(Pruned {
        deleted,
        kept: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_is_inventory_minus_plan() {
        let e = |p: &str| InventoryEntry {
            object: ObjectRef::File { path: p.into() },
            digest: String::new(),
        };
        let s = stale(&[e("a"), e("b"), e("c")], &[e("b")]);
        let names: Vec<String> = s.iter().map(|x| x.object.to_string()).collect();
        assert_eq!(names, vec!["a", "c"]);
    }
}
