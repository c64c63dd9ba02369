//! `roost sim`: the fleet benchmark. Runs N stores in this process (edge broker, bridge and
//! agent each, files target), publishes K successive fleet rollouts through the cloud broker
//! and measures, per store and rollout, the time from publishing the signed rollout to the
//! store's `converged` event arriving at the cloud. Prints percentiles, not pass/fail.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use roost_agent::config::TargetConfig;
use roost_schemas::{CloudEvent, Policy, Scope, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::cloud::{self, RolloutSpec};
use crate::up::{self, GitDaemon, StoreSpec, UpError};

/// Options of `roost sim`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Stores.
    pub stores: usize,
    /// Successive rollouts.
    pub rollouts: usize,
    /// Per-rollout timeout.
    pub timeout: Duration,
}

/// Results of a run.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Rollout → converged latencies (ms), all stores and rollouts.
    pub latencies_ms: Vec<u64>,
    /// Per rollout, time until the whole fleet converged (ms).
    pub fleet_ms: Vec<u64>,
    /// Resident memory at the end (KiB), for the whole process.
    pub rss_kib: Option<u64>,
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
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn err<E: std::fmt::Display>(ctx: &'static str) -> impl Fn(E) -> UpError {
    move |e| UpError::Setup(format!("{ctx}: {e}"))
}

/// Runs the benchmark.
pub async fn run(opts: SimOptions) -> Result<SimReport, UpError> {
    if opts.stores == 0 || opts.rollouts == 0 {
        return Err(UpError::Setup(
            "--stores and --rollouts must be at least 1".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!(
        "roost-sim-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(err("temp dir"))?;
    let cloud_addr = crate::broker::spawn_free("cloud").map_err(err("cloud broker"))?;
    let broker = cloud_addr.to_string();
    let repos = dir.join("repos");
    let sample = up::create_sample_repo(&repos.join("fleet.git"))?;
    let repo = git2::Repository::open(&sample.path).map_err(err("repo"))?;
    let daemon = GitDaemon::start(&repos)?;
    let key = roost_schemas::SigningKey::generate().map_err(err("key"))?;
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 1..=opts.stores {
        let name = up::store_name(i);
        let edge = crate::broker::spawn_free("edge").map_err(err("edge broker"))?;
        let spec = StoreSpec {
            store: name.clone(),
            groups: up::store_groups(i),
            dir: dir.join(&name),
            edge,
            cloud: cloud_addr,
            allowed: format!("git://127.0.0.1:{}/", daemon.port),
            target: TargetConfig::Files(Default::default()),
        };
        let (a, b) = up::store_configs(&spec, &key)?;
        let c = cancel.clone();
        tasks.spawn(async move {
            let _ = roost_bridge::run(b, c).await;
        });
        let c = cancel.clone();
        tasks.spawn(async move {
            let _ = roost_agent::run(a, c).await;
        });
    }
    println!(
        "sim: {} stores started in {} ms",
        opts.stores,
        started.elapsed().as_millis()
    );
    let topics = Topics::default();
    let (client, mut ev) = cloud::connect(&broker, "roost-sim").map_err(err("observer"))?;
    client
        .subscribe(
            topics.all_stores(roost_schemas::topics::StoreTopicKind::Events),
            QoS::AtLeastOnce,
        )
        .await
        .map_err(err("subscribe"))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(CloudEvent, Instant)>();
    let observer = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(e) = serde_json::from_slice::<CloudEvent>(&p.payload) {
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
    let mut latencies = Vec::new();
    let mut fleet_ms = Vec::new();
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for round in 1..=opts.rollouts {
        // A new revision each round: the config map changes.
        let revision = if round == 1 {
            sample.first.clone()
        } else {
            let head = repo
                .head()
                .and_then(|h| h.peel_to_commit())
                .map_err(err("head"))?;
            let tree = head.tree().map_err(err("tree"))?;
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
                .map_err(err("walk"))?;
            }
            files.insert(
                "apps/kitchen-display/round.txt".into(),
                format!("round {round}\n"),
            );
            up::commit_files(&repo, &files, &format!("round {round}"))?
        };
        let spec = RolloutSpec {
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
        cloud::rollout(&broker, &topics, std::slice::from_ref(&key), &spec)
            .await
            .map_err(err("rollout"))?;
        let mut done: HashMap<String, u64> = HashMap::new();
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
            if e.typed::<roost_schemas::payload::Converged>()
                .is_some_and(|c| c.rollout.revision.as_deref() == Some(revision.as_str()))
            {
                done.entry(e.source.clone())
                    .or_insert_with(|| at.saturating_duration_since(t0).as_millis() as u64);
            }
        }
        let mut round_lat: Vec<u64> = done.values().copied().collect();
        round_lat.sort_unstable();
        fleet_ms.push(*round_lat.last().unwrap_or(&0));
        latencies.extend(round_lat);
    }
    observer.abort();
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    latencies.sort_unstable();
    Ok(SimReport {
        latencies_ms: latencies,
        fleet_ms,
        rss_kib: rss_kib(),
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
    if let Some(kib) = r.rss_kib {
        println!(
            "sim: process RSS {} MiB for {} stores ({} KiB/store incl. an edge broker each)",
            kib / 1024,
            opts.stores,
            kib / opts.stores as u64
        );
    }
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
