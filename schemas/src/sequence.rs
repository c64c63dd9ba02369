//! The contract's sequence rule: which sequence a publisher gives its next rollout or snapshot
//! on a topic, and the one reading of the sequence a signed message carries.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use crate::Envelope;

/// The contract's sequence rule, `max(last known + 1, milliseconds since the epoch)`: greater
/// than the last sequence the publisher knows for the topic, and at least the clock, so a
/// publisher that lost its record (or a broker that lost its retained messages) still picks a
/// sequence no agent has accepted. `last_known` comes from the publisher's own durable record;
/// what a broker retains is only a lower bound.
pub fn sequence_rule(last_known: u64, now_ms: u64) -> u64 {
    last_known.saturating_add(1).max(now_ms)
}

/// The `sequence` of a signed payload (a rollout or a snapshot, the bytes inside the
/// envelope), read from its JSON without validating the rest.
pub fn payload_sequence(payload: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("sequence")?
        .as_u64()
}

/// The sequence inside an envelope's payload, without verifying the envelope: what a broker
/// or a record holds on a topic. None for an empty message (a cleared retained topic), bytes
/// that are not an envelope, and a payload without a sequence.
pub fn envelope_sequence(envelope: &[u8]) -> Option<u64> {
    payload_sequence(&envelope_payload(envelope)?)
}

/// The payload of a DSSE envelope's bytes, decoded but NOT verified: for what only reads
/// (the sequence, a view's labels), never for what acts on it.
pub fn envelope_payload(envelope: &[u8]) -> Option<Vec<u8>> {
    let env: Envelope = serde_json::from_slice(envelope).ok()?;
    B64.decode(env.payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_above_the_record_and_at_least_the_clock() {
        assert_eq!(sequence_rule(0, 1_000), 1_000);
        assert_eq!(
            sequence_rule(5_000, 1_000),
            5_001,
            "a clock behind the record"
        );
        assert_eq!(sequence_rule(999, 1_000), 1_000);
        assert_eq!(sequence_rule(1_000, 1_000), 1_001, "never the same twice");
        assert_eq!(sequence_rule(u64::MAX, 0), u64::MAX, "no overflow");
    }

    fn signed(payload: &[u8]) -> Vec<u8> {
        let key = crate::SigningKey::from_seed(&[1; 32]).expect("key");
        serde_json::to_vec(&key.sign(crate::PAYLOAD_TYPE, payload)).expect("json")
    }

    #[test]
    fn one_reading_of_a_messages_sequence() {
        assert_eq!(envelope_sequence(&signed(br#"{"sequence":3}"#)), Some(3));
        assert_eq!(
            envelope_sequence(&signed(
                br#"{"deployment":"web","sequence":42,"remove":true}"#
            )),
            Some(42)
        );
        // Cleared, not an envelope, no sequence, not a number: nothing to read.
        assert_eq!(envelope_sequence(b""), None);
        assert_eq!(envelope_sequence(b"{\"sequence\":3}"), None);
        assert_eq!(envelope_sequence(&signed(br#"{"deployment":"web"}"#)), None);
        assert_eq!(envelope_sequence(&signed(br#"{"sequence":"3"}"#)), None);
        assert_eq!(envelope_sequence(&signed(b"not json")), None);
        assert_eq!(payload_sequence(br#"{"sequence":7,"topics":{}}"#), Some(7));
        assert_eq!(payload_sequence(br#"{"sequence":-1}"#), None);
    }
}
