//! The notifications' tables: `notify_events` (what happened, once per key, until the
//! notifier takes it) and `notify_messages` (what goes to each sink: its exact body and
//! idempotency key, its state, attempts and last error) — the durable queue of
//! [`crate::notify`].
//!
//! Events are recorded by the writers of the facts, in their own transactions
//! ([`record_events`]): the controller's plan and sync writes and the ingest of store
//! events. The leader's notifier takes them into messages ([`FleetDb::take_notify_events`])
//! and records each attempt ([`FleetDb::notify_attempted`]).

use super::sql::{args, Conn};
use super::{now_ms, DbError, FleetDb};
use crate::notify::{Message, NotifyEvent};

/// A message's state.
pub const QUEUED: &str = "queued";
/// Delivered (the sink answered 2xx).
pub const SENT: &str = "sent";
/// Given up after its last attempt.
pub const FAILED: &str = "failed";

/// Records `events` inside the caller's transaction; an event whose key is recorded already
/// changes nothing. Returns how many were new.
pub fn record_events(c: &Conn<'_>, events: &[NotifyEvent]) -> Result<usize, DbError> {
    let at = now_ms();
    let mut new = 0;
    for e in events {
        let json = serde_json::to_string(e).map_err(|source| DbError::Encode {
            what: "a notification",
            source,
        })?;
        new += c.execute(
            "INSERT INTO notify_events(key, kind, json, at_ms, taken) VALUES (?1, ?2, ?3, ?4, 0)
             ON CONFLICT(key) DO NOTHING",
            args![&e.key, e.kind.as_str(), json, at],
        )? as usize;
    }
    Ok(new)
}

/// A message in the queue, or delivered, or given up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Delivery {
    /// Row id.
    #[serde(skip)]
    pub id: i64,
    /// Idempotency key.
    pub key: String,
    /// Sink name.
    pub sink: String,
    /// The commit of a commit status (empty otherwise).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// `queued`, `sent` or `failed`.
    pub state: String,
    /// Events it carries.
    pub events: u64,
    /// Attempts so far.
    pub attempts: u64,
    /// Why the last attempt failed (empty: none failed).
    pub last_error: String,
    /// When it was queued (ms).
    pub created_ms: u64,
    /// When the next attempt is due (ms; queued only).
    pub next_ms: u64,
    /// The body (not in API answers: the API shows the state, not the content).
    #[serde(skip)]
    pub body: String,
}

const DELIVERY_COLUMNS: &str =
    "id, key, sink, target, state, events, attempts, last_error, created_ms, next_ms, body";

fn delivery(r: &super::sql::Row) -> Result<Delivery, DbError> {
    Ok(Delivery {
        id: r.get(0)?,
        key: r.get(1)?,
        sink: r.get(2)?,
        target: r.get(3)?,
        state: r.get(4)?,
        events: r.get(5)?,
        attempts: r.get(6)?,
        last_error: r.get(7)?,
        created_ms: r.get(8)?,
        next_ms: r.get(9)?,
        body: r.get(10)?,
    })
}

/// The newest `limit` messages, newest first.
pub fn deliveries(c: &Conn<'_>, limit: usize) -> Result<Vec<Delivery>, DbError> {
    c.query(
        &format!("SELECT {DELIVERY_COLUMNS} FROM notify_messages ORDER BY id DESC LIMIT ?1"),
        args![limit as i64],
    )?
    .iter()
    .map(delivery)
    .collect()
}

/// The newest `limit` messages that failed: given up, or queued after a failed attempt.
pub fn failing(c: &Conn<'_>, limit: usize) -> Result<Vec<Delivery>, DbError> {
    c.query(
        &format!(
            "SELECT {DELIVERY_COLUMNS} FROM notify_messages
             WHERE state = 'failed' OR (state = 'queued' AND last_error <> '')
             ORDER BY id DESC LIMIT ?1"
        ),
        args![limit as i64],
    )?
    .iter()
    .map(delivery)
    .collect()
}

/// The notifications at a glance: counts, and the newest failing messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Notifications {
    /// Messages by state.
    #[serde(flatten)]
    pub counts: DeliveryCounts,
    /// The newest messages that failed (given up, or being retried), at most 10.
    pub failing: Vec<Delivery>,
}

