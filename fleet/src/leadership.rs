//! Whether this `roost fleet` may act as the leader now: always on SQLite (one process per
//! file), and on PostgreSQL while it holds the current term with a lease whose local
//! deadline has not passed ([`crate::db::leader`] has the rule and the table).
//!
//! Who does what with several instances on one database: every instance records status,
//! presence, events and desired state (ingest is idempotent), serves the API, the dashboard
//! and `/metrics`. Only the leader runs the GitOps controller's steps (its writes are fenced
//! by the term, [`crate::db::FleetDb::fenced`]), publishes anything to MQTT (rollouts,
//! profiles, snapshots, the end-to-end confirmations of `…/stores/{s}/confirmed`, the
//! record's republish of an envelope the broker holds older) and runs the broker audit and
//! its repairs. A follower's API sends plan actions through the request table, which the
//! leader takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::db::leader::{decide, Decision, LeaseSession};
use crate::db::{DbError, Fence};

/// The renewal interval and the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// How often the leader renews (and a standby looks).
    pub renew: Duration,
    /// How long a renewal lasts.
    pub lease: Duration,
}

impl Default for LeaseTimes {
    /// A renewal every second, a lease of five: a standby leads at most about six seconds
    /// after the leader's death.
    fn default() -> LeaseTimes {
        LeaseTimes {
            renew: Duration::from_secs(1),
            lease: Duration::from_secs(5),
        }
    }
}

struct State {
    /// SQLite: the one process always leads.
    solo: bool,
    holder: String,
    /// The term this process leads under (0: none).
    term: AtomicU64,
    /// Until when it may act, by the monotonic clock.
    deadline: Mutex<Option<Instant>>,
    /// The term, for tasks that wait for a change.
    changed: tokio::sync::watch::Sender<u64>,
}

/// This process's leadership, shared by its tasks.
#[derive(Clone)]
pub struct Leadership {
    state: Arc<State>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("holder", &self.state.holder)
            .field("term", &self.term())
            .finish()
    }
}

/// Whether a leader whose lease ends at `deadline` may act at `now`. Pure.
pub fn may_act(deadline: Option<Instant>, now: Instant) -> bool {
    deadline.is_some_and(|d| now < d)
}

impl Leadership {
    /// The leadership of the only process on a SQLite file: it always leads (term 1).
    pub fn solo() -> Leadership {
        Leadership::new(true, "solo".into(), 1)
    }

    fn new(solo: bool, holder: String, term: u64) -> Leadership {
        Leadership {
            state: Arc::new(State {
                solo,
                holder,
                term: AtomicU64::new(term),
                deadline: Mutex::new(None),
                changed: tokio::sync::watch::channel(term).0,
            }),
        }
    }

    /// Campaigns for the leadership of the PostgreSQL database at `url` on a thread of its
    /// own (the blocking client), under this process's session name, until `cancel`.
    pub fn start(url: &str, times: LeaseTimes, cancel: CancellationToken) -> Leadership {
        let me = Leadership::new(false, crate::db::session_name(), 0);
        let l = me.clone();
        let url = url.to_owned();
        let spawned = std::thread::Builder::new()
            .name("fleet-leadership".into())
            .spawn(move || l.campaign(&url, times, &cancel));
        if let Err(error) = spawned {
            warn!(%error, "cannot start the leadership thread; this instance stands by");
        }
        me
    }

