//! Who leads among several `roost fleet` processes on one PostgreSQL database: the table
//! `leader` (one row: the fencing `term`, its `holder`, and `lease_until_ms` by the
//! database's clock), a session advisory lock, and [`decide`], the pure rule each instance
//! applies to what it observes once per renewal interval.
//!
//! - Only the holder of the advisory lock ([`LOCK`], on a connection of its own) may start a
//!   term, and only once the current term's lease has run out by the database's clock: a
//!   leader killed with `-9` loses its lock with its sessions at once, and the standby that
//!   takes the lock leads when the lease ends (at most one lease after the death).
//! - A leader that is paused (SIGSTOP) keeps its TCP sessions and with them the lock; once
//!   its lease has run out, a standby terminates every session of the holder
//!   (`pg_terminate_backend` of its `application_name`: the lock's session, and a write
//!   transaction it may have left open), takes the lock and increments the term.
//! - Every write transaction of the controller checks the term ([`fence`]): a write under a
//!   stale term changes nothing and fails, and its process steps down.
//! - The leader renews its lease every renewal interval; it may act (write, publish) only
//!   until a local monotonic deadline, `lease` after it *sent* its last successful renewal,
//!   which ends before the lease by the database's clock does: a leader resumed after its
//!   lease ended publishes nothing, whatever its clock of day says.

use std::time::Duration;

use super::sql::{args, Conn};
use super::DbError;

/// The session advisory lock of the leadership (`pg_try_advisory_lock`).
pub const LOCK: i64 = 0x726f_6f73_7400_0002;

/// The database's clock in milliseconds since the epoch, as SQL.
const DB_NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The leader row as an instance observes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRow {
    /// The fencing term (incremented by every takeover).
    pub term: u64,
    /// Who holds it: the `application_name` of its sessions.
    pub holder: String,
    /// When its lease ends, by the database's clock (ms since the epoch).
    pub lease_until_ms: i64,
}

/// What an instance observed, for [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The term this instance leads under, if it believes it leads.
    pub leading: Option<u64>,
    /// It holds the advisory lock.
    pub have_lock: bool,
    /// The leader row (None: nobody ever led).
    pub row: Option<LeaderRow>,
    /// The database's clock when it was read (ms since the epoch).
    pub db_now_ms: i64,
}

/// What an instance does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It leads and the row still says so: renew the lease.
    Renew,
    /// It holds the lock and the lease ran out (or nobody led): start `term`.
    TakeOver {
        /// The new term.
        term: u64,
    },
    /// The lease ran out and another session holds the lock: terminate `holder`'s
    /// sessions (a paused or stuck leader), then try the lock again.
    Evict {
        /// The holder whose lease ran out.
        holder: String,
    },
    /// It believed it led, but the row names another term or holder: stop at once.
    StepDown,
    /// Someone else leads with a valid lease: stand by.
    Follow,
}

/// The leadership rule. Pure: `o` carries everything, including the database's clock.
pub fn decide(me: &str, o: &Observed) -> Decision {
    if let Some(term) = o.leading {
        return match &o.row {
            Some(r) if r.term == term && r.holder == me && o.have_lock => Decision::Renew,
            _ => Decision::StepDown,
        };
    }
    match &o.row {
        None if o.have_lock => Decision::TakeOver { term: 1 },
        None => Decision::Follow,
        Some(r) if r.lease_until_ms >= o.db_now_ms => Decision::Follow,
        Some(r) if o.have_lock => Decision::TakeOver { term: r.term + 1 },
        // Our own expired lease (we stepped down after a failed renewal) is not a holder to
        // evict: whoever holds the lock takes over.
        Some(r) if r.holder == me => Decision::Follow,
        Some(r) => Decision::Evict {
            holder: r.holder.clone(),
        },
    }
}

/// Inside a write transaction: whether the leader row still names `term` and `holder`.
/// The UPDATE locks the row, so a takeover waits for this transaction or this one sees the
/// new term.
pub fn fence(c: &Conn<'_>, term: u64, holder: &str) -> Result<bool, DbError> {
    Ok(c.execute(
        "UPDATE leader SET term = term WHERE id = 1 AND term = ?1 AND holder = ?2",
        args![term, holder],
    )? == 1)
}

/// The leader row (None: nobody ever led).
pub fn row(c: &Conn<'_>) -> Result<Option<LeaderRow>, DbError> {
    c.query_opt(
        "SELECT term, holder, lease_until_ms FROM leader WHERE id = 1",
        &[],
    )?
    .map(|r| {
        Ok(LeaderRow {
            term: r.get(0)?,
            holder: r.get(1)?,
            lease_until_ms: r.get(2)?,
        })
    })
    .transpose()
}

/// The leadership's statements on its own PostgreSQL session (the one holding the lock).
pub struct LeaseSession {
    client: postgres::Client,
    have_lock: bool,
}

impl LeaseSession {
    /// Opens the session, named `app` like every session of this process.
    pub fn connect(url: &str, app: &str) -> Result<LeaseSession, DbError> {
        let mut cfg: postgres::Config = url.parse()?;
        cfg.application_name(app);
        cfg.connect_timeout(Duration::from_secs(5));
        Ok(LeaseSession {
            client: cfg.connect(postgres::NoTls)?,
            have_lock: false,
        })
    }

