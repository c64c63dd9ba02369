//! The durable outbox: messages are committed to SQLite before anyone is told they were
//! accepted, leave in insertion order, and are deleted only after the broker's PUBACK.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit is on disk (fsync of the WAL)
//! before `enqueue` returns; that survives a process crash and a power loss. One writer thread
//! owns the connection and commits every request that is waiting in one transaction (group
//! commit), so a burst costs one fsync, not one per message. A caller may ask for
//! [`Durability::Ordered`] instead (a last-value document, state it can rebuild): that commit
//! survives a process crash, and since the WAL is appended in order, the next fsynced commit
//! makes it durable too; only a power cut before that can lose it. Deletes are ordered.
//!
//! Last-value topics (status, presence) are enqueued with `compact = true`: an older message
//! on the same topic that has not left yet is replaced. Past the disk cap the oldest events
//! are dropped and overflow events state exactly which `roostseq` ranges were lost.
//!
//! Exactness: a message handed to a connection ([`Outbox::peek_for_send`]) may already have
//! reached the broker even if its PUBACK never comes, so overflow never drops it (the cap can
//! be exceeded by at most the link's window of such messages). Only messages that never left
//! are dropped, so a reported `roostseq` never arrives. The loss is reported by one open (not
//! yet sent) overflow event, updated in place as more is dropped; if the open report is itself
//! dropped, its ranges and its own `roostseq` carry over into the next one. Its data holds the
//! exact `lost_ranges` (`[[from, to], …]`, disjoint, sorted), their total `lost_count`, and
//! `lost_from_roostseq`/`lost_to_roostseq` = the first and last lost (exact when there is
//! one range: always so while the link is down; a slow link can interleave losses with
//! messages that did leave).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use roost_schemas::{CloudEvent, EventType};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{oneshot, watch};

/// Errors of the outbox subsystem.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite failed.
    #[error("outbox database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file could not be prepared.
    #[error("outbox file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An event could not be serialized.
    #[error("event serialization: {0}")]
    Json(#[from] serde_json::Error),
    /// The writer thread is gone (shut down or crashed).
    #[error("outbox writer stopped")]
    Closed,
    /// The outbox is at its cap and has no overflow target to report losses to.
    #[error("outbox {path} is full and has no overflow target")]
    Full {
        /// The database file.
        path: PathBuf,
    },
    /// A state write committed with messages failed (the whole transaction was rolled back).
    #[error("state write: {0}")]
    State(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A group commit failed; every request in it gets the same cause.
    #[error("outbox {path}: commit failed")]
    Commit {
        /// The database file.
        path: PathBuf,
        /// The cause, shared by every request of the group.
        #[source]
        source: Arc<OutboxError>,
    },
}

/// A write of the caller's own tables that commits in the same transaction as the messages it
/// is enqueued with (for example the agent's per-deployment record and the events that report
/// it): both are on disk, or neither is.
pub type StateWrite = Box<
    dyn FnOnce(&rusqlite::Connection) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
        + Send,
>;

/// How a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Durability {
    /// Written to the WAL, not fsynced: survives a process crash; a power cut can lose it, and
    /// then everything committed after it, until the next [`Durability::Full`] commit syncs the WAL
    /// with every frame before it (SQLite's `synchronous=NORMAL`).
    Ordered,
    /// Fsynced before the caller hears of it: survives a power cut (`synchronous=FULL`).
    Full,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Ordered => "PRAGMA synchronous = NORMAL",
            Durability::Full => "PRAGMA synchronous = FULL",
        }
    }
}

/// A read of the caller's own tables, run on the writer thread (never on an async runtime).
type Read = Box<dyn FnOnce(&rusqlite::Connection) + Send>;

/// How an outbox is opened.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// SQLite file.
    pub path: PathBuf,
    /// Disk cap in bytes (payloads + topics + per-row overhead). Default 256 MiB.
    pub max_bytes: u64,
    /// Where overflow events go and who they are from; `None` = drop silently is NOT
    /// allowed, so without it the outbox refuses new messages past the cap instead.
    pub overflow: Option<OverflowTarget>,
}

/// Where and as whom an overflow event is published.
#[derive(Debug, Clone)]
pub struct OverflowTarget {
    /// Events topic.
    pub topic: String,
    /// CloudEvents `source`.
    pub source: String,
}

impl OutboxConfig {
    /// Defaults for a file: 256 MiB cap, no overflow target.
    pub fn new(path: impl Into<PathBuf>) -> OutboxConfig {
        OutboxConfig {
            path: path.into(),
            max_bytes: 256 * 1024 * 1024,
            overflow: None,
        }
    }
}

/// A message body.
#[derive(Clone)]
pub enum Payload {
    /// Bytes published as they are. `roostseq` is recorded (if known) for overflow reports.
    Bytes {
        /// The bytes.
        data: Vec<u8>,
        /// The event's `roostseq`, when the bytes are an event forwarded from elsewhere.
        roostseq: Option<u64>,
    },
    /// A CloudEvent: the outbox assigns the next gap-free `roostseq` (and an `id` if empty)
    /// in the same transaction that stores it.
    Event(Box<CloudEvent>),
    /// A document that wants the current `roostseq` and backlog filled in when enqueued
    /// (the status document): the closure gets (last roostseq, backlog) and returns bytes.
    WithCounters(Arc<dyn Fn(u64, u64) -> Vec<u8> + Send + Sync>),
}

