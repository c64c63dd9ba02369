//! The roost store bridge: carries one store's topics between its edge broker and the cloud
//! broker. Downward, desired-state envelopes (fleet, the store's groups, the store) are kept in
//! SQLite and republished retained on the edge, also after the edge broker restarts. Upward,
//! the store's status and events are committed to a SQLite outbox before the edge broker gets
//! its PUBACK and leave for the cloud in order, deleted only after the cloud's PUBACK.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_runtime::outbox::Payload;
use roost_runtime::{
    DirectMessage, Incoming, Link, LinkConfig, NewMessage, Outbox, OutboxConfig, Will,
};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{validate_name, Presence, PresenceState, Scope, Topics};
use rusqlite::{params, Connection};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

/// Errors of the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// Configuration problems.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The desired-state store failed.
    #[error("bridge database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] roost_runtime::OutboxError),
    /// A link failed to start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
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

/// One broker endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Host.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port.
    pub port: u16,
    /// Username.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keepalive seconds (a blackholed link is noticed within ~1.5× this).
    #[serde(default)]
    pub keep_alive_s: Option<u64>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

/// The bridge configuration file (TOML).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Store name.
    pub store: String,
    /// The store's groups.
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

    /// Checks names and ports.
    pub fn validate(&self) -> Result<(), BridgeError> {
        validate_name(&self.store).map_err(|e| BridgeError::Config(format!("store: {e}")))?;
        for g in &self.groups {
            validate_name(g).map_err(|e| BridgeError::Config(format!("groups: {e}")))?;
        }
        if self.edge.port == 0 || self.cloud.port == 0 {
            return Err(BridgeError::Config(
                "edge.port and cloud.port must be set".into(),
            ));
        }
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

/// Last desired-state envelope per topic, so the edge can be restored after a restart.
#[derive(Clone)]
struct DesiredStore {
    conn: Arc<Mutex<Connection>>,
}

impl DesiredStore {
    fn open(path: &Path) -> Result<DesiredStore, BridgeError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS desired (topic TEXT PRIMARY KEY, payload BLOB NOT NULL)",
        )?;
        Ok(DesiredStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn put(&self, topic: &str, payload: &[u8]) -> Result<(), BridgeError> {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if payload.is_empty() {
            c.execute("DELETE FROM desired WHERE topic = ?1", [topic])?;
        } else {
            c.execute(
                "INSERT INTO desired(topic, payload) VALUES (?1, ?2)
                 ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload",
                params![topic, payload],
            )?;
        }
        Ok(())
    }

    fn all(&self) -> Vec<DirectMessage> {
        let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let res = (|| -> Result<Vec<DirectMessage>, rusqlite::Error> {
            let mut stmt = c.prepare("SELECT topic, payload FROM desired ORDER BY topic")?;
            let rows = stmt.query_map([], |r| {
                Ok(DirectMessage {
                    topic: r.get(0)?,
                    payload: r.get(1)?,
                    retain: true,
                })
            })?;
            rows.collect()
        })();
        res.unwrap_or_else(|error| {
            warn!(%error, "cannot read stored desired state");
            Vec::new()
        })
    }
}

fn presence(state: PresenceState) -> Vec<u8> {
    serde_json::to_vec(&Presence {
        state,
        since: roost_schemas::now_rfc3339(),
    })
    .unwrap_or_default()
}

/// Maps an edge message to what goes up: status (retained, last value wins) or an event.
fn upward(topics: &Topics, m: &Incoming) -> Option<NewMessage> {
    match topics.parse_store_topic(&m.topic) {
        Some((_, StoreTopicKind::Status)) => {
            Some(NewMessage::retained(m.topic.clone(), m.payload.clone()))
        }
        Some((_, StoreTopicKind::Events)) => {
            let roostseq = serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v.get("roostseq").and_then(|s| s.as_u64()));
            Some(NewMessage {
                topic: m.topic.clone(),
                payload: Payload::Bytes {
                    data: m.payload.clone(),
                    roostseq,
                },
                retain: false,
                compact: false,
            })
        }
        _ => None,
    }
}

