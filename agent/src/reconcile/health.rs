//! Stage 5, health: polls the target's health of the plan (backing off from 200 ms to 5 s)
//! until it is ready (`converged`) or the policy's `health_timeout_s` passes (`degraded`,
//! naming what is not ready). A failed hook is degraded at once.

use std::time::Duration;

use roost_schemas::{Reason, Rollout};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{wait, Ctx, Outcome, StageError, Wake};
use crate::decide::Desired;
use crate::targets::Target;

/// Waits for health and records the outcome.
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    deployment: &str,
    rollout: &Rollout,
    plan: &T::Plan,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    let timeout = Duration::from_secs(rollout.policy.health_timeout_s);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = Duration::from_millis(200);
    loop {
        // A newer desired state came while applying: this revision's outcome is moot.
        if rx.has_changed().unwrap_or(true) {
            return Err(StageError::Interrupted);
        }
        let (not_ready, reason) = match ctx.target.health(plan).await {
            Ok(h) if h.ready => return ctx.record(deployment, Outcome::Healthy).await,
            Ok(h) if h.reason == Some(Reason::HookFailed) => {
                return ctx
                    .record(
                        deployment,
                        Outcome::Unhealthy {
                            reason: Reason::HookFailed,
                            message: h.not_ready.join("; "),
                            not_ready: h.not_ready,
                        },
                    )
                    .await
            }
            Ok(h) => (h.not_ready, Reason::HealthTimeout),
            Err(error) => {
                warn!(%deployment, error = %error.chain(), "health check failed");
                (vec![error.chain()], error.reason())
            }
        };
        if tokio::time::Instant::now() >= deadline {
            let message = format!(
                "not healthy after {} s: {}",
                timeout.as_secs(),
                not_ready.join("; ")
            );
            return ctx
                .record(
                    deployment,
                    Outcome::Unhealthy {
                        reason,
                        message,
                        not_ready,
                    },
                )
                .await;
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
