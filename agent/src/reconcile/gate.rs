//! The gate before apply (v1.2): a fetched and built revision is applied only once the
//! deployments it depends on are Converged on this store and its operating window is open
//! (store-local time, [`crate::window`]). Meanwhile the deployment is `Waiting` (reason
//! `dependency` with `waiting_for`, or `window` with `next_window`). The decision is the pure
//! [`decide`]; [`run`] waits on a local timer and on the other deployments' records, so it
//! works with the uplink cut.

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use roost_schemas::{Phase, Reason, Rollout, Schedule};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{wait, Ctx, Outcome, StageError, Wake};
use crate::decide::Desired;
use crate::targets::Target;
use crate::window::{self, Gate};

/// What the gate says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply now.
    Go,
    /// Wait for these dependencies (not Converged on the store).
    Dependencies(Vec<String>),
    /// Wait for the window opening then (None: none within the horizon).
    Window(Option<jiff::Zoned>),
}

/// Pure: the verdict for `schedule` given each dependency's phase on this store (`None`: the
/// store has no such deployment), the store's zone and the time.
pub fn decide(
    schedule: &Schedule,
    phase_of: impl Fn(&str) -> Option<Phase>,
    tz: &TimeZone,
    now: Timestamp,
) -> Verdict {
    let missing: Vec<String> = schedule
        .depends_on
        .iter()
        .filter(|d| phase_of(d) != Some(Phase::Converged))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Verdict::Dependencies(missing);
    }
    match window::gate(schedule, tz, now) {
        Gate::Open => Verdict::Go,
        Gate::OpensAt(z) => Verdict::Window(Some(z)),
        Gate::Never => Verdict::Window(None),
    }
}

/// Waits until the gate opens: `Timer` to apply now, `Changed`/`Stop` when interrupted.
pub async fn run<T: Target>(
    ctx: &Ctx<T>,
    rollout: &Rollout,
    rx: &mut watch::Receiver<Desired>,
    cancel: &CancellationToken,
) -> Result<Wake, StageError> {
    let schedule = &rollout.schedule;
    if schedule.depends_on.is_empty() && !schedule.timed() {
        return Ok(Wake::Timer);
    }
    let mut records = ctx.ledger.watch_records();
    loop {
        let tz = window::zone(ctx.ledger.store_context().timezone.as_deref());
        let verdict = decide(
            schedule,
            |d| {
                let rec = ctx.ledger.record(d);
                rec.want.as_ref().filter(|w| !w.remove).map(|_| rec.phase)
            },
            &tz,
            ctx.clock.now(),
        );
        let deployment = &rollout.deployment;
        match verdict {
            Verdict::Go => return Ok(Wake::Timer),
            Verdict::Dependencies(waiting_for) => {
                info!(%deployment, waiting_for = ?waiting_for, "waiting for dependencies");
                ctx.record(
                    deployment,
                    Outcome::Waiting {
                        reason: Reason::Dependency,
                        next_window: None,
                        waiting_for,
                    },
                )
                .await?;
                records.borrow_and_update();
                // Another deployment's record changed (it may have converged), or ours did.
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(Wake::Stop),
                    r = rx.changed() => return Ok(if r.is_ok() { Wake::Changed } else { Wake::Stop }),
                    r = records.changed() => if r.is_err() { return Ok(Wake::Stop) },
                }
            }
            Verdict::Window(next) => {
                let next_window = next.as_ref().map(window::rfc3339);
                info!(%deployment, next_window = ?next_window, "waiting for the operating window");
                ctx.record(
                    deployment,
                    Outcome::Waiting {
                        reason: Reason::Window,
                        next_window,
                        waiting_for: Vec::new(),
                    },
                )
                .await?;
                // A local timer: the window opens without the uplink. Re-judged at least
                // hourly (a new profile may bring another time zone).
                let d = next
                    .map(|z| {
                        let left = z.timestamp().duration_since(ctx.clock.now());
                        Duration::try_from(left).unwrap_or_default()
                    })
                    .unwrap_or(Duration::from_secs(3600))
                    .min(Duration::from_secs(3600));
                match wait(rx, d, cancel).await {
                    Wake::Timer => {}
                    other => return Ok(other),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::window::Window;

    fn schedule(deps: &[&str], windows: Vec<Window>) -> Schedule {
        Schedule {
            windows,
            blackouts: vec![],
            urgent: false,
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn dependencies_first_then_the_window() {
        let tz = window::zone(Some("America/New_York"));
        let now: Timestamp = "2026-12-06T17:00:00Z".parse().expect("ts");
        let night = vec![Window {
            days: vec![],
            start: "02:00".into(),
            duration: "3h".into(),
        }];
        let phases = |d: &str| match d {
            "crds" => Some(Phase::Converged),
            "db" => Some(Phase::Progressing),
            _ => None,
        };
        assert_eq!(
            decide(&schedule(&["crds"], vec![]), phases, &tz, now),
            Verdict::Go
        );
        assert_eq!(
            decide(
                &schedule(&["crds", "db", "gone"], night.clone()),
                phases,
                &tz,
                now
            ),
            Verdict::Dependencies(vec!["db".into(), "gone".into()])
        );
        match decide(&schedule(&["crds"], night.clone()), phases, &tz, now) {
            Verdict::Window(Some(z)) => {
                assert_eq!(window::rfc3339(&z), "2026-12-07T02:00:00-05:00")
            }
            other => panic!("{other:?}"),
        }
        let mut urgent = schedule(&[], night);
        urgent.urgent = true;
        assert_eq!(decide(&urgent, phases, &tz, now), Verdict::Go);
    }
}