/// Runs the bridge until `cancel` fires.
pub async fn run(cfg: BridgeConfig, cancel: CancellationToken) -> Result<(), BridgeError> {
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
    let outbox = Outbox::open(ocfg)?;

    // Cloud side: desired state in, the store's outbox out; presence via birth and last will.
    let c = &cfg.cloud;
    let mut cloud = LinkConfig::new(
        "cloud",
        &c.host,
        c.port,
        c.client_id
            .as_deref()
            .unwrap_or(&format!("roost-bridge-{store}")),
    );
    cloud.keep_alive = Duration::from_secs(c.keep_alive_s.unwrap_or(10).max(1));
    cloud.credentials = c.username.clone().zip(c.password.clone());
    cloud.subscriptions = std::iter::once(Scope::Store(store.clone()))
        .chain(cfg.groups.iter().map(|g| Scope::Group(g.clone())))
        .chain(std::iter::once(Scope::Fleet))
        .map(|s| topics.deployment_filter(&s))
        .collect();
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
    let child = cancel.child_token();
    let mut cloud_link = Link::start(cloud, Some(outbox.clone()), child.clone())?;

    // Edge side: a persistent session, so the edge broker keeps the store's events for the
    // bridge while it restarts; acknowledged only once they are in the outbox.
    let e = &cfg.edge;
    let mut edge = LinkConfig::new(
        "edge",
        &e.host,
        e.port,
        e.client_id
            .as_deref()
            .unwrap_or(&format!("roost-bridge-{store}")),
    );
    edge.keep_alive = Duration::from_secs(e.keep_alive_s.unwrap_or(10).max(1));
    edge.credentials = e.username.clone().zip(e.password.clone());
    edge.clean_session = false;
    edge.manual_acks = true;
    edge.subscriptions = vec![topics.status(&store), topics.events(&store)];
    let d2 = desired.clone();
    edge.on_connect = Some(Arc::new(move |_| d2.all()));
    let mut edge_link = Link::start(edge, None, child.clone())?;
    info!(%store, "bridge starting");

    let edge_handle = edge_link.handle.clone();
    let down = {
        let topics = topics.clone();
        let child = child.clone();
        async move {
            loop {
                let m = tokio::select! {
                    _ = child.cancelled() => break,
                    m = cloud_link.incoming.recv() => match m { Some(m) => m, None => break },
                };
                if topics.parse_deployment(&m.topic).is_none() {
                    continue;
                }
                if let Err(error) = desired.put(&m.topic, &m.payload) {
                    warn!(%error, topic = %m.topic, "cannot store desired state");
                }
                debug!(topic = %m.topic, bytes = m.payload.len(), "down");
                let _ = edge_handle.publish(DirectMessage {
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    retain: true,
                });
            }
        }
        .instrument(tracing::info_span!("down", %store))
    };
    let edge_handle = edge_link.handle.clone();
    let up = {
        let topics = topics.clone();
        let child = child.clone();
        let outbox = outbox.clone();
        async move {
            loop {
                let first: Incoming = tokio::select! {
                    _ = child.cancelled() => break,
                    m = edge_link.incoming.recv() => match m { Some(m) => m, None => break },
                };
                // Take whatever else is already waiting: one commit (one fsync) per burst.
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match edge_link.incoming.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let mut msgs = Vec::with_capacity(batch.len());
                let mut taken = Vec::with_capacity(batch.len());
                for m in batch {
                    match upward(&topics, &m) {
                        Some(msg) => {
                            msgs.push(msg);
                            taken.push(m);
                        }
                        None => edge_handle.ack(&m),
                    }
                }
                if msgs.is_empty() {
                    continue;
                }
                match outbox.enqueue(msgs).await {
                    Ok(_) => taken.iter().for_each(|m| edge_handle.ack(m)),
                    Err(error) => warn!(%error, count = taken.len(), "cannot store upward messages; not acknowledging"),
                }
            }
        }
        .instrument(tracing::info_span!("up", %store))
    };
    let down = tokio::spawn(down);
    let up = tokio::spawn(up);
    cancel.cancelled().await;
    child.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = down.await;
        let _ = up.await;
        let _ = cloud_link.task.await;
        let _ = edge_link.task.await;
    })
    .await;
    info!("bridge stopped");
    Ok(())
}
