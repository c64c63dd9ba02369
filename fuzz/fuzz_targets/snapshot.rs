//! Fleet snapshot verification as the agent runs it on every message of
//! `roost/v1/fleet/snapshot`, and the comparison with what it holds: must never panic, and
//! must never accept bytes that are not a snapshot signed by the trusted key (the fuzzer
//! cannot forge Ed25519). The input is also tried as the (signed) payload itself, so the
//! schema check, the typed rules and the comparison see arbitrary snapshot JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_agent::config::Thresholds;
use roost_agent::freshness::{assess, report, verify_snapshot, Reported};
use roost_agent::verify::VerifyPolicy;
use roost_schemas::{Keyring, SigningKey, Topics, SNAPSHOT_PAYLOAD_TYPE};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed(&[7; 32]).expect("key");
    let mut ring = Keyring::new();
    ring.add(key.public_key()).expect("add");
    let topics = Topics::default();
    let policy = VerifyPolicy {
        topics: &topics,
        keyring: &ring,
        thresholds: Thresholds::default(),
        now: time::OffsetDateTime::UNIX_EPOCH,
        max_message_bytes: 256 * 1024,
        allowed_sources: &[],
    };
    if let Ok(Some(_)) = verify_snapshot(&policy, data) {
        panic!("accepted a snapshot nobody signed");
    }
    // The same bytes as a validly signed payload.
    let env = serde_json::to_vec(&key.sign(SNAPSHOT_PAYLOAD_TYPE, data)).expect("json");
    if let Ok(Some(v)) = verify_snapshot(&policy, &env) {
        assert!(v.snapshot.validate().is_ok(), "accepted an invalid snapshot");
        let groups = vec!["canary".to_owned()];
        let a = assess(
            &v.snapshot,
            &topics,
            "store-0001",
            &groups,
            |_, d| (d.len() % 2 == 0).then_some(d.len() as u64),
            Some(3),
            time::OffsetDateTime::UNIX_EPOCH,
        );
        let (next, _) = report(&Reported::Nothing, &v.snapshot, &a);
        assert!(report(&next, &v.snapshot, &a).1.is_none(), "reported twice");
    }
});
