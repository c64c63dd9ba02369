//! `roost sim --cloud-tier`: the cloud tier alone at fleet scale, with thin stores.
//!
//! A thin store is only an MQTT client: it subscribes to its topics (its deployment topics
//! by scope and its profile) and, on each rollout it receives, publishes the events and the
//! status document a real agent would (received, started, succeeded, converged; `Converged`
//! on the rollout it wants by precedence). Thin stores share connections — 250 to one by
//! default — because 20,000 connections do not fit under this machine's open-file limit of
//! 20,000 (neither in this process nor in the broker); the broker still holds one
//! subscription set per store and every message is per store. On a 3-node NATS cluster
//! (`--cloud-broker nats`, [`crate::nats`]) 30 to one: a NATS MQTT session holds at most 63
//! QoS 1 subscriptions; connection i goes to node i mod 3 and `roost fleet` gets all three.
//!
//! `roost fleet` runs as its own process (`roost fleet --repo … --http …`), so its CPU and
//! memory are its own. The fleet repository holds an inventory of N stores (`stores/*.yaml`).
//! Measured, in order:
//! 1. controller start → every store's signed profile received;
//! 2. every store's first status document → all of them in the fleet database (documents/s);
//! 3. a fleet-repository commit adding a deployment (canary group, 10 %, 100 %), announced by
//!    `POST /hooks/git` → the first wave's message on the broker; each later wave's messages;
//!    the plan done in the fleet database;
//! 4. the retained-state audit (the one `roost fleet` runs, in this process against the same
//!    database) over every deployment topic the broker retains;
//! 5. the controller process's CPU seconds and resident memory.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost_schemas::{
    CloudEvent, DeploymentStatus, DesiredRef, EventType, Phase, Rollout, Scope, StatusDoc, Topics,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::process::KillOnDrop;
use crate::up::{commit_files, setup, UpError};

/// Options of `roost sim --cloud-tier`.
#[derive(Debug, Clone)]
pub struct CloudTierOptions {
    /// Thin stores.
    pub stores: usize,
    /// Thin stores per MQTT connection (None: [`CloudBroker::default_per_connection`]).
    pub per_connection: Option<usize>,
    /// Timeout of each phase.
    pub timeout: Duration,
    /// The cloud broker.
    pub broker: CloudBroker,
    /// The `roost` binary that runs `roost fleet`.
    pub exe: PathBuf,
}

/// The cloud broker of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudBroker {
    /// The embedded one (rumqttd) in this process.
    Embedded,
    /// mosquitto: its binary.
    Mosquitto(PathBuf),
    /// A 3-node NATS cluster ([`crate::nats`]): the nats-server binary.
    Nats(PathBuf),
}

impl CloudBroker {
    /// Thin stores per connection by default: 250, on NATS 30 (two QoS 1 subscriptions
    /// each, the canary group's and the fleet's: 62, under a session's
    /// [`crate::nats::MAX_QOS1_SUBSCRIPTIONS`]).
    pub fn default_per_connection(&self) -> usize {
        match self {
            CloudBroker::Nats(_) => 30,
            _ => 250,
        }
    }

    /// Its name in the report.
    pub fn name(&self) -> &'static str {
        match self {
            CloudBroker::Embedded => "embedded",
            CloudBroker::Mosquitto(_) => "mosquitto",
            CloudBroker::Nats(_) => "nats-cluster-3",
        }
    }
}

/// The running cloud broker: its addresses (a cluster's nodes) and processes.
enum RunningBroker {
    Embedded,
    Mosquitto(KillOnDrop),
    Nats(crate::nats::NatsCluster),
}

