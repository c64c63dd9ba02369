//! The store profile (`roost/v1/stores/{store}/profile`): verification exactly as for
//! rollouts (size, DSSE by trusted keys with the store threshold, the profile schema, the
//! store and topic), the replay guard, and [`StoreContext`], what the agent knows about its
//! own store: the groups in force (precedence) and the labels, vars and time zone rendering
//! reads. The configured groups count only until the first profile is accepted.

use std::collections::BTreeMap;

use roost_schemas::payload::{ProfileAccepted, ProfileRejected};
use roost_schemas::{EventData, Profile, Reason, Rollout, PROFILE_PAYLOAD_TYPE};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::ledger::{Ledger, StoredProfile};
use crate::verify::{replay_guard, verify_signed, Kind, Rejection, Signed, VerifyPolicy};

/// A verified store profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProfile {
    /// The payload.
    pub profile: Profile,
    /// SHA-256 (hex) of the payload bytes.
    pub digest: String,
    /// The distinct trusted keys whose signatures counted.
    pub keyids: Vec<String>,
}

/// What the agent knows about its own store: from the last accepted profile, or before the
/// first one its name and configured groups (no labels or vars, UTC). The one source of the
/// groups in force and of the values `${roost.…}` substitution and overlays read
/// ([`Ledger::store_context`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreContext {
    /// The store's name.
    pub store: String,
    /// Its groups in precedence order (first wins after the store's own scope).
    pub groups: Vec<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Values for `${roost.vars.KEY}`.
    pub vars: BTreeMap<String, String>,
    /// IANA time zone; `None` is UTC.
    pub timezone: Option<String>,
}

impl StoreContext {
    /// The context before any profile: the configured groups only.
    pub fn bootstrap(store: &str, groups: &[String]) -> StoreContext {
        StoreContext {
            store: store.to_owned(),
            groups: groups.to_vec(),
            ..StoreContext::default()
        }
    }

    /// The context a profile gives.
    pub fn of(profile: &Profile) -> StoreContext {
        StoreContext {
            store: profile.store.clone(),
            groups: profile.groups.clone(),
            labels: profile.labels.clone(),
            vars: profile.vars.clone(),
            timezone: profile.timezone.clone(),
        }
    }

    /// What differs from `before`, by field name (`groups`, `labels`, `vars`, `timezone`).
    pub fn changes(&self, before: &StoreContext) -> Vec<String> {
        [
            ("groups", self.groups != before.groups),
            ("labels", self.labels != before.labels),
            ("vars", self.vars != before.vars),
            ("timezone", self.timezone != before.timezone),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name.to_owned())
        .collect()
    }

    /// SHA-256 (hex) of everything a rendering may read from the context, so a record can
    /// say which context its revision was rendered with.
    pub fn digest(&self) -> String {
        let json = serde_json::json!({
            "store": self.store,
            "groups": self.groups,
            "labels": self.labels,
            "vars": self.vars,
            "timezone": self.timezone,
        });
        hex::encode(Sha256::digest(json.to_string().as_bytes()))
    }
}

/// HOOK for per-store rendering (`policy.substitute`, overlays): whether rendering `rollout`
/// reads the store context, so that a new context (a changed var, label, time zone or
/// group) must render and apply it again. Until that rendering exists, no rollout does, and
/// a profile that changes only labels, vars or the time zone re-applies nothing. With it,
/// this becomes `rollout.policy.substitute` (or "the revision has overlays").
pub fn renders_with_store_context(rollout: &Rollout) -> bool {
    let _ = rollout;
    false
}

/// The context digest a deployment's desired state carries: `Some` only when its rendering
/// reads the store context ([`renders_with_store_context`]).
pub fn context_for(rollout: &Rollout, context: &StoreContext) -> Option<String> {
    renders_with_store_context(rollout).then(|| context.digest())
}

