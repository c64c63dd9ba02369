//! The broker audit: after every connection of the fleet record's link it compares what the
//! cloud broker retains on the deployment and store-profile topics with the record and
//! republishes (retained, QoS 1) every envelope the broker lacks or holds in an older
//! sequence.
//!
//! One MQTT client does it for as long as the record runs (clean session, the record's TLS
//! and credentials). It subscribes to the deployment topics only for an audit: a new
//! subscription is answered with exactly what the broker retains now (rumqttd sends retained
//! messages only for a subscription it does not have yet, so the client unsubscribes again
//! afterwards and does not receive every rollout a second time in between). It stays
//! subscribed until it has published, so an envelope published meanwhile (while the record
//! was reconnecting) is seen and never replaced by an older one. A failed audit is retried
//! with backoff until it succeeds or a newer connection of the link starts the next one.

use std::collections::HashMap;
use std::time::Duration;

use roost_runtime::{next_address, Backoff, BrokerAddr, SecurityError};
use roost_schemas::{envelope_sequence, Topics};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use super::FleetOptions;
use crate::db::{DbError, FleetDb};

/// Why an audit (or its client) failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The TLS or credential files could not be read.
    #[error("broker audit: cloud broker settings")]
    Security(#[from] SecurityError),
    /// A request could not be handed to the client.
    #[error("broker audit: cannot {what}")]
    Client {
        /// What it tried.
        what: &'static str,
        /// Why.
        #[source]
        source: rumqttc::ClientError,
    },
    /// The connection failed.
    #[error("broker audit: cloud broker connection")]
    Connection(#[source] Box<ConnectionError>),
    /// The broker refused the audit's subscription (a cluster without a stream leader).
    #[error("broker audit: the cloud broker refused the subscription")]
    Refused,
    /// The broker did not answer in time.
    #[error("broker audit: no {0} in time")]
    Timeout(&'static str),
    /// The client's connection task is gone.
    #[error("broker audit: the client stopped")]
    Closed,
    /// Reading the record failed.
    #[error("broker audit")]
    Db(#[from] DbError),
    /// This instance does not lead (any more): only the leader repairs the broker.
    #[error("broker audit: this instance does not lead")]
    NotLeading,
}

/// How often a follower looks whether it leads now (then it audits at once).
const FOLLOWER_POLL: Duration = Duration::from_secs(1);

/// What one audit found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Deployment topics the broker holds (retained, or published during the check).
    pub held: usize,
    /// Topics republished from the record (missing on the broker, or older there).
    pub restored: Vec<String>,
}

/// How long an audit waits: retained messages follow the SUBACK within milliseconds; it
/// waits until deployment messages have been quiet for `CHECK_QUIET`, at most `CHECK_MAX`.
const CHECK_QUIET: Duration = Duration::from_millis(500);
const CHECK_MAX: Duration = Duration::from_secs(10);

/// The audit's MQTT client, connected for as long as the record runs.
pub struct Auditor {
    client: AsyncClient,
    /// What the connection task saw (only what an audit needs).
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    poller: tokio::task::JoinHandle<()>,
    filters: Vec<String>,
    connected: bool,
    /// A subscription may be in place (an audit subscribed and did not finish): the next
    /// audit unsubscribes first, so that its subscription is a new one.
    maybe_subscribed: bool,
    /// Only the leader audits and repairs.
    leadership: crate::leadership::Leadership,
}

fn mqtt_options(
    opts: &FleetOptions,
    id: &str,
    addr: &BrokerAddr,
) -> Result<MqttOptions, SecurityError> {
    let mut o = MqttOptions::new(id, addr.host.clone(), addr.port);
    // A clean session: what a new subscription receives is exactly what the broker holds
    // now, plus whatever is published while it listens.
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(4 << 20, 4 << 20);
    opts.security.apply(&mut o)?;
    Ok(o)
}

/// Whether an audit needs the event (errors always).
fn wanted(ev: &Result<Event, ConnectionError>) -> bool {
    matches!(
        ev,
        Err(_)
            | Ok(Event::Incoming(
                Packet::ConnAck(_) | Packet::SubAck(_) | Packet::Publish(_) | Packet::PubAck(_)
            ))
            | Ok(Event::Outgoing(Outgoing::Disconnect))
    )
}

impl Auditor {
    /// Starts the client (it connects in the background and reconnects with backoff).
    pub fn start(opts: &FleetOptions) -> Result<Auditor, AuditError> {
        let id = format!("{}-check-{:08x}", opts.client_id, rand::random::<u32>());
        let addresses = opts.addresses();
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(opts, &id, &addresses[0])?, 64);
        let (tx, events) = mpsc::channel(1024);
        let leadership = opts.leadership.clone();
        let opts = opts.clone();
        // The connection task owns the event loop: polled all the time (keepalive), never
        // cancelled half-way through a packet.
        let poller = tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let mut at = 0usize;
            loop {
                let ev = eventloop.poll().await;
                let failed = ev.is_err();
                if matches!(ev, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                    backoff.reset();
                }
                if wanted(&ev) && tx.send(ev).await.is_err() {
                    break;
                }
                if failed {
                    tokio::time::sleep(backoff.next_delay()).await;
                    // Renewed TLS or password files count from the next attempt on, which
                    // goes to the next broker address.
                    at = next_address(at, addresses.len());
                    match mqtt_options(&opts, &id, &addresses[at]) {
                        Ok(o) => eventloop.mqtt_options = o,
                        Err(error) => {
                            warn!(%error, "broker audit: cannot read the cloud broker settings; keeping the last")
                        }
                    }
                }
            }
        });
        Ok(Auditor {
            client,
            events,
            poller,
            // Every retained envelope the record holds: the deployment topics and the
            // stores' profiles (both are in `desired`; a profile not looked at would be
            // republished by every audit).
            filters: {
                let topics = Topics::default();
                let mut f = topics.all_deployment_filters();
                f.push(topics.all_profiles());
                f
            },
            connected: false,
            maybe_subscribed: false,
            leadership,
        })
    }

    /// The next event, at most until `until` (None then). A connection error is an error.
    async fn next(&mut self, until: Instant) -> Result<Option<Event>, AuditError> {
        match tokio::time::timeout_at(until, self.events.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(AuditError::Closed),
            Ok(Some(ev)) => {
                self.note(&ev);
                ev.map(Some)
                    .map_err(|e| AuditError::Connection(Box::new(e)))
            }
        }
    }

    fn note(&mut self, ev: &Result<Event, ConnectionError>) {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => self.connected = true,
            Err(_) => self.connected = false,
            _ => {}
        }
    }

    /// Takes one event between audits (what it says about the connection is kept); false
    /// when the client stopped.
    async fn idle(&mut self) -> bool {
        match self.events.recv().await {
            Some(ev) => {
                self.note(&ev);
                true
            }
            None => false,
        }
    }

    async fn unsubscribe(&mut self) -> Result<(), AuditError> {
        for f in &self.filters {
            self.client
                .unsubscribe(f.clone())
                .await
                .map_err(|source| AuditError::Client {
                    what: "unsubscribe",
                    source,
                })?;
        }
        self.maybe_subscribed = false;
        Ok(())
    }

    /// One audit.
    pub async fn audit(&mut self, db: &FleetDb) -> Result<CheckReport, AuditError> {
        // What arrived before this audit only tells the connection's state.
        while let Ok(ev) = self.events.try_recv() {
            self.note(&ev);
        }
        let deadline = Instant::now() + CHECK_MAX;
        while !self.connected {
            if self.next(deadline).await?.is_none() {
                return Err(AuditError::Timeout("connection"));
            }
        }
        if self.maybe_subscribed {
            self.unsubscribe().await?;
        }
        self.maybe_subscribed = true;
        self.client
            .subscribe_many(
                self.filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            )
            .await
            .map_err(|source| AuditError::Client {
                what: "subscribe",
                source,
            })?;
        let mut seen: HashMap<String, Option<u64>> = HashMap::new();
        let saw = |seen: &mut HashMap<String, Option<u64>>, p: &rumqttc::Publish| {
            let seq = envelope_sequence(&p.payload);
            let e = seen.entry(p.topic.clone()).or_insert(seq);
            *e = (*e).max(seq);
        };
        let mut quiet_from: Option<Instant> = None;
        loop {
            let until = match quiet_from {
                Some(t) => (t + CHECK_QUIET).min(deadline),
                None => deadline,
            };
            match self.next(until).await? {
                None if quiet_from.is_some() => break,
                None => return Err(AuditError::Timeout("SUBACK")),
                Some(Event::Incoming(Packet::SubAck(ack))) => {
                    if roost_runtime::suback_refused(&ack) {
                        return Err(AuditError::Refused);
                    }
                    quiet_from = Some(Instant::now());
                }
                Some(Event::Incoming(Packet::Publish(p))) => {
                    saw(&mut seen, &p);
                    if quiet_from.is_some() {
                        quiet_from = Some(Instant::now());
                    }
                }
                Some(_) => {}
            }
        }
        let desired = db.call(|db| db.desired()).await?;
        // Anything published while the record was read counts too.
        let drain = Instant::now() + Duration::from_millis(20);
        while let Some(ev) = self.next(drain).await? {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                saw(&mut seen, &p);
            }
        }
        let stale = stale_topics(&seen, desired);
        if !self.leadership.is_leading() {
            return Err(AuditError::NotLeading);
        }
        let deadline = Instant::now() + CHECK_MAX;
        for (t, p) in &stale {
            self.client
                .publish(t.clone(), QoS::AtLeastOnce, true, p.clone())
                .await
                .map_err(|source| AuditError::Client {
                    what: "publish",
                    source,
                })?;
        }
        let mut acked = 0usize;
        while acked < stale.len() {
            match self.next(deadline).await? {
                None => return Err(AuditError::Timeout("PUBACK")),
                Some(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Some(_) => {}
            }
        }
        self.unsubscribe().await?;
        Ok(CheckReport {
            held: seen.len(),
            restored: stale.into_iter().map(|(t, _)| t).collect(),
        })
    }

    /// Disconnects (bounded: a clean end instead of a dropped socket) and stops the client.
    pub async fn stop(mut self) {
        if self.connected && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Some(ev) = self.events.recv().await {
                    if matches!(ev, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                        break;
                    }
                }
            })
            .await;
        }
        self.poller.abort();
    }
}

