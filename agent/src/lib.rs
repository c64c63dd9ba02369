//! The roost store agent: verifies signed rollouts and its store profile from the store's edge
//! broker, fetches the wanted Git revision, applies it to a target, watches for drift and
//! reports everything back through a durable outbox (events) and a retained status document.

pub mod config;
pub mod decide;
pub mod freshness;
pub mod git;
pub mod git_https;
pub mod ledger;
pub mod metrics;
pub mod personalize;
pub mod profile;
pub mod reconcile;
pub mod targets;
pub mod verify;
pub mod window;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use roost_runtime::outbox::OverflowTarget;
use roost_runtime::{Incoming, Link, LinkHandle, Outbox, OutboxConfig};
use roost_schemas::payload::{RolloutReceived, RolloutRejected};
use roost_schemas::{EventData, RolloutRef, Topics};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

pub use config::AgentConfig;
use decide::{classify_sequence, resolve, scope_rank, Desired, SequenceVerdict};
use personalize::StoreContext;
use reconcile::Ctx;
use verify::{verify_message, VerifyPolicy};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// State directory problems.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// Path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] roost_runtime::OutboxError),
    /// The MQTT link could not start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
    /// The target could not be set up.
    #[error("target")]
    Target(#[source] targets::TargetError),
    /// The controller task ended unexpectedly.
    #[error("agent controller task ended unexpectedly")]
    TaskDied(#[source] tokio::task::JoinError),
    /// The controller task returned although nobody asked it to stop.
    #[error("agent controller stopped unexpectedly")]
    ControllerStopped,
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] roost_runtime::MetricsError),
    /// The configuration file is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The store's age identity file is unusable (missing when configured, readable by
    /// others, not an identity).
    #[error("[secrets] identity_file")]
    Identity(#[source] roost_runtime::sealed::SealedError),
}

/// Builds the target named in the configuration.
pub async fn build_target(cfg: &AgentConfig) -> Result<targets::AnyTarget, AgentError> {
    match &cfg.file.target {
        config::TargetConfig::Files(f) => Ok(targets::AnyTarget::Files(
            targets::files::FilesTarget::new(cfg.files_root(), f.hook.clone()),
        )),
        config::TargetConfig::Kubernetes(k) => Ok(targets::AnyTarget::Kube(Box::new(
            targets::kube::KubeTarget::from_env(k.clone(), &cfg.file.store)
                .await
                .map_err(AgentError::Target)?
                .with_max_objects(cfg.file.limits.max_objects),
        ))),
    }
}

/// The agent of the configuration file `path` until `cancel` (`roost agent --config FILE`
/// and `roost-agent`); `metrics_listen` overrides the file's.
pub async fn run_file(
    path: &std::path::Path,
    metrics_listen: Option<std::net::SocketAddr>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    let mut cfg = AgentConfig::load(path)?;
    if metrics_listen.is_some() {
        cfg.file.metrics_listen = metrics_listen;
    }
    run(cfg, cancel).await
}

