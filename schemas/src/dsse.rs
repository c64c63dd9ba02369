//! DSSE ("Dead Simple Signing Envelope") with Ed25519 over the pre-authentication encoding:
//! `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`.

use std::collections::{HashMap, HashSet};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The payload type of a roost rollout.
pub const PAYLOAD_TYPE: &str = "application/vnd.roost.rollout.v1+json";

/// At most this many signatures are examined in one envelope.
pub const MAX_SIGNATURES: usize = 8;

/// A key id: the first 16 hex characters of SHA-256 over the raw 32-byte Ed25519 public key.
pub type KeyId = String;

/// A DSSE envelope as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Media type of the payload.
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 (standard, padded) of the payload bytes.
    pub payload: String,
    /// One or more signatures.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// The payload bytes of an envelope of `payload_type` **without checking any signature**:
    /// only for decisions that are safe on unverified data (the bridge choosing which group
    /// topics to carry), never for anything that is applied. `Malformed` for another payload
    /// type or bad base64.
    pub fn unverified_payload(&self, payload_type: &str) -> Result<Vec<u8>, VerifyError> {
        if self.payload_type != payload_type {
            return Err(VerifyError::Malformed(format!(
                "payloadType is {:?}, expected {payload_type:?}",
                self.payload_type
            )));
        }
        B64.decode(self.payload.as_bytes())
            .map_err(|e| VerifyError::Malformed(format!("payload is not base64: {e}")))
    }
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Which key signed.
    pub keyid: String,
    /// Base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

/// Why an envelope did not verify. Each maps to a wire reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a usable DSSE envelope (bad base64, wrong payload type, no signatures).
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// No signature is from a trusted key.
    #[error("no signature from a trusted key (key ids: {0:?})")]
    UnknownKey(Vec<String>),
    /// A trusted key's signature did not verify.
    #[error("signature by trusted key {0} does not verify")]
    BadSignature(String),
    /// The only trusted signatures are by keys past their `not_after`.
    #[error("key {0} expired at {1}")]
    ExpiredKey(String, String),
    /// The only trusted signatures are by revoked keys.
    #[error("key {0} is revoked")]
    RevokedKey(String),
    /// Fewer distinct trusted, valid keys signed than required.
    #[error("{need} signatures from distinct trusted keys required, valid ones from {have:?}")]
    ThresholdNotMet {
        /// Distinct keys required.
        need: usize,
        /// The distinct trusted keys whose signatures verified.
        have: Vec<String>,
    },
}

impl VerifyError {
    /// The wire reason code.
    pub fn reason(&self) -> crate::Reason {
        match self {
            VerifyError::Malformed(_) => crate::Reason::Malformed,
            VerifyError::UnknownKey(_) => crate::Reason::UnknownKey,
            VerifyError::BadSignature(_) => crate::Reason::BadSignature,
            VerifyError::ExpiredKey(..) => crate::Reason::ExpiredKey,
            VerifyError::RevokedKey(_) => crate::Reason::RevokedKey,
            VerifyError::ThresholdNotMet { .. } => crate::Reason::ThresholdNotMet,
        }
    }
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Key id of a raw Ed25519 public key.
pub fn key_id(public_key: &[u8]) -> KeyId {
    let digest = Sha256::digest(public_key);
    hex::encode(&digest[..8])
}

/// An Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Option<Vec<u8>>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("keyid", &self.key_id())
            .finish_non_exhaustive()
    }
}

/// Why a key could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid Ed25519 key: {0}")]
pub struct KeyError(String);

impl SigningKey {
    /// Generates a new random key.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError(e.to_string()))?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    /// Loads a PKCS#8 v2 document (as written by [`SigningKey::pkcs8`]).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| KeyError(e.to_string()))?;
        Ok(SigningKey {
            pair,
            pkcs8: Some(pkcs8.to_vec()),
        })
    }

    /// A key from a 32-byte seed (test vectors, deterministic demos).
    pub fn from_seed(seed: &[u8; 32]) -> Result<SigningKey, KeyError> {
        let pair =
            Ed25519KeyPair::from_seed_unchecked(seed).map_err(|e| KeyError(e.to_string()))?;
        Ok(SigningKey { pair, pkcs8: None })
    }

    /// The PKCS#8 document, when the key was generated or loaded from one.
    pub fn pkcs8(&self) -> Option<&[u8]> {
        self.pkcs8.as_deref()
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// This key's id.
    pub fn key_id(&self) -> KeyId {
        key_id(self.pair.public_key().as_ref())
    }

    /// Signs `payload` into an envelope of `payload_type`.
    pub fn sign(&self, payload_type: &str, payload: &[u8]) -> Envelope {
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: vec![self.signature(payload_type, payload)],
        }
    }

    /// This key's signature over `payload` of `payload_type` (to add to an envelope).
    pub fn signature(&self, payload_type: &str, payload: &[u8]) -> Signature {
        let sig = self.pair.sign(&pae(payload_type, payload));
        Signature {
            keyid: self.key_id(),
            sig: B64.encode(sig.as_ref()),
        }
    }
}

