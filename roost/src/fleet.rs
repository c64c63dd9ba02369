//! `roost fleet`: the cloud-side record of the fleet. Subscribes to every store's status,
//! events and presence and to all deployment topics; stores them in SQLite (events
//! deduplicated by `id`, gaps in each store's `roostseq` detected); and keeps the latest
//! desired-state envelope per topic, restoring them retained whenever the cloud broker comes
//! back without a session (rumqttd keeps nothing across a restart). A topic is restored only
//! if the broker does not hold it, or holds an older sequence, once the new subscription's
//! retained messages have arrived: an envelope published while the service was reconnecting
//! is never replaced by an older one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use roost_runtime::{DirectMessage, Incoming, Link, LinkConfig};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{CloudEvent, Envelope, Topics};
use rusqlite::{params, Connection, OptionalExtension};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

/// Errors of the fleet service.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// SQLite failed.
    #[error("fleet database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The MQTT link could not start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
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

/// The fleet database.
#[derive(Clone)]
pub struct FleetDb {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for FleetDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetDb")
    }
}

/// Counters of what the service has recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounts {
    /// Distinct events stored.
    pub events: u64,
    /// Duplicate deliveries dropped.
    pub duplicates: u64,
}

impl FleetDb {
    /// Opens or creates the database.
    pub fn open(path: &Path) -> Result<FleetDb, FleetError> {
        // Durable like the outboxes: events are acknowledged to the broker only after they
        // are recorded here.
        let conn = roost_runtime::sqlite::open_durable(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                arrival INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                store TEXT NOT NULL,
                roostseq INTEGER NOT NULL,
                type TEXT NOT NULL,
                subject TEXT,
                time TEXT NOT NULL,
                json TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_store_seq ON events(store, roostseq);
            CREATE TABLE IF NOT EXISTS status (store TEXT PRIMARY KEY, json TEXT NOT NULL, received_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS presence (store TEXT PRIMARY KEY, json TEXT NOT NULL, received_at TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS desired (topic TEXT PRIMARY KEY, sequence INTEGER NOT NULL, payload BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS sequences (topic TEXT PRIMARY KEY, last INTEGER NOT NULL);",
        )?;
        Ok(FleetDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a batch of events in one transaction; returns how many were new.
    pub fn record_events(
        &self,
        events: &[(String, CloudEvent, String)],
    ) -> Result<usize, FleetError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let mut new = 0usize;
        for (store, e, json) in events {
            let n = tx.execute(
                "INSERT OR IGNORE INTO events(id, store, roostseq, type, subject, time, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![e.id, store, e.roostseq as i64, e.ty, e.subject, e.time, json],
            )?;
            new += n;
        }
        let dups = (events.len() - new) as i64;
        if dups > 0 {
            tx.execute(
                "INSERT INTO counters(key, value) VALUES ('duplicates', ?1) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                [dups],
            )?;
        }
        tx.commit()?;
        Ok(new)
    }

    /// Records a status or presence document.
    pub fn record_doc(&self, table: &str, store: &str, json: &str) -> Result<(), FleetError> {
        let sql = match table {
            "status" => "INSERT INTO status(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at",
            _ => "INSERT INTO presence(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at",
        };
        self.lock()
            .execute(sql, params![store, json, roost_schemas::now_rfc3339()])?;
        Ok(())
    }

    /// Keeps the envelope if its sequence is not older than the stored one. Returns whether
    /// it was stored.
    pub fn record_desired(&self, topic: &str, payload: &[u8]) -> Result<bool, FleetError> {
        let seq = envelope_sequence(payload);
        let c = self.lock();
        let cur: Option<i64> = c
            .query_row(
                "SELECT sequence FROM desired WHERE topic = ?1",
                [topic],
                |r| r.get(0),
            )
            .optional()?;
        if payload.is_empty() {
            c.execute("DELETE FROM desired WHERE topic = ?1", [topic])?;
            return Ok(true);
        }
        let Some(seq) = seq else { return Ok(false) };
        if cur.is_some_and(|c| c > seq as i64) {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO desired(topic, sequence, payload) VALUES (?1, ?2, ?3) ON CONFLICT(topic) DO UPDATE SET sequence = excluded.sequence, payload = excluded.payload",
            params![topic, seq as i64, payload],
        )?;
        Ok(true)
    }

    /// Runs `f` in one transaction (blocking: call it from a blocking thread).
    pub fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on the connection (blocking: call it from a blocking thread).
    pub fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        f(&self.lock())
    }

    /// Allocates the sequence for the next envelope on `topic` by the contract's rule,
    /// `max(last + 1, milliseconds since the epoch)`, from this database's durable record
    /// (never only from what a broker retains), and records it as used.
    pub fn next_sequence(&self, topic: &str) -> Result<u64, FleetError> {
        next_sequence_in(&self.lock(), topic)
    }

    /// Every stored desired envelope.
    pub fn desired(&self) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT topic, payload FROM desired ORDER BY topic")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A store's events in first-arrival order.
    pub fn events(&self, store: &str) -> Result<Vec<StoredEvent>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT id, roostseq, type, arrival, json FROM events WHERE store = ?1 ORDER BY arrival")?;
        let rows = stmt.query_map([store], |r| {
            Ok(StoredEvent {
                id: r.get(0)?,
                roostseq: r.get::<_, i64>(1)? as u64,
                ty: r.get(2)?,
                arrival: r.get(3)?,
                json: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores with events or status.
    pub fn stores(&self) -> Result<Vec<String>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT store FROM events UNION SELECT store FROM status UNION SELECT store FROM presence ORDER BY 1")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Missing `roostseq` ranges per store (between 1 and the highest seen).
    pub fn gaps(&self) -> Result<Vec<Gap>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare(
            "SELECT store, roostseq FROM events GROUP BY store, roostseq ORDER BY store, roostseq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        let mut gaps = Vec::new();
        let mut prev: Option<(String, u64)> = None;
        for row in rows {
            let (store, seq) = row?;
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

    /// Counts.
    pub fn counts(&self) -> Result<FleetCounts, FleetError> {
        let c = self.lock();
        let events: i64 = c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
        let duplicates: i64 = c
            .query_row(
                "SELECT value FROM counters WHERE key = 'duplicates'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        Ok(FleetCounts {
            events: events as u64,
            duplicates: duplicates as u64,
        })
    }

    /// Retained-style messages (status + presence) for the fleet table.
    pub fn status_messages(&self, topics: &Topics) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let c = self.lock();
        let mut out = Vec::new();
        for (table, kind) in [
            ("status", StoreTopicKind::Status),
            ("presence", StoreTopicKind::Presence),
        ] {
            let mut stmt = c.prepare(&format!("SELECT store, json FROM {table}"))?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (store, json) = row?;
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

/// The rollout sequence inside an envelope, without verifying it.
pub fn envelope_sequence(payload: &[u8]) -> Option<u64> {
    let env: Envelope = serde_json::from_slice(payload).ok()?;
    let body = B64.decode(env.payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()?
        .get("sequence")?
        .as_u64()
}

/// Options of the fleet service.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Cloud broker host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database file.
    pub db: PathBuf,
    /// MQTT client id (persistent session).
    pub client_id: String,
    /// TLS and credentials for the cloud broker.
    pub security: roost_runtime::Security,
}

/// Runs the fleet service until cancelled.
pub async fn run(
    opts: FleetOptions,
    db: FleetDb,
    cancel: CancellationToken,
) -> Result<(), FleetError> {
    let topics = Topics::default();
    let mut lc = LinkConfig::new("cloud", &opts.host, opts.port, &opts.client_id);
    lc.security = opts.security.clone();
    lc.clean_session = false;
    lc.manual_acks = true;
    lc.keep_alive = Duration::from_secs(5);
    lc.backoff = (Duration::from_millis(100), Duration::from_secs(5));
    lc.max_packet_size = 4 << 20;
    lc.subscriptions = topics.all_deployment_filters();
    for k in [
        StoreTopicKind::Status,
        StoreTopicKind::Events,
        StoreTopicKind::Presence,
    ] {
        lc.subscriptions.push(topics.all_stores(k));
    }
    let mut link = Link::start(lc, None, cancel.child_token())?;
    let handle = link.handle.clone();
    // A broker that lost our session (restarted) has lost its retained messages too: restore
    // them, after a quiet period in which the broker shows what it still (or already) holds.
    let mut sessions = link.handle.sessions();
    let span = tracing::info_span!("fleet");
    async move {
        let mut restore: Option<Restore> = None;
        // Per deployment topic: the connection and sequence of the newest message seen.
        let mut latest: HashMap<String, (u64, Option<u64>)> = HashMap::new();
        loop {
            let deadline = restore.as_ref().map(|r| r.deadline);
            let first: Incoming = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = sessions.changed() => {
                    if changed.is_err() {
                        break; // the link task is gone
                    }
                    let (connection, session_present) = *sessions.borrow_and_update();
                    if !session_present {
                        restore = Some(Restore::new(connection, &latest));
                    }
                    continue;
                }
                m = link.incoming.recv() => match m { Some(m) => m, None => break },
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(r) = restore.take() {
                        r.finish(&db, &handle);
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match link.incoming.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut events = Vec::new();
            for m in &batch {
                if topics.parse_deployment(&m.topic).is_some() {
                    let seq = seen_sequence(&m.payload);
                    latest.insert(m.topic.clone(), (m.connection, seq));
                    if let Some(r) = restore.as_mut() {
                        r.saw(m.connection, &m.topic, seq);
                    }
                    if let Err(error) = db.record_desired(&m.topic, &m.payload) {
                        warn!(%error, "cannot record desired state");
                    }
                    continue;
                }
                match topics.parse_store_topic(&m.topic) {
                    Some((store, StoreTopicKind::Events)) => {
                        match serde_json::from_slice::<CloudEvent>(&m.payload) {
                            Ok(e) => events.push((
                                store,
                                e,
                                String::from_utf8_lossy(&m.payload).into_owned(),
                            )),
                            Err(error) => warn!(%error, %store, "event is not a CloudEvent"),
                        }
                    }
                    Some((store, StoreTopicKind::Status)) => {
                        if let Err(error) =
                            db.record_doc("status", &store, &String::from_utf8_lossy(&m.payload))
                        {
                            warn!(%error, "cannot record status");
                        }
                    }
                    Some((store, StoreTopicKind::Presence)) => {
                        if let Err(error) =
                            db.record_doc("presence", &store, &String::from_utf8_lossy(&m.payload))
                        {
                            warn!(%error, "cannot record presence");
                        }
                    }
                    None => {}
                }
            }
            if !events.is_empty() {
                match db.record_events(&events) {
                    Ok(_) => {}
                    Err(error) => {
                        // Not acknowledged: the broker redelivers to our persistent session.
                        warn!(%error, "cannot record events");
                        continue;
                    }
                }
            }
            for m in &batch {
                handle.ack(m);
            }
        }
        let _ = link.task.await;
    }
    .instrument(span)
    .await;
    Ok(())
}

/// [`FleetDb::next_sequence`] on a connection (inside a caller's transaction).
pub fn next_sequence_in(c: &Connection, topic: &str) -> Result<u64, FleetError> {
    let last: i64 = c
        .query_row(
            "SELECT MAX(COALESCE((SELECT last FROM sequences WHERE topic = ?1), 0),
                        COALESCE((SELECT sequence FROM desired WHERE topic = ?1), 0))",
            [topic],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let next = sequence_rule(last.max(0) as u64, now_ms());
    c.execute(
        "INSERT INTO sequences(topic, last) VALUES (?1, ?2)
         ON CONFLICT(topic) DO UPDATE SET last = MAX(last, excluded.last)",
        params![topic, next as i64],
    )?;
    Ok(next)
}

/// Stores a desired envelope on a connection (see [`FleetDb::record_desired`]).
pub fn put_desired_in(
    c: &Connection,
    topic: &str,
    sequence: u64,
    payload: &[u8],
) -> Result<(), FleetError> {
    c.execute(
        "INSERT INTO desired(topic, sequence, payload) VALUES (?1, ?2, ?3) ON CONFLICT(topic) DO UPDATE SET sequence = excluded.sequence, payload = excluded.payload",
        params![topic, sequence as i64, payload],
    )?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The contract's sequence rule: greater than the last known, and at least the clock in ms,
/// so a publisher that lost its record (or a broker that lost its retained messages) still
/// picks a sequence no agent has accepted.
pub fn sequence_rule(last_known: u64, now_ms: u64) -> u64 {
    (last_known + 1).max(now_ms)
}

/// The sequence a broker's deployment message shows: None for a cleared topic (empty
/// payload) or an unreadable envelope, which a restore leaves alone.
fn seen_sequence(payload: &[u8]) -> Option<u64> {
    if payload.is_empty() {
        None
    } else {
        envelope_sequence(payload)
    }
}

/// A pending restore of the desired state after the broker lost our session.
struct Restore {
    /// The connection that came up without a session.
    connection: u64,
    started: tokio::time::Instant,
    deadline: tokio::time::Instant,
    /// What the broker delivered per deployment topic on that connection (or later).
    seen: HashMap<String, Option<u64>>,
}

impl Restore {
    /// Retained messages follow the SUBACK within milliseconds; wait at least this long, and
    /// until deployment messages have been quiet for `QUIET`, but no longer than `MAX`.
    const MIN: Duration = Duration::from_millis(1000);
    const QUIET: Duration = Duration::from_millis(300);
    const MAX: Duration = Duration::from_secs(5);

    /// A restore for `connection`, counting what was already processed from it.
    fn new(connection: u64, latest: &HashMap<String, (u64, Option<u64>)>) -> Restore {
        let now = tokio::time::Instant::now();
        Restore {
            connection,
            started: now,
            deadline: now + Self::MIN,
            seen: latest
                .iter()
                .filter(|(_, (c, _))| *c >= connection)
                .map(|(t, (_, s))| (t.clone(), *s))
                .collect(),
        }
    }

    fn saw(&mut self, connection: u64, topic: &str, seq: Option<u64>) {
        if connection < self.connection {
            return;
        }
        let e = self.seen.entry(topic.to_owned()).or_insert(seq);
        *e = (*e).max(seq);
        let now = tokio::time::Instant::now();
        self.deadline = self
            .deadline
            .max(now + Self::QUIET)
            .min(self.started + Self::MAX);
    }

    /// The stored envelopes the broker does not hold in this or a newer version.
    fn missing(&self, desired: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
        desired
            .into_iter()
            .filter(|(topic, payload)| {
                let ours = envelope_sequence(payload);
                match self.seen.get(topic) {
                    None => true,
                    // Cleared or unreadable on the broker: someone else's decision; leave it.
                    Some(None) => false,
                    Some(Some(theirs)) => ours.is_some_and(|o| o > *theirs),
                }
            })
            .collect()
    }

    /// Republishes, retained, every stored envelope the broker does not hold in this or a
    /// newer version.
    fn finish(self, db: &FleetDb, handle: &roost_runtime::LinkHandle) {
        let desired = match db.desired() {
            Ok(d) => d,
            Err(error) => {
                warn!(%error, "cannot read desired state to restore");
                return;
            }
        };
        let missing = self.missing(desired);
        if !missing.is_empty() {
            info!(
                count = missing.len(),
                "restoring desired state on the cloud broker"
            );
        }
        for (topic, payload) in missing {
            let _ = handle.publish(DirectMessage {
                topic,
                payload,
                retain: true,
            });
        }
    }
}

#[cfg(test)]
mod sequence_tests {
    use super::*;

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
        db.lock()
            .execute(
                "INSERT INTO desired(topic, sequence, payload) VALUES ('t', ?1, x'00')",
                [far as i64],
            )
            .expect("insert");
        assert_eq!(db.next_sequence("t").expect("seq"), far + 1);
        drop(db);
        let db = FleetDb::open(&dir.path().join("f.db")).expect("reopen");
        assert_eq!(db.next_sequence("t").expect("seq"), far + 2, "durable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn dedupes_and_finds_gaps() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        assert_eq!(
            db.record_events(&[ev("a", 1), ev("b", 2), ev("a", 1)])
                .expect("rec"),
            2
        );
        db.record_events(&[ev("e", 5), ev("f", 6), ev("b", 2)])
            .expect("rec");
        assert_eq!(
            db.counts().expect("counts"),
            FleetCounts {
                events: 4,
                duplicates: 2
            }
        );
        assert_eq!(
            db.gaps().expect("gaps"),
            vec![Gap {
                store: "s1".into(),
                from: 3,
                to: 4
            }]
        );
        let seqs: Vec<u64> = db
            .events("s1")
            .expect("events")
            .iter()
            .map(|e| e.roostseq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 5, 6]);
    }

    #[test]
    fn keeps_newest_desired_envelope() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        let key = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
        let env = |seq: u64| {
            serde_json::to_vec(&key.sign(
                roost_schemas::PAYLOAD_TYPE,
                format!("{{\"sequence\":{seq}}}").as_bytes(),
            ))
            .expect("json")
        };
        assert!(db.record_desired("t", &env(2)).expect("rec"));
        assert!(
            !db.record_desired("t", &env(1)).expect("rec"),
            "older is ignored"
        );
        assert!(db.record_desired("t", &env(3)).expect("rec"));
        assert_eq!(envelope_sequence(&db.desired().expect("d")[0].1), Some(3));
    }

    #[test]
    fn restore_only_what_the_broker_lacks_or_holds_older() {
        let key = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
        let env = |seq: u64| {
            serde_json::to_vec(&key.sign(
                roost_schemas::PAYLOAD_TYPE,
                format!("{{\"sequence\":{seq}}}").as_bytes(),
            ))
            .expect("json")
        };
        // Seen before the session was lost (connection 1) does not count; connection 2 does.
        let latest: HashMap<String, (u64, Option<u64>)> = [
            ("old".to_string(), (1, Some(5))),
            ("newer".to_string(), (2, Some(7))),
        ]
        .into_iter()
        .collect();
        let mut r = Restore::new(2, &latest);
        r.saw(2, "older", Some(2));
        r.saw(1, "gone", Some(9)); // from the connection before: ignored
        let desired = vec![
            ("old".to_string(), env(5)),
            ("newer".to_string(), env(6)),
            ("older".to_string(), env(3)),
            ("gone".to_string(), env(4)),
        ];
        let topics: Vec<String> = r.missing(desired).into_iter().map(|(t, _)| t).collect();
        assert_eq!(topics, vec!["old", "older", "gone"]);
    }
}
