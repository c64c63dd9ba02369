//! `roost bench bridge-load`: N QoS 1 messages (valid events of one store, increasing
//! roostseq, about 200 bytes) published to a mosquitto edge broker and carried to a mosquitto
//! cloud broker, alternately by `roost bridge` (a real process, SQLite durability on) and by
//! mosquitto's built-in bridge (a `connection` of the edge broker to the same cloud broker).
//! Messages/s from the first publish until the cloud has every distinct roostseq; then the
//! same with the cloud broker SIGKILLed and restarted mid-run, and how many each lost.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use roost_schemas::Topics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::{setup, BenchError, TempDir};
use crate::process::KillOnDrop;

const STORE: &str = "bench-bridge";
const PROBE: &str = "bench/probe";

/// Options.
#[derive(Debug, Clone)]
pub struct BridgeLoadOptions {
    /// Messages per run.
    pub messages: usize,
    /// Runs per bridge (alternating).
    pub runs: usize,
    /// Also the runs with a cloud broker restart.
    pub restart: bool,
    /// mosquitto binary.
    pub mosquitto: PathBuf,
}

/// Which bridge carries the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Roost,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Roost => "roost",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

fn mosquitto(bin: &Path, conf: &Path, log: &Path) -> Result<KillOnDrop, BenchError> {
    let log = std::fs::File::create(log).map_err(setup("log"))?;
    KillOnDrop::spawn(Command::new(bin).arg("-c").arg(conf), log)
        .map_err(setup("mosquitto (is it installed?)"))
}

fn payload(n: u64) -> Vec<u8> {
    let mut e = super::outbox::event(STORE, n);
    e.roostseq = n;
    e.id = format!("bench-{n}");
    e.time = "2026-12-01T00:00:00Z".into();
    e.data = serde_json::json!({"deployment": "bench", "sequence": n, "scope": "fleet"});
    serde_json::to_vec(&e).unwrap_or_default()
}