/// Signs `payload` with every key (in order) into one envelope, so that an agent's signature
/// threshold can be met. `None` when `keys` is empty. A key given twice signs once.
pub fn sign_all(keys: &[SigningKey], payload_type: &str, payload: &[u8]) -> Option<Envelope> {
    let mut signatures: Vec<Signature> = Vec::with_capacity(keys.len());
    for k in keys {
        let s = k.signature(payload_type, payload);
        if !signatures.iter().any(|o| o.keyid == s.keyid) {
            signatures.push(s);
        }
    }
    if signatures.is_empty() {
        return None;
    }
    Some(Envelope {
        payload_type: payload_type.to_owned(),
        payload: B64.encode(payload),
        signatures,
    })
}

/// One trusted key: its raw public key and when it stops being valid.
#[derive(Debug, Clone)]
struct TrustedKey {
    public_key: Vec<u8>,
    not_after: Option<time::OffsetDateTime>,
}

/// The set of public keys an agent trusts, by key id, with optional expiry times and a
/// revocation list. A signature counts only if its key is trusted, not revoked, not past its
/// `not_after`, and the signature verifies; a threshold asks for that many distinct keys.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: HashMap<KeyId, TrustedKey>,
    revoked: HashSet<KeyId>,
}

/// A verified payload and the distinct keys whose signatures counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPayload {
    /// The payload bytes (decoded from base64).
    pub payload: Vec<u8>,
    /// Key ids of the valid signatures, in envelope order, each once.
    pub keyids: Vec<KeyId>,
}

impl Keyring {
    /// An empty keyring (trusts nothing).
    pub fn new() -> Keyring {
        Keyring::default()
    }

    /// Adds a raw 32-byte Ed25519 public key; returns its key id.
    pub fn add(&mut self, public_key: Vec<u8>) -> Result<KeyId, KeyError> {
        if public_key.len() != 32 {
            return Err(KeyError(format!(
                "public key must be 32 bytes, got {}",
                public_key.len()
            )));
        }
        let id = key_id(&public_key);
        self.keys.insert(
            id.clone(),
            TrustedKey {
                public_key,
                not_after: None,
            },
        );
        Ok(id)
    }

    /// Adds a base64-encoded public key, checking it against an expected key id if given.
    pub fn add_base64(&mut self, b64: &str, expected_id: Option<&str>) -> Result<KeyId, KeyError> {
        let raw = B64
            .decode(b64.trim())
            .map_err(|e| KeyError(format!("public key is not base64: {e}")))?;
        let id = key_id(&raw);
        if let Some(want) = expected_id {
            if want != id {
                return Err(KeyError(format!(
                    "key id {want} does not match the public key (its id is {id})"
                )));
            }
        }
        self.add(raw)
    }

    /// Signatures by key `id` stop counting after `not_after` (key rotation).
    pub fn set_not_after(&mut self, id: &str, not_after: time::OffsetDateTime) -> bool {
        match self.keys.get_mut(id) {
            Some(k) => {
                k.not_after = Some(not_after);
                true
            }
            None => false,
        }
    }

    /// Signatures by key `id` never count again (it need not be trusted).
    pub fn revoke(&mut self, id: &str) {
        self.revoked.insert(id.to_owned());
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.contains(id)
    }

    /// Number of trusted keys (revoked ones included).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Trusted keys that are not revoked (expired ones included: they were valid once).
    pub fn unrevoked(&self) -> usize {
        self.keys
            .keys()
            .filter(|id| !self.revoked.contains(*id))
            .count()
    }

    /// Verifies an envelope of the expected payload type and returns its payload bytes.
    /// One valid signature from a trusted key is enough.
    pub fn verify(&self, env: &Envelope, payload_type: &str) -> Result<Vec<u8>, VerifyError> {
        self.verify_with(env, payload_type, time::OffsetDateTime::now_utc(), 1)
            .map(|v| v.payload)
    }