/// What the audit loop waits for next.
enum Wake {
    /// The record's link connected (again): (connection, session present).
    Connected((u64, bool)),
    /// Time to try again.
    Retry,
    /// Cancelled, or the link or the client is gone.
    Stop,
}

/// Waits until `until` (None: for the next connection), noting the client's events.
async fn wait(
    auditor: &mut Auditor,
    sessions: &mut watch::Receiver<(u64, bool)>,
    cancel: &CancellationToken,
    until: Option<Instant>,
) -> Wake {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Wake::Stop,
            changed = sessions.changed() => {
                if changed.is_err() {
                    return Wake::Stop; // the link task is gone
                }
                return Wake::Connected(*sessions.borrow_and_update());
            }
            _ = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => return Wake::Retry,
            alive = auditor.idle() => if !alive {
                return Wake::Stop;
            },
        }
    }
}

/// Runs an audit after every connection the record's link reports on `sessions` (with or
/// without a session: a broker that kept the session may still have lost retained
/// messages) and every `interval` after the last one finished (a PUBACK is no proof that a
/// retained message was stored: a clustered broker stores it asynchronously), until
/// `cancel`. Every finished audit is recorded in the fleet database.
pub async fn run(
    mut auditor: Auditor,
    db: FleetDb,
    mut sessions: watch::Receiver<(u64, bool)>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut wake = wait(&mut auditor, &mut sessions, &cancel, None).await;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut current = (0, false);
    let mut trigger = "connection";
    loop {
        match wake {
            Wake::Stop => break,
            Wake::Connected(c) => {
                current = c;
                trigger = "connection";
                backoff.reset();
            }
            Wake::Retry => {}
        }
        if !auditor.leadership.is_leading() {
            // A follower audits nothing; it looks again shortly (it may become the leader).
            wake = wait(
                &mut auditor,
                &mut sessions,
                &cancel,
                Some(Instant::now() + FOLLOWER_POLL),
            )
            .await;
            continue;
        }
        let (connection, session_present) = current;
        let span = tracing::info_span!("broker_check", connection, session_present);
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            changed = sessions.changed() => {
                wake = match changed {
                    Ok(()) => Wake::Connected(*sessions.borrow_and_update()),
                    Err(_) => Wake::Stop,
                };
                continue;
            }
            r = auditor.audit(&db).instrument(span.clone()) => r,
        };
        let retry = match result {
            Err(AuditError::NotLeading) => Some(Instant::now() + FOLLOWER_POLL),
            Ok(report) => {
                span.in_scope(|| {
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
                });
                let (held, restored) = (report.held as u64, report.restored);
                let t = trigger;
                if let Err(error) = db.call(move |db| db.record_audit(t, held, &restored)).await {
                    warn!(error = %roost_runtime::error_chain(&error), "cannot record the broker audit");
                }
                backoff.reset();
                trigger = "interval";
                Some(Instant::now() + interval)
            }
            Err(error) => {
                let delay = backoff.next_delay();
                span.in_scope(|| warn!(error = %roost_runtime::error_chain(&error), retry_in_ms = delay.as_millis() as u64, "cannot compare the cloud broker's desired state with the fleet record"));
                Some(Instant::now() + delay)
            }
        };
        wake = wait(&mut auditor, &mut sessions, &cancel, retry).await;
    }
    auditor.stop().await;
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
