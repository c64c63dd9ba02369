//! The MQTT link: one task that owns a broker connection, (re)subscribes on every connect,
//! drains an [`Outbox`] with QoS 1 and deletes a message only after its PUBACK.
//!
//! Each connection attempt gets a fresh rumqttc client and event loop. rumqttc silently drops
//! unacknowledged publishes when a reconnect has no session, and requests queued on an old
//! client could otherwise leak into the next session and confuse the PUBACK bookkeeping; a
//! fresh pair per connection makes "what is in flight" exact: on every CONNACK the link
//! re-subscribes and republishes the outbox from its oldest message (at least once).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use crate::backoff::Backoff;
use crate::outbox::Outbox;
use crate::security::{Password, Security, SecurityError, TlsFiles};

/// Errors of the MQTT link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The configuration is not usable.
    #[error("invalid link configuration: {0}")]
    Config(String),
    /// The link task is gone.
    #[error("link stopped")]
    Closed,
}

/// A broker endpoint as configuration files give it (agent `[broker]`, bridge `[edge]` and
/// `[cloud]`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Host (for TLS: the name or IP address the broker's certificate is valid for).
    #[serde(default = "default_host")]
    pub host: String,
    /// Port (with `host`; not with `hosts`).
    #[serde(default)]
    pub port: u16,
    /// Several brokers (`["h1:8883", "h2:8883"]`, instead of `host`/`port`): the link connects
    /// to the first and moves to the next whenever a connection fails or is lost.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Username.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (or `password_file`).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password, read on every connection attempt.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// TLS: `{ ca_file, cert_file, key_file }` (client certificate and key for mutual TLS).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Client id (each component has its default).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keepalive seconds (default 10): a blackholed link is noticed within ~1.5× this.
    #[serde(default)]
    pub keep_alive_s: Option<u64>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

impl Endpoint {
    /// A loopback endpoint (demos, tests) with a keepalive.
    pub fn local(addr: std::net::SocketAddr, keep_alive_s: u64) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            keep_alive_s: Some(keep_alive_s),
            ..Endpoint::default()
        }
    }

    /// The transport security of this endpoint; errors name fields under `section`
    /// (`cloud`, `edge`, `broker`).
    pub fn security(&self, section: &str) -> Security {
        Security {
            tls: self.tls.clone(),
            username: self.username.clone(),
            password: match (&self.password, &self.password_file) {
                (_, Some(f)) => Some(Password::File(f.clone())),
                (Some(p), None) => Some(Password::Inline(p.clone())),
                (None, None) => None,
            },
            field_prefix: format!("{section}."),
        }
    }

    /// Checks the endpoint and every file it names; errors name the field under `section`.
    pub fn validate(&self, section: &str) -> Result<(), SecurityError> {
        self.addresses(section)?;
        if !self.hosts.is_empty() && self.port != 0 {
            return Err(SecurityError {
                field: format!("{section}.hosts"),
                message: "give hosts or host and port, not both".into(),
            });
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(SecurityError {
                field: format!("{section}.password_file"),
                message: "give password or password_file, not both".into(),
            });
        }
        self.security(section).validate()
    }

    /// The brokers to connect to, in order: `hosts`, else `host` and `port`.
    pub fn addresses(&self, section: &str) -> Result<Vec<BrokerAddr>, SecurityError> {
        if self.hosts.is_empty() {
            if self.port == 0 {
                return Err(SecurityError {
                    field: format!("{section}.port"),
                    message: "must not be 0 (or give hosts)".into(),
                });
            }
            return Ok(vec![BrokerAddr {
                host: self.host.clone(),
                port: self.port,
            }]);
        }
        self.hosts
            .iter()
            .map(|h| {
                BrokerAddr::parse(h).map_err(|message| SecurityError {
                    field: format!("{section}.hosts"),
                    message,
                })
            })
            .collect()
    }

    /// The link configuration for this endpoint (named `name`, which is also the section
    /// that errors name). Call [`Endpoint::validate`] first: an unusable address list gives
    /// a configuration the link refuses to start with.
    pub fn link_config(&self, name: &str, default_client_id: &str) -> LinkConfig {
        let addrs = self.addresses(name).unwrap_or_default();
        let first = addrs.first().cloned().unwrap_or(BrokerAddr {
            host: String::new(),
            port: 0,
        });
        let mut lc = LinkConfig::new(
            name,
            &first.host,
            first.port,
            self.client_id.as_deref().unwrap_or(default_client_id),
        );
        lc.fallbacks = addrs.into_iter().skip(1).collect();
        lc.keep_alive = Duration::from_secs(self.keep_alive_s.unwrap_or(10).max(1));
        lc.security = self.security(name);
        lc
    }
}

