//! The roost store bridge: carries one store's topics between its edge broker and the cloud
//! broker. Downward, desired-state envelopes (fleet, the store's groups, the store), the
//! signed fleet snapshot and the store's profile are kept in SQLite and republished retained
//! on the edge, also after the edge broker restarts; the groups are the profile's once one
//! arrived (the configured ones before). Upward,
//! the store's status and events are committed to a SQLite outbox before the edge broker gets
//! its PUBACK and leave for the cloud in order, deleted only once the fleet database confirms
//! them end to end ([`confirm`]; until the first confirmation for the store, at the cloud's
//! PUBACK).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod confirm;
pub mod groups;
pub mod metrics;
pub mod upward;

use futures::stream::{FuturesOrdered, StreamExt as _};
use roost_runtime::outbox::{Payload, StateWrite};
use roost_runtime::{DirectMessage, Incoming, Link, NewMessage, Outbox, OutboxConfig, Will};
use roost_schemas::{validate_name, Presence, PresenceState, Topics};
use rusqlite::{params, Connection};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

pub use metrics::BridgeMetrics;
pub use upward::{
    check_upward, DropReason, IntervalSet, Upward, UpwardCheck, UpwardStats, Watermark,
};

/// Errors of the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Configuration problems.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The desired-state store failed.
    #[error("bridge database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A value in the desired-state store is unreadable (or cannot be written as JSON).
    #[error("bridge database: unreadable {what}")]
    Stored {
        /// What.
        what: &'static str,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] roost_runtime::OutboxError),
    /// A link failed to start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] roost_runtime::MetricsError),
    /// A blocking database job panicked.
    #[error("bridge database job")]
    Join(#[from] tokio::task::JoinError),
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

pub use roost_runtime::Endpoint;

/// The bridge configuration file (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Store name.
    pub store: String,
    /// The store's groups: a bootstrap default, used until the first store profile arrives
    /// (then the profile's groups count, also after a restart).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Topic prefix.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// The store's edge broker.
    pub edge: Endpoint,
    /// The cloud broker.
    pub cloud: Endpoint,
    /// Outbox disk cap in MiB (default 256). When full, the bridge stops acknowledging the
    /// edge broker (back-pressure) rather than dropping events; the agent's outbox reports loss.
    #[serde(default)]
    pub outbox_max_mib: Option<u64>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`roost bridge --metrics-listen`).
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl BridgeConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<BridgeConfig, BridgeError> {
        let text = std::fs::read_to_string(path).map_err(|source| BridgeError::Io {
            path: path.to_owned(),
            source,
        })?;
        let cfg: BridgeConfig = toml::from_str(&text)
            .map_err(|e| BridgeError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks names, ports, credentials and the TLS files.
    pub fn validate(&self) -> Result<(), BridgeError> {
        validate_name(&self.store).map_err(|e| BridgeError::Config(format!("store: {e}")))?;
        for g in &self.groups {
            validate_name(g).map_err(|e| BridgeError::Config(format!("groups: {e}")))?;
        }
        // Ports, credentials and TLS files (readable, PEM), naming the field.
        self.edge
            .validate("edge")
            .map_err(|e| BridgeError::Config(e.to_string()))?;
        self.cloud
            .validate("cloud")
            .map_err(|e| BridgeError::Config(e.to_string()))?;
        Ok(())
    }

    fn topics(&self) -> Topics {
        Topics::new(
            self.topic_prefix
                .as_deref()
                .unwrap_or(roost_schemas::topics::DEFAULT_PREFIX),
        )
    }
}

/// The delivery watermark's table in the outbox database.
const WATERMARK_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS bridge_confirmed (id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL);";

/// Where the groups the bridge follows come from, as [`DesiredStore::set_groups`] records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupSource {
    /// As stored already (at start: the last profile's, else the configured ones).
    AsStored,
    /// A store profile names them: stored, so they count after a restart too.
    Profile,
    /// A store profile names none: the configured groups count (also after a restart, and
    /// as the configuration changes); nothing is stored.
    Configured,
}

/// Last desired-state envelope per topic, so the edge can be restored after a restart, and
/// the groups of the last store profile the bridge followed.
///
/// Two copies with one writer: the SQLite table (durable; written only on blocking threads,
/// where a commit may wait for an fsync) and an in-memory copy of it, updated after each
/// commit. The link task's connect callback reads the memory copy only: it must never wait
/// for a lock that a writer holds across an fsync, or for SQLite at all.
#[derive(Clone)]
struct DesiredStore {
    conn: Arc<Mutex<Connection>>,
    latest: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Topics this process cleared (groups the store left): cleared on the edge again at
    /// every connect, in case the edge broker still retains them.
    cleared: Arc<Mutex<BTreeSet<String>>>,
    /// The legacy `confirmed` watermark as it was at open (read once, at start).
    confirmed_at_open: u64,
    /// The groups of the last profile followed, as they were at open.
    groups_at_open: Option<Vec<String>>,
}

impl DesiredStore {
    /// Opens (creating) the store and reads what it holds, before any task starts.
    fn open(path: &Path) -> Result<DesiredStore, BridgeError> {
        let conn = roost_runtime::sqlite::open_durable(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS desired (topic TEXT PRIMARY KEY, payload BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS confirmed (id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS profile_groups (id INTEGER PRIMARY KEY CHECK (id = 1), groups TEXT NOT NULL);",
        )?;
        let latest = {
            let mut stmt = conn.prepare("SELECT topic, payload FROM desired")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<BTreeMap<String, Vec<u8>>, _>>()?
        };
        let confirmed_at_open = conn
            .query_row("SELECT upto FROM confirmed WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| v as u64)
            .unwrap_or(0);
        let groups_at_open =
            match conn.query_row("SELECT groups FROM profile_groups WHERE id = 1", [], |r| {
                r.get::<_, String>(0)
            }) {
                Ok(json) => {
                    Some(
                        serde_json::from_str(&json).map_err(|source| BridgeError::Stored {
                            what: "profile groups",
                            source,
                        })?,
                    )
                }
                Err(rusqlite::Error::QueryReturnedNoRows) => None,
                Err(e) => return Err(e.into()),
            };
        Ok(DesiredStore {
            conn: Arc::new(Mutex::new(conn)),
            latest: Arc::new(Mutex::new(latest)),
            cleared: Arc::default(),
            confirmed_at_open,
            groups_at_open,
        })
    }

    /// Follows `groups`: in one transaction, records where they come from (`source`) and
    /// deletes the stored deployment topics of every other group. Returns the deleted topics
    /// (to clear on the edge broker too).
    async fn set_groups(
        &self,
        topics: Topics,
        groups: Vec<String>,
        source: GroupSource,
    ) -> Result<Vec<String>, BridgeError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.set_groups_blocking(&topics, &groups, source))
            .await?
    }

    fn set_groups_blocking(
        &self,
        topics: &Topics,
        groups: &[String],
        source: GroupSource,
    ) -> Result<Vec<String>, BridgeError> {
        let left: Vec<String> = {
            let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
            latest
                .keys()
                .filter(|t| groups::is_left(topics, groups, t))
                .cloned()
                .collect()
        };
        {
            let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let tx = c.transaction()?;
            match source {
                GroupSource::AsStored => {}
                GroupSource::Profile => {
                    let json =
                        serde_json::to_string(groups).map_err(|source| BridgeError::Stored {
                            what: "profile groups",
                            source,
                        })?;
                    tx.execute(
                        "INSERT INTO profile_groups(id, groups) VALUES (1, ?1)
                         ON CONFLICT(id) DO UPDATE SET groups = excluded.groups",
                        [json],
                    )?;
                }
                GroupSource::Configured => {
                    tx.execute("DELETE FROM profile_groups", [])?;
                }
            }
            for t in &left {
                tx.execute("DELETE FROM desired WHERE topic = ?1", [t])?;
            }
            tx.commit()?;
        }
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let mut cleared = self.cleared.lock().unwrap_or_else(|p| p.into_inner());
        for t in &left {
            latest.remove(t);
            cleared.insert(t.clone());
        }
        Ok(left)
    }

    /// Stores `payload` as the desired state of `topic` (an empty payload deletes it) on a
    /// blocking thread: a durable commit waits for an fsync, which must not stall the async
    /// runtime. The memory copy changes only after the commit.
    async fn put(&self, topic: String, payload: Vec<u8>) -> Result<(), BridgeError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.put_blocking(topic, payload)).await?
    }

    fn put_blocking(&self, topic: String, payload: Vec<u8>) -> Result<(), BridgeError> {
        {
            let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            if payload.is_empty() {
                c.execute("DELETE FROM desired WHERE topic = ?1", [&topic])?;
            } else {
                c.execute(
                    "INSERT INTO desired(topic, payload) VALUES (?1, ?2)
                     ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload",
                    params![topic, payload],
                )?;
            }
        }
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if payload.is_empty() {
            latest.remove(&topic);
        } else {
            self.cleared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&topic);
            latest.insert(topic, payload);
        }
        Ok(())
    }

    /// Every stored desired-state message, by topic, and an empty retained message for every
    /// topic cleared since the start: from memory, no I/O.
    fn all(&self) -> Vec<DirectMessage> {
        let cleared = self.cleared.lock().unwrap_or_else(|p| p.into_inner());
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        cleared
            .iter()
            .map(|topic| (topic, &[][..]))
            .chain(latest.iter().map(|(topic, payload)| (topic, &payload[..])))
            .map(|(topic, payload)| DirectMessage {
                topic: topic.clone(),
                payload: payload.to_vec(),
                retain: true,
            })
            .collect()
    }
}