/// Runs the agent until `cancel` fires. Returns an error if it cannot start or a task dies.
pub async fn run(cfg: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    let cfg = Arc::new(cfg);
    let dir = cfg.file.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| AgentError::StateDir {
        path: dir.clone(),
        source,
    })?;
    let store = cfg.file.store.clone();
    let topics = cfg.topics();
    let mut ocfg = OutboxConfig::new(dir.join("outbox.db"));
    ocfg.max_bytes = cfg.file.outbox_max_mib.unwrap_or(256) * 1024 * 1024;
    ocfg.overflow = Some(OverflowTarget {
        topic: topics.events(&store),
        source: cfg.event_source(),
    });
    let outbox = Outbox::open(ocfg)?;
    let metrics = metrics::AgentMetrics::default();
    let ledger = ledger::Ledger::open(
        outbox.clone(),
        topics.events(&store),
        cfg.event_source(),
        StoreContext::from_config(&cfg.file),
    )
    .await?;
    let target = Arc::new(build_target(&cfg).await?);
    let identity = personalize::sealed::load_identity(&cfg).map_err(AgentError::Identity)?;
    match &identity {
        Some(id) => info!(recipient = %id.recipient(), "age identity loaded"),
        None => info!(
            path = %personalize::sealed::identity_path(&cfg).display(),
            "no age identity: sealed files are not for this store"
        ),
    }
    // The store context the builds use: the accepted profile's (kept in the ledger), the
    // configured one before the first profile.
    let personalizer = personalize::Personalizer::new(ledger.store_context(), identity);
    let git = git::GitCache::new(
        dir.join("git"),
        cfg.file.git.credentials.clone(),
        Duration::from_secs(cfg.file.git.fetch_timeout_s.unwrap_or(120)),
    )
    .with_ca_file(cfg.file.git.ca_file.clone())
    .with_metrics(metrics.clone());
    {
        let git = git.clone();
        tokio::task::spawn_blocking(move || git.clear_stale_locks())
            .await
            .map_err(AgentError::TaskDied)?;
    }

    let mut lc = cfg
        .file
        .broker
        .link_config("edge", &format!("roost-agent-{store}"));
    // Errors about TLS files and credentials name the agent's own section, `[broker]`.
    lc.security = cfg.file.broker.security("broker");
    lc.max_packet_size = cfg.file.limits.max_message_bytes.max(64 * 1024) * 2;
    let confirm = cfg.file.confirm_via_bridge.unwrap_or(true);
    // The groups in force: the last accepted profile's, the configured ones before it.
    lc.subscriptions = subscriptions(&topics, &store, &ledger.groups(), confirm);
    // Events stay in the outbox until the bridge confirms it has them durably: a PUBACK from
    // the edge broker only means they are in its memory.
    lc.confirm_events = confirm;
    lc.metrics = Some(metrics.link.clone());
    let tracker = TaskTracker::new();
    let child = cancel.child_token();
    let metrics_server = roost_runtime::metrics::serve_if(
        cfg.file.metrics_listen,
        |r| metrics.register(r),
        metrics.outbox.refresh_hook(outbox.clone()),
        child.clone(),
    )
    .await?;
    let link = Link::start(lc, Some(outbox.clone()), child.clone())?;
    let ctx = Ctx {
        clock: reconcile::Clock::system(),
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        git,
        target,
        metrics,
        personalizer,
    };
    info!(%store, groups = ?ledger.groups(), profile = ledger.profile().map(|p| p.profile.sequence), "agent starting");
    tracker.spawn(
        ledger
            .clone()
            .run_status_publisher(
                topics.status(&store),
                store.clone(),
                cfg.file.status_heartbeat(),
                child.clone(),
            )
            .instrument(tracing::info_span!("status")),
    );
    {
        let board = ledger.clone();
        let mut connected = link.handle.connected();
        let c = child.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    r = connected.changed() => if r.is_err() { return },
                }
                if *connected.borrow_and_update() {
                    board.touch();
                }
            }
        });
    }
    // Freshness against the signed fleet snapshot: compared after desired-state messages.
    let kick = Arc::new(tokio::sync::Notify::new());
    tracker.spawn(
        freshness::run(
            ledger.clone(),
            topics.clone(),
            store.clone(),
            kick.clone(),
            child.clone(),
        )
        .instrument(tracing::info_span!("freshness")),
    );
    let confirmer = Confirmer {
        outbox: outbox.clone(),
        link: link.handle.clone(),
        topic: topics.ack(&store),
        state: Default::default(),
    };
    if confirm {
        tracker.spawn(confirmer.clone().resend_stalled(child.clone()));
    }
    let controller = tracker.spawn(
        controller(
            ctx,
            link.incoming,
            link.handle.clone(),
            confirmer,
            kick,
            tracker.clone(),
            child.clone(),
        )
        .instrument(tracing::info_span!("controller", %store)),
    );
    let link_task = link.task;
    tracker.close();
    let result = tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(()),
        // The controller only returns on shutdown; anything else is a fault to surface.
        r = controller => match r {
            _ if cancel.is_cancelled() => Ok(()),
            Ok(()) => Err(AgentError::ControllerStopped),
            Err(e) => Err(AgentError::TaskDied(e)),
        },
    };
    child.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), link_task).await;
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    info!("agent stopped");
    result
}

/// What the agent subscribes to on the edge broker: the deployment topics of the store, of
/// `groups` (the groups in force) and of the fleet, the fleet snapshot, the store's profile
/// and, with end-to-end confirmation, the bridge's acks.
pub fn subscriptions(
    topics: &Topics,
    store: &str,
    groups: &[String],
    confirm: bool,
) -> Vec<String> {
    let mut subs = topics.store_deployment_filters(store, groups);
    subs.push(topics.snapshot());
    subs.push(topics.profile(store));
    if confirm {
        subs.push(topics.ack(store));
    }
    subs
}

