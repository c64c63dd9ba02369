//! After a revision is applied and reported: compares live state with the plan on the
//! target's change signals and on the drift timer; reports `drift.detected` once per distinct
//! finding and, with `policy.self_heal`, re-applies (`drift.corrected`).

use std::time::Duration;

use roost_schemas::Rollout;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Ctx, Outcome, StageError, Wake};
use crate::decide::Desired;
use crate::metrics::{Stage, StageResult};
use crate::targets::Target;

/// Watches until the desired state changes (`Changed`) or the agent stops (`Stop`).
pub async fn watch<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    plan: &T::Plan,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<Wake, StageError> {
    let deployment = &rollout.deployment;
    let mut signals = ctx.target.watch(plan);
    loop {
        let t = std::time::Instant::now();
        let found = ctx.target.drift(plan).await;
        let result = match found {
            Ok(_) => StageResult::Ok,
            Err(_) => StageResult::Error,
        };
        ctx.metrics.stage(Stage::Drift, result, t.elapsed());
        match found {
            Ok(None) => {
                let healthy = ctx.target.health(plan).await.is_ok_and(|h| h.ready);
                ctx.record(deployment, Outcome::InSync { healthy }).await?;
            }
            Ok(Some(report)) => {
                ctx.record(
                    deployment,
                    Outcome::Drifted {
                        items: report.items.clone(),
                    },
                )
                .await?;
                if rollout.policy.self_heal {
                    // Every object again (no digest shortcut): drift means the live state
                    // no longer matches what the inventory's digests describe.
                    match ctx.target.apply(plan, &[]).await {
                        Ok(_) => {
                            ctx.record(
                                deployment,
                                Outcome::DriftCorrected {
                                    items: report.items,
                                },
                            )
                            .await?
                        }
                        Err(e) => {
                            let e = StageError::Apply(e);
                            warn!(%deployment, error = %e.message(), "self-heal failed");
                            if let Some(o) = e.outcome(Some(ctx.cfg.drift_interval)) {
                                ctx.record(deployment, o).await?;
                            }
                        }
                    }
                }
            }
            Err(error) => warn!(%deployment, error = %error.chain(), "drift check failed"),
        }
        let sig = async {
            match signals.as_mut() {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                    // Let a burst of events settle before checking.
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
