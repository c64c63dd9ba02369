//! Following a published rollout to its end on every store it targets (`roost rollout
//! --wait`; the GitOps controller follows its waves with [`crate::gitops::plan`] instead):
//! which stores it targets (their retained status documents and presence, with precedence),
//! and what each of them made of it (converged, rejected, failed, timed out; offline stores
//! deferred, stores where another scope wins overridden).
//!
//! The per-store judgement is a pure function ([`judge`]) over what the store has shown: the
//! rollout's events and precedence, and for its status the convergence judgement the fleet
//! view and the plans use too ([`crate::judge`]); [`RolloutWatch`] only collects it from the
//! cloud broker. A watch subscribes before the rollout is published: message rejections
//! (`replay`, `source_not_allowed`, …) are events only, and an event published before the
//! subscription is never seen.

use std::collections::BTreeMap;
use std::time::Duration;

use roost_schemas::topics::StoreTopicKind;
use roost_schemas::ShortRev;
use roost_schemas::{CloudEvent, Presence, PresenceState, Rollout, Scope, StatusDoc, Topics};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc;

use crate::cloud::{CloudError, ToBroker as _};
use crate::judge::{self, Report, Reported, Wanted};

/// The rollout to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitTarget {
    /// Deployment.
    pub deployment: String,
    /// Scope it was published for.
    pub scope: Scope,
    /// The commit every targeted store must converge on.
    pub revision: String,
    /// Its sequence.
    pub sequence: u64,
}

impl WaitTarget {
    /// The target of a published rollout; a tombstone has no revision to converge on.
    pub fn of(r: &Rollout) -> Result<WaitTarget, CloudError> {
        match (&r.source, r.remove) {
            (Some(src), false) => Ok(WaitTarget {
                deployment: r.deployment.clone(),
                scope: r.scope.clone(),
                revision: src.revision.clone(),
                sequence: r.sequence,
            }),
            _ => Err(CloudError::Usage(
                "a tombstone has no revision to converge on: --wait needs a rollout with a source"
                    .into(),
            )),
        }
    }
}

/// What one store made of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StoreState {
    /// Still working on it (or has not shown anything about it yet).
    Waiting {
        /// What it shows now.
        last: String,
    },
    /// Converged on the revision.
    Converged,
    /// Rejected the rollout (`dev.roost.rollout.rejected`).
    Rejected {
        /// Reason code.
        reason: String,
        /// Detail.
        message: String,
    },
    /// Failed or degraded on the revision.
    Failed {
        /// Reason code (or the phase).
        reason: String,
        /// Detail.
        message: String,
    },
    /// Did not finish in time.
    TimedOut {
        /// What it showed last.
        last: String,
    },
    /// Offline: not waited for; it converges from the retained message when it returns.
    Deferred,
    /// A higher-precedence scope wins for the deployment on this store.
    Overridden {
        /// The winning scope key.
        by: String,
    },
    /// A newer rollout of the same scope has replaced this one on the store.
    Superseded {
        /// Its sequence.
        sequence: u64,
    },
}

impl StoreState {
    /// Finished (for better or worse), or not to be waited for.
    fn is_final(&self) -> bool {
        !matches!(self, StoreState::Waiting { .. })
    }
}

/// One store's line of a [`WaitReport`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreOutcome {
    /// Store name.
    pub store: String,
    /// What it made of the rollout.
    #[serde(flatten)]
    pub state: StoreState,
}

impl std::fmt::Display for StoreOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.store;
        match &self.state {
            StoreState::Waiting { last } => write!(f, "{s} waiting: {last}"),
            StoreState::Converged => write!(f, "{s} converged"),
            StoreState::Rejected { reason, message } => {
                write!(f, "{s} rejected: {reason} — {message}")
            }
            StoreState::Failed { reason, message } => write!(f, "{s} failed: {reason} — {message}"),
            StoreState::TimedOut { last } => write!(f, "{s} timed out: {last}"),
            StoreState::Deferred => write!(f, "{s} deferred: offline"),
            StoreState::Overridden { by } => write!(f, "{s} overridden: {by} wins"),
            StoreState::Superseded { sequence } => {
                write!(f, "{s} superseded: by sequence {sequence}")
            }
        }
    }
}

