//! Operating windows in the store's local time: when a fetched and built revision may be
//! applied. Pure: the time zone (from the store profile; UTC when unknown) and "now" are
//! arguments, so the arithmetic is tested across DST changes without a clock.
//!
//! A window opens at its local `start` on each of its days and stays open for `duration` of
//! elapsed time (a 3 h window on the night clocks go forward still lasts 3 h). A start that
//! falls in a DST gap moves forward by the gap's length (02:30 becomes 03:30, as RFC 5545
//! calendars do); one in a fold opens at the first of the two instants. Blackouts are local dates on which nothing is applied.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};
use roost_schemas::window::ParsedWindow;
use roost_schemas::Schedule;

/// How far ahead an opening is searched for (a year plus a week).
const HORIZON_DAYS: i64 = 372;

/// Whether a revision may be applied now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Now (no windows, urgent, or inside an open window outside blackouts).
    Open,
    /// Not before this instant, in the store's zone.
    OpensAt(Zoned),
    /// No window opens within the horizon (every opening falls in blackouts).
    Never,
}

/// The store's time zone by IANA name; UTC when unknown or not in the database.
pub fn zone(name: Option<&str>) -> TimeZone {
    name.and_then(|n| TimeZone::get(n).ok())
        .unwrap_or(TimeZone::UTC)
}

/// RFC 3339 with the store's local offset (`2026-12-07T02:00:00-05:00`).
pub fn rfc3339(z: &Zoned) -> String {
    z.timestamp().display_with_offset(z.offset()).to_string()
}

/// The gate for `schedule` at `now` in `tz`.
pub fn gate(schedule: &Schedule, tz: &TimeZone, now: Timestamp) -> Gate {
    if !schedule.timed() {
        return Gate::Open;
    }
    let windows: Vec<ParsedWindow> = schedule
        .windows
        .iter()
        .filter_map(|w| w.parse().ok())
        .collect();
    let blackouts: Vec<(Date, Date)> = schedule
        .blackouts
        .iter()
        .filter_map(|b| {
            let ((y1, m1, d1), (y2, m2, d2)) = b.parse().ok()?;
            Some((Date::new(y1, m1, d1).ok()?, Date::new(y2, m2, d2).ok()?))
        })
        .collect();
    let blacked = |d: Date| blackouts.iter().any(|(f, t)| *f <= d && d <= *t);
    // The open intervals [from, to) that may contain the answer; none given: always open.
    let mut intervals: Vec<(Timestamp, Timestamp)> = Vec::new();
    let today = now.to_zoned(tz.clone()).date();
    if windows.is_empty() {
        intervals.push((now, Timestamp::MAX));
    }
    for offset in -8..=HORIZON_DAYS {
        let Ok(day) = today.checked_add(jiff::Span::new().days(offset)) else {
            continue;
        };
        let wd = day.weekday().to_monday_zero_offset() as u8;
        for w in &windows {
            if !w.days.is_empty() && !w.days.contains(&wd) {
                continue;
            }
            let (h, m) = ((w.start_min / 60) as i8, (w.start_min % 60) as i8);
            let Ok(start) = day.at(h, m, 0, 0).to_zoned(tz.clone()) else {
                continue;
            };
            let from = start.timestamp();
            let Ok(to) = from.checked_add(SignedDuration::from_mins(i64::from(w.duration_min)))
            else {
                continue;
            };
            if to > now {
                intervals.push((from.max(now), to));
            }
        }
    }
    let mut best: Option<Timestamp> = None;
    for (from, to) in intervals {
        if best.is_some_and(|b| b <= from) {
            continue;
        }
        if let Some(t) = first_allowed(from, to, tz, &blacked) {
            best = Some(best.map_or(t, |b| b.min(t)));
        }
    }
    match best {
        Some(t) if t <= now => Gate::Open,
        Some(t) => Gate::OpensAt(t.to_zoned(tz.clone())),
        None => Gate::Never,
    }
}

