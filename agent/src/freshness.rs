//! Freshness of the store's desired state against the signed fleet snapshot
//! (`roost/v1/fleet/snapshot`): verification of the snapshot, its replay guard, and the pure
//! comparison with what the agent holds, plus the task that keeps the status document's
//! freshness fields and reports `desired.stale` once per change. A snapshot never makes the
//! agent apply or remove anything: it only tells whether a broker withholds or rolled back
//! desired state (TUF's timestamp/snapshot idea).

use std::sync::Arc;
use std::time::Duration;

use roost_schemas::payload::{DesiredStale, RolloutRejected, StaleTopic};
use roost_schemas::{
    EventData, Freshness, FreshnessState, Reason, Scope, Snapshot, Topics, SNAPSHOT_PAYLOAD_TYPE,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::decide::scope_rank;
use crate::ledger::Ledger;
use crate::verify::{replay_guard, verify_signed, Kind, Rejection, VerifyPolicy};

/// How long after the last desired-state message the comparison waits, so that the retained
/// messages a (re)subscription delivers in any order have all arrived before anything is
/// called withheld.
pub const SETTLE: Duration = Duration::from_secs(3);

/// A verified fleet snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSnapshot {
    /// The payload.
    pub snapshot: Snapshot,
    /// SHA-256 (hex) of the payload bytes.
    pub digest: String,
    /// The distinct trusted keys whose signatures counted.
    pub keyids: Vec<String>,
}

/// Verifies a message from the snapshot topic: size, DSSE envelope of the snapshot payload
/// type, signatures by trusted, unexpired, unrevoked keys (`thresholds.snapshot`), the
/// snapshot schema and its typed rules. `Ok(None)` for an empty payload (the retained
/// snapshot was cleared: unsigned, it changes nothing). The replay guard is
/// [`replay_guard`] against the stored snapshot.
pub fn verify_snapshot(
    policy: &VerifyPolicy<'_>,
    payload: &[u8],
) -> Result<Option<VerifiedSnapshot>, Rejection> {
    static SNAPSHOTS: Kind<Snapshot> = Kind::new(
        "snapshot",
        SNAPSHOT_PAYLOAD_TYPE,
        roost_schemas::json_schema::SNAPSHOT,
        |b| Snapshot::from_json(b).map_err(|e| e.to_string()),
    );
    let signed = verify_signed(
        policy,
        payload,
        &SNAPSHOTS,
        policy.thresholds.for_snapshot(),
    )
    .map_err(|(reason, message, sequence)| Rejection {
        reason,
        message,
        deployment: None,
        sequence,
    })?;
    Ok(signed.map(|s| VerifiedSnapshot {
        snapshot: s.value,
        digest: s.digest,
        keyids: s.keyids,
    }))
}

/// What the comparison of a snapshot with the agent's holdings found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Fresh, stale or expired (stale wins over expired: it is the more specific news).
    pub state: FreshnessState,
    /// The topics of this store listed newer than held (sorted by topic).
    pub stale: Vec<StaleTopic>,
}

/// Compares a snapshot with what the agent holds. Only topics that address this store count
/// (the fleet's, its groups' (those in force), its own deployments and its own profile;
/// under this agent's topic prefix); a topic whose listed sequence is higher than the held
/// one, or that is listed but not held at all (withheld), is stale. A topic held newer than
/// listed is fine (the snapshot is older than the rollout or profile).
/// `held(scope, deployment)` is the last accepted sequence of that slot, `held_profile` the
/// last accepted profile's.
pub fn assess(
    snapshot: &Snapshot,
    topics: &Topics,
    store: &str,
    groups: &[String],
    held: impl Fn(&Scope, &str) -> Option<u64>,
    held_profile: Option<u64>,
    now: time::OffsetDateTime,
) -> Assessment {
    let stale: Vec<StaleTopic> = snapshot
        .topics
        .iter()
        .filter_map(|(topic, listed)| {
            let h = match topics.parse_deployment(topic) {
                Some(t) => {
                    scope_rank(&t.scope, store, groups)?;
                    held(&t.scope, &t.deployment)
                }
                None => {
                    (topics.parse_profile_topic(topic)? == store).then_some(())?;
                    held_profile
                }
            };
            h.is_none_or(|h| h < *listed).then(|| StaleTopic {
                topic: topic.clone(),
                listed: *listed,
                held: h,
            })
        })
        .collect();
    let state = if !stale.is_empty() {
        FreshnessState::Stale
    } else if snapshot.is_expired(now) {
        FreshnessState::Expired
    } else {
        FreshnessState::Fresh
    };
    Assessment { state, stale }
}