/// The end of a wait: every targeted store and what it made of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WaitReport {
    /// Deployment.
    pub deployment: String,
    /// Scope key.
    pub scope: String,
    /// Revision.
    pub revision: String,
    /// Sequence.
    pub sequence: u64,
    /// Targeted stores, by name.
    pub stores: Vec<StoreOutcome>,
}

impl WaitReport {
    /// Stores that were waited for (online, not overridden, not superseded).
    pub fn waited(&self) -> impl Iterator<Item = &StoreOutcome> {
        self.stores.iter().filter(|s| {
            !matches!(
                s.state,
                StoreState::Deferred
                    | StoreState::Overridden { .. }
                    | StoreState::Superseded { .. }
            )
        })
    }

    /// True only when at least one targeted online store was waited for and every one of
    /// them converged: a rollout nobody accepted is never a success.
    pub fn ok(&self) -> bool {
        let mut any = false;
        for s in self.waited() {
            any = true;
            if s.state != StoreState::Converged {
                return false;
            }
        }
        any
    }

    /// One line per store: `store-0001 converged`, `store-0002 rejected: replay — …`.
    pub fn lines(&self) -> Vec<String> {
        self.stores.iter().map(ToString::to_string).collect()
    }

    /// Why the wait failed, in one sentence (None when it succeeded).
    pub fn failure(&self) -> Option<String> {
        if self.ok() {
            return None;
        }
        let what = format!(
            "rollout of {} at {} (sequence {}, {})",
            self.deployment,
            ShortRev::of(&self.revision),
            self.sequence,
            self.scope
        );
        if self.waited().next().is_none() {
            let others = if self.stores.is_empty() {
                "no store is known to be targeted".to_owned()
            } else {
                self.lines().join(", ")
            };
            return Some(format!(
                "{what}: no targeted store is online, so nobody accepted it ({others})"
            ));
        }
        let bad: Vec<String> = self
            .waited()
            .filter(|s| s.state != StoreState::Converged)
            .map(ToString::to_string)
            .collect();
        Some(format!("{what} did not converge: {}", bad.join("; ")))
    }
}

/// Precedence of `scope` on a store with these groups: 0 = the store's own (strongest),
/// then its groups in order, the fleet last; None = the scope does not address the store.
pub fn precedence(scope: &Scope, store: &str, groups: &[String]) -> Option<usize> {
    match scope {
        Scope::Store(s) => (s == store).then_some(0),
        Scope::Group(g) => groups.iter().position(|x| x == g).map(|i| i + 1),
        Scope::Fleet => Some(usize::MAX),
    }
}

/// Whether the rollout's scope addresses a store, as far as its status document tells.
pub fn targets(scope: &Scope, store: &str, status: Option<&StatusDoc>) -> bool {
    let groups = status.map(|d| d.groups.as_slice()).unwrap_or_default();
    precedence(scope, store, groups).is_some()
}

/// What one store has shown about the deployment, as collected by a watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreView {
    /// Its latest status document.
    pub status: Option<StatusDoc>,
    /// Its latest presence.
    pub presence: Option<PresenceState>,
    /// The first decisive event about the rollout (rejected, failed for good, degraded,
    /// converged), as a state.
    pub event: Option<StoreState>,
    /// The store has shown that it accepted the rollout (`rollout.received`, or its status
    /// naming it): a newer sequence of the scope later means superseded, not a replay.
    pub accepted: bool,
    /// When the store was last heard (seconds since the epoch): a message from it during the
    /// watch, else its status document's own time.
    pub heard_s: Option<u64>,
    /// Silent for longer than its heartbeat allows ([`crate::judge::silent`], set by the
    /// watch before judging): not online, whatever its retained presence says.
    pub silent: bool,
}

