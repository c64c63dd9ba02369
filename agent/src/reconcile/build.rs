//! Stage 2, build: renders the revision's files from the Git cache (within the agent's
//! limits), makes them this store's (overlays, sealed files decrypted in memory, substitution
//! when the rollout asks for it: [`crate::personalize`]) and has the target turn them into its
//! plan (parse, policy, discovery), once per revision. A problem of the revision is a
//! rejection; a cluster that cannot answer discovery is a transient failure.

use roost_schemas::Rollout;

use super::{Ctx, StageError};
use crate::git::RenderLimits;
use crate::targets::Target;

/// The rollout's revision as the target's plan.
pub async fn run<T: Target>(ctx: &Ctx<T>, rollout: &Rollout) -> Result<T::Plan, StageError> {
    let Some(src) = &rollout.source else {
        return Err(StageError::Interrupted);
    };
    let limits = RenderLimits {
        max_bytes: ctx.cfg.file.limits.max_render_bytes,
        max_files: ctx.cfg.file.limits.max_objects,
        max_file_bytes: ctx.cfg.file.limits.max_file_bytes,
    };
    let rendered = ctx
        .git
        .render(&src.url, &src.revision, &src.path, limits)
        .await
        .map_err(StageError::Render)?;
    let personal = ctx
        .personalizer
        .run(
            rendered,
            ctx.target.layout(),
            rollout.policy.substitute,
            limits,
        )
        .await
        .map_err(StageError::Personalize)?;
    ctx.target
        .build(&rollout.deployment, personal, &rollout.policy)
        .await
        .map_err(StageError::Build)
}