    /// Verifies an envelope at time `now`, requiring valid signatures from `threshold`
    /// distinct trusted keys (at least one). A key that signed twice counts once.
    ///
    /// When too few signatures count, the error names the most telling cause: some valid
    /// but too few (`threshold_not_met`), else a trusted key's signature that does not verify
    /// (`bad_signature`), else a revoked key (`revoked_key`), else an expired one
    /// (`expired_key`), else no known key at all (`unknown_key`).
    pub fn verify_with(
        &self,
        env: &Envelope,
        payload_type: &str,
        now: time::OffsetDateTime,
        threshold: usize,
    ) -> Result<VerifiedPayload, VerifyError> {
        let threshold = threshold.max(1);
        let payload = env.unverified_payload(payload_type)?;
        if env.signatures.is_empty() {
            return Err(VerifyError::Malformed("no signatures".into()));
        }
        if env.signatures.len() > MAX_SIGNATURES {
            return Err(VerifyError::Malformed(format!(
                "more than {MAX_SIGNATURES} signatures"
            )));
        }
        let message = pae(payload_type, &payload);
        let mut valid: Vec<KeyId> = Vec::new();
        let (mut bad, mut revoked, mut expired) = (None, None, None);
        for s in &env.signatures {
            if valid.contains(&s.keyid) {
                continue;
            }
            if self.revoked.contains(&s.keyid) {
                revoked.get_or_insert_with(|| s.keyid.clone());
                continue;
            }
            let Some(k) = self.keys.get(&s.keyid) else {
                continue;
            };
            if let Some(na) = k.not_after.filter(|na| now > *na) {
                expired.get_or_insert_with(|| (s.keyid.clone(), crate::format_rfc3339(na)));
                continue;
            }
            let ok = B64
                .decode(s.sig.as_bytes())
                .ok()
                .filter(|sig| sig.len() == 64)
                .is_some_and(|sig| {
                    UnparsedPublicKey::new(&signature::ED25519, &k.public_key)
                        .verify(&message, &sig)
                        .is_ok()
                });
            if ok {
                valid.push(s.keyid.clone());
                if valid.len() >= threshold {
                    return Ok(VerifiedPayload {
                        payload,
                        keyids: valid,
                    });
                }
            } else {
                bad.get_or_insert_with(|| s.keyid.clone());
            }
        }
        if !valid.is_empty() {
            return Err(VerifyError::ThresholdNotMet {
                need: threshold,
                have: valid,
            });
        }
        if let Some(id) = bad {
            return Err(VerifyError::BadSignature(id));
        }
        if let Some(id) = revoked {
            return Err(VerifyError::RevokedKey(id));
        }
        if let Some((id, at)) = expired {
            return Err(VerifyError::ExpiredKey(id, at));
        }
        Err(VerifyError::UnknownKey(
            env.signatures.iter().map(|s| s.keyid.clone()).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed test vector also published in `schemas/examples/dsse-test-vector.json`.
    #[test]
    fn test_vector() {
        let vector: serde_json::Value =
            serde_json::from_str(include_str!("../examples/dsse-test-vector.json"))
                .expect("vector json");
        let seed_hex = vector["seed_hex"].as_str().expect("seed");
        let seed: [u8; 32] = hex::decode(seed_hex)
            .expect("hex")
            .try_into()
            .expect("32 bytes");
        let key = SigningKey::from_seed(&seed).expect("key");
        assert_eq!(
            B64.encode(key.public_key()),
            vector["public_key_base64"].as_str().expect("pk")
        );
        assert_eq!(key.key_id(), vector["keyid"].as_str().expect("keyid"));
        let payload = vector["payload_utf8"].as_str().expect("payload").as_bytes();
        assert_eq!(
            String::from_utf8(pae(PAYLOAD_TYPE, payload)).expect("utf8"),
            vector["pae_utf8"].as_str().expect("pae")
        );
        let env = key.sign(PAYLOAD_TYPE, payload);
        let expected: Envelope =
            serde_json::from_value(vector["envelope"].clone()).expect("envelope");
        assert_eq!(env, expected);
        let mut ring = Keyring::new();
        ring.add(key.public_key()).expect("add");
        assert_eq!(
            ring.verify(&expected, PAYLOAD_TYPE).expect("verify"),
            payload
        );
    }

    #[test]
    fn pae_matches_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn verification_outcomes() {
        let trusted = SigningKey::from_seed(&[7u8; 32]).expect("key");
        let stranger = SigningKey::from_seed(&[9u8; 32]).expect("key");
        let mut ring = Keyring::new();
        ring.add(trusted.public_key()).expect("add");

        let env = trusted.sign(PAYLOAD_TYPE, b"{}");
        assert!(ring.verify(&env, PAYLOAD_TYPE).is_ok());

        let foreign = stranger.sign(PAYLOAD_TYPE, b"{}");
        assert_eq!(
            ring.verify(&foreign, PAYLOAD_TYPE).map_err(|e| e.reason()),
            Err(crate::Reason::UnknownKey)
        );

        let mut tampered = env.clone();
        tampered.payload = B64.encode(b"{\"x\":1}");
        assert_eq!(
            ring.verify(&tampered, PAYLOAD_TYPE).map_err(|e| e.reason()),
            Err(crate::Reason::BadSignature)
        );

        // A stranger's signature beside a valid trusted one is fine.
        let mut both = env.clone();
        both.signatures.insert(0, foreign.signatures[0].clone());
        assert!(ring.verify(&both, PAYLOAD_TYPE).is_ok());

        let mut wrong_type = env.clone();
        wrong_type.payload_type = "text/plain".into();
        assert_eq!(
            ring.verify(&wrong_type, PAYLOAD_TYPE)
                .map_err(|e| e.reason()),
            Err(crate::Reason::Malformed)
        );
    }

    #[test]
    fn expiry_revocation_and_thresholds() {
        let a = SigningKey::from_seed(&[1u8; 32]).expect("key");
        let b = SigningKey::from_seed(&[2u8; 32]).expect("key");
        let c = SigningKey::from_seed(&[3u8; 32]).expect("key");
        let mut ring = Keyring::new();
        for k in [&a, &b, &c] {
            ring.add(k.public_key()).expect("add");
        }
        let t = |s: &str| crate::parse_rfc3339(s).expect("time");
        let now = t("2026-11-26T10:00:00Z");
        let reason = |ring: &Keyring, env: &Envelope, threshold: usize| {
            ring.verify_with(env, PAYLOAD_TYPE, now, threshold)
                .map(|v| v.keyids)
                .map_err(|e| e.reason())
        };
        let one = a.sign(PAYLOAD_TYPE, b"{}");
        let two = sign_all(&[a, b], PAYLOAD_TYPE, b"{}").expect("env");
        assert_eq!(reason(&ring, &one, 1).map(|k| k.len()), Ok(1));
        assert_eq!(reason(&ring, &two, 2).map(|k| k.len()), Ok(2));
        assert_eq!(
            reason(&ring, &one, 2),
            Err(crate::Reason::ThresholdNotMet),
            "one signature where two are wanted"
        );
        let mut twice = one.clone();
        twice.signatures.push(one.signatures[0].clone());
        assert_eq!(
            reason(&ring, &twice, 2),
            Err(crate::Reason::ThresholdNotMet),
            "the same key twice counts once"
        );
        // Expiry: valid up to and including not_after.
        let mut exp = ring.clone();
        assert!(exp.set_not_after(&one.signatures[0].keyid, t("2026-11-26T10:00:00Z")));
        assert!(reason(&exp, &one, 1).is_ok());
        assert!(exp.set_not_after(&one.signatures[0].keyid, t("2026-11-26T09:59:59Z")));
        assert_eq!(reason(&exp, &one, 1), Err(crate::Reason::ExpiredKey));
        assert_eq!(
            reason(&exp, &two, 2),
            Err(crate::Reason::ThresholdNotMet),
            "an expired key does not count towards a threshold"
        );
        assert!(reason(&exp, &two, 1).is_ok(), "the other key still counts");
        // Revocation, also of a key that is not (or no longer) trusted.
        let mut rev = ring.clone();
        rev.revoke(&one.signatures[0].keyid);
        assert_eq!(reason(&rev, &one, 1), Err(crate::Reason::RevokedKey));
        assert_eq!(rev.unrevoked(), 2);
        let mut untrusted = Keyring::new();
        untrusted.add(c.public_key()).expect("add");
        untrusted.revoke(&one.signatures[0].keyid);
        assert_eq!(reason(&untrusted, &one, 1), Err(crate::Reason::RevokedKey));
        // A truncated signature by a trusted key is a bad signature.
        let mut short = one.clone();
        let sig = B64.decode(&short.signatures[0].sig).expect("b64");
        short.signatures[0].sig = B64.encode(&sig[..63]);
        assert_eq!(reason(&ring, &short, 1), Err(crate::Reason::BadSignature));
        // Bad beats revoked beats expired beats unknown, when nothing counts.
        let mut mixed = short.clone();
        mixed
            .signatures
            .push(c.sign(PAYLOAD_TYPE, b"{}").signatures[0].clone());
        let mut rc = ring.clone();
        rc.revoke(&c.key_id());
        assert_eq!(reason(&rc, &mixed, 1), Err(crate::Reason::BadSignature));
        assert!(sign_all(&[], PAYLOAD_TYPE, b"{}").is_none());
    }

    #[test]
    fn generated_keys_roundtrip_pkcs8() {
        let k = SigningKey::generate().expect("gen");
        let again = SigningKey::from_pkcs8(k.pkcs8().expect("pkcs8")).expect("load");
        assert_eq!(k.key_id(), again.key_id());
        assert_eq!(k.key_id().len(), 16);
    }
}

#[cfg(test)]
mod props {
    //! Property tests: verification never panics, and only an untouched envelope signed by
    //! enough trusted keys is accepted.
    use super::*;
    use proptest::prelude::*;

    fn ring() -> (Keyring, SigningKey, SigningKey) {
        let a = SigningKey::from_seed(&[21; 32]).expect("key");
        let b = SigningKey::from_seed(&[22; 32]).expect("key");
        let mut r = Keyring::new();
        r.add(a.public_key()).expect("add");
        r.add(b.public_key()).expect("add");
        (r, a, b)
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics_and_never_verifies(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (r, _, _) = ring();
            if let Ok(env) = serde_json::from_slice::<Envelope>(&bytes) {
                let now = time::OffsetDateTime::now_utc();
                prop_assert!(r.verify_with(&env, PAYLOAD_TYPE, now, 1).is_err());
            }
        }

        #[test]
        fn arbitrary_envelopes_never_verify(
            payload in "[A-Za-z0-9+/=]{0,64}",
            sigs in proptest::collection::vec(("[0-9a-f]{0,20}", "[A-Za-z0-9+/=]{0,100}"), 0..10),
            threshold in 0usize..4,
        ) {
            let (r, a, _) = ring();
            let mut signatures: Vec<Signature> = sigs.into_iter().map(|(keyid, sig)| Signature { keyid, sig }).collect();
            if let Some(s) = signatures.first_mut() {
                s.keyid = a.key_id(); // a trusted id on a forged signature
            }
            let env = Envelope { payload_type: PAYLOAD_TYPE.into(), payload, signatures };
            prop_assert!(r.verify_with(&env, PAYLOAD_TYPE, time::OffsetDateTime::now_utc(), threshold).is_err());
        }

        #[test]
        fn only_untouched_signed_payloads_verify(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
            both in any::<bool>(),
        ) {
            let (r, a, b) = ring();
            let keys = if both { vec![a, b] } else { vec![a] };
            let need = keys.len();
            let env = sign_all(&keys, PAYLOAD_TYPE, &payload).expect("env");
            let now = time::OffsetDateTime::now_utc();
            let ok = r.verify_with(&env, PAYLOAD_TYPE, now, need).expect("valid");
            prop_assert_eq!(&ok.payload, &payload);
            prop_assert_eq!(ok.keyids.len(), need);
            prop_assert!(r.verify_with(&env, PAYLOAD_TYPE, now, need + 1).is_err(), "threshold above the signers");
            if !payload.is_empty() {
                let mut changed = payload.clone();
                let i = flip.index(changed.len());
                changed[i] ^= 1 << bit;
                let mut tampered = env.clone();
                tampered.payload = B64.encode(&changed);
                prop_assert_eq!(r.verify_with(&tampered, PAYLOAD_TYPE, now, 1).map_err(|e| e.reason()).err(), Some(crate::Reason::BadSignature));
            }
            let mut sig = B64.decode(&env.signatures[0].sig).expect("b64");
            let i = flip.index(sig.len());
            sig[i] ^= 1 << bit;
            let mut bad = env.clone();
            bad.signatures[0].sig = B64.encode(&sig);
            prop_assert!(r.verify_with(&bad, PAYLOAD_TYPE, now, need).is_err());
        }
    }
}
