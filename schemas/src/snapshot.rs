//! The signed fleet snapshot (TUF's timestamp/snapshot idea, for MQTT): the controller's
//! statement "at `issued_at`, every desired-state topic had this sequence; do not trust this
//! after `expires`". Retained on `roost/v1/fleet/snapshot` as a DSSE envelope of
//! [`SNAPSHOT_PAYLOAD_TYPE`]. An agent compares it with what it holds to notice a broker that
//! withholds or rolls back desired state; it never applies anything because of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::validate_name;
use crate::rollout::Scope;

/// The DSSE payload type of a fleet snapshot.
pub const SNAPSHOT_PAYLOAD_TYPE: &str = "application/vnd.roost.snapshot.v1+json";

/// At most this many topics in one snapshot (the message size limit usually binds first).
pub const MAX_SNAPSHOT_TOPICS: usize = 100_000;

/// The signed snapshot payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the controller signed it (RFC 3339).
    pub issued_at: String,
    /// After this time (RFC 3339) the snapshot proves nothing about freshness.
    pub expires: String,
    /// Strictly increasing (the contract's sequence rule on the snapshot topic).
    pub sequence: u64,
    /// The current sequence of every desired-state topic (full topic name → sequence):
    /// deployment topics and (v1.2) store profile topics.
    pub topics: BTreeMap<String, u64>,
}

