//! Stage 1, fetch: makes sure the wanted commit is in the local Git cache (fetching only when
//! it is missing, so a cached revision applies offline). Fails with `fetch_failed` or
//! `revision_not_found`, both retried.

use roost_schemas::Rollout;
use tokio::sync::watch;

use super::{Ctx, Outcome, StageError};
use crate::decide::Desired;
use crate::targets::Target;

/// Fetches the rollout's revision; `announce` records the Fetching phase first (a new
/// revision, not a re-entry into an applied one).
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    announce: bool,
) -> Result<(), StageError> {
    let Some(src) = &rollout.source else {
        // Verified rollouts that are not tombstones always carry a source.
        return Err(StageError::Interrupted);
    };
    if announce {
        ctx.record(&rollout.deployment, Outcome::Fetching).await?;
    }
    let fetch = ctx.git.ensure(&src.url, &src.revision);
    tokio::pin!(fetch);
    tokio::select! {
        r = &mut fetch => r.map(|_| ()).map_err(StageError::Fetch),
        _ = rx.changed() => Err(StageError::Interrupted),
    }
}
