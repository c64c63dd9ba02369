//! CloudEvents 1.0 (structured JSON mode) as published on `…/stores/{store}/events`, with the
//! roost extension attribute `roostseq` (gap-free per store, from 1).

use serde::{Deserialize, Serialize};

/// The event types roost emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A rollout verified and was accepted.
    RolloutReceived,
    /// A rollout was rejected (see `data.reason`).
    RolloutRejected,
    /// The revision could not be fetched.
    FetchFailed,
    /// Applying started.
    ApplyStarted,
    /// Applying finished.
    ApplySucceeded,
    /// Applying failed.
    ApplyFailed,
    /// The deployment is at its desired revision and healthy.
    Converged,
    /// Health did not pass within the timeout.
    Degraded,
    /// Live state differs from what was applied.
    DriftDetected,
    /// Drift was corrected.
    DriftCorrected,
    /// Objects were pruned.
    Pruned,
    /// A deployment was removed (tombstone).
    Removed,
    /// The outbox dropped events past its disk cap.
    OutboxOverflow,
    /// The signed fleet snapshot lists newer desired state than the agent holds (or the
    /// last snapshot expired): the store's view may be stale.
    DesiredStale,
    /// A signed store profile was accepted: its groups (and labels, vars, time zone) are in
    /// force from now on.
    ProfileAccepted,
    /// A store profile was refused (see `data.reason`); the one in force stays.
    ProfileRejected,
    /// A fetched and built revision waits to be applied: for its operating window
    /// (`window`, with `next_window`) or for deployments it depends on (`dependency`).
    Waiting,
    /// A failed revision was replaced by the last one that converged on the store.
    RolledBack,
}

impl EventType {
    /// Every event type.
    pub const ALL: [EventType; 18] = [
        EventType::RolloutReceived,
        EventType::RolloutRejected,
        EventType::FetchFailed,
        EventType::ApplyStarted,
        EventType::ApplySucceeded,
        EventType::ApplyFailed,
        EventType::Converged,
        EventType::Degraded,
        EventType::DriftDetected,
        EventType::DriftCorrected,
        EventType::Pruned,
        EventType::Removed,
        EventType::OutboxOverflow,
        EventType::DesiredStale,
        EventType::ProfileAccepted,
        EventType::ProfileRejected,
        EventType::Waiting,
        EventType::RolledBack,
    ];

    /// The CloudEvents `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RolloutReceived => "dev.roost.rollout.received",
            EventType::RolloutRejected => "dev.roost.rollout.rejected",
            EventType::FetchFailed => "dev.roost.fetch.failed",
            EventType::ApplyStarted => "dev.roost.apply.started",
            EventType::ApplySucceeded => "dev.roost.apply.succeeded",
            EventType::ApplyFailed => "dev.roost.apply.failed",
            EventType::Converged => "dev.roost.converged",
            EventType::Degraded => "dev.roost.degraded",
            EventType::DriftDetected => "dev.roost.drift.detected",
            EventType::DriftCorrected => "dev.roost.drift.corrected",
            EventType::Pruned => "dev.roost.pruned",
            EventType::Removed => "dev.roost.removed",
            EventType::OutboxOverflow => "dev.roost.outbox.overflow",
            EventType::DesiredStale => "dev.roost.desired.stale",
            EventType::ProfileAccepted => "dev.roost.profile.accepted",
            EventType::ProfileRejected => "dev.roost.profile.rejected",
            EventType::Waiting => "dev.roost.waiting",
            EventType::RolledBack => "dev.roost.rolled_back",
        }
    }

    /// Parses a CloudEvents `type` attribute.
    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CloudEvents 1.0 structured-mode event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per event; consumers drop duplicates by id.
    pub id: String,
    /// `roost://stores/{store}/agent` (or `/bridge`).
    pub source: String,
    /// One of [`EventType`].
    #[serde(rename = "type")]
    pub ty: String,
    /// When the event happened (RFC 3339).
    pub time: String,
    /// The deployment the event is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// Per-store event counter, from 1, without gaps, across restarts.
    pub roostseq: u64,
    /// Event data: `deployment`, `revision`, `sequence`, `reason`, `message`, …
    pub data: serde_json::Value,
}

impl CloudEvent {
    /// Builds an event; `roostseq` and `id` are assigned by the outbox when it is enqueued.
    pub fn new(
        source: &str,
        ty: EventType,
        subject: Option<&str>,
        data: serde_json::Value,
    ) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: String::new(),
            source: source.to_owned(),
            ty: ty.as_str().to_owned(),
            time: crate::now_rfc3339(),
            subject: subject.map(str::to_owned),
            datacontenttype: "application/json".into(),
            roostseq: 0,
            data,
        }
    }

    /// The parsed type, if it is one roost knows.
    pub fn event_type(&self) -> Option<EventType> {
        EventType::parse(&self.ty)
    }

    /// `data.reason`, if present.
    pub fn reason(&self) -> Option<&str> {
        self.data.get("reason").and_then(|v| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_roundtrip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("dev.roost.nope"), None);
    }
}