/// What a store made of the rollout so far: the pure decision behind [`RolloutWatch::wait`].
/// The first decisive event about the rollout decides; else a newer rollout of the scope the
/// store accepted supersedes it; else the one convergence judgement ([`crate::judge`]) on the
/// store's status for this rollout, counting what a store that is not online last reported;
/// else a higher-precedence scope wins (overridden), the store is not online (deferred), or
/// it is still working on it.
pub fn judge(t: &WaitTarget, store: &str, v: &StoreView) -> StoreState {
    let key = t.scope.key();
    if let Some(e) = &v.event {
        return e.clone();
    }
    let groups = v
        .status
        .as_ref()
        .map(|d| d.groups.as_slice())
        .unwrap_or_default();
    let d = v
        .status
        .as_ref()
        .and_then(|doc| doc.deployments.get(&t.deployment));
    let desired = d.and_then(|d| d.desired.as_ref());
    if let Some(want) = desired {
        if want.scope == key && want.sequence > t.sequence && v.accepted {
            return StoreState::Superseded {
                sequence: want.sequence,
            };
        }
    }
    let report = Report {
        status: d,
        stale: v.presence != Some(PresenceState::Online) || v.silent,
    };
    let wanted = Wanted {
        revision: &t.revision,
        rollout: Some((&key, t.sequence)),
    };
    let verdict = judge::verdict(&report, &wanted);
    match verdict.reported() {
        Reported::Converged => return StoreState::Converged,
        Reported::Failed { reason, message } => return StoreState::Failed { reason, message },
        Reported::Pending | Reported::Waiting(_) => {}
    }
    if let Some(want) = desired.filter(|w| !(w.scope == key && w.sequence == t.sequence)) {
        if let Some(theirs) = Scope::from_key(&want.scope) {
            let (ours, winner) = (
                precedence(&t.scope, store, groups),
                precedence(&theirs, store, groups),
            );
            if let (Some(o), Some(w)) = (ours, winner) {
                if w < o {
                    return StoreState::Overridden {
                        by: want.scope.clone(),
                    };
                }
            }
        }
    }
    if verdict.is_stale() {
        return StoreState::Deferred;
    }
    let last = match (d, desired) {
        (_, Some(w)) if w.scope == key && w.sequence > t.sequence && !v.accepted => format!(
            "has accepted sequence {} of {key} already: sequence {} is a replay there",
            w.sequence, t.sequence
        ),
        (None, _) => "has not reported the deployment yet".to_owned(),
        (Some(d), _) => {
            let want = d
                .desired
                .as_ref()
                .map(|w| {
                    format!(
                        "wants {} (sequence {}, {})",
                        ShortRev::of(&w.revision),
                        w.sequence,
                        w.scope
                    )
                })
                .unwrap_or_else(|| "wants nothing".into());
            let mut s = format!("{} {want}", d.phase.as_str());
            if let Some(r) = &d.reason {
                s.push_str(&format!(", {r}"));
            }
            if !d.message.is_empty() {
                s.push_str(&format!(": {}", d.message));
            }
            s
        }
    };
    StoreState::Waiting { last }
}

fn now_s() -> u64 {
    time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64
}

/// Whether an event is about the rollout (its deployment, sequence and scope or topic).
fn is_about(t: &WaitTarget, e: &CloudEvent) -> bool {
    let data = &e.data;
    let s = |k: &str| data.get(k).and_then(|v| v.as_str());
    let topic = Topics::default().deployment(&t.scope, &t.deployment);
    s("deployment") == Some(t.deployment.as_str())
        && data.get("sequence").and_then(|v| v.as_u64()) == Some(t.sequence)
        && s("scope").is_none_or(|k| k == t.scope.key())
        && s("topic").is_none_or(|x| x == topic)
}

/// The decisive state an event carries for the rollout, if it is about it.
pub fn event_state(t: &WaitTarget, e: &CloudEvent) -> Option<StoreState> {
    if !is_about(t, e) {
        return None;
    }
    let data = &e.data;
    let s = |k: &str| data.get(k).and_then(|v| v.as_str());
    let problem = |fallback: &str| {
        (
            s("reason").unwrap_or(fallback).to_owned(),
            s("message").unwrap_or_default().to_owned(),
        )
    };
    match e.ty.as_str() {
        "dev.roost.rollout.rejected" => {
            let (reason, message) = problem("rejected");
            Some(StoreState::Rejected { reason, message })
        }
        "dev.roost.fetch.failed" | "dev.roost.apply.failed"
            if data.get("retryable").and_then(|v| v.as_bool()) == Some(false) =>
        {
            let (reason, message) = problem("failed");
            Some(StoreState::Failed { reason, message })
        }
        "dev.roost.degraded" => {
            let (reason, message) = problem("degraded");
            Some(StoreState::Failed { reason, message })
        }
        "dev.roost.converged" if s("revision") == Some(t.revision.as_str()) => {
            Some(StoreState::Converged)
        }
        _ => None,
    }
}