/// Holds back removals because the store left a group ([`Desired::Left`]) until its
/// subscriptions have settled: [`freshness::SETTLE`] after the link subscribed with the groups
/// in force (after a start, and after every change of the groups), so that the retained
/// rollouts of its new groups arrive first and a deployment both the old and the new groups
/// have is never removed in between. Pure bookkeeping over the times it is given.
#[derive(Debug)]
struct Settle {
    /// Waiting for the link to connect: the subscriptions are not made yet.
    awaiting_connect: bool,
    /// Removals wait until then.
    until: Option<tokio::time::Instant>,
    /// The deployments whose removal waits.
    held: BTreeSet<String>,
}

impl Settle {
    /// At start: wait for the first connection.
    fn new() -> Settle {
        Settle {
            awaiting_connect: true,
            until: None,
            held: BTreeSet::new(),
        }
    }

    /// The link connected (and subscribed).
    fn connected(&mut self, now: tokio::time::Instant) {
        if self.awaiting_connect {
            self.awaiting_connect = false;
            self.until = Some(now + freshness::SETTLE);
        }
    }

    /// The groups changed and the link was told to subscribe to the new ones.
    fn groups_changed(&mut self, connected: bool, now: tokio::time::Instant) {
        if connected {
            self.until = Some(now + freshness::SETTLE);
        } else {
            self.awaiting_connect = true;
        }
    }

    /// Whether a removal because the store left a group waits now; if so, it is held.
    fn hold(&mut self, deployment: &str, desired: &Desired, now: tokio::time::Instant) -> bool {
        let waits = matches!(desired, Desired::Left { .. })
            && (self.awaiting_connect || self.until.is_some_and(|u| now < u));
        if waits {
            self.held.insert(deployment.to_owned());
        }
        waits
    }

    /// When the held removals are due (None: nothing held, or not connected yet).
    fn due(&self) -> Option<tokio::time::Instant> {
        match (self.held.is_empty(), self.awaiting_connect) {
            (false, false) => self.until,
            _ => None,
        }
    }

    /// The held deployments, to decide again.
    fn take(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.held)
    }
}

/// End-to-end delivery: applies the bridge's confirmations to the outbox and resends what the
/// bridge has not confirmed when it asks (after it reconnects) or when confirmation stalls.
#[derive(Clone)]
struct Confirmer {
    outbox: Outbox,
    link: roost_runtime::LinkHandle,
    topic: String,
    /// (confirmed roostseq, when it last advanced)
    state: Arc<std::sync::Mutex<(u64, Option<tokio::time::Instant>)>>,
}

impl Confirmer {
    async fn handle(&self, payload: &[u8]) {
        let Ok(c) = serde_json::from_slice::<roost_schemas::Confirmation>(payload) else {
            warn!(
                reason = "malformed",
                "unreadable delivery confirmation; ignored"
            );
            return;
        };
        let upto = c.roostseq;
        // A confirmation of roostseqs this agent never produced is forged (anyone on the edge
        // broker can publish here) or comes from a bridge whose watermark outlived this
        // agent's outbox: deleting on it could drop events the bridge never got, so it is
        // ignored as a whole. (A forgery within range cannot be told apart; the edge broker's
        // ACLs must keep others off the ack topic.)
        let plausible = match self.outbox.stats().await {
            Ok(stats) if upto > stats.last_roostseq => {
                warn!(
                    reason = "beyond_last_roostseq",
                    confirmed = upto,
                    last = stats.last_roostseq,
                    "delivery confirmation beyond the last event this agent produced; ignored"
                );
                false
            }
            Ok(_) => true,
            Err(error) => {
                warn!(%error, "cannot read the outbox; delivery confirmation ignored");
                false
            }
        };
        if plausible {
            if let Ok(mut st) = self.state.lock() {
                if upto > st.0 || st.1.is_none() {
                    *st = (upto, Some(tokio::time::Instant::now()));
                }
            }
            self.outbox.confirm(upto);
        }
        if c.resend {
            tracing::debug!(upto, "bridge (re)connected; resending unconfirmed events");
            let _ = self.link.rewind();
        }
    }

