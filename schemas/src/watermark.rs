//! A delivery watermark: every sequence number up to `upto` is accounted for, plus intervals
//! above it that arrived out of order. Pure; the bridge confirms to the agent with it and the
//! fleet record confirms to the bridge (`…/stores/{store}/confirmed`).

use std::collections::BTreeMap;

/// Most intervals the watermark remembers above its contiguous prefix. Forgetting the highest
/// is always safe: confirmation only covers the contiguous prefix, so a forgotten interval
/// only means the agent resends those events (duplicates the cloud drops by id).
pub const MAX_INTERVALS: usize = 1024;

/// Disjoint, non-adjacent inclusive intervals of `u64`, at most `cap` of them (inserting past
/// the cap forgets the highest). Every operation is logarithmic in the number of intervals,
/// whatever the width of the ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntervalSet {
    /// start → end (inclusive).
    map: BTreeMap<u64, u64>,
    cap: usize,
}

impl Default for IntervalSet {
    fn default() -> Self {
        IntervalSet::with_cap(MAX_INTERVALS)
    }
}

impl IntervalSet {
    /// An empty set holding at most `cap` intervals (at least 1).
    pub fn with_cap(cap: usize) -> IntervalSet {
        IntervalSet {
            map: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    /// Adds `[from, to]` (ignored unless `from <= to`), merging overlapping and adjacent
    /// intervals.
    pub fn insert(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        let (mut lo, mut hi) = (from, to);
        if let Some((&s, &e)) = self.map.range(..=from).next_back() {
            if e.saturating_add(1) >= from {
                lo = s;
                hi = hi.max(e);
            }
        }
        // Every interval starting within [lo, hi + 1] merges.
        let merged: Vec<(u64, u64)> = self
            .map
            .range(lo..=hi.saturating_add(1))
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in merged {
            self.map.remove(&s);
            hi = hi.max(e);
        }
        self.map.insert(lo, hi);
        while self.map.len() > self.cap {
            self.map.pop_last();
        }
    }

    /// The lowest interval.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.map.first_key_value().map(|(s, e)| (*s, *e))
    }

    /// Removes the lowest interval.
    pub fn pop_first(&mut self) -> Option<(u64, u64)> {
        self.map.pop_first()
    }

    /// Whether `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.map
            .range(..=x)
            .next_back()
            .is_some_and(|(_, e)| *e >= x)
    }

    /// Number of intervals.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The intervals, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }
}

/// The events held durably by the next hop: every roostseq up to `upto`, plus intervals above
/// it that arrived out of order (after a gap that a resend will fill).
#[derive(Debug, Clone, Default)]
pub struct Watermark {
    upto: u64,
    above: IntervalSet,
}

impl Watermark {
    /// Starting from a persisted watermark.
    pub fn new(upto: u64) -> Watermark {
        Watermark {
            upto,
            above: IntervalSet::default(),
        }
    }

    /// The confirmed roostseq.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// The intervals above the confirmed prefix.
    pub fn above(&self) -> &IntervalSet {
        &self.above
    }

    /// Records stored roostseqs (an inclusive range); returns whether `upto` advanced.
    pub fn add(&mut self, from: u64, to: u64) -> bool {
        if to <= self.upto || from > to {
            return false;
        }
        let before = self.upto;
        // upto < to <= u64::MAX, so upto + 1 does not overflow.
        self.above.insert(from.max(self.upto + 1), to);
        if let Some((s, e)) = self.above.first() {
            if s == self.upto + 1 {
                self.upto = e;
                self.above.pop_first();
            }
        }
        self.upto > before
    }

    /// Records what one checked event accounts for: its own roostseq and, for an overflow
    /// report, the roostseqs the agent dropped (they will never come). Only ever given what
    /// the checks accepted (the bridge's `check_upward`), so every lost range lies below the event's own roostseq.
    pub fn add_event(&mut self, roostseq: u64, lost: &[(u64, u64)]) -> bool {
        let mut advanced = false;
        for &(a, b) in lost {
            advanced |= self.add(a, b.min(roostseq.saturating_sub(1)));
        }
        advanced |= self.add(roostseq, roostseq);
        advanced
    }
}
