//! Typed `data` of every roost event: one struct per event type, shared by everyone who
//! writes or reads events (the agent, the bridge, `roost fleet`, `roost up`, `roost sim`), so
//! that a field is named once. [`CloudEvent::typed`] reads one back; [`EventData`] builds one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{CloudEvent, EventType, Reason, Rollout};

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Which rollout a deployment event is about (every deployment event carries these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RolloutRef {
    /// Deployment name.
    pub deployment: String,
    /// The desired commit (absent for a tombstone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The rollout's sequence (0 = none: a deployment no scope names any more).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub sequence: u64,
    /// The rollout's scope key (`fleet`, `group:G`, `store:S`).
    #[serde(default)]
    pub scope: String,
}

impl RolloutRef {
    /// The reference of a rollout.
    pub fn of(r: &Rollout) -> RolloutRef {
        RolloutRef {
            deployment: r.deployment.clone(),
            revision: r.source.as_ref().map(|s| s.revision.clone()),
            sequence: r.sequence,
            scope: r.scope.key(),
        }
    }
}

/// A problem: its stable reason code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Reason code.
    pub reason: Reason,
    /// What happened.
    pub message: String,
    /// Whether the agent retries by itself (transient: network, API server unavailable).
    #[serde(default)]
    pub retryable: bool,
    /// When it retries, in milliseconds from the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

/// Implemented by every event payload: which type it is.
pub trait EventPayload: Serialize + DeserializeOwned {
    /// The event type this payload belongs to.
    const TYPE: EventType;
}

macro_rules! payload {
    ($(#[$m:meta])* $name:ident => $ty:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name { $($body)* }
        impl EventPayload for $name {
            const TYPE: EventType = EventType::$ty;
        }
    };
}

payload!(
    /// `dev.roost.rollout.received`: a verified envelope was accepted (stored).
    RolloutReceived => RolloutReceived {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// A tombstone.
        #[serde(default)]
        pub remove: bool,
        /// Staged activation time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub not_before: Option<String>,
    }
);

payload!(
    /// `dev.roost.rollout.rejected`: a message or revision that will never be applied.
    RolloutRejected => RolloutRejected {
        /// Deployment, when the message named one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deployment: Option<String>,
        /// Sequence, when readable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sequence: Option<u64>,
        /// The topic it came on (message rejections).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub topic: Option<String>,
        /// The revision (revision rejections: invalid manifest, policy).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub revision: Option<String>,
        /// Scope key, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub scope: Option<String>,
        /// Why.
        pub reason: Reason,
        /// What exactly.
        pub message: String,
        /// A finer, stable cause under `reason` (see [`crate::reason::detail`]), e.g.
        /// `secret_not_for_this_store`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub detail: Option<String>,
    }
);

payload!(
    /// `dev.roost.fetch.failed`: the revision could not be fetched (retried).
    FetchFailed => FetchFailed {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Why.
        #[serde(flatten)]
        pub problem: Problem,
    }
);

payload!(
    /// `dev.roost.apply.started`.
    ApplyStarted => ApplyStarted {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Objects in the revision.
        #[serde(default)]
        pub objects: u64,
        /// How long fetching the revision took (ms; 0 when it was cached).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub fetch_ms: Option<u64>,
        /// How long rendering and building the plan took (ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub build_ms: Option<u64>,
    }
);

payload!(
    /// `dev.roost.apply.succeeded`: every object of the revision is applied.
    ApplySucceeded => ApplySucceeded {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Objects written (created or changed), by key.
        pub changed: Vec<String>,
        /// Objects already as desired (not written).
        #[serde(default)]
        pub unchanged: u64,
    }
);

payload!(
    /// `dev.roost.apply.failed`: apply, prune or removal failed.
    ApplyFailed => ApplyFailed {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Why.
        #[serde(flatten)]
        pub problem: Problem,
    }
);

payload!(
    /// `dev.roost.converged`: applied and healthy.
    Converged => Converged {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
    }
);

payload!(
    /// `dev.roost.degraded`: applied, not healthy within the health timeout.
    Degraded => Degraded {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Why (`health_timeout`, `hook_failed`).
        pub reason: Reason,
        /// What.
        pub message: String,
        /// Objects not ready, with why.
        pub not_ready: Vec<String>,
    }
);

payload!(
    /// `dev.roost.drift.detected`: live state differs from the applied revision.
    DriftDetected => DriftDetected {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Always `drift`.
        pub reason: Reason,
        /// What.
        pub message: String,
        /// Objects and field paths that differ.
        pub items: Vec<String>,
    }
);

payload!(
    /// `dev.roost.drift.corrected`: self-heal re-applied the revision.
    DriftCorrected => DriftCorrected {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// What was corrected.
        pub items: Vec<String>,
    }
);

payload!(
    /// `dev.roost.pruned`: objects of an earlier revision deleted.
    Pruned => Pruned {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// Deleted objects, by key.
        pub pruned: Vec<String>,
    }
);

payload!(
    /// `dev.roost.removed`: no scope wants the deployment; everything of it is gone.
    Removed => Removed {
        /// The tombstone (or the deployment only).
        #[serde(flatten)]
        pub rollout: RolloutRef,
    }
);

payload!(
    /// `dev.roost.outbox.overflow`: events dropped at the outbox cap, exactly which.
    OutboxOverflow => OutboxOverflow {
        /// Always `outbox_overflow`.
        pub reason: Reason,
        /// What.
        pub message: String,
        /// Messages dropped (events and others).
        #[serde(default)]
        pub dropped_messages: u64,
        /// Events lost (sum of the ranges).
        pub lost_count: u64,
        /// First lost roostseq.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub lost_from_roostseq: Option<u64>,
        /// Last lost roostseq.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub lost_to_roostseq: Option<u64>,
        /// Disjoint, sorted `[from, to]` ranges of lost roostseqs.
        #[serde(default)]
        pub lost_ranges: Vec<[u64; 2]>,
    }
);

/// One desired-state topic the fleet snapshot lists newer than the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StaleTopic {
    /// The deployment topic.
    pub topic: String,
    /// The sequence the snapshot lists.
    pub listed: u64,
    /// The sequence the agent holds (accepted); absent: it holds nothing there (withheld).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
}

payload!(
    /// `dev.roost.desired.stale`: the signed fleet snapshot lists newer desired state than
    /// the agent holds (`desired_stale`, with the topics), or the last snapshot expired
    /// (`snapshot_expired`, no topics). Reported once per change; nothing is applied
    /// because of it.
    DesiredStale => DesiredStale {
        /// `desired_stale` or `snapshot_expired`.
        pub reason: Reason,
        /// What.
        pub message: String,
        /// The snapshot's sequence.
        pub snapshot_sequence: u64,
        /// When the snapshot was issued.
        pub snapshot_issued_at: String,
        /// When it expires.
        pub snapshot_expires: String,
        /// The topics listed newer than held (sorted by topic).
        #[serde(default)]
        pub topics: Vec<StaleTopic>,
    }
);

payload!(
    /// `dev.roost.profile.accepted`: a verified store profile with a sequence greater than
    /// the last accepted one; its groups are the store's precedence from now on. Names what
    /// changed, never the values of labels or vars.
    ProfileAccepted => ProfileAccepted {
        /// The profile's sequence.
        pub sequence: u64,
        /// The groups in force from now on, in precedence order.
        pub groups: Vec<String>,
        /// The groups in force before (the configured ones before the first profile).
        pub previous_groups: Vec<String>,
        /// What differs from the store context in force before (the configured one before
        /// the first profile): `groups`, `labels`, `vars`, `timezone`.
        #[serde(default)]
        pub changed: Vec<String>,
    }
);

payload!(
    /// `dev.roost.profile.rejected`: a message on the store's profile topic that was refused;
    /// the profile in force stays, and nothing is applied because of it.
    ProfileRejected => ProfileRejected {
        /// The topic it came on.
        pub topic: String,
        /// Its sequence, when readable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sequence: Option<u64>,
        /// Why.
        pub reason: Reason,
        /// What exactly.
        pub message: String,
    }
);

payload!(
    /// `dev.roost.waiting`: the revision is fetched and built and waits to be applied, for
    /// its operating window (`reason: window`, `next_window`) or for the deployments it
    /// depends on (`reason: dependency`, `waiting_for`). Reported once per change.
    Waiting => Waiting {
        /// The rollout.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// `window` or `dependency`.
        pub reason: Reason,
        /// What.
        pub message: String,
        /// When the next window opens, store time as RFC 3339 with the store's offset
        /// (`reason: window`; absent when no window ever opens again).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next_window: Option<String>,
        /// The deployments not yet Converged on the store (`reason: dependency`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub waiting_for: Vec<String>,
    }
);

payload!(
    /// `dev.roost.rolled_back`: the revision failed (`reason`: an apply error, or health not
    /// reached within `health_timeout_s`) and, under `policy.on_failure: rollback`, the last
    /// revision that converged on the store was applied again. The failed revision is not
    /// retried until a new rollout arrives.
    RolledBack => RolledBack {
        /// The rollout whose revision failed.
        #[serde(flatten)]
        pub rollout: RolloutRef,
        /// The revision that failed.
        pub failed_revision: String,
        /// The revision applied again.
        pub restored_revision: String,
        /// Why the failed revision failed (`health_timeout`, `hook_failed`, `apply_failed`, …).
        pub reason: Reason,
        /// What.
        pub message: String,
    }
);

/// Any event's data, typed; what an emitter hands to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// See [`RolloutReceived`].
    RolloutReceived(RolloutReceived),
    /// See [`RolloutRejected`].
    RolloutRejected(RolloutRejected),
    /// See [`FetchFailed`].
    FetchFailed(FetchFailed),
    /// See [`ApplyStarted`].
    ApplyStarted(ApplyStarted),
    /// See [`ApplySucceeded`].
    ApplySucceeded(ApplySucceeded),
    /// See [`ApplyFailed`].
    ApplyFailed(ApplyFailed),
    /// See [`Converged`].
    Converged(Converged),
    /// See [`Degraded`].
    Degraded(Degraded),
    /// See [`DriftDetected`].
    DriftDetected(DriftDetected),
    /// See [`DriftCorrected`].
    DriftCorrected(DriftCorrected),
    /// See [`Pruned`].
    Pruned(Pruned),
    /// See [`Removed`].
    Removed(Removed),
    /// See [`OutboxOverflow`].
    OutboxOverflow(OutboxOverflow),
    /// See [`DesiredStale`].
    DesiredStale(DesiredStale),
    /// See [`ProfileAccepted`].
    ProfileAccepted(ProfileAccepted),
    /// See [`ProfileRejected`].
    ProfileRejected(ProfileRejected),
    /// See [`Waiting`].
    Waiting(Waiting),
    /// See [`RolledBack`].
    RolledBack(RolledBack),
}