/// A subscription to every store's status, presence and events on the cloud broker, started
/// before a rollout is published so that nothing a store says about it is missed.
pub struct RolloutWatch {
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    views: BTreeMap<String, StoreView>,
    task: tokio::task::JoinHandle<()>,
    client: AsyncClient,
}

impl Drop for RolloutWatch {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

/// After the SUBACK, retained messages arrive within milliseconds; the snapshot of the
/// fleet is complete once they have been quiet this long.
const SNAPSHOT_QUIET: Duration = Duration::from_millis(500);

impl RolloutWatch {
    /// Connects (a clean session; it subscribes again on every reconnect), subscribes, and
    /// collects the retained status and presence documents of the fleet.
    pub async fn start(broker: &str) -> Result<RolloutWatch, CloudError> {
        let target = broker.to_broker()?;
        let count = target.addresses().len();
        let id = format!("roost-wait-{:016x}", rand::random::<u64>());
        let (client, mut ev) = AsyncClient::new(target.options(&id, 0)?, 1024);
        let topics = Topics::default();
        let filters: Vec<String> = [
            StoreTopicKind::Status,
            StoreTopicKind::Presence,
            StoreTopicKind::Events,
        ]
        .into_iter()
        .map(|k| topics.all_stores(k))
        .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), CloudError>>();
        let first = client.clone();
        // One task owns the event loop and never blocks (rumqttc needs continuous polling).
        // A failed connection or a refused subscription moves to the next address with
        // backoff (a fresh client: nothing of the failed connection carries over); with one
        // address, a failure is reported to `start` and the task retries the same broker.
        let task = tokio::spawn(async move {
            let mut sub = first;
            let mut at = 0usize;
            let mut backoff =
                roost_runtime::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            loop {
                let failed: Option<CloudError> = match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        let subs = filters
                            .iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        match sub.subscribe_many(subs).await {
                            Ok(()) => None,
                            Err(source) => Some(CloudError::Client {
                                what: "subscribe",
                                source: Box::new(source),
                            }),
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if roost_runtime::suback_refused(&ack) {
                            let one = target.only(at);
                            Some(CloudError::Refused {
                                broker: format!("{}:{}", one.host, one.port),
                            })
                        } else {
                            let _ = ready_tx.send(Ok(()));
                            None
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                        None
                    }
                    Ok(_) => None,
                    Err(e) => Some(target.only(at).error(e)),
                };
                let Some(error) = failed else { continue };
                if count == 1 {
                    let _ = ready_tx.send(Err(error));
                } else {
                    tracing::warn!(error = %roost_runtime::error_chain(&error), "rollout watch: broker failed; trying the next address");
                }
                tokio::time::sleep(backoff.next_delay()).await;
                at = roost_runtime::next_address(at, count);
                match target.options(&id, at) {
                    Ok(o) => {
                        let (c, e) = AsyncClient::new(o, 1024);
                        sub = c;
                        ev = e;
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                }
            }
        });
        let mut w = RolloutWatch {
            rx,
            views: BTreeMap::new(),
            task,
            client,
        };
        let patience = if count > 1 {
            crate::cloud::FAILOVER_FOR
        } else {
            Duration::from_secs(10)
        };
        match tokio::time::timeout(patience, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(CloudError::Mqtt("connection task ended".into())),
            Err(_) => return Err(CloudError::Timeout(format!("no SUBACK from {broker}"))),
        }
        // Later SUBACKs (reconnects) and errors only matter to the task: drain them there.
        tokio::spawn(async move { while ready_rx.recv().await.is_some() {} });
        while let Ok(Some((topic, payload))) =
            tokio::time::timeout(SNAPSHOT_QUIET, w.rx.recv()).await
        {
            w.take(&topics, None, &topic, &payload);
        }
        Ok(w)
    }