/// Why a snapshot payload is not valid (beyond JSON shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// JSON did not parse into the type.
    #[error("payload does not match the snapshot schema: {0}")]
    Shape(String),
    /// A field has an invalid value.
    #[error("{field}: {message}")]
    Field {
        /// JSON path of the field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The scope and deployment of a deployment topic under any prefix
/// (`…/fleet/deployments/D`, `…/groups/G/deployments/D`, `…/stores/S/deployments/D`).
pub fn deployment_topic_tail(topic: &str) -> Option<(Scope, String)> {
    let parts: Vec<&str> = topic.split('/').collect();
    let n = parts.len();
    if n < 4 || parts[n - 2] != "deployments" {
        return None;
    }
    let d = parts[n - 1];
    validate_name(d).ok()?;
    let scope = if parts[n - 3] == "fleet" {
        Scope::Fleet
    } else if n >= 5 && parts[n - 4] == "groups" {
        validate_name(parts[n - 3]).ok()?;
        Scope::Group(parts[n - 3].to_owned())
    } else if n >= 5 && parts[n - 4] == "stores" {
        validate_name(parts[n - 3]).ok()?;
        Scope::Store(parts[n - 3].to_owned())
    } else {
        return None;
    };
    let prefix_len = match scope {
        Scope::Fleet => n - 3,
        _ => n - 4,
    };
    if prefix_len == 0 || parts[..prefix_len].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((scope, d.to_owned()))
}

/// The store of a profile topic under any prefix (`…/stores/S/profile`).
pub fn profile_topic_tail(topic: &str) -> Option<String> {
    let parts: Vec<&str> = topic.split('/').collect();
    let n = parts.len();
    if n < 4 || parts[n - 1] != "profile" || parts[n - 3] != "stores" {
        return None;
    }
    validate_name(parts[n - 2]).ok()?;
    if parts[..n - 3].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(parts[n - 2].to_owned())
}

impl Snapshot {
    /// Parses and validates a payload.
    pub fn from_json(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let s: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Shape(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every field's rules: sequence >= 1, RFC 3339 times with `expires` after
    /// `issued_at`, topics that are deployment or store profile topics with sequences >= 1.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let field = |field: &'static str, message: String| SnapshotError::Field { field, message };
        if self.sequence == 0 {
            return Err(field("sequence", "must be at least 1".into()));
        }
        let issued = crate::parse_rfc3339(&self.issued_at)
            .ok_or_else(|| field("issued_at", "not an RFC 3339 timestamp".into()))?;
        let expires = crate::parse_rfc3339(&self.expires)
            .ok_or_else(|| field("expires", "not an RFC 3339 timestamp".into()))?;
        if expires <= issued {
            return Err(field("expires", "must be later than issued_at".into()));
        }
        if self.topics.len() > MAX_SNAPSHOT_TOPICS {
            return Err(field(
                "topics",
                format!("at most {MAX_SNAPSHOT_TOPICS} topics"),
            ));
        }
        for (t, seq) in &self.topics {
            if t.len() > 512
                || (deployment_topic_tail(t).is_none() && profile_topic_tail(t).is_none())
            {
                let shown: String = t.chars().take(80).collect();
                return Err(field(
                    "topics",
                    format!("{shown:?} is not a deployment or store profile topic"),
                ));
            }
            if *seq == 0 {
                return Err(field(
                    "topics",
                    format!("sequence of {t} must be at least 1"),
                ));
            }
        }
        Ok(())
    }

    /// `expires` as a time (None only for an unvalidated snapshot).
    pub fn expires_at(&self) -> Option<time::OffsetDateTime> {
        crate::parse_rfc3339(&self.expires)
    }

    /// Whether the snapshot is past its `expires` at `now`.
    pub fn is_expired(&self, now: time::OffsetDateTime) -> bool {
        self.expires_at().is_none_or(|e| now > e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            issued_at: "2026-11-26T10:00:00Z".into(),
            expires: "2026-11-26T10:15:00Z".into(),
            sequence: 1_764_151_200_000,
            topics: [
                ("roost/v1/fleet/deployments/web".to_owned(), 17),
                ("roost/v1/groups/canary/deployments/web".to_owned(), 18),
                ("roost/v1/stores/store-0042/deployments/menu".to_owned(), 3),
                ("roost/v1/stores/store-0042/profile".to_owned(), 5),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn validation() {
        assert!(sample().validate().is_ok());
        let bad = |f: &dyn Fn(&mut Snapshot), field: &str| {
            let mut s = sample();
            f(&mut s);
            match s.validate() {
                Err(SnapshotError::Field { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: {other:?}"),
            }
        };
        bad(&|s| s.sequence = 0, "sequence");
        bad(&|s| s.issued_at = "yesterday".into(), "issued_at");
        bad(&|s| s.expires = "2026-11-26T09:00:00Z".into(), "expires");
        bad(&|s| s.expires = s.issued_at.clone(), "expires");
        for t in [
            "roost/v1/fleet/status",
            "fleet/deployments/web",
            "roost/v1/groups/Bad/deployments/web",
            "roost/v1/stores/s/deployments/web/x",
            "//fleet/deployments/web",
            "roost/v1/stores/Bad/profile",
            "roost/v1/groups/g/profile",
            "stores/s/profile",
            "roost//stores/s/profile",
        ] {
            bad(
                &|s| {
                    s.topics.insert(t.to_owned(), 1);
                },
                "topics",
            );
        }
        bad(
            &|s| {
                s.topics.insert("roost/v1/fleet/deployments/x".into(), 0);
            },
            "topics",
        );
        let now = crate::parse_rfc3339("2026-11-26T10:15:00Z").expect("t");
        assert!(
            !sample().is_expired(now),
            "valid up to and including expires"
        );
        assert!(sample().is_expired(now + time::Duration::seconds(1)));
    }

    #[test]
    fn topic_tails() {
        assert_eq!(
            deployment_topic_tail("a/b/groups/g1/deployments/web"),
            Some((Scope::Group("g1".into()), "web".into()))
        );
        assert_eq!(
            deployment_topic_tail("roost/v1/fleet/deployments/web"),
            Some((Scope::Fleet, "web".into()))
        );
        assert_eq!(deployment_topic_tail("groups/g1/deployments/web"), None);
        assert_eq!(
            profile_topic_tail("roost/v1/stores/s1/profile"),
            Some("s1".into())
        );
        assert_eq!(profile_topic_tail("a/stores/s1/profile"), Some("s1".into()));
        assert_eq!(profile_topic_tail("stores/s1/profile"), None);
        assert_eq!(profile_topic_tail("roost/v1/stores/s1/status"), None);
    }
}