    /// Resends unconfirmed events when confirmation has not advanced for a while although
    /// events are waiting (the bridge lost them, e.g. with an edge broker restart). The bridge
    /// also asks for a resend whenever it connects, so this is the fallback: its interval
    /// doubles (15 s up to 15 min) while nothing is confirmed, so a long bridge outage does
    /// not pile copies of the backlog up in the edge broker.
    async fn resend_stalled(self, cancel: CancellationToken) {
        let mut backoff = ResendBackoff::default();
        let mut last_confirmed = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.interval()) => {}
            }
            let Ok(stats) = self.outbox.stats().await else {
                continue;
            };
            let (confirmed, since) = self.state.lock().map(|s| *s).unwrap_or((0, None));
            if confirmed != last_confirmed {
                last_confirmed = confirmed;
                backoff.reset();
            }
            let stalled = since.is_none_or(|t| t.elapsed() >= ResendBackoff::FIRST);
            if stats.last_roostseq > confirmed && stalled && self.link.is_connected() {
                backoff.resent();
                info!(
                    confirmed,
                    last = stats.last_roostseq,
                    retry_in_s = backoff.interval().as_secs(),
                    "confirmation stalled; resending unconfirmed events"
                );
                let _ = self.link.rewind();
            }
        }
    }
}

/// When stalled-confirmation resends happen: checks every 15 s while confirmation advances;
/// each resend doubles the wait, up to 15 min, so a long bridge outage does not pile copies
/// of the backlog up in the edge broker; an advance resets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResendBackoff {
    interval: Duration,
}

impl Default for ResendBackoff {
    fn default() -> Self {
        ResendBackoff {
            interval: Self::FIRST,
        }
    }
}

impl ResendBackoff {
    /// The first wait, and the quiet time after which confirmation counts as stalled.
    pub const FIRST: Duration = Duration::from_secs(15);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(15 * 60);

    /// The wait before the next check.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A resend happened: wait twice as long next time (at most [`Self::MAX`]).
    pub fn resent(&mut self) {
        self.interval = (self.interval * 2).min(Self::MAX);
    }

    /// Confirmation advanced: back to [`Self::FIRST`].
    pub fn reset(&mut self) {
        self.interval = Self::FIRST;
    }
}

/// The deployments' workers and what the controller needs to feed them.
struct Workers {
    ctx: Ctx<targets::AnyTarget>,
    senders: HashMap<String, watch::Sender<Desired>>,
    settle: Settle,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Receives deployment messages and the store's profile, verifies and records them, and feeds
/// each deployment's worker.
async fn controller(
    ctx: Ctx<targets::AnyTarget>,
    mut incoming: mpsc::Receiver<Incoming>,
    link: LinkHandle,
    confirmer: Confirmer,
    kick: Arc<tokio::sync::Notify>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let topics = ctx.cfg.topics();
    let store = ctx.cfg.file.store.clone();
    let profile_topic = topics.profile(&store);
    let confirm = ctx.cfg.file.confirm_via_bridge.unwrap_or(true);
    let mut w = Workers {
        ctx,
        senders: HashMap::new(),
        settle: Settle::new(),
        tracker,
        cancel: cancel.clone(),
    };
    let mut connected = link.connected();
    let mut link_alive = true;
    if *connected.borrow_and_update() {
        w.settle.connected(tokio::time::Instant::now());
    }
    // Resume every deployment known from before a restart.
    w.refresh_all();
    loop {
        let due = w.settle.due();
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connected.changed(), if link_alive => {
                match r {
                    Ok(()) if *connected.borrow_and_update() => {
                        w.settle.connected(tokio::time::Instant::now());
                    }
                    Ok(()) => {}
                    Err(_) => link_alive = false,
                }
                continue;
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                for d in w.settle.take() {
                    w.refresh(&d);
                }
                continue;
            }
            m = incoming.recv() => match m { Some(m) => m, None => return },
        };
        if msg.topic == confirmer.topic {
            confirmer.handle(&msg.payload).await;
            continue;
        }
        if msg.topic == topics.snapshot() {
            freshness::handle_snapshot(
                &w.ctx.cfg,
                &w.ctx.ledger,
                &topics,
                &msg.topic,
                &msg.payload,
            )
            .await;
        } else if msg.topic == profile_topic {
            let policy = VerifyPolicy::of(&w.ctx.cfg, &topics, time::OffsetDateTime::now_utc());
            let accepted =
                profile::handle_profile(&policy, &w.ctx.ledger, &msg.topic, &msg.payload).await;
            if let Some(change) = accepted {
                // The builds from now on render with the new context (before anything is
                // decided again with it).
                w.ctx.personalizer.set_context(change.after.clone());
                if change.after.groups != change.before.groups {
                    let subs = subscriptions(&topics, &store, &change.after.groups, confirm);
                    if let Err(error) = link.set_subscriptions(subs) {
                        warn!(%error, "cannot change the edge subscriptions");
                    }
                    w.settle
                        .groups_changed(link.is_connected(), tokio::time::Instant::now());
                }
                // Precedence (groups) or what rendering reads may have changed.
                w.refresh_all();
            }
        } else {
            handle_message(&mut w, &topics, &msg).await;
        }
        // Desired state, the profile or the snapshot may have changed: compare again once
        // things settle.
        kick.notify_one();
    }
}