impl EventData {
    /// The event type.
    pub fn event_type(&self) -> EventType {
        match self {
            EventData::RolloutReceived(_) => EventType::RolloutReceived,
            EventData::RolloutRejected(_) => EventType::RolloutRejected,
            EventData::FetchFailed(_) => EventType::FetchFailed,
            EventData::ApplyStarted(_) => EventType::ApplyStarted,
            EventData::ApplySucceeded(_) => EventType::ApplySucceeded,
            EventData::ApplyFailed(_) => EventType::ApplyFailed,
            EventData::Converged(_) => EventType::Converged,
            EventData::Degraded(_) => EventType::Degraded,
            EventData::DriftDetected(_) => EventType::DriftDetected,
            EventData::DriftCorrected(_) => EventType::DriftCorrected,
            EventData::Pruned(_) => EventType::Pruned,
            EventData::Removed(_) => EventType::Removed,
            EventData::OutboxOverflow(_) => EventType::OutboxOverflow,
            EventData::DesiredStale(_) => EventType::DesiredStale,
            EventData::ProfileAccepted(_) => EventType::ProfileAccepted,
            EventData::ProfileRejected(_) => EventType::ProfileRejected,
            EventData::Waiting(_) => EventType::Waiting,
            EventData::RolledBack(_) => EventType::RolledBack,
        }
    }

