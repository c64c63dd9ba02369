//! `roost sim`: the fleet benchmark. Runs N stores in this process (files target; bridged:
//! an edge broker, a bridge and an agent each; direct: agents on the cloud broker), publishes
//! K successive fleet rollouts through the cloud broker and measures, per store and rollout,
//! the time from publishing the signed rollout to the store's `converged` event arriving at
//! the cloud, where that time went (from the events' own timestamps), and whether any event
//! was lost (by `roostseq`) or duplicated. Prints percentiles, not pass/fail.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use roost_schemas::{CloudEvent, Policy, Scope, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::process::KillOnDrop;
use crate::up::{self, setup, GitDaemon, UpError};
use crate::workers::{
    fds_per_store, raise_fd_limit, start_stores, stores_per_process, StoreRange, Workers,
};
use roost_fleet::cloud::{self, RolloutSpec};

/// How stores reach the cloud broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Agents connect to the cloud broker (no edge broker, no bridge).
    Direct,
    /// Per store an edge broker and a bridge.
    Bridged,
}

/// Options of `roost sim`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Stores.
    pub stores: usize,
    /// Successive rollouts.
    pub rollouts: usize,
    /// Per-rollout timeout.
    pub timeout: Duration,
    /// Topology (default: direct above 200 stores).
    pub topology: Topology,
    /// The Git server's `--max-connections` (0: unlimited; git-daemon's default is 32).
    pub git_max_connections: u32,
    /// Which Git server serves the fleet.
    pub git_server: GitServerKind,
    /// The cloud broker: `None` for the embedded one, or a mosquitto binary to run.
    pub cloud_mosquitto: Option<std::path::PathBuf>,
    /// Where the stores' state directories go (default: the system's temporary directory).
    pub state_dir: Option<std::path::PathBuf>,
    /// Run `roost fleet`'s record in the process (`--fleet-record`): None, or with end-to-end
    /// confirmations on (true) or off (false), to measure what confirmation costs.
    pub fleet_record: Option<bool>,
    /// The `roost` binary to start worker processes with (`roost sim --worker`) when the
    /// stores do not fit under one process's open-file limit; None: one process only.
    pub worker_exe: Option<std::path::PathBuf>,
}

pub(crate) fn start_mosquitto(
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(std::net::SocketAddr, KillOnDrop), UpError> {
    let port = roost_broker::free_port().map_err(setup("port"))?;
    let conf = dir.join("mosquitto.conf");
    // No persistence: the embedded broker has none either, and retained rollouts are
    // published once per round. No queue limit: a store must never miss its rollout.
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\nmax_queued_messages 0\nmax_inflight_messages 200\nuser root\n"),
    )
    .map_err(setup("mosquitto.conf"))?;
    let log = std::fs::File::create(dir.join("mosquitto.log")).map_err(setup("mosquitto.log"))?;
    let guard = KillOnDrop::spawn(std::process::Command::new(bin).arg("-c").arg(&conf), log)
        .map_err(setup("mosquitto (is it installed?)"))?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    roost_broker::wait_listening(addr, Duration::from_secs(10)).map_err(setup("mosquitto"))?;
    Ok((addr, guard))
}

/// The fleet's one Git server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitServerKind {
    /// `git daemon`: a `git-upload-pack` and `git pack-objects` process per fetch.
    Daemon,
    /// `roost git-serve` in this process: one pack per (wants, haves), cached.
    Roost,
}

impl GitServerKind {
    /// The name on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            GitServerKind::Daemon => "daemon",
            GitServerKind::Roost => "roost",
        }
    }
}

/// The running Git server.
enum FleetGit {
    Daemon(GitDaemon),
    Roost(roost_fleet::gitserve::GitServer),
}

impl FleetGit {
    fn start(kind: GitServerKind, base: &std::path::Path, limit: u32) -> Result<Self, UpError> {
        Ok(match kind {
            GitServerKind::Daemon => FleetGit::Daemon(GitDaemon::start_limited(base, limit)?),
            GitServerKind::Roost => FleetGit::Roost(
                roost_fleet::gitserve::GitServer::start(roost_fleet::gitserve::GitServeConfig {
                    base: base.to_owned(),
                    listen: ([127, 0, 0, 1], 0).into(),
                    cache_bytes: 256 << 20,
                })
                .map_err(setup("git server"))?,
            ),
        })
    }

    fn port(&self) -> u16 {
        match self {
            FleetGit::Daemon(d) => d.port,
            FleetGit::Roost(s) => s.addr.port(),
        }
    }

    fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port())
    }
}

/// Results of a run.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// CPU seconds of the process from the first rollout's publish to the end (setup
    /// excluded).
    pub rollouts_cpu_s: f64,
    /// Rollout → converged latencies (ms), all stores and rollouts.
    pub latencies_ms: Vec<u64>,
    /// Per rollout, time until the whole fleet converged (ms).
    pub fleet_ms: Vec<u64>,
    /// Resident memory at the end (KiB), for the whole process.
    pub rss_kib: Option<u64>,
    /// Peak resident memory (KiB).
    pub peak_rss_kib: Option<u64>,
    /// CPU seconds (user + system) of the process.
    pub cpu_s: f64,
    /// Stores that converged in every round / that failed or degraded.
    pub converged: usize,
    /// Stores with a failed or degraded round.
    pub failed: usize,
    /// Events every store should have delivered (its highest roostseq seen, summed).
    pub events_expected: u64,
    /// Distinct events received.
    pub events_received: u64,
    /// Duplicate deliveries (by id).
    pub duplicates: u64,
    /// Where the time went, per store and round (ms): name → sorted values.
    pub breakdown: BTreeMap<&'static str, Vec<u64>>,
    /// Fetches the roost Git server answered (0 for git daemon, which does not say).
    pub git_fetches: u64,
    /// Packs it built for them (the rest came from its cache).
    pub git_packs_built: u64,
    /// Processes the stores ran in (this one and its workers).
    pub processes: usize,
}

fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .map(|s| stat_cpu_s(&s))
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) from a `/proc/<pid>/stat` line.
pub(crate) fn stat_cpu_s(stat: &str) -> f64 {
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `kB` figure (`VmRSS:`, `VmHWM:`) from a `/proc/<pid>/status` text.
pub(crate) fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn peak_rss_kib() -> Option<u64> {
    status_kib(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

fn ms_of(t: &str) -> Option<i128> {
    roost_schemas::parse_rfc3339(t).map(|t| t.unix_timestamp_nanos() / 1_000_000)
}

/// The p-th percentile (nearest rank) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rss_kib() -> Option<u64> {
    status_kib(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
}

/// The soft limit of open files in force (from /proc/self/limits; 0 if unknown). Every
/// store holds sockets, SQLite files and a file watcher (about 8 descriptors direct, 24
/// bridged); `roost sim` raises the soft limit to the hard one before it starts and spreads
/// the stores over worker processes when they do not fit under it.
pub fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs the benchmark.
pub async fn run(opts: SimOptions) -> Result<SimReport, UpError> {
    if opts.stores == 0 || opts.rollouts == 0 {
        return Err(UpError::Invalid(
            "--stores and --rollouts must be at least 1".into(),
        ));
    }
    raise_fd_limit();
    let fd_limit = fd_limit();
    let per_store = fds_per_store(opts.topology);
    let dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!(
            "roost-sim-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
    std::fs::create_dir_all(&dir).map_err(setup("temp dir"))?;
    let (cloud_addr, _mosquitto) = match &opts.cloud_mosquitto {
        Some(bin) => {
            let (a, g) = start_mosquitto(bin, &dir)?;
            (a, Some(g))
        }
        None => (
            roost_broker::spawn_free("cloud").map_err(setup("cloud broker"))?,
            None,
        ),
    };
    let broker = cloud_addr.to_string();
    let repos = dir.join("repos");
    let sample = up::create_sample_repo(&repos.join("fleet.git"))?;
    let repo = git2::Repository::open(&sample.path).map_err(setup("repo"))?;
    let daemon = FleetGit::start(opts.git_server, &repos, opts.git_max_connections)?;
    let key = roost_schemas::SigningKey::generate().map_err(setup("key"))?;
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let stores = StoreRange {
        first: 1,
        count: opts.stores,
        topology: opts.topology,
        cloud: cloud_addr,
        git_port: daemon.port(),
        dir: dir.clone(),
    };
    // The stores in this process when they fit under its open-file limit, else spread over
    // worker processes (`roost sim --worker`), each under its own limit, the way real stores
    // are separate processes anyway.
    let per_process = stores_per_process(opts.topology, fd_limit);
    let workers = if opts.stores <= per_process {
        start_stores(&stores, &key, &cancel, &mut tasks).await?;
        Workers::none()
    } else {
        let exe = opts.worker_exe.clone().ok_or_else(|| {
            UpError::Invalid(format!(
                "{} stores need about {} open files; the limit here is {fd_limit} and this build cannot start worker processes",
                opts.stores,
                opts.stores as u64 * per_store + 256
            ))
        })?;
        Workers::start(&exe, &stores, per_process, &key, &dir)?
    };
    println!(
        "sim: {} stores started in {} ms",
        opts.stores,
        started.elapsed().as_millis()
    );
    if let Some(confirm) = opts.fleet_record {
        let db_path = dir.join("fleet.db");
        let db = roost_fleet::db::FleetDb::open(&db_path).map_err(setup("fleet db"))?;
        let mut fopts = roost_fleet::record::FleetOptions::new(
            &cloud_addr.ip().to_string(),
            cloud_addr.port(),
            db_path,
            "roost-sim-fleet",
        );
        fopts.confirm = confirm;
        let c = cancel.clone();
        tasks.spawn(async move {
            if let Err(error) = roost_fleet::record::run(fopts, db, c).await {
                tracing::warn!(%error, "fleet record stopped");
            }
        });
    }
    let topics = Topics::default();
    let (client, mut ev) = cloud::connect(&broker, "roost-sim").map_err(setup("observer"))?;
    client
        .subscribe(
            topics.all_stores(roost_schemas::topics::StoreTopicKind::Events),
            QoS::AtLeastOnce,
        )
        .await
        .map_err(setup("subscribe"))?;
    client
        .subscribe(
            topics.all_stores(roost_schemas::topics::StoreTopicKind::Status),
            QoS::AtLeastOnce,
        )
        .await
        .map_err(setup("subscribe"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(CloudEvent, Instant)>();
    let (status_tx, mut status_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let observer = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/status") {
                        if let Ok(doc) =
                            serde_json::from_slice::<roost_schemas::StatusDoc>(&p.payload)
                        {
                            let _ = status_tx.send(doc.store);
                        }
                    } else if let Ok(e) = serde_json::from_slice::<CloudEvent>(&p.payload) {
                        if tx.send((e, Instant::now())).is_err() {
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    // Every store is connected (and subscribed, which it does before it publishes) once its
    // status document reached the cloud: only then does the first rollout go out, so round 1
    // measures convergence, not connection setup (the broker accepts one connection per ms).
    {
        let mut online = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + opts.timeout;
        while online.len() < opts.stores {
            match tokio::time::timeout_at(deadline, status_rx.recv()).await {
                Ok(Some(store)) => {
                    online.insert(store);
                }
                _ => {
                    return Err(UpError::Timeout(
                        opts.timeout,
                        format!("{}/{} stores connected", online.len(), opts.stores),
                    ))
                }
            }
        }
    }
    println!(
        "sim: {} stores connected in {} ms",
        opts.stores,
        started.elapsed().as_millis()
    );
    let mut latencies = Vec::new();
    let mut fleet_ms = Vec::new();
    let mut report = SimReport::default();
    // Every event seen: per store the roostseqs and ids, to count losses and duplicates.
    let mut seqs: HashMap<String, std::collections::BTreeSet<u64>> = HashMap::new();
    let mut ids: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut failed_stores: std::collections::BTreeSet<String> = Default::default();
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let cpu_at_first_rollout = cpu_s() + workers.cpu_s();
    for round in 1..=opts.rollouts {
        // A new revision each round: the config map changes.
        let revision = if round == 1 {
            sample.first.clone()
        } else {
            let head = repo
                .head()
                .and_then(|h| h.peel_to_commit())
                .map_err(setup("head"))?;
            let tree = head.tree().map_err(setup("tree"))?;
            if files.is_empty() {
                tree.walk(git2::TreeWalkMode::PreOrder, |root, e| {
                    if let Ok(blob) = e.to_object(&repo).and_then(|o| o.peel_to_blob()) {
                        files.insert(
                            format!("{root}{}", e.name().unwrap_or_default()),
                            String::from_utf8_lossy(blob.content()).into_owned(),
                        );
                    }
                    git2::TreeWalkResult::Ok
                })
                .map_err(setup("walk"))?;
            }
            files.insert(
                "apps/kitchen-display/round.txt".into(),
                format!("round {round}\n"),
            );
            up::commit_files(&repo, &files, &format!("round {round}"))?
        };
        let spec = RolloutSpec {
            schedule: Default::default(),
            deployment: "kitchen-display".into(),
            scope: Scope::Fleet,
            url: daemon.url("fleet.git"),
            revision: revision.clone(),
            path: "apps/kitchen-display".into(),
            policy: Policy::default(),
            not_before: None,
            remove: false,
            sequence: Some(round as u64),
            origin: None,
        };
        let t0 = Instant::now();
        let t0_wall = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        cloud::rollout(&broker, &topics, std::slice::from_ref(&key), &spec)
            .await
            .map_err(setup("rollout"))?;
        let mut done: HashMap<String, u64> = HashMap::new();
        // Per store this round: event type -> (event time ms, arrival ms since t0), fetch/build.
        let mut marks: HashMap<String, HashMap<&'static str, (i128, u64)>> = HashMap::new();
        let mut stage_ms: HashMap<String, (u64, u64)> = HashMap::new();
        let deadline = tokio::time::Instant::now() + opts.timeout;
        while done.len() < opts.stores {
            let Ok(Some((e, at))) = tokio::time::timeout_at(deadline, rx.recv()).await else {
                return Err(UpError::Timeout(
                    opts.timeout,
                    format!(
                        "round {round}: {}/{} stores converged",
                        done.len(),
                        opts.stores
                    ),
                ));
            };
            let arrival = at.saturating_duration_since(t0).as_millis() as u64;
            if !ids.insert(e.id.clone()) {
                report.duplicates += 1;
                continue;
            }
            seqs.entry(e.source.clone()).or_default().insert(e.roostseq);
            let ours = e
                .rollout_ref()
                .is_some_and(|r| r.revision.as_deref() == Some(revision.as_str()));
            if !ours {
                continue;
            }
            let kind = match e.event_type() {
                Some(roost_schemas::EventType::RolloutReceived) => "received",
                Some(roost_schemas::EventType::ApplyStarted) => {
                    if let Some(s) = e.typed::<roost_schemas::payload::ApplyStarted>() {
                        stage_ms.insert(
                            e.source.clone(),
                            (s.fetch_ms.unwrap_or(0), s.build_ms.unwrap_or(0)),
                        );
                    }
                    "started"
                }
                Some(roost_schemas::EventType::ApplySucceeded) => "applied",
                Some(roost_schemas::EventType::Converged) => "converged",
                Some(roost_schemas::EventType::ApplyFailed)
                | Some(roost_schemas::EventType::Degraded)
                | Some(roost_schemas::EventType::RolloutRejected) => {
                    failed_stores.insert(e.source.clone());
                    continue;
                }
                _ => continue,
            };
            if let Some(t) = ms_of(&e.time) {
                marks
                    .entry(e.source.clone())
                    .or_default()
                    .entry(kind)
                    .or_insert((t, arrival));
            }
            if kind == "converged" {
                done.entry(e.source.clone()).or_insert(arrival);
            }
        }
        for (store, m) in &marks {
            let get = |k: &str| m.get(k).copied();
            let (fetch, build) = stage_ms.get(store).copied().unwrap_or((0, 0));
            let mut put = |k: &'static str, v: i128| {
                report.breakdown.entry(k).or_default().push(v.max(0) as u64);
            };
            if let Some((rt, _)) = get("received") {
                put("mqtt_delivery", rt - t0_wall);
                if let Some((st, _)) = get("started") {
                    put("queue_before_fetch", (st - rt) - (fetch + build) as i128);
                    put("git_fetch", fetch as i128);
                    put("render", build as i128);
                    if let Some((at, _)) = get("applied") {
                        put("apply", at - st);
                        if let Some((ct, arrival)) = get("converged") {
                            put("health", ct - at);
                            put("report", (t0_wall + arrival as i128) - ct);
                        }
                    }
                }
            }
        }
        let mut round_lat: Vec<u64> = done.values().copied().collect();
        round_lat.sort_unstable();
        fleet_ms.push(*round_lat.last().unwrap_or(&0));
        latencies.extend(round_lat);
    }
    // The workers' share, read while they still run.
    let workers_cpu_s = workers.cpu_s();
    let workers_rss_kib = workers.rss_kib();
    report.processes = 1 + workers.len();
    drop(workers);
    observer.abort();
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if let FleetGit::Roost(s) = &daemon {
        let st = s.stats();
        report.git_fetches = st.fetches;
        report.git_packs_built = st.packs_built;
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort_unstable();
    for v in report.breakdown.values_mut() {
        v.sort_unstable();
    }
    report.events_expected = seqs.values().map(|s| s.last().copied().unwrap_or(0)).sum();
    report.events_received = seqs.values().map(|s| s.len() as u64).sum();
    report.failed = failed_stores.len();
    report.converged = opts.stores - report.failed;
    report.latencies_ms = latencies;
    report.fleet_ms = fleet_ms;
    report.rss_kib = rss_kib().map(|k| k + workers_rss_kib);
    report.peak_rss_kib = peak_rss_kib();
    report.cpu_s = cpu_s() + workers_cpu_s;
    report.rollouts_cpu_s = report.cpu_s - cpu_at_first_rollout;
    Ok(report)
}

/// The report as one JSON line.
pub fn json(opts: &SimOptions, r: &SimReport) -> serde_json::Value {
    let l = &r.latencies_ms;
    let pct = |v: &[u64]| serde_json::json!({"p50": percentile(v, 50.0), "p95": percentile(v, 95.0), "p99": percentile(v, 99.0), "max": v.last().copied().unwrap_or(0)});
    serde_json::json!({
        "stores": opts.stores,
        "rollouts": opts.rollouts,
        "topology": match opts.topology { Topology::Direct => "direct", Topology::Bridged => "bridged" },
        "git_server": opts.git_server.as_str(),
        "cloud_broker": if opts.cloud_mosquitto.is_some() { "mosquitto" } else { "embedded" },
        "git_fetches": r.git_fetches,
        "git_packs_built": r.git_packs_built,
        "converged": r.converged,
        "failed": r.failed,
        "p50_ms": percentile(l, 50.0),
        "p95_ms": percentile(l, 95.0),
        "p99_ms": percentile(l, 99.0),
        "max_ms": l.last().copied().unwrap_or(0),
        "events_expected": r.events_expected,
        "events_received": r.events_received,
        "events_lost": r.events_expected.saturating_sub(r.events_received),
        "duplicates": r.duplicates,
        "cpu_s": (r.cpu_s * 100.0).round() / 100.0,
        "rollouts_cpu_s": (r.rollouts_cpu_s * 100.0).round() / 100.0,
        "fleet_record": match opts.fleet_record { None => "none", Some(true) => "confirm", Some(false) => "no-confirm" },
        "peak_rss_bytes": r.peak_rss_kib.unwrap_or(0) * 1024,
        "processes": r.processes.max(1),
        "rss_bytes": r.rss_kib.unwrap_or(0) * 1024,
        "rss_per_store_kib": r.rss_kib.unwrap_or(0) / opts.stores.max(1) as u64,
        "cpu_ms_per_store_rollout": ((r.rollouts_cpu_s * 1000.0 / (opts.stores * opts.rollouts).max(1) as f64) * 100.0).round() / 100.0,
        "breakdown_ms": r.breakdown.iter().map(|(k, v)| (k.to_string(), pct(v))).collect::<serde_json::Map<_, _>>(),
    })
}

/// Prints a report.
pub fn print(opts: &SimOptions, r: &SimReport) {
    let l = &r.latencies_ms;
    let mut f = r.fleet_ms.clone();
    f.sort_unstable();
    println!(
        "sim: stores={} rollouts={} rollout->converged ms: p50={} p90={} p99={} max={} (n={})",
        opts.stores,
        opts.rollouts,
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        l.last().copied().unwrap_or(0),
        l.len()
    );
    println!(
        "sim: whole fleet converged ms: median={} max={}",
        percentile(&f, 50.0),
        f.last().copied().unwrap_or(0)
    );
    let lost = r.events_expected.saturating_sub(r.events_received);
    println!(
        "sim: events expected={} received={} lost={lost} duplicates={}; cpu {:.1} s; peak RSS {} MiB",
        r.events_expected,
        r.events_received,
        r.duplicates,
        r.cpu_s,
        r.peak_rss_kib.unwrap_or(0) / 1024
    );
    for (k, v) in &r.breakdown {
        println!(
            "sim: {k:<20} p50={} p95={} p99={} max={} ms",
            percentile(v, 50.0),
            percentile(v, 95.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or(0)
        );
    }
    if let Some(kib) = r.rss_kib {
        println!(
            "sim: RSS {} MiB for {} stores in {} process(es) ({} KiB/store{})",
            kib / 1024,
            opts.stores,
            r.processes.max(1),
            kib / opts.stores as u64,
            match opts.topology {
                Topology::Bridged => " incl. an edge broker and a bridge each",
                Topology::Direct => "",
            }
        );
    }
    println!(
        "sim: {:.1} ms CPU per store and rollout ({:.1} CPU-s over {} store-rollouts, every process)",
        r.rollouts_cpu_s * 1000.0 / (opts.stores * opts.rollouts).max(1) as f64,
        r.rollouts_cpu_s,
        opts.stores * opts.rollouts
    );
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), 5);
        assert_eq!(percentile(&v, 90.0), 9);
        assert_eq!(percentile(&v, 100.0), 10);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