async fn handle_message(w: &mut Workers, topics: &Topics, msg: &Incoming) {
    let ctx = &w.ctx;
    if let Some(t) = topics.parse_deployment(&msg.topic) {
        // Late messages of a group the store has left (the link was told to unsubscribe).
        if scope_rank(&t.scope, &ctx.cfg.file.store, &ctx.ledger.groups()).is_none() {
            debug!(topic = %msg.topic, "not addressed to this store (a group it is not in); ignored");
            return;
        }
    }
    let policy = VerifyPolicy::of(&ctx.cfg, topics, time::OffsetDateTime::now_utc());
    let reject = |r: verify::Rejection| async move {
        warn!(topic = %msg.topic, deployment = r.deployment.as_deref(), sequence = r.sequence, reason = %r.reason, detail = %r.message, "rollout rejected");
        let events = vec![EventData::RolloutRejected(RolloutRejected {
            deployment: r.deployment,
            sequence: r.sequence,
            topic: Some(msg.topic.clone()),
            revision: None,
            scope: None,
            reason: r.reason,
            message: r.message,
            detail: None,
        })];
        ctx.metrics.events(&events);
        ctx.ledger.emit(events).await;
    };
    let verified = match verify_message(&policy, &msg.topic, &msg.payload) {
        Ok(Some(v)) => v,
        Ok(None) => {
            info!(topic = %msg.topic, "retained message cleared on the broker; keeping state");
            return;
        }
        Err(r) => return reject(r).await,
    };
    let r = &verified.rollout;
    let last = ctx.ledger.last_sequence(&r.scope, &r.deployment);
    match classify_sequence(
        last.as_ref().map(|(s, d)| (*s, d.as_str())),
        r.sequence,
        &verified.digest,
    ) {
        SequenceVerdict::Duplicate => {
            tracing::debug!(deployment = %r.deployment, sequence = r.sequence, "already accepted");
            return;
        }
        SequenceVerdict::Replay => {
            let last_seq = last.map(|l| l.0).unwrap_or(0);
            return reject(verify::Rejection {
                reason: roost_schemas::Reason::Replay,
                message: format!(
                    "sequence {} is not greater than the last accepted {last_seq}",
                    r.sequence
                ),
                deployment: Some(r.deployment.clone()),
                sequence: Some(r.sequence),
            })
            .await;
        }
        SequenceVerdict::Accept => {}
    }
    let received = EventData::RolloutReceived(RolloutReceived {
        rollout: RolloutRef::of(r),
        remove: r.remove,
        not_before: r.not_before.clone(),
    });
    if let Err(error) = ctx
        .ledger
        .accept(r, &verified.digest, &msg.payload, received)
        .await
    {
        warn!(error = %roost_runtime::error_chain(&error), "cannot record accepted rollout; dropping (it is retained and comes again)");
        return;
    }
    let deployment = r.deployment.clone();
    w.refresh(&deployment);
}

impl Workers {
    /// Decides every known deployment again (at start, and after a new profile).
    fn refresh_all(&mut self) {
        for d in self.ctx.ledger.deployments() {
            self.refresh(&d);
        }
    }

    /// Recomputes a deployment's desired state from its slots, with the groups in force and
    /// the store context, and hands it to its worker.
    fn refresh(&mut self, deployment: &str) {
        let ctx = &self.ctx;
        let slots = ctx.ledger.slots(deployment);
        let context = ctx.ledger.store_context();
        let desired = match resolve(&slots, &context.store, &context.groups) {
            Desired::Apply { rollout, .. } => Desired::Apply {
                context: profile::context_for(&rollout, &context, ctx.ledger.bootstrap()),
                rollout,
            },
            other => other,
        };
        if self
            .settle
            .hold(deployment, &desired, tokio::time::Instant::now())
        {
            debug!(%deployment, "only groups the store left have it; removal waits for the new subscriptions to settle");
            return;
        }
        spawn_or_send(
            ctx,
            deployment,
            desired,
            &mut self.senders,
            &self.tracker,
            &self.cancel,
        );
    }
}

