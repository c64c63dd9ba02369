//! The reconciler's state machine: a deployment's durable [`Record`] and the pure
//! [`transition`] from (record, stage outcome) to (new record, events). The worker commits the
//! new record and its events in one SQLite transaction, so the status document (derived from
//! records) and the event stream can never tell different stories, not even across a crash.

use roost_schemas::payload::{
    ApplyFailed, ApplyStarted, ApplySucceeded, Converged, Degraded, DriftCorrected, DriftDetected,
    FetchFailed, Pruned, Removed, RolledBack, RolloutRejected, Waiting,
};
use roost_schemas::ShortRev;
use roost_schemas::{
    DeploymentStatus, DesiredRef, EventData, Origin, Phase, Problem, Reason, RolloutRef,
};
use serde::{Deserialize, Serialize};

use crate::targets::{InventoryEntry, ObjectRef};

/// What the winning rollout asks for (the part the reconciler acts on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// The rollout (deployment, revision, sequence, scope).
    pub rollout: RolloutRef,
    /// Source URL.
    #[serde(default)]
    pub url: String,
    /// Normalized path inside the repository.
    #[serde(default)]
    pub path: String,
    /// A tombstone: remove the deployment.
    #[serde(default)]
    pub remove: bool,
    /// The rollout's origin (the fleet-repository commit), echoed in the status document.
    #[serde(default)]
    pub origin: Option<Origin>,
    /// The digest of the store context its rendering reads (`None`: it reads none); a new
    /// one renders and applies the revision again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// What was last applied completely (apply and prune done).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Commit.
    pub revision: String,
    /// Source URL.
    pub url: String,
    /// Path inside the repository.
    pub path: String,
    /// The store context digest it was rendered with (see [`Want::context`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

/// A deployment's durable record: the only source of its status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Record {
    /// Deployment name.
    pub deployment: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// What the winning rollout wants (None: no scope names the deployment).
    #[serde(default)]
    pub want: Option<Want>,
    /// The last complete apply (None: nothing applied, or removed since).
    #[serde(default)]
    pub applied: Option<Applied>,
    /// The last revision an apply was attempted for.
    #[serde(default)]
    pub last_attempted_revision: Option<String>,
    /// Reason code of the current problem.
    #[serde(default)]
    pub reason: Option<Reason>,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// Drifted objects (empty: no drift).
    #[serde(default)]
    pub drift: Vec<String>,
    /// The revision whose outcome (converged/degraded) was reported.
    #[serde(default)]
    pub reported: Option<String>,
    /// What the deployment owns (the authority for prune and drift).
    #[serde(default)]
    pub inventory: Vec<InventoryEntry>,
    /// The inventory was recorded at least once (false: unknown, e.g. after a state loss).
    #[serde(default)]
    pub inventory_known: bool,
    /// The last revision that converged on this store: what `on_failure: rollback` restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<Applied>,
    /// The rollout whose revision failed and was rolled back: not retried while it is the
    /// wanted one (a new rollout clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolloutRef>,
    /// While `Waiting` for a window: when it opens (RFC 3339, store offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<String>,
    /// While `Waiting` for dependencies: those not Converged yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

impl Record {
    /// A fresh record.
    pub fn new(deployment: &str) -> Record {
        Record {
            deployment: deployment.to_owned(),
            ..Record::default()
        }
    }

    /// The rollout events are about.
    pub fn rollout(&self) -> RolloutRef {
        match &self.want {
            Some(w) => w.rollout.clone(),
            None => RolloutRef {
                deployment: self.deployment.clone(),
                ..RolloutRef::default()
            },
        }
    }

    fn wanted_revision(&self) -> Option<String> {
        self.want.as_ref().and_then(|w| w.rollout.revision.clone())
    }

