//! `roost up`'s own view in a terminal: one compact frame, redrawn in place — stores per
//! phase, each plan's waves with progress bars and what they wait for, the last few events,
//! the dashboard URL. The same size for 3 stores or 2,000 (no line per store). When stdout is
//! not a terminal (`--once`, CI), `roost up` prints plain lines instead.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use roost_fleet::db::{FleetDb, StoredEvent};
use roost_fleet::gitops::plan::{Plan, PlanStatus, StoreOutcome};
use roost_fleet::view::{self, FleetView};

/// Width of a progress bar, in cells.
const BAR: usize = 24;

/// A progress bar: `[██████░░░░]`.
pub fn bar(done: usize, total: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        (done.min(total) * BAR).div_ceil(total)
    };
    format!("[{}{}]", "█".repeat(filled), "░".repeat(BAR - filled))
}

/// One frame. Pure.
pub fn frame(
    header: &str,
    v: &FleetView,
    plans: &BTreeMap<String, Plan>,
    events: &[(String, StoredEvent)],
) -> String {
    let mut out = String::new();
    out.push_str(header);
    out.push('\n');
    out.push_str(&view::render_summary(&v.summary));
    for (d, s) in &v.summary.deployments {
        let runs = s
            .applied
            .iter()
            .map(|(rev, n)| format!("{} on {}", n, &rev[..rev.len().min(12)]))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "{d}: {}\n",
            if runs.is_empty() {
                "nothing applied yet".into()
            } else {
                runs
            }
        ));
    }
    for (d, p) in plans {
        let status = match &p.status {
            PlanStatus::Running => "running".to_owned(),
            PlanStatus::Paused => "PAUSED".to_owned(),
            PlanStatus::Aborted(r) => format!("ABORTED: {r}"),
            PlanStatus::Done => "done".to_owned(),
        };
        out.push_str(&format!(
            "plan {d} {}  {status}\n",
            &p.release.revision[..p.release.revision.len().min(12)]
        ));
        for (i, w) in p.waves.iter().enumerate() {
            let chosen = p.wave_stores.get(i);
            let count = |o: StoreOutcome| {
                chosen
                    .map(|ss| ss.iter().filter(|s| p.outcomes.get(*s) == Some(&o)).count())
                    .unwrap_or(0)
            };
            let (total, converged, failed) = (
                chosen.map(Vec::len).unwrap_or(0),
                count(StoreOutcome::Converged),
                count(StoreOutcome::Failed),
            );
            let state = if i < p.wave || p.status == PlanStatus::Done {
                "done"
            } else if i == p.wave && p.wave_published {
                "rolling"
            } else {
                "pending"
            };
            let figures = if chosen.is_some() {
                format!(
                    "{converged}/{total}{}",
                    if failed > 0 {
                        format!(" ({failed} failed)")
                    } else {
                        String::new()
                    }
                )
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "  wave {} {:<10} {} {figures:<12} {state}\n",
                i + 1,
                w.name,
                bar(converged, total),
            ));
        }
        if !p.waiting.is_empty() && p.status != PlanStatus::Done {
            out.push_str(&format!("  waiting: {}\n", p.waiting));
        }
    }
    if !events.is_empty() {
        out.push_str("last events:\n");
    }
    for (store, e) in events {
        let parsed = serde_json::from_str::<roost_schemas::CloudEvent>(&e.json).ok();
        let (time, rev, reason) = parsed
            .as_ref()
            .map(|ev| {
                (
                    ev.time.get(11..23).unwrap_or(&ev.time).to_owned(),
                    ev.rollout_ref()
                        .and_then(|r| r.revision)
                        .map(|r| r[..r.len().min(12)].to_owned())
                        .unwrap_or_default(),
                    ev.reason().unwrap_or("").to_owned(),
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "  {time}  {store:<12} {:<20} {rev} {reason}\n",
            e.ty.trim_start_matches("dev.roost.")
        ));
    }
    out
}

/// Redraws the frame every `every` until cancelled.
pub async fn run(db: FleetDb, header: String, every: Duration, cancel: CancellationToken) {
    use std::io::Write as _;
    loop {
        let db2 = db.clone();
        let h = header.clone();
        let text =
            tokio::task::spawn_blocking(move || -> Result<String, roost_fleet::db::DbError> {
                let v = view::build(&view::load(&db2)?, roost_fleet::db::now_ms());
                let plans = db2
                    .with_conn(roost_fleet::db::gitops::plans)
                    .unwrap_or_default();
                let events = db2.recent_events(8)?;
                Ok(frame(&h, &v, &plans, &events))
            })
            .await;
        if let Ok(Ok(text)) = text {
            // Home, the frame (each line cleared to its end), then clear below it.
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"));
            let _ = out.flush();
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars() {
        assert_eq!(bar(0, 0), format!("[{}]", "░".repeat(BAR)));
        assert_eq!(bar(9, 9), format!("[{}]", "█".repeat(BAR)));
        assert_eq!(bar(1, 2), format!("[{}{}]", "█".repeat(12), "░".repeat(12)));
        // Any progress shows: 1 of 2,000 fills a cell.
        assert!(bar(1, 2000).starts_with("[█░"));
        assert_eq!(bar(5, 3), bar(3, 3), "never more than full");
    }
}