/// One message to enqueue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Topic.
    pub topic: String,
    /// Body.
    pub payload: Payload,
    /// MQTT retain flag.
    pub retain: bool,
    /// Replace an older, unsent message on the same topic.
    pub compact: bool,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Bytes { data, roostseq } => f
                .debug_struct("Bytes")
                .field("len", &data.len())
                .field("roostseq", roostseq)
                .finish(),
            Payload::Event(e) => f.debug_tuple("Event").field(&e.ty).finish(),
            Payload::WithCounters(_) => f.write_str("WithCounters"),
        }
    }
}

impl NewMessage {
    /// An event on `topic` (not retained, not compacted).
    pub fn event(topic: impl Into<String>, event: CloudEvent) -> NewMessage {
        NewMessage {
            topic: topic.into(),
            payload: Payload::Event(Box::new(event)),
            retain: false,
            compact: false,
        }
    }

    /// A retained last-value document (compacted).
    pub fn retained(topic: impl Into<String>, data: Vec<u8>) -> NewMessage {
        NewMessage {
            topic: topic.into(),
            payload: Payload::Bytes {
                data,
                roostseq: None,
            },
            retain: true,
            compact: true,
        }
    }
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Row id: increasing in insertion order.
    pub id: i64,
    /// Topic.
    pub topic: String,
    /// Bytes.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
    /// The event's `roostseq`, for event rows.
    pub roostseq: Option<u64>,
}

/// Counters for status documents and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages waiting.
    pub backlog: u64,
    /// Bytes waiting (as counted against the cap).
    pub bytes: u64,
    /// The last assigned `roostseq` (0 = none yet).
    pub last_roostseq: u64,
    /// Events dropped by overflow since the outbox was created.
    pub dropped: u64,
    /// When the oldest waiting message was stored (ms since the epoch; None: empty).
    pub oldest_created_ms: Option<i64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

enum Cmd {
    Enqueue(
        Vec<NewMessage>,
        Option<StateWrite>,
        Durability,
        oneshot::Sender<Result<Vec<Option<u64>>, OutboxError>>,
    ),
    Read(Read),
    Peek(
        i64,
        usize,
        bool,
        oneshot::Sender<Result<Vec<StoredMessage>, OutboxError>>,
    ),
    Delete(Vec<i64>, Option<oneshot::Sender<Result<(), OutboxError>>>),
    Confirm(u64),
    Stats(oneshot::Sender<Result<OutboxStats, OutboxError>>),
}

/// A handle to the outbox; cheap to clone. The writer thread stops when the last handle drops.
#[derive(Clone)]
pub struct Outbox {
    tx: std_mpsc::Sender<Cmd>,
    newest: watch::Receiver<i64>,
    failed: Arc<AtomicU64>,
}

/// Taken while a caller's in-memory state matches what is committed. A state write built on
/// that state checks it inside its transaction, on the writer thread, and refuses to commit
/// if any group commit failed since: the state it builds on may include what that commit
/// lost. (The writer counts a failed commit before it runs anything submitted after it.)
#[derive(Debug, Clone)]
pub struct CommitGuard {
    failed: Arc<AtomicU64>,
    seen: u64,
}