    /// The status document entry.
    pub fn status(&self) -> DeploymentStatus {
        DeploymentStatus {
            desired: self.want.as_ref().filter(|w| !w.remove).and_then(|w| {
                Some(DesiredRef {
                    revision: w.rollout.revision.clone()?,
                    sequence: w.rollout.sequence,
                    scope: w.rollout.scope.clone(),
                    origin: w.origin.clone(),
                })
            }),
            applied_revision: self.applied.as_ref().map(|a| a.revision.clone()),
            last_attempted_revision: self.last_attempted_revision.clone(),
            phase: self.phase,
            drift: !self.drift.is_empty(),
            message: self.message.clone(),
            reason: self.reason.map(|r| r.as_str().to_owned()),
            next_window: self.next_window.clone(),
            waiting_for: self.waiting_for.clone(),
            failed_revision: self
                .rolled_back
                .as_ref()
                .filter(|_| self.phase == Phase::RolledBack)
                .and_then(|r| r.revision.clone()),
        }
    }

    /// Whether the wanted rollout is the one that was rolled back (not to be retried).
    pub fn holds_rollback(&self) -> bool {
        match (&self.rolled_back, &self.want) {
            (Some(failed), Some(w)) => !w.remove && *failed == w.rollout,
            _ => false,
        }
    }

    /// Whether the applied state is what `want` asks for (the same revision, rendered with
    /// the same store context).
    pub fn applied_matches(&self, w: &Want) -> bool {
        self.applied.as_ref().is_some_and(|a| {
            Some(&a.revision) == w.rollout.revision.as_ref()
                && a.url == w.url
                && a.path == w.path
                && a.context == w.context
        })
    }
}

/// The result of one stage, fed to [`transition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The desired state changed (no event: `rollout.received` reported it).
    Wanted(Option<Want>),
    /// Fetching the revision.
    Fetching,
    /// The fetch failed (retried).
    FetchFailed(Problem),
    /// The revision can never be applied as it is (invalid manifest, policy, size).
    Rejected {
        /// Why.
        reason: Reason,
        /// What exactly.
        message: String,
        /// A finer, stable cause (`data.detail`, e.g. `secret_not_for_this_store`).
        detail: Option<&'static str>,
    },
    /// Fetched and built; waiting for a window (`reason: window`) or for dependencies
    /// (`reason: dependency`).
    Waiting {
        /// `window` or `dependency`.
        reason: Reason,
        /// When the window opens (RFC 3339, store offset); None: no opening in sight.
        next_window: Option<String>,
        /// Dependencies not Converged yet.
        waiting_for: Vec<String>,
    },
    /// The wanted revision failed and the last good one was applied again.
    RolledBack {
        /// Why the wanted revision failed.
        reason: Reason,
        /// What.
        message: String,
        /// Objects deleted (the failed revision's own).
        pruned: Vec<String>,
        /// The inventory from now on.
        inventory: Vec<InventoryEntry>,
    },
    /// Fetched and built; waiting for `not_before`.
    Staged {
        /// Activation time (RFC 3339).
        until: String,
    },
    /// Applying; the inventory now also holds what this apply may create.
    ApplyStarted {
        /// Objects in the revision.
        objects: u64,
        /// Objects this apply may write (their digests are taken once it succeeds).
        planned: Vec<ObjectRef>,
        /// Objects recovered from the target because the inventory was unknown.
        recovered: Vec<ObjectRef>,
        /// How long the fetch and build stages took (ms).
        fetch_ms: u64,
        /// See `fetch_ms`.
        build_ms: u64,
    },
    /// Apply, prune or removal failed.
    ApplyFailed(Problem),
    /// Applied and pruned.
    Applied {
        /// Objects written.
        changed: Vec<String>,
        /// Objects not written (already as desired).
        unchanged: u64,
        /// Objects deleted.
        pruned: Vec<String>,
        /// The inventory from now on.
        inventory: Vec<InventoryEntry>,
    },
    /// Healthy.
    Healthy,
    /// Not healthy in time, or a failed hook.
    Unhealthy {
        /// Why.
        reason: Reason,
        /// What.
        message: String,
        /// Objects not ready.
        not_ready: Vec<String>,
    },
    /// Live state differs.
    Drifted {
        /// What differs.
        items: Vec<String>,
    },
    /// Self-heal re-applied.
    DriftCorrected {
        /// What was corrected.
        items: Vec<String>,
    },
    /// A drift check found nothing.
    InSync {
        /// The target's health at that check.
        healthy: bool,
    },
    /// Everything of the deployment is gone.
    Removed {
        /// Objects deleted.
        deleted: Vec<String>,
    },
}

