//! The leader's notifier: every second it tells stale stores, takes the events gathered for
//! `coalesce` into messages, and sends every due message, recording each attempt. Only the
//! leader runs a pass ([`crate::leadership`]); a follower's notifier waits.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use super::sink::Client;
use super::{backoff, coalesce, stale_events, NotifyConfig, NotifyError};
use crate::db::{now_ms, FleetDb};
use crate::leadership::Leadership;

/// How long one HTTP attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished messages and taken events are kept this long.
const KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The messages of `events` for every sink of `cfg`. Pure.
pub fn messages(
    cfg: &NotifyConfig,
    events: &[super::NotifyEvent],
) -> Vec<(String, super::Message)> {
    cfg.sinks
        .iter()
        .flat_map(|s| {
            coalesce(&s.name, s.kind, |k| s.wants(k), events)
                .into_iter()
                .map(|m| (s.name.clone(), m))
        })
        .collect()
}

/// One pass at `now`: stale stores, new messages, due deliveries (blocking; on the blocking
/// pool). Returns (sent, failed attempts).
pub fn pass(
    cfg: &NotifyConfig,
    db: &FleetDb,
    clients: &HashMap<String, Client>,
    now: u64,
) -> Result<(usize, usize), NotifyError> {
    if let Some(after) = cfg.stale_after {
        let heard = db.with_conn(crate::db::ingest::last_heard)?;
        db.record_notify_events(&stale_events(&heard, now, after))?;
    }
    let ready = now.saturating_sub(cfg.coalesce.as_millis() as u64);
    let oldest = now.saturating_sub(cfg.max_age.as_millis() as u64);
    let (queued, dropped) =
        db.take_notify_events(ready, oldest, now, |events| messages(cfg, events))?;
    if queued > 0 {
        info!(messages = queued, "notifications queued");
    }
    if dropped > 0 {
        warn!(
            events = dropped,
            max_age_s = cfg.max_age.as_secs(),
            "events too old to tell (recorded while no notifier ran); not sent"
        );
    }
    let (mut sent, mut failed) = (0, 0);
    // Each sink gets its messages in the order they were queued (a commit's newest status
    // must land last): a sink stops at its first message not yet due or failing, and the
    // rest wait behind it. One slow sink does not hold the others up for more than its
    // one attempt per pass.
    let mut blocked: std::collections::HashSet<String> = std::collections::HashSet::new();
    for m in db.due_notifications(i64::MAX as u64, 500)? {
        if blocked.contains(&m.sink) {
            continue;
        }
        if m.next_ms > now {
            blocked.insert(m.sink.clone());
            continue;
        }
        let (Some(sink), Some(client)) = (
            cfg.sinks.iter().find(|s| s.name == m.sink),
            clients.get(&m.sink),
        ) else {
            // A sink no longer configured: its messages wait for it.
            continue;
        };
        let msg = super::Message {
            key: m.key.clone(),
            target: m.target.clone(),
            body: m.body.clone(),
            events: m.events as usize,
        };
        match client.send(sink, &msg) {
            Ok(()) => {
                info!(sink = %m.sink, key = %m.key, events = m.events, attempts = m.attempts + 1, "notification delivered");
                db.notify_attempted(m.id, None, now, false)?;
                sent += 1;
            }
            Err(error) => {
                let attempts = m.attempts as u32 + 1;
                let give_up = attempts >= cfg.max_attempts;
                let next =
                    now + backoff(attempts, cfg.retry_base, cfg.retry_max).as_millis() as u64;
                let why = error.to_string();
                warn!(sink = %m.sink, key = %m.key, attempts, give_up, error = %why, "notification not delivered");
                db.notify_attempted(m.id, Some(&why), next, give_up)?;
                failed += 1;
                blocked.insert(m.sink.clone());
            }
        }
    }
    Ok((sent, failed))
}

