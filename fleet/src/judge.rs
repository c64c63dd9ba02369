//! The one convergence judgement: what a store's report of one deployment says of a wanted
//! revision (or of one rollout of it), and whether the cloud may believe it now. Pure; the
//! fleet view ([`crate::view`]), the wave engine ([`crate::gitops::plan`]) and `roost rollout
//! --wait` ([`crate::rollout_wait`]) all judge with [`verdict`].
//!
//! | the store's report of the deployment | fresh store | stale store |
//! |---|---|---|
//! | `Converged`, applied the wanted revision | `Converged` | `Stale` (last: converged) |
//! | `Degraded` on it, or `Failed` on it for a reason the agent does not retry | `Failed` | `Stale` (last: failed) |
//! | `RolledBack` from it (`failed_revision`): the store restored its last good revision | `Failed` (reason `rolled_back`) | `Stale` (last: failed) |
//! | `Waiting` with it desired: for its operating window or its dependencies | `Waiting` (deferred: neither failed nor blocking) | `Stale` (last: waiting) |
//! | anything else, a retried failure (`fetch_failed`, `target_unavailable`), no report | `Pending` | `Stale` (last: pending) |
//!
//! "On it": for a wanted revision, `Converged` and `Degraded` speak of the applied revision and
//! `Failed` of the last attempted one; for a rollout, the report counts only while the store
//! wants that rollout (its scope and sequence), and then its phase is about it. A stale store
//! is never `Converged`: the view shows it `Stale`; the plan and the wait, which ask what a
//! store made of a release, read what it last reported ([`Verdict::reported`]), so a failure
//! a store reported before it went offline still stops a plan.

use roost_schemas::{DeploymentStatus, Phase, PresenceState};

/// How long a store may stay silent: `heartbeat × 2.5 + 5 s` (two heartbeats may be lost or
/// queued behind a slow link before the store is called stale).
pub fn allowed_silence_s(heartbeat_s: u64) -> u64 {
    heartbeat_s.saturating_mul(5) / 2 + 5
}

/// Whether a store has been silent for longer than its heartbeat allows (never heard:
/// silent).
pub fn silent(last_heard_s: Option<u64>, heartbeat_s: u64, now_s: u64) -> bool {
    match last_heard_s {
        None => true,
        Some(t) => now_s.saturating_sub(t) > allowed_silence_s(heartbeat_s),
    }
}

/// The one presence rule, for every view (status, API, dashboard, metrics, `rollout --wait`,
/// wave gates): a store is online when its retained presence does not say offline **and** it
/// has been heard within its heartbeat allowance. A retained "online" is not enough: a
/// broker node that dies takes its clients' last wills with it (nats-server does not publish
/// them), so a store behind it would otherwise stay "online" forever. No presence document
/// (a store without a bridge) counts as online while the store is heard.
pub fn online(
    reported: Option<PresenceState>,
    last_heard_s: Option<u64>,
    heartbeat_s: u64,
    now_s: u64,
) -> bool {
    reported != Some(PresenceState::Offline) && !silent(last_heard_s, heartbeat_s, now_s)
}

/// Reasons of a `Failed` phase that the agent retries by itself (the network, the API
/// server): not the end of a rollout.
pub const RETRIED: [&str; 2] = ["fetch_failed", "target_unavailable"];

/// What is known of one store for one deployment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report<'a> {
    /// The deployment's entry in the store's status document (None: not reported).
    pub status: Option<&'a DeploymentStatus>,
    /// The store's report cannot be believed now: by the fleet view's stale rule
    /// ([`crate::view::staleness`]: offline, silent for longer than its heartbeat allows,
    /// desired state not confirmed fresh, no status yet), or, where the caller knows only the
    /// store's presence (the controller's store list, `rollout --wait`), not online.
    pub stale: bool,
}

/// What the report is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The commit the store should run.
    pub revision: &'a str,
    /// One rollout of it (scope key and sequence), when the question is what the store made
    /// of that message: the report counts only while the store wants that rollout.
    pub rollout: Option<(&'a str, u64)>,
}

impl<'a> Wanted<'a> {
    /// Judged against a revision, whichever rollout brought it.
    pub fn revision(revision: &'a str) -> Wanted<'a> {
        Wanted {
            revision,
            rollout: None,
        }
    }
}

/// What a store's last report says of the wanted revision, believable now or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// Converged on it.
    Converged,
    /// Finished badly on it: degraded, or failed for a reason the agent does not retry.
    Failed {
        /// Reason code (or `degraded` / `failed`).
        reason: String,
        /// Detail (or the phase).
        message: String,
    },
    /// Fetched and built, waiting to apply it: for its window or its dependencies.
    Waiting(Wait),
    /// Not there (yet): working on it, on another revision, retrying, or no report.
    Pending,
}