impl CommitGuard {
    /// No group commit failed since the guard was taken.
    pub fn intact(&self) -> bool {
        self.failed.load(Ordering::SeqCst) == self.seen
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

const ROW_OVERHEAD: u64 = 64;

fn open_db(path: &Path) -> Result<Connection, OutboxError> {
    // Only the writer thread uses the file.
    let conn = crate::sqlite::open_exclusive(path)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            retain INTEGER NOT NULL,
            compact_key TEXT,
            roostseq INTEGER,
            size INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS outbox_compact ON outbox(compact_key) WHERE compact_key IS NOT NULL;
        CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )?;
    // When each row was stored (for the oldest-message age); rows of an older outbox have
    // none and are skipped by that figure.
    let has_created: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('outbox') WHERE name = 'created_ms'")?
        .exists([])?;
    if !has_created {
        conn.execute_batch("ALTER TABLE outbox ADD COLUMN created_ms INTEGER")?;
    }
    Ok(conn)
}

struct Writer {
    conn: Connection,
    cfg: OutboxConfig,
    bytes: u64,
    backlog: u64,
    newest: watch::Sender<i64>,
    /// Highest row id ever handed to a connection: rows up to it may have reached the broker,
    /// so overflow does not drop them (their loss could not be stated exactly).
    sent_upto: i64,
    /// Failed group commits (see [`CommitGuard`]).
    failed: Arc<AtomicU64>,
    /// The connection's `synchronous` setting now.
    sync: Durability,
}

/// The lost ranges an overflow event reports (`lost_ranges`, or from/to in older events).
fn reported_ranges(ev: &CloudEvent) -> Vec<(u64, u64)> {
    if let Some(list) = ev.data.get("lost_ranges").and_then(|v| v.as_array()) {
        return list
            .iter()
            .filter_map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
    }
    let get = |k: &str| ev.data.get(k).and_then(|v| v.as_u64());
    match (get("lost_from_roostseq"), get("lost_to_roostseq")) {
        (Some(a), Some(b)) => vec![(a.min(b), a.max(b))],
        _ => Vec::new(),
    }
}

/// The data of an overflow event reporting `ranges` (merged) and `dropped` messages.
fn overflow_data(cap: u64, dropped: u64, ranges: &[(u64, u64)]) -> serde_json::Value {
    roost_schemas::EventData::OutboxOverflow(roost_schemas::payload::OutboxOverflow {
        reason: roost_schemas::Reason::OutboxOverflow,
        message: format!(
            "outbox reached its cap of {cap} bytes; dropped {dropped} of the oldest messages"
        ),
        dropped_messages: dropped,
        lost_count: ranges.iter().map(|(a, b)| b - a + 1).sum::<u64>(),
        lost_from_roostseq: ranges.first().map(|r| r.0),
        lost_to_roostseq: ranges.last().map(|r| r.1),
        lost_ranges: ranges.iter().map(|(a, b)| [*a, *b]).collect(),
    })
    .to_json()
}

/// `ids` as runs of consecutive numbers, `(first, last)` each, ascending: every id in a run
/// is in `ids` and no other number is. Pure.
fn id_runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == id => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// Merges ranges into sorted, disjoint, non-adjacent ranges.
fn merge_ranges(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Removes the waiting last-value documents of a topic, saying how large they were.
const COMPACT_SQL: &str = "DELETE FROM outbox WHERE compact_key = ?1 RETURNING size";

impl Writer {
    fn meta(&self, key: &str) -> Result<u64, rusqlite::Error> {
        // Every statement of the writer is prepared once per connection (`prepare_cached`):
        // parsing SQL was a third of the writer's time with 2,000 stores in one process.
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM outbox_meta WHERE key = ?1")?
            .query_row([key], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    fn set_meta(tx: &Connection, key: &str, v: u64) -> Result<(), rusqlite::Error> {
        tx.prepare_cached(
            "INSERT INTO outbox_meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![key, v as i64])?;
        Ok(())
    }

    /// Commits a batch of enqueue requests in one transaction. Returns per request the
    /// roostseq values assigned.
    fn enqueue_batch(
        &mut self,
        batches: &[Vec<NewMessage>],
        writes: Vec<StateWrite>,
        sync: Durability,
    ) -> Result<Vec<Vec<Option<u64>>>, OutboxError> {
        self.set_sync(sync)?;
        let mut seq = self.meta("roostseq")?;
        let mut dropped_total = self.meta("dropped")?;
        // The overflow event that reports loss and has not left yet (0 = none).
        let mut open_id = self.meta("overflow_open")? as i64;
        let mut bytes = self.bytes;
        let mut backlog = self.backlog;
        let tx = crate::sqlite::CachedTx::begin(&self.conn)?;
        let mut out = Vec::with_capacity(batches.len());
        let mut last_id = 0i64;
        for batch in batches {
            let mut assigned = Vec::with_capacity(batch.len());
            for m in batch {
                // Renders the message as if the next roostseq were `seq + 1`; an event only
                // takes that number once it is certain to be stored right after.
                let render =
                    |seq: u64, backlog: u64| -> Result<(Vec<u8>, Option<u64>), OutboxError> {
                        Ok(match &m.payload {
                            Payload::Bytes { data, roostseq } => (data.clone(), *roostseq),
                            Payload::Event(ev) => {
                                let mut ev = (**ev).clone();
                                ev.roostseq = seq + 1;
                                if ev.id.is_empty() {
                                    ev.id = uuid::Uuid::new_v4().to_string();
                                }
                                (serde_json::to_vec(&ev)?, Some(seq + 1))
                            }
                            Payload::WithCounters(f) => (f(seq, backlog), None),
                        })
                    };
                let (mut data, mut rseq) = render(seq, backlog)?;
                let mut size = data.len() as u64 + m.topic.len() as u64 + ROW_OVERHEAD;
                // Make room under the cap by dropping the oldest rows (never compacted
                // last-value documents, which are replaced anyway).
                if bytes + size > self.cfg.max_bytes {
                    let Some(target) = self.cfg.overflow.clone() else {
                        return Err(OutboxError::Full {
                            path: self.cfg.path.clone(),
                        });
                    };
                    let need = bytes + size + 4096 - self.cfg.max_bytes.min(bytes + size + 4096);
                    let cap = self.cfg.max_bytes;
                    let mut freed = 0u64;
                    let mut lost: Vec<(i64, Option<u64>)> = Vec::new();
                    // Lost ranges: the dropped messages, and what dropped overflow events
                    // reported (carried over), with their own messages counted.
                    let mut ranges: Vec<(u64, u64)> = Vec::new();
                    let mut dropped = 0u64;
                    {
                        // Oldest first; never a compacted last-value document, never a row
                        // that was handed to a connection (it may arrive).
                        let mut stmt = tx.prepare(
                            "SELECT id, roostseq, size, payload FROM outbox WHERE compact_key IS NULL AND id > ?1 ORDER BY id",
                        )?;
                        let mut rows = stmt.query([self.sent_upto])?;
                        while let Some(row) = rows.next()? {
                            if freed >= need {
                                break;
                            }
                            let id: i64 = row.get(0)?;
                            let rs: Option<i64> = row.get(1)?;
                            let sz: i64 = row.get(2)?;
                            let body: Vec<u8> = row.get(3)?;
                            dropped += 1;
                            if let Ok(ev) = serde_json::from_slice::<CloudEvent>(&body) {
                                if ev.event_type() == Some(EventType::OutboxOverflow) {
                                    ranges.extend(reported_ranges(&ev));
                                    dropped += ev
                                        .data
                                        .get("dropped_messages")
                                        .and_then(|v| v.as_u64())
                                        .unwrap_or(0);
                                }
                            }
                            freed += sz as u64;
                            lost.push((id, rs.map(|v| v as u64)));
                        }
                    }
                    for (id, _) in &lost {
                        tx.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
                    }
                    bytes = bytes.saturating_sub(freed);
                    backlog = backlog.saturating_sub(lost.len() as u64);
                    dropped_total += lost.len() as u64;
                    ranges.extend(lost.iter().filter_map(|l| l.1).map(|s| (s, s)));
                    // The open report absorbs the loss if it has not left (and was not just
                    // dropped); otherwise a new report takes the next roostseq.
                    let open: Option<(Vec<u8>, i64)> =
                        if open_id > self.sent_upto && !lost.iter().any(|(id, _)| *id == open_id) {
                            tx.query_row(
                                "SELECT payload, size FROM outbox WHERE id = ?1",
                                [open_id],
                                |r| Ok((r.get(0)?, r.get(1)?)),
                            )
                            .optional()?
                        } else {
                            None
                        };
                    let open = open.and_then(|(p, sz)| {
                        serde_json::from_slice::<CloudEvent>(&p)
                            .ok()
                            .map(|e| (e, sz))
                    });
                    if lost.is_empty() {
                        // Everything waiting is in flight: over the cap until PUBACKs come.
                    } else if let Some((mut ev, old_size)) = open {
                        ranges.extend(reported_ranges(&ev));
                        dropped += ev
                            .data
                            .get("dropped_messages")
                            .and_then(|v| v.as_u64())
                            .unwrap_or(0);
                        let ranges = merge_ranges(ranges);
                        ev.data = overflow_data(cap, dropped, &ranges);
                        let odata = serde_json::to_vec(&ev)?;
                        let osize = odata.len() as u64 + target.topic.len() as u64 + ROW_OVERHEAD;
                        tx.execute(
                            "UPDATE outbox SET payload = ?1, size = ?2 WHERE id = ?3",
                            params![odata, osize as i64, open_id],
                        )?;
                        bytes = (bytes + osize).saturating_sub(old_size as u64);
                        tracing::warn!(dropped = lost.len(), ranges = ?ranges, "outbox overflow: dropped oldest messages");
                    } else {
                        let ranges = merge_ranges(ranges);
                        seq += 1;
                        let mut ev = CloudEvent::new(
                            &target.source,
                            EventType::OutboxOverflow,
                            None,
                            overflow_data(cap, dropped, &ranges),
                        );
                        ev.roostseq = seq;
                        ev.id = uuid::Uuid::new_v4().to_string();
                        let odata = serde_json::to_vec(&ev)?;
                        let osize = odata.len() as u64 + target.topic.len() as u64 + ROW_OVERHEAD;
                        tx.execute(
                            "INSERT INTO outbox(topic, payload, retain, compact_key, roostseq, size, created_ms) VALUES (?1, ?2, 0, NULL, ?3, ?4, ?5)",
                            params![target.topic, odata, seq as i64, osize as i64, now_ms()],
                        )?;
                        open_id = tx.last_insert_rowid();
                        Self::set_meta(&tx, "overflow_open", open_id as u64)?;
                        bytes += osize;
                        backlog += 1;
                        tracing::warn!(dropped = lost.len(), ranges = ?ranges, "outbox overflow: dropped oldest messages");
                    }
                    // A new overflow event took the next roostseq: render again after it.
                    (data, rseq) = render(seq, backlog)?;
                    size = data.len() as u64 + m.topic.len() as u64 + ROW_OVERHEAD;
                }
                if matches!(m.payload, Payload::Event(_)) {
                    seq += 1;
                }
                if m.compact {
                    let removed: Vec<i64> = {
                        let mut stmt = tx.prepare_cached(COMPACT_SQL)?;
                        let rows = stmt.query_map([&m.topic], |r| r.get::<_, i64>(0))?;
                        rows.collect::<Result<_, _>>()?
                    };
                    bytes = bytes.saturating_sub(removed.iter().map(|s| *s as u64).sum());
                    backlog = backlog.saturating_sub(removed.len() as u64);
                }
                // Prepared once per connection, not once per row.
                tx.prepare_cached(
                    "INSERT INTO outbox(topic, payload, retain, compact_key, roostseq, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(
                    params![
                        m.topic,
                        data,
                        m.retain as i64,
                        if m.compact { Some(m.topic.as_str()) } else { None },
                        rseq.map(|v| v as i64),
                        size as i64,
                        now_ms()
                    ],
                )?;
                last_id = tx.last_insert_rowid();
                bytes += size;
                backlog += 1;
                assigned.push(match &m.payload {
                    Payload::Event(_) => rseq,
                    _ => None,
                });
            }
            out.push(assigned);
        }
        for w in writes {
            w(&tx).map_err(OutboxError::State)?;
        }
        Self::set_meta(&tx, "roostseq", seq)?;
        Self::set_meta(&tx, "dropped", dropped_total)?;
        tx.commit()?;
        self.bytes = bytes;
        self.backlog = backlog;
        if last_id > 0 {
            self.newest.send_replace(last_id);
        }
        Ok(out)
    }

    /// Sets the connection's `synchronous` for the next commit (a cached statement, run only
    /// when it changes).
    fn set_sync(&mut self, sync: Durability) -> Result<(), rusqlite::Error> {
        if self.sync != sync {
            self.conn.prepare_cached(sync.pragma())?.execute([])?;
            self.sync = sync;
        }
        Ok(())
    }

    /// Deletes acknowledged rows, and with `confirm_upto` every event row up to that roostseq
    /// (end-to-end confirmation). [`Durability::Ordered`]: a delete lost to a power cut only means
    /// the message is sent again (at least once), so it need not wait for fsync.
    fn delete(&mut self, ids: &[i64], confirm_upto: Option<u64>) -> Result<(), OutboxError> {
        self.set_sync(Durability::Ordered)?;
        let tx = crate::sqlite::CachedTx::begin(&self.conn)?;
        let mut freed = 0u64;
        let mut n = 0u64;
        if let Some(upto) = confirm_upto {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM outbox WHERE roostseq IS NOT NULL AND compact_key IS NULL AND roostseq <= ?1 RETURNING size",
            )?;
            let sizes = stmt.query_map([upto as i64], |r| r.get::<_, i64>(0))?;
            for size in sizes {
                freed += size? as u64;
                n += 1;
            }
        }
        {
            // PUBACKs come in order, so the ids are a few runs of consecutive numbers: one
            // statement per run, not one per row.
            let mut run =
                tx.prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2 RETURNING size")?;
            for (from, to) in id_runs(ids) {
                let sizes = run.query_map([from, to], |r| r.get::<_, i64>(0))?;
                for size in sizes {
                    freed += size? as u64;
                    n += 1;
                }
            }
        }
        tx.commit()?;
        self.bytes = self.bytes.saturating_sub(freed);
        self.backlog = self.backlog.saturating_sub(n);
        Ok(())
    }

    fn peek(&self, after: i64, limit: usize) -> Result<Vec<StoredMessage>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, topic, payload, retain, roostseq FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(StoredMessage {
                id: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
                retain: r.get::<_, i64>(3)? != 0,
                roostseq: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
        while let Ok(first) = rx.recv() {
            // Group commit: take everything that is already waiting.
            let mut cmds = vec![first];
            while let Ok(more) = rx.try_recv() {
                cmds.push(more);
                if cmds.len() >= 4096 {
                    break;
                }
            }
            let mut enqueues = Vec::new();
            let mut deletes = Vec::new();
            let mut delete_replies = Vec::new();
            let mut confirm_upto: Option<u64> = None;
            let mut others = Vec::new();
            for c in cmds {
                match c {
                    Cmd::Enqueue(m, w, sync, reply) => enqueues.push((m, w, sync, reply)),
                    Cmd::Confirm(upto) => confirm_upto = confirm_upto.max(Some(upto)),
                    Cmd::Delete(ids, reply) => {
                        deletes.extend(ids);
                        if let Some(r) = reply {
                            delete_replies.push(r);
                        }
                    }
                    other => others.push(other),
                }
            }
            if !deletes.is_empty() || confirm_upto.is_some() {
                let res = self.delete(&deletes, confirm_upto);
                if let Err(error) = &res {
                    tracing::error!(%error, "outbox delete failed");
                }
                let res = res.map_err(Arc::new);
                for r in delete_replies {
                    let _ = r.send(match &res {
                        Ok(()) => Ok(()),
                        Err(e) => Err(OutboxError::Commit {
                            path: self.cfg.path.clone(),
                            source: e.clone(),
                        }),
                    });
                }
            }
            if !enqueues.is_empty() {
                let mut msgs = Vec::with_capacity(enqueues.len());
                let mut writes = Vec::new();
                let mut replies = Vec::with_capacity(enqueues.len());
                // One fsync for the group if anyone in it needs one.
                let mut sync = Durability::Ordered;
                for (m, w, s, r) in enqueues {
                    msgs.push(m);
                    writes.extend(w);
                    sync = sync.max(s);
                    replies.push(r);
                }
                match self.enqueue_batch(&msgs, writes, sync) {
                    Ok(assigned) => {
                        for (r, a) in replies.into_iter().zip(assigned) {
                            let _ = r.send(Ok(a));
                        }
                    }
                    Err(error) => {
                        // Counted before anything submitted later runs.
                        self.failed.fetch_add(1, Ordering::SeqCst);
                        tracing::error!(%error, "outbox enqueue failed");
                        let shared = Arc::new(error);
                        for r in replies {
                            let _ = r.send(Err(OutboxError::Commit {
                                path: self.cfg.path.clone(),
                                source: shared.clone(),
                            }));
                        }
                    }
                }
            }
            for c in others {
                match c {
                    Cmd::Peek(after, limit, for_send, reply) => {
                        let res = self.peek(after, limit);
                        if let (true, Ok(rows)) = (for_send, &res) {
                            if let Some(last) = rows.last() {
                                self.sent_upto = self.sent_upto.max(last.id);
                            }
                        }
                        let _ = reply.send(res);
                    }
                    Cmd::Stats(reply) => {
                        let res = (|| {
                            Ok(OutboxStats {
                                backlog: self.backlog,
                                bytes: self.bytes,
                                last_roostseq: self.meta("roostseq")?,
                                dropped: self.meta("dropped")?,
                                oldest_created_ms: self
                                    .conn
                                    .query_row(
                                        "SELECT created_ms FROM outbox WHERE created_ms IS NOT NULL ORDER BY id LIMIT 1",
                                        [],
                                        |r| r.get::<_, i64>(0),
                                    )
                                    .optional()?,
                            })
                        })();
                        let _ = reply.send(res);
                    }
                    Cmd::Read(f) => f(&self.conn),
                    Cmd::Enqueue(..) | Cmd::Delete(..) | Cmd::Confirm(..) => {}
                }
            }
        }
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox and starts its writer thread.
    pub fn open(cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        let conn = open_db(&cfg.path)?;
        let (bytes, backlog, newest): (i64, i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(size), 0), COUNT(*), COALESCE(MAX(id), 0) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (newest_tx, newest_rx) = watch::channel(newest);
        let failed = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            failed: failed.clone(),
            conn,
            cfg,
            bytes: bytes as u64,
            backlog: backlog as u64,
            newest: newest_tx,
            sent_upto: 0,
            sync: Durability::Full,
        };
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("roost-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| OutboxError::Io {
                path: PathBuf::from("<thread>"),
                source,
            })?;
        Ok(Outbox {
            tx,
            newest: newest_rx,
            failed,
        })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, OutboxError>>) -> Cmd,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Stores messages durably (one fsync for everything waiting). Returns the `roostseq`
    /// assigned to each event message (None for others).
    pub async fn enqueue(&self, msgs: Vec<NewMessage>) -> Result<Vec<Option<u64>>, OutboxError> {
        self.enqueue_with(msgs, Durability::Full).await
    }

    /// [`Outbox::enqueue`] with the given [`Durability`].
    pub async fn enqueue_with(
        &self,
        msgs: Vec<NewMessage>,
        sync: Durability,
    ) -> Result<Vec<Option<u64>>, OutboxError> {
        self.call(|r| Cmd::Enqueue(msgs, None, sync, r)).await
    }

    /// Stores messages and runs `write` on the caller's own tables in the same transaction
    /// (group-committed with whatever else is waiting): both are durable, or neither is.
    pub async fn commit(
        &self,
        msgs: Vec<NewMessage>,
        write: StateWrite,
        sync: Durability,
    ) -> Result<Vec<Option<u64>>, OutboxError> {
        self.call(|r| Cmd::Enqueue(msgs, Some(write), sync, r))
            .await
    }

    /// Like [`Outbox::commit`], but returns as soon as the request is queued: the caller can
    /// go on (and submit more, which may join the same group commit) while it is written.
    /// Requests commit in submission order; the future resolves once this one is durable.
    pub fn submit(
        &self,
        msgs: Vec<NewMessage>,
        write: Option<StateWrite>,
    ) -> Result<
        impl std::future::Future<Output = Result<Vec<Option<u64>>, OutboxError>> + Send + 'static,
        OutboxError,
    > {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Enqueue(msgs, write, Durability::Full, tx))
            .map_err(|_| OutboxError::Closed)?;
        Ok(async move { rx.await.map_err(|_| OutboxError::Closed)? })
    }

    /// A guard over the commits from now on (see [`CommitGuard`]).
    pub fn commit_guard(&self) -> CommitGuard {
        CommitGuard {
            failed: self.failed.clone(),
            seen: self.failed.load(Ordering::SeqCst),
        }
    }

    /// Runs a read (or schema setup) on the writer's connection, on its thread.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> T + Send + 'static,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = oneshot::channel();
        let job: Read = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        self.tx
            .send(Cmd::Read(job))
            .map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Blocking variant of [`Outbox::enqueue`] for non-async callers.
    pub fn enqueue_blocking(&self, msgs: Vec<NewMessage>) -> Result<Vec<Option<u64>>, OutboxError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Enqueue(msgs, None, Durability::Full, tx))
            .map_err(|_| OutboxError::Closed)?;
        rx.blocking_recv().map_err(|_| OutboxError::Closed)?
    }

    /// Up to `limit` messages with id greater than `after`, oldest first.
    pub async fn peek(&self, after: i64, limit: usize) -> Result<Vec<StoredMessage>, OutboxError> {
        self.call(|r| Cmd::Peek(after, limit, false, r)).await
    }

    /// Like [`Outbox::peek`], for a link that is about to publish the messages: from now on
    /// overflow never drops them, since they may reach the broker even if no PUBACK comes
    /// back (reporting them lost would be wrong). They leave the outbox when acknowledged.
    pub async fn peek_for_send(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, OutboxError> {
        self.call(|r| Cmd::Peek(after, limit, true, r)).await
    }

    /// End-to-end confirmation: every event up to `roostseq` has reached durable storage
    /// further along (the bridge's outbox); their rows are deleted (fire and forget).
    pub fn confirm(&self, roostseq: u64) {
        let _ = self.tx.send(Cmd::Confirm(roostseq));
    }

    /// Deletes acknowledged messages (batched with other writes; fire and forget).
    pub fn ack(&self, ids: Vec<i64>) {
        let _ = self.tx.send(Cmd::Delete(ids, None));
    }

    /// Deletes acknowledged messages and waits until the deletion is committed.
    pub async fn ack_wait(&self, ids: Vec<i64>) -> Result<(), OutboxError> {
        self.call(|r| Cmd::Delete(ids, Some(r))).await
    }

    /// Backlog, bytes and the last roostseq.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.call(Cmd::Stats).await
    }

    /// A watch of the newest row id, which changes whenever something is enqueued.
    pub fn subscribe_newest(&self) -> watch::Receiver<i64> {
        self.newest.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> NewMessage {
        NewMessage::event(
            "roost/v1/stores/s/events",
            CloudEvent::new(
                "roost://stores/s/agent",
                EventType::ApplyStarted,
                Some("d"),
                serde_json::json!({ "n": n }),
            ),
        )
    }

    #[tokio::test]
    async fn events_get_gapfree_roostseq_across_reopen_and_leave_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("o.db");
        {
            let ob = Outbox::open(OutboxConfig::new(&path)).expect("open");
            let a = ob.enqueue(vec![event(1), event(2)]).await.expect("enq");
            assert_eq!(a, vec![Some(1), Some(2)]);
        }
        let ob = Outbox::open(OutboxConfig::new(&path)).expect("reopen");
        let a = ob.enqueue(vec![event(3)]).await.expect("enq");
        assert_eq!(a, vec![Some(3)]);
        let rows = ob.peek(0, 10).await.expect("peek");
        let seqs: Vec<u64> = rows
            .iter()
            .map(|r| {
                serde_json::from_slice::<CloudEvent>(&r.payload)
                    .expect("event")
                    .roostseq
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        ob.ack_wait(vec![rows[0].id]).await.expect("ack");
        let rows = ob.peek(0, 10).await.expect("peek");
        assert_eq!(rows.len(), 2);
        assert_eq!(ob.stats().await.expect("stats").backlog, 2);
    }

    /// A state write that reports the connection's `synchronous` inside its transaction.
    fn sync_probe(out: std::sync::mpsc::Sender<i64>) -> StateWrite {
        Box::new(move |c| {
            let v: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
            out.send(v).map_err(|e| e.to_string())?;
            Ok(())
        })
    }

    #[tokio::test]
    async fn ordered_commits_skip_the_fsync_and_events_never_do() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("o.db");
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let ob = Outbox::open(OutboxConfig::new(&path)).expect("open");
            ob.commit(vec![], sync_probe(tx.clone()), Durability::Ordered)
                .await
                .expect("ordered");
            assert_eq!(rx.recv().expect("probe"), 1, "NORMAL: no fsync");
            ob.commit(vec![event(1)], sync_probe(tx.clone()), Durability::Full)
                .await
                .expect("full");
            assert_eq!(rx.recv().expect("probe"), 2, "FULL: fsynced");
            // A delete runs ordered; the next fsynced commit is FULL again.
            let rows = ob.peek(0, 10).await.expect("peek");
            ob.ack_wait(vec![rows[0].id]).await.expect("ack");
            ob.commit(vec![event(2)], sync_probe(tx.clone()), Durability::Full)
                .await
                .expect("full");
            assert_eq!(rx.recv().expect("probe"), 2, "FULL after a delete");
            let doc = NewMessage::retained("s/status", b"{}".to_vec());
            ob.enqueue_with(vec![doc], Durability::Ordered)
                .await
                .expect("ordered doc");
        }
        // An ordered commit survives the process: it is in the WAL.
        let ob = Outbox::open(OutboxConfig::new(&path)).expect("reopen");
        let rows = ob.peek(0, 10).await.expect("peek");
        let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, vec!["roost/v1/stores/s/events", "s/status"]);
    }

