//! Verification of a received rollout envelope, stage by stage, each failure with its reason
//! code. Pure: no I/O, so every rejection path is unit-tested. The replay guard, which needs
//! the stored sequence, is [`crate::decide::classify_sequence`].

use roost_schemas::topics::DeploymentTopic;
use roost_schemas::{Envelope, Keyring, Reason, Rollout, Topics, PAYLOAD_TYPE};
use sha2::{Digest, Sha256};

use crate::config::Thresholds;
use crate::decide::{classify_sequence, source_allowed, SequenceVerdict, SourceUrl};

/// A verified rollout.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The topic it came on.
    pub topic: DeploymentTopic,
    /// The payload.
    pub rollout: Rollout,
    /// SHA-256 (hex) of the payload bytes.
    pub digest: String,
    /// The distinct trusted keys whose signatures counted.
    pub keyids: Vec<String>,
}

/// A rejected message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Reason code.
    pub reason: Reason,
    /// Human-readable detail.
    pub message: String,
    /// Deployment, when known (from the topic).
    pub deployment: Option<String>,
    /// Sequence, when the payload could be read.
    pub sequence: Option<u64>,
}

/// Inputs to verification that come from configuration.
#[derive(Debug, Clone)]
pub struct VerifyPolicy<'a> {
    /// Topic names.
    pub topics: &'a Topics,
    /// Trusted keys, with expiry times and revocations.
    pub keyring: &'a Keyring,
    /// Signatures needed per scope kind (of the topic that carried the message).
    pub thresholds: Thresholds,
    /// The time key expiry is judged at.
    pub now: time::OffsetDateTime,
    /// Largest message.
    pub max_message_bytes: usize,
    /// The parsed source allow-list.
    pub allowed_sources: &'a [SourceUrl],
}

impl<'a> VerifyPolicy<'a> {
    /// The policy of an agent configuration, judging key expiry at `now`.
    pub fn of(
        cfg: &'a crate::AgentConfig,
        topics: &'a Topics,
        now: time::OffsetDateTime,
    ) -> VerifyPolicy<'a> {
        VerifyPolicy {
            topics,
            keyring: &cfg.keyring,
            thresholds: cfg.file.thresholds,
            now,
            max_message_bytes: cfg.file.limits.max_message_bytes,
            allowed_sources: &cfg.allowed_sources,
        }
    }
}

/// Verifies a message from a deployment topic. `Ok(None)` for an empty payload (a retained
/// message was cleared on the broker: not signed, so it changes nothing).
pub fn verify_message(
    policy: &VerifyPolicy<'_>,
    topic: &str,
    payload: &[u8],
) -> Result<Option<Verified>, Rejection> {
    let parsed_topic = policy.topics.parse_deployment(topic);
    let deployment = parsed_topic.as_ref().map(|t| t.deployment.clone());
    let reject = |reason: Reason, message: String, sequence: Option<u64>| Rejection {
        reason,
        message,
        deployment: deployment.clone(),
        sequence,
    };
    let Some(topic_info) = parsed_topic.clone() else {
        return Err(reject(
            Reason::Malformed,
            format!("not a deployment topic: {topic}"),
            None,
        ));
    };
    static ROLLOUTS: Kind<Rollout> = Kind::new(
        "message",
        PAYLOAD_TYPE,
        roost_schemas::json_schema::ROLLOUT,
        |b| Rollout::from_json(b).map_err(|e| e.to_string()),
    );
    let threshold = policy.thresholds.for_scope(&topic_info.scope);
    let Some(Signed {
        value: rollout,
        digest,
        keyids,
    }) = verify_signed(policy, payload, &ROLLOUTS, threshold)
        .map_err(|(r, m, s)| reject(r, m, s))?
    else {
        return Ok(None);
    };
    let seq = Some(rollout.sequence);
    if rollout.scope != topic_info.scope {
        return Err(reject(
            Reason::ScopeMismatch,
            format!(
                "payload scope {} does not match topic scope {}",
                rollout.scope, topic_info.scope
            ),
            seq,
        ));
    }
    if rollout.deployment != topic_info.deployment {
        return Err(reject(
            Reason::ScopeMismatch,
            format!(
                "payload deployment {} does not match topic deployment {}",
                rollout.deployment, topic_info.deployment
            ),
            seq,
        ));
    }
    if let Some(src) = &rollout.source {
        if !rollout.remove {
            if let Err(e) = source_allowed(&src.url, policy.allowed_sources) {
                return Err(reject(Reason::SourceNotAllowed, e.to_string(), seq));
            }
        }
    }
    Ok(Some(Verified {
        topic: topic_info,
        digest,
        rollout,
        keyids,
    }))
}