/// Why a store waits to apply the wanted revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Wait {
    /// `window` or `dependency`.
    pub reason: String,
    /// When its window opens (RFC 3339, store offset), for `window`.
    pub next_window: Option<String>,
    /// The deployments it waits for, for `dependency`.
    pub waiting_for: Vec<String>,
}

impl Wait {
    /// For humans: `window until 2026-12-07T02:00:00-05:00`, `dependency on crds`.
    pub fn describe(&self) -> String {
        match (&self.next_window, self.waiting_for.is_empty()) {
            (Some(t), _) => format!("{} until {t}", self.reason),
            (None, false) => format!("{} on {}", self.reason, self.waiting_for.join(", ")),
            (None, true) => self.reason.clone(),
        }
    }
}

/// The judgement on one store for one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Converged on the wanted revision, and the store is fresh.
    Converged,
    /// Finished badly on the wanted revision, and the store is fresh.
    Failed {
        /// Reason code (or `degraded` / `failed`).
        reason: String,
        /// Detail (or the phase).
        message: String,
    },
    /// Waiting to apply it (window, dependencies), and the store is fresh.
    Waiting(Wait),
    /// Working on it or not there yet, and the store is fresh.
    Pending,
    /// The store's report cannot be believed now: never converged.
    Stale {
        /// What its last report says.
        last: Reported,
    },
}

impl Verdict {
    /// What the store's last report says, whether or not it can be believed now.
    pub fn reported(&self) -> Reported {
        match self {
            Verdict::Converged => Reported::Converged,
            Verdict::Failed { reason, message } => Reported::Failed {
                reason: reason.clone(),
                message: message.clone(),
            },
            Verdict::Waiting(w) => Reported::Waiting(w.clone()),
            Verdict::Pending => Reported::Pending,
            Verdict::Stale { last } => last.clone(),
        }
    }

    /// The store's report cannot be believed now.
    pub fn is_stale(&self) -> bool {
        matches!(self, Verdict::Stale { .. })
    }
}

/// Judges a store's report of a deployment against what is wanted (the table in the
/// module's documentation).
pub fn verdict(report: &Report<'_>, wanted: &Wanted<'_>) -> Verdict {
    let last = reported(report.status, wanted);
    if report.stale {
        return Verdict::Stale { last };
    }
    match last {
        Reported::Converged => Verdict::Converged,
        Reported::Failed { reason, message } => Verdict::Failed { reason, message },
        Reported::Waiting(w) => Verdict::Waiting(w),
        Reported::Pending => Verdict::Pending,
    }
}

