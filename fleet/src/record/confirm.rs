//! End-to-end confirmation: after a batch of events is committed to the fleet database, the
//! record tells each store's bridge, retained on `…/stores/{store}/confirmed`, the highest
//! roostseq up to which every event of the store is committed (or reported lost by the
//! agent's overflow report). Batched: a store's confirmation is published at most once per
//! [`TICK`], with its newest value; every store's again after each reconnection of the
//! record's link (a direct publish is not kept while the link is down) and whenever a store
//! resends events the record holds already (its bridge still waits for a confirmation).
//!
//! The watermark starts at a store's lowest recorded roostseq: what came before is not in
//! this database and will not come (a bridge deletes events at the broker's PUBACK until it
//! has seen a confirmation, so a store new to this record has nothing older waiting).
//!
//! A gap that stays open for [`GAP_GIVE_UP`] with events recorded above it is given up: the
//! confirmation moves past it (the gap stays in the database and in every view as lost
//! events). Such a gap cannot be filled: a bridge resends what it holds within seconds of a
//! reconnect or a stall, so what is still missing after that long was deleted at the broker's
//! PUBACK before the bridge held events for confirmation (the switch from an older
//! controller) and lost by the broker. Waiting for it would make the bridge hold every later
//! event forever.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use roost_runtime::{DirectMessage, LinkHandle};
use roost_schemas::watermark::Watermark;
use roost_schemas::{Confirmed, EventType, Topics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::db::FleetItem;

/// How often pending confirmations are published (coalesced per store).
pub const TICK: Duration = Duration::from_millis(250);

/// How long a gap below recorded events may hold a store's confirmation back.
pub const GAP_GIVE_UP: Duration = Duration::from_secs(15 * 60);

/// One committed event, as the confirmation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Store.
    pub store: String,
    /// Its roostseq.
    pub roostseq: u64,
    /// Roostseqs an overflow report says were dropped by the agent.
    pub lost: Vec<(u64, u64)>,
}

impl Recorded {
    /// The event in `item`, if it is one.
    pub fn of(item: &FleetItem) -> Option<Recorded> {
        let FleetItem::Event(store, e, _) = item else {
            return None;
        };
        let lost = if e.ty == EventType::OutboxOverflow.as_str() {
            crate::db::audit::lost_ranges(e)
        } else {
            Vec::new()
        };
        Some(Recorded {
            store: store.clone(),
            roostseq: e.roostseq,
            lost,
        })
    }
}

/// The confirmation state of every store. Pure (no I/O).
#[derive(Debug, Default)]
pub struct Confirmer {
    marks: HashMap<String, Watermark>,
    pending: BTreeSet<String>,
    /// Stores whose confirmation waits on a gap: since when, at which roostseq.
    stuck: HashMap<String, (u64, Instant)>,
}

impl Confirmer {
    /// Starting from the database's watermarks; nothing pending until the link connects.
    pub fn new(marks: Vec<(String, Watermark)>) -> Confirmer {
        Confirmer {
            marks: marks.into_iter().collect(),
            pending: BTreeSet::new(),
            stuck: HashMap::new(),
        }
    }

    /// Notes committed events; their stores get a confirmation at the next tick.
    pub fn recorded(&mut self, events: &[Recorded]) {
        for e in events {
            let w = self
                .marks
                .entry(e.store.clone())
                .or_insert_with(|| Watermark::new(e.roostseq.saturating_sub(1)));
            w.add_event(e.roostseq, &e.lost);
            self.pending.insert(e.store.clone());
        }
    }

    /// Every store is confirmed again (the link connected again).
    pub fn all_again(&mut self) {
        self.pending.extend(self.marks.keys().cloned());
    }

    /// The confirmations to publish now (`now`: the clock, injected): (store, roostseq),
    /// each store once, none for 0; a gap open for [`GAP_GIVE_UP`] is given up first.
    pub fn take(&mut self, now: Instant) -> Vec<(String, u64)> {
        let pending = std::mem::take(&mut self.pending);
        pending
            .into_iter()
            .filter_map(|s| {
                let w = self.marks.get_mut(&s)?;
                match w.above().first() {
                    None => {
                        self.stuck.remove(&s);
                    }
                    Some((above, _)) => {
                        let (at, since) = *self
                            .stuck
                            .entry(s.clone())
                            .or_insert((w.upto(), now));
                        if at != w.upto() {
                            self.stuck.insert(s.clone(), (w.upto(), now));
                        } else if now.duration_since(since) >= GAP_GIVE_UP {
                            warn!(store = %s, from = at + 1, to = above - 1, "giving up on a roostseq gap: confirming past it (the events are lost)");
                            w.add(at + 1, above - 1);
                            self.stuck.remove(&s);
                        }
                    }
                }
                let upto = w.upto();
                (upto > 0).then_some((s, upto))
            })
            .collect()
    }