/// One kind of signed message: its name in messages, its DSSE payload type, its JSON Schema
/// (compiled once, on first use) and its typed rules. Meant for a `static`.
pub(crate) struct Kind<T> {
    what: &'static str,
    payload_type: &'static str,
    schema: &'static str,
    validator: std::sync::OnceLock<Option<jsonschema::Validator>>,
    parse: fn(&[u8]) -> Result<T, String>,
}

impl<T> Kind<T> {
    /// A kind called `what` in messages, carried as `payload_type`, whose payload must match
    /// the JSON Schema `schema` and pass `parse` (the typed rules).
    pub(crate) const fn new(
        what: &'static str,
        payload_type: &'static str,
        schema: &'static str,
        parse: fn(&[u8]) -> Result<T, String>,
    ) -> Kind<T> {
        Kind {
            what,
            payload_type,
            schema,
            validator: std::sync::OnceLock::new(),
            parse,
        }
    }
}

/// A payload that passed the stages every signed message shares.
#[derive(Debug)]
pub(crate) struct Signed<T> {
    /// The typed payload.
    pub value: T,
    /// SHA-256 (hex) of the payload bytes.
    pub digest: String,
    /// The distinct trusted keys whose signatures counted.
    pub keyids: Vec<String>,
}

/// The stages every signed message (rollout, snapshot, profile) shares, each failure with its
/// reason code and, when readable, the payload's sequence: size (`too_large`), the DSSE
/// envelope (`malformed`), `threshold` distinct trusted, unexpired, unrevoked keys signing
/// `kind`'s payload type (`bad_signature`, `unknown_key`, `expired_key`, `revoked_key`,
/// `threshold_not_met`; another payload type is `malformed`), then the contract's JSON Schema
/// (the same file other implementations use) and the typed rules, which must both agree
/// (`schema`). `Ok(None)` for an empty payload (a retained message was cleared: unsigned, it
/// changes nothing).
pub(crate) fn verify_signed<T>(
    policy: &VerifyPolicy<'_>,
    payload: &[u8],
    kind: &Kind<T>,
    threshold: usize,
) -> Result<Option<Signed<T>>, (Reason, String, Option<u64>)> {
    let Some(env) = read_envelope(policy, payload, kind.what).map_err(|(r, m)| (r, m, None))?
    else {
        return Ok(None);
    };
    let signed = policy
        .keyring
        .verify_with(&env, kind.payload_type, policy.now, threshold)
        .map_err(|e| (e.reason(), e.to_string(), None))?;
    let body = signed.payload;
    if let Some(problem) = schema_problem_in(&kind.validator, kind.schema, &body) {
        return Err((Reason::Schema, problem, payload_sequence(&body)));
    }
    let value = (kind.parse)(&body).map_err(|e| (Reason::Schema, e, payload_sequence(&body)))?;
    Ok(Some(Signed {
        value,
        digest: hex::encode(Sha256::digest(&body)),
        keyids: signed.keyids,
    }))
}

/// The replay guard of a verified signed message of `kind` (`profile`, `snapshot`), against
/// the last accepted `(sequence, payload digest)`: `Ok(true)` to accept, `Ok(false)` for the
/// same message again (a retained redelivery, ignored silently), or the rejection with
/// `reason` when its sequence is not greater than the last accepted one.
pub fn replay_guard(
    kind: &str,
    reason: Reason,
    last: Option<(u64, &str)>,
    sequence: u64,
    digest: &str,
) -> Result<bool, Rejection> {
    match classify_sequence(last, sequence, digest) {
        SequenceVerdict::Accept => Ok(true),
        SequenceVerdict::Duplicate => Ok(false),
        SequenceVerdict::Replay => Err(Rejection {
            reason,
            message: format!(
                "{kind} sequence {sequence} is not greater than the last accepted {}",
                last.map(|l| l.0).unwrap_or(0)
            ),
            deployment: None,
            sequence: Some(sequence),
        }),
    }
}

/// The DSSE envelope of a message: `Ok(None)` for an empty payload (a retained message was
/// cleared), `too_large` past the size limit, `malformed` when it is not an envelope.
fn read_envelope(
    policy: &VerifyPolicy<'_>,
    payload: &[u8],
    what: &str,
) -> Result<Option<Envelope>, (Reason, String)> {
    if payload.is_empty() {
        return Ok(None);
    }
    if payload.len() > policy.max_message_bytes {
        return Err((
            Reason::TooLarge,
            format!(
                "{what} is {} bytes, limit {}",
                payload.len(),
                policy.max_message_bytes
            ),
        ));
    }
    serde_json::from_slice(payload)
        .map(Some)
        .map_err(|e| (Reason::Malformed, format!("not a DSSE envelope: {e}")))
}

