//! `roost fleet`: the cloud-side record of the fleet. Subscribes to every store's status,
//! events and presence and to all deployment topics; records them in the fleet database
//! ([`crate::db`]: events deduplicated by `id`, gaps in each store's `roostseq` detected, the
//! latest desired-state envelope per topic), restoring the envelopes retained when the cloud
//! broker lost them.
//!
//! "Session present" is no proof that retained state survived (mosquitto killed with -9
//! comes back from its last autosave with our session but without newer retained messages;
//! rumqttd keeps nothing). So on **every** connection of the service's link a fresh
//! clean-session reader ([`check_broker`]) subscribes to the deployment topics, collects what
//! the broker holds, and republishes every recorded envelope the broker lacks or holds in an
//! older sequence. The reader stays subscribed until it has published, so an envelope
//! published meanwhile (while the service was reconnecting) is seen and never replaced by an
//! older one; and should the broker still show an older envelope than the record afterwards
//! (a publish racing ours), the link republishes the record's newest.
//!
//! SQLite work (fsynced: `synchronous=FULL`) runs on the blocking pool, never on the async
//! runtime; one batch of incoming messages is one transaction.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use roost_runtime::{Backoff, DirectMessage, Incoming, Link, LinkConfig};
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{envelope_sequence, CloudEvent, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use crate::db::{DbError, FleetDb, FleetItem};

/// Errors of the fleet service.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The fleet database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The MQTT link could not start.
    #[error(transparent)]
    Link(#[from] roost_runtime::LinkError),
    /// The broker check's MQTT connection failed.
    #[error("cloud broker: {0}")]
    Mqtt(String),
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
}

/// Runs the fleet service until cancelled.
pub async fn run(
    opts: FleetOptions,
    db: FleetDb,
    cancel: CancellationToken,
) -> Result<(), FleetError> {
    let topics = Topics::default();
    let mut lc = LinkConfig::new("cloud", &opts.host, opts.port, &opts.client_id);
    lc.security = opts.security.clone();
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
    let mut link = Link::start(lc, None, cancel.child_token())?;
    let handle = link.handle.clone();
    let mut sessions = link.handle.sessions();
    let span = tracing::info_span!("fleet");
    async move {
        // The broker check of the current connection (a newer connection cancels it).
        let mut check: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
        loop {
            let first: Incoming = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = sessions.changed() => {
                    if changed.is_err() {
                        break; // the link task is gone
                    }
                    // Every connection, with or without a session: a broker that kept our
                    // session may still have lost retained messages (mosquitto after kill -9).
                    let (connection, session_present) = *sessions.borrow_and_update();
                    if let Some((c, _)) = check.take() {
                        c.cancel();
                    }
                    let c = cancel.child_token();
                    let task = tokio::spawn(
                        check_broker(opts.clone(), db.clone(), c.clone()).instrument(
                            tracing::info_span!("broker_check", connection, session_present),
                        ),
                    );
                    check = Some((c, task));
                    continue;
                }
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
            let recorded = db.call(move |db| db.record_batch(&items)).await;
            let outcome = match recorded {
                Ok(o) => o,
                Err(error) => {
                    // Not acknowledged: the broker redelivers to our persistent session.
                    warn!(error = %roost_runtime::error_chain(&error), "cannot record a batch");
                    continue;
                }
            };
            for (topic, payload) in outcome.regressed {
                // The broker shows an older envelope than the record holds (a restore racing
                // a publish, or a publisher with a stale sequence): the newest stands.
                warn!(%topic, "the cloud broker holds an older envelope than the fleet record; publishing the record's again");
                let _ = handle.publish(DirectMessage {
                    topic,
                    payload,
                    retain: true,
                });
            }
            for m in &batch {
                handle.ack(m);
            }
        }
        if let Some((c, task)) = check.take() {
            c.cancel();
            let _ = task.await;
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

/// What one broker check found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Deployment topics the broker holds (retained, or published during the check).
    pub held: usize,
    /// Topics republished from the record (missing on the broker, or older there).
    pub restored: Vec<String>,
}

/// Compares what the cloud broker holds on the deployment topics with the fleet record and
/// republishes (retained, QoS 1) what it lacks or holds older, retrying with backoff until
/// it succeeds or `cancel` fires (the next connection of the link starts a new check).
pub async fn check_broker(opts: FleetOptions, db: FleetDb, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = check_once(&opts, &db) => r,
        };
        match result {
            Ok(report) => {
                if report.restored.is_empty() {
                    info!(
                        held = report.held,
                        "the cloud broker holds the recorded desired state"
                    );
                } else {
                    info!(
                        held = report.held,
                        restored = report.restored.len(),
                        topics = ?report.restored,
                        "restored desired state on the cloud broker"
                    );
                }
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot compare the cloud broker's desired state with the fleet record");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// How long a broker check waits: retained messages follow the SUBACK within milliseconds;
/// it waits until deployment messages have been quiet for `CHECK_QUIET`, at most `CHECK_MAX`.
const CHECK_QUIET: Duration = Duration::from_millis(500);
const CHECK_MAX: Duration = Duration::from_secs(10);

async fn check_once(opts: &FleetOptions, db: &FleetDb) -> Result<CheckReport, FleetError> {
    let mqtt = |e: &dyn std::fmt::Display| FleetError::Mqtt(e.to_string());
    let id = format!("{}-check-{:08x}", opts.client_id, rand::random::<u32>());
    let mut o = MqttOptions::new(id, opts.host.clone(), opts.port);
    // A clean session: what it receives after SUBACK is exactly what the broker holds now,
    // plus whatever is published while it listens.
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut ev) = AsyncClient::new(o, 64);
    let filters = Topics::default().all_deployment_filters();
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .await
        .map_err(|e| mqtt(&e))?;
    let mut seen: HashMap<String, Option<u64>> = HashMap::new();
    let saw = |seen: &mut HashMap<String, Option<u64>>, p: &rumqttc::Publish| {
        let seq = envelope_sequence(&p.payload);
        let e = seen.entry(p.topic.clone()).or_insert(seq);
        *e = (*e).max(seq);
    };
    let result = async {
        let deadline = tokio::time::Instant::now() + CHECK_MAX;
        let mut quiet_from: Option<tokio::time::Instant> = None;
        loop {
            let until = match quiet_from {
                Some(t) => (t + CHECK_QUIET).min(deadline),
                None => deadline,
            };
            match tokio::time::timeout_at(until, ev.poll()).await {
                Err(_) if quiet_from.is_some() => break,
                Err(_) => return Err(FleetError::Mqtt("no SUBACK in time".into())),
                Ok(Err(e)) => return Err(mqtt(&e)),
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                    quiet_from = Some(tokio::time::Instant::now());
                }
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    saw(&mut seen, &p);
                    if quiet_from.is_some() {
                        quiet_from = Some(tokio::time::Instant::now());
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
        let desired = db.call(|db| db.desired()).await?;
        // Anything published while the record was read counts too.
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(20), ev.poll()).await {
            match r {
                Ok(Event::Incoming(Packet::Publish(p))) => saw(&mut seen, &p),
                Ok(_) => {}
                Err(e) => return Err(mqtt(&e)),
            }
        }
        let stale = stale_topics(&seen, desired);
        let mut next = stale.iter();
        let mut to_send = next.next();
        let mut acked = 0usize;
        let deadline = tokio::time::Instant::now() + CHECK_MAX;
        while acked < stale.len() {
            tokio::select! {
                r = async {
                    match to_send {
                        Some((t, p)) => client.publish(t.clone(), QoS::AtLeastOnce, true, p.clone()).await,
                        None => std::future::pending().await,
                    }
                }, if to_send.is_some() => {
                    r.map_err(|e| mqtt(&e))?;
                    to_send = next.next();
                }
                e = tokio::time::timeout_at(deadline, ev.poll()) => match e {
                    Err(_) => return Err(FleetError::Mqtt("no PUBACK in time".into())),
                    Ok(Err(e)) => return Err(mqtt(&e)),
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                },
            }
        }
        Ok(CheckReport {
            held: seen.len(),
            restored: stale.into_iter().map(|(t, _)| t).collect(),
        })
    }
    .await;
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out (bounded): a clean end instead of a dropped socket.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(e) = ev.poll().await {
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    result
}

/// The recorded envelopes the broker does not hold in this or a newer version. `seen` maps a
/// deployment topic to the newest sequence the broker showed (None: cleared or unreadable
/// there, someone else's decision, left alone).
pub fn stale_topics(
    seen: &HashMap<String, Option<u64>>,
    desired: Vec<(String, Vec<u8>)>,
) -> Vec<(String, Vec<u8>)> {
    desired
        .into_iter()
        .filter(|(topic, payload)| {
            let ours = envelope_sequence(payload);
            match seen.get(topic) {
                None => true,
                Some(None) => false,
                Some(Some(theirs)) => ours.is_some_and(|o| o > *theirs),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::desired::test_envelope as envelope;

    #[test]
    fn restore_only_what_the_broker_lacks_or_holds_older() {
        // What the broker showed the check: "same" as recorded, "newer" than recorded,
        // "older" than recorded, "cleared" (empty or unreadable there); "gone" not at all.
        let seen: HashMap<String, Option<u64>> = [
            ("same".to_string(), Some(5)),
            ("newer".to_string(), Some(7)),
            ("older".to_string(), Some(2)),
            ("cleared".to_string(), None),
        ]
        .into_iter()
        .collect();
        let desired = vec![
            ("same".to_string(), envelope(5)),
            ("newer".to_string(), envelope(6)),
            ("older".to_string(), envelope(3)),
            ("cleared".to_string(), envelope(8)),
            ("gone".to_string(), envelope(4)),
        ];
        let topics: Vec<String> = stale_topics(&seen, desired)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(topics, vec!["older", "gone"]);
    }
}