/// The pure transition: the new record and the events reporting the change.
pub fn transition(rec: &Record, outcome: Outcome) -> (Record, Vec<EventData>) {
    let mut r = rec.clone();
    let rollout = rec.rollout();
    let mut events = Vec::new();
    match outcome {
        Outcome::Wanted(want) => {
            if r.want != want {
                // Work ahead unless the wanted state is the applied one.
                let pending = match &want {
                    Some(w) if !w.remove => !r.applied_matches(w),
                    _ => r.applied.is_some(),
                };
                r.want = want;
                // A new rollout may be tried again, even of the same revision.
                r.rolled_back = None;
                if pending {
                    r.phase = Phase::Pending;
                    r.reason = None;
                    r.message = String::new();
                }
            }
        }
        Outcome::Fetching => {
            r.phase = Phase::Fetching;
            r.message = format!(
                "fetching {}",
                ShortRev::of(&r.wanted_revision().unwrap_or_default())
            );
        }
        Outcome::FetchFailed(problem) => {
            r.phase = Phase::Failed;
            r.reason = Some(problem.reason);
            r.message = problem.message.clone();
            events.push(EventData::FetchFailed(FetchFailed { rollout, problem }));
        }
        Outcome::Rejected {
            reason,
            message,
            detail,
        } => {
            r.phase = Phase::Failed;
            r.reason = Some(reason);
            r.message = message.clone();
            r.last_attempted_revision = r.wanted_revision();
            events.push(EventData::RolloutRejected(RolloutRejected {
                deployment: Some(rollout.deployment.clone()),
                sequence: Some(rollout.sequence).filter(|s| *s > 0),
                topic: None,
                revision: rollout.revision.clone(),
                scope: Some(rollout.scope.clone()).filter(|s| !s.is_empty()),
                reason,
                message,
                detail: detail.map(str::to_owned),
            }));
        }
        Outcome::Waiting {
            reason,
            next_window,
            waiting_for,
        } => {
            let changed = r.phase != Phase::Waiting
                || r.reason != Some(reason)
                || r.next_window != next_window
                || r.waiting_for != waiting_for;
            let message = match reason {
                Reason::Dependency => format!(
                    "fetched and built; waiting for {} to converge",
                    waiting_for.join(", ")
                ),
                _ => match &next_window {
                    Some(t) => format!("fetched and built; waiting for the window opening {t}"),
                    None => "fetched and built; no window opens within a year".to_owned(),
                },
            };
            r.phase = Phase::Waiting;
            r.reason = Some(reason);
            r.message = message.clone();
            r.next_window = next_window.clone();
            r.waiting_for = waiting_for.clone();
            if changed {
                events.push(EventData::Waiting(Waiting {
                    rollout,
                    reason,
                    message,
                    next_window,
                    waiting_for,
                }));
            }
        }
        Outcome::RolledBack {
            reason,
            message,
            pruned,
            inventory,
        } => {
            let failed = r.wanted_revision().unwrap_or_default();
            r.applied = r.last_good.clone();
            let restored = r
                .applied
                .as_ref()
                .map(|a| a.revision.clone())
                .unwrap_or_default();
            r.phase = Phase::RolledBack;
            r.reason = Some(reason);
            r.message = format!(
                "{} failed ({message}); {} restored",
                ShortRev::of(&failed),
                ShortRev::of(&restored)
            );
            r.drift.clear();
            r.inventory = inventory;
            r.inventory_known = true;
            r.reported = r.applied.as_ref().map(|a| a.revision.clone());
            r.rolled_back = r.want.as_ref().map(|w| w.rollout.clone());
            if !pruned.is_empty() {
                events.push(EventData::Pruned(Pruned {
                    rollout: rollout.clone(),
                    pruned,
                }));
            }
            events.push(EventData::RolledBack(RolledBack {
                rollout,
                failed_revision: failed,
                restored_revision: restored,
                reason,
                message,
            }));
        }
        Outcome::Staged { until } => {
            r.phase = Phase::Pending;
            r.reason = None;
            r.message = format!("staged; activates at {until}");
        }
        Outcome::ApplyStarted {
            objects,
            planned,
            recovered,
            fetch_ms,
            build_ms,
        } => {
            r.phase = Phase::Applying;
            r.reason = None;
            r.last_attempted_revision = r.wanted_revision();
            r.message = format!(
                "applying {}",
                ShortRev::of(&r.wanted_revision().unwrap_or_default())
            );
            // Before anything is written, the inventory holds everything this apply may
            // create, so a crash mid-apply never leaves an object roost forgets to prune.
            // Known digests stay until the apply succeeds.
            for o in recovered.into_iter().chain(planned) {
                if !r.inventory.iter().any(|e| e.object == o) {
                    r.inventory.push(InventoryEntry {
                        object: o,
                        digest: String::new(),
                    });
                }
            }
            r.inventory_known = true;
            events.push(EventData::ApplyStarted(ApplyStarted {
                rollout,
                objects,
                fetch_ms: Some(fetch_ms),
                build_ms: Some(build_ms),
            }));
        }
        Outcome::ApplyFailed(problem) => {
            r.phase = Phase::Failed;
            r.reason = Some(problem.reason);
            r.message = problem.message.clone();
            events.push(EventData::ApplyFailed(ApplyFailed { rollout, problem }));
        }
        Outcome::Applied {
            changed,
            unchanged,
            pruned,
            inventory,
        } => {
            r.applied = r.want.as_ref().and_then(|w| {
                Some(Applied {
                    revision: w.rollout.revision.clone()?,
                    url: w.url.clone(),
                    path: w.path.clone(),
                    context: w.context.clone(),
                })
            });
            r.phase = Phase::Progressing;
            r.reason = None;
            r.drift.clear();
            r.message = format!(
                "applied {}; waiting for health",
                ShortRev::of(&r.wanted_revision().unwrap_or_default())
            );
            r.inventory = inventory;
            r.inventory_known = true;
            events.push(EventData::ApplySucceeded(ApplySucceeded {
                rollout: rollout.clone(),
                changed,
                unchanged,
            }));
            if !pruned.is_empty() {
                events.push(EventData::Pruned(Pruned { rollout, pruned }));
            }
        }
        Outcome::Healthy => {
            r.last_good = r.applied.clone();
            r.phase = Phase::Converged;
            r.reason = None;
            r.message = String::new();
            r.reported = r.applied.as_ref().map(|a| a.revision.clone());
            events.push(EventData::Converged(Converged { rollout }));
        }
        Outcome::Unhealthy {
            reason,
            message,
            not_ready,
        } => {
            r.phase = Phase::Degraded;
            r.reason = Some(reason);
            r.message = message.clone();
            r.reported = r.applied.as_ref().map(|a| a.revision.clone());
            events.push(EventData::Degraded(Degraded {
                rollout,
                reason,
                message,
                not_ready,
            }));
        }
        Outcome::Drifted { items } => {
            if r.drift != items {
                r.drift = items.clone();
                r.reason = Some(Reason::Drift);
                r.message = format!("drift: {}", items.join(", "));
                events.push(EventData::DriftDetected(DriftDetected {
                    rollout,
                    reason: Reason::Drift,
                    message: "live state differs from the applied revision".into(),
                    items,
                }));
            }
        }
        Outcome::DriftCorrected { items } => {
            r.drift.clear();
            if r.reason == Some(Reason::Drift) {
                r.reason = None;
                r.message = String::new();
            }
            if r.phase == Phase::Failed {
                // A failed self-heal earlier; now the revision is back in place.
                r.phase = Phase::Converged;
                r.reason = None;
                r.message = String::new();
            }
            events.push(EventData::DriftCorrected(DriftCorrected { rollout, items }));
        }
        Outcome::InSync { healthy } => {
            if !r.drift.is_empty() {
                r.drift.clear();
                if r.reason == Some(Reason::Drift) {
                    r.reason = None;
                    r.message = String::new();
                }
            }
            // Back on the applied revision without an apply (a rollback to it before the
            // newer one was applied, or a restart): the phase follows its health.
            if matches!(
                r.phase,
                Phase::Pending | Phase::Fetching | Phase::Applying | Phase::Waiting
            ) {
                if healthy {
                    r.last_good = r.applied.clone();
                }
                r.phase = if healthy {
                    Phase::Converged
                } else {
                    Phase::Degraded
                };
                r.reason = None;
                r.message = String::new();
            }
        }
        Outcome::Removed { deleted } => {
            r.phase = Phase::Removed;
            r.applied = None;
            r.drift.clear();
            r.reason = None;
            r.message = String::new();
            r.inventory.clear();
            r.inventory_known = true;
            r.reported = None;
            if !deleted.is_empty() {
                events.push(EventData::Pruned(Pruned {
                    rollout: rollout.clone(),
                    pruned: deleted,
                }));
            }
            events.push(EventData::Removed(Removed { rollout }));
        }
    }
    if r.phase != Phase::Waiting {
        r.next_window = None;
        r.waiting_for.clear();
    }
    (r, events)
}

