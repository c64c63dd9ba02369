//! What the broker audit found last (the fleet view and `/metrics` show it), and what the end-
//! to-end confirmation starts from: each store's recorded roostseqs.

use super::sql::{args, Conn};
use super::{DbError, FleetDb};
use roost_schemas::payload::OutboxOverflow;
use roost_schemas::watermark::Watermark;
use roost_schemas::{CloudEvent, EventType};

/// The last audit of the cloud broker's retained desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// When it finished (RFC 3339, the cloud's clock).
    pub at: String,
    /// What started it: `connection` (the record's link connected) or `interval`.
    pub trigger: String,
    /// Deployment topics the broker held.
    pub held: u64,
    /// Topics it republished (missing on the broker, or older there).
    pub repaired: Vec<String>,
    /// Audits finished since the database was created.
    pub audits: u64,
    /// Topics republished by every audit together.
    pub repaired_total: u64,
}

impl FleetDb {
    /// Records a finished audit.
    pub fn record_audit(
        &self,
        trigger: &str,
        held: u64,
        repaired: &[String],
    ) -> Result<AuditRecord, DbError> {
        self.transaction(|c| {
            let before = last_audit_in(c)?.unwrap_or_default();
            let rec = AuditRecord {
                at: roost_schemas::now_rfc3339(),
                trigger: trigger.to_owned(),
                held,
                repaired: repaired.to_vec(),
                audits: before.audits + 1,
                repaired_total: before.repaired_total + repaired.len() as u64,
            };
            let topics =
                serde_json::to_string(&rec.repaired).map_err(|source| DbError::Encode {
                    what: "repaired topics",
                    source,
                })?;
            c.execute(
                "INSERT INTO broker_audit(id, at, trigger, held, repaired, audits, repaired_total)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(id) DO UPDATE SET at = excluded.at, trigger = excluded.trigger,
               held = excluded.held, repaired = excluded.repaired, audits = excluded.audits,
               repaired_total = excluded.repaired_total",
                args![
                    &rec.at,
                    &rec.trigger,
                    rec.held,
                    topics,
                    rec.audits,
                    rec.repaired_total
                ],
            )?;
            Ok(rec)
        })
    }

    /// The last finished audit (None: none yet).
    pub fn last_audit(&self) -> Result<Option<AuditRecord>, DbError> {
        self.with_conn(last_audit_in)
    }

    /// Every store's confirmation watermark from what the database holds: from the store's
    /// lowest recorded roostseq (what came before is not the record's), every roostseq
    /// recorded or reported lost by the agent's overflow reports.
    pub fn confirmation_watermarks(&self) -> Result<Vec<(String, Watermark)>, DbError> {
        let mut out: Vec<(String, Watermark)> = Vec::new();
        // Per (store, roostseq): the overflow report's JSON if one has that roostseq.
        let rows = self.with_conn(|c| {
            c.query(
                &format!(
                    "SELECT store, roostseq, MAX(CASE WHEN type = '{}' THEN json ELSE NULL END)
                     FROM events GROUP BY store, roostseq ORDER BY store, roostseq",
                    EventType::OutboxOverflow.as_str()
                ),
                &[],
            )
        })?;
        for row in rows {
            let (store, seq, overflow): (String, u64, Option<String>) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            if out.last().is_none_or(|(s, _)| *s != store) {
                out.push((store.clone(), Watermark::new(seq.saturating_sub(1))));
            }
            if let Some((_, w)) = out.last_mut() {
                let lost = overflow
                    .and_then(|json| serde_json::from_str::<CloudEvent>(&json).ok())
                    .map(|e| lost_ranges(&e))
                    .unwrap_or_default();
                w.add_event(seq, &lost);
            }
        }
        Ok(out)
    }
}

/// The roostseqs an overflow report says the agent dropped (they will never come).
pub fn lost_ranges(e: &CloudEvent) -> Vec<(u64, u64)> {
    let Some(o) = e.typed::<OutboxOverflow>() else {
        return Vec::new();
    };
    if !o.lost_ranges.is_empty() {
        return o.lost_ranges.iter().map(|[a, b]| (*a, *b)).collect();
    }
    match (o.lost_from_roostseq, o.lost_to_roostseq) {
        (Some(a), Some(b)) => vec![(a, b)],
        _ => Vec::new(),
    }
}

fn last_audit_in(c: &Conn<'_>) -> Result<Option<AuditRecord>, DbError> {
    c.query_opt(
        "SELECT at, trigger, held, repaired, audits, repaired_total FROM broker_audit WHERE id = 1",
        &[],
    )?
    .map(|r| {
        Ok(AuditRecord {
            at: r.get(0)?,
            trigger: r.get(1)?,
            held: r.get(2)?,
            repaired: serde_json::from_str(&r.get::<String>(3)?).unwrap_or_default(),
            audits: r.get(4)?,
            repaired_total: r.get(5)?,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audits_add_up_and_watermarks_start_at_the_first_recorded_event() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = FleetDb::open(&dir.path().join("f.db")).expect("open");
        assert_eq!(db.last_audit().expect("read"), None);
        db.record_audit("connection", 3, &["a".into(), "b".into()])
            .expect("record");
        let r = db.record_audit("interval", 4, &[]).expect("record");
        assert_eq!((r.audits, r.repaired_total, r.held), (2, 2, 4));
        assert_eq!(db.last_audit().expect("read"), Some(r));
        let ev = |store: &str, seq: u64| {
            let mut e = CloudEvent::new(
                &format!("roost://stores/{store}/agent"),
                EventType::ApplyStarted,
                None,
                serde_json::json!({}),
            );
            e.id = format!("{store}-{seq}");
            e.roostseq = seq;
            let json = serde_json::to_string(&e).expect("json");
            (store.to_owned(), e, json)
        };
        db.record_events(&[
            ev("s1", 1),
            ev("s1", 2),
            ev("s1", 4),
            ev("s2", 7),
            ev("s2", 8),
        ])
        .expect("events");
        let w: Vec<(String, u64)> = db
            .confirmation_watermarks()
            .expect("watermarks")
            .into_iter()
            .map(|(s, w)| (s, w.upto()))
            .collect();
        assert_eq!(w, [("s1".to_owned(), 2), ("s2".to_owned(), 8)]);
    }
}
