//! The live stream, `GET /api/v1/stream` (`text/event-stream`): one task per server looks
//! at the fleet once per tick (only while someone listens) and broadcasts what changed —
//! `summary`, `plans`, `rows` (changed rows, capped; `truncated` tells a client to fetch its
//! page again) and `events` (new ones, capped). Coalesced by construction: however many
//! stores report within a tick, a listener gets at most one message of each kind per tick.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::model::{self, Row};
use super::Api;

/// Changed rows sent whole per message at most; beyond that only their keys go (a client
/// fetches its page again if one is on it), so a rollout across thousands of stores costs
/// a listener a few kilobytes a tick, not every changed row.
pub const MAX_ROWS_PER_UPDATE: usize = 20;
/// Changed keys per message at most; more, and the message says `truncated`.
pub const MAX_KEYS_PER_UPDATE: usize = 1000;
/// New events per message at most.
pub const MAX_EVENTS_PER_UPDATE: usize = 50;

/// One message of the stream: its SSE event name and JSON data.
#[derive(Debug, Clone)]
pub struct Update {
    /// `summary`, `plans`, `rows`, `events` or `resync`.
    pub kind: &'static str,
    /// JSON.
    pub data: Arc<str>,
}

/// Broadcasts updates to every listener.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<Update>,
}

