//! Notifications from `roost fleet`: what happened (a plan started, a wave done, a plan done
//! or aborted, a store failed or rolled back, drift not corrected, a store stale, an invalid
//! fleet commit) told to people through webhooks, Slack and commit statuses.
//!
//! How it flows, with one owner per step:
//!
//! 1. **Events.** Whoever writes the fact records its [`NotifyEvent`] in the same
//!    transaction, keyed so that it is recorded once however often the fact is written
//!    again: the controller's plan writes ([`plan_events`], the transition from the plan
//!    before to the plan after), its sync of an invalid commit ([`invalid_commit_event`]),
//!    the ingest of a store's failure events ([`store_event`]); the leader's notifier adds
//!    stale stores ([`stale_events`]). They go to the fleet database's `notify_events`
//!    ([`crate::db::notify`]).
//! 2. **Messages.** The leader's notifier ([`deliver`]) takes the events not yet taken once
//!    the oldest is `coalesce` old, and makes per sink what it sends: one message with counts
//!    for a webhook or Slack (an incident at 2,000 stores is one message), one commit status
//!    per plan step (started, each wave, done or aborted) for GitHub ([`coalesce`]). The messages, their exact bodies
//!    and idempotency keys are queued in `notify_messages` in the same transaction that takes
//!    the events: a controller killed after that delivers them after its restart, with the
//!    same key.
//! 3. **Delivery.** Each queued message is sent until the sink answers 2xx, retried on the
//!    [`backoff`] schedule, given up (`failed`) after `max_attempts`.
//!
//! The sinks live in `roost fleet --notify FILE` ([`config`]), not in Git; URLs, secrets and
//! tokens are read from files, and never logged or written to the database. The wire form is
//! in `docs/notifications.md`.

pub mod config;
pub mod deliver;
pub mod sink;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gitops::plan::{Plan, PlanStatus, StoreOutcome};

pub use config::{NotifyConfig, SinkConfig, SinkKind};

/// Errors of notifications.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The configuration file could not be read or is invalid.
    #[error("notification configuration {path}: {why}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A secret or token file could not be read.
    #[error("notification sink {sink}: cannot read {what} {path}")]
    Secret {
        /// The sink.
        sink: String,
        /// `secret_file`, `token_file` or `url_file`.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fleet database.
    #[error("fleet database")]
    Db(#[from] crate::db::DbError),
    /// An HTTP request could not be made or was refused.
    #[error("{0}")]
    Send(String),
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A plan for a new release started.
    PlanStarted,
    /// A wave of a plan was done (its gate met).
    WaveDone,
    /// Every wave of a plan was done.
    PlanDone,
    /// A plan stopped (by its abort rules or an operator); the previous release is back.
    PlanAborted,
    /// A store failed a deployment (fetch, apply, health).
    StoreFailed,
    /// A store rolled a failed revision back to the last one that converged there.
    StoreRolledBack,
    /// A store found drift it did not correct.
    Drift,
    /// A store said nothing for longer than `stale_after`.
    StoreStale,
    /// A fleet-repository commit was invalid (the last good one stays in force).
    InvalidCommit,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 9] = [
        Kind::PlanStarted,
        Kind::WaveDone,
        Kind::PlanDone,
        Kind::PlanAborted,
        Kind::StoreFailed,
        Kind::StoreRolledBack,
        Kind::Drift,
        Kind::StoreStale,
        Kind::InvalidCommit,
    ];

    /// Its name in the configuration, the table and the body.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PlanStarted => "plan_started",
            Kind::WaveDone => "wave_done",
            Kind::PlanDone => "plan_done",
            Kind::PlanAborted => "plan_aborted",
            Kind::StoreFailed => "store_failed",
            Kind::StoreRolledBack => "store_rolled_back",
            Kind::Drift => "drift",
            Kind::StoreStale => "store_stale",
            Kind::InvalidCommit => "invalid_commit",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether it is bad news (a failure status, a red message).
    pub fn is_failure(self) -> bool {
        !matches!(self, Kind::PlanStarted | Kind::WaveDone | Kind::PlanDone)
    }
}