/// What the agent last reported, so that a report goes out once per change, not on every
/// comparison.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Reported {
    /// Nothing (fresh, or nothing compared yet).
    #[default]
    Nothing,
    /// These topics were stale.
    Stale(Vec<StaleTopic>),
    /// The snapshot of this sequence expired.
    Expired(u64),
}

/// Whether to report: a `desired.stale` event when the stale topics (or what is held of
/// them) changed, or when the snapshot expired (once per snapshot); nothing when fresh (the
/// status document says so). Returns what is reported from now on.
pub fn report(
    previous: &Reported,
    snapshot: &Snapshot,
    a: &Assessment,
) -> (Reported, Option<DesiredStale>) {
    let now = match a.state {
        FreshnessState::Stale => Reported::Stale(a.stale.clone()),
        FreshnessState::Expired => Reported::Expired(snapshot.sequence),
        FreshnessState::Fresh | FreshnessState::Unknown => Reported::Nothing,
    };
    if now == *previous || now == Reported::Nothing {
        return (now, None);
    }
    let (reason, message) = match &now {
        Reported::Stale(list) => {
            let shown: Vec<String> = list
                .iter()
                .take(10)
                .map(|t| match t.held {
                    Some(h) => format!("{} (listed {}, held {h})", t.topic, t.listed),
                    None => format!("{} (listed {}, not held)", t.topic, t.listed),
                })
                .collect();
            (
                Reason::DesiredStale,
                format!(
                    "the fleet snapshot {} lists newer desired state than this store holds (a broker withholding or rolling back?): {}{}",
                    snapshot.sequence,
                    shown.join(", "),
                    if list.len() > shown.len() { ", …" } else { "" }
                ),
            )
        }
        _ => (
            Reason::SnapshotExpired,
            format!(
                "the last fleet snapshot ({}) expired at {}: the desired state cannot be confirmed fresh (offline, or snapshots withheld)",
                snapshot.sequence, snapshot.expires
            ),
        ),
    };
    let event = DesiredStale {
        reason,
        message,
        snapshot_sequence: snapshot.sequence,
        snapshot_issued_at: snapshot.issued_at.clone(),
        snapshot_expires: snapshot.expires.clone(),
        topics: a.stale.clone(),
    };
    (now, Some(event))
}

/// Handles a message on the snapshot topic: verifies it, refuses a replay (a sequence not
/// greater than the last accepted one; the same snapshot again is ignored silently) with a
/// `rollout.rejected` event naming the topic, and records an accepted one. Returns whether
/// a snapshot was accepted.
pub async fn handle_snapshot(
    cfg: &crate::AgentConfig,
    ledger: &Ledger,
    topics: &Topics,
    topic: &str,
    payload: &[u8],
) -> bool {
    let policy = VerifyPolicy::of(cfg, topics, time::OffsetDateTime::now_utc());
    let rejected = match verify_snapshot(&policy, payload) {
        Ok(None) => {
            info!(%topic, "retained snapshot cleared on the broker; keeping the last one");
            return false;
        }
        Err(r) => r,
        Ok(Some(v)) => {
            let last = ledger.snapshot();
            let s = &v.snapshot;
            let last = last
                .as_ref()
                .map(|l| (l.snapshot.sequence, l.digest.as_str()));
            match replay_guard(
                "snapshot",
                Reason::SnapshotReplay,
                last,
                s.sequence,
                &v.digest,
            ) {
                Ok(false) => {
                    debug!(sequence = s.sequence, "snapshot already accepted");
                    return false;
                }
                Err(r) => r,
                Ok(true) => {
                    return match ledger.accept_snapshot(s, &v.digest, Vec::new()).await {
                        Ok(()) => {
                            info!(sequence = s.sequence, topics = s.topics.len(), expires = %s.expires, "fleet snapshot accepted");
                            true
                        }
                        Err(error) => {
                            warn!(error = %roost_runtime::error_chain(&error), "cannot record the fleet snapshot; dropping (it is retained and comes again)");
                            false
                        }
                    };
                }
            }
        }
    };
    warn!(%topic, reason = %rejected.reason, message = %rejected.message, "snapshot rejected");
    ledger
        .emit(vec![EventData::RolloutRejected(RolloutRejected {
            deployment: None,
            sequence: rejected.sequence,
            topic: Some(topic.to_owned()),
            revision: None,
            scope: None,
            reason: rejected.reason,
            message: rejected.message,
            detail: None,
        })])
        .await;
    false
}

