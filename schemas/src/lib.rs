//! roost's wire contract in Rust: names, topics, the rollout payload, the DSSE envelope,
//! CloudEvents, the status and presence documents, reason codes, Ed25519 signing and the
//! sequence rule.
//!
//! This crate holds data and pure functions only (no I/O runtime), so that every component and
//! every outside tool can share one definition of the contract. The JSON Schema files in
//! `schemas/schema/` are the machine-readable form of the same types.

pub mod dsse;
pub mod event;
pub mod fleet;
pub mod inventory;
pub mod names;
pub mod payload;
pub mod profile;
pub mod reason;
pub mod revision;
pub mod rollout;
pub mod selector;
pub mod sequence;
pub mod snapshot;
pub mod status;
pub mod topics;
pub mod watermark;
pub mod window;

pub use dsse::{
    sign_all, Envelope, KeyId, Keyring, Signature, SigningKey, VerifiedPayload, VerifyError,
    PAYLOAD_TYPE,
};
pub use event::{CloudEvent, EventType};
pub use names::{validate_name, NameError};
pub use payload::{EventData, EventPayload, Problem, RolloutRef};
pub use profile::{Profile, PROFILE_PAYLOAD_TYPE};
pub use reason::Reason;
pub use revision::ShortRev;
pub use rollout::{OnFailure, Origin, Policy, Rollout, Schedule, Scope, Source};
pub use selector::{Labels, Selector};
pub use sequence::{envelope_payload, envelope_sequence, payload_sequence, sequence_rule};
pub use snapshot::{Snapshot, SNAPSHOT_PAYLOAD_TYPE};
pub use status::{
    Confirmation, Confirmed, DeploymentStatus, DesiredRef, Freshness, FreshnessState, Phase,
    Presence, PresenceState, StatusDoc,
};
pub use topics::{DeploymentTopic, Topics};

/// The current UTC time as an RFC 3339 string with second precision (`2026-11-26T10:00:00Z`).
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

/// Formats a timestamp as RFC 3339 in UTC with millisecond precision.
pub fn format_rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00Z"))
}

/// Parses an RFC 3339 timestamp.
pub fn parse_rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// JSON Schema documents shipped with the crate, by file name.
pub mod json_schema {
    /// The rollout payload schema.
    pub const ROLLOUT: &str = include_str!("../schema/rollout.schema.json");
    /// The DSSE envelope schema.
    pub const ENVELOPE: &str = include_str!("../schema/envelope.schema.json");
    /// The CloudEvent schema (with `roostseq`).
    pub const EVENT: &str = include_str!("../schema/event.schema.json");
    /// The retained store status document schema.
    pub const STATUS: &str = include_str!("../schema/status.schema.json");
    /// The presence document schema.
    pub const PRESENCE: &str = include_str!("../schema/presence.schema.json");
    /// The edge-only delivery confirmation schema.
    pub const ACK: &str = include_str!("../schema/ack.schema.json");
    /// The fleet repository file (`roost.yaml`).
    pub const FLEET: &str = include_str!("../schema/fleet.schema.json");
    /// The signed fleet snapshot's payload.
    pub const SNAPSHOT: &str = include_str!("../schema/snapshot.schema.json");
    /// A store of the inventory (`stores/*.yaml` in the fleet repository).
    pub const STORE: &str = include_str!("../schema/store.schema.json");
    /// The signed store profile's payload.
    pub const PROFILE: &str = include_str!("../schema/profile.schema.json");
    /// The fleet record's end-to-end confirmation (cloud → bridge).
    pub const CONFIRMED: &str = include_str!("../schema/confirmed.schema.json");
}

#[cfg(test)]
mod schema_tests;