    /// Whether this process may act as the leader now: write as the controller, publish.
    pub fn is_leading(&self) -> bool {
        self.state.solo
            || (self.term() != 0
                && may_act(
                    *self
                        .state
                        .deadline
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()),
                    Instant::now(),
                ))
    }

    /// The term it leads under (0: none).
    pub fn term(&self) -> u64 {
        self.state.term.load(Ordering::SeqCst)
    }

    /// Its holder name (its PostgreSQL sessions' `application_name`).
    pub fn holder(&self) -> &str {
        &self.state.holder
    }

    /// The term, to wait for changes (0: not leading).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.changed.subscribe()
    }

    fn lead(&self, term: u64, deadline: Instant) {
        *self
            .state
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        if self.state.term.swap(term, Ordering::SeqCst) != term {
            info!(term, holder = %self.state.holder, "leading: this instance runs the controller and publishes");
            self.state.changed.send_replace(term);
        }
    }

    /// Stops leading (no-op when not leading).
    pub fn step_down(&self, why: &str) {
        if self.state.solo {
            return;
        }
        *self
            .state
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        let term = self.state.term.swap(0, Ordering::SeqCst);
        if term != 0 {
            warn!(term, holder = %self.state.holder, %why, "stepped down: this instance stands by");
            self.state.changed.send_replace(0);
        }
    }

    fn campaign(&self, url: &str, times: LeaseTimes, cancel: &CancellationToken) {
        info!(holder = %self.state.holder, lease_ms = times.lease.as_millis() as u64, "campaigning for the leadership; standing by until this instance leads");
        let mut session: Option<LeaseSession> = None;
        while !cancel.is_cancelled() {
            let started = Instant::now();
            if let Err(error) = self.round(url, times, &mut session, started) {
                warn!(error = %roost_runtime::error_chain(&error), "leadership: database");
                self.step_down("lost the database session");
                // A new session: the lock went with the old one.
                session = None;
            }
            if self.term() != 0 && !self.is_leading() {
                // Not renewed in time (the process was paused, the database slow).
                self.step_down("the lease ran out before it was renewed");
                session = None;
            }
            let next = started + times.renew;
            while !cancel.is_cancelled() && Instant::now() < next {
                std::thread::sleep(Duration::from_millis(50).min(times.renew));
            }
        }
        let term = self.term();
        if term != 0 {
            self.step_down("shutting down");
            if let Some(s) = session.as_mut() {
                if let Err(error) = s.resign(term, &self.state.holder) {
                    warn!(error = %roost_runtime::error_chain(&error), "cannot give the lease up");
                }
            }
        }
    }

    /// One look at the database: renew, take over, evict, or stand by.
    fn round(
        &self,
        url: &str,
        times: LeaseTimes,
        session: &mut Option<LeaseSession>,
        started: Instant,
    ) -> Result<(), DbError> {
        let s = match session {
            Some(s) => s,
            None => session.insert(LeaseSession::connect(url, &self.state.holder)?),
        };
        let leading = Some(self.term()).filter(|t| *t != 0);
        let observed = s.observe(leading)?;
        match decide(&self.state.holder, &observed) {
            Decision::Renew => {
                let term = self.term();
                if s.renew(term, &self.state.holder, times.lease)? {
                    // From when the renewal was sent: this deadline ends before the lease
                    // does by the database's clock.
                    self.lead(term, started + times.lease);
                } else {
                    self.step_down("another instance took the term over");
                    *session = None;
                }
            }
            Decision::TakeOver { term } => {
                if s.take_over(term, &self.state.holder, times.lease)? {
                    self.lead(term, started + times.lease);
                }
            }
            Decision::Evict { holder } => {
                let n = s.evict(&holder)?;
                warn!(%holder, sessions = n, "the leader's lease ran out while it held the lock; its sessions were terminated");
            }
            Decision::StepDown => {
                self.step_down("the leader row names another term");
                *session = None;
            }
            Decision::Follow => {}
        }
        Ok(())
    }
}

impl Fence for Leadership {
    fn current(&self) -> Option<(u64, String)> {
        self.is_leading()
            .then(|| (self.term(), self.state.holder.clone()))
    }

    fn lost(&self, _term: u64) {
        self.step_down("a write was refused: the term is no longer this instance's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_acts_only_before_its_local_deadline() {
        let t0 = Instant::now();
        let d = Some(t0 + Duration::from_secs(5));
        assert!(may_act(d, t0));
        assert!(may_act(d, t0 + Duration::from_millis(4_999)));
        assert!(!may_act(d, t0 + Duration::from_secs(5)));
        assert!(!may_act(None, t0));
    }

    #[test]
    fn solo_always_leads_and_a_campaigner_leads_only_with_a_term_and_a_deadline() {
        let solo = Leadership::solo();
        assert!(solo.is_leading());
        solo.step_down("test");
        assert!(solo.is_leading(), "one process on SQLite never stands by");
        let l = Leadership::new(false, "a".into(), 0);
        assert!(!l.is_leading());
        assert_eq!(l.current(), None);
        l.lead(3, Instant::now() + Duration::from_secs(5));
        assert!(l.is_leading());
        assert_eq!(l.current(), Some((3, "a".to_string())));
        l.lead(3, Instant::now() - Duration::from_millis(1));
        assert!(!l.is_leading(), "past its deadline it may not act");
        assert_eq!(l.current(), None, "nor write");
        l.lost(3);
        assert_eq!(l.term(), 0);
    }
}