impl RunningBroker {
    /// The broker's processes' CPU seconds and resident memory (KiB), summed.
    fn figures(&self) -> (f64, u64) {
        let pids: Vec<u32> = match self {
            RunningBroker::Embedded => Vec::new(),
            RunningBroker::Mosquitto(m) => vec![m.0.id()],
            RunningBroker::Nats(c) => c.nodes.iter().filter_map(|n| n.pid()).collect(),
        };
        pids.into_iter()
            .map(proc_figures)
            .fold((0.0, 0), |(c, r), (c2, r2, _)| (c + c2, r + r2))
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CloudTierReport {
    /// Thin stores.
    pub stores: usize,
    /// MQTT connections they shared.
    pub connections: usize,
    /// The cloud broker.
    pub broker: String,
    /// Every thin store's subscriptions granted (ms; the broker's work: on NATS a JetStream
    /// consumer per QoS 1 subscription).
    pub subscribe_ms: u64,
    /// Filters the broker refused (failure code in the SUBACK) and the thin stores
    /// subscribed again.
    pub suback_refusals: u64,
    /// Controller start → every store's profile received (ms).
    pub start_to_profiles_ms: u64,
    /// Status documents per second into the fleet database (first document → all recorded).
    pub status_ingest_per_s: f64,
    /// Fleet-repository commit (hook) → the first wave's message received (ms).
    pub commit_to_first_wave_ms: u64,
    /// Per wave: (name, messages, commit → the wave's last message received in ms).
    pub waves: Vec<(String, usize, u64)>,
    /// Commit → the plan done in the fleet database (every store converged) (ms).
    pub commit_to_done_ms: u64,
    /// Events the thin stores published / the fleet database holds at the end.
    pub events_published: u64,
    /// Events recorded in the fleet database.
    pub events_recorded: u64,
    /// Deployment topics the broker retained in the audit.
    pub audit_topics: usize,
    /// Topics the audit republished.
    pub audit_restored: usize,
    /// One audit (ms).
    pub audit_ms: u64,
    /// The controller process: CPU seconds over the run, resident and peak memory (KiB).
    pub controller_cpu_s: f64,
    /// Resident memory at the end (KiB).
    pub controller_rss_kib: u64,
    /// Peak resident memory (KiB).
    pub controller_peak_rss_kib: u64,
    /// The broker's processes (every node of a cluster; none for the embedded one): CPU
    /// seconds over the run and resident memory at the end (KiB).
    pub broker_cpu_s: f64,
    /// Their resident memory at the end (KiB).
    pub broker_rss_kib: u64,
}

/// What a thin-store connection tells the run.
enum Seen {
    /// A store's profile arrived.
    Profile,
    /// A deployment message arrived (topic, when).
    Rollout(String, Instant),
}

/// One thin store's view of one deployment: the rollouts it holds by scope key.
#[derive(Default)]
struct Held {
    by_scope: BTreeMap<String, (u64, String, Option<roost_schemas::Origin>)>,
    reported: Option<(String, u64)>,
}

struct ThinStore {
    name: String,
    groups: Vec<String>,
    roostseq: u64,
    deployments: HashMap<String, Held>,
}

impl ThinStore {
    /// The rollout this store wants for a deployment: store scope, then its groups in
    /// order, then the fleet (the agent's precedence).
    fn wanted(&self, d: &str) -> Option<(String, u64, String, Option<roost_schemas::Origin>)> {
        let h = self.deployments.get(d)?;
        let keys = std::iter::once(Scope::Store(self.name.clone()).key())
            .chain(self.groups.iter().map(|g| Scope::Group(g.clone()).key()))
            .chain(std::iter::once(Scope::Fleet.key()));
        for k in keys {
            if let Some((seq, rev, origin)) = h.by_scope.get(&k) {
                return Some((k, *seq, rev.clone(), origin.clone()));
            }
        }
        None
    }

    fn applies(&self, scope: &Scope) -> bool {
        match scope {
            Scope::Fleet => true,
            Scope::Group(g) => self.groups.contains(g),
            Scope::Store(s) => *s == self.name,
        }
    }

    /// The events and status document of converging on what it wants now (none if it
    /// already reported that).
    fn converge(&mut self, d: &str, topics: &Topics) -> Vec<(String, bool, Vec<u8>)> {
        let Some((scope, seq, rev, origin)) = self.wanted(d) else {
            return Vec::new();
        };
        let held = self.deployments.entry(d.to_owned()).or_default();
        if held.reported.as_ref() == Some(&(scope.clone(), seq)) {
            return Vec::new();
        }
        held.reported = Some((scope.clone(), seq));
        let mut out = Vec::new();
        let data =
            serde_json::json!({"deployment": d, "revision": rev, "sequence": seq, "scope": scope});
        for ty in [
            EventType::RolloutReceived,
            EventType::ApplyStarted,
            EventType::ApplySucceeded,
            EventType::Converged,
        ] {
            self.roostseq += 1;
            let mut e = CloudEvent::new(&self.name, ty, Some(d), data.clone());
            e.roostseq = self.roostseq;
            e.id = format!("{}-{}", self.name, self.roostseq);
            out.push((
                topics.events(&self.name),
                false,
                serde_json::to_vec(&e).unwrap_or_default(),
            ));
        }
        let mut deployments = BTreeMap::new();
        deployments.insert(
            d.to_owned(),
            DeploymentStatus {
                desired: Some(DesiredRef {
                    revision: rev.clone(),
                    sequence: seq,
                    scope,
                    origin,
                }),
                applied_revision: Some(rev.clone()),
                last_attempted_revision: Some(rev),
                phase: Phase::Converged,
                ..Default::default()
            },
        );
        out.push((topics.status(&self.name), true, self.status(deployments)));
        out
    }

    fn status(&self, deployments: BTreeMap<String, DeploymentStatus>) -> Vec<u8> {
        serde_json::to_vec(&StatusDoc {
            store: self.name.clone(),
            agent_version: "thin".into(),
            updated_at: roost_schemas::now_rfc3339(),
            roostseq: self.roostseq,
            outbox_backlog: 0,
            heartbeat_s: None,
            profile_sequence: None,
            deployments,
            freshness: Default::default(),
            groups: self.groups.clone(),
        })
        .unwrap_or_default()
    }
}

/// The stores' names and groups: `store-00001`…; the first 1 % (at least one) in `canary`.
fn fleet_of(n: usize) -> Vec<(String, Vec<String>)> {
    let canary = (n / 100).max(1);
    (1..=n)
        .map(|i| {
            let groups = if i <= canary {
                vec!["canary".to_owned()]
            } else {
                Vec::new()
            };
            (format!("store-{i:05}"), groups)
        })
        .collect()
}

/// Runs one connection's thin stores until `stop`: subscribes, reports `ready`, publishes
/// every store's first status on `go`, then answers every rollout.
#[allow(clippy::too_many_arguments)]
async fn thin_connection(
    broker: std::net::SocketAddr,
    id: String,
    stores: Vec<(String, Vec<String>)>,
    seen: mpsc::UnboundedSender<Seen>,
    ready: mpsc::UnboundedSender<()>,
    mut go: watch::Receiver<bool>,
    published: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
) -> Result<(), UpError> {
    let topics = Topics::default();
    let mut o = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(4 << 20, 4 << 20);
    o.set_inflight(200);
    let (client, mut ev) = AsyncClient::new(o, 4096);
    let (tx, mut rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
    // Each SUBACK's return codes: a clustered broker refuses a filter (failure code) when
    // it cannot create its consumer in time.
    let (subacks_tx, mut subacks) = mpsc::unbounded_channel::<Vec<bool>>();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(a))) => {
                    let granted = a
                        .return_codes
                        .iter()
                        .map(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        .collect();
                    let _ = subacks_tx.send(granted);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    let mut filters: Vec<String> = Vec::new();
    let mut seen_filter = std::collections::HashSet::new();
    for (s, g) in &stores {
        for f in topics
            .store_deployment_filters(s, g)
            .into_iter()
            .chain(std::iter::once(topics.profile(s)))
        {
            if seen_filter.insert(f.clone()) {
                filters.push(f);
            }
        }
    }
    // SUBACKs come back in the order of the SUBSCRIBEs on one connection. A refused
    // filter is subscribed again after a second, as a real agent's link retries; the run
    // counts the refusals.
    let mut waiting: std::collections::VecDeque<Vec<String>> = std::collections::VecDeque::new();
    for c in filters.chunks(100) {
        subscribe_chunk(&client, c).await?;
        waiting.push_back(c.to_vec());
    }
    while let Some(chunk) = waiting.pop_front() {
        let Some(granted) = subacks.recv().await else {
            return Err(UpError::Failed("thin store connection closed".into()));
        };
        let again: Vec<String> = chunk
            .into_iter()
            .zip(granted.into_iter().chain(std::iter::repeat(false)))
            .filter(|(_, ok)| !ok)
            .map(|(f, _)| f)
            .collect();
        if !again.is_empty() {
            refused.fetch_add(again.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            subscribe_chunk(&client, &again).await?;
            waiting.push_back(again);
        }
    }
    let _ = ready.send(());
    let mut thin: Vec<ThinStore> = stores
        .into_iter()
        .map(|(name, groups)| ThinStore {
            name,
            groups,
            roostseq: 0,
            deployments: HashMap::new(),
        })
        .collect();
    let index: HashMap<String, usize> = thin
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let mut pending: Vec<rumqttc::Publish> = Vec::new();
    // Rollouts may arrive before `go` (retained): they are answered after the first status.
    while !*go.borrow() {
        tokio::select! {
            r = go.changed() => if r.is_err() { return Ok(()) },
            p = rx.recv() => match p {
                Some(p) if topics.parse_profile_topic(&p.topic).is_some() => {
                    let _ = seen.send(Seen::Profile);
                }
                Some(p) => pending.push(p),
                None => return Ok(()),
            },
        }
    }
    for s in &thin {
        client
            .publish(
                topics.status(&s.name),
                QoS::AtLeastOnce,
                true,
                s.status(BTreeMap::new()),
            )
            .await
            .map_err(setup("publish"))?;
    }
    let mut handle = |p: rumqttc::Publish, out: &mut Vec<(String, bool, Vec<u8>)>| {
        let now = Instant::now();
        if topics.parse_profile_topic(&p.topic).is_some() {
            let _ = seen.send(Seen::Profile);
            return;
        }
        let Some(t) = topics.parse_deployment(&p.topic) else {
            return;
        };
        let _ = seen.send(Seen::Rollout(p.topic.to_string(), now));
        if p.payload.is_empty() {
            return;
        }
        let Some(r) =
            roost_schemas::envelope_payload(&p.payload).and_then(|b| Rollout::from_json(&b).ok())
        else {
            return;
        };
        let targets: Vec<usize> = match &t.scope {
            Scope::Store(s) => index.get(s).copied().into_iter().collect(),
            _ => (0..thin.len())
                .filter(|&i| thin[i].applies(&t.scope))
                .collect(),
        };
        let revision = r
            .source
            .as_ref()
            .map(|s| s.revision.clone())
            .unwrap_or_default();
        for i in targets {
            let s = &mut thin[i];
            let held = s.deployments.entry(t.deployment.clone()).or_default();
            if r.remove {
                held.by_scope.remove(&t.scope.key());
            } else {
                held.by_scope.insert(
                    t.scope.key(),
                    (r.sequence, revision.clone(), r.origin.clone()),
                );
            }
            out.extend(s.converge(&t.deployment, &topics));
        }
    };
    let mut out = Vec::new();
    for p in pending.drain(..) {
        handle(p, &mut out);
    }
    loop {
        for (topic, retain, payload) in out.drain(..) {
            if !retain {
                published.fetch_add(1, Ordering::Relaxed);
            }
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .map_err(setup("publish"))?;
        }
        match rx.recv().await {
            Some(p) => handle(p, &mut out),
            None => return Ok(()),
        }
    }
}

/// Subscribes `filters` at QoS 1 in one SUBSCRIBE.
async fn subscribe_chunk(client: &AsyncClient, filters: &[String]) -> Result<(), UpError> {
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .await
        .map_err(setup("subscribe"))
}

fn proc_figures(pid: u32) -> (f64, u64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| crate::sim::stat_cpu_s(&s))
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        cpu,
        crate::sim::status_kib(&status, "VmRSS:").unwrap_or(0),
        crate::sim::status_kib(&status, "VmHWM:").unwrap_or(0),
    )
}

fn fleet_file(apps_url: &str, canary: &[String], deployment: bool) -> String {
    let mut s = format!(
        "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups:\n  canary: {{stores: [{}]}}\n",
        canary.join(", ")
    );
    if !deployment {
        s.push_str("deployments: {}\n");
    } else {
        s.push_str(&format!(
            "deployments:\n  menu:\n    source: {{url: \"{apps_url}\", ref: HEAD, path: apps/menu}}\n    waves:\n      - {{name: canary, group: canary}}\n      - {{name: tenth, percent: 10}}\n      - {{name: everyone, percent: 100}}\n    abort: {{failed_pct: 5, min_finished: 10, wave_timeout_s: 3600}}\n"
        ));
    }
    s
}

/// Polls `f` every 20 ms until it holds or `timeout` passes.
async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), UpError> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err(UpError::Timeout(timeout, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Runs the benchmark.
pub async fn run(opts: CloudTierOptions) -> Result<CloudTierReport, UpError> {
    let per_connection = opts
        .per_connection
        .unwrap_or(opts.broker.default_per_connection());
    if opts.stores == 0 || per_connection == 0 {
        return Err(UpError::Invalid(
            "--stores and --per-connection must be at least 1".into(),
        ));
    }
    // A store's deployment filter and profile, plus the fleet's and the canary group's.
    let subscriptions = 2 * per_connection + 2;
    if matches!(opts.broker, CloudBroker::Nats(_))
        && subscriptions > crate::nats::MAX_QOS1_SUBSCRIPTIONS
    {
        return Err(UpError::Invalid(format!(
            "--per-connection {per_connection}: {subscriptions} QoS 1 subscriptions on one \
             connection; a NATS MQTT session takes at most {} (at most 30 thin stores)",
            crate::nats::MAX_QOS1_SUBSCRIPTIONS
        )));
    }
    crate::workers::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!(
        "roost-sim-cloud-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(setup("temp dir"))?;
    let result = run_in(&opts, per_connection, &dir).await;
    match &result {
        Ok(_) if std::env::var_os("ROOST_SIM_KEEP").is_none() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(_) => eprintln!("sim: kept {} (ROOST_SIM_KEEP)", dir.display()),
        // Kept for its logs (`fleet.log`).
        Err(_) => eprintln!("sim: kept {} for its logs", dir.display()),
    }
    result
}

async fn run_in(
    opts: &CloudTierOptions,
    per_connection: usize,
    dir: &std::path::Path,
) -> Result<CloudTierReport, UpError> {
    // Every address of the broker (a cluster's nodes): thin-store connection i goes to
    // node i mod 3, and `roost fleet` gets them all, as a store's and a controller's list.
    let (cloud, broker): (Vec<std::net::SocketAddr>, RunningBroker) = match &opts.broker {
        CloudBroker::Mosquitto(bin) => {
            let (a, g) = crate::sim::start_mosquitto(bin, dir)?;
            (vec![a], RunningBroker::Mosquitto(g))
        }
        CloudBroker::Nats(bin) => {
            let c = crate::nats::NatsCluster::start_tuned(
                bin,
                &dir.join("nats"),
                &crate::nats::NatsTuning::fleet_scale(),
            )
            .await?;
            println!("sim: 3-node NATS cluster ready");
            (
                c.nodes.iter().map(|n| n.mqtt).collect(),
                RunningBroker::Nats(c),
            )
        }
        CloudBroker::Embedded => (
            vec![roost_broker::spawn_free("cloud").map_err(setup("cloud broker"))?],
            RunningBroker::Embedded,
        ),
    };
    let fleet = fleet_of(opts.stores);
    let canary: Vec<String> = fleet
        .iter()
        .filter(|(_, g)| !g.is_empty())
        .map(|(s, _)| s.clone())
        .collect();
    // The repositories: an app and the fleet with its inventory.
    let apps = git2::Repository::init(dir.join("apps")).map_err(setup("git init"))?;
    let mut files = BTreeMap::new();
    files.insert(
        "apps/menu/menu.yaml".to_owned(),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: menu}\n".to_owned(),
    );
    commit_files(&apps, &files, "menu")?;
    let apps_url = format!("file://{}", dir.join("apps").display());
    let fleet_dir = dir.join("fleet");
    let fleet_repo = git2::Repository::init(&fleet_dir).map_err(setup("git init"))?;
    let mut ff: BTreeMap<String, String> = crate::bench::inventory::inventory_files(opts.stores)
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    ff.insert(
        "roost.yaml".to_owned(),
        fleet_file(&apps_url, &canary, false),
    );
    commit_files(&fleet_repo, &ff, "the inventory")?;
    let (key_id, _) = roost_fleet::cloud::keygen(dir).map_err(setup("key"))?;
    // The thin stores, subscribed before the controller starts.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = watch::channel(false);
    let published = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut conns = tokio::task::JoinSet::new();
    let chunks: Vec<Vec<(String, Vec<String>)>> =
        fleet.chunks(per_connection).map(|c| c.to_vec()).collect();
    let connections = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        conns.spawn(thin_connection(
            cloud[i % cloud.len()],
            format!("roost-thin-{i}"),
            c,
            seen_tx.clone(),
            ready_tx.clone(),
            go_rx.clone(),
            published.clone(),
            refused.clone(),
        ));
    }
    drop(ready_tx);
    let t_subscribe = Instant::now();
    let deadline = tokio::time::Instant::now() + opts.timeout;
    let mut subscribed = 0;
    while subscribed < connections {
        let timed_out = || {
            UpError::Timeout(
                opts.timeout,
                format!("{subscribed}/{connections} thin-store connections subscribed"),
            )
        };
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(()) => subscribed += 1,
                None => return Err(timed_out()),
            },
            // A connection that fails before it is subscribed fails the run.
            Some(r) = conns.join_next() => match r {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) => return Err(UpError::Failed("a thin-store connection ended".into())),
                Err(e) => return Err(UpError::Failed(format!("a thin-store connection: {e}"))),
            },
            _ = tokio::time::sleep_until(deadline) => return Err(timed_out()),
        }
    }
    let report_subscribe_ms = t_subscribe.elapsed().as_millis() as u64;
    println!(
        "sim: {} thin stores subscribed over {connections} connections in {report_subscribe_ms} ms",
        opts.stores
    );
    // The controller, its own process.
    let http_port = roost_broker::free_port().map_err(setup("port"))?;
    let db_path = dir.join("fleet.db");
    let log = std::fs::File::create(dir.join("fleet.log")).map_err(setup("fleet log"))?;
    let t_start = Instant::now();
    let fleet_proc = KillOnDrop::spawn(
        std::process::Command::new(&opts.exe)
            .arg("fleet")
            .arg("--broker")
            .arg(
                cloud
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg("--db")
            .arg(&db_path)
            .arg("--repo")
            .arg(format!("file://{}", fleet_dir.display()))
            .arg("--branch")
            .arg("HEAD")
            .arg("--key")
            .arg(dir.join(format!("{key_id}.key")))
            .arg("--poll-interval")
            .arg("3600")
            .arg("--audit-interval")
            .arg("3600")
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .env(
                "ROOST_LOG",
                std::env::var("ROOST_LOG").unwrap_or("warn".into()),
            ),
        log,
    )
    .map_err(setup("roost fleet"))?;
    let pid = fleet_proc.0.id();
    let mut rollouts: Vec<(String, Instant)> = Vec::new();
    let mut profiles = 0usize;
    let deadline = Instant::now() + opts.timeout;
    while profiles < opts.stores {
        match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
            Ok(Some(Seen::Profile)) => profiles += 1,
            Ok(Some(Seen::Rollout(t, at))) => rollouts.push((t, at)),
            _ => {
                return Err(UpError::Timeout(
                    opts.timeout,
                    format!("{profiles}/{} profiles (see fleet.log)", opts.stores),
                ))
            }
        }
    }
    let mut report = CloudTierReport {
        stores: opts.stores,
        connections,
        broker: opts.broker.name().into(),
        subscribe_ms: report_subscribe_ms,
        suback_refusals: refused.load(Ordering::Relaxed),
        start_to_profiles_ms: t_start.elapsed().as_millis() as u64,
        ..Default::default()
    };
    println!(
        "sim: controller start -> {} profiles received: {} ms",
        opts.stores, report.start_to_profiles_ms
    );
    // Every store's first status document.
    let db = roost_fleet::db::FleetDb::open(&db_path).map_err(setup("fleet db"))?;
    let count = |sql: &str| {
        db.with_conn(|c| c.query_value::<i64>(sql, &[]))
            .unwrap_or(0) as u64
    };
    let t_ingest = Instant::now();
    let _ = go_tx.send(true);
    until("status ingest", opts.timeout, || {
        count("SELECT COUNT(*) FROM status") >= opts.stores as u64
    })
    .await?;
    report.status_ingest_per_s = opts.stores as f64 / t_ingest.elapsed().as_secs_f64().max(1e-9);
    println!(
        "sim: status ingest: {:.0} documents/s",
        report.status_ingest_per_s
    );
    // The commit that adds the deployment, announced by the push hook.
    ff.insert(
        "roost.yaml".to_owned(),
        fleet_file(&apps_url, &canary, true),
    );
    commit_files(&fleet_repo, &ff, "menu for every store")?;
    let t1 = Instant::now();
    hook(http_port).await?;
    let per_store = |t: &str| t.contains("/stores/");
    let tenth = (opts.stores * 10).div_ceil(100);
    let mut first_wave = None;
    let mut store_msgs = 0usize;
    let mut tenth_at = None;
    let mut all_at = None;
    rollouts.clear();
    let deadline = Instant::now() + opts.timeout;
    // Canary: its group topic; tenth: per-store messages up to 10 %; everyone: the rest.
    let expect_store_msgs = opts.stores - canary.len();
    while all_at.is_none() {
        match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
            Ok(Some(Seen::Rollout(t, at))) => {
                if t.contains("/groups/canary/") && first_wave.is_none() {
                    first_wave = Some(at);
                } else if per_store(&t) {
                    store_msgs += 1;
                    if store_msgs == tenth.saturating_sub(canary.len()) {
                        tenth_at = Some(at);
                    }
                    if store_msgs == expect_store_msgs {
                        all_at = Some(at);
                    }
                }
            }
            Ok(Some(Seen::Profile)) => {}
            _ => {
                return Err(UpError::Timeout(
                    opts.timeout,
                    format!("{store_msgs}/{expect_store_msgs} per-store wave messages"),
                ))
            }
        }
    }
    let ms = |t: Option<Instant>| {
        t.map(|t| t.duration_since(t1).as_millis() as u64)
            .unwrap_or(0)
    };
    report.commit_to_first_wave_ms = ms(first_wave);
    report.waves = vec![
        ("canary".into(), 1, ms(first_wave)),
        (
            "tenth".into(),
            tenth.saturating_sub(canary.len()),
            ms(tenth_at),
        ),
        ("everyone".into(), expect_store_msgs, ms(all_at)),
    ];
    until("plan done", opts.timeout, || {
        db.with_conn(roost_fleet::db::gitops::plans)
            .ok()
            .and_then(|p| p.get("menu").cloned())
            .is_some_and(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await?;
    report.commit_to_done_ms = t1.elapsed().as_millis() as u64;
    // Every event recorded (bounded wait: the report says what arrived).
    report.events_published = published.load(Ordering::Relaxed);
    let _ = until("events recorded", Duration::from_secs(30), || {
        count("SELECT COUNT(*) FROM events") >= report.events_published
    })
    .await;
    report.events_recorded = count("SELECT COUNT(*) FROM events");
    // The audit `roost fleet` runs, over everything the broker retains.
    let mut fopts = roost_fleet::record::FleetOptions::new(
        &cloud[0].ip().to_string(),
        cloud[0].port(),
        db_path.clone(),
        "roost-sim-audit",
    );
    fopts.fallbacks = cloud[1..]
        .iter()
        .map(|a| roost_runtime::BrokerAddr {
            host: a.ip().to_string(),
            port: a.port(),
        })
        .collect();
    fopts.leadership = roost_fleet::leadership::Leadership::solo();
    let mut auditor = roost_fleet::record::audit::Auditor::start(&fopts).map_err(setup("audit"))?;
    let t_audit = Instant::now();
    let checked = auditor.audit(&db).await.map_err(setup("audit"))?;
    report.audit_ms = t_audit.elapsed().as_millis() as u64;
    report.audit_topics = checked.held;
    report.audit_restored = checked.restored.len();
    auditor.stop().await;
    let (cpu, rss, peak) = proc_figures(pid);
    report.controller_cpu_s = cpu;
    report.controller_rss_kib = rss;
    report.controller_peak_rss_kib = peak;
    (report.broker_cpu_s, report.broker_rss_kib) = broker.figures();
    drop(fleet_proc);
    conns.abort_all();
    Ok(report)
}

/// `POST /hooks/git`: the fleet repository changed.
async fn hook(port: u16) -> Result<(), UpError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(setup("hook"))?;
    s.write_all(
        format!("POST /hooks/git HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(setup("hook"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.map_err(setup("hook"))?;
    if !resp.starts_with(b"HTTP/1.1 202") {
        return Err(UpError::Failed(format!(
            "POST /hooks/git: {}",
            String::from_utf8_lossy(&resp).lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// Prints the report.
pub fn print(r: &CloudTierReport) {
    println!(
        "roost sim --cloud-tier: {} thin stores over {} connections, {} cloud broker",
        r.stores, r.connections, r.broker
    );
    println!(
        "  thin stores subscribed: {} ms ({} filters refused and subscribed again)",
        r.subscribe_ms, r.suback_refusals
    );
    println!(
        "  controller start -> every profile received: {} ms",
        r.start_to_profiles_ms
    );
    println!(
        "  status ingest into the fleet DB: {:.0} documents/s",
        r.status_ingest_per_s
    );
    println!(
        "  fleet-repo commit (hook) -> first wave published: {} ms",
        r.commit_to_first_wave_ms
    );
    for (name, n, ms) in &r.waves {
        println!("  commit -> wave {name} received by its stores ({n} messages): {ms} ms");
    }
    println!(
        "  commit -> plan done (every store converged): {} ms",
        r.commit_to_done_ms
    );
    println!(
        "  events: {} published, {} recorded",
        r.events_published, r.events_recorded
    );
    println!(
        "  broker audit: {} topics held, {} restored, {} ms",
        r.audit_topics, r.audit_restored, r.audit_ms
    );
    println!(
        "  roost fleet process: {:.1} CPU-s, RSS {} MiB (peak {} MiB)",
        r.controller_cpu_s,
        r.controller_rss_kib / 1024,
        r.controller_peak_rss_kib / 1024
    );
    if r.broker_cpu_s > 0.0 {
        println!(
            "  broker processes ({}): {:.1} CPU-s, RSS {} MiB",
            r.broker,
            r.broker_cpu_s,
            r.broker_rss_kib / 1024
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thin_store_wants_by_precedence_and_reports_once() {
        let topics = Topics::default();
        let mut s = ThinStore {
            name: "store-00001".into(),
            groups: vec!["canary".into()],
            roostseq: 0,
            deployments: HashMap::new(),
        };
        assert!(s.applies(&Scope::Fleet));
        assert!(s.applies(&Scope::Group("canary".into())));
        assert!(!s.applies(&Scope::Group("other".into())));
        assert!(!s.applies(&Scope::Store("store-00002".into())));
        let h = s.deployments.entry("menu".into()).or_default();
        h.by_scope.insert("fleet".into(), (5, "a".into(), None));
        h.by_scope
            .insert("group:canary".into(), (7, "b".into(), None));
        assert_eq!(
            s.wanted("menu").map(|w| (w.0, w.1)),
            Some(("group:canary".into(), 7))
        );
        let out = s.converge("menu", &topics);
        assert_eq!(out.len(), 5, "four events and the status");
        assert_eq!(s.roostseq, 4);
        assert!(out[4].1, "the status is retained");
        assert!(s.converge("menu", &topics).is_empty(), "reported once");
        s.deployments.get_mut("menu").map(|h| {
            h.by_scope
                .insert("store:store-00001".into(), (9, "c".into(), None))
        });
        assert_eq!(s.converge("menu", &topics).len(), 5);
        assert_eq!(s.roostseq, 8);
    }
}
