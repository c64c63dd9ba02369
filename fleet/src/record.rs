//! `roost fleet`: the cloud-side record of the fleet. Subscribes to every store's status,
//! events and presence and to all deployment topics, and records them in the fleet database
//! ([`crate::db`]: events deduplicated by `id`, gaps in each store's `roostseq` detected, the
//! latest desired-state envelope per topic), acknowledging each batch only once it is
//! recorded. An envelope the record holds already, such as the controller's own publish
//! coming back, is recognised by reads alone and costs no write.
//!
//! It also keeps the cloud broker's retained desired state whole: after **every** connection
//! of its link the [`audit`] compares what the broker holds with the record and republishes
//! what the broker lacks or holds older ("session present" is no proof: mosquitto killed
//! with -9 comes back from its last autosave with our session but without newer retained
//! messages; rumqttd keeps nothing). Should the broker show an older envelope than the
//! record at any time (a publish racing a restore), the link republishes the record's
//! newest.
//!
//! It confirms end to end ([`confirm`]): per store, retained on `…/stores/{store}/confirmed`,
//! the highest roostseq up to which every event of the store is committed here, coalesced
//! per store and published at most every [`confirm::TICK`]; the stores' bridges keep their
//! events until it covers them.
//!
//! SQLite work (fsynced: `synchronous=FULL`) runs on the blocking pool, never on the async
//! runtime; one batch of incoming messages is at most one transaction.

pub mod audit;
pub mod confirm;

use std::path::PathBuf;
use std::time::Duration;

use roost_runtime::{BrokerAddr, DirectMessage, Incoming, Link, LinkConfig};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{CloudEvent, Topics};
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument as _};

use crate::db::{FleetDb, FleetItem};

/// Errors of the fleet service.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The MQTT link could not start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
    /// The broker audit's client could not start.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
}

/// Options of the fleet service.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Cloud broker host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database file.
    pub db: PathBuf,
    /// MQTT client id (persistent session).
    pub client_id: String,
    /// TLS and credentials for the cloud broker.
    pub security: roost_runtime::Security,
    /// More cloud broker addresses (a cluster's other nodes), tried in order after
    /// `host`:`port` whenever a connection fails or is lost.
    pub fallbacks: Vec<BrokerAddr>,
    /// How often the broker audit runs besides after every connection (`--audit-interval`).
    pub audit_interval: Duration,
    /// Publish end-to-end confirmations (`…/stores/{store}/confirmed`); on by default.
    pub confirm: bool,
    /// Whether this instance leads: only the leader publishes (confirmations, republished
    /// envelopes) and audits the broker; every instance records.
    pub leadership: crate::leadership::Leadership,
}

impl FleetOptions {
    /// Options with the defaults: no fallbacks, an audit every 60 s, confirmations on.
    pub fn new(host: &str, port: u16, db: PathBuf, client_id: &str) -> FleetOptions {
        FleetOptions {
            host: host.to_owned(),
            port,
            db,
            client_id: client_id.to_owned(),
            security: roost_runtime::Security::default(),
            fallbacks: Vec::new(),
            audit_interval: DEFAULT_AUDIT_INTERVAL,
            confirm: true,
            leadership: crate::leadership::Leadership::solo(),
        }
    }

    /// Every broker address, in the order tried.
    pub fn addresses(&self) -> Vec<BrokerAddr> {
        BrokerAddr::with_fallbacks(&self.host, self.port, &self.fallbacks)
    }
}

/// The broker audit's default interval (`--audit-interval`).
pub const DEFAULT_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