/// [`Notifications`] (None when nothing was ever queued).
pub fn overview(c: &Conn<'_>) -> Result<Option<Notifications>, DbError> {
    let counts = delivery_counts(c)?;
    if counts == DeliveryCounts::default() {
        return Ok(None);
    }
    Ok(Some(Notifications {
        counts,
        failing: failing(c, 10)?,
    }))
}

/// The line about failed notification deliveries, for `roost status` and `roost plan
/// status` (empty when none failed).
pub fn render_failing(n: Option<&Notifications>) -> String {
    let Some(n) = n.filter(|n| n.counts.failed > 0 || n.counts.retrying > 0) else {
        return String::new();
    };
    let mut out = format!(
        "notifications: {} sent, {} queued ({} being retried), {} failed\n",
        n.counts.sent, n.counts.queued, n.counts.retrying, n.counts.failed
    );
    for d in &n.failing {
        out.push_str(&format!(
            "  {} {} to {}: {} after {} attempts: {}\n",
            if d.state == FAILED {
                "FAILED"
            } else {
                "retrying"
            },
            &d.key[..d.key.len().min(12)],
            d.sink,
            if d.events == 1 {
                "1 event".to_owned()
            } else {
                format!("{} events", d.events)
            },
            d.attempts,
            d.last_error
        ));
    }
    out
}

/// How many messages are in each state, and how many queued ones failed an attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryCounts {
    /// Waiting to go (also those being retried).
    pub queued: u64,
    /// Of those, failed at least once (being retried).
    pub retrying: u64,
    /// Delivered.
    pub sent: u64,
    /// Given up.
    pub failed: u64,
    /// Attempts that failed, over every message.
    pub failed_attempts: u64,
}