/// The first instant in [from, to) whose local date is not blacked out.
fn first_allowed(
    from: Timestamp,
    to: Timestamp,
    tz: &TimeZone,
    blacked: &impl Fn(Date) -> bool,
) -> Option<Timestamp> {
    let mut t = from;
    for _ in 0..=HORIZON_DAYS {
        if t >= to {
            return None;
        }
        let date = t.to_zoned(tz.clone()).date();
        if !blacked(date) {
            return Some(t);
        }
        // The start of the next local day (a day starting in a gap starts after it).
        t = date.tomorrow().ok()?.to_zoned(tz.clone()).ok()?.timestamp();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::window::{Blackout, Day, Window};

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn win(days: &[Day], start: &str, duration: &str) -> Window {
        Window {
            days: days.to_vec(),
            start: start.into(),
            duration: duration.into(),
        }
    }

    fn sched(windows: Vec<Window>, blackouts: Vec<(&str, &str)>) -> Schedule {
        Schedule {
            windows,
            blackouts: blackouts
                .into_iter()
                .map(|(f, t)| Blackout {
                    from: f.into(),
                    to: t.into(),
                })
                .collect(),
            urgent: false,
            depends_on: vec![],
        }
    }

    /// The gate as a string: `open`, `never` or the opening in RFC 3339 with the offset.
    fn g(s: &Schedule, tz: &str, now: &str) -> String {
        match gate(s, &zone(Some(tz)), at(now)) {
            Gate::Open => "open".into(),
            Gate::Never => "never".into(),
            Gate::OpensAt(z) => rfc3339(&z),
        }
    }

    #[test]
    fn no_windows_or_urgent_is_open() {
        let s = sched(vec![], vec![]);
        assert_eq!(g(&s, "UTC", "2026-12-06T12:00:00Z"), "open");
        let mut s = sched(vec![win(&[], "02:00", "1h")], vec![]);
        s.urgent = true;
        assert_eq!(g(&s, "UTC", "2026-12-06T12:00:00Z"), "open");
    }

    #[test]
    fn daily_window_in_store_time() {
        let s = sched(vec![win(&[], "02:00", "3h")], vec![]);
        // 12:00 in New York (EST, -05:00): next 02:00 local tomorrow.
        assert_eq!(
            g(&s, "America/New_York", "2026-12-06T17:00:00Z"),
            "2026-12-07T02:00:00-05:00"
        );
        // 03:00 local: open.
        assert_eq!(g(&s, "America/New_York", "2026-12-07T08:00:00Z"), "open");
        // 05:00 local: just closed (end exclusive).
        assert_eq!(
            g(&s, "America/New_York", "2026-12-07T10:00:00Z"),
            "2026-12-08T02:00:00-05:00"
        );
        // Unknown zone: UTC.
        assert_eq!(
            g(&s, "Mars/Olympus_Mons", "2026-12-06T17:00:00Z"),
            "2026-12-07T02:00:00+00:00"
        );
    }

    #[test]
    fn weekdays() {
        let s = sched(
            vec![win(
                &[Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri],
                "02:00",
                "3h",
            )],
            vec![],
        );
        // Friday 2026-12-04 at 06:00 Berlin: next is Monday 2026-12-07 02:00.
        assert_eq!(
            g(&s, "Europe/Berlin", "2026-12-04T05:00:00Z"),
            "2026-12-07T02:00:00+01:00"
        );
    }

    #[test]
    fn window_crossing_midnight() {
        // Saturdays from 23:00 for 3 h: open Sunday 01:00, closed Sunday 02:00.
        let s = sched(vec![win(&[Day::Sat], "23:00", "3h")], vec![]);
        // Sunday 2026-12-06 01:00 UTC: inside Saturday's window.
        assert_eq!(g(&s, "UTC", "2026-12-06T01:00:00Z"), "open");
        assert_eq!(
            g(&s, "UTC", "2026-12-06T02:00:00Z"),
            "2026-12-12T23:00:00+00:00"
        );
        // Saturday 22:00: opens at 23:00 the same day.
        assert_eq!(
            g(&s, "UTC", "2026-12-05T22:00:00Z"),
            "2026-12-05T23:00:00+00:00"
        );
    }

    #[test]
    fn new_york_spring_forward_gap() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT. A 02:30 window that day opens at 03:30
        // EDT (moved forward by the gap) and lasts its 1 h of elapsed time.
        let s = sched(vec![win(&[], "02:30", "1h")], vec![]);
        assert_eq!(
            g(&s, "America/New_York", "2026-03-08T06:00:00Z"),
            "2026-03-08T03:30:00-04:00"
        );
        // The day before it is 02:30 EST; the day after 02:30 EDT.
        assert_eq!(
            g(&s, "America/New_York", "2026-03-07T06:00:00Z"),
            "2026-03-07T02:30:00-05:00"
        );
        assert_eq!(
            g(&s, "America/New_York", "2026-03-08T09:00:00Z"),
            "2026-03-09T02:30:00-04:00"
        );
        // A 3 h window from 01:00 on that night ends at 05:00 EDT (3 h elapsed).
        let s = sched(vec![win(&[], "01:00", "3h")], vec![]);
        assert_eq!(g(&s, "America/New_York", "2026-03-08T08:59:00Z"), "open");
        assert_eq!(
            g(&s, "America/New_York", "2026-03-08T09:00:00Z"),
            "2026-03-09T01:00:00-04:00"
        );
    }

    #[test]
    fn new_york_fall_back_fold() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice and the window
        // opens at the first (EDT).
        let s = sched(vec![win(&[], "01:30", "1h")], vec![]);
        assert_eq!(
            g(&s, "America/New_York", "2026-11-01T04:00:00Z"),
            "2026-11-01T01:30:00-04:00"
        );
        // The next day it is 01:30 EST.
        assert_eq!(
            g(&s, "America/New_York", "2026-11-01T07:00:00Z"),
            "2026-11-02T01:30:00-05:00"
        );
    }

    #[test]
    fn berlin_dst_changes() {
        let s = sched(vec![win(&[], "02:30", "2h")], vec![]);
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST: 02:30 does not exist; opens at 03:30.
        assert_eq!(
            g(&s, "Europe/Berlin", "2026-03-28T23:00:00Z"),
            "2026-03-29T03:30:00+02:00"
        );
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; the first 02:30 (CEST).
        assert_eq!(
            g(&s, "Europe/Berlin", "2026-10-24T23:00:00Z"),
            "2026-10-25T02:30:00+02:00"
        );
        // Same local time, a fixed offset would be wrong by an hour across the change.
        assert_eq!(
            g(&s, "Europe/Berlin", "2026-10-26T00:00:00Z"),
            "2026-10-26T02:30:00+01:00"
        );
    }

    #[test]
    fn blackouts() {
        let s = sched(
            vec![win(&[], "02:00", "3h")],
            vec![("2026-12-24", "2026-12-26")],
        );
        // Inside the window on a blacked-out date: waits for the 27th.
        assert_eq!(
            g(&s, "America/New_York", "2026-12-24T08:00:00Z"),
            "2026-12-27T02:00:00-05:00"
        );
        // A blackout alone: open again at local midnight after it.
        let s = sched(vec![], vec![("2026-12-24", "2026-12-26")]);
        assert_eq!(
            g(&s, "Europe/Berlin", "2026-12-25T12:00:00Z"),
            "2026-12-27T00:00:00+01:00"
        );
        assert_eq!(g(&s, "Europe/Berlin", "2026-12-23T12:00:00Z"), "open");
        // A window crossing midnight into a blacked-out date opens, closes at midnight.
        let s = sched(
            vec![win(&[], "23:00", "3h")],
            vec![("2026-12-25", "2026-12-25")],
        );
        assert_eq!(g(&s, "UTC", "2026-12-24T23:30:00Z"), "open");
        // ... and the 25th's window opens only once the 25th is over.
        assert_eq!(
            g(&s, "UTC", "2026-12-25T00:30:00Z"),
            "2026-12-26T00:00:00+00:00"
        );
        // Blackouts covering every window within the horizon: never.
        let s = sched(
            vec![win(&[], "02:00", "1h")],
            vec![("2026-01-01", "2028-12-31")],
        );
        assert_eq!(g(&s, "UTC", "2026-12-06T12:00:00Z"), "never");
    }
}