/// One broker address: host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (for TLS: what the broker's certificate names).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses `HOST:PORT`, `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub fn parse(s: &str) -> Result<BrokerAddr, String> {
        let bare = s
            .trim()
            .strip_prefix("mqtts://")
            .or_else(|| s.trim().strip_prefix("mqtt://"))
            .unwrap_or(s.trim());
        let (host, port) = bare
            .rsplit_once(':')
            .ok_or_else(|| format!("broker address {s:?} must be HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("broker port {port:?} is not a number"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("broker address {s:?} must be HOST:PORT"));
        }
        Ok(BrokerAddr {
            host: host.to_owned(),
            port,
        })
    }

    /// `host`:`port` first, then `more`: every address a client tries, in order.
    pub fn with_fallbacks(host: &str, port: u16, more: &[BrokerAddr]) -> Vec<BrokerAddr> {
        let mut all = vec![BrokerAddr {
            host: host.to_owned(),
            port,
        }];
        all.extend(more.iter().cloned());
        all
    }

    /// Parses a comma-separated list (`h1:1883,h2:1883`), at least one.
    pub fn parse_list(s: &str) -> Result<Vec<BrokerAddr>, String> {
        let list = s
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(BrokerAddr::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err("no broker address given".into());
        }
        Ok(list)
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Which address of `count` a client tries after a connection to address `current` failed or
/// was lost: the next one, round robin (with one address, that one again). Pure.
pub fn next_address(current: usize, count: usize) -> usize {
    if count == 0 {
        0
    } else {
        (current + 1) % count
    }
}

/// The SUBACK rule, one for every client of roost: a SUBACK that refuses any filter means the
/// connection is not usable (a clustered broker moving a stream leader answers new QoS 1
/// subscriptions with a failure code for a while). The client drops the connection and
/// retries, with backoff and the next address; it never counts itself subscribed.
pub fn suback_refused(ack: &rumqttc::SubAck) -> bool {
    ack.return_codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
}

/// A last-will message.
#[derive(Debug, Clone)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
}

/// A message published directly (not through the outbox), QoS 1, best effort per connection.
#[derive(Debug, Clone)]
pub struct DirectMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retain flag.
    pub retain: bool,
}

/// Called on every CONNACK: messages to publish right after (re)connecting.
pub type OnConnect = Arc<dyn Fn(bool) -> Vec<DirectMessage> + Send + Sync>;

/// How to connect.
#[derive(Clone)]
pub struct LinkConfig {
    /// Name for logs (`edge`, `cloud`).
    pub name: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// More brokers, tried in order after `host`:`port` whenever a connection fails or is
    /// lost (a cluster's other nodes).
    pub fallbacks: Vec<BrokerAddr>,
    /// MQTT client id.
    pub client_id: String,
    /// Keepalive: a silent (half-open) link is detected within about 1.5× this.
    pub keep_alive: Duration,
    /// Clean session (true) or persistent session (false).
    pub clean_session: bool,
    /// TLS and username/password.
    pub security: Security,
    /// Last will.
    pub will: Option<Will>,
    /// Topic filters to subscribe (QoS 1) on every connect; changed at run time with
    /// [`LinkHandle::set_subscriptions`].
    pub subscriptions: Vec<String>,
    /// Acknowledge incoming QoS 1 messages only when the consumer says so.
    pub manual_acks: bool,
    /// Outbox messages in flight at once.
    pub window: usize,
    /// Largest packet accepted/sent.
    pub max_packet_size: usize,
    /// Reconnect backoff.
    pub backoff: (Duration, Duration),
    /// Messages to publish on every connect (bool = session present).
    pub on_connect: Option<OnConnect>,
    /// Keep event rows (those with a `roostseq`) after their PUBACK until
    /// [`Outbox::confirm`] covers them: end-to-end delivery through the next hop.
    pub confirm_events: bool,
    /// Connection counters (`roost_mqtt_*{link = name}`), if the component exports metrics.
    pub metrics: Option<crate::metrics::LinkMetrics>,
    /// Send each packet at once (`TCP_NODELAY`) instead of letting Nagle's algorithm hold a
    /// small packet back until the previous one is acknowledged: for a link that streams
    /// acknowledgements and publishes both ways (the bridge).
    pub tcp_nodelay: bool,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("fallbacks", &self.fallbacks)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl LinkConfig {
    /// Defaults: keepalive 10 s, clean session, window 64, 1 MiB packets, backoff 200 ms–10 s.
    pub fn new(name: &str, host: &str, port: u16, client_id: &str) -> LinkConfig {
        LinkConfig {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
            fallbacks: Vec::new(),
            client_id: client_id.to_owned(),
            keep_alive: Duration::from_secs(10),
            clean_session: true,
            security: Security::default(),
            will: None,
            subscriptions: Vec::new(),
            manual_acks: false,
            window: 64,
            max_packet_size: 1024 * 1024,
            backoff: (Duration::from_millis(200), Duration::from_secs(10)),
            on_connect: None,
            confirm_events: false,
            metrics: None,
            tcp_nodelay: false,
        }
    }

    /// Every broker address, in the order tried.
    pub fn addresses(&self) -> Vec<BrokerAddr> {
        BrokerAddr::with_fallbacks(&self.host, self.port, &self.fallbacks)
    }

    fn validate(&self) -> Result<(), LinkError> {
        if self
            .addresses()
            .iter()
            .any(|a| a.host.is_empty() || a.port == 0)
        {
            return Err(LinkError::Config(format!(
                "{}: broker address is empty",
                self.name
            )));
        }
        if self.client_id.is_empty() {
            return Err(LinkError::Config(format!(
                "{}: client id is empty",
                self.name
            )));
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err(LinkError::Config(format!(
                "{}: keepalive must be at least 1 s",
                self.name
            )));
        }
        self.security
            .validate()
            .map_err(|e| LinkError::Config(e.to_string()))
    }
}

/// A message received on a subscription.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained flag as delivered.
    pub retain: bool,
    /// The connection it arrived on (1, 2, … per link; see [`LinkHandle::sessions`]).
    pub connection: u64,
    ack: Option<(u64, Publish)>,
}

