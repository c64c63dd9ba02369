//! `roost fleet`: the cloud-side record of the fleet. Subscribes to every store's status,
//! events and presence and to all deployment topics; stores them in SQLite (events
//! deduplicated by `id`, gaps in each store's `roostseq` detected); and keeps the latest
//! desired-state envelope per topic, restoring them retained when the cloud broker lost them.
//!
//! "Session present" is no proof that retained state survived (mosquitto killed with -9
//! comes back from its last autosave with our session but without newer retained messages;
//! rumqttd keeps nothing). So on **every** connection of the service's link a fresh
//! clean-session reader ([`check_broker`]) subscribes to the deployment topics, collects what
//! the broker holds, and republishes every recorded envelope the broker lacks or holds in an
//! older sequence. The reader stays subscribed until it has published, so an envelope
//! published meanwhile (while the service was reconnecting) is seen and never replaced by an
//! older one; and should the broker still show an older envelope than the record afterwards
//! (a publish racing ours), the link republishes the record's newest.
//!
//! SQLite work (fsynced: `synchronous=FULL`) runs on the blocking pool, never on the async
//! runtime; one batch of incoming messages is one transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_runtime::{Backoff, DirectMessage, Incoming, Link, LinkConfig};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{envelope_sequence, sequence_rule, CloudEvent, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
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
    /// A blocking database task could not run to its end.
    #[error("fleet database task: {0}")]
    Task(String),
    /// The broker check's MQTT connection failed.
    #[error("cloud broker: {0}")]
    Mqtt(String),
}

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

/// What storing one deployment envelope did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DesiredWrite {
    /// Stored (new, same or newer sequence).
    Stored,
    /// The topic was cleared (empty payload): the record forgets it.
    Cleared,
    /// Older than the recorded one, which is kept (its payload).
    Older(Vec<u8>),
    /// No readable sequence: ignored.
    Unreadable,
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
            CREATE TABLE IF NOT EXISTS sequences (topic TEXT PRIMARY KEY, last INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS revisions (revision TEXT PRIMARY KEY, url TEXT NOT NULL, subject TEXT NOT NULL, committed_at TEXT NOT NULL);",
        )?;
        Ok(FleetDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the blocking thread pool: every call of this database may fsync, which
    /// must not stall the async runtime. For async callers (the GitOps controller too).
    pub async fn call<T, F>(&self, f: F) -> Result<T, FleetError>
    where
        T: Send + 'static,
        F: FnOnce(&FleetDb) -> Result<T, FleetError> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| FleetError::Task(e.to_string()))?
    }

    /// Records a batch of events in one transaction; returns how many were new.
    pub fn record_events(
        &self,
        events: &[(String, CloudEvent, String)],
    ) -> Result<usize, FleetError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let new = insert_events(&tx, events.iter().map(|(s, e, j)| (s, e, j)))?;
        tx.commit()?;
        Ok(new)
    }

    /// Records a status or presence document.
    pub fn record_doc(&self, table: &str, store: &str, json: &str) -> Result<(), FleetError> {
        upsert_doc(&self.lock(), table == "status", store, json)
    }

    /// Keeps the envelope if its sequence is not older than the stored one. Returns whether
    /// it was stored (or, for an empty payload, the topic forgotten).
    pub fn record_desired(&self, topic: &str, payload: &[u8]) -> Result<bool, FleetError> {
        Ok(matches!(
            upsert_desired(&self.lock(), topic, payload)?,
            DesiredWrite::Stored | DesiredWrite::Cleared
        ))
    }

    /// Records a batch of incoming messages in one transaction (one fsync for all of it).
    /// Nothing of a failed batch is recorded: its messages must not be acknowledged.
    pub fn record_batch(&self, items: &[FleetItem]) -> Result<BatchOutcome, FleetError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let mut out = BatchOutcome::default();
        let events = items.iter().filter_map(|i| match i {
            FleetItem::Event(s, e, j) => Some((s, e.as_ref(), j)),
            _ => None,
        });
        out.new_events = insert_events(&tx, events)?;
        for item in items {
            match item {
                FleetItem::Event(..) => {}
                FleetItem::Status(store, json) => upsert_doc(&tx, true, store, json)?,
                FleetItem::Presence(store, json) => upsert_doc(&tx, false, store, json)?,
                FleetItem::Desired(topic, payload) => {
                    // In broker order: what the broker shows last for a topic is what it holds.
                    let write = upsert_desired(&tx, topic, payload)?;
                    out.regressed.retain(|(t, _)| t != topic);
                    if let DesiredWrite::Older(ours) = write {
                        out.regressed.push((topic.clone(), ours));
                    }
                }
            }
        }
        tx.commit()?;
        Ok(out)
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

    /// The last `limit` events to arrive, newest last, with their stores.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(String, StoredEvent)>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare(
            "SELECT store, id, roostseq, type, arrival, json FROM events ORDER BY arrival DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((
                r.get(0)?,
                StoredEvent {
                    id: r.get(1)?,
                    roostseq: r.get::<_, i64>(2)? as u64,
                    ty: r.get(3)?,
                    arrival: r.get(4)?,
                    json: r.get(5)?,
                },
            ))
        })?;
        let mut out: Vec<(String, StoredEvent)> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Remembers a commit's subject line and time (RFC 3339), for the fleet's views.
    pub fn put_revision(
        &self,
        revision: &str,
        url: &str,
        subject: &str,
        committed_at: &str,
    ) -> Result<(), FleetError> {
        self.lock().execute(
            "INSERT OR REPLACE INTO revisions(revision, url, subject, committed_at) VALUES (?1, ?2, ?3, ?4)",
            params![revision, url, subject, committed_at],
        )?;
        Ok(())
    }

    /// Every known commit: revision -> (subject, committed_at).
    pub fn revisions(&self) -> Result<HashMap<String, (String, String)>, FleetError> {
        let c = self.lock();
        let mut stmt = c.prepare("SELECT revision, subject, committed_at FROM revisions")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))?;
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
        gaps_in(&self.lock())
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