    /// The confirmed roostseq of a store.
    pub fn upto(&self, store: &str) -> u64 {
        self.marks.get(store).map(Watermark::upto).unwrap_or(0)
    }
}

/// Publishes confirmations every [`TICK`] while the link is connected, until `cancel`.
pub async fn run(
    mut c: Confirmer,
    topics: Topics,
    link: LinkHandle,
    leadership: crate::leadership::Leadership,
    mut committed: mpsc::UnboundedReceiver<Vec<Recorded>>,
    cancel: CancellationToken,
) {
    // Only the leader confirms; every instance keeps the watermarks of what it recorded,
    // and one that becomes the leader confirms every store again.
    let mut leading = false;
    let mut sessions = link.sessions();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            batch = committed.recv() => match batch {
                Some(b) => c.recorded(&b),
                None => break,
            },
            changed = sessions.changed() => {
                if changed.is_err() {
                    break;
                }
                c.all_again();
            }
            _ = tick.tick() => {
                if !link.is_connected() {
                    continue;
                }
                match (leading, leadership.is_leading()) {
                    (_, false) => {
                        leading = false;
                        continue;
                    }
                    (false, true) => {
                        leading = true;
                        c.all_again();
                    }
                    (true, true) => {}
                }
                let out = c.take(Instant::now());
                if !out.is_empty() {
                    debug!(stores = out.len(), "confirming");
                }
                for (store, upto) in out {
                    let payload = serde_json::to_vec(&Confirmed { roostseq: upto }).unwrap_or_default();
                    let _ = link.publish(DirectMessage {
                        topic: topics.confirmed(&store),
                        payload,
                        retain: true,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(store: &str, roostseq: u64) -> Recorded {
        Recorded {
            store: store.into(),
            roostseq,
            lost: Vec::new(),
        }
    }

    #[test]
    fn confirms_the_contiguous_prefix_once_per_store_and_tick() {
        let t0 = Instant::now();
        let mut c = Confirmer::new(vec![("s1".into(), Watermark::new(10))]);
        assert!(c.take(t0).is_empty(), "nothing pending before events");
        c.recorded(&[ev("s1", 11), ev("s1", 13), ev("s2", 5), ev("s2", 6)]);
        assert_eq!(c.take(t0), [("s1".to_owned(), 11), ("s2".to_owned(), 6)]);
        assert!(c.take(t0).is_empty(), "coalesced: once per tick");
        c.recorded(&[ev("s1", 12)]);
        assert_eq!(c.take(t0), [("s1".to_owned(), 13)]);
        // A duplicate (the bridge resent) confirms again, unchanged.
        c.recorded(&[ev("s2", 5)]);
        assert_eq!(c.take(t0), [("s2".to_owned(), 6)]);
        // Lost ranges of an overflow report count as accounted for.
        c.recorded(&[Recorded {
            store: "s1".into(),
            roostseq: 20,
            lost: vec![(14, 19)],
        }]);
        assert_eq!(c.take(t0), [("s1".to_owned(), 20)]);
        c.all_again();
        assert_eq!(c.take(t0), [("s1".to_owned(), 20), ("s2".to_owned(), 6)]);
        assert_eq!(c.upto("s3"), 0);
    }

    #[test]
    fn a_gap_holds_the_confirmation_back_until_given_up() {
        let t0 = Instant::now();
        let mut c = Confirmer::new(vec![("s1".into(), Watermark::new(10))]);
        c.recorded(&[ev("s1", 14), ev("s1", 15)]);
        assert_eq!(c.take(t0), [("s1".to_owned(), 10)]);
        // A resend fills part of it: the clock starts again at the new prefix.
        c.recorded(&[ev("s1", 11)]);
        let t1 = t0 + GAP_GIVE_UP;
        assert_eq!(c.take(t1), [("s1".to_owned(), 11)]);
        c.recorded(&[ev("s1", 16)]);
        assert_eq!(c.take(t1 + GAP_GIVE_UP / 2), [("s1".to_owned(), 11)]);
        // 12..13 never come: given up after GAP_GIVE_UP at 11.
        c.recorded(&[ev("s1", 16)]);
        assert_eq!(c.take(t1 + GAP_GIVE_UP), [("s1".to_owned(), 16)]);
    }
}
