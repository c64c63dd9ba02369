//! What the bridge lets go up: only its own store's status, events and presence topics, each
//! payload valid against the contract's JSON Schema, events from the store's own agent and
//! status documents of the store itself; overflow reports only about roostseqs below their
//! own. And the delivery watermark over interval sets, so no payload can make it loop over
//! numbers or claim more than it is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use roost_schemas::payload::OutboxOverflow;
use roost_schemas::{CloudEvent, EventType, Topics};

/// Largest upward payload: half the brokers' `max_payload_size`, still room for the status
/// document of a store with over a thousand deployments (events are far smaller).
pub const MAX_UPWARD_BYTES: usize = 512 * 1024;
/// Most `lost_ranges` one overflow report may list (the agent merges them; it needs few).
pub const MAX_LOST_RANGES: usize = 4096;
pub use roost_schemas::watermark::{IntervalSet, Watermark, MAX_INTERVALS};

/// Why an upward message was dropped (acknowledged at the edge, not forwarded, not counted
/// towards any confirmation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not this store's status, events or presence topic.
    ForeignTopic,
    /// Over [`MAX_UPWARD_BYTES`].
    TooLarge,
    /// Empty (it would clear the retained document in the cloud).
    Empty,
    /// Not UTF-8 JSON.
    Malformed,
    /// JSON that does not match the contract's schema for the topic.
    Schema,
    /// An event whose `source` is not this store's agent.
    ForeignSource,
    /// A status document of another store.
    ForeignStore,
    /// An overflow report whose lost ranges are inconsistent or reach its own roostseq.
    LostRanges,
}

impl DropReason {
    /// Every reason, in a fixed order (for counters and reports).
    pub const ALL: [DropReason; 8] = [
        DropReason::ForeignTopic,
        DropReason::TooLarge,
        DropReason::Empty,
        DropReason::Malformed,
        DropReason::Schema,
        DropReason::ForeignSource,
        DropReason::ForeignStore,
        DropReason::LostRanges,
    ];

    /// The stable snake_case name (logs, counters).
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ForeignTopic => "foreign_topic",
            DropReason::TooLarge => "too_large",
            DropReason::Empty => "empty",
            DropReason::Malformed => "malformed",
            DropReason::Schema => "schema",
            DropReason::ForeignSource => "foreign_source",
            DropReason::ForeignStore => "foreign_store",
            DropReason::LostRanges => "lost_ranges",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dropped message: why, and a detail for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The reason.
    pub reason: DropReason,
    /// What exactly.
    pub detail: String,
}

fn refuse(reason: DropReason, detail: impl Into<String>) -> Dropped {
    Dropped {
        reason,
        detail: detail.into(),
    }
}

/// Counters of what went up and what was dropped, by reason; shared with whoever started the
/// bridge (tests read them).
#[derive(Debug, Default)]
pub struct UpwardStats {
    forwarded: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// The fleet's latest end-to-end confirmation (roostseq).
    cloud_confirmed: AtomicU64,
    /// 1 while the bridge holds events until the fleet confirms them.
    holding: AtomicU64,
    /// Times the unconfirmed events were sent again after a confirmation stall.
    stall_resends: AtomicU64,
}

impl UpwardStats {
    /// Counts a forwarded message.
    pub fn forwarded_one(&self) {
        self.forwarded_many(1);
    }

    /// Counts `n` forwarded messages.
    pub fn forwarded_many(&self, n: usize) {
        self.forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a dropped message.
    pub fn dropped_one(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Messages forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Messages dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// Messages dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(*r)).sum()
    }

    /// Notes the fleet's end-to-end confirmation and whether events are held for it.
    pub fn confirmed(&self, roostseq: u64, holding: bool) {
        self.cloud_confirmed.fetch_max(roostseq, Ordering::Relaxed);
        self.holding.store(u64::from(holding), Ordering::Relaxed);
    }

    /// The fleet's latest end-to-end confirmation (0: none seen since the start).
    pub fn cloud_confirmed(&self) -> u64 {
        self.cloud_confirmed.load(Ordering::Relaxed)
    }

    /// Whether events are held until the fleet confirms them.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed) == 1
    }