    /// Records one message in the views (events only when they are about `target`).
    fn take(&mut self, topics: &Topics, target: Option<&WaitTarget>, topic: &str, payload: &[u8]) {
        let Some((store, kind)) = topics.parse_store_topic(topic) else {
            return;
        };
        // Heard now: during the watch (a target is set) any message from the store; in the
        // retained snapshot, its status document's own time.
        if target.is_some() {
            self.views.entry(store.clone()).or_default().heard_s = Some(now_s());
        }
        match kind {
            StoreTopicKind::Status => {
                if let Ok(d) = serde_json::from_slice::<StatusDoc>(payload) {
                    let v = self.views.entry(store).or_default();
                    if let Some(t) = target {
                        let names_ours = d
                            .deployments
                            .get(&t.deployment)
                            .and_then(|x| x.desired.as_ref())
                            .is_some_and(|w| w.scope == t.scope.key() && w.sequence == t.sequence);
                        v.accepted |= names_ours;
                    }
                    if target.is_none() {
                        v.heard_s = roost_schemas::parse_rfc3339(&d.updated_at)
                            .map(|t| t.unix_timestamp().max(0) as u64);
                    }
                    v.status = Some(d);
                }
            }
            StoreTopicKind::Presence => {
                if let Ok(p) = serde_json::from_slice::<Presence>(payload) {
                    self.views.entry(store).or_default().presence = Some(p.state);
                }
            }
            StoreTopicKind::Events => {
                let Some(t) = target else { return };
                let Ok(e) = serde_json::from_slice::<CloudEvent>(payload) else {
                    return;
                };
                if e.ty == roost_schemas::EventType::RolloutReceived.as_str() && is_about(t, &e) {
                    self.views.entry(store.clone()).or_default().accepted = true;
                }
                if let Some(state) = event_state(t, &e) {
                    let v = self.views.entry(store).or_default();
                    // The first decisive event stands (a later converged does not undo a
                    // rejection of the same sequence, which cannot happen anyway).
                    if v.event.is_none() {
                        v.event = Some(state);
                    }
                }
            }
        }
    }

    /// Follows `target` until every targeted online store has finished with it (converged,
    /// rejected, failed) or `timeout` passes. Targeted: the stores the scope addresses (a
    /// group by the groups in their status documents); offline ones are deferred, ones where
    /// a higher-precedence scope wins are overridden, neither is waited for.
    pub async fn wait(
        mut self,
        target: &WaitTarget,
        timeout: Duration,
    ) -> Result<WaitReport, CloudError> {
        let topics = Topics::default();
        let deadline = tokio::time::Instant::now() + timeout;
        // The stores targeted when the wait starts; a store that shows up later (its first
        // status document) joins when it is targeted too.
        loop {
            let states = self.states(target);
            let pending = states
                .iter()
                .any(|s| matches!(s.state, StoreState::Waiting { .. }));
            if !pending {
                return Ok(self.report(target, states));
            }
            // Judged again at least every second: a store falls silent without a message.
            let next = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            match tokio::time::timeout_at(next, self.rx.recv()).await {
                Err(_) if next < deadline => continue,
                Err(_) => {
                    let states = states
                        .into_iter()
                        .map(|s| match s.state {
                            StoreState::Waiting { last } => StoreOutcome {
                                store: s.store,
                                state: StoreState::TimedOut { last },
                            },
                            _ => s,
                        })
                        .collect();
                    return Ok(self.report(target, states));
                }
                Ok(None) => return Err(CloudError::Mqtt("connection task ended".into())),
                Ok(Some((topic, payload))) => self.take(&topics, Some(target), &topic, &payload),
            }
        }
    }

    fn states(&self, target: &WaitTarget) -> Vec<StoreOutcome> {
        let now = now_s();
        self.views
            .iter()
            .filter(|(store, v)| targets(&target.scope, store, v.status.as_ref()))
            .map(|(store, v)| {
                let heartbeat_s = v
                    .status
                    .as_ref()
                    .and_then(|d| d.heartbeat_s)
                    .unwrap_or(crate::view::DEFAULT_HEARTBEAT_S);
                let v = StoreView {
                    silent: crate::judge::silent(v.heard_s, heartbeat_s, now),
                    ..v.clone()
                };
                StoreOutcome {
                    store: store.clone(),
                    state: judge(target, store, &v),
                }
            })
            .collect()
    }