/// Missing `roostseq` ranges per store (between 1 and the highest seen), on a connection.
pub fn gaps_in(c: &Connection) -> Result<Vec<Gap>, FleetError> {
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

fn insert_events<'a>(
    c: &Connection,
    events: impl Iterator<Item = (&'a String, &'a CloudEvent, &'a String)>,
) -> Result<usize, FleetError> {
    let mut new = 0usize;
    let mut total = 0usize;
    for (store, e, json) in events {
        total += 1;
        new += c.execute(
            "INSERT OR IGNORE INTO events(id, store, roostseq, type, subject, time, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![e.id, store, e.roostseq as i64, e.ty, e.subject, e.time, json],
        )?;
    }
    let dups = (total - new) as i64;
    if dups > 0 {
        c.execute(
            "INSERT INTO counters(key, value) VALUES ('duplicates', ?1) ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            [dups],
        )?;
    }
    Ok(new)
}

fn upsert_doc(c: &Connection, status: bool, store: &str, json: &str) -> Result<(), FleetError> {
    // `received_at` is when the store last said something: the same document delivered again
    // (a retained message replayed to a new subscription) is no sign of life.
    let sql = if status {
        "INSERT INTO status(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at WHERE status.json IS NOT excluded.json"
    } else {
        "INSERT INTO presence(store, json, received_at) VALUES (?1, ?2, ?3) ON CONFLICT(store) DO UPDATE SET json = excluded.json, received_at = excluded.received_at WHERE presence.json IS NOT excluded.json"
    };
    c.execute(sql, params![store, json, roost_schemas::now_rfc3339()])?;
    Ok(())
}

fn upsert_desired(c: &Connection, topic: &str, payload: &[u8]) -> Result<DesiredWrite, FleetError> {
    if payload.is_empty() {
        c.execute("DELETE FROM desired WHERE topic = ?1", [topic])?;
        return Ok(DesiredWrite::Cleared);
    }
    let Some(seq) = envelope_sequence(payload) else {
        return Ok(DesiredWrite::Unreadable);
    };
    let cur: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT sequence, payload FROM desired WHERE topic = ?1",
            [topic],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((cur, ours)) = cur {
        if cur > seq as i64 {
            return Ok(DesiredWrite::Older(ours));
        }
    }
    c.execute(
        "INSERT INTO desired(topic, sequence, payload) VALUES (?1, ?2, ?3) ON CONFLICT(topic) DO UPDATE SET sequence = excluded.sequence, payload = excluded.payload",
        params![topic, seq as i64, payload],
    )?;
    Ok(DesiredWrite::Stored)
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
    let mut sessions = link.handle.sessions();
    let span = tracing::info_span!("fleet");
    async move {
        // The broker check of the current connection (a newer connection cancels it).
        let mut check: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
        loop {
            let first: Incoming = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = sessions.changed() => {
                    if changed.is_err() {
                        break; // the link task is gone
                    }
                    // Every connection, with or without a session: a broker that kept our
                    // session may still have lost retained messages (mosquitto after kill -9).
                    let (connection, session_present) = *sessions.borrow_and_update();
                    if let Some((c, _)) = check.take() {
                        c.cancel();
                    }
                    let c = cancel.child_token();
                    let task = tokio::spawn(
                        check_broker(opts.clone(), db.clone(), c.clone()).instrument(
                            tracing::info_span!("broker_check", connection, session_present),
                        ),
                    );
                    check = Some((c, task));
                    continue;
                }
                m = link.incoming.recv() => match m { Some(m) => m, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match link.incoming.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let items: Vec<FleetItem> = batch.iter().filter_map(|m| item(&topics, m)).collect();
            let recorded = db.call(move |db| db.record_batch(&items)).await;
            let outcome = match recorded {
                Ok(o) => o,
                Err(error) => {
                    // Not acknowledged: the broker redelivers to our persistent session.
                    warn!(error = %roost_runtime::error_chain(&error), "cannot record a batch");
                    continue;
                }
            };
            for (topic, payload) in outcome.regressed {
                // The broker shows an older envelope than the record holds (a restore racing
                // a publish, or a publisher with a stale sequence): the newest stands.
                warn!(%topic, "the cloud broker holds an older envelope than the fleet record; publishing the record's again");
                let _ = handle.publish(DirectMessage {
                    topic,
                    payload,
                    retain: true,
                });
            }
            for m in &batch {
                handle.ack(m);
            }
        }
        if let Some((c, task)) = check.take() {
            c.cancel();
            let _ = task.await;
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

/// What the fleet record keeps of one incoming message (None: not a fleet topic, or not
/// readable).
fn item(topics: &Topics, m: &Incoming) -> Option<FleetItem> {
    if topics.parse_deployment(&m.topic).is_some() {
        return Some(FleetItem::Desired(m.topic.clone(), m.payload.clone()));
    }
    let text = || String::from_utf8_lossy(&m.payload).into_owned();
    match topics.parse_store_topic(&m.topic)? {
        (store, StoreTopicKind::Events) => match serde_json::from_slice::<CloudEvent>(&m.payload) {
            Ok(e) => Some(FleetItem::Event(store, Box::new(e), text())),
            Err(error) => {
                warn!(%error, %store, "event is not a CloudEvent");
                None
            }
        },
        (store, StoreTopicKind::Status) => Some(FleetItem::Status(store, text())),
        (store, StoreTopicKind::Presence) => Some(FleetItem::Presence(store, text())),
    }
}

/// What one broker check found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Deployment topics the broker holds (retained, or published during the check).
    pub held: usize,
    /// Topics republished from the record (missing on the broker, or older there).
    pub restored: Vec<String>,
}

/// Compares what the cloud broker holds on the deployment topics with the fleet record and
/// republishes (retained, QoS 1) what it lacks or holds older, retrying with backoff until
/// it succeeds or `cancel` fires (the next connection of the link starts a new check).
pub async fn check_broker(opts: FleetOptions, db: FleetDb, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = check_once(&opts, &db) => r,
        };
        match result {
            Ok(report) => {
                if report.restored.is_empty() {
                    info!(
                        held = report.held,
                        "the cloud broker holds the recorded desired state"
                    );
                } else {
                    info!(
                        held = report.held,
                        restored = report.restored.len(),
                        topics = ?report.restored,
                        "restored desired state on the cloud broker"
                    );
                }
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot compare the cloud broker's desired state with the fleet record");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How long a broker check waits: retained messages follow the SUBACK within milliseconds;
/// it waits until deployment messages have been quiet for `CHECK_QUIET`, at most `CHECK_MAX`.
const CHECK_QUIET: Duration = Duration::from_millis(500);
const CHECK_MAX: Duration = Duration::from_secs(10);

async fn check_once(opts: &FleetOptions, db: &FleetDb) -> Result<CheckReport, FleetError> {
    let mqtt = |e: &dyn std::fmt::Display| FleetError::Mqtt(e.to_string());
    let id = format!("{}-check-{:08x}", opts.client_id, rand::random::<u32>());
    let mut o = MqttOptions::new(id, opts.host.clone(), opts.port);
    // A clean session: what it receives after SUBACK is exactly what the broker holds now,
    // plus whatever is published while it listens.
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let filters = Topics::default().all_deployment_filters();
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .await
        .map_err(|e| mqtt(&e))?;
    let mut seen: HashMap<String, Option<u64>> = HashMap::new();
    let saw = |seen: &mut HashMap<String, Option<u64>>, p: &rumqttc::Publish| {
        let seq = envelope_sequence(&p.payload);
        let e = seen.entry(p.topic.clone()).or_insert(seq);
        *e = (*e).max(seq);
    };
    let result = async {
        let deadline = tokio::time::Instant::now() + CHECK_MAX;
        let mut quiet_from: Option<tokio::time::Instant> = None;
        loop {
            let until = match quiet_from {
                Some(t) => (t + CHECK_QUIET).min(deadline),
                None => deadline,
            };
            match tokio::time::timeout_at(until, ev.poll()).await {
                Err(_) if quiet_from.is_some() => break,
                Err(_) => return Err(FleetError::Mqtt("no SUBACK in time".into())),
                Ok(Err(e)) => return Err(mqtt(&e)),
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    quiet_from = Some(tokio::time::Instant::now());
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    saw(&mut seen, &p);
                    if quiet_from.is_some() {
                        quiet_from = Some(tokio::time::Instant::now());
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
        let desired = db.call(|db| db.desired()).await?;
        // Anything published while the record was read counts too.
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(20), ev.poll()).await {
            match r {
                Ok(Event::Incoming(Packet::Publish(p))) => saw(&mut seen, &p),
                Ok(_) => {}
                Err(e) => return Err(mqtt(&e)),
            }
        }
        let stale = stale_topics(&seen, desired);
        let mut next = stale.iter();
        let mut to_send = next.next();
        let mut acked = 0usize;
        let deadline = tokio::time::Instant::now() + CHECK_MAX;
        while acked < stale.len() {
            tokio::select! {
                r = async {
                    match to_send {
                        Some((t, p)) => client.publish(t.clone(), QoS::AtLeastOnce, true, p.clone()).await,
                        None => std::future::pending().await,
                    }
                }, if to_send.is_some() => {
                    r.map_err(|e| mqtt(&e))?;
                    to_send = next.next();
                }
                e = tokio::time::timeout_at(deadline, ev.poll()) => match e {
                    Err(_) => return Err(FleetError::Mqtt("no PUBACK in time".into())),
                    Ok(Err(e)) => return Err(mqtt(&e)),
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                },
            }
        }
        Ok(CheckReport {
            held: seen.len(),
            restored: stale.into_iter().map(|(t, _)| t).collect(),
        })
    }
    .await;
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out (bounded): a clean end instead of a dropped socket.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(e) = ev.poll().await {
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    result
}

/// The recorded envelopes the broker does not hold in this or a newer version. `seen` maps a
/// deployment topic to the newest sequence the broker showed (None: cleared or unreadable
/// there, someone else's decision, left alone).
pub fn stale_topics(
    seen: &HashMap<String, Option<u64>>,
    desired: Vec<(String, Vec<u8>)>,
) -> Vec<(String, Vec<u8>)> {
    desired
        .into_iter()
        .filter(|(topic, payload)| {
            let ours = envelope_sequence(payload);
            match seen.get(topic) {
                None => true,
                Some(None) => false,
                Some(Some(theirs)) => ours.is_some_and(|o| o > *theirs),
            }
        })
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    /// A signed envelope whose payload carries only `sequence`.
    fn envelope(seq: u64) -> Vec<u8> {
        let key = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
        serde_json::to_vec(&key.sign(
            roost_schemas::PAYLOAD_TYPE,
            format!("{{\"sequence\":{seq}}}").as_bytes(),
        ))
        .expect("json")
    }

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
        assert!(db.record_desired("t", &envelope(2)).expect("rec"));
        assert!(
            !db.record_desired("t", &envelope(1)).expect("rec"),
            "older is ignored"
        );
        assert!(db.record_desired("t", &envelope(3)).expect("rec"));
        assert_eq!(envelope_sequence(&db.desired().expect("d")[0].1), Some(3));
    }

    #[test]
    fn restore_only_what_the_broker_lacks_or_holds_older() {
        // What the broker showed the check: "same" as recorded, "newer" than recorded,
        // "older" than recorded, "cleared" (empty or unreadable there); "gone" not at all.
        let seen: HashMap<String, Option<u64>> = [
            ("same".to_string(), Some(5)),
            ("newer".to_string(), Some(7)),
            ("older".to_string(), Some(2)),
            ("cleared".to_string(), None),
        ]
        .into_iter()
        .collect();
        let desired = vec![
            ("same".to_string(), envelope(5)),
            ("newer".to_string(), envelope(6)),
            ("older".to_string(), envelope(3)),
            ("cleared".to_string(), envelope(8)),
            ("gone".to_string(), envelope(4)),
        ];
        let topics: Vec<String> = stale_topics(&seen, desired)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(topics, vec!["older", "gone"]);
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
}