/// Keeps the status document's freshness fields and reports `desired.stale`: compares the
/// stored snapshot with the accepted rollouts and profile (with the groups in force)
/// [`SETTLE`] after the last `kick` (a snapshot, rollout or profile arrived), at start, and
/// when the snapshot expires. Runs until cancelled.
pub async fn run(
    ledger: Ledger,
    topics: Topics,
    store: String,
    kick: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut reported = Reported::Nothing;
    // Evaluate once at start (a stored snapshot may have expired while the agent was down).
    let mut due = Some(tokio::time::Instant::now() + SETTLE);
    let mut first_kick: Option<tokio::time::Instant> = None;
    loop {
        let now = time::OffsetDateTime::now_utc();
        // Wake when the stored snapshot expires, to say so without a new message.
        let expiry = ledger
            .snapshot()
            .and_then(|s| s.snapshot.expires_at())
            .map(|e| e - now)
            .filter(|d| d.is_positive())
            .map(|d| {
                tokio::time::Instant::now()
                    + Duration::from_millis(d.whole_milliseconds().min(u32::MAX as i128) as u64)
                    + Duration::from_millis(10)
            });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = kick.notified() => {
                let t = tokio::time::Instant::now();
                let first = *first_kick.get_or_insert(t);
                // Debounced, but a steady stream of messages cannot postpone it forever.
                due = Some((t + SETTLE).min(first + SETTLE * 4));
                continue;
            }
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {}
            _ = async { tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)).await }, if expiry.is_some() => {}
        }
        due = None;
        first_kick = None;
        let Some(stored) = ledger.snapshot() else {
            let unknown = Freshness {
                desired_freshness: Some(FreshnessState::Unknown),
                ..Freshness::default()
            };
            if let Err(error) = ledger.set_freshness(unknown, Vec::new()).await {
                warn!(error = %roost_runtime::error_chain(&error), "cannot record freshness");
            }
            continue;
        };
        let s = &stored.snapshot;
        let a = assess(
            s,
            &topics,
            &store,
            &ledger.groups(),
            |scope, d| ledger.last_sequence(scope, d).map(|(seq, _)| seq),
            ledger.profile().map(|p| p.profile.sequence),
            time::OffsetDateTime::now_utc(),
        );
        let (next, event) = report(&reported, s, &a);
        let confirmed = match a.state {
            FreshnessState::Fresh => Some(roost_schemas::now_rfc3339()),
            _ => stored.confirmed_at.clone(),
        };
        if let Some(e) = &event {
            warn!(reason = %e.reason, snapshot = s.sequence, stale = e.topics.len(), message = %e.message, "desired state may be stale");
        }
        let f = Freshness {
            desired_freshness: Some(a.state),
            desired_confirmed_at: confirmed,
            snapshot_sequence: Some(s.sequence),
            snapshot_expires: Some(s.expires.clone()),
            stale_topics: a.stale.iter().map(|t| t.topic.clone()).collect(),
        };
        match ledger
            .set_freshness(f, event.into_iter().map(EventData::DesiredStale).collect())
            .await
        {
            Ok(()) => reported = next,
            Err(error) => {
                warn!(error = %roost_runtime::error_chain(&error), "cannot record freshness; comparing again later");
                due = Some(tokio::time::Instant::now() + SETTLE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;
    use roost_schemas::{Keyring, SigningKey};
    use std::collections::BTreeMap;

    const FLEET: &str = "roost/v1/fleet/deployments/web";
    const GROUP: &str = "roost/v1/groups/canary/deployments/web";
    const OTHER_GROUP: &str = "roost/v1/groups/emea/deployments/web";
    const MINE: &str = "roost/v1/stores/s1/deployments/menu";
    const OTHERS: &str = "roost/v1/stores/s2/deployments/menu";
    const PROFILE: &str = "roost/v1/stores/s1/profile";
    const OTHERS_PROFILE: &str = "roost/v1/stores/s2/profile";

    fn t(s: &str) -> time::OffsetDateTime {
        roost_schemas::parse_rfc3339(s).expect("time")
    }

    fn snap(seq: u64, topics: &[(&str, u64)]) -> Snapshot {
        Snapshot {
            issued_at: "2026-11-26T10:00:00Z".into(),
            expires: "2026-11-26T10:15:00Z".into(),
            sequence: seq,
            topics: topics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    fn held_of(h: &[(&str, u64)]) -> BTreeMap<String, u64> {
        h.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    /// Table: what the snapshot lists, what the agent holds, the verdict and the stale topics.
    #[test]
    fn assess_table() {
        let topics = Topics::default();
        let groups = vec!["canary".to_owned()];
        let before = t("2026-11-26T10:05:00Z");
        let after = t("2026-11-26T10:16:00Z");
        type Row<'a> = (
            &'a str,
            Vec<(&'a str, u64)>,
            Vec<(&'a str, u64)>,
            time::OffsetDateTime,
            FreshnessState,
            Vec<(&'a str, Option<u64>)>,
        );
        let rows: Vec<Row> = vec![
            (
                "empty snapshot",
                vec![],
                vec![],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "everything held",
                vec![(FLEET, 5), (GROUP, 7), (MINE, 2)],
                vec![(FLEET, 5), (GROUP, 7), (MINE, 2)],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "held newer than listed",
                vec![(FLEET, 5)],
                vec![(FLEET, 9)],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "rolled back",
                vec![(FLEET, 5)],
                vec![(FLEET, 4)],
                before,
                FreshnessState::Stale,
                vec![(FLEET, Some(4))],
            ),
            (
                "withheld",
                vec![(GROUP, 7)],
                vec![],
                before,
                FreshnessState::Stale,
                vec![(GROUP, None)],
            ),
            (
                "own store topic withheld",
                vec![(MINE, 2)],
                vec![],
                before,
                FreshnessState::Stale,
                vec![(MINE, None)],
            ),
            (
                "other stores and groups do not count",
                vec![(OTHERS, 3), (OTHER_GROUP, 3)],
                vec![],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "another prefix does not count",
                vec![("acme/v9/fleet/deployments/web", 3)],
                vec![],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "expired, all held",
                vec![(FLEET, 5)],
                vec![(FLEET, 5)],
                after,
                FreshnessState::Expired,
                vec![],
            ),
            (
                "expired and stale: stale",
                vec![(FLEET, 5)],
                vec![(FLEET, 1)],
                after,
                FreshnessState::Stale,
                vec![(FLEET, Some(1))],
            ),
            (
                "several, sorted by topic",
                vec![(MINE, 2), (FLEET, 5), (GROUP, 7)],
                vec![(GROUP, 7)],
                before,
                FreshnessState::Stale,
                vec![(FLEET, None), (MINE, None)],
            ),
            (
                "profile held as listed",
                vec![(PROFILE, 4), (FLEET, 5)],
                vec![(PROFILE, 4), (FLEET, 5)],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "profile held newer than listed",
                vec![(PROFILE, 4)],
                vec![(PROFILE, 6)],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
            (
                "a newer profile listed than held",
                vec![(PROFILE, 4)],
                vec![(PROFILE, 3)],
                before,
                FreshnessState::Stale,
                vec![(PROFILE, Some(3))],
            ),
            (
                "a profile listed, none held (withheld)",
                vec![(PROFILE, 4)],
                vec![],
                before,
                FreshnessState::Stale,
                vec![(PROFILE, None)],
            ),
            (
                "another store's profile does not count",
                vec![(OTHERS_PROFILE, 4)],
                vec![],
                before,
                FreshnessState::Fresh,
                vec![],
            ),
        ];
        for (name, listed, held, now, state, stale) in rows {
            let s = snap(100, &listed);
            let held = held_of(&held);
            let a = assess(
                &s,
                &topics,
                "s1",
                &groups,
                |scope, d| held.get(&topics.deployment(scope, d)).copied(),
                held.get(PROFILE).copied(),
                now,
            );
            assert_eq!(a.state, state, "{name}");
            let got: Vec<(&str, Option<u64>)> =
                a.stale.iter().map(|x| (x.topic.as_str(), x.held)).collect();
            assert_eq!(got, stale, "{name}");
        }
    }

    #[test]
    fn reports_once_per_change() {
        let s = snap(100, &[(FLEET, 5)]);
        let stale = |held: Option<u64>| Assessment {
            state: FreshnessState::Stale,
            stale: vec![StaleTopic {
                topic: FLEET.into(),
                listed: 5,
                held,
            }],
        };
        let fresh = Assessment {
            state: FreshnessState::Fresh,
            stale: vec![],
        };
        let expired = Assessment {
            state: FreshnessState::Expired,
            stale: vec![],
        };
        // (previous, assessment, reports?, reason)
        let rows: Vec<(&str, Reported, Assessment, Option<Reason>)> = vec![
            ("fresh: nothing", Reported::Nothing, fresh.clone(), None),
            (
                "newly stale",
                Reported::Nothing,
                stale(Some(4)),
                Some(Reason::DesiredStale),
            ),
            (
                "the same stale again",
                Reported::Stale(stale(Some(4)).stale),
                stale(Some(4)),
                None,
            ),
            (
                "stale, held changed",
                Reported::Stale(stale(Some(4)).stale),
                stale(None),
                Some(Reason::DesiredStale),
            ),
            (
                "stale resolved",
                Reported::Stale(stale(Some(4)).stale),
                fresh.clone(),
                None,
            ),
            (
                "newly expired",
                Reported::Nothing,
                expired.clone(),
                Some(Reason::SnapshotExpired),
            ),
            (
                "still expired",
                Reported::Expired(100),
                expired.clone(),
                None,
            ),
            (
                "a later snapshot expired",
                Reported::Expired(99),
                expired.clone(),
                Some(Reason::SnapshotExpired),
            ),
            (
                "stale, then only expired",
                Reported::Stale(stale(Some(4)).stale),
                expired,
                Some(Reason::SnapshotExpired),
            ),
        ];
        for (name, prev, a, want) in rows {
            let (next, ev) = report(&prev, &s, &a);
            assert_eq!(ev.as_ref().map(|e| e.reason), want, "{name}");
            if let Some(e) = ev {
                assert_eq!(e.topics, a.stale, "{name}");
                assert_eq!(e.snapshot_sequence, 100, "{name}");
                assert!(!e.message.is_empty(), "{name}");
            }
            // Asking again with what was reported reports nothing.
            assert_eq!(report(&next, &s, &a).1, None, "{name}: once");
        }
    }

    fn policy_parts() -> (Keyring, SigningKey, SigningKey, Topics) {
        let a = SigningKey::from_seed(&[41; 32]).expect("key");
        let b = SigningKey::from_seed(&[42; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(a.public_key()).expect("add");
        ring.add(b.public_key()).expect("add");
        (ring, a, b, Topics::default())
    }

    fn signed(key: &SigningKey, payload_type: &str, body: &[u8]) -> Vec<u8> {
        serde_json::to_vec(&key.sign(payload_type, body)).expect("json")
    }

    #[test]
    fn verification_reasons() {
        let (mut ring, a, b, topics) = policy_parts();
        let stranger = SigningKey::from_seed(&[43; 32]).expect("key");
        let now = t("2026-11-26T10:05:00Z");
        fn policy<'a>(
            topics: &'a Topics,
            ring: &'a Keyring,
            now: time::OffsetDateTime,
            thresholds: Thresholds,
        ) -> VerifyPolicy<'a> {
            VerifyPolicy {
                topics,
                keyring: ring,
                thresholds,
                now,
                max_message_bytes: 4096,
                allowed_sources: &[],
            }
        }
        let body = serde_json::to_vec(&snap(7, &[(FLEET, 5)])).expect("json");
        let good = signed(&a, SNAPSHOT_PAYLOAD_TYPE, &body);
        let p = policy(&topics, &ring, now, Thresholds::default());
        let v = verify_snapshot(&p, &good).expect("ok").expect("some");
        assert_eq!(v.snapshot.sequence, 7);
        assert!(verify_snapshot(&p, b"").expect("ok").is_none());
        let reason = |p: &VerifyPolicy<'_>, bytes: &[u8]| {
            verify_snapshot(p, bytes).expect_err("rejected").reason
        };
        assert_eq!(reason(&p, b"{nope"), Reason::Malformed);
        assert_eq!(reason(&p, &vec![b' '; 5000]), Reason::TooLarge);
        assert_eq!(
            reason(&p, &signed(&stranger, SNAPSHOT_PAYLOAD_TYPE, &body)),
            Reason::UnknownKey
        );
        // A rollout envelope is not a snapshot (and a snapshot never a rollout).
        assert_eq!(
            reason(&p, &signed(&a, roost_schemas::PAYLOAD_TYPE, &body)),
            Reason::Malformed
        );
        let bad_schema = serde_json::to_vec(&serde_json::json!({"sequence": 0})).expect("json");
        let r = verify_snapshot(&p, &signed(&a, SNAPSHOT_PAYLOAD_TYPE, &bad_schema))
            .expect_err("schema");
        assert_eq!((r.reason, r.sequence), (Reason::Schema, None));
        let mut backwards = snap(8, &[]);
        backwards.expires = "2026-11-26T09:00:00Z".into();
        let r = verify_snapshot(
            &p,
            &signed(
                &a,
                SNAPSHOT_PAYLOAD_TYPE,
                &serde_json::to_vec(&backwards).expect("json"),
            ),
        )
        .expect_err("typed rules");
        assert_eq!((r.reason, r.sequence), (Reason::Schema, Some(8)));
        // The snapshot threshold is its own kind.
        let two = policy(
            &topics,
            &ring,
            now,
            Thresholds {
                snapshot: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(reason(&two, &good), Reason::ThresholdNotMet);
        let both = roost_schemas::sign_all(&[a, b], SNAPSHOT_PAYLOAD_TYPE, &body).expect("env");
        assert!(verify_snapshot(&two, &serde_json::to_vec(&both).expect("json")).is_ok());
        let fleet_two = policy(
            &topics,
            &ring,
            now,
            Thresholds {
                fleet: Some(2),
                ..Default::default()
            },
        );
        assert!(
            verify_snapshot(&fleet_two, &good).is_ok(),
            "the fleet threshold does not apply to snapshots"
        );
        ring.revoke(&both.signatures[0].keyid);
        assert_eq!(
            reason(&policy(&topics, &ring, now, Thresholds::default()), &good),
            Reason::RevokedKey
        );
    }
}

#[cfg(test)]
mod props {
    //! Snapshot verification never panics, and accepts only an untouched, signed snapshot.
    use super::*;
    use crate::config::Thresholds;
    use proptest::prelude::*;
    use roost_schemas::{Keyring, SigningKey};

    fn setup() -> (Keyring, SigningKey) {
        let a = SigningKey::from_seed(&[51; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(a.public_key()).expect("add");
        (ring, a)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_nor_verify(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let (ring, _) = setup();
            let topics = Topics::default();
            let pol = VerifyPolicy {
                topics: &topics, keyring: &ring, thresholds: Thresholds::default(),
                now: time::OffsetDateTime::now_utc(), max_message_bytes: 2048, allowed_sources: &[],
            };
            prop_assert!(matches!(verify_snapshot(&pol, &bytes), Err(_) | Ok(None)));
        }

        #[test]
        fn signed_arbitrary_payloads_never_panic(
            seq in any::<u64>(),
            topics_in in proptest::collection::btree_map("[a-z/+#0-9-]{0,40}", any::<u64>(), 0..8),
            issued in "[0-9TZ:.+-]{0,30}",
            mutate in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let (ring, a) = setup();
            let topics = Topics::default();
            let pol = VerifyPolicy {
                topics: &topics, keyring: &ring, thresholds: Thresholds::default(),
                now: time::OffsetDateTime::now_utc(), max_message_bytes: 64 * 1024, allowed_sources: &[],
            };
            let body = serde_json::to_vec(&serde_json::json!({
                "issued_at": issued, "expires": "2030-01-01T00:00:00Z", "sequence": seq, "topics": topics_in,
            })).expect("json");
            let env = serde_json::to_vec(&a.sign(SNAPSHOT_PAYLOAD_TYPE, &body)).expect("json");
            if let Ok(Some(v)) = verify_snapshot(&pol, &env) {
                prop_assert!(v.snapshot.validate().is_ok());
                let now = time::OffsetDateTime::now_utc();
                let _ = assess(&v.snapshot, &topics, "s1", &["g".to_owned()], |_, _| None, None, now);
            }
            let mut bytes = env.clone();
            let i = mutate.index(bytes.len());
            bytes[i] = byte;
            if let Ok(Some(v)) = verify_snapshot(&pol, &bytes) {
                // Only a change outside what is signed may still verify.
                prop_assert_eq!(Some(v.snapshot), Snapshot::from_json(&body).ok());
            }
        }
    }
}