/// Runs the fleet service until cancelled.
pub async fn run(
    opts: FleetOptions,
    db: FleetDb,
    cancel: CancellationToken,
) -> Result<(), FleetError> {
    let topics = Topics::default();
    let mut lc = LinkConfig::new("cloud", &opts.host, opts.port, &opts.client_id);
    lc.security = opts.security.clone();
    lc.fallbacks = opts.fallbacks.clone();
    lc.clean_session = false;
    lc.manual_acks = true;
    lc.keep_alive = Duration::from_secs(5);
    lc.backoff = (Duration::from_millis(100), Duration::from_secs(5));
    lc.max_packet_size = 4 << 20;
    lc.subscriptions = topics.all_deployment_filters();
    for k in [
        StoreTopicKind::Status,
        StoreTopicKind::Events,
        StoreTopicKind::Presence,
    ] {
        lc.subscriptions.push(topics.all_stores(k));
    }
    let auditor = audit::Auditor::start(&opts)?;
    let mut link = Link::start(lc, None, cancel.child_token())?;
    let handle = link.handle.clone();
    // An audit after every connection of the link (a newer connection restarts it).
    let audit_cancel = cancel.child_token();
    let audit = tokio::spawn(audit::run(
        auditor,
        db.clone(),
        link.handle.sessions(),
        opts.audit_interval,
        audit_cancel.clone(),
    ));
    let confirmer = if opts.confirm {
        let seeded = db.call(|db| db.confirmation_watermarks()).await;
        let marks = match seeded {
            Ok(m) => m,
            Err(error) => {
                warn!(error = %roost_runtime::error_chain(&error), "cannot read the recorded roostseqs; confirming from the next events");
                Vec::new()
            }
        };
        Some(confirm::Confirmer::new(marks))
    } else {
        None
    };
    let (confirm_tx, confirm_rx) = tokio::sync::mpsc::unbounded_channel();
    let confirming = confirmer.map(|c| {
        tokio::spawn(
            confirm::run(
                c,
                topics.clone(),
                link.handle.clone(),
                opts.leadership.clone(),
                confirm_rx,
                audit_cancel.clone(),
            )
            .instrument(tracing::info_span!("confirm")),
        )
    });
    let leadership = opts.leadership.clone();
    let span = tracing::info_span!("fleet");
    async move {
        loop {
            let first: Incoming = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                m = link.incoming.recv() => match m { Some(m) => m, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match link.incoming.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let items: Vec<FleetItem> = batch.iter().filter_map(|m| item(&topics, m)).collect();
            let events: Vec<confirm::Recorded> = if confirming.is_some() {
                items.iter().filter_map(confirm::Recorded::of).collect()
            } else {
                Vec::new()
            };
            // A failed batch is tried again (a PostgreSQL session lost: the next attempt
            // opens a new one) until it is recorded; it is acknowledged only then. Given up
            // only at shutdown: unacknowledged, the broker redelivers it to our session.
            let mut backoff = roost_runtime::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let outcome = loop {
                let attempt = items.clone();
                match db.call(move |db| db.record_batch(&attempt)).await {
                    Ok(o) => break Some(o),
                    Err(error) => {
                        let delay = backoff.next_delay();
                        warn!(error = %roost_runtime::error_chain(&error), retry_in_ms = delay.as_millis() as u64, "cannot record a batch");
                        tokio::select! {
                            _ = cancel.cancelled() => break None,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            };
            let Some(outcome) = outcome else { break };
            // Only the leader publishes; a follower records.
            let regressed = if leadership.is_leading() {
                outcome.regressed
            } else {
                Vec::new()
            };
            for (topic, payload) in regressed {
                // The broker shows an older envelope than the record holds (a restore racing
                // a publish, or a publisher with a stale sequence): the newest stands.
                warn!(%topic, "the cloud broker holds an older envelope than the fleet record; publishing the record's again");
                let _ = handle.publish(DirectMessage {
                    topic,
                    payload,
                    retain: true,
                });
            }
            // Committed: now the events may be confirmed (also duplicates: a resend means the
            // bridge still holds them, so it needs the confirmation again).
            if !events.is_empty() {
                let _ = confirm_tx.send(events);
            }
            for m in &batch {
                handle.ack(m);
            }
        }
        audit_cancel.cancel();
        let _ = audit.await;
        if let Some(c) = confirming {
            let _ = c.await;
        }
        let _ = link.task.await;
    }
    .instrument(span)
    .await;
    Ok(())
}

/// What the fleet record keeps of one incoming message (None: not a fleet topic, or not
/// readable).
fn item(topics: &Topics, m: &Incoming) -> Option<FleetItem> {
    if topics.parse_deployment(&m.topic).is_some() {
        return Some(FleetItem::Desired(m.topic.clone(), m.payload.clone()));
    }
    let text = || String::from_utf8_lossy(&m.payload).into_owned();
    match topics.parse_store_topic(&m.topic)? {
        (store, StoreTopicKind::Events) => match serde_json::from_slice::<CloudEvent>(&m.payload) {
            Ok(e) => Some(FleetItem::Event(store, Box::new(e), text())),
            Err(error) => {
                warn!(%error, %store, "event is not a CloudEvent");
                None
            }
        },
        (store, StoreTopicKind::Status) => Some(FleetItem::Status(store, text())),
        (store, StoreTopicKind::Presence) => Some(FleetItem::Presence(store, text())),
    }
}