/// Verifies a message from a profile topic for `store`: the topic is `store`'s own profile
/// topic, size, DSSE envelope of [`PROFILE_PAYLOAD_TYPE`] signed by trusted, unexpired,
/// unrevoked keys (the store kind's threshold: a profile is store-scoped), the profile
/// schema and its typed rules, and `store` in the payload. `Ok(None)` for an empty payload
/// (the retained profile was cleared: unsigned, it changes nothing). The replay guard is
/// [`replay_guard`] against the stored profile.
pub fn verify_profile(
    policy: &VerifyPolicy<'_>,
    store: &str,
    topic: &str,
    payload: &[u8],
) -> Result<Option<VerifiedProfile>, Rejection> {
    let reject = |reason: Reason, message: String, sequence: Option<u64>| Rejection {
        reason,
        message,
        deployment: None,
        sequence,
    };
    match policy.topics.parse_profile_topic(topic) {
        Some(s) if s == store => {}
        Some(s) => {
            return Err(reject(
                Reason::ScopeMismatch,
                format!("the profile topic of store {s}, not of {store}"),
                None,
            ))
        }
        None => {
            return Err(reject(
                Reason::Malformed,
                format!("not a profile topic: {topic}"),
                None,
            ))
        }
    }
    static PROFILES: Kind<Profile> = Kind::new(
        "profile",
        PROFILE_PAYLOAD_TYPE,
        roost_schemas::json_schema::PROFILE,
        |b| Profile::from_payload(b).map_err(|e| e.to_string()),
    );
    let Some(Signed {
        value: profile,
        digest,
        keyids,
    }) = verify_signed(policy, payload, &PROFILES, policy.thresholds.for_profile())
        .map_err(|(r, m, s)| reject(r, m, s))?
    else {
        return Ok(None);
    };
    if profile.store != store {
        return Err(reject(
            Reason::ScopeMismatch,
            format!(
                "the profile is for store {}, this is {store}",
                profile.store
            ),
            Some(profile.sequence),
        ));
    }
    Ok(Some(VerifiedProfile {
        digest,
        profile,
        keyids,
    }))
}

/// A profile the agent accepted: the context before and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The context in force before.
    pub before: StoreContext,
    /// The context in force from now on.
    pub after: StoreContext,
}

/// Handles a message on the store's profile topic: verifies it, refuses a replay (a
/// sequence not greater than the last accepted one; the same profile again is ignored
/// silently) and every other failure with a `profile.rejected` event, and records an
/// accepted one with its `profile.accepted` event in one transaction. Returns what changed
/// when a profile was accepted.
pub async fn handle_profile(
    policy: &VerifyPolicy<'_>,
    ledger: &Ledger,
    topic: &str,
    payload: &[u8],
) -> Option<Accepted> {
    let store = ledger.store_context().store;
    let rejected = match verify_profile(policy, &store, topic, payload) {
        Ok(None) => {
            info!(%topic, "retained profile cleared on the broker; keeping the one in force");
            return None;
        }
        Err(r) => r,
        Ok(Some(v)) => {
            let last = ledger.profile();
            let last = last
                .as_ref()
                .map(|l| (l.profile.sequence, l.digest.as_str()));
            match replay_guard(
                "profile",
                Reason::Replay,
                last,
                v.profile.sequence,
                &v.digest,
            ) {
                Ok(true) => return accept(ledger, &v, payload).await,
                Ok(false) => {
                    debug!(sequence = v.profile.sequence, "profile already accepted");
                    return None;
                }
                Err(r) => r,
            }
        }
    };
    warn!(%topic, reason = %rejected.reason, sequence = rejected.sequence, message = %rejected.message, "profile rejected");
    ledger
        .emit(vec![EventData::ProfileRejected(ProfileRejected {
            topic: topic.to_owned(),
            sequence: rejected.sequence,
            reason: rejected.reason,
            message: rejected.message,
        })])
        .await;
    None
}

