//! The roost store agent: verifies signed rollouts from the store's edge broker, fetches the
//! wanted Git revision, applies it to a target, watches for drift and reports everything back
//! through a durable outbox (events) and a retained status document.

pub mod config;
pub mod decide;
pub mod freshness;
pub mod git;
pub mod git_https;
pub mod ledger;
pub mod metrics;
pub mod personalize;
pub mod reconcile;
pub mod targets;
pub mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use roost_runtime::outbox::OverflowTarget;
use roost_runtime::{Incoming, Link, Outbox, OutboxConfig};
use roost_schemas::payload::{RolloutReceived, RolloutRejected};
use roost_schemas::{EventData, RolloutRef};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument as _};

pub use config::AgentConfig;
use decide::{classify_sequence, resolve, Desired, SequenceVerdict};
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
    let ledger =
        ledger::Ledger::open(outbox.clone(), topics.events(&store), cfg.event_source()).await?;
    let target = Arc::new(build_target(&cfg).await?);
    let identity = personalize::sealed::load_identity(&cfg).map_err(AgentError::Identity)?;
    match &identity {
        Some(id) => info!(recipient = %id.recipient(), "age identity loaded"),
        None => info!(
            path = %personalize::sealed::identity_path(&cfg).display(),
            "no age identity: sealed files are not for this store"
        ),
    }
    let personalizer =
        personalize::Personalizer::new(personalize::StoreContext::from_config(&cfg.file), identity);
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
    lc.subscriptions = topics.store_deployment_filters(&store, &cfg.file.groups);
    lc.subscriptions.push(topics.snapshot());
    let confirm = cfg.file.confirm_via_bridge.unwrap_or(true);
    if confirm {
        // Events stay in the outbox until the bridge confirms it has them durably: a PUBACK
        // from the edge broker only means they are in its memory.
        lc.confirm_events = true;
        lc.subscriptions.push(topics.ack(&store));
    }
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
        cfg: cfg.clone(),
        ledger: ledger.clone(),
        git,
        target,
        metrics,
        personalizer,
    };
    info!(%store, groups = ?cfg.file.groups, "agent starting");
    tracker.spawn(
        ledger
            .clone()
            .run_status_publisher(
                topics.status(&store),
                store.clone(),
                cfg.file.groups.clone(),
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
            cfg.file.groups.clone(),
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

/// Receives deployment messages, verifies and records them, and feeds each deployment's worker.
async fn controller(
    ctx: Ctx<targets::AnyTarget>,
    mut incoming: mpsc::Receiver<Incoming>,
    confirmer: Confirmer,
    kick: Arc<tokio::sync::Notify>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let mut workers: HashMap<String, watch::Sender<Desired>> = HashMap::new();
    // Resume every deployment known from before a restart.
    for d in ctx.ledger.deployments() {
        refresh(&ctx, &d, &mut workers, &tracker, &cancel);
    }
    let topics = ctx.cfg.topics();
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = incoming.recv() => match m { Some(m) => m, None => return },
        };
        if msg.topic == confirmer.topic {
            confirmer.handle(&msg.payload).await;
            continue;
        }
        if msg.topic == topics.snapshot() {
            freshness::handle_snapshot(&ctx.cfg, &ctx.ledger, &topics, &msg.topic, &msg.payload)
                .await;
        } else {
            handle_message(&ctx, &topics, &msg, &mut workers, &tracker, &cancel).await;
        }
        // Desired state or the snapshot may have changed: compare again once things settle.
        kick.notify_one();
    }
}

async fn handle_message(
    ctx: &Ctx<targets::AnyTarget>,
    topics: &roost_schemas::Topics,
    msg: &Incoming,
    workers: &mut HashMap<String, watch::Sender<Desired>>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
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
    refresh(ctx, &r.deployment, workers, tracker, cancel);
}

/// Recomputes a deployment's desired state from its slots and hands it to its worker.
fn refresh(
    ctx: &Ctx<targets::AnyTarget>,
    deployment: &str,
    workers: &mut HashMap<String, watch::Sender<Desired>>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    let slots = ctx.ledger.slots(deployment);
    let desired = resolve(&slots, &ctx.cfg.file.store, &ctx.cfg.file.groups);
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
    use super::ResendBackoff;
    use std::time::Duration;

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