/// Hands `desired` to the deployment's worker, starting the worker if there is none.
fn spawn_or_send(
    ctx: &Ctx<targets::AnyTarget>,
    deployment: &str,
    desired: Desired,
    workers: &mut HashMap<String, watch::Sender<Desired>>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    match workers.get(deployment) {
        Some(tx) => {
            tx.send_if_modified(|cur| {
                if *cur != desired {
                    *cur = desired.clone();
                    true
                } else {
                    false
                }
            });
        }
        None => {
            let (tx, rx) = watch::channel(desired);
            workers.insert(deployment.to_owned(), tx);
            // The worker records the wanted revision and sequence on it as they change, so
            // every line it logs carries them as fields.
            let span = tracing::info_span!(
                "deployment",
                deployment = %deployment,
                revision = tracing::field::Empty,
                sequence = tracing::field::Empty
            );
            tracker.spawn(
                reconcile::run_worker(ctx.clone(), deployment.to_owned(), rx, cancel.clone())
                    .instrument(span),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{freshness::SETTLE, Desired, ResendBackoff, Settle};
    use roost_schemas::{Rollout, Scope};
    use std::time::Duration;
    use tokio::time::Instant;

    fn left() -> Desired {
        let r: Rollout = serde_json::from_value(serde_json::json!({
            "deployment": "web", "scope": {"group": "us-east"}, "sequence": 1,
            "issued_at": "2026-12-06T03:00:00Z", "remove": true,
        }))
        .expect("rollout");
        assert_eq!(r.scope, Scope::Group("us-east".into()));
        Desired::Left {
            rollout: Box::new(r),
        }
    }

    /// A removal because the store left a group waits until the link has subscribed with the
    /// groups in force and SETTLE has passed (at start, and after each change); nothing else
    /// ever waits.
    #[test]
    fn removals_of_left_groups_wait_for_the_subscriptions_to_settle() {
        let t0 = Instant::now();
        let mut s = Settle::new();
        assert!(!s.hold("other", &Desired::Unknown, t0), "only Left waits");
        assert!(s.hold("web", &left(), t0), "not connected yet");
        assert_eq!(s.due(), None, "due only once connected");
        s.connected(t0 + Duration::from_secs(5));
        assert_eq!(s.due(), Some(t0 + Duration::from_secs(5) + SETTLE));
        assert!(s.hold("web", &left(), t0 + Duration::from_secs(6)));
        assert_eq!(s.take().into_iter().collect::<Vec<_>>(), ["web"]);
        assert_eq!(s.due(), None, "nothing held");
        let settled = t0 + Duration::from_secs(5) + SETTLE;
        assert!(!s.hold("web", &left(), settled), "settled: removed now");
        // A reconnect without a change does not hold again.
        s.connected(settled + Duration::from_secs(1));
        assert!(!s.hold("web", &left(), settled + Duration::from_secs(1)));
        // The groups change while connected: wait SETTLE from the change.
        let t1 = settled + Duration::from_secs(10);
        s.groups_changed(true, t1);
        assert!(s.hold("web", &left(), t1 + Duration::from_secs(1)));
        assert_eq!(s.due(), Some(t1 + SETTLE));
        assert!(!s.hold("web", &left(), t1 + SETTLE));
        // … while disconnected: wait for the connection, then SETTLE.
        let t2 = t1 + Duration::from_secs(60);
        s.groups_changed(false, t2);
        assert!(s.hold("web", &left(), t2 + Duration::from_secs(600)));
        assert_eq!(s.due(), None);
        s.connected(t2 + Duration::from_secs(700));
        assert_eq!(s.due(), Some(t2 + Duration::from_secs(700) + SETTLE));
    }

    /// A bridge that never confirms for an hour: resends at 15 s, then waits 30 s, 60 s, …
    /// up to 15 min; confirmation advancing resets the wait. Under paused time, so the test
    /// checks the schedule itself, not the machine's speed.
    #[tokio::test(start_paused = true)]
    async fn stalled_resends_back_off_from_15_s_to_15_min() {
        let t0 = tokio::time::Instant::now();
        let mut b = ResendBackoff::default();
        let mut at = Vec::new();
        while t0.elapsed() < Duration::from_secs(3600) {
            tokio::time::sleep(b.interval()).await;
            at.push(t0.elapsed().as_secs());
            b.resent();
        }
        assert_eq!(at, vec![15, 45, 105, 225, 465, 945, 1845, 2745, 3645]);
        assert_eq!(b.interval(), ResendBackoff::MAX);
        b.reset();
        assert_eq!(b.interval(), ResendBackoff::FIRST);
    }
}