    /// Observes: takes the lock if it can (unless leading), reads the row and the clock.
    pub fn observe(&mut self, leading: Option<u64>) -> Result<Observed, DbError> {
        if !self.have_lock {
            let r = self
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])?;
            self.have_lock = r.try_get(0)?;
        }
        let c = Conn::postgres(self.client.transaction()?);
        let row = row(&c)?;
        let db_now_ms: i64 = c.query_value(&format!("SELECT {DB_NOW_MS}"), &[])?;
        c.commit()?;
        Ok(Observed {
            leading,
            have_lock: self.have_lock,
            row,
            db_now_ms,
        })
    }

    /// Renews `term`'s lease for `lease`; false: the row names another term (fenced).
    pub fn renew(&mut self, term: u64, holder: &str, lease: Duration) -> Result<bool, DbError> {
        let n = self.client.execute(
            &format!(
                "UPDATE leader SET lease_until_ms = {DB_NOW_MS} + $1 WHERE id = 1 AND term = $2 AND holder = $3"
            ),
            &[&(lease.as_millis() as i64), &(term as i64), &holder],
        )?;
        Ok(n == 1)
    }

    /// Starts `term` (the previous one's lease having run out, or none); false: someone
    /// else changed the row meanwhile.
    pub fn take_over(&mut self, term: u64, holder: &str, lease: Duration) -> Result<bool, DbError> {
        let ms = lease.as_millis() as i64;
        let now = roost_schemas::now_rfc3339();
        let n = if term == 1 {
            self.client.execute(
                &format!(
                    "INSERT INTO leader(id, term, holder, lease_until_ms, since)
                     VALUES (1, 1, $1, {DB_NOW_MS} + $2, $3) ON CONFLICT (id) DO NOTHING"
                ),
                &[&holder, &ms, &now],
            )?
        } else {
            self.client.execute(
                &format!(
                    "UPDATE leader SET term = $1, holder = $2, lease_until_ms = {DB_NOW_MS} + $3, since = $4
                     WHERE id = 1 AND term = $5 AND lease_until_ms < {DB_NOW_MS}"
                ),
                &[&(term as i64), &holder, &ms, &now, &(term as i64 - 1)],
            )?
        };
        Ok(n == 1)
    }

    /// Terminates every session of `holder` (a leader whose lease ran out: its lock and
    /// any transaction it left open go with them). Returns how many.
    pub fn evict(&mut self, holder: &str) -> Result<u64, DbError> {
        let rows = self.client.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&holder],
        )?;
        Ok(rows.len() as u64)
    }

    /// Gives the lease up (a clean shutdown): a standby may take over at once.
    pub fn resign(&mut self, term: u64, holder: &str) -> Result<(), DbError> {
        self.client.execute(
            "UPDATE leader SET lease_until_ms = 0 WHERE id = 1 AND term = $1 AND holder = $2",
            &[&(term as i64), &holder],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(term: u64, holder: &str, until: i64) -> Option<LeaderRow> {
        Some(LeaderRow {
            term,
            holder: holder.into(),
            lease_until_ms: until,
        })
    }

    fn obs(leading: Option<u64>, have_lock: bool, row: Option<LeaderRow>, now: i64) -> Observed {
        Observed {
            leading,
            have_lock,
            row,
            db_now_ms: now,
        }
    }

    #[test]
    fn a_leader_renews_while_the_row_is_its_own_and_steps_down_otherwise() {
        assert_eq!(
            decide("a", &obs(Some(3), true, row(3, "a", 5_000), 1_000)),
            Decision::Renew
        );
        // Even past its lease by the database's clock: nobody took over, the lock is its own.
        assert_eq!(
            decide("a", &obs(Some(3), true, row(3, "a", 500), 1_000)),
            Decision::Renew
        );
        for o in [
            obs(Some(3), true, row(4, "b", 9_000), 1_000),
            obs(Some(3), true, row(3, "b", 9_000), 1_000),
            obs(Some(3), false, row(3, "a", 9_000), 1_000),
            obs(Some(3), true, None, 1_000),
        ] {
            assert_eq!(decide("a", &o), Decision::StepDown, "{o:?}");
        }
    }

    #[test]
    fn a_standby_takes_over_only_with_the_lock_after_the_lease() {
        // Nobody ever led.
        assert_eq!(
            decide("b", &obs(None, true, None, 0)),
            Decision::TakeOver { term: 1 }
        );
        assert_eq!(decide("b", &obs(None, false, None, 0)), Decision::Follow);
        // A leader killed with -9: its lock is free at once, its lease runs to its end.
        let leader = row(7, "a", 10_000);
        assert_eq!(
            decide("b", &obs(None, true, leader.clone(), 9_999)),
            Decision::Follow
        );
        assert_eq!(
            decide("b", &obs(None, true, leader.clone(), 10_000)),
            Decision::Follow,
            "the lease's last millisecond is still the leader's"
        );
        assert_eq!(
            decide("b", &obs(None, true, leader.clone(), 10_001)),
            Decision::TakeOver { term: 8 }
        );
        // A paused leader keeps its lock: after its lease it is evicted.
        assert_eq!(
            decide("b", &obs(None, false, leader.clone(), 9_000)),
            Decision::Follow
        );
        assert_eq!(
            decide("b", &obs(None, false, leader, 10_001)),
            Decision::Evict { holder: "a".into() }
        );
        // Its own old term is nobody to evict.
        assert_eq!(
            decide("a", &obs(None, false, row(7, "a", 1), 10_001)),
            Decision::Follow
        );
    }
}