enum Cmd {
    Rewind,
    Acks(Vec<(u64, Publish)>),
    Direct(DirectMessage),
    Subscriptions(Vec<String>),
    ConfirmEvents(bool),
}

/// What changes when a link's subscriptions go from `old` to `new`: the filters to subscribe
/// and the filters to unsubscribe, each in the order given, without duplicates.
pub fn subscription_change(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let mut add: Vec<String> = Vec::new();
    for f in new {
        if !old.contains(f) && !add.contains(f) {
            add.push(f.clone());
        }
    }
    let mut remove: Vec<String> = Vec::new();
    for f in old {
        if !new.contains(f) && !remove.contains(f) {
            remove.push(f.clone());
        }
    }
    (add, remove)
}

/// Handle to a running link.
#[derive(Clone)]
pub struct LinkHandle {
    cmd: mpsc::UnboundedSender<Cmd>,
    connected: watch::Receiver<bool>,
    sessions: watch::Receiver<(u64, bool)>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle")
            .field("connected", &*self.connected.borrow())
            .finish()
    }
}

impl LinkHandle {
    /// Acknowledges an incoming message (with `manual_acks`). If the connection it came on is
    /// gone, the ack is dropped: the broker redelivers to a persistent session.
    pub fn ack(&self, msg: &Incoming) {
        self.ack_all(std::slice::from_ref(msg));
    }

    /// [`LinkHandle::ack`] for several messages, in order, in one hand-off to the link task.
    pub fn ack_all<'a>(&self, msgs: impl IntoIterator<Item = &'a Incoming>) {
        let acks: Vec<(u64, Publish)> = msgs.into_iter().filter_map(|m| m.ack.clone()).collect();
        if !acks.is_empty() {
            let _ = self.cmd.send(Cmd::Acks(acks));
        }
    }

    /// Publishes directly (QoS 1) if connected; dropped otherwise. For messages that are
    /// re-derived on every connect (retained desired state), not for events.
    pub fn publish(&self, msg: DirectMessage) -> Result<(), LinkError> {
        self.cmd
            .send(Cmd::Direct(msg))
            .map_err(|_| LinkError::Closed)
    }

    /// Replaces the link's subscriptions with `filters`: while connected it subscribes to the
    /// new filters and unsubscribes from the dropped ones at once, and every later connection
    /// subscribes to `filters` (the broker sends the new filters' retained messages as usual).
    /// Messages already on their way for a dropped filter may still arrive.
    pub fn set_subscriptions(&self, filters: Vec<String>) -> Result<(), LinkError> {
        self.cmd
            .send(Cmd::Subscriptions(filters))
            .map_err(|_| LinkError::Closed)
    }

    /// Sends every message still in the outbox again (the next hop lost some: with
    /// `confirm_events`, unconfirmed events stay in the outbox until confirmed).
    pub fn rewind(&self) -> Result<(), LinkError> {
        self.cmd.send(Cmd::Rewind).map_err(|_| LinkError::Closed)
    }

    /// Switches end-to-end confirmation on or off at run time (see
    /// [`LinkConfig::confirm_events`]): from now on a PUBACKed event row stays (on) or goes (off).
    pub fn set_confirm_events(&self, on: bool) -> Result<(), LinkError> {
        self.cmd
            .send(Cmd::ConfirmEvents(on))
            .map_err(|_| LinkError::Closed)
    }

    /// Whether the link is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A watch of the connection state.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// A watch of the latest CONNACK: (connection number, session present). It changes
    /// before anything of that connection is delivered, so a consumer can tell which
    /// messages ([`Incoming::connection`]) came after a session was lost.
    pub fn sessions(&self) -> watch::Receiver<(u64, bool)> {
        self.sessions.clone()
    }
}