fn presence(state: PresenceState) -> Vec<u8> {
    serde_json::to_vec(&Presence {
        state,
        since: roost_schemas::now_rfc3339(),
    })
    .unwrap_or_default()
}

fn confirmation(upto: u64, resend: bool) -> Vec<u8> {
    serde_json::to_vec(&roost_schemas::Confirmation {
        roostseq: upto,
        resend,
    })
    .unwrap_or_default()
}

/// What goes up for a checked message: status (retained, last value wins) or an event.
/// Takes the payload out of `m` (only its acknowledgement is needed afterwards).
fn upward(m: &mut Incoming, kind: &Upward) -> Option<NewMessage> {
    match kind {
        Upward::Status => Some(NewMessage::retained(
            m.topic.clone(),
            std::mem::take(&mut m.payload),
        )),
        Upward::Event { roostseq, .. } => Some(NewMessage {
            topic: m.topic.clone(),
            payload: Payload::Bytes {
                data: std::mem::take(&mut m.payload),
                roostseq: Some(*roostseq),
            },
            retain: false,
            compact: false,
        }),
        // The bridge states presence itself (birth and last will); it does not subscribe
        // to the edge's presence topic, and would not forward one from there.
        Upward::Presence => None,
    }
}

/// Most messages checked and submitted as one burst.
const BURST_MAX: usize = 512;
/// Outbox messages in flight to the cloud broker (unacknowledged publishes), at most.
const CLOUD_WINDOW: usize = 256;
/// Bursts submitted to the outbox and not yet durable, at most.
const COMMITS_IN_FLIGHT: usize = 8;