    /// The deployment the event is about (its CloudEvents `subject`).
    pub fn deployment(&self) -> Option<&str> {
        match self {
            EventData::RolloutReceived(p) => Some(&p.rollout.deployment),
            EventData::RolloutRejected(p) => p.deployment.as_deref(),
            EventData::FetchFailed(p) => Some(&p.rollout.deployment),
            EventData::ApplyStarted(p) => Some(&p.rollout.deployment),
            EventData::ApplySucceeded(p) => Some(&p.rollout.deployment),
            EventData::ApplyFailed(p) => Some(&p.rollout.deployment),
            EventData::Converged(p) => Some(&p.rollout.deployment),
            EventData::Degraded(p) => Some(&p.rollout.deployment),
            EventData::DriftDetected(p) => Some(&p.rollout.deployment),
            EventData::DriftCorrected(p) => Some(&p.rollout.deployment),
            EventData::Pruned(p) => Some(&p.rollout.deployment),
            EventData::Removed(p) => Some(&p.rollout.deployment),
            EventData::Waiting(p) => Some(&p.rollout.deployment),
            EventData::RolledBack(p) => Some(&p.rollout.deployment),
            EventData::OutboxOverflow(_)
            | EventData::DesiredStale(_)
            | EventData::ProfileAccepted(_)
            | EventData::ProfileRejected(_) => None,
        }
    }