/// A running link: the handle, the incoming messages, and the task.
pub struct Link {
    /// Control handle.
    pub handle: LinkHandle,
    /// Messages received on the subscriptions.
    pub incoming: mpsc::Receiver<Incoming>,
    /// The link task; ends when cancelled.
    pub task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Starts the link task. `outbox`, if given, is drained to this broker.
    pub fn start(
        cfg: LinkConfig,
        outbox: Option<Outbox>,
        cancel: CancellationToken,
    ) -> Result<Link, LinkError> {
        cfg.validate()?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::channel(1024);
        let (conn_tx, conn_rx) = watch::channel(false);
        let (session_tx, session_rx) = watch::channel((0u64, false));
        let span = tracing::info_span!("mqtt_link", link = %cfg.name, client_id = %cfg.client_id);
        let task = tokio::spawn(
            run(cfg, outbox, cmd_rx, in_tx, conn_tx, session_tx, cancel).instrument(span),
        );
        Ok(Link {
            handle: LinkHandle {
                cmd: cmd_tx,
                connected: conn_rx,
                sessions: session_rx,
            },
            incoming: in_rx,
            task,
        })
    }
}

/// The client options for one connection attempt; reads the TLS and password files now, so
/// renewed files count from the next attempt on.
fn options(cfg: &LinkConfig, addr: &BrokerAddr) -> Result<MqttOptions, SecurityError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), addr.host.clone(), addr.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_session(cfg.clean_session);
    o.set_manual_acks(cfg.manual_acks);
    o.set_max_packet_size(cfg.max_packet_size, cfg.max_packet_size);
    o.set_inflight(u16::try_from(cfg.window.max(1) + 16).unwrap_or(u16::MAX));
    // Requests already queued (a refill's publishes, a burst's PUBACKs) leave in one write
    // system call, up to a window's worth, instead of one each (third_party/rumqttc).
    o.set_max_request_batch(cfg.window.max(1));
    cfg.security.apply(&mut o)?;
    if let Some(w) = &cfg.will {
        o.set_last_will(LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            QoS::AtLeastOnce,
            w.retain,
        ));
    }
    Ok(o)
}

/// Per-connection bookkeeping of outbox messages in flight.
#[derive(Default)]
struct Inflight {
    /// Publishes handed to the client, in order, not yet given a packet id
    /// (`Some(outbox id)` or `None` for direct messages).
    unassigned: VecDeque<Option<(i64, Option<u64>)>>,
    /// Packet id → outbox id, awaiting PUBACK.
    by_pkid: HashMap<u16, (i64, Option<u64>)>,
    /// Highest outbox id handed to this connection.
    high_water: i64,
    /// Outbox messages handed to this connection and not yet acknowledged.
    outstanding: usize,
}