/// A store of an aborted plan that failed, with why (as its status says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingStore {
    /// The store.
    pub store: String,
    /// Its reason code and message for the deployment (empty when its status has none).
    pub reason: String,
}

/// One thing that happened, recorded once under its [`NotifyEvent::key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyEvent {
    /// Unique per fact: recording it again changes nothing.
    pub key: String,
    /// What happened.
    pub kind: Kind,
    /// When it was recorded (RFC 3339).
    pub at: String,
    /// One line for people.
    pub summary: String,
    /// The deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// The store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The fleet-repository commit (the plan's origin, or the invalid commit): where a
    /// commit status goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The revision rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The wave (wave_done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
    /// The plan's waves as `canary 1/1, half 48/50` (converged of targeted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Why (aborted, failed, invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many stores failed (plan_aborted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<u64>,
    /// The failing stores with why (plan_aborted; the first [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<FailingStore>,
}

/// At most this many stores are listed by name in an event, and events in a message.
pub const MAX_LISTED: usize = 20;

impl NotifyEvent {
    fn new(key: String, kind: Kind, summary: String) -> NotifyEvent {
        NotifyEvent {
            key,
            kind,
            at: roost_schemas::now_rfc3339(),
            summary,
            deployment: None,
            store: None,
            commit: None,
            revision: None,
            wave: None,
            progress: None,
            reason: None,
            failed: None,
            failing: Vec::new(),
        }
    }
}

/// A plan's identity across its writes: a new release, new waves or a new commit make a
/// new plan with a new `created_ms`.
fn plan_key(p: &Plan) -> String {
    format!(
        "plan/{}/{}/{}",
        p.deployment,
        roost_schemas::ShortRev::of(&p.release.revision),
        p.created_ms
    )
}