/// The counts of [`DeliveryCounts`].
pub fn delivery_counts(c: &Conn<'_>) -> Result<DeliveryCounts, DbError> {
    let mut out = DeliveryCounts::default();
    for r in c.query(
        "SELECT state, COUNT(*), SUM(CASE WHEN last_error <> '' THEN 1 ELSE 0 END), CAST(SUM(attempts) AS BIGINT), SUM(CASE WHEN state = 'sent' THEN 1 ELSE 0 END)
         FROM notify_messages GROUP BY state",
        &[],
    )? {
        let (state, n, erred, attempts, sent): (String, u64, u64, u64, u64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
        // A sent message's attempts before its last failed.
        out.failed_attempts += attempts.saturating_sub(sent);
        match state.as_str() {
            QUEUED => {
                out.queued = n;
                out.retrying = erred;
            }
            SENT => out.sent = n,
            _ => out.failed += n,
        }
    }
    Ok(out)
}

impl FleetDb {
    /// Records notification events of the notifier itself (stale stores).
    pub fn record_notify_events(&self, events: &[NotifyEvent]) -> Result<usize, DbError> {
        if events.is_empty() {
            return Ok(0);
        }
        self.transaction(|c| record_events(c, events))
    }

    /// Takes every event not yet taken, once the oldest was recorded at or before
    /// `ready_ms` (events gather that long), and queues the messages `make` makes of them
    /// (sink name, message), due at `now`: in one transaction, so a message is queued
    /// exactly when its events are taken. Events recorded before `oldest_ms` (while no
    /// notifier ran) are taken without being told. Returns (messages queued, events dropped
    /// as too old).
    pub fn take_notify_events(
        &self,
        ready_ms: u64,
        oldest_ms: u64,
        now: u64,
        make: impl FnOnce(&[NotifyEvent]) -> Vec<(String, Message)>,
    ) -> Result<(usize, usize), DbError> {
        self.transaction(|c| {
            let oldest: Option<u64> = c.query_value(
                "SELECT MIN(at_ms) FROM notify_events WHERE taken = 0",
                &[],
            )?;
            if oldest.is_none_or(|t| t > ready_ms) {
                return Ok((0, 0));
            }
            let rows = c.query(
                "SELECT id, json, at_ms FROM notify_events WHERE taken = 0 ORDER BY id",
                &[],
            )?;
            let mut events = Vec::with_capacity(rows.len());
            let mut dropped = 0;
            for r in &rows {
                if r.get::<u64>(2)? < oldest_ms {
                    dropped += 1;
                    continue;
                }
                let json: String = r.get(1)?;
                if let Ok(e) = serde_json::from_str::<NotifyEvent>(&json) {
                    events.push(e);
                }
            }
            let mut queued = 0;
            for (sink, m) in make(&events) {
                queued += c.execute(
                    "INSERT INTO notify_messages(key, sink, target, events, body, state, attempts, next_ms, last_error, created_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'queued', 0, ?6, '', ?6)
                     ON CONFLICT(key) DO NOTHING",
                    args![&m.key, sink, &m.target, m.events as i64, &m.body, now],
                )? as usize;
            }
            // Exactly the rows read, as runs of consecutive ids: on PostgreSQL another
            // instance's ingest may commit a lower id meanwhile, which stays for the next pass.
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect::<Result<_, _>>()?;
            for (from, to) in runs(&ids) {
                c.execute(
                    "UPDATE notify_events SET taken = 1 WHERE id >= ?1 AND id <= ?2",
                    args![from, to],
                )?;
            }
            Ok((queued, dropped))
        })
    }

    /// Queued messages whose next attempt is due at `now_ms`, oldest first.
    pub fn due_notifications(&self, now_ms: u64, limit: usize) -> Result<Vec<Delivery>, DbError> {
        self.with_conn(|c| {
            c.query(
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM notify_messages WHERE state = 'queued' AND next_ms <= ?1 ORDER BY id LIMIT ?2"
                ),
                args![now_ms, limit as i64],
            )?
            .iter()
            .map(delivery)
            .collect()
        })
    }

    /// Records an attempt of message `id`: delivered (`error` None), or failed and due
    /// again at `next_ms`, or given up (`give_up`).
    pub fn notify_attempted(
        &self,
        id: i64,
        error: Option<&str>,
        next_ms: u64,
        give_up: bool,
    ) -> Result<(), DbError> {
        let state = match (error, give_up) {
            (None, _) => SENT,
            (Some(_), false) => QUEUED,
            (Some(_), true) => FAILED,
        };
        self.transaction(|c| {
            c.execute(
                "UPDATE notify_messages SET attempts = attempts + 1, state = ?2,
                   last_error = COALESCE(?3, last_error), next_ms = ?4
                 WHERE id = ?1 AND state = 'queued'",
                args![id, state, error, next_ms],
            )?;
            Ok(())
        })
    }

    /// Deletes taken events and finished messages older than `before_ms`.
    pub fn prune_notifications(&self, before_ms: u64) -> Result<(), DbError> {
        self.transaction(|c| {
            c.execute(
                "DELETE FROM notify_events WHERE taken = 1 AND at_ms < ?1",
                args![before_ms],
            )?;
            c.execute(
                "DELETE FROM notify_messages WHERE state <> 'queued' AND created_ms < ?1",
                args![before_ms],
            )?;
            Ok(())
        })
    }
}

/// `ids` (ascending) as runs of consecutive ids: `[1, 2, 3, 7]` is `(1, 3), (7, 7)`. Pure.
fn runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &id in ids {
        match out.last_mut() {
            Some((_, to)) if *to + 1 == id => *to = id,
            _ => out.push((id, id)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_ids_are_runs_of_consecutive_ids() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), [(1, 3), (7, 7), (9, 10)]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn failing_deliveries_are_one_line_each_and_nothing_when_none_failed() {
        let d = |state: &str, error: &str| Delivery {
            id: 1,
            key: "0123456789abcdef".into(),
            sink: "ops".into(),
            target: String::new(),
            state: state.into(),
            events: 3,
            attempts: 4,
            last_error: error.into(),
            created_ms: 0,
            next_ms: 0,
            body: "{}".into(),
        };
        let mut n = Notifications {
            counts: DeliveryCounts {
                sent: 2,
                ..Default::default()
            },
            failing: Vec::new(),
        };
        assert_eq!(render_failing(None), "");
        assert_eq!(render_failing(Some(&n)), "");
        n.counts.failed = 1;
        n.counts.queued = 1;
        n.counts.retrying = 1;
        n.failing = vec![d(QUEUED, "h answered 500"), d(FAILED, "h: timeout")];
        assert_eq!(
            render_failing(Some(&n)),
            "notifications: 2 sent, 1 queued (1 being retried), 1 failed
  retrying 0123456789ab to ops: 3 events after 4 attempts: h answered 500
  FAILED 0123456789ab to ops: 3 events after 4 attempts: h: timeout
"
        );
    }
}