impl Hub {
    /// A hub (a slow listener that falls 64 messages behind is told to resync).
    pub fn new() -> Hub {
        Hub {
            tx: broadcast::channel(64).0,
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// `rows` message.
#[derive(Debug, Serialize)]
pub struct RowsUpdate {
    /// Rows new or changed since the last tick, whole (only when at most
    /// [`MAX_ROWS_PER_UPDATE`] changed).
    pub changed: Vec<Row>,
    /// (store, deployment) of every row new or changed (at most [`MAX_KEYS_PER_UPDATE`]).
    pub keys: Vec<(String, String)>,
    /// (store, deployment) of rows gone.
    pub removed: Vec<(String, String)>,
    /// More changed than sent: fetch the page again.
    pub truncated: bool,
    /// Rows now.
    pub total: usize,
    /// Snapshot time.
    pub taken_at: String,
}

/// `events` message.
#[derive(Debug, Serialize)]
pub struct EventsUpdate {
    /// New events in arrival order.
    pub events: Vec<super::EventDoc>,
    /// More arrived than sent.
    pub more: bool,
}

fn json<T: Serialize>(v: &T) -> Arc<str> {
    serde_json::to_string(v).unwrap_or_default().into()
}

/// What one tick found, compared with the last.
#[derive(Debug, Default)]
struct Last {
    summary: Option<Arc<str>>,
    plans: Option<Arc<str>>,
    rows: Option<Vec<Row>>,
    arrival: Option<i64>,
}

/// Decides the updates of one tick (pure but for the events, passed in).
fn updates(
    last: &mut Last,
    snap: &model::Snapshot,
    new_events: (Vec<super::EventDoc>, bool),
) -> Vec<Update> {
    let mut out = Vec::new();
    // The summary's snapshot time changes every tick: compare without it.
    let doc = super::summary_doc(snap);
    let key = json(&(&doc.summary, &doc.plans));
    if last.summary.as_deref() != Some(&*key) {
        out.push(Update {
            kind: "summary",
            data: json(&doc),
        });
        last.summary = Some(key);
    }
    let plans = json(&snap.plans.values().collect::<Vec<_>>());
    if last.plans.as_deref() != Some(&*plans) {
        out.push(Update {
            kind: "plans",
            data: json(&super::plans_doc(snap)),
        });
        last.plans = Some(plans);
    }
    if let Some(before) = &last.rows {
        let (mut changed, removed) = model::diff_rows(before, &snap.rows);
        if !changed.is_empty() || !removed.is_empty() {
            let truncated = changed.len() > MAX_KEYS_PER_UPDATE;
            let keys = changed
                .iter()
                .take(MAX_KEYS_PER_UPDATE)
                .map(Row::key)
                .collect();
            if changed.len() > MAX_ROWS_PER_UPDATE {
                changed.clear();
            }
            out.push(Update {
                kind: "rows",
                data: json(&RowsUpdate {
                    changed,
                    keys,
                    removed,
                    truncated,
                    total: snap.rows.len(),
                    taken_at: snap.taken_at.clone(),
                }),
            });
        }
    }
    last.rows = Some(snap.rows.clone());
    let (events, more) = new_events;
    if let Some(e) = events.last() {
        last.arrival = Some(e.arrival);
        out.push(Update {
            kind: "events",
            data: json(&EventsUpdate { events, more }),
        });
    }
    out
}

/// The hub's task: one look per tick while anyone listens.
pub async fn run_hub(api: Api, cancel: CancellationToken) {
    let tick = api.inner.opts.tick.max(Duration::from_millis(50));
    let mut last = Last::default();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        if api.inner.hub.tx.receiver_count() == 0 {
            // Nobody listens: start over when someone does (they fetch the state first).
            last = Last::default();
            continue;
        }
        let snap = match api.refresh().await {
            Ok(s) => s,
            Err(error) => {
                warn!(error = %roost_runtime::error_chain(&error), "live stream: cannot read the fleet");
                continue;
            }
        };
        let after = last.arrival;
        let events = api
            .db()
            .call(move |db| {
                db.with_conn(|c| {
                    let after = match after {
                        Some(a) => a,
                        // The first tick starts at the newest event: history is `/events`.
                        None => {
                            c.query_value("SELECT COALESCE(MAX(arrival), 0) FROM events", &[])?
                        }
                    };
                    let (e, more) = super::events_page(
                        c,
                        &super::EventRange {
                            after,
                            limit: MAX_EVENTS_PER_UPDATE,
                            ..Default::default()
                        },
                    )?;
                    Ok((e, more, after))
                })
            })
            .await;
        let new_events = match events {
            Ok((e, more, after)) => {
                last.arrival = Some(after);
                (e, more)
            }
            Err(error) => {
                warn!(error = %roost_runtime::error_chain(&error), "live stream: cannot read events");
                (Vec::new(), false)
            }
        };
        for u in updates(&mut last, &snap, new_events) {
            let _ = api.inner.hub.tx.send(u);
        }
    }
}

/// `GET /api/v1/stream`.
pub async fn sse(State(api): State<Api>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = api.inner.hub.tx.subscribe();
    // A listener starts from the current summary and plans (rows and events it fetches).
    let first = match api.snapshot().await {
        Ok(s) => vec![
            Update {
                kind: "summary",
                data: json(&super::summary_doc(&s)),
            },
            Update {
                kind: "plans",
                data: json(&super::plans_doc(&s)),
            },
        ],
        Err(_) => Vec::new(),
    };
    let stream = futures::stream::unfold((first, rx), |(mut first, mut rx)| async move {
        if !first.is_empty() {
            let u = first.remove(0);
            return Some((
                Ok(Event::default().event(u.kind).data(&*u.data)),
                (first, rx),
            ));
        }
        let ev = match rx.recv().await {
            Ok(u) => Event::default().event(u.kind).data(&*u.data),
            Err(broadcast::error::RecvError::Lagged(n)) => Event::default()
                .event("resync")
                .data(format!("{{\"missed\":{n}}}")),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(ev), (first, rx)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_sends_only_what_changed() {
        let mut last = Last::default();
        let snap = model::Snapshot {
            taken_at: "t1".into(),
            ..Default::default()
        };
        let kinds = |u: Vec<Update>| u.iter().map(|u| u.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(updates(&mut last, &snap, (vec![], false))),
            ["summary", "plans"]
        );
        let snap2 = model::Snapshot {
            taken_at: "t2".into(),
            ..Default::default()
        };
        assert!(
            updates(&mut last, &snap2, (vec![], false)).is_empty(),
            "only the time moved"
        );
        let ev = super::super::EventDoc {
            arrival: 7,
            store: "s".into(),
            event: serde_json::json!({}),
        };
        assert_eq!(
            kinds(updates(&mut last, &snap2, (vec![ev], false))),
            ["events"]
        );
        assert_eq!(last.arrival, Some(7));
    }
}