/// The plan's waves as people read them: `canary 1/1, half 48/50` (converged of the stores
/// each published wave targeted; waves not reached yet are left out).
pub fn progress(p: &Plan) -> String {
    let reached = if p.status == PlanStatus::Done {
        p.waves.len()
    } else {
        (p.wave + usize::from(p.wave_published)).min(p.waves.len())
    };
    p.waves
        .iter()
        .take(reached)
        .enumerate()
        .map(|(i, w)| {
            let stores = p.wave_stores.get(i).map(Vec::as_slice).unwrap_or(&[]);
            let converged = stores
                .iter()
                .filter(|s| p.outcomes.get(*s) == Some(&StoreOutcome::Converged))
                .count();
            format!("{} {converged}/{}", w.name, stores.len())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a plan write tells: the events of the transition from `before` (the plan the
/// database held, if any) to `after`. A different plan (another `created_ms`) is a new one.
/// `reasons` gives a failing store's reason for the aborted event. Pure.
pub fn plan_events(
    before: Option<&Plan>,
    after: &Plan,
    reasons: impl Fn(&str) -> String,
) -> Vec<NotifyEvent> {
    let same = before.filter(|b| b.created_ms == after.created_ms && b.release == after.release);
    let key = plan_key(after);
    let rev = roost_schemas::ShortRev::of(&after.release.revision).to_string();
    let d = &after.deployment;
    let base = |kind: Kind, suffix: &str, summary: String| {
        let mut e = NotifyEvent::new(format!("{key}/{suffix}"), kind, summary);
        e.deployment = Some(d.clone());
        e.commit = Some(after.origin.clone());
        e.revision = Some(after.release.revision.clone());
        e.progress = Some(progress(after));
        e
    };
    let mut out = Vec::new();
    if same.is_none() {
        out.push(base(
            Kind::PlanStarted,
            "started",
            format!("{d}: plan for {rev} started ({} waves)", after.waves.len()),
        ));
    }
    let from = same.map(|b| b.wave).unwrap_or(0);
    let to = match after.status {
        PlanStatus::Done => after.waves.len(),
        PlanStatus::Aborted(_) => from,
        _ => after.wave,
    };
    let was_done = same.is_some_and(|b| b.status == PlanStatus::Done);
    for i in from..to.min(after.waves.len()) {
        if was_done {
            break;
        }
        let w = &after.waves[i].name;
        let mut e = base(
            Kind::WaveDone,
            &format!("wave/{i}"),
            format!(
                "{d}: wave {w} done ({} of {} waves): {}",
                i + 1,
                after.waves.len(),
                progress(after)
            ),
        );
        e.wave = Some(w.clone());
        out.push(e);
    }
    let status_changed = same.is_none_or(|b| b.status != after.status);
    match &after.status {
        PlanStatus::Done if status_changed => out.push(base(
            Kind::PlanDone,
            "done",
            format!("{d}: plan for {rev} done: {}", progress(after)),
        )),
        PlanStatus::Aborted(reason) if status_changed => {
            let failing: Vec<&String> = after
                .outcomes
                .iter()
                .filter(|(_, o)| **o == StoreOutcome::Failed)
                .map(|(s, _)| s)
                .collect();
            let total: usize = after.wave_stores.iter().map(Vec::len).sum();
            let mut e = base(
                Kind::PlanAborted,
                "aborted",
                format!(
                    "{d}: plan for {rev} aborted, {} of {total} stores failed: {}",
                    failing.len(),
                    truncate(reason, 200)
                ),
            );
            e.reason = Some(truncate(reason, 1000));
            e.failed = Some(failing.len() as u64);
            e.failing = failing
                .iter()
                .take(MAX_LISTED)
                .map(|s| FailingStore {
                    store: (*s).clone(),
                    reason: reasons(s),
                })
                .collect();
            out.push(e);
        }
        _ => {}
    }
    out
}

/// `s` cut to `max` characters (with `…`).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// What a store's event tells (failed, rolled back, drift not corrected), keyed by the
/// event's id; None for every other event. Pure.
pub fn store_event(store: &str, e: &roost_schemas::CloudEvent) -> Option<NotifyEvent> {
    use roost_schemas::EventType as T;
    let kind = [
        (T::ApplyFailed, Kind::StoreFailed),
        (T::FetchFailed, Kind::StoreFailed),
        (T::Degraded, Kind::StoreFailed),
        (T::RolledBack, Kind::StoreRolledBack),
        (T::DriftDetected, Kind::Drift),
    ]
    .into_iter()
    .find(|(t, _)| t.as_str() == e.ty)
    .map(|(_, k)| k)?;
    let field = |f: &str| e.data.get(f).and_then(|v| v.as_str()).map(str::to_owned);
    let reason = match (field("reason"), field("message")) {
        (Some(r), Some(m)) if !m.is_empty() => Some(format!("{r}: {m}")),
        (r, m) => r.or(m),
    };
    let d = e.subject.clone().unwrap_or_default();
    let what = match kind {
        Kind::StoreFailed => "failed",
        Kind::StoreRolledBack => "rolled back",
        _ => "drift not corrected",
    };
    let mut n = NotifyEvent::new(
        format!("store/{store}/{}", e.id),
        kind,
        format!(
            "{store}: {d} {what}{}",
            reason
                .as_deref()
                .map(|r| format!(": {}", truncate(r, 200)))
                .unwrap_or_default()
        ),
    );
    n.at = e.time.clone();
    n.store = Some(store.to_owned());
    n.deployment = e.subject.clone();
    n.revision = field("revision");
    n.reason = reason.map(|r| truncate(&r, 1000));
    Some(n)
}

/// An invalid fleet commit, keyed by the commit (told once). Pure.
pub fn invalid_commit_event(repo: &str, commit: &str, reason: &str) -> NotifyEvent {
    let mut e = NotifyEvent::new(
        format!("commit/{commit}/invalid"),
        Kind::InvalidCommit,
        format!(
            "fleet commit {} of {repo} is invalid: {}",
            roost_schemas::ShortRev::of(commit),
            truncate(reason, 200)
        ),
    );
    e.commit = Some(commit.to_owned());
    e.reason = Some(truncate(reason, 1000));
    e
}

/// The stores last heard of longer than `after` before `now_ms`: one event per silence,
/// keyed by the store and when it was last heard of (a store heard of again and silent
/// again is told again). `last_heard` is (store, ms since the epoch). Pure.
pub fn stale_events(
    last_heard: &[(String, u64)],
    now_ms: u64,
    after: Duration,
) -> Vec<NotifyEvent> {
    let after_ms = after.as_millis() as u64;
    last_heard
        .iter()
        .filter(|(_, t)| now_ms.saturating_sub(*t) > after_ms)
        .map(|(store, t)| {
            let mut e = NotifyEvent::new(
                format!("stale/{store}/{t}"),
                Kind::StoreStale,
                format!(
                    "{store}: nothing heard for {} s (more than {} s)",
                    now_ms.saturating_sub(*t) / 1000,
                    after.as_secs()
                ),
            );
            e.store = Some(store.clone());
            e
        })
        .collect()
}

/// When a message that failed `attempts` times is tried again: 1 s, 2 s, 4 s, … doubling
/// from `base`, at most `max`. Pure.
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    let shift = attempts.saturating_sub(1).min(20);
    base.saturating_mul(1u32 << shift).min(max)
}

/// What goes to one sink: its body and, for a commit status, the commit it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Idempotency key: the same for every attempt, also after a restart.
    pub key: String,
    /// The commit a commit status is for (empty for webhooks and Slack).
    pub target: String,
    /// The exact body sent (JSON).
    pub body: String,
    /// How many events it carries.
    pub events: usize,
}

/// The idempotency key of a message to `sink` carrying `events`: the same events make the
/// same key.
fn message_key(sink: &str, target: &str, events: &[&NotifyEvent]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(sink.as_bytes());
    h.update([0]);
    h.update(target.as_bytes());
    for e in events {
        h.update([0]);
        h.update(e.key.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Counts by kind, for a coalesced message.
pub fn counts<'a>(events: impl Iterator<Item = &'a NotifyEvent>) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for e in events {
        *out.entry(e.kind.as_str()).or_insert(0) += 1;
    }
    out
}

/// The messages `events` (in the order they happened) make for a sink of `kind` named
/// `sink`, keeping those its `wants` filter takes: a webhook and Slack get one message with
/// counts, the first [`MAX_LISTED`] events and how many were left out; GitHub one commit
/// status per plan step and invalid commit. Pure.
pub fn coalesce(
    sink: &str,
    kind: SinkKind,
    wants: impl Fn(Kind) -> bool,
    events: &[NotifyEvent],
) -> Vec<Message> {
    let taken: Vec<&NotifyEvent> = events.iter().filter(|e| wants(e.kind)).collect();
    if taken.is_empty() {
        return Vec::new();
    }
    match kind {
        SinkKind::Webhook | SinkKind::Slack => {
            let key = message_key(sink, "", &taken);
            let body = match kind {
                SinkKind::Webhook => sink::webhook_body(&key, &taken),
                _ => sink::slack_body(&taken),
            };
            vec![Message {
                key,
                target: String::new(),
                body,
                events: taken.len(),
            }]
        }
        // A status per plan step (started, each wave, done or aborted) and per invalid
        // commit, in order: the newest one posted is the commit's state. Store events carry
        // no commit and never become statuses, so a plan of any size posts waves + 2.
        SinkKind::Github => taken
            .into_iter()
            .filter_map(|e| {
                let commit = e.commit.as_ref().filter(|c| is_sha(c))?;
                Some(Message {
                    key: message_key(sink, commit, &[e]),
                    body: sink::github_body(e),
                    target: commit.clone(),
                    events: 1,
                })
            })
            .collect(),
    }
}

fn is_sha(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitops::plan::{Plan, Release};
    use roost_schemas::fleet::Wave;

    fn plan() -> Plan {
        let release = Release {
            url: "git://h/apps".into(),
            revision: "c".repeat(40),
            path: "apps/web".into(),
            policy: Default::default(),
            not_before: None,
            schedule: Default::default(),
        };
        let waves: Vec<Wave> = serde_json::from_value(serde_json::json!([
            {"name": "canary", "group": "canary"},
            {"name": "half", "percent": 50}
        ]))
        .expect("waves");
        Plan::new(
            "web",
            release,
            None,
            &"a".repeat(40),
            waves,
            Default::default(),
            7,
        )
    }

    fn kinds(es: &[NotifyEvent]) -> Vec<Kind> {
        es.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn plan_transitions_notify_once_each() {
        let none = |_: &str| String::new();
        let mut p = plan();
        let started = plan_events(None, &p, none);
        assert_eq!(kinds(&started), [Kind::PlanStarted]);
        // Written again unchanged: nothing new.
        assert!(plan_events(Some(&p), &p, none).is_empty());
        let before = p.clone();
        p.wave_stores = vec![vec!["s1".into()], vec!["s2".into(), "s3".into()]];
        p.outcomes.insert("s1".into(), StoreOutcome::Converged);
        p.wave = 1;
        p.wave_published = true;
        let e = plan_events(Some(&before), &p, none);
        assert_eq!(kinds(&e), [Kind::WaveDone]);
        assert_eq!(e[0].wave.as_deref(), Some("canary"));
        assert_eq!(e[0].progress.as_deref(), Some("canary 1/1, half 0/2"));
        let before = p.clone();
        p.outcomes.insert("s2".into(), StoreOutcome::Converged);
        p.outcomes.insert("s3".into(), StoreOutcome::Converged);
        p.status = PlanStatus::Done;
        let e = plan_events(Some(&before), &p, none);
        assert_eq!(kinds(&e), [Kind::WaveDone, Kind::PlanDone]);
        assert_eq!(e[1].progress.as_deref(), Some("canary 1/1, half 2/2"));
        assert!(plan_events(Some(&p), &p, none).is_empty());
        // Keys differ per fact and are stable.
        let again = plan_events(Some(&before), &p, none);
        assert_eq!(again[0].key, e[0].key);
        assert_ne!(e[0].key, e[1].key);
        // A new plan of the same deployment starts again.
        let mut q = plan();
        q.created_ms = 8;
        assert_eq!(kinds(&plan_events(Some(&p), &q, none)), [Kind::PlanStarted]);
    }

    #[test]
    fn an_abort_names_its_failing_stores_with_reasons_and_counts() {
        let mut p = plan();
        let before = p.clone();
        p.wave_stores = vec![(0..2000).map(|i| format!("s{i:04}")).collect()];
        for s in &p.wave_stores[0] {
            p.outcomes.insert(s.clone(), StoreOutcome::Failed);
        }
        p.status = PlanStatus::Aborted("2000 of 2000 finished stores failed".into());
        let e = plan_events(Some(&before), &p, |s| format!("{s}: apply_failed"));
        assert_eq!(kinds(&e), [Kind::PlanAborted]);
        assert_eq!(e[0].failed, Some(2000));
        assert_eq!(e[0].failing.len(), MAX_LISTED);
        assert_eq!(e[0].failing[0].reason, "s0000: apply_failed");
        assert!(e[0].summary.contains("2000 of 2000 stores failed"));
    }

    #[test]
    fn store_events_that_notify() {
        let ev = |ty: roost_schemas::EventType| {
            let mut e = roost_schemas::CloudEvent::new(
                "roost://stores/s1/agent",
                ty,
                Some("web"),
                serde_json::json!({"reason": "apply_failed", "message": "boom"}),
            );
            e.id = "id1".into();
            e
        };
        use roost_schemas::EventType as T;
        let f = store_event("s1", &ev(T::ApplyFailed)).expect("failed");
        assert_eq!(f.kind, Kind::StoreFailed);
        assert_eq!(f.key, "store/s1/id1");
        assert_eq!(f.reason.as_deref(), Some("apply_failed: boom"));
        assert_eq!(
            store_event("s1", &ev(T::RolledBack)).map(|e| e.kind),
            Some(Kind::StoreRolledBack)
        );
        assert_eq!(
            store_event("s1", &ev(T::DriftDetected)).map(|e| e.kind),
            Some(Kind::Drift)
        );
        assert!(store_event("s1", &ev(T::Converged)).is_none());
        assert!(store_event("s1", &ev(T::DriftCorrected)).is_none());
    }

    #[test]
    fn stale_stores_are_told_once_per_silence() {
        let heard = [("a".to_owned(), 1_000), ("b".to_owned(), 50_000)];
        let e = stale_events(&heard, 62_000, Duration::from_secs(60));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, "stale/a/1000");
        assert!(stale_events(&heard, 61_000, Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(300));
        let s: Vec<u64> = (1..=11).map(|a| backoff(a, b, m).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(1000, b, m), m);
    }

    #[test]
    fn an_incident_at_2000_stores_is_one_message_with_counts() {
        let mut events: Vec<NotifyEvent> = (0..2000)
            .map(|i| {
                let mut e = NotifyEvent::new(
                    format!("store/s{i}/e"),
                    Kind::StoreFailed,
                    format!("s{i}: web failed"),
                );
                e.store = Some(format!("s{i}"));
                e
            })
            .collect();
        let mut p = plan();
        let before = p.clone();
        p.status = PlanStatus::Aborted("too many".into());
        events.extend(plan_events(Some(&before), &p, |_| String::new()));
        let m = coalesce("ops", SinkKind::Webhook, |_| true, &events);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].events, 2001);
        let body: serde_json::Value = serde_json::from_str(&m[0].body).expect("json");
        assert_eq!(body["counts"]["store_failed"], 2000);
        assert_eq!(body["counts"]["plan_aborted"], 1);
        assert_eq!(body["events"].as_array().map(Vec::len), Some(MAX_LISTED));
        assert_eq!(body["omitted"], 2001 - MAX_LISTED as u64);
        assert_eq!(body["id"], m[0].key.as_str());
        // The same events make the same message (idempotency key included).
        assert_eq!(coalesce("ops", SinkKind::Webhook, |_| true, &events), m);
        // A filter keeps what the sink wants.
        let only = coalesce("ops", SinkKind::Slack, |k| k == Kind::PlanAborted, &events);
        assert_eq!(only[0].events, 1);
        assert!(coalesce("ops", SinkKind::Slack, |k| k == Kind::PlanDone, &events).is_empty());
    }

    #[test]
    fn github_gets_a_status_per_plan_step_and_invalid_commit() {
        let none = |_: &str| String::new();
        let mut p = plan();
        let mut events = plan_events(None, &p, none);
        let before = p.clone();
        p.wave_stores = vec![vec!["s1".into()]];
        p.outcomes.insert("s1".into(), StoreOutcome::Converged);
        p.wave = 1;
        events.extend(plan_events(Some(&before), &p, none));
        events.push(invalid_commit_event(
            "git://h/fleet",
            &"b".repeat(40),
            "bad",
        ));
        events.push(invalid_commit_event("git://h/fleet", "not-a-sha", "bad"));
        events.push(
            store_event("s1", &{
                let mut e = roost_schemas::CloudEvent::new(
                    "roost://stores/s1/agent",
                    roost_schemas::EventType::ApplyFailed,
                    Some("web"),
                    serde_json::json!({}),
                );
                e.id = "x".into();
                e
            })
            .expect("store event"),
        );
        let m = coalesce("gh", SinkKind::Github, |_| true, &events);
        assert_eq!(m.len(), 3, "started, wave done, invalid: {m:?}");
        let body = |m: &Message| serde_json::from_str::<serde_json::Value>(&m.body).expect("json");
        assert_eq!(m[0].target, "a".repeat(40));
        assert_eq!(body(&m[0])["state"], "pending");
        assert_eq!(body(&m[0])["context"], "roost/web");
        assert_eq!(body(&m[1])["description"], "canary 1/1");
        assert_ne!(m[0].key, m[1].key);
        let bad = &m[2];
        assert_eq!(bad.target, "b".repeat(40));
        let body: serde_json::Value = serde_json::from_str(&bad.body).expect("json");
        assert_eq!(
            (body["state"].as_str(), body["context"].as_str()),
            (Some("failure"), Some("roost/fleet"))
        );
    }
}