    /// Counts a resend after a confirmation stall.
    pub fn stall_resend(&self) {
        self.stall_resends.fetch_add(1, Ordering::Relaxed);
    }

    /// Resends after a confirmation stall so far.
    pub fn stall_resends(&self) -> u64 {
        self.stall_resends.load(Ordering::Relaxed)
    }
}

/// A message that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upward {
    /// The store's status document (retained, last value wins).
    Status,
    /// One of the agent's events: its roostseq, and for an overflow report the roostseqs
    /// it says were lost (sorted, disjoint, all below `roostseq`).
    Event {
        /// The event's roostseq.
        roostseq: u64,
        /// Lost ranges (inclusive).
        lost: Vec<(u64, u64)>,
    },
    /// A presence document.
    Presence,
}

fn validator(which: &'static str) -> Option<&'static jsonschema::Validator> {
    static STATUS: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    static EVENT: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    static PRESENCE: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    let (cell, text) = match which {
        "status" => (&STATUS, roost_schemas::json_schema::STATUS),
        "events" => (&EVENT, roost_schemas::json_schema::EVENT),
        _ => (&PRESENCE, roost_schemas::json_schema::PRESENCE),
    };
    cell.get_or_init(|| {
        let schema: serde_json::Value = serde_json::from_str(text).ok()?;
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .ok()
    })
    .as_ref()
}

fn schema_check(which: &'static str, v: &serde_json::Value) -> Result<(), Dropped> {
    let Some(val) = validator(which) else {
        return Err(refuse(DropReason::Schema, "schema could not be loaded"));
    };
    // `is_valid` stops at the first failing keyword and builds no error; only a refused
    // payload pays for the detail (every accepted event used to walk the error iterator).
    if val.is_valid(v) {
        return Ok(());
    }
    Err(match val.iter_errors(v).next() {
        Some(e) => refuse(
            DropReason::Schema,
            format!("{e} (at {})", e.instance_path()),
        ),
        None => refuse(DropReason::Schema, "does not match the schema"),
    })
}

/// Checks one message from the edge broker for store `store`. Pure: the same message always
/// gets the same answer, whatever came before it.
pub fn check_upward(
    topics: &Topics,
    store: &str,
    topic: &str,
    payload: &[u8],
) -> Result<Upward, Dropped> {
    UpwardCheck::new(topics, store).check(topic, payload)
}

/// [`check_upward`] for one store, with its topics and its agent's event source worked out
/// once (the bridge checks every message with the same).
#[derive(Debug, Clone)]
pub struct UpwardCheck {
    store: String,
    status: String,
    events: String,
    presence: String,
    source: String,
}

impl UpwardCheck {
    /// The checks for store `store` under `topics`.
    pub fn new(topics: &Topics, store: &str) -> UpwardCheck {
        UpwardCheck {
            store: store.to_owned(),
            status: topics.status(store),
            events: topics.events(store),
            presence: topics.presence(store),
            source: format!("roost://stores/{store}/agent"),
        }
    }

    /// Checks one message (see [`check_upward`]).
    pub fn check(&self, topic: &str, payload: &[u8]) -> Result<Upward, Dropped> {
        let store = self.store.as_str();
        let which = if topic == self.status {
            "status"
        } else if topic == self.events {
            "events"
        } else if topic == self.presence {
            "presence"
        } else {
            return Err(refuse(DropReason::ForeignTopic, format!("{topic:?}")));
        };
        if payload.is_empty() {
            return Err(refuse(DropReason::Empty, which));
        }
        if payload.len() > MAX_UPWARD_BYTES {
            return Err(refuse(
                DropReason::TooLarge,
                format!("{} bytes, limit {MAX_UPWARD_BYTES}", payload.len()),
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| refuse(DropReason::Malformed, e.to_string()))?;
        schema_check(which, &value)?;
        match which {
            "status" => {
                let doc_store = value.get("store").and_then(|s| s.as_str()).unwrap_or("");
                if doc_store != store {
                    return Err(refuse(
                        DropReason::ForeignStore,
                        format!("status document of store {doc_store:?}"),
                    ));
                }
                Ok(Upward::Status)
            }
            "presence" => Ok(Upward::Presence),
            _ => {
                let ev: CloudEvent = serde_json::from_value(value)
                    .map_err(|e| refuse(DropReason::Schema, e.to_string()))?;
                let want = &self.source;
                if ev.source != *want {
                    return Err(refuse(
                        DropReason::ForeignSource,
                        format!("source {:?}, expected {want}", ev.source),
                    ));
                }
                let lost = if ev.event_type() == Some(EventType::OutboxOverflow) {
                    lost_ranges(&ev)?
                } else {
                    Vec::new()
                };
                Ok(Upward::Event {
                    roostseq: ev.roostseq,
                    lost,
                })
            }
        }
    }
}

/// The lost ranges of an overflow report, checked: each `[from, to]` with `1 <= from <= to <
/// roostseq` (the agent reports only events it dropped before the report took its own
/// roostseq), sorted and disjoint, at most [`MAX_LOST_RANGES`], adding up to `lost_count`,
/// and agreeing with `lost_from_roostseq` / `lost_to_roostseq`.
fn lost_ranges(ev: &CloudEvent) -> Result<Vec<(u64, u64)>, Dropped> {
    let bad = |d: String| refuse(DropReason::LostRanges, d);
    let o: OutboxOverflow = ev
        .typed()
        .ok_or_else(|| refuse(DropReason::Schema, "not an overflow report"))?;
    let ranges: Vec<(u64, u64)> = if !o.lost_ranges.is_empty() {
        o.lost_ranges.iter().map(|[a, b]| (*a, *b)).collect()
    } else {
        match (o.lost_from_roostseq, o.lost_to_roostseq) {
            (Some(a), Some(b)) => vec![(a, b)],
            (None, None) => Vec::new(),
            _ => {
                return Err(bad(
                    "only one of lost_from_roostseq / lost_to_roostseq".into()
                ))
            }
        }
    };
    if ranges.len() > MAX_LOST_RANGES {
        return Err(bad(format!(
            "{} ranges, limit {MAX_LOST_RANGES}",
            ranges.len()
        )));
    }
    let mut total: u64 = 0;
    let mut prev: Option<u64> = None;
    for &(a, b) in &ranges {
        if a == 0 || a > b {
            return Err(bad(format!("[{a}, {b}] is not a range")));
        }
        if b >= ev.roostseq {
            return Err(bad(format!(
                "[{a}, {b}] reaches the report's own roostseq {}",
                ev.roostseq
            )));
        }
        if prev.is_some_and(|p| a <= p) {
            return Err(bad(format!("[{a}, {b}] is not after the previous range")));
        }
        prev = Some(b);
        total = total
            .checked_add(b - a + 1)
            .ok_or_else(|| bad("lost count overflows".into()))?;
    }
    if total != o.lost_count {
        return Err(bad(format!(
            "ranges add up to {total}, lost_count says {}",
            o.lost_count
        )));
    }
    let first = ranges.first().map(|r| r.0);
    let last = ranges.last().map(|r| r.1);
    if o.lost_from_roostseq.is_some_and(|f| Some(f) != first)
        || o.lost_to_roostseq.is_some_and(|t| Some(t) != last)
    {
        return Err(bad(
            "lost_from_roostseq / lost_to_roostseq disagree with the ranges".into(),
        ));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::payload::OutboxOverflow;
    use roost_schemas::{EventData, Reason, StatusDoc};

    const STORE: &str = "store-0001";

    fn overflow(roostseq: u64, ranges: &[[u64; 2]]) -> CloudEvent {
        let count = ranges
            .iter()
            .map(|[a, b]| b.wrapping_sub(*a).wrapping_add(1))
            .fold(0u64, u64::wrapping_add);
        let mut ev = EventData::OutboxOverflow(OutboxOverflow {
            reason: Reason::OutboxOverflow,
            message: "m".into(),
            dropped_messages: count,
            lost_count: count,
            lost_from_roostseq: ranges.first().map(|r| r[0]),
            lost_to_roostseq: ranges.last().map(|r| r[1]),
            lost_ranges: ranges.to_vec(),
        })
        .into_event(&format!("roost://stores/{STORE}/agent"));
        ev.roostseq = roostseq;
        ev.id = format!("id-{roostseq}");
        ev
    }

    fn event(roostseq: u64) -> CloudEvent {
        let mut ev = CloudEvent::new(
            &format!("roost://stores/{STORE}/agent"),
            EventType::Converged,
            Some("web"),
            serde_json::json!({"deployment": "web"}),
        );
        ev.roostseq = roostseq;
        ev.id = format!("id-{roostseq}");
        ev
    }

    fn check(topic: &str, payload: &[u8]) -> Result<Upward, DropReason> {
        check_upward(&Topics::default(), STORE, topic, payload).map_err(|d| d.reason)
    }

    fn bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).expect("json")
    }

    #[test]
    fn watermark_advances_only_over_contiguous_roostseqs() {
        let mut w = Watermark::new(0);
        assert!(w.add(1, 1));
        assert!(w.add(2, 4));
        assert!(!w.add(7, 7), "a gap: 5 and 6 are missing");
        assert_eq!(w.upto(), 4);
        assert!(w.add(5, 6));
        assert_eq!(w.upto(), 7, "the gap filled; 7 was already there");
        assert!(!w.add(3, 3), "old duplicates change nothing");
        // An overflow report accounts for what the agent dropped.
        assert!(w.add_event(12, &[(8, 11)]));
        assert_eq!(w.upto(), 12);
        let mut resumed = Watermark::new(12);
        assert!(!resumed.add(12, 12));
        assert!(resumed.add(13, 13));
    }

    #[test]
    fn huge_ranges_cost_nothing_and_never_overflow() {
        let mut w = Watermark::new(0);
        // Used to loop over every number of the range and hang.
        assert!(!w.add(2, u64::MAX));
        assert_eq!(w.upto(), 0);
        assert!(w.add(1, 1));
        assert_eq!(w.upto(), u64::MAX);
        assert!(!w.add(u64::MAX, u64::MAX));
        assert!(!w.add(5, 3), "not a range");
        let mut s = IntervalSet::with_cap(3);
        for k in 0..10u64 {
            s.insert(k * 10, k * 10 + 1);
        }
        assert_eq!(s.len(), 3, "the highest are forgotten");
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![(0, 1), (10, 11), (20, 21)]
        );
        s.insert(2, 9);
        assert_eq!(s.first(), Some((0, 11)), "adjacent intervals merge");
        assert!(s.contains(5) && !s.contains(12));
    }

    #[test]
    fn only_the_stores_own_valid_messages_go_up() {
        let t = Topics::default();
        let ev_topic = t.events(STORE);
        assert_eq!(
            check(&ev_topic, &bytes(&event(3))),
            Ok(Upward::Event {
                roostseq: 3,
                lost: vec![]
            })
        );
        let doc = StatusDoc {
            store: STORE.into(),
            groups: vec![],
            agent_version: "0.1.0".into(),
            updated_at: roost_schemas::now_rfc3339(),
            roostseq: 3,
            outbox_backlog: 0,
            heartbeat_s: None,
            profile_sequence: None,
            deployments: Default::default(),
            freshness: Default::default(),
        };
        assert_eq!(check(&t.status(STORE), &bytes(&doc)), Ok(Upward::Status));
        let presence = br#"{"state":"online","since":"2026-11-26T10:00:00Z"}"#;
        assert_eq!(check(&t.presence(STORE), presence), Ok(Upward::Presence));
        let mut other = doc.clone();
        other.store = "store-0002".into();
        let mut foreign = event(4);
        foreign.source = "roost://stores/store-0002/agent".into();
        let mut no_seq = serde_json::to_value(event(5)).expect("json");
        no_seq.as_object_mut().expect("obj").remove("roostseq");
        let mut wrong_type = serde_json::to_value(event(5)).expect("json");
        wrong_type["roostseq"] = serde_json::json!("5");
        let cases: Vec<(String, Vec<u8>, DropReason)> = vec![
            (
                t.events("store-0002"),
                bytes(&event(3)),
                DropReason::ForeignTopic,
            ),
            (t.ack(STORE), bytes(&event(3)), DropReason::ForeignTopic),
            (
                format!("{ev_topic}/x"),
                bytes(&event(3)),
                DropReason::ForeignTopic,
            ),
            (ev_topic.clone(), vec![], DropReason::Empty),
            (
                ev_topic.clone(),
                vec![b' '; MAX_UPWARD_BYTES + 1],
                DropReason::TooLarge,
            ),
            (
                ev_topic.clone(),
                b"{not json".to_vec(),
                DropReason::Malformed,
            ),
            (ev_topic.clone(), vec![0xff, 0xfe], DropReason::Malformed),
            (ev_topic.clone(), bytes(&no_seq), DropReason::Schema),
            (ev_topic.clone(), bytes(&wrong_type), DropReason::Schema),
            (ev_topic.clone(), bytes(&foreign), DropReason::ForeignSource),
            (t.status(STORE), bytes(&other), DropReason::ForeignStore),
            (t.status(STORE), b"{}".to_vec(), DropReason::Schema),
            (
                t.presence(STORE),
                br#"{"state":"maybe","since":"x"}"#.to_vec(),
                DropReason::Schema,
            ),
            (
                ev_topic.clone(),
                bytes(&overflow(5, &[[1, u64::MAX]])),
                DropReason::LostRanges,
            ),
            (
                ev_topic.clone(),
                bytes(&overflow(5, &[[1, 5]])),
                DropReason::LostRanges,
            ),
            (
                ev_topic.clone(),
                bytes(&overflow(5, &[[3, 2]])),
                DropReason::LostRanges,
            ),
            (
                ev_topic.clone(),
                bytes(&overflow(9, &[[3, 4], [4, 6]])),
                DropReason::LostRanges,
            ),
            (
                ev_topic.clone(),
                bytes(&overflow(9, &[[5, 6], [1, 2]])),
                DropReason::LostRanges,
            ),
        ];
        for (topic, payload, want) in cases {
            assert_eq!(check(&topic, &payload), Err(want), "{topic}");
        }
        let mut lying = overflow(9, &[[1, 2]]);
        lying.data["lost_count"] = serde_json::json!(100);
        assert_eq!(
            check(&ev_topic, &bytes(&lying)),
            Err(DropReason::LostRanges)
        );
        assert_eq!(
            check(&ev_topic, &bytes(&overflow(9, &[[1, 2], [4, 8]]))),
            Ok(Upward::Event {
                roostseq: 9,
                lost: vec![(1, 2), (4, 8)]
            })
        );
    }

    #[test]
    fn stats_count_by_reason() {
        let s = UpwardStats::default();
        s.dropped_one(DropReason::LostRanges);
        s.dropped_one(DropReason::LostRanges);
        s.forwarded_one();
        assert_eq!(s.dropped(DropReason::LostRanges), 2);
        assert_eq!(s.dropped(DropReason::Schema), 0);
        assert_eq!(s.dropped_total(), 2);
        assert_eq!(s.forwarded(), 1);
    }
}

#[cfg(test)]
mod props {
    //! Property tests: the watermark matches a plain set model, never confirms what it was
    //! not given, and upward checks never panic nor let an overflow report reach its own
    //! roostseq.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn watermark_matches_a_set_model(ops in proptest::collection::vec((1u64..200, 0u64..8), 0..80)) {
            let mut w = Watermark::new(0);
            let mut model = BTreeSet::new();
            for (from, len) in ops {
                let to = from + len;
                w.add(from, to);
                model.extend(from..=to);
                let mut upto = 0;
                while model.contains(&(upto + 1)) {
                    upto += 1;
                }
                prop_assert_eq!(w.upto(), upto);
                prop_assert!(w.above().iter().all(|(s, e)| s > upto + 1 && s <= e));
            }
        }

        #[test]
        fn never_confirms_past_what_it_has(
            events in proptest::collection::vec((1u64..1000, proptest::collection::vec((0u64..1200, 0u64..1200), 0..4)), 0..40),
        ) {
            let topics = Topics::default();
            let mut w = Watermark::new(0);
            let mut seen_max = 0;
            for (roostseq, ranges) in events {
                let ranges: Vec<[u64; 2]> = ranges.into_iter().map(|(a, b)| [a, b]).collect();
                let count = ranges.iter().map(|[a, b]| b.saturating_sub(*a) + 1).sum();
                let mut ev = roost_schemas::EventData::OutboxOverflow(OutboxOverflow {
                    reason: roost_schemas::Reason::OutboxOverflow,
                    message: "p".into(),
                    dropped_messages: count,
                    lost_count: count,
                    lost_from_roostseq: ranges.first().map(|r| r[0]),
                    lost_to_roostseq: ranges.last().map(|r| r[1]),
                    lost_ranges: ranges,
                })
                .into_event("roost://stores/s1/agent");
                ev.roostseq = roostseq;
                ev.id = "x".into();
                let payload = serde_json::to_vec(&ev).expect("json");
                if let Ok(Upward::Event { roostseq, lost }) = check_upward(&topics, "s1", &topics.events("s1"), &payload) {
                    prop_assert!(lost.iter().all(|(a, b)| a <= b && *b < roostseq));
                    seen_max = seen_max.max(roostseq);
                    w.add_event(roostseq, &lost);
                }
                prop_assert!(w.upto() <= seen_max, "confirmed {} with nothing above {}", w.upto(), seen_max);
            }
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000), which in 0usize..4) {
            let t = Topics::default();
            let topic = [t.events("s1"), t.status("s1"), t.presence("s1"), t.ack("s1")][which].clone();
            let _ = check_upward(&t, "s1", &topic, &bytes);
        }

        #[test]
        fn json_shaped_events_never_panic(
            roostseq in any::<i64>(),
            ranges in proptest::collection::vec((any::<i64>(), any::<u64>()), 0..5),
            lost_count in any::<u64>(),
        ) {
            let t = Topics::default();
            let v = serde_json::json!({
                "specversion": "1.0", "id": "x", "source": "roost://stores/s1/agent",
                "type": "dev.roost.outbox.overflow", "time": "2026-11-26T10:00:00Z",
                "datacontenttype": "application/json", "roostseq": roostseq,
                "data": {"reason": "outbox_overflow", "message": "m", "lost_count": lost_count,
                         "lost_ranges": ranges.iter().map(|(a, b)| [serde_json::json!(a), serde_json::json!(b)]).collect::<Vec<_>>()}
            });
            let payload = serde_json::to_vec(&v).expect("json");
            if let Ok(Upward::Event { roostseq, lost }) = check_upward(&t, "s1", &t.events("s1"), &payload) {
                prop_assert!(lost.iter().all(|(a, b)| *a >= 1 && a <= b && *b < roostseq));
            }
        }
    }
}
