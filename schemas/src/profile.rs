//! The store profile: what the fleet repository's inventory says about one store (labels,
//! groups in precedence order, time zone, vars), signed by the controller and retained on
//! `roost/v1/stores/{store}/profile` as a DSSE envelope of [`PROFILE_PAYLOAD_TYPE`]. Sequence
//! rule and replay guard as for rollouts; the topic is listed in the fleet snapshot. The
//! agent takes its groups from it (the configured groups are a bootstrap default until the
//! first profile) and its values for `${roost.…}` substitution; the bridge subscribes to the
//! group topics it names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::inventory::{looks_like_timezone, validate_var_name, MAX_VARS, MAX_VAR_BYTES};
use crate::selector::{validate_labels, Labels};
use crate::validate_name;

/// The DSSE payload type of a store profile.
pub const PROFILE_PAYLOAD_TYPE: &str = "application/vnd.roost.profile.v1+json";

/// Most groups one store may be in.
pub const MAX_GROUPS: usize = 64;

/// The signed profile payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The store it is for (must match the topic and the receiving agent).
    pub store: String,
    /// Strictly increasing per store (the contract's sequence rule).
    pub sequence: u64,
    /// When the controller signed it (RFC 3339).
    pub issued_at: String,
    /// The store's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// The store's groups in precedence order (first wins after the store's own scope).
    /// Absent when `roost.yaml` names its groups without defining their members (the list
    /// form): the store keeps the groups of its own configuration. Present and empty: the
    /// store is in no group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// IANA time zone; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Values for `${roost.vars.KEY}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
}

/// Why a profile payload is not valid (beyond JSON shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// JSON did not parse into the type.
    #[error("payload does not match the profile schema: {0}")]
    Shape(String),
    /// A field has an invalid value.
    #[error("{field}: {message}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn field(field: &'static str, message: impl Into<String>) -> ProfileError {
    ProfileError::Field {
        field,
        message: message.into(),
    }
}

impl Profile {
    /// Parses and validates a payload.
    pub fn from_payload(bytes: &[u8]) -> Result<Profile, ProfileError> {
        let p: Profile =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Shape(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// The rules beyond the JSON shape.
    pub fn validate(&self) -> Result<(), ProfileError> {
        validate_name(&self.store).map_err(|e| field("store", e.to_string()))?;
        if self.sequence == 0 {
            return Err(field("sequence", "must be at least 1"));
        }
        crate::parse_rfc3339(&self.issued_at)
            .ok_or_else(|| field("issued_at", "not an RFC 3339 time"))?;
        validate_labels(&self.labels).map_err(|e| field("labels", e.to_string()))?;
        let groups = self.groups.as_deref().unwrap_or_default();
        if groups.len() > MAX_GROUPS {
            return Err(field("groups", format!("at most {MAX_GROUPS}")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for g in groups {
            validate_name(g).map_err(|e| field("groups", e.to_string()))?;
            if !seen.insert(g) {
                return Err(field("groups", format!("{g} twice")));
            }
        }
        if let Some(tz) = &self.timezone {
            if !looks_like_timezone(tz) {
                return Err(field("timezone", "not an IANA time zone name"));
            }
        }
        if self.vars.len() > MAX_VARS {
            return Err(field("vars", format!("at most {MAX_VARS}")));
        }
        for (k, v) in &self.vars {
            if !validate_var_name(k) {
                return Err(field("vars", format!("bad name {k:?}")));
            }
            if v.len() > MAX_VAR_BYTES {
                return Err(field("vars", format!("{k}: at most {MAX_VAR_BYTES} bytes")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let good = br#"{"store": "store-0042", "sequence": 5, "issued_at": "2026-12-06T03:00:00Z",
            "labels": {"region": "us-south"}, "groups": ["canary", "us-south"],
            "timezone": "America/Chicago", "vars": {"store_number": "0042"}}"#;
        let p = Profile::from_payload(good).expect("good");
        assert_eq!(
            p.groups.as_deref(),
            Some(&["canary".to_owned(), "us-south".to_owned()][..])
        );
        let no_groups = br#"{"store": "s", "sequence": 1, "issued_at": "2026-12-06T03:00:00Z"}"#;
        assert_eq!(Profile::from_payload(no_groups).expect("ok").groups, None);
        let bad: &[&[u8]] = &[
            br#"{"store": "store-0042", "sequence": 0, "issued_at": "2026-12-06T03:00:00Z"}"#,
            br#"{"store": "Store 42", "sequence": 1, "issued_at": "2026-12-06T03:00:00Z"}"#,
            br#"{"store": "s", "sequence": 1, "issued_at": "yesterday"}"#,
            br#"{"store": "s", "sequence": 1, "issued_at": "2026-12-06T03:00:00Z", "groups": ["a", "a"]}"#,
            br#"{"store": "s", "sequence": 1, "issued_at": "2026-12-06T03:00:00Z", "labels": {"k": "a b"}}"#,
            br#"{"store": "s", "sequence": 1, "issued_at": "2026-12-06T03:00:00Z", "extra": 1}"#,
        ];
        for b in bad {
            assert!(
                Profile::from_payload(b).is_err(),
                "{}",
                String::from_utf8_lossy(b)
            );
        }
    }
}
