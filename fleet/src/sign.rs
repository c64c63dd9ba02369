//! The one rollout signer: builds a rollout from a [`RolloutSpec`], checks it and signs it
//! (DSSE, one signature per key). `roost rollout` ([`crate::cloud::rollout`]) and the GitOps
//! controller both sign here, so the same inputs give the same payload bytes. Store profiles
//! are signed here too ([`sign_profile`]).

use roost_schemas::profile::{Profile, PROFILE_PAYLOAD_TYPE};
use roost_schemas::rollout::RolloutError;
use roost_schemas::{Origin, Policy, Rollout, Schedule, Scope, SigningKey, Source, PAYLOAD_TYPE};

/// Everything needed to build a rollout.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// Deployment.
    pub deployment: String,
    /// Scope.
    pub scope: Scope,
    /// Repository URL.
    pub url: String,
    /// Commit id.
    pub revision: String,
    /// Path.
    pub path: String,
    /// Policy.
    pub policy: Policy,
    /// Activation time.
    pub not_before: Option<String>,
    /// Tombstone.
    pub remove: bool,
    /// Sequence (None: by the contract's rule, [`roost_schemas::sequence_rule`]).
    pub sequence: Option<u64>,
    /// The fleet-repository commit that caused this rollout (v1.1), if any.
    pub origin: Option<Origin>,
    /// Windows, blackouts, urgency, dependencies (v1.2).
    pub schedule: Schedule,
}

/// A signed rollout: the payload and the envelope's bytes, as published.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The rollout (the envelope's payload).
    pub rollout: Rollout,
    /// The DSSE envelope, serialized.
    pub envelope: Vec<u8>,
}

/// Why a rollout could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The rollout breaks a rule of the contract.
    #[error("invalid rollout")]
    Invalid(#[source] RolloutError),
    /// No key to sign with.
    #[error("at least one signing key is required")]
    NoKey,
    /// The store profile breaks a rule of the contract.
    #[error("invalid store profile")]
    InvalidProfile(#[source] roost_schemas::profile::ProfileError),
    /// The rollout or its envelope could not be serialized.
    #[error("serializing the rollout")]
    Json(#[source] serde_json::Error),
}

/// Builds the rollout of `spec` with `sequence`, checks it ([`Rollout::validate`]) and signs
/// it with every key (one signature each, so an agent's `[thresholds]` can be met). A
/// tombstone needs no source: one given without a URL or revision is dropped.
pub fn sign_rollout(
    keys: &[SigningKey],
    spec: &RolloutSpec,
    sequence: u64,
) -> Result<Signed, SignError> {
    let rollout = Rollout {
        schedule: spec.schedule.clone(),
        deployment: spec.deployment.clone(),
        scope: spec.scope.clone(),
        sequence,
        issued_at: roost_schemas::now_rfc3339(),
        source: if spec.remove && (spec.url.is_empty() || spec.revision.is_empty()) {
            None
        } else {
            Some(Source {
                url: spec.url.clone(),
                revision: spec.revision.clone(),
                path: spec.path.clone(),
            })
        },
        not_before: spec.not_before.clone(),
        policy: spec.policy.clone(),
        remove: spec.remove,
        origin: spec.origin.clone(),
    };
    rollout.validate().map_err(SignError::Invalid)?;
    let body = serde_json::to_vec(&rollout).map_err(SignError::Json)?;
    let env = roost_schemas::sign_all(keys, PAYLOAD_TYPE, &body).ok_or(SignError::NoKey)?;
    let envelope = serde_json::to_vec(&env).map_err(SignError::Json)?;
    Ok(Signed { rollout, envelope })
}

/// Checks a store profile ([`Profile::validate`]) and signs it with every key, as
/// [`sign_rollout`] does a rollout; returns the DSSE envelope's bytes.
pub fn sign_profile(keys: &[SigningKey], profile: &Profile) -> Result<Vec<u8>, SignError> {
    profile.validate().map_err(SignError::InvalidProfile)?;
    let body = serde_json::to_vec(profile).map_err(SignError::Json)?;
    let env = roost_schemas::sign_all(keys, PROFILE_PAYLOAD_TYPE, &body).ok_or(SignError::NoKey)?;
    serde_json::to_vec(&env).map_err(SignError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use roost_schemas::Envelope;

    fn spec(remove: bool) -> RolloutSpec {
        RolloutSpec {
            schedule: Default::default(),
            deployment: "web".into(),
            scope: Scope::Group("canary".into()),
            url: "git://h/apps.git".into(),
            revision: "b".repeat(40),
            path: "apps/web".into(),
            policy: Policy::default(),
            not_before: None,
            remove,
            sequence: None,
            origin: None,
        }
    }

    fn payload(s: &Signed) -> Vec<u8> {
        let env: Envelope = serde_json::from_slice(&s.envelope).expect("envelope");
        base64::engine::general_purpose::STANDARD
            .decode(env.payload)
            .expect("base64")
    }

    #[test]
    fn signs_what_it_builds_with_every_key() {
        let keys = [
            SigningKey::from_seed(&[1; 32]).expect("key"),
            SigningKey::from_seed(&[2; 32]).expect("key"),
        ];
        let s = sign_rollout(&keys, &spec(false), 7).expect("signed");
        assert_eq!(s.rollout.sequence, 7);
        assert_eq!(
            payload(&s),
            serde_json::to_vec(&s.rollout).expect("json"),
            "the envelope carries exactly the rollout"
        );
        let env: Envelope = serde_json::from_slice(&s.envelope).expect("envelope");
        assert_eq!(env.signatures.len(), 2);
        let mut ring = roost_schemas::Keyring::new();
        for k in &keys {
            ring.add(k.public_key()).expect("trust");
        }
        ring.verify_with(&env, PAYLOAD_TYPE, time::OffsetDateTime::now_utc(), 2)
            .expect("both signatures verify");
    }

    #[test]
    fn a_tombstone_drops_an_incomplete_source_and_bad_input_is_refused() {
        let key = [SigningKey::from_seed(&[1; 32]).expect("key")];
        let mut t = spec(true);
        t.revision = String::new();
        let s = sign_rollout(&key, &t, 8).expect("tombstone");
        assert!(s.rollout.source.is_none() && s.rollout.remove);
        assert!(matches!(
            sign_rollout(&key, &spec(false), 0),
            Err(SignError::Invalid(_))
        ));
        assert!(matches!(
            sign_rollout(&[], &spec(false), 9),
            Err(SignError::NoKey)
        ));
    }
}
