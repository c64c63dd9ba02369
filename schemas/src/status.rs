//! The retained store status document and the presence document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::Origin;

/// Where a deployment is in its lifecycle on one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    /// Accepted, not started (or waiting for `not_before`).
    #[default]
    Pending,
    /// Fetching the revision.
    Fetching,
    /// Applying.
    Applying,
    /// Applied, waiting for health.
    Progressing,
    /// At the desired revision and healthy.
    Converged,
    /// Applied but not healthy within the timeout.
    Degraded,
    /// Fetch, render or apply failed.
    Failed,
    /// Removed by a tombstone.
    Removed,
    /// Fetched and built, waiting to be applied: for its operating window or for the
    /// deployments it depends on (v1.2; `reason` `window` or `dependency`).
    Waiting,
    /// The desired revision failed and the last one that converged on the store was applied
    /// again (v1.2, `policy.on_failure: rollback`); the failed one is not retried.
    RolledBack,
}

impl Phase {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Fetching => "Fetching",
            Phase::Applying => "Applying",
            Phase::Progressing => "Progressing",
            Phase::Converged => "Converged",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
            Phase::Removed => "Removed",
            Phase::Waiting => "Waiting",
            Phase::RolledBack => "RolledBack",
        }
    }
}

/// The rollout that currently wins for a deployment on this store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRef {
    /// Desired commit.
    pub revision: String,
    /// Sequence of the winning rollout.
    pub sequence: u64,
    /// Scope key of the winning rollout (`fleet`, `group:NAME`, `store:NAME`).
    pub scope: String,
    /// The winning rollout's `origin` (v1.1): the fleet-repository commit that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
}

/// One deployment's state on a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeploymentStatus {
    /// The winning desired state, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredRef>,
    /// The last revision applied successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<String>,
    /// The last revision an apply was attempted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempted_revision: Option<String>,
    /// Lifecycle phase.
    pub phase: Phase,
    /// True while live state differs from what was applied.
    #[serde(default)]
    pub drift: bool,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Reason code of the last problem, if any (while `Waiting`: `window` or `dependency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While `Waiting` for a window: when it opens (RFC 3339, the store's local offset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_window: Option<String>,
    /// While `Waiting` for dependencies: the deployments not yet Converged here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// While `RolledBack`: the revision that failed (`applied_revision` is the restored one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_revision: Option<String>,
}

/// How fresh the store's view of its desired state is, judged against the signed fleet
/// snapshot (`roost/v1/fleet/snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FreshnessState {
    /// Everything the last snapshot lists for this store is held, and it has not expired.
    Fresh,
    /// The snapshot lists a newer sequence for a topic of this store than the agent holds.
    Stale,
    /// The last snapshot is past its `expires` (offline, or snapshots withheld).
    Expired,
    /// No snapshot accepted yet.
    #[default]
    Unknown,
}

impl FreshnessState {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            FreshnessState::Fresh => "fresh",
            FreshnessState::Stale => "stale",
            FreshnessState::Expired => "expired",
            FreshnessState::Unknown => "unknown",
        }
    }
}

/// The status document's freshness fields (contract extension; all optional, absent in
/// documents from older agents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Freshness {
    /// Fresh, stale, expired or unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_freshness: Option<FreshnessState>,
    /// When the agent last found everything an unexpired snapshot lists for this store held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_confirmed_at: Option<String>,
    /// Sequence of the last accepted snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_sequence: Option<u64>,
    /// When the last accepted snapshot expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_expires: Option<String>,
    /// The topics the snapshot lists newer than held (while stale).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale_topics: Vec<String>,
}

/// The retained status document, `…/stores/{store}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDoc {
    /// Store name.
    pub store: String,
    /// The store's configured groups, in precedence order (v1.1; empty in older documents).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Agent version.
    pub agent_version: String,
    /// When this document was produced (RFC 3339).
    pub updated_at: String,
    /// The last event `roostseq` assigned when this document was produced.
    pub roostseq: u64,
    /// Events waiting in the agent's outbox.
    pub outbox_backlog: u64,
    /// Per deployment.
    pub deployments: BTreeMap<String, DeploymentStatus>,
    /// The agent republishes this document at least every `heartbeat_s` seconds (v1.1), so
    /// a reader can tell a silent store from an idle one: a document much older than this
    /// is stale, whatever it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_s: Option<u64>,
    /// The sequence of the store profile the agent runs on (v1.2; absent before the first
    /// profile, or for a store that is not in the inventory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_sequence: Option<u64>,
    /// Freshness against the signed fleet snapshot (contract extension).
    #[serde(flatten)]
    pub freshness: Freshness,
}

/// `online` or `offline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// Connected.
    Online,
    /// Disconnected (set by the bridge's last will, or on clean shutdown).
    Offline,
}

/// The retained presence document, `…/stores/{store}/presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Online or offline.
    pub state: PresenceState,
    /// Since when (RFC 3339).
    pub since: String,
}

/// The fleet record's end-to-end confirmation to a store's bridge, retained on the cloud
/// topic `…/stores/{store}/confirmed`: every event of the store up to `roostseq` is committed
/// in the fleet database (or was reported lost by the agent), so the bridge may delete it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Confirmed {
    /// Highest roostseq up to which every event is committed (0 = none yet).
    pub roostseq: u64,
}

/// The bridge's delivery confirmation to the agent, retained on the edge-only topic
/// `…/stores/{store}/ack`: every event up to `roostseq` is in the bridge's durable outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Confirmation {
    /// Highest roostseq up to which every event is confirmed (0 = none yet).
    pub roostseq: u64,
    /// Send every unconfirmed event again (the bridge has just connected).
    #[serde(default)]
    pub resend: bool,
}
