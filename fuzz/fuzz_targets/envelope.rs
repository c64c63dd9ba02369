//! Envelope parsing and verification as the agent runs it on every deployment message: must
//! never panic, and must never accept bytes that are not an envelope signed by the trusted
//! keys (the fuzzer cannot forge Ed25519, so any acceptance is a bug).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_agent::config::Thresholds;
use roost_agent::decide::SourceUrl;
use roost_agent::verify::{verify_message, VerifyPolicy};
use roost_schemas::{Keyring, SigningKey, Topics};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed(&[7; 32]).expect("key");
    let mut ring = Keyring::new();
    ring.add(key.public_key()).expect("add");
    let allowed = [SourceUrl::parse("git://127.0.0.1/").expect("url")];
    let topics = Topics::default();
    let policy = VerifyPolicy {
        topics: &topics,
        keyring: &ring,
        thresholds: Thresholds::default(),
        now: time::OffsetDateTime::UNIX_EPOCH,
        max_message_bytes: 256 * 1024,
        allowed_sources: &allowed,
    };
    for topic in [
        "roost/v1/fleet/deployments/web",
        "roost/v1/stores/s1/deployments/web",
    ] {
        if let Ok(Some(_)) = verify_message(&policy, topic, data) {
            panic!("accepted an envelope nobody signed");
        }
    }
    // The URL parser sees attacker text as well.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = SourceUrl::parse(s);
    }
});
