//! What the fleet record keeps of the cloud broker's messages: every store's events
//! (deduplicated by `id`, with a count of duplicates; gaps in each store's `roostseq` found on
//! reading), its latest status and presence documents, and the deployment topics' envelopes
//! ([`super::desired`]). One batch of incoming messages is one transaction, or none when
//! nothing in it changes the record.

use std::collections::hash_map::{Entry, HashMap};

use super::desired::{self, Verdict};
use super::sql::{args, Conn, Row};
use super::{DbError, FleetDb};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{CloudEvent, Topics};

/// One incoming message as the fleet record stores it.
#[derive(Debug, Clone)]
pub enum FleetItem {
    /// A store's event: (store, parsed event, raw JSON).
    Event(String, Box<CloudEvent>, String),
    /// A store's status document: (store, raw JSON).
    Status(String, String),
    /// A store's presence document: (store, raw JSON).
    Presence(String, String),
    /// A deployment topic's envelope (empty payload: the topic was cleared).
    Desired(String, Vec<u8>),
}

/// What recording one batch found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events that were new (not duplicates).
    pub new_events: usize,
    /// Deployment topics on which the broker showed an older envelope than the record:
    /// (topic, the record's newest envelope), to publish again.
    pub regressed: Vec<(String, Vec<u8>)>,
}

/// A missing range of a store's `roostseq`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// Store.
    pub store: String,
    /// First missing.
    pub from: u64,
    /// Last missing.
    pub to: u64,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Event id.
    pub id: String,
    /// roostseq.
    pub roostseq: u64,
    /// Type.
    pub ty: String,
    /// Arrival order (first arrival).
    pub arrival: i64,
    /// Raw JSON.
    pub json: String,
}

/// Counters of what the service has recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Distinct events stored.
    pub events: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
}

/// What the record holds for a deployment topic: (sequence, envelope), or nothing.
type Held = Option<(u64, Vec<u8>)>;

/// What a batch does to the deployment topics, decided by reads alone.
#[derive(Debug, Default)]
struct DesiredChanges {
    /// Per topic, in first-arrival order: what the record holds at the end of the batch
    /// (None: forget the topic).
    writes: Vec<(String, Held)>,
    /// As [`BatchOutcome::regressed`].
    regressed: Vec<(String, Vec<u8>)>,
    /// Per item, in order: its verdict.
    verdicts: Vec<Verdict>,
}

/// Judges every deployment envelope of a batch in broker order against what the record
/// holds, as the batch goes (a newer envelope early in a batch is what a later older one is
/// compared with). Reads only: a batch of envelopes the record holds already (the
/// controller's own publish coming back) needs no write transaction.
fn desired_changes<'a>(
    c: &Conn<'_>,
    envelopes: impl Iterator<Item = (&'a String, &'a Vec<u8>)>,
) -> Result<DesiredChanges, DbError> {
    let mut held: HashMap<&str, Held> = HashMap::new();
    let mut out = DesiredChanges::default();
    for (topic, payload) in envelopes {
        let now = match held.entry(topic.as_str()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(desired::held(c, topic)?),
        };
        let verdict = desired::judge(now.as_ref().map(|(s, _)| *s), payload);
        out.verdicts.push(verdict);
        // In broker order: what the broker shows last for a topic is what it holds.
        out.regressed.retain(|(t, _)| t != topic);
        let write = match verdict {
            Verdict::Store(seq) => Some((seq, payload.clone())),
            Verdict::Clear => None,
            Verdict::Older => {
                if let Some((_, ours)) = now {
                    out.regressed.push((topic.clone(), ours.clone()));
                }
                continue;
            }
            Verdict::Same | Verdict::Unreadable => continue,
        };
        *now = write.clone();
        match out.writes.iter_mut().find(|(t, _)| t == topic) {
            Some((_, w)) => *w = write,
            None => out.writes.push((topic.clone(), write)),
        }
    }
    Ok(out)
}

fn write_desired(c: &Conn<'_>, changes: &DesiredChanges) -> Result<(), DbError> {
    for (topic, write) in &changes.writes {
        match write {
            Some((seq, payload)) => desired::store(c, topic, *seq, payload)?,
            None => desired::clear(c, topic)?,
        }
    }
    Ok(())
}