    #[tokio::test]
    async fn submitted_commits_keep_their_order_and_a_failure_breaks_the_guard() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        let guard = ob.commit_guard();
        // Submitted back to back (likely one group commit), resolved in order.
        let first = ob.submit(vec![event(1)], None).expect("submit");
        let second = ob.submit(vec![event(2)], None).expect("submit");
        assert_eq!(first.await.expect("first"), vec![Some(1)]);
        assert_eq!(second.await.expect("second"), vec![Some(2)]);
        assert!(guard.intact(), "nothing failed");
        // A state write that fails rolls its commit back and breaks every older guard …
        let bad: StateWrite = Box::new(|_| Err("refused".into()));
        let failed = ob.submit(vec![event(3)], Some(bad)).expect("submit");
        // … before anything submitted after it runs (in the same group commit, which fails
        // as a whole, or in a later one, whose write sees the broken guard).
        let g = guard.clone();
        let built_on_it: StateWrite = Box::new(move |_| {
            if g.intact() {
                Ok(())
            } else {
                Err("built on a failed commit".into())
            }
        });
        let later = ob
            .submit(vec![event(4)], Some(built_on_it))
            .expect("submit");
        assert!(failed.await.is_err());
        assert!(
            later.await.is_err(),
            "a write built on a failed commit must not commit"
        );
        assert!(!guard.intact());
        // A fresh guard is intact again; only the first two events are stored.
        assert!(ob.commit_guard().intact());
        let rows = ob.peek(0, 10).await.expect("peek");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            ob.enqueue(vec![event(5)]).await.expect("enq"),
            vec![Some(3)]
        );
    }

    #[tokio::test]
    async fn last_value_topics_are_compacted() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        for i in 0..5 {
            ob.enqueue(vec![NewMessage::retained("t/status", vec![i])])
                .await
                .expect("enq");
        }
        ob.enqueue(vec![event(1)]).await.expect("enq");
        let rows = ob.peek(0, 10).await.expect("peek");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].payload, vec![4]);
        assert!(rows[0].retain);
    }

    #[tokio::test]
    async fn overflow_drops_oldest_and_reports_exact_range() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = OutboxConfig::new(dir.path().join("o.db"));
        cfg.max_bytes = 8 * 1024;
        cfg.overflow = Some(OverflowTarget {
            topic: "roost/v1/stores/s/events".into(),
            source: "roost://stores/s/agent".into(),
        });
        let ob = Outbox::open(cfg).expect("open");
        for i in 0..100 {
            ob.enqueue(vec![event(i)]).await.expect("enq");
        }
        let stats = ob.stats().await.expect("stats");
        assert!(stats.bytes <= 8 * 1024, "{stats:?}");
        assert!(stats.dropped > 0);
        let rows = ob.peek(0, 1000).await.expect("peek");
        let events: Vec<CloudEvent> = rows
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).expect("event"))
            .collect();
        // Every roostseq is either still queued or inside a reported lost range.
        let mut lost = std::collections::BTreeSet::new();
        for e in events
            .iter()
            .filter(|e| e.ty == EventType::OutboxOverflow.as_str())
        {
            let from = e.data["lost_from_roostseq"].as_u64().expect("from");
            let to = e.data["lost_to_roostseq"].as_u64().expect("to");
            assert_eq!(e.data["lost_count"].as_u64(), Some(to - from + 1));
            lost.extend(from..=to);
        }
        let present: std::collections::BTreeSet<u64> = events.iter().map(|e| e.roostseq).collect();
        let last = stats.last_roostseq;
        for s in 1..=last {
            assert!(
                present.contains(&s) ^ lost.contains(&s),
                "roostseq {s} unaccounted"
            );
        }
    }

    #[tokio::test]
    async fn only_acknowledged_rows_go_when_acknowledgements_leave_gaps() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        ob.enqueue((1..=7).map(event).collect()).await.expect("enq");
        let ids = |rows: Vec<StoredMessage>| rows.iter().map(|r| r.id).collect::<Vec<i64>>();
        let all = ids(ob.peek(0, 10).await.expect("peek"));
        // The 3rd and the 6th were not acknowledged; the 2nd twice.
        let acked = vec![all[4], all[0], all[1], all[1], all[3], all[6]];
        ob.ack_wait(acked).await.expect("ack");
        let left = ids(ob.peek(0, 10).await.expect("peek"));
        assert_eq!(left, [all[2], all[5]]);
        assert_eq!(ob.stats().await.expect("stats").backlog, 2);
    }

    #[test]
    fn acknowledged_ids_are_deleted_by_runs_of_consecutive_ids() {
        assert_eq!(id_runs(&[]), []);
        assert_eq!(id_runs(&[7]), [(7, 7)]);
        assert_eq!(id_runs(&[3, 4, 5, 6]), [(3, 6)]);
        assert_eq!(
            id_runs(&[9, 1, 2, 2, 4, 10, 5, 12]),
            [(1, 2), (4, 5), (9, 10), (12, 12)]
        );
    }

    #[test]
    fn ranges_merge_when_adjacent_or_overlapping() {
        assert_eq!(
            merge_ranges(vec![(5, 5), (1, 3), (4, 4), (7, 9), (8, 12), (20, 20)]),
            vec![(1, 5), (7, 12), (20, 20)]
        );
        assert!(merge_ranges(vec![]).is_empty());
    }

    /// Messages handed to a link may arrive even without a PUBACK: overflow must not drop
    /// them, and a carried-over range must not swallow messages that left in between.
    #[tokio::test]
    async fn overflow_never_reports_sent_messages_as_lost() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = OutboxConfig::new(dir.path().join("o.db"));
        cfg.max_bytes = 8 * 1024;
        cfg.overflow = Some(OverflowTarget {
            topic: "roost/v1/stores/s/events".into(),
            source: "roost://stores/s/agent".into(),
        });
        let ob = Outbox::open(cfg).expect("open");
        // What left the outbox (may arrive), and overflow events among them.
        let mut left = std::collections::BTreeSet::new();
        let mut reports = Vec::new();
        let mut note = |r: &StoredMessage| {
            let e: CloudEvent = serde_json::from_slice(&r.payload).expect("event");
            left.insert(e.roostseq);
            if e.ty == EventType::OutboxOverflow.as_str() {
                let ranges = reported_ranges(&e);
                let count: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
                assert_eq!(e.data["lost_count"].as_u64(), Some(count));
                assert_eq!(ranges, merge_ranges(ranges.clone()), "disjoint and sorted");
                reports.extend(ranges);
            }
        };
        let mut high = 0i64;
        for round in 0..40 {
            for i in 0..7 {
                ob.enqueue(vec![event(round * 10 + i)]).await.expect("enq");
            }
            // A slow link: three more messages go out, only the oldest two are acknowledged.
            let sent = ob.peek_for_send(high, 3).await.expect("peek");
            for r in &sent {
                note(r);
                high = r.id;
            }
            let acked: Vec<i64> = ob
                .peek(0, 2)
                .await
                .expect("peek")
                .iter()
                .map(|r| r.id)
                .collect();
            ob.ack_wait(acked).await.expect("ack");
        }
        // The rest leaves after the link recovers.
        for r in &ob.peek(0, 100_000).await.expect("peek") {
            note(r);
        }
        let stats = ob.stats().await.expect("stats");
        assert!(stats.dropped > 0, "{stats:?}");
        let mut lost = std::collections::BTreeSet::new();
        for (a, b) in &reports {
            lost.extend(*a..=*b);
        }
        for s in 1..=stats.last_roostseq {
            assert!(
                left.contains(&s) ^ lost.contains(&s),
                "roostseq {s}: left={} reported lost={} (reports {reports:?})",
                left.contains(&s),
                lost.contains(&s)
            );
        }
    }
}