    fn report(&self, target: &WaitTarget, stores: Vec<StoreOutcome>) -> WaitReport {
        debug_assert!(stores.iter().all(|s| s.state.is_final()));
        WaitReport {
            deployment: target.deployment.clone(),
            scope: target.scope.key(),
            revision: target.revision.clone(),
            sequence: target.sequence,
            stores,
        }
    }
}

/// Follows a rollout that was already published (see [`RolloutWatch`] to start following
/// before publishing, which is what `roost rollout --wait` does: message rejections are
/// events, and events from before the subscription are not seen here; what shows in the
/// retained status documents is).
pub async fn wait_for_rollout(
    broker: &str,
    deployment: &str,
    scope: &Scope,
    revision: &str,
    sequence: u64,
    timeout: Duration,
) -> Result<WaitReport, CloudError> {
    let target = WaitTarget {
        deployment: deployment.to_owned(),
        scope: scope.clone(),
        revision: revision.to_owned(),
        sequence,
    };
    RolloutWatch::start(broker)
        .await?
        .wait(&target, timeout)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_schemas::{DeploymentStatus, DesiredRef, Phase};

    fn target() -> WaitTarget {
        WaitTarget {
            deployment: "web".into(),
            scope: Scope::Group("canary".into()),
            revision: "b".repeat(40),
            sequence: 20,
        }
    }

    fn view(groups: &[&str], scope: &str, seq: u64, phase: Phase, applied: char) -> StoreView {
        let mut deployments = BTreeMap::new();
        deployments.insert(
            "web".to_string(),
            DeploymentStatus {
                desired: Some(DesiredRef {
                    revision: "b".repeat(40),
                    sequence: seq,
                    scope: scope.into(),
                    origin: None,
                }),
                applied_revision: Some(applied.to_string().repeat(40)),
                phase,
                reason: (phase == Phase::Failed).then(|| "invalid_manifest".to_string()),
                message: "m".into(),
                ..DeploymentStatus::default()
            },
        );
        StoreView {
            status: Some(StatusDoc {
                store: "s".into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                agent_version: "0".into(),
                updated_at: "2026-12-01T00:00:00Z".into(),
                roostseq: 1,
                outbox_backlog: 0,
                heartbeat_s: None,
                profile_sequence: None,
                deployments,
                freshness: Default::default(),
            }),
            presence: Some(PresenceState::Online),
            event: None,
            accepted: false,
            heard_s: None,
            silent: false,
        }
    }

    #[test]
    fn precedence_decides_targeted_and_overridden() {
        let t = target();
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(precedence(&t.scope, "s", &g(&["canary"])), Some(1));
        assert_eq!(precedence(&t.scope, "s", &g(&["other"])), None);
        assert_eq!(precedence(&Scope::Fleet, "s", &[]), Some(usize::MAX));
        assert_eq!(precedence(&Scope::Store("s".into()), "s", &[]), Some(0));
        // A store pin wins over our group rollout: overridden, not waited for.
        let v = view(&["canary"], "store:s", 7, Phase::Converged, 'a');
        assert_eq!(
            judge(&t, "s", &v),
            StoreState::Overridden {
                by: "store:s".into()
            }
        );
        // An earlier group wins over ours too; a later group or the fleet does not.
        let v = view(
            &["first", "canary"],
            "group:first",
            7,
            Phase::Converged,
            'a',
        );
        assert!(matches!(judge(&t, "s", &v), StoreState::Overridden { .. }));
        let v = view(&["canary", "last"], "group:last", 7, Phase::Converged, 'a');
        assert!(matches!(judge(&t, "s", &v), StoreState::Waiting { .. }));
        let v = view(&["canary"], "fleet", 7, Phase::Converged, 'a');
        assert!(matches!(judge(&t, "s", &v), StoreState::Waiting { .. }));
    }

    #[test]
    fn the_status_of_our_sequence_decides() {
        let t = target();
        let v = view(&["canary"], "group:canary", 20, Phase::Converged, 'b');
        assert_eq!(judge(&t, "s", &v), StoreState::Converged);
        // Converged, but on another revision (not yet applied): still waiting.
        let v = view(&["canary"], "group:canary", 20, Phase::Converged, 'a');
        assert!(matches!(judge(&t, "s", &v), StoreState::Waiting { .. }));
        let v = view(&["canary"], "group:canary", 20, Phase::Failed, 'a');
        assert_eq!(
            judge(&t, "s", &v),
            StoreState::Failed {
                reason: "invalid_manifest".into(),
                message: "m".into()
            }
        );
        // A transient failure is retried by the agent: still waiting.
        let mut v = view(&["canary"], "group:canary", 20, Phase::Failed, 'a');
        if let Some(d) = v.status.as_mut().and_then(|s| s.deployments.get_mut("web")) {
            d.reason = Some("fetch_failed".into());
        }
        assert!(matches!(judge(&t, "s", &v), StoreState::Waiting { .. }));
        let v = view(&["canary"], "group:canary", 20, Phase::Degraded, 'b');
        assert!(matches!(judge(&t, "s", &v), StoreState::Failed { .. }));
        // A newer rollout of the same scope replaced ours: not waited for. Unless the store
        // never accepted ours: then ours is a replay there, and its rejection is coming.
        let mut v = view(&["canary"], "group:canary", 21, Phase::Applying, 'a');
        assert!(
            matches!(judge(&t, "s", &v), StoreState::Waiting { ref last } if last.contains("replay")),
            "{:?}",
            judge(&t, "s", &v)
        );
        v.accepted = true;
        assert_eq!(judge(&t, "s", &v), StoreState::Superseded { sequence: 21 });
        // Offline and not finished: deferred.
        let mut v = view(&["canary"], "group:canary", 19, Phase::Converged, 'a');
        v.presence = Some(PresenceState::Offline);
        assert_eq!(judge(&t, "s", &v), StoreState::Deferred);
        v.presence = None;
        assert_eq!(judge(&t, "s", &v), StoreState::Deferred);
    }

    #[test]
    fn events_about_our_rollout_decide() {
        let t = target();
        let ev = |ty: roost_schemas::EventType, data: serde_json::Value| {
            CloudEvent::new("roost://stores/s/agent", ty, Some("web"), data)
        };
        let rejected = ev(
            roost_schemas::EventType::RolloutRejected,
            serde_json::json!({"deployment": "web", "sequence": 20, "reason": "replay",
                "message": "sequence 20 is not greater than the last accepted 30",
                "topic": "roost/v1/groups/canary/deployments/web"}),
        );
        assert_eq!(
            event_state(&t, &rejected),
            Some(StoreState::Rejected {
                reason: "replay".into(),
                message: "sequence 20 is not greater than the last accepted 30".into()
            })
        );
        // Another sequence, deployment or topic: not ours.
        for data in [
            serde_json::json!({"deployment": "web", "sequence": 19, "reason": "replay", "message": ""}),
            serde_json::json!({"deployment": "pos", "sequence": 20, "reason": "replay", "message": ""}),
            serde_json::json!({"deployment": "web", "sequence": 20, "reason": "replay", "message": "",
                "topic": "roost/v1/fleet/deployments/web"}),
        ] {
            assert_eq!(
                event_state(&t, &ev(roost_schemas::EventType::RolloutRejected, data)),
                None
            );
        }
        let retried = ev(
            roost_schemas::EventType::FetchFailed,
            serde_json::json!({"deployment": "web", "sequence": 20, "scope": "group:canary",
                "reason": "fetch_failed", "message": "x", "retryable": true}),
        );
        assert_eq!(event_state(&t, &retried), None, "retried by the agent");
        let converged = ev(
            roost_schemas::EventType::Converged,
            serde_json::json!({"deployment": "web", "sequence": 20, "scope": "group:canary",
                "revision": "b".repeat(40)}),
        );
        assert_eq!(event_state(&t, &converged), Some(StoreState::Converged));
    }

    #[test]
    fn success_needs_someone_who_converged() {
        let report = |states: Vec<StoreState>| WaitReport {
            deployment: "web".into(),
            scope: "fleet".into(),
            revision: "b".repeat(40),
            sequence: 20,
            stores: states
                .into_iter()
                .enumerate()
                .map(|(i, state)| StoreOutcome {
                    store: format!("store-{i:04}"),
                    state,
                })
                .collect(),
        };
        assert!(report(vec![StoreState::Converged, StoreState::Deferred]).ok());
        let nobody = report(vec![StoreState::Deferred]);
        assert!(!nobody.ok());
        assert!(nobody
            .failure()
            .is_some_and(|f| f.contains("no targeted store is online")));
        assert!(!report(vec![]).ok());
        let bad = report(vec![
            StoreState::Converged,
            StoreState::Rejected {
                reason: "replay".into(),
                message: "old".into(),
            },
        ]);
        assert!(!bad.ok());
        assert_eq!(
            bad.lines(),
            vec!["store-0000 converged", "store-0001 rejected: replay — old"]
        );
        assert!(bad
            .failure()
            .is_some_and(|f| f.contains("store-0001 rejected: replay")));
    }
}