async fn accept(ledger: &Ledger, v: &VerifiedProfile, envelope: &[u8]) -> Option<Accepted> {
    let before = ledger.store_context();
    let after = StoreContext::of(&v.profile);
    let changed = if ledger.profile().is_none() {
        // The first profile: say what it sets, beside the groups it replaces.
        let mut c = after.changes(&StoreContext::default());
        if !c.iter().any(|x| x == "groups") && after.groups != before.groups {
            c.insert(0, "groups".to_owned());
        }
        c
    } else {
        after.changes(&before)
    };
    let event = EventData::ProfileAccepted(ProfileAccepted {
        sequence: v.profile.sequence,
        groups: after.groups.clone(),
        previous_groups: before.groups.clone(),
        changed: changed.clone(),
    });
    let stored = StoredProfile {
        profile: v.profile.clone(),
        digest: v.digest.clone(),
    };
    match ledger.accept_profile(&stored, envelope, event).await {
        Ok(()) => {
            info!(sequence = v.profile.sequence, groups = ?after.groups, previous_groups = ?before.groups, ?changed, "profile accepted");
            Some(Accepted { before, after })
        }
        Err(error) => {
            warn!(error = %roost_runtime::error_chain(&error), "cannot record the profile; dropping (it is retained and comes again)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;
    use roost_schemas::{Envelope, Keyring, SigningKey, Topics};

    const MINE: &str = "roost/v1/stores/s1/profile";

    fn profile(store: &str, seq: u64, groups: &[&str]) -> Profile {
        Profile {
            store: store.into(),
            sequence: seq,
            issued_at: "2026-12-06T03:00:00Z".into(),
            labels: [("region".to_owned(), "us-south".to_owned())].into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            timezone: Some("America/Chicago".into()),
            vars: [("store_number".to_owned(), "0042".to_owned())].into(),
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_seed(&[seed; 32]).expect("key")
    }

    /// Envelope bytes of `body` as a `payload_type` payload, signed by the keys of `seeds`.
    fn signed(seeds: &[u8], payload_type: &str, body: &[u8]) -> Vec<u8> {
        let keys: Vec<SigningKey> = seeds.iter().map(|s| key(*s)).collect();
        let env = roost_schemas::sign_all(&keys, payload_type, body).expect("sign");
        serde_json::to_vec(&env).expect("json")
    }

    fn body(p: &Profile) -> Vec<u8> {
        serde_json::to_vec(p).expect("json")
    }

    /// Every stage of verification with its reason code, as for rollouts.
    #[test]
    fn every_stage_has_its_reason() {
        let (a, b, stranger) = (61, 62, 63);
        let mut ring = Keyring::new();
        ring.add(key(a).public_key()).expect("add");
        ring.add(key(b).public_key()).expect("add");
        let topics = Topics::default();
        fn policy<'a>(
            topics: &'a Topics,
            ring: &'a Keyring,
            thresholds: Thresholds,
        ) -> VerifyPolicy<'a> {
            VerifyPolicy {
                topics,
                keyring: ring,
                thresholds,
                now: roost_schemas::parse_rfc3339("2026-12-06T03:00:00Z").expect("t"),
                max_message_bytes: 4096,
                allowed_sources: &[],
            }
        }
        let p = policy(&topics, &ring, Thresholds::default());
        let good = signed(
            &[a],
            PROFILE_PAYLOAD_TYPE,
            &body(&profile("s1", 5, &["east"])),
        );
        let v = verify_profile(&p, "s1", MINE, &good)
            .expect("ok")
            .expect("some");
        assert_eq!(v.profile.groups, ["east"]);
        assert_eq!(v.keyids, [key(a).key_id()]);
        assert!(verify_profile(&p, "s1", MINE, b"").expect("ok").is_none());

        let reason = |p: &VerifyPolicy<'_>, topic: &str, bytes: &[u8]| {
            let r = verify_profile(p, "s1", topic, bytes).expect_err("rejected");
            assert!(!r.message.is_empty());
            (r.reason, r.sequence)
        };
        // (what, topic, payload, reason, sequence reported)
        let mut forged: Envelope = serde_json::from_slice(&good).expect("env");
        let other: Envelope = serde_json::from_slice(&signed(
            &[a],
            PROFILE_PAYLOAD_TYPE,
            &body(&profile("s1", 6, &["west"])),
        ))
        .expect("env");
        forged.payload = other.payload;
        let mut seq_zero = serde_json::to_value(profile("s1", 1, &[])).expect("json");
        seq_zero["sequence"] = serde_json::json!(0);
        let mut windows = serde_json::to_value(profile("s1", 7, &[])).expect("json");
        windows["windows"] = serde_json::json!([]);
        type Case<'a> = (&'a str, &'a str, Vec<u8>, Reason, Option<u64>);
        let cases: Vec<Case> = vec![
            ("not JSON", MINE, b"{nope".to_vec(), Reason::Malformed, None),
            ("oversize", MINE, vec![b' '; 5000], Reason::TooLarge, None),
            (
                "an untrusted key",
                MINE,
                signed(
                    &[stranger],
                    PROFILE_PAYLOAD_TYPE,
                    &body(&profile("s1", 5, &[])),
                ),
                Reason::UnknownKey,
                None,
            ),
            (
                "a forged signature (payload swapped)",
                MINE,
                serde_json::to_vec(&forged).expect("json"),
                Reason::BadSignature,
                None,
            ),
            (
                "a rollout's payload type",
                MINE,
                signed(
                    &[a],
                    roost_schemas::PAYLOAD_TYPE,
                    &body(&profile("s1", 5, &[])),
                ),
                Reason::Malformed,
                None,
            ),
            (
                "a snapshot's payload type",
                MINE,
                signed(
                    &[a],
                    roost_schemas::SNAPSHOT_PAYLOAD_TYPE,
                    &body(&profile("s1", 5, &[])),
                ),
                Reason::Malformed,
                None,
            ),
            (
                "sequence 0",
                MINE,
                signed(
                    &[a],
                    PROFILE_PAYLOAD_TYPE,
                    &serde_json::to_vec(&seq_zero).expect("json"),
                ),
                Reason::Schema,
                None,
            ),
            (
                "a field the profile does not have",
                MINE,
                signed(
                    &[a],
                    PROFILE_PAYLOAD_TYPE,
                    &serde_json::to_vec(&windows).expect("json"),
                ),
                Reason::Schema,
                Some(7),
            ),
            (
                "a group twice (a typed rule beyond the schema's reach)",
                MINE,
                signed(
                    &[a],
                    PROFILE_PAYLOAD_TYPE,
                    &body(&profile("s1", 8, &["g", "g"])),
                ),
                Reason::Schema,
                Some(8),
            ),
            (
                "another store's profile on this store's topic",
                MINE,
                signed(&[a], PROFILE_PAYLOAD_TYPE, &body(&profile("s2", 9, &[]))),
                Reason::ScopeMismatch,
                Some(9),
            ),
            (
                "this store's profile on another store's topic",
                "roost/v1/stores/s2/profile",
                good.clone(),
                Reason::ScopeMismatch,
                None,
            ),
            (
                "not a profile topic",
                "roost/v1/fleet/deployments/web",
                good.clone(),
                Reason::Malformed,
                None,
            ),
        ];
        for (what, topic, bytes, want, seq) in cases {
            assert_eq!(reason(&p, topic, &bytes), (want, seq), "{what}");
        }
        // The store kind's threshold counts for profiles; the fleet's does not.
        let store_two = policy(
            &topics,
            &ring,
            Thresholds {
                store: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(
            reason(&store_two, MINE, &good),
            (Reason::ThresholdNotMet, None)
        );
        let both = signed(&[a, b], PROFILE_PAYLOAD_TYPE, &body(&profile("s1", 5, &[])));
        assert!(verify_profile(&store_two, "s1", MINE, &both).is_ok());
        let fleet_two = policy(
            &topics,
            &ring,
            Thresholds {
                fleet: Some(2),
                ..Default::default()
            },
        );
        assert!(verify_profile(&fleet_two, "s1", MINE, &good).is_ok());
        // Key rotation: a revoked key's profile is refused.
        let mut revoked = ring.clone();
        revoked.revoke(&key(a).key_id());
        assert_eq!(
            reason(
                &policy(&topics, &revoked, Thresholds::default()),
                MINE,
                &good
            ),
            (Reason::RevokedKey, None)
        );
    }

    /// The event types and reasons in a ledger's outbox, in order.
    async fn events(outbox: &roost_runtime::Outbox) -> Vec<(String, Option<String>)> {
        outbox
            .peek(0, 1000)
            .await
            .expect("peek")
            .into_iter()
            .filter_map(|m| serde_json::from_slice::<roost_schemas::CloudEvent>(&m.payload).ok())
            .map(|e| (e.ty.clone(), e.reason().map(str::to_owned)))
            .collect()
    }

    async fn open(dir: &std::path::Path) -> (roost_runtime::Outbox, Ledger) {
        let outbox =
            roost_runtime::Outbox::open(roost_runtime::OutboxConfig::new(dir.join("outbox.db")))
                .expect("outbox");
        let ledger = Ledger::open(
            outbox.clone(),
            "ev".into(),
            "roost://stores/s1/agent".into(),
            StoreContext::bootstrap("s1", &["configured".into()]),
        )
        .await
        .expect("ledger");
        (outbox, ledger)
    }

    /// The replay guard: a profile is accepted (with its event, in one commit) only with a
    /// sequence greater than the last accepted one; the same profile again is ignored
    /// silently; an older or equal different one is refused as `replay`, also after a
    /// restart (the guard is in the ledger). Until the first profile the configured groups
    /// are in force.
    #[tokio::test]
    async fn the_replay_guard_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tmp");
        let topics = Topics::default();
        let mut ring = Keyring::new();
        ring.add(key(71).public_key()).expect("add");
        let policy = VerifyPolicy {
            topics: &topics,
            keyring: &ring,
            thresholds: Thresholds::default(),
            now: time::OffsetDateTime::now_utc(),
            max_message_bytes: 64 * 1024,
            allowed_sources: &[],
        };
        let msg = |seq: u64, groups: &[&str]| {
            signed(
                &[71],
                PROFILE_PAYLOAD_TYPE,
                &body(&profile("s1", seq, groups)),
            )
        };
        let (outbox, ledger) = open(dir.path()).await;
        assert_eq!(ledger.groups(), ["configured"]);
        assert_eq!(ledger.store_context().labels.len(), 0);
        let first = msg(5, &["east"]);
        let a = handle_profile(&policy, &ledger, MINE, &first)
            .await
            .expect("accepted");
        assert_eq!(
            (a.before.groups.clone(), a.after.groups.clone()),
            (vec!["configured".to_owned()], vec!["east".to_owned()])
        );
        assert_eq!(ledger.groups(), ["east"]);
        assert!(handle_profile(&policy, &ledger, MINE, &first)
            .await
            .is_none());
        assert!(handle_profile(&policy, &ledger, MINE, &msg(4, &["west"]))
            .await
            .is_none());
        assert_eq!(ledger.groups(), ["east"], "a replay changes nothing");
        let want = vec![
            ("dev.roost.profile.accepted".to_owned(), None),
            (
                "dev.roost.profile.rejected".to_owned(),
                Some("replay".to_owned()),
            ),
        ];
        assert_eq!(events(&outbox).await, want);
        drop((outbox, ledger));

        let (outbox, ledger) = open(dir.path()).await;
        assert_eq!(ledger.groups(), ["east"], "the profile survives a restart");
        assert_eq!(ledger.profile().map(|p| p.profile.sequence), Some(5));
        assert!(handle_profile(&policy, &ledger, MINE, &first)
            .await
            .is_none());
        assert!(handle_profile(&policy, &ledger, MINE, &msg(5, &["west"]))
            .await
            .is_none());
        assert!(handle_profile(&policy, &ledger, MINE, &msg(3, &["west"]))
            .await
            .is_none());
        let mut vars = profile("s1", 6, &["east"]);
        vars.vars.insert("printer_ip".into(), "10.0.0.9".into());
        let a = handle_profile(
            &policy,
            &ledger,
            MINE,
            &signed(&[71], PROFILE_PAYLOAD_TYPE, &body(&vars)),
        )
        .await
        .expect("newer accepted");
        assert_eq!(a.after.changes(&a.before), ["vars"]);
        let types: Vec<(String, Option<String>)> = events(&outbox).await.split_off(2);
        assert_eq!(
            types,
            vec![
                (
                    "dev.roost.profile.rejected".to_owned(),
                    Some("replay".to_owned())
                ),
                (
                    "dev.roost.profile.rejected".to_owned(),
                    Some("replay".to_owned())
                ),
                ("dev.roost.profile.accepted".to_owned(), None),
            ]
        );
    }

    #[test]
    fn changes_name_the_fields_that_differ() {
        let before = StoreContext::of(&profile("s1", 1, &["east"]));
        assert!(before.changes(&before).is_empty());
        let mut after = before.clone();
        after.groups = vec!["south".into()];
        after.vars.insert("printer_ip".into(), "10.0.0.2".into());
        assert_eq!(after.changes(&before), ["groups", "vars"]);
        assert_ne!(after.digest(), before.digest());
        let mut tz = before.clone();
        tz.timezone = None;
        assert_eq!(tz.changes(&before), ["timezone"]);
        assert_eq!(
            StoreContext::bootstrap("s1", &["east".into()]).changes(&StoreContext::default()),
            ["groups"]
        );
    }
}