/// Runs the notifier until cancelled: a pass every `interval` while this instance leads.
pub async fn run(
    cfg: NotifyConfig,
    db: FleetDb,
    leadership: Leadership,
    interval: Duration,
    cancel: CancellationToken,
) -> Result<(), NotifyError> {
    let mut clients = HashMap::new();
    for s in &cfg.sinks {
        clients.insert(s.name.clone(), Client::new(s, ATTEMPT_TIMEOUT)?);
    }
    let db = if db.engine() == crate::db::Engine::Postgres {
        db.fenced(std::sync::Arc::new(leadership.clone()))
    } else {
        db
    };
    let cfg = std::sync::Arc::new(cfg);
    let clients = std::sync::Arc::new(clients);
    let span = tracing::info_span!("notifier", sinks = cfg.sinks.len());
    async move {
        info!("notifier started");
        let mut last_prune = 0u64;
        loop {
            if leadership.is_leading() {
                let (c, cl, d) = (cfg.clone(), clients.clone(), db.clone());
                let now = now_ms();
                let prune = now.saturating_sub(last_prune) > 3_600_000;
                let r = tokio::task::spawn_blocking(move || {
                    if prune {
                        d.prune_notifications(now.saturating_sub(KEEP.as_millis() as u64))?;
                    }
                    pass(&c, &d, &cl, now)
                })
                .await;
                match r {
                    Ok(Ok(_)) => {
                        if prune {
                            last_prune = now;
                        }
                    }
                    Ok(Err(error)) => {
                        warn!(error = %roost_runtime::error_chain(&error), "notifier pass failed")
                    }
                    Err(error) => warn!(%error, "notifier pass failed"),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
    .instrument(span)
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{CloudEvent, EventType};

    #[test]
    fn a_failure_at_2000_stores_is_one_message_retried_on_its_schedule() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("db");
        std::fs::write(dir.path().join("secret"), "k").expect("secret");
        // Nothing listens on port 1: every attempt fails.
        let cfg = NotifyConfig::parse(
            "coalesce_s = 0\nretry_base_s = 2\nmax_attempts = 2\n[[sink]]\nname = 'ops'\nkind = 'webhook'\nurl = 'http://127.0.0.1:1/hook'\nsecret_file = 'secret'\n",
            dir.path(),
            &dir.path().join("n.toml"),
        )
        .expect("config");
        let events: Vec<(String, CloudEvent, String)> = (0..2000)
            .map(|i| {
                let store = format!("s{i:04}");
                let mut e = CloudEvent::new(
                    &format!("roost://stores/{store}/agent"),
                    EventType::ApplyFailed,
                    Some("web"),
                    serde_json::json!({"reason": "apply_failed", "message": "boom"}),
                );
                e.id = format!("{store}-1");
                e.roostseq = 1;
                let json = serde_json::to_string(&e).expect("json");
                (store, e, json)
            })
            .collect();
        db.record_events(&events).expect("events");
        let clients: HashMap<String, Client> = cfg
            .sinks
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Client::new(s, Duration::from_secs(2)).expect("client"),
                )
            })
            .collect();
        let now = now_ms();
        assert_eq!(pass(&cfg, &db, &clients, now).expect("pass"), (0, 1));
        let list = db
            .with_conn(|c| crate::db::notify::deliveries(c, 10))
            .expect("list");
        assert_eq!(list.len(), 1, "2,000 failures make one message");
        assert_eq!(list[0].events, 2000);
        let body: serde_json::Value = serde_json::from_str(&list[0].body).expect("body");
        assert_eq!(body["counts"]["store_failed"], 2000);
        assert_eq!((list[0].attempts, list[0].next_ms), (1, now + 2000));
        assert!(
            !list[0].last_error.contains("/hook"),
            "{}",
            list[0].last_error
        );
        // Not due before its backoff; the second failure gives it up (max_attempts = 2).
        assert_eq!(pass(&cfg, &db, &clients, now + 1999).expect("pass"), (0, 0));
        assert_eq!(pass(&cfg, &db, &clients, now + 2000).expect("pass"), (0, 1));
        let c = db
            .with_conn(crate::db::notify::delivery_counts)
            .expect("counts");
        assert_eq!((c.queued, c.failed, c.failed_attempts), (0, 1, 2));
        // A sink's messages go in order: while its first fails, the next waits untried.
        db.record_notify_events(&crate::notify::stale_events(
            &[("s2".into(), 0)],
            10_000,
            Duration::from_secs(1),
        ))
        .expect("event");
        let cfg2 = NotifyConfig {
            max_attempts: 5,
            ..cfg.clone()
        };
        assert_eq!(
            pass(&cfg2, &db, &clients, now + 3000).expect("pass"),
            (0, 1)
        );
        db.record_notify_events(&crate::notify::stale_events(
            &[("s3".into(), 0)],
            10_000,
            Duration::from_secs(1),
        ))
        .expect("event");
        assert_eq!(
            pass(&cfg2, &db, &clients, now + 3001).expect("pass"),
            (0, 0)
        );
        let list = db
            .with_conn(|c| crate::db::notify::deliveries(c, 10))
            .expect("list");
        assert_eq!(list.len(), 3);
        assert_eq!(
            (list[0].attempts, list[1].attempts),
            (0, 1),
            "the newer waits behind the failing one"
        );
        // An event recorded longer than max_age before the notifier takes it is not told.
        db.record_notify_events(&crate::notify::stale_events(
            &[("s1".into(), 0)],
            10_000,
            Duration::from_secs(1),
        ))
        .expect("event");
        let later = now + cfg.max_age.as_millis() as u64 + 10_000;
        assert_eq!(pass(&cfg, &db, &clients, later).expect("pass").0, 0);
        let list = db
            .with_conn(|c| crate::db::notify::deliveries(c, 10))
            .expect("list");
        assert_eq!(list.len(), 3, "no message for the old event");
    }
}