impl FleetDb {
    /// Records a batch of events in one transaction; returns how many were new.
    pub fn record_events(&self, events: &[(String, CloudEvent, String)]) -> Result<usize, DbError> {
        self.transaction(|tx| insert_events(tx, events.iter().map(|(s, e, j)| (s, e, j))))
    }

    /// Keeps the envelope if its sequence is newer than the stored one. Returns whether the
    /// record now holds it (or, for an empty payload, has forgotten the topic).
    pub fn record_desired(&self, topic: &str, payload: &[u8]) -> Result<bool, DbError> {
        let (topic, payload) = (topic.to_owned(), payload.to_vec());
        let changes =
            self.with_conn(|c| desired_changes(c, std::iter::once((&topic, &payload))))?;
        if !changes.writes.is_empty() {
            self.transaction(|tx| write_desired(tx, &changes))?;
        }
        Ok(matches!(
            changes.verdicts.first(),
            Some(Verdict::Store(_) | Verdict::Clear | Verdict::Same)
        ))
    }

    /// Records a batch of incoming messages in one transaction (one fsync for all of it),
    /// and in none when nothing in it changes the record (deployment envelopes the record
    /// holds already, or older ones). Nothing of a failed batch is recorded: its messages
    /// must not be acknowledged.
    pub fn record_batch(&self, items: &[FleetItem]) -> Result<BatchOutcome, DbError> {
        let envelopes = items.iter().filter_map(|i| match i {
            FleetItem::Desired(t, p) => Some((t, p)),
            _ => None,
        });
        let changes = self.with_conn(|c| desired_changes(c, envelopes))?;
        let mut out = BatchOutcome {
            new_events: 0,
            regressed: changes.regressed.clone(),
        };
        let others = items.iter().any(|i| !matches!(i, FleetItem::Desired(..)));
        if !others && changes.writes.is_empty() {
            return Ok(out);
        }
        out.new_events = self.transaction(|tx| {
            let events = items.iter().filter_map(|i| match i {
                FleetItem::Event(s, e, j) => Some((s, e.as_ref(), j)),
                _ => None,
            });
            let new = insert_events(tx, events)?;
            // Each table's rows in key order (stable: a store's later document stays later):
            // instances recording the same messages at once on PostgreSQL then take their
            // row locks in one order and never deadlock.
            let mut docs: Vec<(bool, &String, &String)> = items
                .iter()
                .filter_map(|item| match item {
                    FleetItem::Status(store, json) => Some((true, store, json)),
                    FleetItem::Presence(store, json) => Some((false, store, json)),
                    FleetItem::Event(..) | FleetItem::Desired(..) => None,
                })
                .collect();
            docs.sort_by(|a, b| (!a.0, a.1).cmp(&(!b.0, b.1)));
            for (status, store, json) in docs {
                upsert_doc(tx, status, store, json)?;
            }
            write_desired(tx, &changes)?;
            Ok::<_, DbError>(new)
        })?;
        Ok(out)
    }

    /// A store's events in first-arrival order.
    pub fn events(&self, store: &str) -> Result<Vec<StoredEvent>, DbError> {
        self.with_conn(|c| {
            c.query(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE store = ?1 ORDER BY arrival"),
                args![store],
            )?
            .iter()
            .map(|r| stored_event(r, 0))
            .collect()
        })
    }

