//! Stable reason codes carried in `data.reason` of events and in status messages.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable reason code. Serialized in snake_case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The message is not valid JSON or not a DSSE envelope.
    Malformed,
    /// The payload does not match the rollout schema.
    Schema,
    /// A signature from a trusted key did not verify.
    BadSignature,
    /// No signature is from a trusted key.
    UnknownKey,
    /// The only trusted signatures are by keys past their `not_after`.
    ExpiredKey,
    /// The only trusted signatures are by revoked keys (`revoked_keys`).
    RevokedKey,
    /// Fewer distinct trusted, valid keys signed than the scope's threshold asks for.
    ThresholdNotMet,
    /// The sequence is not greater than the last accepted one.
    Replay,
    /// The payload's scope or deployment does not match the topic.
    ScopeMismatch,
    /// The message or the rendered revision exceeds a size limit.
    TooLarge,
    /// The source URL is not on the agent's allow-list.
    SourceNotAllowed,
    /// The rendered objects violate the agent's policy.
    PolicyDenied,
    /// The revision does not exist in the source repository.
    RevisionNotFound,
    /// A manifest could not be parsed or lacks required fields.
    InvalidManifest,
    /// The source could not be fetched (network, auth).
    FetchFailed,
    /// The target refused or failed to apply.
    ApplyFailed,
    /// Pruning removed objects / failed.
    PruneFailed,
    /// Health checks did not pass within the timeout.
    HealthTimeout,
    /// The live state differs from what was applied.
    Drift,
    /// A hook command failed.
    HookFailed,
    /// The target (API server, disk) could not be reached or answered with a server error;
    /// retried by the agent. Never a rejection of the revision.
    TargetUnavailable,
    /// The outbox dropped events because it reached its disk cap.
    OutboxOverflow,
    /// A fleet snapshot whose sequence is not greater than the last accepted one.
    SnapshotReplay,
    /// The last accepted fleet snapshot is past its `expires`: the store's desired state
    /// cannot be confirmed fresh (not an error while offline).
    SnapshotExpired,
    /// The fleet snapshot lists a newer sequence for a desired-state topic than the agent
    /// holds (or one it does not hold at all): a broker withholding or rolling back.
    DesiredStale,
    /// Waiting for the deployment's next operating window (v1.2; not a problem).
    Window,
    /// Waiting for deployments it depends on to converge on the store (v1.2; not a problem).
    Dependency,
    /// An internal error (storage, I/O).
    Internal,
}

impl Reason {
    /// The wire form, e.g. `bad_signature`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::Schema => "schema",
            Reason::BadSignature => "bad_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::ExpiredKey => "expired_key",
            Reason::RevokedKey => "revoked_key",
            Reason::ThresholdNotMet => "threshold_not_met",
            Reason::Replay => "replay",
            Reason::ScopeMismatch => "scope_mismatch",
            Reason::TooLarge => "too_large",
            Reason::SourceNotAllowed => "source_not_allowed",
            Reason::PolicyDenied => "policy_denied",
            Reason::RevisionNotFound => "revision_not_found",
            Reason::InvalidManifest => "invalid_manifest",
            Reason::FetchFailed => "fetch_failed",
            Reason::ApplyFailed => "apply_failed",
            Reason::PruneFailed => "prune_failed",
            Reason::HealthTimeout => "health_timeout",
            Reason::Drift => "drift",
            Reason::HookFailed => "hook_failed",
            Reason::TargetUnavailable => "target_unavailable",
            Reason::OutboxOverflow => "outbox_overflow",
            Reason::SnapshotReplay => "snapshot_replay",
            Reason::SnapshotExpired => "snapshot_expired",
            Reason::DesiredStale => "desired_stale",
            Reason::Window => "window",
            Reason::Dependency => "dependency",
            Reason::Internal => "internal",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stable codes carried in `data.detail` of a `rollout.rejected` event: a finer cause under
/// its reason code, for tools that act on it (the message stays for humans).
pub mod detail {
    /// Under `invalid_manifest`: a sealed (`.age`) file of the revision is not encrypted to
    /// this store's age identity (or the store has none).
    pub const SECRET_NOT_FOR_THIS_STORE: &str = "secret_not_for_this_store";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_matches_serde() {
        for r in [
            Reason::BadSignature,
            Reason::SourceNotAllowed,
            Reason::Replay,
            Reason::ExpiredKey,
            Reason::RevokedKey,
            Reason::ThresholdNotMet,
            Reason::SnapshotReplay,
            Reason::SnapshotExpired,
            Reason::DesiredStale,
            Reason::Window,
            Reason::Dependency,
        ] {
            let json = serde_json::to_string(&r).expect("serialize");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
    }
}