    /// The `data` JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            EventData::RolloutReceived(p) => serde_json::to_value(p),
            EventData::RolloutRejected(p) => serde_json::to_value(p),
            EventData::FetchFailed(p) => serde_json::to_value(p),
            EventData::ApplyStarted(p) => serde_json::to_value(p),
            EventData::ApplySucceeded(p) => serde_json::to_value(p),
            EventData::ApplyFailed(p) => serde_json::to_value(p),
            EventData::Converged(p) => serde_json::to_value(p),
            EventData::Degraded(p) => serde_json::to_value(p),
            EventData::DriftDetected(p) => serde_json::to_value(p),
            EventData::DriftCorrected(p) => serde_json::to_value(p),
            EventData::Pruned(p) => serde_json::to_value(p),
            EventData::Removed(p) => serde_json::to_value(p),
            EventData::OutboxOverflow(p) => serde_json::to_value(p),
            EventData::DesiredStale(p) => serde_json::to_value(p),
            EventData::ProfileAccepted(p) => serde_json::to_value(p),
            EventData::ProfileRejected(p) => serde_json::to_value(p),
            EventData::Waiting(p) => serde_json::to_value(p),
            EventData::RolledBack(p) => serde_json::to_value(p),
        };
        // Plain structs of strings and numbers always serialize.
        v.unwrap_or(serde_json::Value::Null)
    }

    /// A CloudEvent from `source` carrying this data (id and roostseq are set by the outbox).
    pub fn into_event(self, source: &str) -> CloudEvent {
        CloudEvent::new(source, self.event_type(), self.deployment(), self.to_json())
    }
}

impl CloudEvent {
    /// This event's data as payload `T`, if the event is of `T`'s type and its data fits.
    pub fn typed<T: EventPayload>(&self) -> Option<T> {
        if self.event_type() != Some(T::TYPE) {
            return None;
        }
        serde_json::from_value(self.data.clone()).ok()
    }

    /// The rollout an event is about (deployment events).
    pub fn rollout_ref(&self) -> Option<RolloutRef> {
        serde_json::from_value(self.data.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> RolloutRef {
        RolloutRef {
            deployment: "web".into(),
            revision: Some("a".repeat(40)),
            sequence: 7,
            scope: "fleet".into(),
        }
    }

    #[test]
    fn payloads_roundtrip_through_cloud_events() {
        let ev = EventData::ApplySucceeded(ApplySucceeded {
            rollout: r(),
            changed: vec!["v1/ConfigMap/ns/x".into()],
            unchanged: 3,
        })
        .into_event("roost://stores/s/agent");
        assert_eq!(ev.ty, "dev.roost.apply.succeeded");
        assert_eq!(ev.subject.as_deref(), Some("web"));
        assert_eq!(ev.data["deployment"], "web");
        assert_eq!(ev.data["unchanged"], 3);
        let back: ApplySucceeded = ev.typed().expect("typed");
        assert_eq!(back.changed, vec!["v1/ConfigMap/ns/x".to_string()]);
        assert!(ev.typed::<Converged>().is_none(), "wrong type is None");

        let f = EventData::ApplyFailed(ApplyFailed {
            rollout: r(),
            problem: Problem {
                reason: Reason::TargetUnavailable,
                message: "connection refused".into(),
                retryable: true,
                retry_in_ms: Some(1000),
            },
        })
        .into_event("s");
        assert_eq!(f.reason(), Some("target_unavailable"));
        assert_eq!(f.data["retryable"], true);
        assert_eq!(f.rollout_ref().map(|r| r.sequence), Some(7));
    }
}
