//! The signed fleet snapshot the controller publishes (retained, `roost/v1/fleet/snapshot`):
//! the current sequence of every desired-state topic in the fleet database (deployment
//! topics and store profile topics), so that agents
//! notice a broker that withholds or rolls back desired state. Built by a pure function from
//! the desired table; only envelopes that verify against the controller's own key(s) are
//! listed, because the fleet record also keeps whatever the broker showed, and a signed
//! snapshot must never vouch for a sequence somebody else chose.

use std::time::Duration;

use roost_schemas::{Envelope, Keyring, Snapshot, PAYLOAD_TYPE, PROFILE_PAYLOAD_TYPE};

/// Default seconds between snapshots.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// Default validity of a snapshot (`expires` - `issued_at`): 3 × the default interval.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(3 * 300);

/// What [`build`] made of the desired table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The snapshot payload.
    pub snapshot: Snapshot,
    /// Topics left out: their envelope does not verify against the controller's keys.
    pub skipped: Vec<String>,
}

/// Builds the snapshot payload from the desired table (`(topic, envelope)` rows): each
/// topic's sequence is read from its envelope once it verifies against `keys` (the
/// controller's own). Tombstones are listed like any rollout (they are desired state too).
pub fn build(
    desired: &[(String, Vec<u8>)],
    keys: &Keyring,
    sequence: u64,
    issued_at: time::OffsetDateTime,
    expiry: Duration,
) -> Built {
    let mut topics = std::collections::BTreeMap::new();
    let mut skipped = Vec::new();
    for (topic, payload) in desired {
        // A deployment topic carries rollouts; a store's profile topic, its profile.
        let payload_type = if roost_schemas::snapshot::deployment_topic_tail(topic).is_some() {
            Some(PAYLOAD_TYPE)
        } else if roost_schemas::snapshot::profile_topic_tail(topic).is_some() {
            Some(PROFILE_PAYLOAD_TYPE)
        } else {
            None
        };
        let seq = payload_type
            .and_then(|ty| {
                let env = serde_json::from_slice::<Envelope>(payload).ok()?;
                keys.verify_with(&env, ty, issued_at, 1).ok()
            })
            .and_then(|v| roost_schemas::payload_sequence(&v.payload))
            .filter(|s| *s >= 1);
        match seq {
            Some(s) => {
                topics.insert(topic.clone(), s);
            }
            None => skipped.push(topic.clone()),
        }
    }
    let expires = issued_at + time::Duration::try_from(expiry).unwrap_or(time::Duration::HOUR);
    Built {
        snapshot: Snapshot {
            issued_at: roost_schemas::format_rfc3339(issued_at),
            expires: roost_schemas::format_rfc3339(expires),
            sequence,
            topics,
        },
        skipped,
    }
}

/// Whether a snapshot is due: desired state was published since the last one (`dirty`), or
/// `interval` passed since it, or none was published yet.
pub fn due(
    last: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
    interval: Duration,
    dirty: bool,
) -> bool {
    dirty || last.is_none_or(|l| now.duration_since(l) >= interval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{Rollout, Scope, SigningKey, Source};

    fn envelope(key: &SigningKey, scope: Scope, seq: u64, remove: bool) -> Vec<u8> {
        let r = Rollout {
            schedule: Default::default(),
            deployment: "web".into(),
            scope,
            sequence: seq,
            issued_at: "2026-11-26T10:00:00Z".into(),
            source: (!remove).then(|| Source {
                url: "git://127.0.0.1/apps.git".into(),
                revision: "a".repeat(40),
                path: "apps".into(),
            }),
            not_before: None,
            policy: Default::default(),
            remove,
            origin: None,
        };
        let body = serde_json::to_vec(&r).expect("json");
        serde_json::to_vec(&key.sign(PAYLOAD_TYPE, &body)).expect("json")
    }

    #[test]
    fn lists_what_verifies_and_skips_the_rest() {
        let ours = SigningKey::from_seed(&[61; 32]).expect("key");
        let theirs = SigningKey::from_seed(&[62; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(ours.public_key()).expect("add");
        let now = roost_schemas::parse_rfc3339("2026-11-26T10:00:00Z").expect("t");
        let desired = vec![
            (
                "roost/v1/fleet/deployments/web".to_owned(),
                envelope(&ours, Scope::Fleet, 17, false),
            ),
            (
                "roost/v1/groups/canary/deployments/web".to_owned(),
                envelope(&ours, Scope::Group("canary".into()), 18, true),
            ),
            // Forged on the broker and recorded by the fleet service: not vouched for.
            (
                "roost/v1/stores/s1/deployments/web".to_owned(),
                envelope(&theirs, Scope::Store("s1".into()), u64::MAX - 1, false),
            ),
            (
                "roost/v1/stores/s2/deployments/web".to_owned(),
                b"not an envelope".to_vec(),
            ),
            // A store profile, signed as one: listed.
            (
                "roost/v1/stores/s3/profile".to_owned(),
                serde_json::to_vec(&ours.sign(PROFILE_PAYLOAD_TYPE, br#"{"sequence":19}"#))
                    .expect("json"),
            ),
            // A rollout envelope on a profile topic: the wrong payload type.
            (
                "roost/v1/stores/s4/profile".to_owned(),
                envelope(&ours, Scope::Store("s4".into()), 20, false),
            ),
        ];
        let b = build(&desired, &ring, 99, now, Duration::from_secs(900));
        assert_eq!(
            b.snapshot.topics.into_iter().collect::<Vec<_>>(),
            vec![
                ("roost/v1/fleet/deployments/web".to_owned(), 17),
                ("roost/v1/groups/canary/deployments/web".to_owned(), 18),
                ("roost/v1/stores/s3/profile".to_owned(), 19),
            ]
        );
        assert_eq!(
            b.skipped,
            vec![
                "roost/v1/stores/s1/deployments/web".to_owned(),
                "roost/v1/stores/s2/deployments/web".to_owned(),
                "roost/v1/stores/s4/profile".to_owned()
            ]
        );
        assert_eq!(b.snapshot.sequence, 99);
        assert_eq!(b.snapshot.issued_at, "2026-11-26T10:00:00.000Z");
        assert_eq!(b.snapshot.expires, "2026-11-26T10:15:00.000Z");
        // What it builds is a valid snapshot (also when empty).
        let b = build(&desired, &ring, 99, now, Duration::from_secs(900));
        b.snapshot.validate().expect("valid");
        build(&[], &ring, 1, now, Duration::from_secs(1))
            .snapshot
            .validate()
            .expect("valid when empty");
    }

    #[test]
    fn due_after_the_interval_or_a_publication() {
        let t0 = tokio::time::Instant::now();
        let i = Duration::from_secs(300);
        for (name, last, now, dirty, want) in [
            ("never published", None, t0, false, true),
            ("just published", Some(t0), t0, false, false),
            (
                "within the interval",
                Some(t0),
                t0 + Duration::from_secs(299),
                false,
                false,
            ),
            ("interval passed", Some(t0), t0 + i, false, true),
            (
                "desired state published",
                Some(t0),
                t0 + Duration::from_secs(1),
                true,
                true,
            ),
        ] {
            assert_eq!(due(last, now, i, dirty), want, "{name}");
        }
    }
}
