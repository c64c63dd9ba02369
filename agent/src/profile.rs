//! The store profile (`roost/v1/stores/{store}/profile`): verification exactly as for
//! rollouts (size, DSSE by trusted keys with the store threshold, the profile schema, the
//! store and topic), the replay guard, and which deployments a new store context renders
//! again ([`context_for`]). The accepted profile gives the store context (groups in force,
//! labels, vars, time zone; `Ledger::store_context`); the configured groups count only until
//! the first profile is accepted.

use roost_schemas::payload::{ProfileAccepted, ProfileRejected};
use roost_schemas::{EventData, Profile, Reason, Rollout, PROFILE_PAYLOAD_TYPE};
use tracing::{debug, info, warn};

use crate::ledger::{Ledger, StoredProfile};
use crate::personalize::StoreContext;
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

/// The digest of what rendering `rollout` reads from the store `context` (its groups, for
/// `_groups/<group>/` overlays, and with `policy.substitute` its labels, vars and time zone
/// too), when that differs from what the configured context `bootstrap` gives; `None`: it
/// renders as with `agent.toml` alone. A deployment's desired state carries it, so a new
/// profile renders and applies again exactly the deployments whose rendering it changes (a
/// profile with new vars re-applies only those with `policy.substitute`), and a store that
/// never had a profile re-applies nothing.
pub fn context_for(
    rollout: &Rollout,
    context: &StoreContext,
    bootstrap: &StoreContext,
) -> Option<String> {
    let read = |c: &StoreContext| {
        if rollout.policy.substitute {
            c.clone()
        } else {
            StoreContext {
                store: c.store.clone(),
                groups: c.groups.clone(),
                ..StoreContext::default()
            }
        }
    };
    let (now, configured) = (read(context), read(bootstrap));
    (now != configured).then(|| now.digest())
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
    let after = ledger.bootstrap().with_profile(&v.profile);
    let changed = after.changes(&before);
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
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
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
        assert_eq!(v.profile.groups, Some(vec!["east".to_owned()]));
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

    fn configured() -> StoreContext {
        StoreContext {
            store: "s1".into(),
            groups: vec!["configured".into()],
            ..StoreContext::default()
        }
    }

    async fn open(dir: &std::path::Path) -> (roost_runtime::Outbox, Ledger) {
        let outbox =
            roost_runtime::Outbox::open(roost_runtime::OutboxConfig::new(dir.join("outbox.db")))
                .expect("outbox");
        let ledger = Ledger::open(
            outbox.clone(),
            "ev".into(),
            "roost://stores/s1/agent".into(),
            configured(),
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

    /// Which deployments a new context renders again: with `policy.substitute` any change
    /// of what it reads, else only the groups (overlays); nothing while the context is the
    /// configured one.
    #[test]
    fn a_new_context_renders_again_what_reads_it() {
        let plain: Rollout = serde_json::from_value(serde_json::json!({
            "deployment": "web", "scope": {"fleet": true}, "sequence": 1,
            "issued_at": "2026-12-06T03:00:00Z",
            "source": {"url": "git://h/r.git", "revision": "a".repeat(40), "path": "app"},
        }))
        .expect("rollout");
        let mut substituted = plain.clone();
        substituted.policy.substitute = true;
        let boot = configured();
        let same_groups = boot.with_profile(&Profile {
            groups: None,
            ..profile("s1", 1, &[])
        });
        let moved = boot.with_profile(&profile("s1", 2, &["south"]));
        let mut new_var = same_groups.clone();
        new_var.vars.insert("printer_ip".into(), "10.0.0.9".into());
        assert_eq!(new_var.changes(&same_groups), ["vars"]);
        assert_eq!(moved.changes(&same_groups), ["groups"]);
        // (case, rollout, context, renders with a context digest)
        let rows: Vec<(&str, &Rollout, &StoreContext, bool)> = vec![
            ("no profile", &plain, &boot, false),
            ("no profile, substitute", &substituted, &boot, false),
            ("labels and vars only", &plain, &same_groups, false),
            (
                "labels and vars, substitute",
                &substituted,
                &same_groups,
                true,
            ),
            ("moved to other groups", &plain, &moved, true),
            ("moved, substitute", &substituted, &moved, true),
        ];
        for (case, r, c, some) in rows {
            assert_eq!(context_for(r, c, &boot).is_some(), some, "{case}");
        }
        // A changed var is a new digest for a substituting deployment, none for another.
        assert_ne!(
            context_for(&substituted, &new_var, &boot),
            context_for(&substituted, &same_groups, &boot)
        );
        assert_eq!(context_for(&plain, &new_var, &boot), None);
    }
}
