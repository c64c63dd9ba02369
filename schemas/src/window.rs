//! Operating windows and blackouts (v1.2): when a store may apply a deployment, in the
//! store's own local time. The wire types and their syntax rules live here; the arithmetic
//! (the next opening in a time zone, DST-correct) is the agent's (`agent/src/window.rs`).

use serde::{Deserialize, Serialize};

/// A day of the week, as written in `roost.yaml` (`mon` … `sun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

impl Day {
    /// Days since Monday (Monday = 0).
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// A recurring window: on each of `days` (store-local), from `start` for `duration`. A window
/// may run past midnight into the next day; it belongs to the day it starts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// The days it opens on; empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Day>,
    /// Store-local opening time, `HH:MM` (24 h).
    pub start: String,
    /// How long it stays open: `3h`, `90m`, `1h30m` (at most 7 days).
    pub duration: String,
}

/// Store-local dates (inclusive) on which nothing is applied, whatever the windows say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blackout {
    /// First date, `YYYY-MM-DD`.
    pub from: String,
    /// Last date, `YYYY-MM-DD` (inclusive).
    pub to: String,
}

/// A window whose fields are read: start in minutes after midnight, duration in minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedWindow {
    /// Days (Monday = 0); empty: every day.
    pub days: Vec<u8>,
    /// Minutes after local midnight.
    pub start_min: u32,
    /// Length in minutes (1 ..= 7 days).
    pub duration_min: u32,
}

/// A blackout's dates as (year, month, day), inclusive.
pub type DateRange = ((i16, i8, i8), (i16, i8, i8));

/// Parses `HH:MM` into minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Parses a duration of hours and minutes (`3h`, `90m`, `1h30m`) into minutes; 1 minute to
/// 7 days.
pub fn parse_duration_min(s: &str) -> Option<u32> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut seen_h = false;
    let mut seen_m = false;
    for c in s.chars() {
        match c {
            '0'..='9' => num.push(c),
            'h' if !seen_h && !seen_m && !num.is_empty() => {
                total += num.parse::<u64>().ok()? * 60;
                num.clear();
                seen_h = true;
            }
            'm' if !seen_m && !num.is_empty() => {
                total += num.parse::<u64>().ok()?;
                num.clear();
                seen_m = true;
            }
            _ => return None,
        }
    }
    if !num.is_empty() || !(1..=7 * 24 * 60).contains(&total) {
        return None;
    }
    u32::try_from(total).ok()
}

/// Parses `YYYY-MM-DD` (a real calendar date).
pub fn parse_date(s: &str) -> Option<(i16, i8, i8)> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i16 = s[0..4].parse().ok()?;
    let m: i8 = s[5..7].parse().ok()?;
    let d: i8 = s[8..10].parse().ok()?;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    (y >= 1970 && (1..=days).contains(&d)).then_some((y, m, d))
}

impl Window {
    /// The window's fields read, or which field is wrong and why.
    pub fn parse(&self) -> Result<ParsedWindow, (&'static str, String)> {
        let start_min = parse_hhmm(&self.start).ok_or((
            "start",
            format!("{:?} is not HH:MM (00:00 to 23:59)", self.start),
        ))?;
        let duration_min = parse_duration_min(&self.duration).ok_or((
            "duration",
            format!(
                "{:?} is not a duration like 3h, 90m or 1h30m (1 minute to 7 days)",
                self.duration
            ),
        ))?;
        let mut days: Vec<u8> = self.days.iter().map(|d| d.index()).collect();
        days.sort_unstable();
        days.dedup();
        Ok(ParsedWindow {
            days,
            start_min,
            duration_min,
        })
    }
}

impl Blackout {
    /// The dates read, or which field is wrong and why.
    pub fn parse(&self) -> Result<DateRange, (&'static str, String)> {
        let from = parse_date(&self.from)
            .ok_or(("from", format!("{:?} is not a date YYYY-MM-DD", self.from)))?;
        let to = parse_date(&self.to)
            .ok_or(("to", format!("{:?} is not a date YYYY-MM-DD", self.to)))?;
        if to < from {
            return Err(("to", format!("{} is before from {}", self.to, self.from)));
        }
        Ok((from, to))
    }
}

/// Checks windows and blackouts; `Err` names the field (`windows[0].start`) and the problem.
pub fn validate(windows: &[Window], blackouts: &[Blackout]) -> Result<(), (String, String)> {
    if windows.len() > 64 || blackouts.len() > 256 {
        return Err((
            "windows".into(),
            "at most 64 windows and 256 blackouts".into(),
        ));
    }
    for (i, w) in windows.iter().enumerate() {
        w.parse()
            .map_err(|(f, m)| (format!("windows[{i}].{f}"), m))?;
    }
    for (i, b) in blackouts.iter().enumerate() {
        b.parse()
            .map_err(|(f, m)| (format!("blackouts[{i}].{f}"), m))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax() {
        assert_eq!(parse_hhmm("02:00"), Some(120));
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 + 59));
        for bad in ["24:00", "2:00", "02:60", "0200", "aa:bb", ""] {
            assert_eq!(parse_hhmm(bad), None, "{bad}");
        }
        assert_eq!(parse_duration_min("3h"), Some(180));
        assert_eq!(parse_duration_min("90m"), Some(90));
        assert_eq!(parse_duration_min("1h30m"), Some(90));
        assert_eq!(parse_duration_min("168h"), Some(168 * 60));
        for bad in [
            "", "0m", "169h", "3", "h", "30m1h", "3h3h", "1d", "-1h", "1.5h",
        ] {
            assert_eq!(parse_duration_min(bad), None, "{bad}");
        }
        assert_eq!(parse_date("2026-12-24"), Some((2026, 12, 24)));
        assert_eq!(parse_date("2028-02-29"), Some((2028, 2, 29)));
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-1-01",
            "26-12-24",
            "2026-12-32",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let w = |start: &str, duration: &str| Window {
            days: vec![Day::Mon],
            start: start.into(),
            duration: duration.into(),
        };
        assert_eq!(validate(&[w("02:00", "3h")], &[]), Ok(()));
        let e = validate(&[w("02:00", "3h"), w("25:00", "3h")], &[]).expect_err("start");
        assert_eq!(e.0, "windows[1].start");
        let e = validate(&[w("02:00", "3x")], &[]).expect_err("duration");
        assert_eq!(e.0, "windows[0].duration");
        let b = Blackout {
            from: "2026-12-26".into(),
            to: "2026-12-24".into(),
        };
        let e = validate(&[], &[b]).expect_err("order");
        assert_eq!(e.0, "blackouts[0].to");
    }
}