/// Counts distinct roostseqs (and probes) on the cloud; resubscribes on every connect.
fn counter(
    cloud: SocketAddr,
) -> (
    tokio::sync::watch::Receiver<(usize, usize)>,
    tokio::task::JoinHandle<()>,
) {
    let mut o = MqttOptions::new(
        format!("bench-count-{:08x}", rand::random::<u32>()),
        "127.0.0.1",
        cloud.port(),
    );
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(false);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let (tx, rx) = tokio::sync::watch::channel((0usize, 0usize));
    let task = tokio::spawn(async move {
        let topic = Topics::default().events(STORE);
        let mut seen = HashSet::new();
        let mut probes = 0usize;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    let _ = client.subscribe(PROBE, QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == PROBE {
                        probes += 1;
                    } else if let Ok(e) =
                        serde_json::from_slice::<roost_schemas::CloudEvent>(&p.payload)
                    {
                        seen.insert(e.roostseq);
                    }
                    tx.send_replace((seen.len(), probes));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    (rx, task)
}

/// Publishes `n` QoS 1 messages to the edge with 100 in flight; returns when all were sent.
async fn publish_all(edge: SocketAddr, n: usize) -> Result<(), BenchError> {
    let mut o = MqttOptions::new(
        format!("bench-pub-{:08x}", rand::random::<u32>()),
        "127.0.0.1",
        edge.port(),
    );
    o.set_keep_alive(Duration::from_secs(10));
    o.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(o, 1000);
    let topic = Topics::default().events(STORE);
    let sender = tokio::spawn(async move {
        for i in 1..=n as u64 {
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload(i))
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut acked = 0usize;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(60), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BenchError::Failed(format!("publisher: {e}"))),
            Err(_) => return Err(BenchError::Timeout(format!("{acked}/{n} PUBACKs"))),
        }
    }
    let _ = sender.await;
    Ok(())
}

fn write(p: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(p, text).map_err(setup("config"))
}

fn port() -> Result<SocketAddr, BenchError> {
    let p = roost_broker::free_port().map_err(setup("port"))?;
    Ok(([127, 0, 0, 1], p).into())
}

/// One run: (messages/s, lost).
async fn one(
    opts: &BridgeLoadOptions,
    kind: Kind,
    restart: bool,
    dir: &Path,
) -> Result<(f64, usize), BenchError> {
    let run = dir.join(format!(
        "{}-{}-{:08x}",
        kind.name(),
        restart,
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&run).map_err(setup("dir"))?;
    let (cloud, edge) = (port()?, port()?);
    let topic = Topics::default().events(STORE);
    let common =
        "allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 100\nuser root\n";
    let cloud_conf = run.join("cloud.conf");
    write(
        &cloud_conf,
        &format!(
            "listener {} 127.0.0.1\n{common}persistence true\npersistence_location {}/\nautosave_interval 1\n",
            cloud.port(),
            run.display()
        ),
    )?;
    let mut edge_text = format!("listener {} 127.0.0.1\n{common}", edge.port());
    if kind == Kind::Mosquitto {
        edge_text.push_str(&format!(
            "connection cloud\naddress 127.0.0.1:{}\ntopic {topic} out 1\ntopic {PROBE} out 1\ncleansession false\nrestart_timeout 1\nnotifications false\n",
            cloud.port()
        ));
    }
    let edge_conf = run.join("edge.conf");
    write(&edge_conf, &edge_text)?;
    let mut cloud_p = mosquitto(&opts.mosquitto, &cloud_conf, &run.join("cloud.log"))?;
    roost_broker::wait_listening(cloud, Duration::from_secs(10)).map_err(setup("cloud"))?;
    let _edge_p = mosquitto(&opts.mosquitto, &edge_conf, &run.join("edge.log"))?;
    roost_broker::wait_listening(edge, Duration::from_secs(10)).map_err(setup("edge"))?;
    let (mut count, count_task) = counter(cloud);
    let mut _bridge = None;
    if kind == Kind::Roost {
        let cfg = run.join("bridge.toml");
        write(
            &cfg,
            &format!(
                "store = \"{STORE}\"\nstate_dir = {:?}\n[edge]\nport = {}\n[cloud]\nport = {}\n",
                run.join("bridge").display().to_string(),
                edge.port(),
                cloud.port()
            ),
        )?;
        let exe = std::env::current_exe().map_err(setup("exe"))?;
        let log = std::fs::File::create(run.join("bridge.log")).map_err(setup("log"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["bridge", "--config"])
            .arg(&cfg)
            .env("ROOST_LOG", "warn");
        _bridge = Some(KillOnDrop::spawn(&mut cmd, log).map_err(setup("roost bridge"))?);
    }
    // Ready when the bridge carries: roost's states its watermark on the edge right after
    // subscribing; mosquitto's forwards a probe.
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        if Instant::now() > ready {
            return Err(BenchError::Timeout(format!(
                "{} bridge not ready",
                kind.name()
            )));
        }
        let up = match kind {
            Kind::Roost => !roost_fleet::cloud::read_retained(
                &edge.to_string(),
                &[Topics::default().ack(STORE)],
                Duration::from_millis(500),
            )
            .await
            .unwrap_or_default()
            .is_empty(),
            Kind::Mosquitto => {
                let _ =
                    roost_fleet::cloud::publish_retained(&edge.to_string(), PROBE, b"p".to_vec())
                        .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                count.borrow().1 > 0
            }
        };
        // The counter must be subscribed too (it counts probes only once it is).
        let _ =
            roost_fleet::cloud::publish_retained(&cloud.to_string(), PROBE, b"c".to_vec()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if up && count.borrow().1 > 0 {
            break;
        }
    }
    let n = opts.messages;
    let t0 = Instant::now();
    let publisher = tokio::spawn(publish_all(edge, n));
    let mut lost = 0;
    if restart {
        let _ =
            tokio::time::timeout(Duration::from_secs(300), count.wait_for(|c| c.0 >= n / 2)).await;
        let _ = cloud_p.0.kill();
        let _ = cloud_p.0.wait();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cloud_p = mosquitto(&opts.mosquitto, &cloud_conf, &run.join("cloud2.log"))?;
        roost_broker::wait_listening(cloud, Duration::from_secs(10)).map_err(setup("cloud"))?;
    }
    // Done when every message arrived, or (after a restart) nothing more came for 20 s.
    let quiet = Duration::from_secs(if restart { 20 } else { 120 });
    let mut last_at = Instant::now();
    let end;
    loop {
        let c = count.borrow().0;
        if c >= n {
            end = Instant::now();
            break;
        }
        match tokio::time::timeout(quiet, count.changed()).await {
            Ok(Ok(())) => {
                if count.borrow().0 > c {
                    last_at = Instant::now();
                }
            }
            _ => {
                lost = n - count.borrow().0;
                end = last_at;
                break;
            }
        }
    }
    publisher.abort();
    count_task.abort();
    drop(cloud_p);
    let secs = end.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    Ok((((n - lost) as f64 / secs).round(), lost))
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(opts: &BridgeLoadOptions) -> Result<serde_json::Value, BenchError> {
    let dir = TempDir::new("bridge")?;
    let sample = payload(1).len();
    roost_bridge::check_upward(
        &Topics::default(),
        STORE,
        &Topics::default().events(STORE),
        &payload(1),
    )
    .map_err(|d| BenchError::Failed(format!("load message refused by the bridge: {d:?}")))?;
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..opts.runs.max(1) {
        for (i, kind) in [Kind::Roost, Kind::Mosquitto].into_iter().enumerate() {
            let (r, lost) = one(opts, kind, false, dir.path()).await?;
            println!(
                "bridge-load: {} {} msgs: {r} msg/s, lost {lost}",
                kind.name(),
                opts.messages
            );
            rates[i].push(r);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (roost_med, mosq_med) = (median(&mut rates[0].clone()), median(&mut rates[1].clone()));
    let mut restart = serde_json::Value::Null;
    if opts.restart {
        let mut out = serde_json::Map::new();
        for kind in [Kind::Roost, Kind::Mosquitto] {
            let (r, lost) = one(opts, kind, true, dir.path()).await?;
            println!(
                "bridge-load: {} with a cloud restart: {r} msg/s, lost {lost}",
                kind.name()
            );
            out.insert(
                kind.name().into(),
                serde_json::json!({"msgs_per_s": r, "lost": lost}),
            );
        }
        restart = out.into();
    }
    Ok(serde_json::json!({
        "bench": "bridge-load",
        "messages": opts.messages,
        "payload_bytes": sample,
        "runs": opts.runs,
        "roost_msgs_per_s": rates[0],
        "mosquitto_msgs_per_s": rates[1],
        "roost_median": roost_med,
        "mosquitto_median": mosq_med,
        "ratio_roost_to_mosquitto": if mosq_med > 0.0 { (roost_med / mosq_med * 100.0).round() / 100.0 } else { 0.0 },
        "cloud_restart": restart,
    }))
}
