//! Desired state and sequences: the newest envelope per deployment topic (`desired`) and the
//! last sequence handed out per topic (`sequences`), allocated by the contract's sequence
//! rule ([`roost_schemas::sequence_rule`]).
//!
//! Two writers keep `desired`: the controller records what it publishes, in the same
//! transaction as the sequence it allocates ([`super::gitops`]); the fleet record's ingest
//! records what the broker shows ([`super::ingest`]), which after a controller's publish is
//! that very envelope coming back. [`judge`] decides what an arriving envelope does before
//! any write, so an envelope the record already holds costs no transaction.

use super::sql::{args, Conn};
use super::{DbError, FleetDb};
use roost_schemas::{envelope_sequence, sequence_rule};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What an envelope arriving on a deployment topic does to the record, which holds
/// `held` (its sequence) for that topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New or newer: store it.
    Store(u64),
    /// The topic was cleared (empty payload) and the record holds something: forget it.
    Clear,
    /// The record holds this sequence already (the controller's own publish coming back, a
    /// retained redelivery), or a cleared topic it never held: nothing to write.
    Same,
    /// Older than the record's: the broker holds an older envelope; the record's stands.
    Older,
    /// No readable sequence: ignored.
    Unreadable,
}

/// Judges an arriving envelope against what the record holds. Pure.
pub fn judge(held: Option<u64>, payload: &[u8]) -> Verdict {
    if payload.is_empty() {
        return if held.is_some() {
            Verdict::Clear
        } else {
            Verdict::Same
        };
    }
    match (envelope_sequence(payload), held) {
        (None, _) => Verdict::Unreadable,
        (Some(seq), Some(h)) if seq < h => Verdict::Older,
        (Some(seq), Some(h)) if seq == h => Verdict::Same,
        (Some(seq), _) => Verdict::Store(seq),
    }
}

/// The record's envelope on `topic`: (sequence, payload).
pub(super) fn held(c: &Conn<'_>, topic: &str) -> Result<Option<(u64, Vec<u8>)>, DbError> {
    c.query_opt(
        "SELECT sequence, payload FROM desired WHERE topic = ?1",
        args![topic],
    )?
    .map(|r| Ok((r.get(0)?, r.get(1)?)))
    .transpose()
}

/// Stores `payload` as `topic`'s desired state unless the record holds a newer sequence (a
/// writer that got there between a caller's read and this write).
pub(super) fn store(
    c: &Conn<'_>,
    topic: &str,
    sequence: u64,
    payload: &[u8],
) -> Result<(), DbError> {
    c.execute(
        "INSERT INTO desired(topic, sequence, payload) VALUES (?1, ?2, ?3)
         ON CONFLICT(topic) DO UPDATE SET sequence = excluded.sequence, payload = excluded.payload
         WHERE excluded.sequence > desired.sequence",
        args![topic, sequence, payload],
    )?;
    Ok(())
}

/// Forgets `topic`'s desired state (the topic was cleared on the broker).
pub(super) fn clear(c: &Conn<'_>, topic: &str) -> Result<(), DbError> {
    c.execute("DELETE FROM desired WHERE topic = ?1", args![topic])?;
    Ok(())
}

/// Allocates the next sequence on `topic` inside a caller's transaction (see
/// [`FleetDb::next_sequence`]).
pub(super) fn next_sequence_in(c: &Conn<'_>, topic: &str) -> Result<u64, DbError> {
    let last: i64 = c.query_value(
        "SELECT COALESCE(MAX(n), 0) FROM (
             SELECT last AS n FROM sequences WHERE topic = ?1
             UNION ALL SELECT sequence AS n FROM desired WHERE topic = ?1
         ) AS known",
        args![topic],
    )?;
    let next = sequence_rule(last.max(0) as u64, now_ms());
    c.execute(
        "INSERT INTO sequences(topic, last) VALUES (?1, ?2)
         ON CONFLICT(topic) DO UPDATE SET last = excluded.last WHERE excluded.last > sequences.last",
        args![topic, next],
    )?;
    Ok(next)
}

impl FleetDb {
    /// Allocates the sequence for the next envelope on `topic` by the contract's rule,
    /// `max(last + 1, milliseconds since the epoch)`, from this database's durable record
    /// (never only from what a broker retains), and records it as used.
    pub fn next_sequence(&self, topic: &str) -> Result<u64, DbError> {
        self.with_sequence(topic, Ok::<u64, DbError>)
    }

    /// Allocates the next sequence on `topic` (as [`FleetDb::next_sequence`]) and runs `f`
    /// with it in the same transaction: if `f` fails, the sequence was never used.
    pub fn with_sequence<T, E: From<DbError>>(
        &self,
        topic: &str,
        f: impl FnOnce(u64) -> Result<T, E>,
    ) -> Result<T, E> {
        self.transaction(|tx| f(next_sequence_in(tx, topic)?))
    }

    /// Every stored desired envelope.
    pub fn desired(&self) -> Result<Vec<(String, Vec<u8>)>, DbError> {
        self.with_conn(|c| {
            c.query("SELECT topic, payload FROM desired ORDER BY topic", &[])?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect()
        })
    }
}

/// A signed envelope whose payload carries only `sequence`, for tests.
#[cfg(test)]
pub(crate) fn test_envelope(seq: u64) -> Vec<u8> {
    let key = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
    serde_json::to_vec(&key.sign(
        roost_schemas::PAYLOAD_TYPE,
        format!("{{\"sequence\":{seq}}}").as_bytes(),
    ))
    .expect("json")
}

#[cfg(test)]
mod tests {
    use super::test_envelope as envelope;
    use super::*;

    #[test]
    fn an_arriving_envelope_is_judged_against_what_the_record_holds() {
        let cases: &[(Option<u64>, Vec<u8>, Verdict)] = &[
            (None, envelope(5), Verdict::Store(5)),
            (Some(4), envelope(5), Verdict::Store(5)),
            (Some(5), envelope(5), Verdict::Same),
            (Some(6), envelope(5), Verdict::Older),
            (Some(6), Vec::new(), Verdict::Clear),
            (None, Vec::new(), Verdict::Same),
            (Some(6), b"not an envelope".to_vec(), Verdict::Unreadable),
        ];
        for (held, payload, want) in cases {
            assert_eq!(judge(*held, payload), *want, "{held:?}");
        }
    }
}
