//! `roost bench outbox`: a store that was offline builds a backlog of N events in its SQLite
//! outbox (durable enqueue, the agent's own API and settings); then its link comes up. Reports
//! the enqueue rate, the drain rate to the edge broker (until the outbox is empty), and, with
//! a second backlog, the time until the cloud broker has every event through a roost bridge.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roost_runtime::{Endpoint, Link, LinkConfig, NewMessage, Outbox, OutboxConfig};
use roost_schemas::payload::Converged;
use roost_schemas::{EventData, RolloutRef, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::{setup, BenchError, TempDir};

const STORE: &str = "bench-outbox";

/// Options.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Events in the backlog.
    pub events: usize,
}

/// A valid event of this store (what the bridge lets go up), `pad` bytes of message body.
pub fn event(store: &str, n: u64) -> roost_schemas::CloudEvent {
    EventData::Converged(Converged {
        rollout: RolloutRef {
            deployment: "bench".into(),
            revision: Some(format!("{n:040x}")),
            sequence: n,
            scope: "fleet".into(),
        },
    })
    .into_event(&format!("roost://stores/{store}/agent"))
}

/// Enqueues `n` events with 32 concurrent producers, one event per call (as the agent's
/// workers do; the writer group-commits what is waiting). Returns the seconds it took.
async fn fill(outbox: &Outbox, n: usize) -> Result<f64, BenchError> {
    let topic = Topics::default().events(STORE);
    let t = Instant::now();
    let producers = 32usize;
    let mut set = tokio::task::JoinSet::new();
    for p in 0..producers {
        let (ob, topic) = (outbox.clone(), topic.clone());
        let count = n / producers + usize::from(p < n % producers);
        set.spawn(async move {
            for i in 0..count {
                ob.enqueue(vec![NewMessage::event(
                    topic.clone(),
                    event(STORE, (p * 1_000_000 + i) as u64),
                )])
                .await?;
            }
            Ok::<_, roost_runtime::OutboxError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(setup("producer"))?.map_err(setup("enqueue"))?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Counts distinct roostseqs of events arriving on `broker` (store events topic).
async fn counter(
    broker: SocketAddr,
) -> Result<
    (
        tokio::sync::watch::Receiver<usize>,
        tokio::task::JoinHandle<()>,
    ),
    BenchError,
> {
    let (client, mut ev) = roost_fleet::cloud::connect(&broker.to_string(), "roost-bench-count")
        .map_err(setup("count"))?;
    client
        .subscribe(Topics::default().events(STORE), QoS::AtLeastOnce)
        .await
        .map_err(setup("subscribe"))?;
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut sub_tx = Some(sub_tx);
        let mut seen = HashSet::new();
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = sub_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(e) = serde_json::from_slice::<roost_schemas::CloudEvent>(&p.payload) {
                        if seen.insert(e.roostseq) {
                            tx.send_replace(seen.len());
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), sub_rx)
        .await
        .map_err(|_| BenchError::Timeout("counter SUBACK".into()))?
        .map_err(|_| BenchError::Failed("counter stopped".into()))?;
    Ok((rx, task))
}

async fn wait_count(
    rx: &mut tokio::sync::watch::Receiver<usize>,
    n: usize,
    timeout: Duration,
) -> Result<(), BenchError> {
    let res = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
        .await
        .map(|r| r.is_ok());
    match res {
        Ok(true) => Ok(()),
        Ok(false) => Err(BenchError::Failed("counter stopped".into())),
        Err(_) => Err(BenchError::Timeout(format!(
            "{} of {n} events arrived",
            *rx.borrow()
        ))),
    }
}

fn link(name: &str, edge: SocketAddr) -> LinkConfig {
    let mut lc = Endpoint::local(edge, 10).link_config(name, &format!("roost-agent-{STORE}"));
    lc.max_packet_size = 2 * 1024 * 1024;
    lc
}

fn open(dir: &std::path::Path, name: &str) -> Result<Outbox, BenchError> {
    // The agent's settings: 256 MiB cap, overflow reported on the events topic.
    let mut cfg = OutboxConfig::new(dir.join(name));
    cfg.overflow = Some(roost_runtime::outbox::OverflowTarget {
        topic: Topics::default().events(STORE),
        source: format!("roost://stores/{STORE}/agent"),
    });
    Outbox::open(cfg).map_err(setup("outbox"))
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(opts: &OutboxOptions) -> Result<serde_json::Value, BenchError> {
    let n = opts.events.max(1);
    let dir = TempDir::new("outbox")?;
    let cancel = CancellationToken::new();
    let rate = |s: f64| (n as f64 / s.max(1e-9)).round();

    // 1. Backlog, then drain to the edge broker.
    let outbox = open(dir.path(), "agent.db")?;
    let enqueue_s = fill(&outbox, n).await?;
    let edge = roost_broker::spawn_free("edge").map_err(setup("edge broker"))?;
    let (mut at_edge, edge_counter) = counter(edge).await?;
    let t = Instant::now();
    let l = Link::start(
        link("edge", edge),
        Some(outbox.clone()),
        cancel.child_token(),
    )
    .map_err(setup("link"))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = outbox.stats().await.map_err(setup("stats"))?;
        if s.backlog == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "{} events still queued",
                s.backlog
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = t.elapsed().as_secs_f64();
    wait_count(&mut at_edge, n, Duration::from_secs(60)).await?;
    let edge_all_s = t.elapsed().as_secs_f64();
    edge_counter.abort();
    drop(l);

    // 2. A second backlog, through a roost bridge to the cloud broker.
    let outbox2 = open(dir.path(), "agent2.db")?;
    fill(&outbox2, n).await?;
    let edge2 = roost_broker::spawn_free("edge").map_err(setup("edge broker"))?;
    let cloud = roost_broker::spawn_free("cloud").map_err(setup("cloud broker"))?;
    let (mut at_cloud, cloud_counter) = counter(cloud).await?;
    let bridge_cfg = roost_bridge::BridgeConfig {
        store: STORE.into(),
        groups: vec![],
        topic_prefix: None,
        state_dir: dir.path().join("bridge"),
        edge: Endpoint::local(edge2, 10),
        cloud: Endpoint::local(cloud, 10),
        outbox_max_mib: None,
        metrics_listen: None,
    };
    let stats = Arc::new(roost_bridge::UpwardStats::default());
    let bridge = tokio::spawn(roost_bridge::run_with(
        bridge_cfg,
        cancel.child_token(),
        stats.clone(),
    ));
    // The bridge states its watermark on the edge right after subscribing there: once that
    // is visible, its subscription is in place and nothing published from now on is missed.
    wait_retained(edge2, &Topics::default().ack(STORE)).await?;
    let t = Instant::now();
    let l2 = Link::start(
        link("edge", edge2),
        Some(outbox2.clone()),
        cancel.child_token(),
    )
    .map_err(setup("link"))?;
    wait_count(&mut at_cloud, n, Duration::from_secs(900)).await?;
    let cloud_all_s = t.elapsed().as_secs_f64();
    cloud_counter.abort();
    drop(l2);
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), bridge).await;
    Ok(serde_json::json!({
        "bench": "outbox",
        "events": n,
        "enqueue_s": (enqueue_s * 100.0).round() / 100.0,
        "enqueue_per_s": rate(enqueue_s),
        "drain_to_edge_s": (drain_s * 100.0).round() / 100.0,
        "drain_to_edge_per_s": rate(drain_s),
        "all_at_edge_s": (edge_all_s * 100.0).round() / 100.0,
        "all_at_cloud_via_bridge_s": (cloud_all_s * 100.0).round() / 100.0,
        "cloud_via_bridge_per_s": rate(cloud_all_s),
        "bridge_dropped": stats.dropped_total(),
    }))
}

/// Waits until a retained message is on `topic`.
async fn wait_retained(broker: SocketAddr, topic: &str) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let got = roost_fleet::cloud::read_retained(
            &broker.to_string(),
            &[topic.to_owned()],
            Duration::from_secs(1),
        )
        .await
        .unwrap_or_default();
        if !got.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::Timeout(format!("nothing retained on {topic}")))
}