/// What the worker does next for a deployment (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing applied and nothing wanted.
    Idle,
    /// Remove what was applied.
    Remove,
    /// Fetch, build, apply, prune, check health.
    Reconcile,
    /// Applied, but its outcome was never reported (the agent stopped in between).
    ReportHealth,
    /// Applied and reported: watch for drift.
    InSync,
    /// The wanted revision failed and was rolled back: wait for a new rollout.
    HoldRollback,
}

/// Decides the next step from the record (whose `want` is current).
pub fn next_step(rec: &Record) -> Step {
    match &rec.want {
        Some(w) if !w.remove => {
            if rec.holds_rollback() {
                Step::HoldRollback
            } else if !rec.applied_matches(w) {
                Step::Reconcile
            } else if rec.reported.as_ref() != w.rollout.revision.as_ref() {
                Step::ReportHealth
            } else {
                Step::InSync
            }
        }
        _ => {
            if rec.applied.is_some() || (!rec.inventory.is_empty() && rec.phase != Phase::Removed) {
                Step::Remove
            } else {
                Step::Idle
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::EventType;

    fn want(rev: char, seq: u64) -> Want {
        Want {
            rollout: RolloutRef {
                deployment: "web".into(),
                revision: Some(rev.to_string().repeat(40)),
                sequence: seq,
                scope: "fleet".into(),
            },
            url: "git://h/r.git".into(),
            path: "apps/web".into(),
            remove: false,
            origin: None,
            context: None,
        }
    }

    fn obj(p: &str) -> ObjectRef {
        ObjectRef::File { path: p.into() }
    }

    fn problem(reason: Reason) -> Problem {
        Problem {
            reason,
            message: "m".into(),
            retryable: true,
            retry_in_ms: Some(1000),
        }
    }

    fn types(ev: &[EventData]) -> Vec<EventType> {
        ev.iter().map(EventData::event_type).collect()
    }

    /// Runs outcomes from a fresh record wanting `a`; returns the record and every event.
    fn run(outcomes: Vec<Outcome>) -> (Record, Vec<EventType>) {
        let mut r = Record::new("web");
        let mut all = Vec::new();
        for o in std::iter::once(Outcome::Wanted(Some(want('a', 1)))).chain(outcomes) {
            let (n, ev) = transition(&r, o);
            all.extend(types(&ev));
            r = n;
        }
        (r, all)
    }

    fn applied(changed: &[&str], inv: &[&str]) -> Outcome {
        Outcome::Applied {
            changed: changed.iter().map(|s| s.to_string()).collect(),
            unchanged: 0,
            pruned: vec![],
            inventory: inv
                .iter()
                .map(|p| InventoryEntry {
                    object: obj(p),
                    digest: "d".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn table() {
        use EventType as E;
        use Phase as P;
        // (name, outcomes after Wanted(a), phase, reason, events)
        type Case = (&'static str, Vec<Outcome>, P, Option<Reason>, Vec<E>);
        let cases: Vec<Case> = vec![
            ("wanted only", vec![], P::Pending, None, vec![]),
            (
                "fetching",
                vec![Outcome::Fetching],
                P::Fetching,
                None,
                vec![],
            ),
            (
                "fetch failed is retryable, not a rejection",
                vec![
                    Outcome::Fetching,
                    Outcome::FetchFailed(problem(Reason::FetchFailed)),
                ],
                P::Failed,
                Some(Reason::FetchFailed),
                vec![E::FetchFailed],
            ),
            (
                "rejected revision",
                vec![Outcome::Rejected {
                    reason: Reason::PolicyDenied,
                    message: "x".into(),
                    detail: None,
                }],
                P::Failed,
                Some(Reason::PolicyDenied),
                vec![E::RolloutRejected],
            ),
            (
                "target unavailable during build is apply.failed, never rejected",
                vec![Outcome::ApplyFailed(problem(Reason::TargetUnavailable))],
                P::Failed,
                Some(Reason::TargetUnavailable),
                vec![E::ApplyFailed],
            ),
            (
                "happy path",
                vec![
                    Outcome::Fetching,
                    Outcome::ApplyStarted {
                        objects: 1,
                        planned: vec![obj("a")],
                        recovered: vec![],
                        fetch_ms: 0,
                        build_ms: 0,
                    },
                    applied(&["a"], &["a"]),
                    Outcome::Healthy,
                ],
                P::Converged,
                None,
                vec![E::ApplyStarted, E::ApplySucceeded, E::Converged],
            ),
            (
                "prune failure leaves Failed, not Converged",
                vec![
                    Outcome::ApplyStarted {
                        objects: 1,
                        planned: vec![obj("a")],
                        recovered: vec![],
                        fetch_ms: 0,
                        build_ms: 0,
                    },
                    Outcome::ApplyFailed(problem(Reason::PruneFailed)),
                ],
                P::Failed,
                Some(Reason::PruneFailed),
                vec![E::ApplyStarted, E::ApplyFailed],
            ),
            (
                "degraded",
                vec![
                    Outcome::ApplyStarted {
                        objects: 1,
                        planned: vec![obj("a")],
                        recovered: vec![],
                        fetch_ms: 0,
                        build_ms: 0,
                    },
                    applied(&["a"], &["a"]),
                    Outcome::Unhealthy {
                        reason: Reason::HealthTimeout,
                        message: "m".into(),
                        not_ready: vec!["a".into()],
                    },
                ],
                P::Degraded,
                Some(Reason::HealthTimeout),
                vec![E::ApplyStarted, E::ApplySucceeded, E::Degraded],
            ),
            (
                "drift reported once per distinct finding, then corrected",
                vec![
                    applied(&["a"], &["a"]),
                    Outcome::Healthy,
                    Outcome::Drifted {
                        items: vec!["a: modified".into()],
                    },
                    Outcome::Drifted {
                        items: vec!["a: modified".into()],
                    },
                    Outcome::DriftCorrected {
                        items: vec!["a: modified".into()],
                    },
                ],
                P::Converged,
                None,
                vec![
                    E::ApplySucceeded,
                    E::Converged,
                    E::DriftDetected,
                    E::DriftCorrected,
                ],
            ),
            (
                "drift cleared by hand",
                vec![
                    applied(&["a"], &["a"]),
                    Outcome::Healthy,
                    Outcome::Drifted {
                        items: vec!["a: modified".into()],
                    },
                    Outcome::InSync { healthy: true },
                ],
                P::Converged,
                None,
                vec![E::ApplySucceeded, E::Converged, E::DriftDetected],
            ),
            (
                "removed",
                vec![
                    applied(&["a"], &["a"]),
                    Outcome::Healthy,
                    Outcome::Removed {
                        deleted: vec!["a".into()],
                    },
                ],
                P::Removed,
                None,
                vec![E::ApplySucceeded, E::Converged, E::Pruned, E::Removed],
            ),
        ];
        for (name, outcomes, phase, reason, events) in cases {
            let (r, ev) = run(outcomes);
            assert_eq!(r.phase, phase, "{name}: phase");
            assert_eq!(r.reason, reason, "{name}: reason");
            assert_eq!(ev, events, "{name}: events");
            assert_eq!(r.status().phase, phase, "{name}: the status is the record");
        }
    }

    #[test]
    fn ledgers_move_together() {
        let (r, _) = run(vec![Outcome::ApplyStarted {
            objects: 2,
            planned: vec![obj("a"), obj("b")],
            recovered: vec![obj("old")],
            fetch_ms: 0,
            build_ms: 0,
        }]);
        assert_eq!(r.last_attempted_revision, Some("a".repeat(40)));
        assert!(
            r.applied.is_none(),
            "not applied until apply and prune finished"
        );
        let inv: Vec<String> = r.inventory.iter().map(|e| e.object.to_string()).collect();
        assert_eq!(
            inv,
            vec!["old", "a", "b"],
            "inventory holds what may be written"
        );
        let (r, ev) = transition(&r, applied(&["a"], &["a", "b"]));
        assert_eq!(
            r.applied.as_ref().map(|a| a.revision.clone()),
            Some("a".repeat(40))
        );
        assert_eq!(r.status().applied_revision, Some("a".repeat(40)));
        assert_eq!(r.reported, None);
        assert_eq!(
            next_step(&r),
            Step::ReportHealth,
            "outcome not reported yet"
        );
        let EventData::ApplySucceeded(s) = &ev[0] else {
            panic!("apply.succeeded first")
        };
        assert_eq!(s.rollout.sequence, 1);
        let (r, _) = transition(&r, Outcome::Healthy);
        assert_eq!(r.reported, Some("a".repeat(40)));
        assert_eq!(next_step(&r), Step::InSync);
    }

    #[test]
    fn next_steps() {
        let mut r = Record::new("web");
        assert_eq!(next_step(&r), Step::Idle);
        r = transition(&r, Outcome::Wanted(Some(want('a', 1)))).0;
        assert_eq!(next_step(&r), Step::Reconcile);
        r = transition(&r, applied(&["a"], &["a"])).0;
        r = transition(&r, Outcome::Healthy).0;
        assert_eq!(next_step(&r), Step::InSync);
        // A new revision: reconcile; the status keeps the applied one meanwhile.
        r = transition(&r, Outcome::Wanted(Some(want('b', 2)))).0;
        assert_eq!(next_step(&r), Step::Reconcile);
        assert_eq!(r.phase, Phase::Pending);
        assert_eq!(r.status().applied_revision, Some("a".repeat(40)));
        // Back to the applied one (a rollback before b was applied): in sync again.
        r = transition(&r, Outcome::Wanted(Some(want('a', 3)))).0;
        assert_eq!(next_step(&r), Step::InSync);
        r = transition(&r, Outcome::InSync { healthy: true }).0;
        assert_eq!(
            r.phase,
            Phase::Converged,
            "phase restored by the first drift check"
        );
        // A tombstone: remove; after removal idle.
        let mut tomb = want('a', 4);
        tomb.remove = true;
        r = transition(&r, Outcome::Wanted(Some(tomb))).0;
        assert_eq!(next_step(&r), Step::Remove);
        assert_eq!(r.status().desired, None, "a tombstone wants nothing");
        r = transition(&r, Outcome::Removed { deleted: vec![] }).0;
        assert_eq!(next_step(&r), Step::Idle);
        assert_eq!(r.status().applied_revision, None);
    }

    #[test]
    fn the_status_echoes_the_rollouts_origin() {
        let origin = Origin {
            repo: "https://git.example/fleet-config.git".into(),
            commit: "f".repeat(40),
            path: "roost.yaml".into(),
        };
        let rollout = roost_schemas::Rollout {
            schedule: Default::default(),
            deployment: "web".into(),
            scope: roost_schemas::Scope::Group("canary".into()),
            sequence: 9,
            issued_at: "2026-12-01T00:00:00Z".into(),
            source: Some(roost_schemas::Source {
                url: "git://h/r.git".into(),
                revision: "a".repeat(40),
                path: "./apps/web/".into(),
            }),
            not_before: None,
            policy: roost_schemas::Policy::default(),
            remove: false,
            origin: Some(origin.clone()),
        };
        let w = crate::reconcile::want_of(&crate::decide::Desired::Apply {
            rollout: Box::new(rollout),
            context: None,
        })
        .expect("want");
        assert_eq!(w.origin.as_ref(), Some(&origin));
        assert_eq!(w.path, "apps/web");
        let r = transition(&Record::new("web"), Outcome::Wanted(Some(w))).0;
        let desired = r.status().desired.expect("desired");
        assert_eq!(desired.scope, "group:canary");
        assert_eq!(desired.origin, Some(origin));
        // A record stored by an older agent (no origin) still loads, and echoes none.
        let mut old = serde_json::to_value(&r).expect("json");
        old["want"]
            .as_object_mut()
            .expect("want object")
            .remove("origin");
        let old: Record = serde_json::from_value(old).expect("old record parses");
        assert_eq!(old.status().desired.expect("desired").origin, None);
    }

    /// A deployment whose rendering reads the store context is rendered and applied again
    /// when the context changes (a new var, label, time zone or group), and only then; one
    /// that reads none is left alone by a new profile. Records from before the context was
    /// recorded still match.
    #[test]
    fn a_new_store_context_renders_again_only_what_reads_it() {
        let with = |context: Option<&str>| Want {
            context: context.map(str::to_owned),
            ..want('a', 1)
        };
        let mut r = Record::new("web");
        r = transition(&r, Outcome::Wanted(Some(with(Some("ctx1"))))).0;
        r = transition(&r, applied(&["a"], &["a"])).0;
        r = transition(&r, Outcome::Healthy).0;
        assert_eq!(next_step(&r), Step::InSync);
        assert_eq!(
            r.applied.as_ref().and_then(|a| a.context.as_deref()),
            Some("ctx1")
        );
        // The same revision, a new context: render and apply again.
        r = transition(&r, Outcome::Wanted(Some(with(Some("ctx2"))))).0;
        assert_eq!(next_step(&r), Step::Reconcile);
        assert_eq!(r.phase, Phase::Pending);
        r = transition(&r, applied(&[], &["a"])).0;
        r = transition(&r, Outcome::Healthy).0;
        assert_eq!(next_step(&r), Step::InSync);
        // No context on either side: nothing to do.
        let mut plain = Record::new("web");
        plain = transition(&plain, Outcome::Wanted(Some(with(None)))).0;
        plain = transition(&plain, applied(&["a"], &["a"])).0;
        plain = transition(&plain, Outcome::Healthy).0;
        let again = transition(&plain, Outcome::Wanted(Some(with(None)))).0;
        assert_eq!(
            (next_step(&again), again.phase),
            (Step::InSync, Phase::Converged)
        );
        // A record written before contexts existed loads with none.
        let mut old = serde_json::to_value(&plain).expect("json");
        old["applied"]
            .as_object_mut()
            .expect("applied")
            .remove("context");
        let old: Record = serde_json::from_value(old).expect("old record parses");
        assert_eq!(next_step(&old), Step::InSync);
    }

    #[test]
    fn record_survives_serialization() {
        let (r, _) = run(vec![applied(&["a"], &["a"]), Outcome::Healthy]);
        let back: Record =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parse");
        assert_eq!(back, r);
    }
}