async fn run(
    cfg: LinkConfig,
    outbox: Option<Outbox>,
    mut cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    in_tx: mpsc::Sender<Incoming>,
    connected: watch::Sender<bool>,
    sessions: watch::Sender<(u64, bool)>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(cfg.backoff.0, cfg.backoff.1);
    let mut newest = outbox.as_ref().map(|o| o.subscribe_newest());
    let mut generation: u64 = 0;
    // What every connection subscribes to; `set_subscriptions` replaces it.
    let mut subscriptions = cfg.subscriptions.clone();
    let addresses = cfg.addresses();
    let mut at = 0usize;
    let mut confirm_events = cfg.confirm_events;
    while !cancel.is_cancelled() {
        let addr = &addresses[at.min(addresses.len() - 1)];
        let opts = match options(&cfg, addr) {
            Ok(o) => o,
            Err(error) => {
                // A TLS or password file became unreadable or invalid since the start:
                // report it and try again (it may be in the middle of being renewed).
                let delay = backoff.next_delay();
                warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot connect: security settings");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        generation += 1;
        let (client, mut eventloop) = AsyncClient::new(opts, cfg.window + 256);
        if cfg.tcp_nodelay {
            let mut no = rumqttc::NetworkOptions::new();
            no.set_tcp_nodelay(true);
            eventloop.set_network_options(no);
        }
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        // The poll task owns the event loop for exactly one connection: it stops at the first
        // error, so nothing from this session can leak into the next one.
        let poller = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let failed = ev.is_err();
                // Events the link ignores stay here: one channel hop (and wake-up) less per
                // acknowledged message.
                if !failed && !forwarded(&ev) {
                    continue;
                }
                if ev_tx.send(ev).is_err() || failed {
                    break;
                }
            }
        });
        let mut inflight = Inflight::default();
        let mut is_up = false;
        let outcome: Result<(), String> = loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = client.try_disconnect();
                    // Let the event loop write the DISCONNECT (after whatever was queued
                    // before it): a clean disconnect discards the last will, so a component
                    // that said "offline" itself is not overwritten by its stale will.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(ev) = ev_rx.recv().await {
                            if matches!(ev, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    break Ok(());
                }
                ev = ev_rx.recv() => {
                    let Some(mut ev) = ev else { break Err("event loop ended".into()) };
                    // Handle everything the event loop has already produced before touching
                    // the outbox: the PUBACKs of a burst become one delete and one refill,
                    // not one writer-thread round trip each.
                    let mut acked: Vec<i64> = Vec::new();
                    let mut row_acks = 0usize;
                    let mut budget = EVENT_BURST;
                    let burst: Result<(), String> = 'burst: loop {
                        match ev {
                            Err(e) => {
                                // A TLS or authentication failure says what is wrong in words
                                // (wrong CA, expired or refused certificate, bad password).
                                if let Some(problem) = cfg.security.diagnose(&e) {
                                    break 'burst Err(format!("{e}: {problem}"));
                                }
                                break 'burst Err(e.to_string());
                            }
                            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                                info!(broker = %addr, session_present = ack.session_present, "connected");
                                if let Some(m) = &cfg.metrics {
                                    m.connected(&cfg.name);
                                }
                                backoff.reset();
                                is_up = true;
                                connected.send_replace(true);
                                sessions.send_replace((generation, ack.session_present));
                                if let Err(e) = subscribe(&client, &subscriptions).await {
                                    break 'burst Err(e);
                                }
                                if let Some(cb) = &cfg.on_connect {
                                    for m in cb(ack.session_present) {
                                        if let Err(e) = send_direct(&client, &mut inflight, m).await {
                                            warn!(error = %e, "direct publish on connect failed");
                                        }
                                    }
                                }
                                if let Some(ob) = &outbox {
                                    if let Err(e) = refill(&client, ob, &mut inflight, cfg.window).await {
                                        break 'burst Err(e);
                                    }
                                }
                            }
                            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                                if let Some(Some(row)) = inflight.unassigned.pop_front() {
                                    inflight.by_pkid.insert(pkid, row);
                                }
                            }
                            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                                if let Some((id, roostseq)) = inflight.by_pkid.remove(&ack.pkid) {
                                    inflight.outstanding = inflight.outstanding.saturating_sub(1);
                                    row_acks += 1;
                                    // With end-to-end confirmation an event stays until the next
                                    // hop confirms it; a PUBACK only means the broker has it in
                                    // memory.
                                    if !(confirm_events && roostseq.is_some()) {
                                        acked.push(id);
                                    }
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(mut p))) => {
                                // The acknowledgement needs only the packet id and QoS: the
                                // topic and the bytes move into the message, no copy kept.
                                let msg = Incoming {
                                    topic: std::mem::take(&mut p.topic),
                                    payload: Vec::from(std::mem::take(&mut p.payload)),
                                    retain: p.retain,
                                    connection: generation,
                                    ack: if cfg.manual_acks { Some((generation, p)) } else { None },
                                };
                                if in_tx.send(msg).await.is_err() {
                                    debug!("incoming consumer gone");
                                }
                            }
                            Ok(Event::Incoming(Packet::SubAck(s))) => {
                                // Never "subscribed" on a refusal: the connection is not usable
                                // (a cluster moving a stream leader); drop it and retry.
                                if suback_refused(&s) {
                                    break 'burst Err(format!("the broker refused a subscription ({:?})", s.return_codes));
                                }
                            }
                            Ok(_) => {}
                        }
                        budget -= 1;
                        if budget == 0 {
                            break 'burst Ok(());
                        }
                        match ev_rx.try_recv() {
                            Ok(next) => ev = next,
                            Err(_) => break 'burst Ok(()),
                        }
                    };
                    if let Some(ob) = &outbox {
                        if !acked.is_empty() {
                            ob.ack(acked);
                        }
                        // Refill in batches: one outbox read per half window, not one per
                        // PUBACK (a backlog drains at the broker's pace, not at one SQLite
                        // round trip per message).
                        if burst.is_ok() && refill_due(inflight.outstanding, cfg.window, row_acks) {
                            if let Err(e) = refill(&client, ob, &mut inflight, cfg.window).await {
                                break Err(e);
                            }
                        }
                    }
                    if let Err(e) = burst {
                        break Err(e);
                    }
                }
                cmd = cmd_rx.recv() => {
                    match cmd {
                        None => { let _ = client.try_disconnect(); break Ok(()); }
                        Some(Cmd::Acks(acks)) => {
                            let mut sent: Result<(), String> = Ok(());
                            for (g, p) in acks {
                                if g == generation && is_up {
                                    if let Err(e) = client.ack(&p).await {
                                        sent = Err(e.to_string());
                                        break;
                                    }
                                }
                            }
                            if let Err(e) = sent { break Err(e); }
                        }
                        Some(Cmd::Rewind) => {
                            // Send every message still in the outbox again, oldest first.
                            inflight.high_water = 0;
                            if let (true, Some(ob)) = (is_up, &outbox) {
                                if let Err(e) = refill(&client, ob, &mut inflight, cfg.window).await {
                                    break Err(e);
                                }
                            }
                        }
                        Some(Cmd::Direct(m)) => {
                            if is_up {
                                if let Err(e) = send_direct(&client, &mut inflight, m).await { break Err(e); }
                            }
                        }
                        Some(Cmd::ConfirmEvents(on)) => {
                            if on != confirm_events {
                                info!(on, "end-to-end confirmation of events");
                            }
                            confirm_events = on;
                        }
                        Some(Cmd::Subscriptions(filters)) => {
                            let (add, remove) = subscription_change(&subscriptions, &filters);
                            subscriptions = filters;
                            if (!add.is_empty() || !remove.is_empty()) && is_up {
                                info!(subscribe = ?add, unsubscribe = ?remove, "subscriptions changed");
                                if let Err(e) = resubscribe(&client, &add, remove).await {
                                    break Err(e);
                                }
                            }
                        }
                    }
                }
                changed = async {
                    match newest.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                }, if is_up => {
                    if changed.is_err() { newest = None; continue; }
                    if let Some(ob) = &outbox {
                        if let Err(e) = refill(&client, ob, &mut inflight, cfg.window).await {
                            break Err(e);
                        }
                    }
                }
            }
        };
        connected.send_replace(false);
        poller.abort();
        if let Some(m) = &cfg.metrics {
            match (is_up, outcome.is_err()) {
                (true, lost) => m.disconnected(&cfg.name, lost),
                (false, true) => m.connect_failed(&cfg.name),
                (false, false) => {}
            }
        }
        match outcome {
            Ok(()) => break,
            Err(error) => {
                let delay = backoff.next_delay();
                // The next attempt goes to the next address (a cluster's other node).
                let failed = addr.to_string();
                at = next_address(at, addresses.len());
                let next = &addresses[at];
                if is_up {
                    warn!(%error, broker = %failed, next = %next, retry_in_ms = delay.as_millis() as u64, "connection lost");
                } else {
                    warn!(%error, broker = %failed, next = %next, retry_in_ms = delay.as_millis() as u64, "cannot connect");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    debug!("link stopped");
}

/// Subscribes to `filters` (QoS 1) in one SUBSCRIBE; nothing for an empty list.
async fn subscribe(client: &AsyncClient, filters: &[String]) -> Result<(), String> {
    if filters.is_empty() {
        return Ok(());
    }
    let subs = filters
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
    client.subscribe_many(subs).await.map_err(|e| e.to_string())
}

/// Subscribes to `add`, then unsubscribes from `remove` (new filters first: nothing that stays
/// wanted is ever without a subscription).
async fn resubscribe(
    client: &AsyncClient,
    add: &[String],
    remove: Vec<String>,
) -> Result<(), String> {
    subscribe(client, add).await?;
    for f in remove {
        client.unsubscribe(f).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn send_direct(
    client: &AsyncClient,
    inflight: &mut Inflight,
    m: DirectMessage,
) -> Result<(), String> {
    inflight.unassigned.push_back(None);
    client
        .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
        .await
        .map_err(|e| e.to_string())
}

/// Whether the link task needs this event of the event loop: not the acknowledgements it
/// sent itself nor keepalive traffic (errors always go through).
fn forwarded(ev: &Result<Event, rumqttc::ConnectionError>) -> bool {
    !matches!(
        ev,
        Ok(Event::Outgoing(
            Outgoing::PubAck(_)
                | Outgoing::PingReq
                | Outgoing::PingResp
                | Outgoing::Subscribe(_)
                | Outgoing::Unsubscribe(_)
        )) | Ok(Event::Incoming(Packet::PingResp | Packet::UnsubAck(_)))
    )
}

/// Most events handled in one go before the link flushes PUBACKed rows and refills.
const EVENT_BURST: usize = 512;

/// Whether a burst of events calls for an outbox read: some outbox rows were acknowledged
/// and at most half the window is still outstanding (so a backlog is read in chunks of at
/// least half a window, and an idle link never reads).
fn refill_due(outstanding: usize, window: usize, row_acks: usize) -> bool {
    row_acks > 0 && outstanding <= window / 2
}

/// Hands the next outbox messages to the client, keeping at most `window` outstanding.
async fn refill(
    client: &AsyncClient,
    ob: &Outbox,
    inflight: &mut Inflight,
    window: usize,
) -> Result<(), String> {
    while inflight.outstanding < window {
        let room = window - inflight.outstanding;
        let batch = ob
            .peek_for_send(inflight.high_water, room)
            .await
            .map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(());
        }
        for m in batch {
            inflight.high_water = m.id;
            inflight.outstanding += 1;
            inflight.unassigned.push_back(Some((m.id, m.roostseq)));
            client
                .publish(m.topic, QoS::AtLeastOnce, m.retain, m.payload)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_the_link_handles_are_forwarded() {
        use rumqttc::{ConnAck, ConnectReturnCode, PubAck};
        let cases = [
            (Ok(Event::Outgoing(Outgoing::PubAck(7))), false),
            (Ok(Event::Outgoing(Outgoing::PingReq)), false),
            (Ok(Event::Outgoing(Outgoing::Subscribe(3))), false),
            (Ok(Event::Incoming(Packet::PingResp)), false),
            (Ok(Event::Outgoing(Outgoing::Publish(7))), true),
            (Ok(Event::Outgoing(Outgoing::Disconnect)), true),
            (Ok(Event::Incoming(Packet::PubAck(PubAck::new(7)))), true),
            (
                Ok(Event::Incoming(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::Success,
                    false,
                )))),
                true,
            ),
            (Err(rumqttc::ConnectionError::RequestsDone), true),
        ];
        for (ev, want) in cases {
            assert_eq!(forwarded(&ev), want, "{ev:?}");
        }
    }

    #[test]
    fn addresses_rotate_and_parse() {
        assert_eq!(next_address(0, 1), 0);
        assert_eq!(next_address(0, 3), 1);
        assert_eq!(next_address(2, 3), 0);
        assert_eq!(next_address(0, 0), 0);
        let list = BrokerAddr::parse_list("h1:1883, mqtts://h2:8883,").expect("list");
        assert_eq!(
            list.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["h1:1883", "h2:8883"]
        );
        for bad in ["", "h1", "h1:x", ":1883", "h:0"] {
            assert!(BrokerAddr::parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_endpoint_takes_hosts_or_host_and_port() {
        let parse = |t: &str| toml::from_str::<Endpoint>(t).expect("toml");
        let one = parse("host = \"a\"\nport = 1");
        assert_eq!(one.link_config("cloud", "id").addresses().len(), 1);
        let many = parse("hosts = [\"a:1\", \"b:2\"]");
        assert!(many.validate("cloud").is_ok());
        let lc = many.link_config("cloud", "id");
        assert_eq!(
            lc.addresses()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["a:1", "b:2"]
        );
        let both = parse("hosts = [\"a:1\"]\nport = 1");
        assert!(both
            .validate("cloud")
            .expect_err("refused")
            .field
            .ends_with("hosts"));
        let none = parse("host = \"a\"");
        assert!(none
            .validate("cloud")
            .expect_err("refused")
            .field
            .ends_with("port"));
        let bad = parse("hosts = [\"a\"]");
        assert!(bad
            .validate("cloud")
            .expect_err("refused")
            .field
            .ends_with("hosts"));
    }

    #[test]
    fn a_refused_subscription_is_a_failed_connection() {
        use rumqttc::{SubAck, SubscribeReasonCode as C};
        let ok = SubAck::new(
            1,
            vec![C::Success(QoS::AtLeastOnce), C::Success(QoS::AtMostOnce)],
        );
        let refused = SubAck::new(1, vec![C::Success(QoS::AtLeastOnce), C::Failure]);
        assert!(!suback_refused(&ok));
        assert!(suback_refused(&refused));
    }

    #[test]
    fn a_subscription_change_adds_the_new_and_drops_the_old_filters() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        // (old, new, subscribe, unsubscribe)
        let cases = [
            (v(&[]), v(&[]), v(&[]), v(&[])),
            (v(&["a", "b"]), v(&["a", "b"]), v(&[]), v(&[])),
            (v(&["a", "b"]), v(&["b", "a"]), v(&[]), v(&[])),
            (
                v(&["s", "g/east", "f"]),
                v(&["s", "g/south", "f"]),
                v(&["g/south"]),
                v(&["g/east"]),
            ),
            (v(&[]), v(&["a", "a", "b"]), v(&["a", "b"]), v(&[])),
            (v(&["a", "b", "b"]), v(&[]), v(&[]), v(&["a", "b"])),
            (v(&["x"]), v(&["y", "z"]), v(&["y", "z"]), v(&["x"])),
        ];
        for (old, new, add, remove) in cases {
            assert_eq!(
                subscription_change(&old, &new),
                (add, remove),
                "{old:?} -> {new:?}"
            );
        }
    }

    /// Publishes `payload` on `topic` (QoS 1) to `broker` and waits for the PUBACK.
    async fn publish(broker: std::net::SocketAddr, topic: &str, payload: &[u8], retain: bool) {
        let mut o = MqttOptions::new(
            format!("pub-{}", rand::random::<u32>()),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(o, 10);
        client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("publish");
        loop {
            match ev.poll().await.expect("poll") {
                Event::Incoming(Packet::PubAck(_)) => return,
                _ => continue,
            }
        }
    }

    /// Receives until a message on `topic` arrives; returns every topic received meanwhile.
    async fn receive_until(incoming: &mut mpsc::Receiver<Incoming>, topic: &str) -> Vec<String> {
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(m) = incoming.recv().await {
                seen.push(m.topic.clone());
                if m.topic == topic {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{topic} within 20 s; got {seen:?}"));
        seen
    }

    /// Subscriptions change on a running link: the new filter's retained message arrives,
    /// and a message on the dropped filter does not (shown by a later one on the new filter
    /// arriving first).
    #[tokio::test]
    async fn subscriptions_change_at_run_time() {
        let broker = roost_broker::spawn_free("edge").expect("broker");
        publish(broker, "t/b/1", b"retained", true).await;
        let mut cfg = LinkConfig::new("test", "127.0.0.1", broker.port(), "link-subscriptions");
        cfg.subscriptions = vec!["t/a/#".into()];
        let cancel = CancellationToken::new();
        let mut link = Link::start(cfg, None, cancel.clone()).expect("link");
        let mut connected = link.handle.connected();
        tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| *c))
            .await
            .expect("connected in 20 s")
            .expect("link alive");
        // Subscribed once a message on the filter arrives (retried: the SUBACK may be late).
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                publish(broker, "t/a/1", b"x", false).await;
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(500), link.incoming.recv()).await
                {
                    assert_eq!(m.topic, "t/a/1");
                    return;
                }
            }
        })
        .await
        .expect("t/a/1 within 20 s");
        link.handle
            .set_subscriptions(vec!["t/b/#".into()])
            .expect("set");
        let seen = receive_until(&mut link.incoming, "t/b/1").await;
        assert!(seen.iter().all(|t| t != "t/b/2"), "{seen:?}");
        publish(broker, "t/a/2", b"dropped", false).await;
        publish(broker, "t/b/2", b"marker", false).await;
        let seen = receive_until(&mut link.incoming, "t/b/2").await;
        assert!(
            seen.iter().all(|t| !t.starts_with("t/a/")),
            "nothing on the dropped filter: {seen:?}"
        );
        cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), link.task).await;
    }

    #[test]
    fn refills_only_after_row_acks_and_from_half_a_window() {
        // (outstanding, window, row PUBACKs in the burst, refill?)
        let cases = [
            (0, 64, 0, false),  // idle link, nothing acknowledged: no outbox read
            (10, 64, 0, false), // only direct messages were acknowledged
            (33, 64, 5, false), // more than half the window still out
            (32, 64, 1, true),  // half the window: read the next half
            (0, 64, 64, true),  // drained
            (0, 1, 1, true),    // a window of one refills after each PUBACK
            (1, 1, 1, false),
        ];
        for (outstanding, window, acks, want) in cases {
            assert_eq!(
                refill_due(outstanding, window, acks),
                want,
                "outstanding {outstanding}, window {window}, acks {acks}"
            );
        }
    }
}