    /// The last `limit` events to arrive, newest last, with their stores.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(String, StoredEvent)>, DbError> {
        let mut out = self.with_conn(|c| {
            c.query(
                &format!(
                    "SELECT store, {EVENT_COLUMNS} FROM events ORDER BY arrival DESC LIMIT ?1"
                ),
                args![limit as i64],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, stored_event(r, 1)?)))
            .collect::<Result<Vec<(String, StoredEvent)>, DbError>>()
        })?;
        out.reverse();
        Ok(out)
    }

    /// Stores with events or status.
    pub fn stores(&self) -> Result<Vec<String>, DbError> {
        self.with_conn(|c| {
            c.query("SELECT store FROM events UNION SELECT store FROM status UNION SELECT store FROM presence ORDER BY 1", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect()
        })
    }

    /// Missing `roostseq` ranges per store (between 1 and the highest seen).
    pub fn gaps(&self) -> Result<Vec<Gap>, DbError> {
        self.with_conn(gaps_in)
    }

    /// Counts.
    pub fn counts(&self) -> Result<FleetCounts, DbError> {
        self.with_conn(|c| {
            let events: u64 = c.query_value("SELECT COUNT(*) FROM events", &[])?;
            let duplicates: u64 =
                match c.query_opt("SELECT value FROM counters WHERE key = 'duplicates'", &[])? {
                    Some(r) => r.get(0)?,
                    None => 0,
                };
            Ok(FleetCounts { events, duplicates })
        })
    }

    /// Retained-style messages (status + presence) for the fleet table.
    pub fn status_messages(&self, topics: &Topics) -> Result<Vec<(String, Vec<u8>)>, DbError> {
        let mut out = Vec::new();
        for (table, kind) in [
            ("status", StoreTopicKind::Status),
            ("presence", StoreTopicKind::Presence),
        ] {
            let rows = self.with_conn(|c| {
                c.query(
                    &format!("SELECT store, json FROM {table} ORDER BY store"),
                    &[],
                )
            })?;
            for row in rows {
                let (store, json): (String, String) = (row.get(0)?, row.get(1)?);
                let topic = match kind {
                    StoreTopicKind::Status => topics.status(&store),
                    _ => topics.presence(&store),
                };
                out.push((topic, json.into_bytes()));
            }
        }
        Ok(out)
    }
}

/// The columns [`stored_event`] reads, in its order.
const EVENT_COLUMNS: &str = "id, roostseq, type, arrival, json";

/// A [`StoredEvent`] from [`EVENT_COLUMNS`] at `from`, `from + 1`, … of a row.
fn stored_event(r: &Row, from: usize) -> Result<StoredEvent, DbError> {
    Ok(StoredEvent {
        id: r.get(from)?,
        roostseq: r.get(from + 1)?,
        ty: r.get(from + 2)?,
        arrival: r.get(from + 3)?,
        json: r.get(from + 4)?,
    })
}

/// Missing `roostseq` ranges per store (between 1 and the highest seen), on a connection.
pub fn gaps_in(c: &Conn<'_>) -> Result<Vec<Gap>, DbError> {
    let rows = c.query(
        "SELECT store, roostseq FROM events GROUP BY store, roostseq ORDER BY store, roostseq",
        &[],
    )?;
    let mut gaps = Vec::new();
    let mut prev: Option<(String, u64)> = None;
    for row in rows {
        let (store, seq): (String, u64) = (row.get(0)?, row.get(1)?);
        let expected = match &prev {
            Some((s, p)) if *s == store => p + 1,
            _ => 1,
        };
        if seq > expected {
            gaps.push(Gap {
                store: store.clone(),
                from: expected,
                to: seq - 1,
            });
        }
        prev = Some((store, seq));
    }
    Ok(gaps)
}

/// Inserts events, each once by its `id` (`ON CONFLICT DO NOTHING`: on PostgreSQL an
/// instance inserting an event another is inserting waits for that one's commit and then
/// counts it a duplicate), ordered by (store, roostseq, id): arrival is each store's
/// roostseq order, and instances recording one batch lock rows in one order (no deadlock).
fn insert_events<'a>(
    c: &Conn<'_>,
    events: impl Iterator<Item = (&'a String, &'a CloudEvent, &'a String)>,
) -> Result<usize, DbError> {
    let mut events: Vec<_> = events.collect();
    events.sort_by(|a, b| (a.0, a.1.roostseq, &a.1.id).cmp(&(b.0, b.1.roostseq, &b.1.id)));
    let mut new = 0usize;
    let mut total = 0usize;
    for (store, e, json) in events {
        total += 1;
        let inserted = c.execute(
            "INSERT INTO events(id, store, roostseq, type, subject, time, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO NOTHING",
            args![&e.id, store, e.roostseq, &e.ty, &e.subject, &e.time, json],
        )? as usize;
        new += inserted;
        // A failure, rollback or uncorrected drift is told (once: keyed by the event's id).
        if inserted > 0 {
            if let Some(n) = crate::notify::store_event(store, e) {
                super::notify::record_events(c, &[n])?;
            }
        }
    }
    let dups = (total - new) as i64;
    if dups > 0 {
        c.execute(
            "INSERT INTO counters(key, value) VALUES ('duplicates', ?1) ON CONFLICT(key) DO UPDATE SET value = counters.value + excluded.value",
            args![dups],
        )?;
    }
    Ok(new)
}