/// A payload's `sequence`, for a rejection event: only when it is a valid one (the event
/// schema wants >= 1, and a schema-invalid event would be dropped by the bridge).
fn payload_sequence(body: &[u8]) -> Option<u64> {
    roost_schemas::payload_sequence(body).filter(|s| *s >= 1)
}

/// The first violation of `schema` (compiled once into `cell`) by `body`, if any.
fn schema_problem_in(
    cell: &std::sync::OnceLock<Option<jsonschema::Validator>>,
    schema: &'static str,
    body: &[u8],
) -> Option<String> {
    let validator = cell.get_or_init(|| {
        let schema: serde_json::Value = serde_json::from_str(schema).ok()?;
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .ok()
    });
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Some(format!("payload is not JSON: {e}")),
    };
    let Some(v) = validator else {
        return Some("the schema could not be loaded".into());
    };
    let problem = v
        .iter_errors(&value)
        .next()
        .map(|e| format!("{} (at {})", e, e.instance_path()));
    problem
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{Policy, Scope, SigningKey, Source};

    pub(super) fn rollout(scope: Scope) -> Rollout {
        Rollout {
            schedule: Default::default(),
            deployment: "web".into(),
            scope,
            sequence: 3,
            issued_at: "2026-11-26T10:00:00Z".into(),
            source: Some(Source {
                url: "git://127.0.0.1/fleet.git".into(),
                revision: "a".repeat(40),
                path: "apps".into(),
            }),
            not_before: None,
            policy: Policy::default(),
            remove: false,
            origin: None,
        }
    }

    fn sign(key: &SigningKey, r: &Rollout) -> Vec<u8> {
        let body = serde_json::to_vec(r).expect("ser");
        serde_json::to_vec(&key.sign(PAYLOAD_TYPE, &body)).expect("ser")
    }

    #[test]
    fn every_stage_has_its_reason() {
        let key = SigningKey::from_seed(&[3; 32]).expect("key");
        let stranger = SigningKey::from_seed(&[4; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(key.public_key()).expect("add");
        let topics = Topics::default();
        let allowed = vec![SourceUrl::parse("git://127.0.0.1").expect("url")];
        let pol = VerifyPolicy {
            topics: &topics,
            keyring: &ring,
            thresholds: Thresholds::default(),
            now: time::OffsetDateTime::now_utc(),
            max_message_bytes: 4096,
            allowed_sources: &allowed,
        };
        let fleet_topic = "roost/v1/fleet/deployments/web";
        let good = sign(&key, &rollout(Scope::Fleet));
        let v = verify_message(&pol, fleet_topic, &good)
            .expect("ok")
            .expect("some");
        assert_eq!(v.rollout.sequence, 3);

        let reason = |topic: &str, payload: &[u8]| {
            verify_message(&pol, topic, payload)
                .expect_err("rejected")
                .reason
        };
        assert_eq!(reason(fleet_topic, b"{not json"), Reason::Malformed);
        assert_eq!(reason(fleet_topic, &vec![b' '; 5000]), Reason::TooLarge);
        assert_eq!(
            reason(fleet_topic, &sign(&stranger, &rollout(Scope::Fleet))),
            Reason::UnknownKey
        );
        // A trusted key's signature over a different payload.
        let mut env: Envelope = serde_json::from_slice(&good).expect("env");
        let mut changed = rollout(Scope::Fleet);
        changed.sequence = 4;
        let other: Envelope = serde_json::from_slice(&sign(&key, &changed)).expect("env");
        env.payload = other.payload;
        assert_eq!(
            reason(fleet_topic, &serde_json::to_vec(&env).expect("ser")),
            Reason::BadSignature
        );
        // A store-scoped message replayed onto the fleet topic.
        let store_msg = sign(&key, &rollout(Scope::Store("s1".into())));
        assert_eq!(reason(fleet_topic, &store_msg), Reason::ScopeMismatch);
        assert_eq!(
            reason("roost/v1/fleet/deployments/other", &good),
            Reason::ScopeMismatch
        );
        let mut evil = rollout(Scope::Fleet);
        evil.source.as_mut().expect("src").url = "git://evil.example/x.git".into();
        assert_eq!(
            reason(fleet_topic, &sign(&key, &evil)),
            Reason::SourceNotAllowed
        );
        let mut escape = rollout(Scope::Fleet);
        escape.source.as_mut().expect("src").path = "../../etc".into();
        assert_eq!(reason(fleet_topic, &sign(&key, &escape)), Reason::Schema);
        let signed_garbage =
            serde_json::to_vec(&key.sign(PAYLOAD_TYPE, b"{\"x\":1}")).expect("ser");
        assert_eq!(reason(fleet_topic, &signed_garbage), Reason::Schema);
        // A schema rejection reports the payload's sequence only when it is a valid one (the
        // event schema wants >= 1; the bridge drops events that break it).
        let mut zero = serde_json::to_value(rollout(Scope::Fleet)).expect("json");
        zero["sequence"] = serde_json::json!(0);
        let signed =
            serde_json::to_vec(&key.sign(PAYLOAD_TYPE, &serde_json::to_vec(&zero).expect("ser")))
                .expect("ser");
        let r = verify_message(&pol, fleet_topic, &signed).expect_err("rejected");
        assert_eq!((r.reason, r.sequence), (Reason::Schema, None));
        assert!(verify_message(&pol, fleet_topic, b"")
            .expect("ok")
            .is_none());
        // null where the schema wants a timestamp: the schema decides, not serde's leniency.
        let mut nulls = serde_json::to_value(rollout(Scope::Fleet)).expect("json");
        nulls["not_before"] = serde_json::Value::Null;
        let body = serde_json::to_vec(&nulls).expect("ser");
        let signed = serde_json::to_vec(&key.sign(PAYLOAD_TYPE, &body)).expect("ser");
        assert_eq!(reason(fleet_topic, &signed), Reason::Schema);
    }
}

#[cfg(test)]
mod props {
    //! Property tests of envelope parsing and verification as the agent runs it: never a
    //! panic, and acceptance only for an untouched envelope with enough trusted signatures.
    use super::*;
    use proptest::prelude::*;
    use roost_schemas::{Scope, SigningKey};

    fn setup() -> (Keyring, SigningKey, SigningKey, Vec<SourceUrl>) {
        let a = SigningKey::from_seed(&[31; 32]).expect("key");
        let b = SigningKey::from_seed(&[32; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(a.public_key()).expect("add");
        ring.add(b.public_key()).expect("add");
        let allowed = vec![SourceUrl::parse("git://127.0.0.1/").expect("url")];
        (ring, a, b, allowed)
    }

    fn body(seq: u64) -> Vec<u8> {
        let mut r = super::tests::rollout(Scope::Fleet);
        r.sequence = seq;
        serde_json::to_vec(&r).expect("json")
    }

    proptest! {
        #[test]
        fn arbitrary_messages_never_panic_nor_verify(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let (ring, _, _, allowed) = setup();
            let topics = Topics::default();
            let pol = VerifyPolicy {
                topics: &topics, keyring: &ring, thresholds: Thresholds::default(),
                now: time::OffsetDateTime::now_utc(), max_message_bytes: 2048, allowed_sources: &allowed,
            };
            let r = verify_message(&pol, "roost/v1/fleet/deployments/web", &bytes);
            prop_assert!(matches!(r, Err(_) | Ok(None)));
        }

        #[test]
        fn a_mutated_envelope_is_never_accepted_as_something_else(
            seq in 1u64..1_000_000,
            pos in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            threshold in 1usize..3,
        ) {
            let (ring, a, b, allowed) = setup();
            let topics = Topics::default();
            let pol = VerifyPolicy {
                topics: &topics, keyring: &ring,
                thresholds: Thresholds { fleet: Some(threshold), ..Default::default() },
                now: time::OffsetDateTime::now_utc(), max_message_bytes: 64 * 1024, allowed_sources: &allowed,
            };
            let original = body(seq);
            let env = roost_schemas::sign_all(&[a, b], PAYLOAD_TYPE, &original).expect("env");
            let mut bytes = serde_json::to_vec(&env).expect("json");
            let topic = "roost/v1/fleet/deployments/web";
            prop_assert!(verify_message(&pol, topic, &bytes).is_ok());
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            if let Ok(Some(v)) = verify_message(&pol, topic, &bytes) {
                // Only a change outside what is signed (JSON whitespace, a key id of a
                // signature beyond the threshold, …) may still verify: the payload is the
                // one that was signed.
                prop_assert_eq!(serde_json::to_vec(&v.rollout).expect("json"), original);
            }
        }
    }
}