fn reported(status: Option<&DeploymentStatus>, wanted: &Wanted<'_>) -> Reported {
    let Some(d) = status else {
        return Reported::Pending;
    };
    let is_wanted = |rev: &Option<String>| rev.as_deref() == Some(wanted.revision);
    // Whether a Degraded (applied) or Failed (attempted) phase is about the wanted revision:
    // for a rollout, the store wants that rollout; else the revision the phase names.
    let (applied_it, attempted_it) = match wanted.rollout {
        Some((scope, sequence)) => {
            let wants_it = d
                .desired
                .as_ref()
                .is_some_and(|w| w.scope == scope && w.sequence == sequence);
            if !wants_it {
                return Reported::Pending;
            }
            (true, true)
        }
        None => (
            is_wanted(&d.applied_revision),
            is_wanted(&d.last_attempted_revision),
        ),
    };
    let failed = |fallback: &str| Reported::Failed {
        reason: d.reason.clone().unwrap_or_else(|| fallback.to_owned()),
        message: if d.message.is_empty() {
            d.phase.as_str().to_owned()
        } else {
            d.message.clone()
        },
    };
    let retried = d.reason.as_deref().is_some_and(|r| RETRIED.contains(&r));
    let desires_it = match wanted.rollout {
        Some(_) => true,
        None => d
            .desired
            .as_ref()
            .is_some_and(|w| w.revision == wanted.revision),
    };
    let rolled_back_from_it = match wanted.rollout {
        Some(_) => true,
        None => is_wanted(&d.failed_revision),
    };
    match d.phase {
        Phase::Converged if is_wanted(&d.applied_revision) => Reported::Converged,
        Phase::RolledBack if rolled_back_from_it => Reported::Failed {
            reason: "rolled_back".to_owned(),
            message: if d.message.is_empty() {
                format!("rolled back ({})", d.reason.as_deref().unwrap_or("failed"))
            } else {
                format!("rolled back: {}", d.message)
            },
        },
        Phase::Waiting if desires_it => Reported::Waiting(Wait {
            reason: d.reason.clone().unwrap_or_else(|| "window".to_owned()),
            next_window: d.next_window.clone(),
            waiting_for: d.waiting_for.clone(),
        }),
        Phase::Degraded if applied_it => failed("degraded"),
        Phase::Failed if attempted_it && !retried => failed("failed"),
        _ => Reported::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_needs_presence_and_a_recent_word() {
        use PresenceState::{Offline, Online};
        // (presence, last heard, heartbeat, now, online?)
        let cases = [
            (Some(Online), Some(100), 10, 110, true),
            (Some(Online), Some(100), 10, 130, true), // 30 s = the allowance (10 × 2.5 + 5)
            (Some(Online), Some(100), 10, 131, false), // its node died: no will, silent
            (Some(Offline), Some(100), 10, 101, false),
            (None, Some(100), 10, 110, true), // no bridge: heard is enough
            (None, None, 10, 110, false),
            (Some(Online), None, 10, 110, false),
        ];
        for (p, heard, hb, now, want) in cases {
            assert_eq!(
                online(p, heard, hb, now),
                want,
                "{p:?} {heard:?} {hb} {now}"
            );
        }
    }
    use roost_schemas::DesiredRef;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// A report: phase, applied, last attempted, reason; it wants B by `group:canary` 20.
    fn st(phase: Phase, applied: &str, attempted: &str, reason: Option<&str>) -> DeploymentStatus {
        let rev = |r: &str| (!r.is_empty()).then(|| r.to_owned());
        DeploymentStatus {
            desired: Some(DesiredRef {
                revision: B.into(),
                sequence: 20,
                scope: "group:canary".into(),
                origin: None,
            }),
            applied_revision: rev(applied),
            last_attempted_revision: rev(attempted),
            phase,
            reason: reason.map(str::to_owned),
            message: "m".into(),
            ..Default::default()
        }
    }

    #[test]
    fn waiting_is_neither_failed_nor_converged_and_rolled_back_is_failed() {
        let fresh = |d: &DeploymentStatus| {
            verdict(
                &Report {
                    status: Some(d),
                    stale: false,
                },
                &Wanted::revision(B),
            )
        };
        let mut w = st(Phase::Waiting, A, A, Some("window"));
        w.next_window = Some("2026-12-07T02:00:00-05:00".into());
        let Verdict::Waiting(wait) = fresh(&w) else {
            panic!("{:?}", fresh(&w));
        };
        assert_eq!(wait.describe(), "window until 2026-12-07T02:00:00-05:00");
        // Waiting for another revision than the wanted one: pending.
        let mut other = w.clone();
        if let Some(d) = other.desired.as_mut() {
            d.revision = A.into();
        }
        assert_eq!(fresh(&other), Verdict::Pending);
        let mut dep = st(Phase::Waiting, "", "", Some("dependency"));
        dep.waiting_for = vec!["crds".into()];
        assert!(matches!(fresh(&dep), Verdict::Waiting(w) if w.describe() == "dependency on crds"));
        // Stale: what it last said.
        let stale = verdict(
            &Report {
                status: Some(&w),
                stale: true,
            },
            &Wanted::revision(B),
        );
        assert!(matches!(stale.reported(), Reported::Waiting(_)));
        // Rolled back from B to A: failed, reason rolled_back.
        let mut rb = st(Phase::RolledBack, A, B, Some("hook_failed"));
        rb.failed_revision = Some(B.into());
        assert!(matches!(fresh(&rb), Verdict::Failed { reason, .. } if reason == "rolled_back"));
        // Rolled back from another revision: not about B.
        rb.failed_revision = Some(A.into());
        assert_eq!(fresh(&rb), Verdict::Pending);
    }

    fn failed(reason: &str) -> Reported {
        Reported::Failed {
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn against_a_revision() {
        use Reported::{Converged, Pending};
        let cases: Vec<(DeploymentStatus, Reported)> = vec![
            (st(Phase::Converged, B, B, None), Converged),
            // Drift does not undo convergence (self-heal is the agent's business).
            (
                DeploymentStatus {
                    drift: true,
                    ..st(Phase::Converged, B, B, None)
                },
                Converged,
            ),
            (st(Phase::Converged, A, A, None), Pending),
            (
                st(Phase::Degraded, B, B, Some("health_timeout")),
                failed("health_timeout"),
            ),
            (st(Phase::Degraded, A, A, Some("health_timeout")), Pending),
            (
                st(Phase::Failed, A, B, Some("invalid_manifest")),
                failed("invalid_manifest"),
            ),
            (
                st(Phase::Failed, A, B, Some("apply_failed")),
                failed("apply_failed"),
            ),
            // Retried by the agent: not the end.
            (st(Phase::Failed, A, B, Some("target_unavailable")), Pending),
            (st(Phase::Failed, A, B, Some("fetch_failed")), Pending),
            // A failure of another revision says nothing of this one.
            (st(Phase::Failed, B, A, Some("invalid_manifest")), Pending),
            (st(Phase::Applying, A, B, None), Pending),
            (st(Phase::Pending, A, A, None), Pending),
            (st(Phase::Removed, "", B, None), Pending),
        ];
        for (s, want) in cases {
            let r = Report {
                status: Some(&s),
                stale: false,
            };
            assert_eq!(verdict(&r, &Wanted::revision(B)).reported(), want, "{s:?}");
        }
        assert_eq!(
            verdict(&Report::default(), &Wanted::revision(B)),
            Verdict::Pending
        );
    }

    #[test]
    fn against_a_rollout() {
        use Reported::{Converged, Pending};
        let ours = Wanted {
            revision: B,
            rollout: Some(("group:canary", 20)),
        };
        let other_seq = Wanted {
            revision: B,
            rollout: Some(("group:canary", 19)),
        };
        let other_scope = Wanted {
            revision: B,
            rollout: Some(("fleet", 20)),
        };
        let cases: Vec<(DeploymentStatus, &Wanted, Reported)> = vec![
            (st(Phase::Converged, B, B, None), &ours, Converged),
            // Converged, but not yet on the revision.
            (st(Phase::Converged, A, A, None), &ours, Pending),
            // While it wants our rollout, its failure is about it.
            (
                st(Phase::Failed, A, A, Some("invalid_manifest")),
                &ours,
                failed("invalid_manifest"),
            ),
            (st(Phase::Failed, A, "", None), &ours, failed("failed")),
            (st(Phase::Degraded, A, A, None), &ours, failed("degraded")),
            (
                st(Phase::Failed, A, A, Some("fetch_failed")),
                &ours,
                Pending,
            ),
            // Another rollout (sequence or scope) is what it wants: nothing of ours.
            (st(Phase::Converged, B, B, None), &other_seq, Pending),
            (
                st(Phase::Failed, A, B, Some("invalid_manifest")),
                &other_scope,
                Pending,
            ),
        ];
        for (s, wanted, want) in cases {
            let r = Report {
                status: Some(&s),
                stale: false,
            };
            assert_eq!(verdict(&r, wanted).reported(), want, "{s:?} {wanted:?}");
        }
    }

    #[test]
    fn a_stale_store_is_never_converged_and_keeps_what_it_reported() {
        let conv = st(Phase::Converged, B, B, None);
        let fail = st(Phase::Failed, A, B, Some("invalid_manifest"));
        let busy = st(Phase::Applying, A, B, None);
        let judge = |s: Option<&DeploymentStatus>, stale: bool| {
            verdict(&Report { status: s, stale }, &Wanted::revision(B))
        };
        assert_eq!(judge(Some(&conv), false), Verdict::Converged);
        assert_eq!(
            judge(Some(&conv), true),
            Verdict::Stale {
                last: Reported::Converged
            }
        );
        assert!(matches!(judge(Some(&fail), false), Verdict::Failed { .. }));
        assert_eq!(
            judge(Some(&fail), true),
            Verdict::Stale {
                last: failed("invalid_manifest")
            }
        );
        assert_eq!(judge(Some(&busy), false), Verdict::Pending);
        assert_eq!(
            judge(Some(&busy), true),
            Verdict::Stale {
                last: Reported::Pending
            }
        );
        assert_eq!(
            judge(None, true),
            Verdict::Stale {
                last: Reported::Pending
            }
        );
        for stale in [false, true] {
            for s in [&conv, &fail, &busy] {
                assert_eq!(judge(Some(s), stale).is_stale(), stale);
            }
        }
    }
}