/// A burst submitted to the outbox: the edge messages to acknowledge once it is durable, and
/// the watermark it commits.
struct Burst {
    taken: Vec<Incoming>,
    next: Watermark,
    advanced: Option<u64>,
}

/// Runs the bridge until `cancel` fires.
pub async fn run(cfg: BridgeConfig, cancel: CancellationToken) -> Result<(), BridgeError> {
    run_with(cfg, cancel, Arc::default()).await
}

/// Runs the bridge until `cancel` fires, counting forwarded and dropped upward messages in
/// `stats`.
pub async fn run_with(
    cfg: BridgeConfig,
    cancel: CancellationToken,
    stats: Arc<UpwardStats>,
) -> Result<(), BridgeError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| BridgeError::Io {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let topics = cfg.topics();
    let store = cfg.store.clone();
    let desired = DesiredStore::open(&cfg.state_dir.join("bridge.db"))?;
    let mut ocfg = OutboxConfig::new(cfg.state_dir.join("bridge-outbox.db"));
    ocfg.max_bytes = cfg.outbox_max_mib.unwrap_or(256) * 1024 * 1024;
    // A burst goes to the cloud from memory once committed (not read back from SQLite): room
    // for the bursts in flight while the cloud link is slower than the edge for a moment.
    ocfg.tail_bytes = 4 * 1024 * 1024;
    let outbox = Outbox::open(ocfg)?;
    let metrics = BridgeMetrics::with_upward(stats.clone());
    // The delivery watermark lives in the outbox's database and commits in the same
    // transaction as the events it covers: one fsync per burst, and it can never claim events
    // that are not stored. (Older versions kept it in bridge.db: the higher of both counts.)
    let stored_upto = outbox
        .read(|c| -> Result<u64, rusqlite::Error> {
            c.execute_batch(WATERMARK_SCHEMA)?;
            Ok(
                c.query_row("SELECT upto FROM bridge_confirmed WHERE id = 1", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|v| v as u64)
                .unwrap_or(0),
            )
        })
        .await??;

    // The groups: the last profile's (also when it arrived before a restart), else the
    // configured ones. What the store holds of any other group goes (a crash between a
    // profile and its clean-up, or a changed configuration).
    let (mut groups, mut following) = match &desired.groups_at_open {
        Some(g) => (g.clone(), true),
        None => (cfg.groups.clone(), false),
    };
    let cleared = desired
        .set_groups(topics.clone(), groups.clone(), GroupSource::AsStored)
        .await?;
    info!(%store, ?groups, from_profile = following, cleared = cleared.len(), "groups");

    // Cloud side: desired state in, the store's outbox out; presence via birth and last will.
    // The signed fleet snapshot and the store's profile travel down like desired state (kept,
    // retained at the edge).
    let c = &cfg.cloud;
    let mut cloud = c.link_config("cloud", &format!("roost-bridge-{store}"));
    cloud.subscriptions = groups::cloud_subscriptions(&topics, &store, &groups);
    let presence_topic = topics.presence(&store);
    cloud.will = Some(Will {
        topic: presence_topic.clone(),
        payload: presence(PresenceState::Offline),
        retain: true,
    });
    let pt = presence_topic.clone();
    cloud.on_connect = Some(Arc::new(move |_| {
        vec![DirectMessage {
            topic: pt.clone(),
            payload: presence(PresenceState::Online),
            retain: true,
        }]
    }));
    // The links stop only after the clean-stop "offline" below went out: on their own token,
    // not a child of `cancel` (which would close them the moment a signal arrives).
    let child = CancellationToken::new();
    let metrics_server = roost_runtime::metrics::serve_if(
        cfg.metrics_listen,
        |r| metrics.register(r),
        metrics.outbox.refresh_hook(outbox.clone()),
        child.clone(),
    )
    .await?;
    cloud.metrics = Some(metrics.link.clone());
    // A window of 64 unacknowledged publishes (the default) kept the cloud side waiting
    // for PUBACKs and refills under load; the cloud broker acknowledges from memory.
    cloud.window = CLOUD_WINDOW;
    cloud.tcp_nodelay = true;
    // End-to-end confirmation: once the fleet has confirmed this store's events, every event
    // stays in the outbox until a confirmation covers it (see `confirm`).
    let holding = confirm::holding_at_open(&outbox).await?;
    cloud.confirm_events = holding;
    let mut cloud_link = Link::start(cloud, Some(outbox.clone()), child.clone())?;
    let cloud_handle = cloud_link.handle.clone();
    let mut confirmations =
        confirm::Confirmations::new(outbox.clone(), cloud_handle.clone(), holding, stats.clone());
    let (holding_tx, holding_rx) = tokio::sync::watch::channel(holding);
    let stalls = tokio::spawn(
        confirm::watch_stalls(
            outbox.clone(),
            cloud_handle.clone(),
            stats.clone(),
            holding_rx,
            confirmations.advances(),
            child.clone(),
        )
        .instrument(tracing::info_span!("confirmations", %store)),
    );

    // Edge side: a persistent session, so the edge broker keeps the store's events for the
    // bridge while it restarts; acknowledged only once they are in the outbox.
    let e = &cfg.edge;
    let mut edge = e.link_config("edge", &format!("roost-bridge-{store}"));
    edge.clean_session = false;
    edge.manual_acks = true;
    edge.subscriptions = vec![topics.status(&store), topics.events(&store)];
    edge.metrics = Some(metrics.link.clone());
    // Every stored burst is a run of PUBACKs: send them as they are written.
    edge.tcp_nodelay = true;
    let d2 = desired.clone();
    // End-to-end delivery: the agent keeps each event until this bridge confirms it is in the
    // outbox here. On every edge connect the bridge states its watermark and asks for a
    // resend of anything later (the edge broker may have lost it, e.g. in a restart).
    let watermark = Arc::new(Mutex::new(Watermark::new(
        desired.confirmed_at_open.max(stored_upto),
    )));
    let ack_topic = topics.ack(&store);
    let (w2, t2) = (watermark.clone(), ack_topic.clone());
    edge.on_connect = Some(Arc::new(move |_| {
        let upto = w2.lock().map(|w| w.upto()).unwrap_or(0);
        let mut msgs = d2.all();
        msgs.push(DirectMessage {
            topic: t2.clone(),
            payload: confirmation(upto, true),
            retain: true,
        });
        msgs
    }));
    let mut edge_link = Link::start(edge, None, child.clone())?;
    info!(%store, "bridge starting");

    let edge_handle = edge_link.handle.clone();
    let down_count = metrics.down.clone();
    let down = {
        let topics = topics.clone();
        let child = child.clone();
        let own = store.clone();
        let cloud_handle = cloud_handle.clone();
        let profile_topic = topics.profile(&own);
        let configured = cfg.groups.clone();
        let confirmed_topic = topics.confirmed(&own);
        async move {
            loop {
                let m = tokio::select! {
                    _ = child.cancelled() => break,
                    m = cloud_link.incoming.recv() => match m { Some(m) => m, None => break },
                };
                if m.topic == confirmed_topic {
                    confirmations.receive(&m.payload).await;
                    holding_tx.send_replace(confirmations.holding());
                    continue;
                }
                if !groups::is_downward(&topics, &own, &groups, &m.topic) {
                    debug!(topic = %m.topic, "not carried down (not this store's, or a group it left)");
                    continue;
                }
                let (topic, payload) = (m.topic.clone(), m.payload.clone());
                if let Err(error) = desired.put(topic, payload).await {
                    warn!(%error, topic = %m.topic, "cannot store desired state");
                }
                debug!(topic = %m.topic, bytes = m.payload.len(), "down");
                down_count.inc();
                let _ = edge_handle.publish(DirectMessage {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    retain: true,
                });
                if m.topic != profile_topic {
                    continue;
                }
                let (next, follow) = match groups::profile_groups(&own, &m.payload) {
                    Ok(groups::ProfileGroups::Named(next)) => (next, GroupSource::Profile),
                    Ok(groups::ProfileGroups::Configured) => {
                        (configured.clone(), GroupSource::Configured)
                    }
                    Ok(groups::ProfileGroups::Cleared) => continue,
                    Err(error) => {
                        warn!(error = %roost_runtime::error_chain(&error), ?groups, "store profile not followed; keeping the groups");
                        continue;
                    }
                };
                if following == (follow == GroupSource::Profile) && next == groups {
                    continue;
                }
                // Subscribe to the new groups first, then forget the old ones: the store and
                // the edge broker hold nothing of a group the store left, so no reconnect or
                // restart brings its rollouts back.
                info!(from = ?groups, to = ?next, source = ?follow, "the store profile changes the groups");
                groups = next;
                following = follow == GroupSource::Profile;
                let _ = cloud_handle
                    .set_subscriptions(groups::cloud_subscriptions(&topics, &own, &groups));
                match desired.set_groups(topics.clone(), groups.clone(), follow).await {
                    Ok(left) => {
                        for topic in left {
                            debug!(%topic, "cleared: a group the store left");
                            let _ = edge_handle.publish(DirectMessage {
                                topic,
                                payload: Vec::new(),
                                retain: true,
                            });
                        }
                    }
                    Err(error) => {
                        warn!(error = %roost_runtime::error_chain(&error), "cannot store the profile's groups");
                    }
                }
            }
        }
        .instrument(tracing::info_span!("down", %store))
    };
    let edge_handle = edge_link.handle.clone();
    let store_up = store.clone();
    let up = {
        let topics = topics.clone();
        let child = child.clone();
        let outbox = outbox.clone();
        let check = UpwardCheck::new(&topics, &store_up);
        async move {
            // Group commit, pipelined: a burst goes to the outbox writer and the next burst is
            // read and checked while it is written (the writer puts everything waiting into
            // one transaction and one fsync). Each burst is acknowledged to the edge, in
            // order, only once its own commit is durable.
            let mut commits = FuturesOrdered::new();
            // The watermark over everything submitted (committed or not); the shared one
            // (stated on every edge connect) only ever holds committed events.
            let mut pending = watermark.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut guard = outbox.commit_guard();
            // A commit failed: submit nothing until every commit in flight is done, then
            // start again from the committed watermark.
            let mut resync = false;
            loop {
                tokio::select! {
                    biased;
                    _ = child.cancelled() => break,
                    Some((stored, done)) = commits.next(), if !commits.is_empty() => {
                        let done: Burst = done;
                        match stored {
                            Ok(_) => {
                                stats.forwarded_many(done.taken.len());
                                edge_handle.ack_all(&done.taken);
                                *watermark.lock().unwrap_or_else(|p| p.into_inner()) = done.next;
                                if let Some(upto) = done.advanced {
                                    let _ = edge_handle.publish(DirectMessage {
                                        topic: ack_topic.clone(),
                                        payload: confirmation(upto, false),
                                        retain: true,
                                    });
                                }
                            }
                            Err(error) => {
                                // Not acknowledged: the edge broker delivers them again.
                                warn!(%error, count = done.taken.len(), "cannot store upward messages; not acknowledging");
                                resync = true;
                            }
                        }
                        if resync && commits.is_empty() {
                            pending = watermark.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            guard = outbox.commit_guard();
                            resync = false;
                        }
                    }
                    m = edge_link.incoming.recv(), if !resync && commits.len() < COMMITS_IN_FLIGHT => {
                        let Some(first) = m else { break };
                        // Take whatever else is already waiting.
                        let mut batch = vec![first];
                        while batch.len() < BURST_MAX {
                            match edge_link.incoming.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
                        let mut msgs = Vec::with_capacity(batch.len());
                        let mut taken = Vec::with_capacity(batch.len());
                        let mut next = pending.clone();
                        let mut advanced = false;
                        for mut m in batch {
                            let checked = check.check(&m.topic, &m.payload);
                            match checked.as_ref().ok().and_then(|k| upward(&mut m, k).map(|n| (n, k))) {
                                Some((msg, kind)) => {
                                    if let Upward::Event { roostseq, lost } = kind {
                                        advanced |= next.add_event(*roostseq, lost);
                                    }
                                    msgs.push(msg);
                                    taken.push(m);
                                }
                                None => {
                                    // Acknowledged so the edge broker does not redeliver it;
                                    // never forwarded and never counted towards a
                                    // confirmation.
                                    if let Err(d) = &checked {
                                        stats.dropped_one(d.reason);
                                        warn!(reason = %d.reason, topic = ?m.topic, bytes = m.payload.len(), detail = %d.detail, "upward message dropped");
                                    }
                                    edge_handle.ack(&m);
                                }
                            }
                        }
                        if msgs.is_empty() {
                            continue;
                        }
                        // The watermark after this burst commits with it. It builds on the
                        // bursts before it, so it must not commit if one of them failed: the
                        // write checks that no commit failed since `pending` was in sync.
                        let upto = next.upto();
                        let advanced = advanced.then_some(upto);
                        let guard = guard.clone();
                        let write: StateWrite = Box::new(move |c| {
                            if !guard.intact() {
                                return Err("an earlier upward commit failed".into());
                            }
                            if advanced.is_some() {
                                c.execute(
                                    "INSERT INTO bridge_confirmed(id, upto) VALUES (1, ?1)
                                     ON CONFLICT(id) DO UPDATE SET upto = excluded.upto",
                                    [upto as i64],
                                )?;
                            }
                            Ok(())
                        });
                        let stored = match outbox.submit(msgs, Some(write)) {
                            Ok(s) => s,
                            Err(error) => {
                                warn!(%error, count = taken.len(), "cannot store upward messages; not acknowledging");
                                continue;
                            }
                        };
                        pending = next.clone();
                        let done = Burst { taken, next, advanced };
                        commits.push_back(async move { (stored.await, done) });
                    }
                }
            }
        }
        .instrument(tracing::info_span!("up", %store))
    };
    let down = tokio::spawn(down);
    let up = tokio::spawn(up);
    cancel.cancelled().await;
    // A clean stop says so; the last will covers a crash or a lost link. Direct messages are
    // not tracked to their PUBACK (and must not wait in the outbox, where a stale "offline"
    // would follow the next start's "online"), so give it a moment to leave.
    if cloud_handle.is_connected() {
        let _ = cloud_handle.publish(DirectMessage {
            topic: presence_topic.clone(),
            payload: presence(PresenceState::Offline),
            retain: true,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    child.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = down.await;
        let _ = up.await;
        let _ = stalls.await;
        let _ = cloud_link.task.await;
        let _ = edge_link.task.await;
        if let Some(server) = metrics_server {
            let _ = server.await;
        }
    })
    .await;
    info!("bridge stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn desired_state_is_kept_across_a_reopen_and_read_without_touching_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.db");
        let store = DesiredStore::open(&path).expect("open");
        store.put("t/b".into(), b"2".to_vec()).await.expect("put");
        store.put("t/a".into(), b"1".to_vec()).await.expect("put");
        store.put("t/c".into(), b"3".to_vec()).await.expect("put");
        store.put("t/c".into(), Vec::new()).await.expect("delete");
        let topics = |msgs: Vec<DirectMessage>| -> Vec<(String, Vec<u8>)> {
            msgs.into_iter().map(|m| (m.topic, m.payload)).collect()
        };
        let want = vec![
            ("t/a".to_owned(), b"1".to_vec()),
            ("t/b".to_owned(), b"2".to_vec()),
        ];
        assert_eq!(topics(store.all()), want);
        // The connect callback's read must not wait for a writer that holds the database
        // (through an fsync): with the connection locked elsewhere, `all` still answers.
        let held = store.conn.lock().expect("lock");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = store.clone();
        std::thread::spawn(move || {
            let _ = tx.send(reader.all());
        });
        let read = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("all() answered while the database was held");
        assert_eq!(topics(read), want);
        drop(held);
        drop(store);
        let again = DesiredStore::open(&path).expect("reopen");
        assert_eq!(topics(again.all()), want);
    }

    /// Following a profile's groups deletes the stored rollouts of the groups left (and says
    /// to clear them on the edge at every connect), in one transaction with the groups, which
    /// survive a reopen; the configured groups are never stored.
    #[tokio::test]
    async fn the_groups_followed_survive_a_reopen_and_left_groups_are_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.db");
        let t = Topics::default();
        let east = "roost/v1/groups/us-east/deployments/web".to_owned();
        let south = "roost/v1/groups/us-south/deployments/web".to_owned();
        let fleet = "roost/v1/fleet/deployments/web".to_owned();
        let store = DesiredStore::open(&path).expect("open");
        assert_eq!(store.groups_at_open, None);
        for topic in [&east, &south, &fleet] {
            store
                .put(topic.clone(), b"env".to_vec())
                .await
                .expect("put");
        }
        let left = store
            .set_groups(
                t.clone(),
                vec!["us-east".into(), "us-south".into()],
                GroupSource::AsStored,
            )
            .await
            .expect("configured");
        assert!(left.is_empty());
        let left = store
            .set_groups(t.clone(), vec!["us-south".into()], GroupSource::Profile)
            .await
            .expect("follow");
        assert_eq!(left, std::slice::from_ref(&east));
        let all: Vec<(String, usize)> = store
            .all()
            .into_iter()
            .map(|m| (m.topic, m.payload.len()))
            .collect();
        assert_eq!(
            all,
            [(east.clone(), 0), (fleet.clone(), 3), (south.clone(), 3)],
            "the left group's topic is cleared on the edge"
        );
        // Stored again (the store rejoined the group): no longer cleared; and left again.
        store.put(east.clone(), b"env".to_vec()).await.expect("put");
        assert!(store.all().iter().all(|m| !m.payload.is_empty()));
        let left = store
            .set_groups(t.clone(), vec!["us-south".into()], GroupSource::Profile)
            .await
            .expect("follow");
        assert_eq!(left, std::slice::from_ref(&east));
        drop(store);
        let again = DesiredStore::open(&path).expect("reopen");
        assert_eq!(again.groups_at_open, Some(vec!["us-south".to_owned()]));
        let topics: Vec<String> = again.all().into_iter().map(|m| m.topic).collect();
        assert_eq!(topics, [fleet, south]);
        // A profile that names no groups: the configured ones count again, after a restart too.
        again
            .set_groups(t.clone(), vec!["us-east".into()], GroupSource::Configured)
            .await
            .expect("configured");
        drop(again);
        assert_eq!(
            DesiredStore::open(&path).expect("reopen").groups_at_open,
            None
        );
    }
}