/// When each store last sent a status document that changed: (store, ms since the epoch).
pub fn last_heard(c: &Conn<'_>) -> Result<Vec<(String, u64)>, DbError> {
    c.query("SELECT store, received_at FROM status ORDER BY store", &[])?
        .iter()
        .map(|r| {
            let at: String = r.get(1)?;
            let ms = roost_schemas::parse_rfc3339(&at)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
                .unwrap_or(0);
            Ok((r.get(0)?, ms))
        })
        .collect()
}

fn upsert_doc(c: &Conn<'_>, status: bool, store: &str, json: &str) -> Result<(), DbError> {
    // `received_at` is when the store last said something: the same document delivered again
    // (a retained message replayed to a new subscription) is no sign of life.
    let sql = if status {
        "INSERT INTO status(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at WHERE status.json IS DISTINCT FROM excluded.json"
    } else {
        "INSERT INTO presence(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at WHERE presence.json IS DISTINCT FROM excluded.json"
    };
    c.execute(sql, args![store, json, roost_schemas::now_rfc3339()])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::desired::now_ms;
    use crate::db::desired::test_envelope as envelope;
    use crate::db::Published;
    use roost_schemas::{envelope_sequence, sequence_rule};
    use rusqlite::Connection;

    fn ev(id: &str, seq: u64) -> (String, CloudEvent, String) {
        let mut e = CloudEvent::new(
            "roost://stores/s1/agent",
            roost_schemas::EventType::ApplyStarted,
            None,
            serde_json::json!({}),
        );
        e.id = id.into();
        e.roostseq = seq;
        ("s1".into(), e, "{}".into())
    }

    #[test]
    fn sequences_follow_the_rule_and_never_repeat() {
        assert_eq!(sequence_rule(0, 1_000), 1_000);
        assert_eq!(
            sequence_rule(5_000, 1_000),
            5_001,
            "a clock behind the record"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("db");
        let a = db.next_sequence("t").expect("seq");
        let b = db.next_sequence("t").expect("seq");
        assert!(b > a && a >= now_ms() - 60_000, "{a} {b}");
        // A retained envelope with a sequence from the future (another publisher) raises it.
        let far = now_ms() + 10_000_000;
        db.transaction(|c| {
            c.execute(
                "INSERT INTO desired(topic, sequence, payload) VALUES ('t', ?1, ?2)",
                args![far, &vec![0u8]],
            )
        })
        .expect("insert");
        assert_eq!(db.next_sequence("t").expect("seq"), far + 1);
        drop(db);
        let db = FleetDb::open(&dir.path().join("f.db")).expect("reopen");
        assert_eq!(db.next_sequence("t").expect("seq"), far + 2, "durable");
    }

    // Deduplication, duplicate counts, gaps and arrival order: `conformance::round_trip`,
    // which runs on both engines.

    #[test]
    fn keeps_newest_desired_envelope() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        assert!(db.record_desired("t", &envelope(2)).expect("rec"));
        assert!(
            !db.record_desired("t", &envelope(1)).expect("rec"),
            "older is ignored"
        );
        assert!(db.record_desired("t", &envelope(3)).expect("rec"));
        assert_eq!(envelope_sequence(&db.desired().expect("d")[0].1), Some(3));
    }

    #[test]
    fn a_batch_is_one_transaction_and_reports_what_the_broker_shows_older() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        let d = |t: &str, seq: u64| FleetItem::Desired(t.into(), envelope(seq));
        let (_, e, j) = ev("a", 1);
        let out = db
            .record_batch(&[
                FleetItem::Event("s1".into(), Box::new(e), j),
                FleetItem::Status("s1".into(), "{}".into()),
                d("t1", 5),
                d("t2", 5),
            ])
            .expect("batch");
        assert_eq!(out.new_events, 1);
        assert!(out.regressed.is_empty());
        // In broker order: t1 shows 3 after our 5 (the broker holds an older one: publish 5
        // again); t2 shows 3 and then 6 (it holds the newest: nothing to do).
        let out = db
            .record_batch(&[d("t1", 3), d("t2", 3), d("t2", 6)])
            .expect("batch");
        assert_eq!(out.regressed, vec![("t1".to_string(), envelope(5))]);
        let seqs: Vec<Option<u64>> = db
            .desired()
            .expect("desired")
            .iter()
            .map(|(_, p)| envelope_sequence(p))
            .collect();
        assert_eq!(seqs, vec![Some(5), Some(6)]);
        assert_eq!(db.counts().expect("counts").events, 1);
    }

    /// How many transactions other connections committed to `path` since `before`
    /// (`PRAGMA data_version` of an observing connection changes with each).
    fn data_version(observer: &Connection) -> i64 {
        observer
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version")
    }

    #[test]
    fn what_the_controller_published_is_recorded_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.db");
        let db = FleetDb::open(&path).expect("open");
        let observer = Connection::open(&path).expect("observer");
        let v0 = data_version(&observer);
        let topic = "roost/v1/fleet/deployments/web".to_string();
        let sent = db
            .record_publications(
                vec![Published {
                    topic: topic.clone(),
                    deployment: "web".into(),
                    role: "fleet".into(),
                    revision: Some("r1".into()),
                    remove: false,
                    sequence: 0,
                }],
                None,
                |_, p| Ok::<_, DbError>(envelope(p.sequence)),
            )
            .expect("publish");
        let v1 = data_version(&observer);
        assert_ne!(v0, v1, "the publish is one transaction");
        let (t, own) = sent.into_iter().next().expect("one message");
        assert_eq!(t, topic);
        // Its own retained message comes back through the record's subscription: nothing to
        // write, no transaction.
        let out = db
            .record_batch(&[FleetItem::Desired(topic.clone(), own.clone())])
            .expect("batch");
        assert_eq!(out, BatchOutcome::default());
        assert_eq!(
            data_version(&observer),
            v1,
            "no transaction for its own message"
        );
        // An older one (a broker holding a stale envelope): still no write, the record's
        // newest goes out again.
        let out = db
            .record_batch(&[FleetItem::Desired(topic.clone(), envelope(3))])
            .expect("batch");
        assert_eq!(out.regressed, vec![(topic.clone(), own)]);
        assert_eq!(data_version(&observer), v1);
        // Another publisher's newer envelope (`roost rollout` elsewhere) is recorded.
        let theirs = envelope(envelope_sequence(&db.desired().expect("d")[0].1).expect("seq") + 1);
        db.record_batch(&[FleetItem::Desired(topic.clone(), theirs.clone())])
            .expect("batch");
        assert_ne!(data_version(&observer), v1);
        assert_eq!(db.desired().expect("desired"), vec![(topic, theirs)]);
    }

    #[test]
    fn an_envelope_judged_newer_never_replaces_one_stored_since() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        db.record_desired("t", &envelope(5)).expect("rec");
        // Judged against 5, then a writer stores 9 before the batch's transaction.
        let changes = db
            .with_conn(|c| desired_changes(c, std::iter::once((&"t".to_string(), &envelope(7)))))
            .expect("judge");
        db.record_desired("t", &envelope(9)).expect("rec");
        db.transaction(|tx| write_desired(tx, &changes))
            .expect("write");
        assert_eq!(envelope_sequence(&db.desired().expect("d")[0].1), Some(9));
    }

    #[test]
    fn a_publish_whose_signing_fails_records_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        let p = |t: &str| Published {
            topic: t.into(),
            deployment: "web".into(),
            role: "wave".into(),
            revision: None,
            remove: true,
            sequence: 0,
        };
        let r = db.record_publications(vec![p("a"), p("b")], None, |i, p| {
            if i == 0 {
                Ok(envelope(p.sequence))
            } else {
                Err(DbError::Encode {
                    what: "a test envelope",
                    source: serde_json::from_str::<u8>("x").expect_err("bad json"),
                })
            }
        });
        assert!(r.is_err());
        assert!(db.desired().expect("desired").is_empty());
        assert!(db
            .with_conn(crate::db::gitops::published)
            .expect("published")
            .is_empty());
    }
}
