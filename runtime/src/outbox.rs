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

use std::borrow::Cow;
use std::collections::VecDeque;
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
    /// Bytes of committed messages kept in memory until a link takes them
    /// ([`Outbox::peek_for_send`] reads them from there instead of from SQLite). Default
    /// 256 KiB; past it the oldest are read from SQLite again. 0: always read from SQLite.
    pub tail_bytes: usize,
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
            tail_bytes: 256 * 1024,
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

/// How long the writer holds acknowledged rows' deletes for the next commit to take along.
const DELETE_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

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
    /// The newest committed rows, for the link (see [`Tail`]).
    tail: Tail,
}

/// What a delete removed: bytes and rows (for the counters), and the ids above the tail's
/// `from` (rows the tail may hold).
#[derive(Debug, Default)]
struct Removed {
    freed: u64,
    rows: u64,
    in_tail: Vec<i64>,
}

/// Deletes acknowledged rows, and with `confirm_upto` every event row up to that roostseq
/// (end-to-end confirmation), inside the caller's transaction.
fn delete_rows(
    tx: &Connection,
    ids: &[i64],
    confirm_upto: Option<u64>,
    tail_from: i64,
) -> Result<Removed, rusqlite::Error> {
    let mut removed = Removed::default();
    let mut note = |id: i64, size: i64| {
        removed.freed += size as u64;
        removed.rows += 1;
        if id > tail_from {
            removed.in_tail.push(id);
        }
    };
    if let Some(upto) = confirm_upto {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM outbox WHERE roostseq IS NOT NULL AND compact_key IS NULL AND roostseq <= ?1 RETURNING id, size",
        )?;
        let rows = stmt.query_map([upto as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (id, size) = row?;
            note(id, size);
        }
    }
    // PUBACKs come in order, so the ids are a few runs of consecutive numbers: one
    // statement per run, not one per row.
    let mut run =
        tx.prepare_cached("DELETE FROM outbox WHERE id BETWEEN ?1 AND ?2 RETURNING id, size")?;
    for (from, to) in id_runs(ids) {
        let rows = run.query_map([from, to], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (id, size) = row?;
            note(id, size);
        }
    }
    Ok(removed)
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

/// The newest committed rows, in memory, for the link that sends them: a burst goes from the
/// commit that stored it to the connection without being read back from SQLite. It mirrors
/// the table exactly above `from`: every row with a greater id is in `rows`, in id order, with
/// the bytes the table holds (the writer changes both in step, after each commit). Rows
/// below it are read from SQLite (a reconnect or a rewind sends from the oldest).
#[derive(Debug, Default)]
struct Tail {
    from: i64,
    rows: VecDeque<StoredMessage>,
    bytes: usize,
    max_bytes: usize,
}

impl Tail {
    fn new(newest: i64, max_bytes: usize) -> Tail {
        Tail {
            from: newest,
            max_bytes,
            ..Tail::default()
        }
    }

    fn size(m: &StoredMessage) -> usize {
        m.payload.len() + m.topic.len()
    }

    /// Whether the rows after `after` are all here.
    fn covers(&self, after: i64) -> bool {
        after >= self.from
    }

    /// Appends a committed row (ids only increase); the oldest go once over the cap.
    fn push(&mut self, m: StoredMessage) {
        self.bytes += Tail::size(&m);
        self.rows.push_back(m);
        while self.bytes > self.max_bytes {
            let Some(old) = self.rows.pop_front() else {
                break;
            };
            self.bytes -= Tail::size(&old);
            self.from = old.id;
        }
    }

    /// Forgets every row: all rows up to `newest` are read from SQLite from now on.
    fn reset(&mut self, newest: i64) {
        self.rows.clear();
        self.bytes = 0;
        self.from = self.from.max(newest);
    }

    /// Drops rows the table no longer has (deleted or replaced).
    fn remove(&mut self, ids: &[i64]) {
        if ids.iter().all(|id| *id <= self.from) {
            return;
        }
        let mut freed = 0;
        self.rows.retain(|m| {
            let gone = ids.contains(&m.id);
            if gone {
                freed += Tail::size(m);
            }
            !gone
        });
        self.bytes -= freed;
    }

    /// Up to `limit` rows after `after` (`covers(after)` must hold). `send`: they leave the
    /// tail, with every row up to `after` (a link asks for what follows what it has sent).
    fn read(&mut self, after: i64, limit: usize, send: bool) -> Vec<StoredMessage> {
        if !send {
            return self
                .rows
                .iter()
                .filter(|m| m.id > after)
                .take(limit)
                .cloned()
                .collect();
        }
        while self.rows.front().is_some_and(|m| m.id <= after) {
            if let Some(old) = self.rows.pop_front() {
                self.bytes -= Tail::size(&old);
            }
        }
        self.from = self.from.max(after);
        let n = limit.min(self.rows.len());
        let out: Vec<StoredMessage> = self.rows.drain(..n).collect();
        if let Some(last) = out.last() {
            self.from = last.id;
        }
        self.bytes -= out.iter().map(Tail::size).sum::<usize>();
        out
    }
}

/// Removes the waiting last-value documents of a topic, saying how large they were.
const COMPACT_SQL: &str = "DELETE FROM outbox WHERE compact_key = ?1 RETURNING id, size";

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

    /// Commits a batch of enqueue requests in one transaction, with the deletes that are
    /// waiting (acknowledged rows: one commit for both). Returns per request the roostseq
    /// values assigned.
    fn enqueue_batch(
        &mut self,
        batches: Vec<Vec<NewMessage>>,
        writes: Vec<StateWrite>,
        sync: Durability,
        deletes: &[i64],
        confirm_upto: Option<u64>,
    ) -> Result<Vec<Vec<Option<u64>>>, OutboxError> {
        self.set_sync(sync)?;
        let mut seq = self.meta("roostseq")?;
        let mut dropped_total = self.meta("dropped")?;
        // The overflow event that reports loss and has not left yet (0 = none).
        let mut open_id = self.meta("overflow_open")? as i64;
        let tx = crate::sqlite::CachedTx::begin(&self.conn)?;
        let mut removed = delete_rows(&tx, deletes, confirm_upto, self.tail.from)?;
        let mut bytes = self.bytes.saturating_sub(removed.freed);
        let mut backlog = self.backlog.saturating_sub(removed.rows);
        // Rows stored by this commit, for the tail once it is durable; an overflow (which
        // rewrites the open report) makes the tail start again after this commit instead.
        let mut stored: Vec<StoredMessage> = Vec::new();
        let mut overflowed = false;
        let created = now_ms();
        let mut out = Vec::with_capacity(batches.len());
        let mut last_id = 0i64;
        for batch in batches {
            let mut assigned = Vec::with_capacity(batch.len());
            for m in batch {
                // Renders the message as if the next roostseq were `seq + 1`; an event only
                // takes that number once it is certain to be stored right after.
                let render = |seq: u64,
                              backlog: u64|
                 -> Result<(Cow<'_, [u8]>, Option<u64>), OutboxError> {
                    Ok(match &m.payload {
                        Payload::Bytes { data, roostseq } => (Cow::Borrowed(&data[..]), *roostseq),
                        Payload::Event(ev) => {
                            let mut ev = (**ev).clone();
                            ev.roostseq = seq + 1;
                            if ev.id.is_empty() {
                                ev.id = uuid::Uuid::new_v4().to_string();
                            }
                            (Cow::Owned(serde_json::to_vec(&ev)?), Some(seq + 1))
                        }
                        Payload::WithCounters(f) => (Cow::Owned(f(seq, backlog)), None),
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
                    overflowed = true;
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
                    let replaced: Vec<(i64, i64)> = {
                        let mut stmt = tx.prepare_cached(COMPACT_SQL)?;
                        let rows = stmt.query_map([&m.topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
                        rows.collect::<Result<_, _>>()?
                    };
                    bytes = bytes.saturating_sub(replaced.iter().map(|(_, s)| *s as u64).sum());
                    backlog = backlog.saturating_sub(replaced.len() as u64);
                    removed.in_tail.extend(replaced.iter().map(|(id, _)| *id));
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
                        created
                    ],
                )?;
                last_id = tx.last_insert_rowid();
                bytes += size;
                backlog += 1;
                assigned.push(match &m.payload {
                    Payload::Event(_) => rseq,
                    _ => None,
                });
                // The bytes as stored, for the tail (which drops them at once if it has no
                // room): forwarded bytes move over, no copy.
                let rendered = match data {
                    Cow::Owned(v) => Some(v),
                    Cow::Borrowed(_) => None,
                };
                let payload = match (rendered, m.payload) {
                    (Some(v), _) => v,
                    (None, Payload::Bytes { data, .. }) => data,
                    (None, _) => Vec::new(),
                };
                stored.push(StoredMessage {
                    id: last_id,
                    topic: m.topic,
                    payload,
                    retain: m.retain,
                    roostseq: rseq,
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
        if overflowed {
            self.tail.reset(last_id.max(*self.newest.borrow()));
        } else {
            for m in stored {
                self.tail.push(m);
            }
            self.tail.remove(&removed.in_tail);
        }
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
        let removed = delete_rows(&tx, ids, confirm_upto, self.tail.from)?;
        tx.commit()?;
        self.bytes = self.bytes.saturating_sub(removed.freed);
        self.backlog = self.backlog.saturating_sub(removed.rows);
        self.tail.remove(&removed.in_tail);
        Ok(())
    }

    /// Up to `limit` rows after `after`: from the tail when it holds them all, else SQLite.
    fn peek(
        &mut self,
        after: i64,
        limit: usize,
        send: bool,
    ) -> Result<Vec<StoredMessage>, OutboxError> {
        if self.tail.covers(after) {
            return Ok(self.tail.read(after, limit, send));
        }
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
        // Group commit: take everything that is already waiting.
        let take_waiting = |cmds: &mut Vec<Cmd>| {
            while cmds.len() < 4096 {
                match rx.try_recv() {
                    Ok(more) => cmds.push(more),
                    Err(_) => break,
                }
            }
        };
        while let Ok(first) = rx.recv() {
            let mut cmds = vec![first];
            take_waiting(&mut cmds);
            // Only acknowledged rows to delete, and nobody waits for it: give the next
            // request a moment to come, so the deletes ride along in its commit (a stream
            // of messages commits once per burst, not twice). Whatever comes meanwhile runs
            // after the deletes, as if they had been committed first.
            if cmds
                .iter()
                .all(|c| matches!(c, Cmd::Delete(_, None) | Cmd::Confirm(_)))
            {
                if let Ok(next) = rx.recv_timeout(DELETE_DELAY) {
                    cmds.push(next);
                    take_waiting(&mut cmds);
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
            // (Someone waiting for an empty delete hears of it too.)
            let deleting =
                !deletes.is_empty() || confirm_upto.is_some() || !delete_replies.is_empty();
            // The deletes commit with the enqueues when there are any (one commit, and the
            // rows' pages written once), else on their own; again on their own if that
            // commit failed (it took them with it).
            let mut deleted = None;
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
                match self.enqueue_batch(msgs, writes, sync, &deletes, confirm_upto) {
                    Ok(assigned) => {
                        deleted = Some(Ok(()));
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
            if deleting {
                let res = match deleted {
                    Some(done) => done,
                    None => self.delete(&deletes, confirm_upto),
                };
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
            for c in others {
                match c {
                    Cmd::Peek(after, limit, for_send, reply) => {
                        let res = self.peek(after, limit, for_send);
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
        let tail_bytes = cfg.tail_bytes;
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
            tail: Tail::new(newest, tail_bytes),
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

    fn forwarded(topic: &str, roostseq: u64, len: usize) -> NewMessage {
        NewMessage {
            topic: topic.into(),
            payload: Payload::Bytes {
                data: vec![roostseq as u8; len],
                roostseq: Some(roostseq),
            },
            retain: false,
            compact: false,
        }
    }

    /// Id, topic, body (or lost ranges), retain, roostseq.
    type Sent = (i64, String, Vec<u8>, bool, Option<u64>);

    /// What a link would publish, comparable across two outboxes (an overflow report by its
    /// lost ranges: its id and time differ).
    fn sent(rows: &[StoredMessage]) -> Vec<Sent> {
        rows.iter()
            .map(|r| {
                let body = match serde_json::from_slice::<CloudEvent>(&r.payload) {
                    Ok(e) => e.data["lost_ranges"].to_string().into_bytes(),
                    Err(_) => r.payload.clone(),
                };
                (r.id, r.topic.clone(), body, r.retain, r.roostseq)
            })
            .collect()
    }

    /// The tail (committed rows kept in memory for the link) hands out exactly what SQLite
    /// holds: the same script against an outbox without a tail and one with a tail small
    /// enough to spill, through compaction, acknowledgements, confirmations, overflow and
    /// rewinds, reads the same rows at every step.
    #[tokio::test]
    async fn the_tail_hands_out_exactly_what_sqlite_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        let open = |name: &str, tail_bytes: usize| {
            let mut cfg = OutboxConfig::new(dir.path().join(name));
            cfg.max_bytes = 24 * 1024;
            cfg.tail_bytes = tail_bytes;
            cfg.overflow = Some(OverflowTarget {
                topic: "s/events".into(),
                source: "roost://stores/s/agent".into(),
            });
            Outbox::open(cfg).expect("open")
        };
        let plain = open("plain.db", 0);
        let tailed = open("tailed.db", 700);
        let (mut high, mut seq, mut rng) = (0i64, 0u64, 7u64);
        let mut step = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % 100
        };
        for round in 0..400 {
            let op = step();
            let n = 1 + step() as usize % 6;
            let msgs: Vec<NewMessage> = match op {
                0..=9 => vec![NewMessage::retained("s/status", vec![round as u8; 40])],
                10..=49 => (0..n)
                    .map(|_| {
                        seq += 1;
                        forwarded("s/events", seq, 100 + n * 20)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let mut results = Vec::new();
            for ob in [&plain, &tailed] {
                if !msgs.is_empty() {
                    ob.enqueue(msgs.clone()).await.expect("enqueue");
                }
                let out = match op {
                    50..=74 => ob.peek_for_send(high, n).await.expect("send"),
                    75..=84 => {
                        // Acknowledged: the oldest of what was sent, not in order.
                        let ids: Vec<i64> = ob
                            .peek(0, n)
                            .await
                            .expect("peek")
                            .iter()
                            .rev()
                            .filter(|r| r.id <= high)
                            .map(|r| r.id)
                            .collect();
                        ob.ack_wait(ids).await.expect("ack");
                        ob.peek(0, 50).await.expect("peek")
                    }
                    85..=89 => {
                        ob.confirm(seq.saturating_sub(8));
                        ob.stats().await.expect("stats");
                        ob.peek(high, 50).await.expect("peek")
                    }
                    90..=94 => ob.peek_for_send(0, n).await.expect("rewind"),
                    _ => ob.peek(0, 50).await.expect("peek"),
                };
                results.push(out);
            }
            assert_eq!(
                sent(&results[0]),
                sent(&results[1]),
                "round {round}, op {op}"
            );
            if (50..=74).contains(&op) || (90..=94).contains(&op) {
                if op >= 90 {
                    high = 0;
                }
                if let Some(last) = results[0].last() {
                    high = high.max(last.id);
                }
            }
            let (a, b) = (
                plain.stats().await.expect("stats"),
                tailed.stats().await.expect("stats"),
            );
            assert_eq!(
                (a.backlog, a.bytes, a.dropped),
                (b.backlog, b.bytes, b.dropped)
            );
        }
        assert!(
            plain.stats().await.expect("stats").dropped > 0,
            "overflow ran"
        );
    }

    /// A committed burst goes to the link from memory, not read back from SQLite; a rewind
    /// (older than the tail) reads SQLite. (The rows are changed behind the writer's back
    /// to tell the two apart.)
    #[tokio::test]
    async fn a_committed_burst_is_sent_from_memory_and_a_rewind_from_sqlite() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        ob.enqueue((1..=3).map(|s| forwarded("s/events", s, 10)).collect())
            .await
            .expect("enqueue");
        ob.read(|c| c.execute("UPDATE outbox SET payload = x'00'", []))
            .await
            .expect("read")
            .expect("update");
        let burst = ob.peek_for_send(0, 2).await.expect("send");
        assert_eq!(burst.len(), 2);
        assert!(
            burst
                .iter()
                .all(|r| r.payload == vec![r.roostseq.unwrap_or(0) as u8; 10]),
            "from memory"
        );
        let again = ob.peek_for_send(0, 10).await.expect("rewind");
        assert_eq!(again.len(), 3);
        assert!(again.iter().all(|r| r.payload == vec![0]), "from SQLite");
    }

    /// Acknowledged rows are deleted in the next commit; when that commit fails, they are
    /// deleted on their own.
    #[tokio::test]
    async fn acknowledged_rows_go_even_when_the_commit_they_joined_fails() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        ob.enqueue((1..=3).map(|s| forwarded("s/events", s, 10)).collect())
            .await
            .expect("enqueue");
        let rows = ob.peek_for_send(0, 10).await.expect("send");
        ob.ack(vec![rows[0].id, rows[1].id]);
        let bad: StateWrite = Box::new(|_| Err("refused".into()));
        let failed = ob
            .submit(vec![forwarded("s/events", 4, 10)], Some(bad))
            .expect("submit");
        assert!(failed.await.is_err());
        let left: Vec<i64> = ob
            .peek(0, 10)
            .await
            .expect("peek")
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(left, [rows[2].id]);
        assert_eq!(ob.stats().await.expect("stats").backlog, 1);
        // And with a commit that succeeds, in it.
        ob.ack(vec![rows[2].id]);
        ob.enqueue(vec![forwarded("s/events", 5, 10)])
            .await
            .expect("enqueue");
        let left = ob.peek(0, 10).await.expect("peek");
        assert_eq!(
            left.iter().map(|r| r.roostseq).collect::<Vec<_>>(),
            [Some(5)]
        );
        assert_eq!(ob.stats().await.expect("stats").backlog, 1);
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
