//! Fault injection: nothing is lost across uplink cuts and half-open links, SIGKILLed agents
//! and bridges, broker restarts, offline activation and outbox overflow.
//!
//! Every test is seeded (`StdRng::seed_from_u64`), bounded in time, runs alone (they share two
//! cores; timing faults such as keepalive detection must not be starved by another test) and
//! prints one `chaos …:` summary line. The `roost` child processes are the binary of this
//! checkout, which the harness builds (`harness::roost_bin`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use roost_runtime::outbox::{OverflowTarget, Payload};
use roost_runtime::{Link, LinkConfig, NewMessage, Outbox, OutboxConfig};
use roost_schemas::{CloudEvent, EventType, Phase, Scope, StatusDoc, Topics};
use roost_tests::fixtures::{refs, rev_of, status_doc, web_app, Web, WEB_APP};
use roost_tests::harness::{
    self, agent_toml, bridge_toml, eventually, files_under, publish, under, wait_bridge_ready,
    BrokerProcess, Component, FleetService, GitServer, RoostProcess, Signer, StoreRig,
};
use roost_tests::proxy::FaultProxy;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const STORE: &str = "store-0001";
const APP: &str = WEB_APP;
/// The `web` app's files in these tests' repositories.
const FILES: Web = Web::WithDeployment;
const DEPLOYMENT: &str = "web";

/// One chaos test at a time: they measure timing (keepalive, not_before) on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A test's working directory: removed afterwards, unless `ROOST_CHAOS_KEEP` is set (then
/// it is kept and printed, with the child processes' logs in it).
struct Workdir {
    _tmp: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
}

impl Workdir {
    fn new(test: &str) -> Workdir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("roost-chaos-{test}-"))
            .tempdir()
            .expect("tmp");
        if std::env::var_os("ROOST_CHAOS_KEEP").is_some() {
            let path = tmp.keep();
            eprintln!("{test}: keeping {}", path.display());
            return Workdir { _tmp: None, path };
        }
        Workdir {
            path: tmp.path().to_owned(),
            _tmp: Some(tmp),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Waits (up to 20 s) until a connection through the proxy has been open for `min_up`.
async fn wait_session(proxy: &FaultProxy, min_up: Duration) {
    let until = Instant::now() + Duration::from_secs(20);
    let mut up_since: Option<Instant> = None;
    while Instant::now() < until {
        if proxy.stats().open > 0 {
            let since = *up_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= min_up {
                return;
            }
        } else {
            up_since = None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no session through the proxy for 20 s: {:?}", proxy.stats());
}

/// The length of a log file (0 if absent).
fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until `needle` appears in the log after byte `from`; false after `timeout`.
async fn wait_log(path: &Path, from: u64, needle: &str, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read(path) {
            let tail = text.get(from as usize..).unwrap_or_default();
            if tail.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                return true;
            }
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until the retained envelope on the deployment topic of `broker` is `want`, and is
/// still so a second later.
async fn wait_retained(broker: SocketAddr, name: &str, want: &[u8], sequence: u64) {
    let until = Instant::now() + Duration::from_secs(20);
    let mut stable = 0;
    loop {
        let got = roost_fleet::cloud::read_retained(
            &broker.to_string(),
            &[fleet_topic()],
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_default();
        if got.len() == 1 && got[0].1 == want {
            stable += 1;
            if stable == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        stable = 0;
        assert!(
            Instant::now() < until,
            "{name}: the retained envelope is not the latest (sequence {sequence}) but {:?}",
            got.iter()
                .map(|(_, p)| roost_schemas::envelope_sequence(p))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The fleet topic of the test deployment.
fn fleet_topic() -> String {
    Topics::default().deployment(&Scope::Fleet, DEPLOYMENT)
}

/// A bridge configuration for an in-process bridge.
fn bridge_cfg(
    dir: &Path,
    edge: SocketAddr,
    cloud: SocketAddr,
    cloud_keep_alive_s: u64,
) -> roost_bridge::BridgeConfig {
    let endpoint = roost_bridge::Endpoint::local;
    roost_bridge::BridgeConfig {
        store: STORE.into(),
        groups: vec![],
        topic_prefix: None,
        state_dir: dir.join("bridge"),
        edge: endpoint(edge, 5),
        cloud: endpoint(cloud, cloud_keep_alive_s),
        outbox_max_mib: None,
        metrics_listen: None,
    }
}

/// An in-process bridge; its failure fails the test (see `Component`).
fn spawn_bridge(cfg: roost_bridge::BridgeConfig, cancel: &CancellationToken) -> Component {
    Component::spawn_with("bridge", cancel.child_token(), move |c| {
        roost_bridge::run(cfg, c)
    })
}

/// An outbox and an MQTT link to the edge broker, set up exactly as the agent does.
fn agent_outbox(dir: &Path, max_bytes: Option<u64>) -> Outbox {
    let topics = Topics::default();
    let mut cfg = OutboxConfig::new(dir.join("agent").join("outbox.db"));
    if let Some(m) = max_bytes {
        cfg.max_bytes = m;
    }
    cfg.overflow = Some(OverflowTarget {
        topic: topics.events(STORE),
        source: format!("roost://stores/{STORE}/agent"),
    });
    Outbox::open(cfg).expect("outbox")
}

fn agent_link(edge: SocketAddr, outbox: &Outbox, cancel: &CancellationToken) -> Link {
    let mut lc = LinkConfig::new(
        "edge",
        &edge.ip().to_string(),
        edge.port(),
        &format!("roost-agent-{STORE}"),
    );
    lc.keep_alive = Duration::from_secs(5);
    Link::start(lc, Some(outbox.clone()), cancel.child_token()).expect("link")
}

/// `n` events as the agent's reporter builds them.
fn events(n: usize, first: u64, pad: &str) -> Vec<NewMessage> {
    let topics = Topics::default();
    let source = format!("roost://stores/{STORE}/agent");
    (0..n as u64)
        .map(|k| {
            NewMessage::event(
                topics.events(STORE),
                CloudEvent::new(
                    &source,
                    EventType::ApplyStarted,
                    Some(DEPLOYMENT),
                    json!({"deployment": DEPLOYMENT, "n": first + k, "pad": pad}),
                ),
            )
        })
        .collect()
}

/// The retained status document, as the agent's status board enqueues it (compacted).
fn status_message() -> NewMessage {
    let render = move |roostseq: u64, backlog: u64| {
        serde_json::to_vec(&StatusDoc {
            outbox_backlog: backlog,
            ..status_doc(STORE, "chaos", roostseq)
        })
        .unwrap_or_default()
    };
    NewMessage {
        topic: Topics::default().status(STORE),
        payload: Payload::WithCounters(Arc::new(render)),
        retain: true,
        compact: true,
    }
}

/// Asserts that the fleet recorded exactly 1..=n for the store, first arrivals in order.
fn assert_complete_in_order(fleet: &FleetService, n: u64) {
    let gaps = fleet.db.gaps().expect("gaps");
    assert!(gaps.is_empty(), "roostseq gaps: {gaps:?}");
    let seqs: Vec<u64> = fleet
        .db
        .events(STORE)
        .expect("events")
        .iter()
        .map(|e| e.roostseq)
        .collect();
    assert_eq!(seqs.len() as u64, n, "distinct events recorded");
    if let Some(w) = seqs.windows(2).find(|w| w[0] >= w[1]) {
        panic!(
            "first arrivals out of roostseq order: {} then {}",
            w[0], w[1]
        );
    }
    assert_eq!(seqs.first().copied(), Some(1));
    assert_eq!(seqs.last().copied(), Some(n));
}

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    Cut,
    Blackhole,
}

/// 10,000 events through agent outbox → edge broker → bridge → (fault proxy) → cloud broker
/// → fleet DB, while the uplink is cut 20 times (some as half-open blackholes that only the
/// bridge's 2 s keepalive can notice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_cuts_lose_nothing() {
    let _serial = SERIAL.lock().await;
    harness::init();
    const SEED: u64 = 0x5eed_0001;
    const EVENTS: u64 = 10_000;
    const BURST: u64 = 2_000;
    const FAULTS: usize = 20;
    const HOLES: usize = 3;
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    let dir = Workdir::new("uplink");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let proxy = Arc::new(FaultProxy::start(cloud).await.expect("proxy"));
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let cancel = CancellationToken::new();
    let bridge = spawn_bridge(bridge_cfg(dir.path(), edge, proxy.addr(), 2), &cancel);
    wait_bridge_ready(edge, &fleet, STORE).await;
    let outbox = agent_outbox(dir.path(), None);
    let _link = agent_link(edge, &outbox, &cancel);
    let pad = "x".repeat(120);

    // Phase 1, no faults: a burst, to measure the outbox's enqueue and drain rates.
    let t0 = Instant::now();
    let mut enqueued = 0u64;
    while enqueued < BURST {
        let seqs = outbox
            .enqueue(events(100, enqueued, &pad))
            .await
            .expect("enqueue");
        assert_eq!(seqs.first().copied().flatten(), Some(enqueued + 1));
        enqueued += 100;
    }
    let burst_enqueue = t0.elapsed();
    let drained = loop {
        if outbox.stats().await.expect("stats").backlog == 0 {
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eventually(Duration::from_secs(60), "the burst in the fleet DB", || {
        (fleet.db.counts().expect("counts").events >= BURST).then_some(())
    })
    .await;
    let burst_e2e = t0.elapsed();

    // Phase 2: the rest, in random batches paced over the fault schedule, while it runs.
    let holes_at: BTreeSet<usize> = rand::seq::index::sample(&mut rng, FAULTS, HOLES)
        .into_iter()
        .collect();
    let faults: Vec<(Duration, FaultKind, Duration)> = (0..FAULTS)
        .map(|i| {
            let gap = Duration::from_millis(rng.random_range(0..=800));
            if holes_at.contains(&i) {
                // Held past 2 × the bridge's 2 s keepalive: only keepalive can notice.
                let hold = Duration::from_millis(rng.random_range(5_000..=6_000));
                (gap, FaultKind::Blackhole, hold)
            } else {
                let hold = Duration::from_millis(rng.random_range(100..=1_500));
                (gap, FaultKind::Cut, hold)
            }
        })
        .collect();
    let schedule: Duration = faults.iter().map(|f| f.0 + f.2).sum();
    let mut sizes = Vec::new();
    let mut left = EVENTS - BURST;
    while left > 0 {
        let n = rng.random_range(1..=100u64).min(left);
        sizes.push(n);
        left -= n;
    }
    let max_pause = (schedule * 2 / sizes.len() as u32).as_millis() as u64;
    let plan: Vec<(u64, Duration)> = sizes
        .into_iter()
        .map(|n| (n, Duration::from_millis(rng.random_range(0..=max_pause))))
        .collect();
    let holes = HOLES;
    let batches = plan.len();
    let producer = {
        let outbox = outbox.clone();
        let pad = pad.clone();
        tokio::spawn(async move {
            let mut inside = Duration::ZERO;
            let mut n = BURST;
            for (i, (size, pause)) in plan.into_iter().enumerate() {
                let t = Instant::now();
                let seqs = outbox
                    .enqueue(events(size as usize, n, &pad))
                    .await
                    .expect("enqueue");
                inside += t.elapsed();
                let want: Vec<Option<u64>> = (n + 1..=n + size).map(Some).collect();
                assert_eq!(seqs, want, "gap-free roostseq assigned in the transaction");
                n += size;
                if i % 7 == 0 {
                    outbox
                        .enqueue(vec![status_message()])
                        .await
                        .expect("status");
                }
                tokio::time::sleep(pause).await;
            }
            outbox
                .enqueue(vec![status_message()])
                .await
                .expect("status");
            inside
        })
    };
    let chaos = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut noticed = Vec::new();
            for (gap, kind, hold) in faults {
                // Strike a live session at a random moment into it (blackholes: once it is
                // past its handshake, so that only keepalive can notice).
                let min_up = match kind {
                    FaultKind::Cut => Duration::ZERO,
                    FaultKind::Blackhole => Duration::from_secs(1),
                };
                wait_session(&proxy, min_up).await;
                tokio::time::sleep(gap).await;
                match kind {
                    FaultKind::Cut => {
                        proxy.cut();
                        tokio::time::sleep(hold).await;
                        proxy.heal();
                    }
                    FaultKind::Blackhole => {
                        let before = proxy.stats().accepted_into_hole;
                        let t = Instant::now();
                        proxy.blackhole();
                        let mut seen = None;
                        while t.elapsed() < hold {
                            if seen.is_none() && proxy.stats().accepted_into_hole > before {
                                // The bridge gave up on the silent connection and redialled.
                                seen = Some(t.elapsed());
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        noticed.push(seen);
                        proxy.heal();
                    }
                }
            }
            noticed
        })
    };
    let inside = producer.await.expect("producer");
    let noticed = chaos.await.expect("chaos");
    eventually(
        Duration::from_secs(120),
        "all events in the fleet DB",
        || (fleet.db.counts().expect("counts").events >= EVENTS).then_some(()),
    )
    .await;
    let all_delivered = t0.elapsed();
    eventually(Duration::from_secs(30), "the last status document", || {
        fleet.status(STORE).filter(|s| s.roostseq == EVENTS)
    })
    .await;

    assert_complete_in_order(&fleet, EVENTS);
    let counts = fleet.db.counts().expect("counts");
    assert_eq!(counts.events, EVENTS);
    assert!(
        noticed.iter().all(|n| n.is_some()) && noticed.len() == holes,
        "every blackhole was noticed by keepalive while it was held: {noticed:?}"
    );
    let detect = noticed.iter().flatten().max().copied().unwrap_or_default();
    let ps = proxy.stats();
    assert_eq!(ps.cuts + ps.blackholes, FAULTS as u64);
    assert!(
        ps.killed >= FAULTS as u64,
        "every fault struck a live connection: {ps:?}"
    );
    println!(
        "chaos uplink: seed={SEED:#x} events={EVENTS} delivered={} lost=0 duplicates={} cuts={} (blackholes={holes}, each noticed by keepalive within {} ms) connections={} killed={} in {:.1} s",
        counts.events,
        counts.duplicates,
        FAULTS,
        ms(detect),
        ps.forwarded + ps.accepted_into_hole,
        ps.killed,
        started.elapsed().as_secs_f64(),
    );
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "chaos uplink rates: burst of {BURST} in batches of 100: enqueue {:.0} ev/s ({} ms), agent outbox drained to the edge broker {:.0} ev/s ({} ms), end to end into the fleet DB {:.0} ev/s ({} ms); under faults: {} events in {batches} batches enqueued at {:.0} ev/s (time inside enqueue), all {EVENTS} delivered after {:.1} s",
        rate(BURST, burst_enqueue),
        ms(burst_enqueue),
        rate(BURST, drained),
        ms(drained),
        rate(BURST, burst_e2e),
        ms(burst_e2e),
        EVENTS - BURST,
        rate(EVENTS - BURST, inside),
        all_delivered.as_secs_f64(),
    );
    bridge.stop().await;
    cancel.cancel();
}

/// `roost agent` and `roost bridge` as child processes, SIGKILLed 50 times at random points of
/// a stream of rollouts (fetch, apply, outbox writes, publishing) and restarted each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_bridge_crashes_lose_nothing() {
    let _serial = SERIAL.lock().await;
    harness::init();
    const SEED: u64 = 0x5eed_0002;
    const ROLLOUTS: u64 = 25;
    const KILLS: u64 = 50;
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    let dir = Workdir::new("crashes");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let (mut git, _) = GitServer::start(&refs(&web_app("0", FILES)));
    let signer = Signer::new(7);
    let agent_file = dir.path().join("agent.toml");
    let bridge_file = dir.path().join("bridge.toml");
    std::fs::write(
        &agent_file,
        agent_toml(
            STORE,
            &["all"],
            &dir.path().join("agent"),
            edge,
            &signer,
            &git.allowed(),
        ),
    )
    .expect("agent.toml");
    std::fs::write(
        &bridge_file,
        bridge_toml(STORE, &["all"], &dir.path().join("bridge"), edge, cloud, 5),
    )
    .expect("bridge.toml");
    let mut bridge = RoostProcess::start(
        [
            std::ffi::OsString::from("bridge"),
            "--config".into(),
            bridge_file.into(),
        ],
        &dir.path().join("bridge.log"),
    );
    wait_bridge_ready(edge, &fleet, STORE).await;
    let mut agent = RoostProcess::start(
        [
            std::ffi::OsString::from("agent"),
            "--config".into(),
            agent_file.into(),
        ],
        &dir.path().join("agent.log"),
    );

    // Two kills per rollout. The first is aimed at a stage of the agent's work, seen in its
    // log: right after it accepted the rollout, while it fetches, while it applies, after the
    // apply was recorded (health, status), or after `converged` (events and status on their
    // way out through the edge broker and the bridge). The second lands shortly after that
    // restart (startup, resuming interrupted work, draining the backlog). The victim is the
    // agent or the bridge, restarted after a random downtime.
    // (Stages are read from the agent's info-level log: `ROOST_CHILD_LOG`, if set, must keep
    // `roost_agent` at info.)
    const STAGES: [(&str, &str); 6] = [
        ("received", "dev.roost.rollout.received"),
        ("fetch", "fetching"),
        ("apply", "dev.roost.apply.started"),
        ("applied", "dev.roost.apply.succeeded"),
        ("publish", "dev.roost.converged"),
        ("after-restart", ""),
    ];
    let mut stage_hits = [0usize; STAGES.len()];
    let mut kills = (0, 0);
    let mut last_rev = String::new();
    for i in 1..=ROLLOUTS {
        let rev = git.commit(
            &refs(&web_app(&i.to_string(), FILES)),
            &[],
            &format!("v{i}"),
        );
        let r = signer.rollout(DEPLOYMENT, Scope::Fleet, i, &git.url(), &rev, APP);
        let mut from = log_len(agent.log());
        publish(cloud, &fleet_topic(), signer.sign(&r)).await;
        last_rev = rev;
        let here = KILLS * i / ROLLOUTS - KILLS * (i - 1) / ROLLOUTS;
        for k in 0..here {
            let s = if k == 0 {
                rng.random_range(0..STAGES.len() - 1)
            } else {
                STAGES.len() - 1
            };
            let (_, marker) = STAGES[s];
            if marker.is_empty() {
                // Shortly after the previous restart: startup, resuming interrupted work,
                // draining the backlog.
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
                stage_hits[s] += 1;
            } else {
                let seen = wait_log(agent.log(), from, marker, Duration::from_secs(5)).await;
                assert!(
                    seen,
                    "the agent logged {marker:?} (log: {})",
                    agent.log().display()
                );
                stage_hits[s] += 1;
                tokio::time::sleep(Duration::from_micros(rng.random_range(0..3_000))).await;
            }
            let down = Duration::from_millis(rng.random_range(0..300));
            let p = if rng.random_bool(0.65) {
                kills.0 += 1;
                &mut agent
            } else {
                kills.1 += 1;
                &mut bridge
            };
            p.kill();
            tokio::time::sleep(down).await;
            p.restart();
            from = log_len(agent.log());
        }
        // Let the restarted processes come up before the next rollout.
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..700))).await;
    }
    assert!(
        agent.is_running(),
        "agent alive (log: {})",
        agent.log().display()
    );
    assert!(
        bridge.is_running(),
        "bridge alive (log: {})",
        bridge.log().display()
    );

    // Converged on the last rollout, the files on disk are that revision, and every event
    // up to the status document's roostseq is in the fleet DB.
    let live = dir
        .path()
        .join("agent/targets")
        .join(DEPLOYMENT)
        .join("current");
    let want = under(git.files(), APP);
    let status = eventually(
        Duration::from_secs(90),
        "convergence on the last rollout",
        || {
            let s = fleet.status(STORE)?;
            let d = s.deployments.get(DEPLOYMENT)?;
            (d.phase == Phase::Converged
                && d.applied_revision.as_deref() == Some(last_rev.as_str())
                && fleet.max_roostseq(STORE) >= s.roostseq
                && fleet.db.gaps().map(|g| g.is_empty()).unwrap_or(false)
                && files_under(&live) == want)
                .then_some(s)
        },
    )
    .await;
    let n = fleet.max_roostseq(STORE);
    assert_complete_in_order(&fleet, n);
    assert!(n >= status.roostseq);
    let evs = fleet.events(STORE);
    // Every `converged` for R comes after an `apply.succeeded` for R.
    let mut converged = 0;
    for c in evs.iter().filter(|e| e.ty == EventType::Converged.as_str()) {
        converged += 1;
        let r = rev_of(c).expect("converged names its revision");
        assert!(
            evs.iter()
                .any(|a| a.ty == EventType::ApplySucceeded.as_str()
                    && rev_of(a) == Some(r)
                    && a.roostseq < c.roostseq),
            "converged for {r} (roostseq {}) without an earlier apply.succeeded",
            c.roostseq
        );
    }
    assert!(converged >= 1);
    // Outcomes that never came: an `apply.started` for R with no later `apply.succeeded` or
    // `apply.failed` for R, or an `apply.succeeded` for R with no later `converged` or
    // `degraded` for R. The agent stores apply.succeeded before it records the apply, and
    // reports a missing converged/degraded after a restart, so a SIGKILL anywhere loses none.
    let after = |s: &CloudEvent, tys: &[EventType]| {
        evs.iter().any(|e| {
            e.roostseq > s.roostseq
                && rev_of(e) == rev_of(s)
                && tys.iter().any(|t| e.ty == t.as_str())
        })
    };
    let lost_outcomes = evs
        .iter()
        .filter(|e| {
            (e.ty == EventType::ApplyStarted.as_str()
                && !after(e, &[EventType::ApplySucceeded, EventType::ApplyFailed]))
                || (e.ty == EventType::ApplySucceeded.as_str()
                    && !after(e, &[EventType::Converged, EventType::Degraded]))
        })
        .count();
    assert_eq!(
        lost_outcomes, 0,
        "every apply outcome reported despite the kills"
    );
    let counts = fleet.db.counts().expect("counts");
    let of = |ty: EventType| evs.iter().filter(|e| e.ty == ty.as_str()).count();
    println!(
        "chaos crashes: seed={SEED:#x} rollouts={ROLLOUTS} kills={} (agent={} bridge={}; at {}) events={n} lost=0 duplicates={} received={} apply_started={} apply_succeeded={} converged={converged} outcomes_never_reported={lost_outcomes} final={} in {:.1} s",
        kills.0 + kills.1,
        kills.0,
        kills.1,
        STAGES
            .iter()
            .zip(stage_hits)
            .map(|((name, _), n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(" "),
        counts.duplicates,
        of(EventType::RolloutReceived),
        of(EventType::ApplyStarted),
        of(EventType::ApplySucceeded),
        &last_rev[..12],
        started.elapsed().as_secs_f64(),
    );
    assert_eq!(kills.0 + kills.1, KILLS);
}

/// Restarts of the edge broker and then the cloud broker in the middle of a stream of
/// rollouts: both brokers get the desired state back (retained), and the agent converges on
/// the last rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_restore_desired_state() {
    let _serial = SERIAL.lock().await;
    harness::init();
    const SEED: u64 = 0x5eed_0003;
    // Rollouts 1..=9 plus number 7, published right after the cloud broker restart.
    const ROLLOUTS: u64 = 9;
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    let dir = Workdir::new("brokers");
    let mut cloud = BrokerProcess::start("cloud");
    let mut edge = BrokerProcess::start("edge");
    let fleet = FleetService::start(cloud.addr, &dir.path().join("fleet.db"));
    let (mut git, _) = GitServer::start(&refs(&web_app("0", FILES)));
    let signer = Signer::new(3);
    let mut rig = StoreRig::with_edge(
        STORE,
        &["all"],
        dir.path(),
        cloud.addr,
        edge.addr,
        &signer,
        &git.allowed(),
    );
    rig.start_bridge();
    wait_bridge_ready(edge.addr, &fleet, STORE).await;
    rig.start_agent();
    let mut restarts = Vec::new();
    let mut last = (String::new(), Vec::new());
    for i in 1..=ROLLOUTS {
        let rev = git.commit(
            &refs(&web_app(&i.to_string(), FILES)),
            &[],
            &format!("v{i}"),
        );
        let seq = if i < 7 { i } else { i + 1 };
        let r = signer.rollout(DEPLOYMENT, Scope::Fleet, seq, &git.url(), &rev, APP);
        let env = signer.sign(&r);
        publish(cloud.addr, &fleet_topic(), env.clone()).await;
        last = (rev, env);
        // Mid-stream: while the store works on the rollout.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        if i == 3 {
            let t = Instant::now();
            edge.restart();
            restarts.push(("edge", t.elapsed()));
            // The bridge restores the desired state on the empty edge broker.
            wait_retained(edge.addr, "edge", &last.1, i).await;
        }
        if i == 6 {
            let t = Instant::now();
            cloud.restart();
            restarts.push(("cloud", t.elapsed()));
            // An operator publishes right away, while the fleet service is reconnecting:
            // restoring the desired state must not bring back the older envelope over it.
            let rev = git.commit(&refs(&web_app("7", FILES)), &[], "v7");
            let r = signer.rollout(DEPLOYMENT, Scope::Fleet, 7, &git.url(), &rev, APP);
            let env = signer.sign(&r);
            publish(cloud.addr, &fleet_topic(), env.clone()).await;
            last = (rev, env);
            eventually(Duration::from_secs(20), "the fleet service back", || {
                fleet
                    .db
                    .desired()
                    .ok()?
                    .into_iter()
                    .any(|(_, p)| p == last.1)
                    .then_some(())
            })
            .await;
            wait_retained(cloud.addr, "cloud", &last.1, 7).await;
            wait_retained(edge.addr, "edge", &last.1, 7).await;
        }
    }
    let (last_rev, last_env) = last;
    eventually(
        Duration::from_secs(60),
        "convergence on the last rollout",
        || {
            let s = fleet.status(STORE)?;
            let d = s.deployments.get(DEPLOYMENT)?;
            (d.phase == Phase::Converged
                && d.applied_revision.as_deref() == Some(last_rev.as_str()))
            .then_some(())
        },
    )
    .await;
    assert_eq!(rig.live_files(DEPLOYMENT), under(git.files(), APP));
    // The desired state is retained on both brokers: the latest envelope.
    wait_retained(cloud.addr, "cloud", &last_env, ROLLOUTS + 1).await;
    wait_retained(edge.addr, "edge", &last_env, ROLLOUTS + 1).await;
    let n = fleet.max_roostseq(STORE);
    let gaps = fleet.db.gaps().expect("gaps");
    let counts = fleet.db.counts().expect("counts");
    println!(
        "chaos brokers: seed={SEED:#x} rollouts={} restarts={} desired_restored=cloud,edge converged={} events={n} gaps={gaps:?} duplicates={} in {:.1} s",
        ROLLOUTS + 1,
        restarts
            .iter()
            .map(|(b, d)| format!("{b}({} ms)", ms(*d)))
            .collect::<Vec<_>>()
            .join(","),
        &last_rev[..12],
        counts.duplicates,
        started.elapsed().as_secs_f64(),
    );
    rig.stop_agent().await;
}

/// A staged rollout, delivered before the uplink is cut, activates at its `not_before` while
/// the store is offline; its events reach the cloud once the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_rollout_activates_offline() {
    let _serial = SERIAL.lock().await;
    harness::init();
    const SEED: u64 = 0x5eed_0004;
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    let dir = Workdir::new("offline");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let proxy = FaultProxy::start(cloud).await.expect("proxy");
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let (mut git, rev1) = GitServer::start(&refs(&web_app("1", FILES)));
    let signer = Signer::new(4);
    let mut rig = StoreRig::new(
        STORE,
        &["all"],
        dir.path(),
        proxy.addr(),
        &signer,
        &git.allowed(),
    );
    rig.bridge_cfg.cloud.keep_alive_s = Some(2);
    rig.start_bridge();
    wait_bridge_ready(rig.edge, &fleet, STORE).await;
    rig.start_agent();
    let r1 = signer.rollout(DEPLOYMENT, Scope::Fleet, 1, &git.url(), &rev1, APP);
    publish(cloud, &fleet_topic(), signer.sign(&r1)).await;
    let t = Duration::from_secs(30);
    let has = |ty: EventType, rev: &str| {
        fleet
            .events(STORE)
            .into_iter()
            .find(|e| e.ty == ty.as_str() && rev_of(e) == Some(rev))
    };
    eventually(t, "rev1 converged", || has(EventType::Converged, &rev1)).await;

    // Stage rev2 a few seconds ahead; wait until the agent has it, then cut the uplink.
    let rev2 = git.commit(&refs(&web_app("2", FILES)), &[], "v2");
    let lead = Duration::from_millis(rng.random_range(5_000..=6_000));
    let nb = time::OffsetDateTime::now_utc() + lead;
    let nb_text = roost_schemas::format_rfc3339(nb);
    let nb = roost_schemas::parse_rfc3339(&nb_text).expect("not_before");
    let nb_sys = SystemTime::from(nb);
    let mut r2 = signer.rollout(DEPLOYMENT, Scope::Fleet, 2, &git.url(), &rev2, APP);
    r2.not_before = Some(nb_text.clone());
    publish(cloud, &fleet_topic(), signer.sign(&r2)).await;
    eventually(t, "rev2 received by the agent", || {
        fleet
            .events(STORE)
            .into_iter()
            .find(|e| e.ty == EventType::RolloutReceived.as_str() && e.data["sequence"] == 2)
    })
    .await;
    proxy.cut();
    let cut_at = SystemTime::now();
    assert!(
        cut_at + Duration::from_secs(1) < nb_sys,
        "the uplink is cut well before not_before"
    );
    let seq_at_cut = fleet.max_roostseq(STORE);

    // Watch the live directory: no read that started before not_before may see rev2.
    let want = under(git.files(), APP);
    let mut early = None;
    let seen_new = loop {
        let before = SystemTime::now();
        let files = rig.live_files(DEPLOYMENT);
        if files == want {
            if before < nb_sys {
                early = Some(before);
            }
            break SystemTime::now();
        }
        assert!(
            before < nb_sys + Duration::from_secs(20),
            "rev2 not applied within 20 s of not_before"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(early, None, "files changed before not_before {nb_text}");
    let switched = std::fs::symlink_metadata(rig.current(DEPLOYMENT))
        .and_then(|m| m.modified())
        .expect("current symlink");
    // File-system timestamps come from a coarse clock (one tick behind at most).
    assert!(
        switched + Duration::from_millis(20) >= nb_sys,
        "switched at {switched:?}, before not_before {nb_sys:?}"
    );
    // Converged offline: its events got as far as the bridge's outbox, and none of them
    // reached the cloud yet.
    harness::wait_in_bridge_outbox(rig.edge, STORE, t, |d| {
        harness::converged_on(d, DEPLOYMENT, &rev2)
    })
    .await;
    assert!(
        has(EventType::ApplyStarted, &rev2).is_none(),
        "events of the offline activation arrived while the uplink was cut"
    );
    assert_eq!(fleet.max_roostseq(STORE), seq_at_cut);
    let healed = Instant::now();
    proxy.heal();
    let started_ev = eventually(t, "apply.started for rev2 after healing", || {
        has(EventType::ApplyStarted, &rev2)
    })
    .await;
    let conv = eventually(t, "converged for rev2 after healing", || {
        has(EventType::Converged, &rev2)
    })
    .await;
    let delivered_in = healed.elapsed();
    let applied_at = roost_schemas::parse_rfc3339(&started_ev.time).expect("event time");
    assert!(
        applied_at >= nb,
        "apply.started at {} before not_before {nb_text}",
        started_ev.time
    );
    let succeeded = has(EventType::ApplySucceeded, &rev2).expect("apply.succeeded for rev2");
    assert!(succeeded.roostseq < conv.roostseq);
    let n = fleet.max_roostseq(STORE);
    assert_complete_in_order(&fleet, n);
    println!(
        "chaos offline: seed={SEED:#x} not_before=+{} ms after publish, cut {} ms before it; applied {} ms after not_before (seen on disk +{} ms); {} events queued offline delivered {} ms after healing; events={n} lost=0 in {:.1} s",
        ms(lead),
        ms(nb_sys.duration_since(cut_at).unwrap_or_default()),
        ms(Duration::try_from(applied_at - nb).unwrap_or_default()),
        ms(seen_new.duration_since(nb_sys).unwrap_or_default()),
        n - seq_at_cut,
        ms(delivered_in),
        started.elapsed().as_secs_f64(),
    );
    rig.stop_agent().await;
}

/// Past its disk cap, the outbox drops the oldest events and says exactly which roostseqs
/// were lost: the reported ranges are precisely the roostseqs that never arrive, whether the
/// link was slow (messages in flight) or down when the cap was hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_reports_exactly_what_was_lost() {
    let _serial = SERIAL.lock().await;
    harness::init();
    const SEED: u64 = 0x5eed_0005;
    const CAP: u64 = 48 * 1024;
    let mut rng = StdRng::seed_from_u64(SEED);
    let started = Instant::now();
    let dir = Workdir::new("overflow");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let edge = roost_broker::spawn_free("edge").expect("edge broker");
    let proxy = FaultProxy::start(edge).await.expect("proxy");
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let cancel = CancellationToken::new();
    let bridge = spawn_bridge(bridge_cfg(dir.path(), edge, cloud, 5), &cancel);
    wait_bridge_ready(edge, &fleet, STORE).await;
    let outbox = agent_outbox(dir.path(), Some(CAP));
    let link = agent_link(proxy.addr(), &outbox, &cancel);
    let pad = "y".repeat(200);
    let mut n = 0u64;
    let mut enqueue = |count: usize| {
        let msgs = events(count, n, &pad);
        n += count as u64;
        msgs
    };

    // Connected: delivered.
    outbox.enqueue(enqueue(30)).await.expect("enqueue");
    eventually(Duration::from_secs(20), "first events", || {
        (fleet.max_roostseq(STORE) >= 30).then_some(())
    })
    .await;
    // A slow link: the cap is hit while messages are in flight.
    proxy.latency(Duration::from_millis(250));
    for _ in 0..40 {
        outbox
            .enqueue(enqueue(rng.random_range(5..=25)))
            .await
            .expect("enqueue");
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
    }
    // A dead link: the cap is hit with nothing leaving.
    proxy.cut();
    let mut connected = link.handle.connected();
    tokio::time::timeout(Duration::from_secs(20), connected.wait_for(|c| !*c))
        .await
        .expect("link notices the cut")
        .expect("link alive");
    for _ in 0..40 {
        outbox
            .enqueue(enqueue(rng.random_range(5..=25)))
            .await
            .expect("enqueue");
    }
    let stats = outbox.stats().await.expect("stats");
    assert!(stats.dropped > 0, "the cap was hit: {stats:?}");
    proxy.latency(Duration::ZERO);
    proxy.heal();
    eventually(Duration::from_secs(60), "the outbox drained", || {
        (fleet.max_roostseq(STORE) >= stats.last_roostseq).then_some(())
    })
    .await;
    let until = Instant::now() + Duration::from_secs(30);
    while outbox.stats().await.expect("stats").backlog > 0 {
        assert!(Instant::now() < until, "the outbox drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A marker event after all of them: once it is in the fleet DB, everything before it that
    // will ever arrive has (one outbox, one link, one bridge, each in order).
    let marker = outbox
        .enqueue(events(1, n, &pad))
        .await
        .expect("enqueue marker")
        .first()
        .copied()
        .flatten()
        .expect("marker roostseq");
    eventually(Duration::from_secs(30), "the marker event", || {
        (fleet.max_roostseq(STORE) >= marker).then_some(())
    })
    .await;

    let evs: Vec<CloudEvent> = fleet
        .events(STORE)
        .into_iter()
        .filter(|e| e.roostseq <= stats.last_roostseq)
        .collect();
    let arrived: BTreeSet<u64> = evs.iter().map(|e| e.roostseq).collect();
    let mut lost = BTreeSet::new();
    let mut reports = Vec::new();
    for e in evs
        .iter()
        .filter(|e| e.ty == EventType::OutboxOverflow.as_str())
    {
        // `lost_ranges` is exact; from/to are its first and last roostseq.
        let ranges: Vec<(u64, u64)> = e.data["lost_ranges"]
            .as_array()
            .expect("lost_ranges")
            .iter()
            .map(|r| (r[0].as_u64().expect("from"), r[1].as_u64().expect("to")))
            .collect();
        let count: u64 = ranges.iter().map(|(a, b)| b - a + 1).sum();
        assert_eq!(e.data["lost_count"].as_u64(), Some(count));
        assert_eq!(
            e.data["lost_from_roostseq"].as_u64(),
            ranges.first().map(|r| r.0)
        );
        assert_eq!(
            e.data["lost_to_roostseq"].as_u64(),
            ranges.last().map(|r| r.1)
        );
        for (from, to) in &ranges {
            assert!(
                lost.is_disjoint(&(*from..=*to).collect()),
                "ranges reported twice"
            );
            lost.extend(*from..=*to);
        }
        reports.push((e.roostseq, ranges));
    }
    assert!(!reports.is_empty(), "an outbox.overflow event arrived");
    let last = stats.last_roostseq;
    let wrongly_lost: Vec<u64> = lost.intersection(&arrived).copied().collect();
    let unaccounted: Vec<u64> = (1..=last)
        .filter(|s| !arrived.contains(s) && !lost.contains(s))
        .collect();
    assert!(
        wrongly_lost.is_empty(),
        "reported lost but arrived: {} roostseqs, e.g. {:?} (reports {reports:?})",
        wrongly_lost.len(),
        &wrongly_lost[..wrongly_lost.len().min(10)]
    );
    assert!(
        unaccounted.is_empty(),
        "neither arrived nor reported lost: {:?}",
        &unaccounted[..unaccounted.len().min(10)]
    );
    assert_eq!(arrived.len() as u64 + lost.len() as u64, last);
    println!(
        "chaos overflow: seed={SEED:#x} cap={CAP} enqueued={n} events (+{} overflow events) arrived={} lost={} reported_lost={} overflow_events_arrived={} lost_ranges={:?} in {:.1} s",
        last - n,
        arrived.len(),
        last - arrived.len() as u64,
        lost.len(),
        reports.len(),
        reports.iter().flat_map(|r| r.1.clone()).collect::<Vec<_>>(),
        started.elapsed().as_secs_f64(),
    );
    bridge.stop().await;
    cancel.cancel();
}

/// The store's edge broker restarts (a power blip of the broker, a crash) while the bridge is
/// down: the events the agent published meanwhile must still reach the cloud.
///
/// The edge broker acknowledges the agent's events but keeps them for the bridge's session in
/// memory only, and rumqttd keeps nothing across a restart. End-to-end confirmation covers
/// it: the agent keeps each event until the bridge confirms it has it in its outbox, and the
/// bridge asks for a resend of everything later whenever it (re)connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_broker_restart_with_bridge_down_loses_nothing() {
    let _serial = SERIAL.lock().await;
    harness::init();
    let dir = Workdir::new("power");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let mut edge = BrokerProcess::start("edge");
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let (mut git, rev1) = GitServer::start(&refs(&web_app("1", FILES)));
    let signer = Signer::new(5);
    let mut rig = StoreRig::with_edge(
        STORE,
        &["all"],
        dir.path(),
        cloud,
        edge.addr,
        &signer,
        &git.allowed(),
    );
    rig.start_bridge();
    wait_bridge_ready(edge.addr, &fleet, STORE).await;
    rig.start_agent();
    let t = Duration::from_secs(30);
    let r1 = signer.rollout(DEPLOYMENT, Scope::Fleet, 1, &git.url(), &rev1, APP);
    publish(cloud, &fleet_topic(), signer.sign(&r1)).await;
    let has = |rev: &str| {
        fleet
            .events(STORE)
            .into_iter()
            .any(|e| e.ty == EventType::Converged.as_str() && rev_of(&e) == Some(rev))
    };
    eventually(t, "rev1 converged", || has(&rev1).then_some(())).await;

    // The bridge is down; a rollout it had already delivered is applied; then the edge
    // broker restarts and the bridge comes back.
    rig.stop_bridge().await;
    let rev2 = git.commit(&refs(&web_app("2", FILES)), &[], "v2");
    let r2 = signer.rollout(DEPLOYMENT, Scope::Fleet, 2, &git.url(), &rev2, APP);
    publish(cloud, &fleet_topic(), signer.sign(&r2)).await;
    publish(edge.addr, &fleet_topic(), signer.sign(&r2)).await;
    let want = under(git.files(), APP);
    eventually(t, "rev2 applied while the bridge is down", || {
        (rig.live_files(DEPLOYMENT) == want).then_some(())
    })
    .await;
    // Its events are on the edge broker (in memory only, for the bridge's session) before
    // the broker restarts.
    harness::wait_edge_status(edge.addr, STORE, t, |d| {
        harness::converged_on(d, DEPLOYMENT, &rev2)
    })
    .await;
    edge.restart();
    rig.start_bridge();
    // A later rollout shows how far the store's events got.
    let rev3 = git.commit(&refs(&web_app("3", FILES)), &[], "v3");
    let r3 = signer.rollout(DEPLOYMENT, Scope::Fleet, 3, &git.url(), &rev3, APP);
    publish(cloud, &fleet_topic(), signer.sign(&r3)).await;
    eventually(t, "rev3 converged", || has(&rev3).then_some(())).await;
    let gaps = fleet.db.gaps().expect("gaps");
    println!(
        "chaos power: edge broker restarted with the bridge down: events={} gaps={gaps:?}",
        fleet.max_roostseq(STORE)
    );
    assert!(
        gaps.is_empty(),
        "events lost with the edge broker: {gaps:?}"
    );
    assert!(has(&rev2), "converged for rev2 reached the cloud");
    rig.stop_agent().await;
}

/// Git offline: with the Git server unreachable (blackholed through the fault proxy), a
/// revision already in the cache still applies; a missing one gives `fetch.failed` and is
/// retried with backoff until the server answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_offline_uses_the_cache_and_retries_missing_commits() {
    let _serial = SERIAL.lock().await;
    harness::init();
    let started = Instant::now();
    let dir = Workdir::new("git-offline");
    let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
    let fleet = FleetService::start(cloud, &dir.path().join("fleet.db"));
    let (mut git, rev1) = GitServer::start(&refs(&web_app("1", FILES)));
    let daemon: SocketAddr = git
        .url()
        .trim_start_matches("git://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("daemon address");
    let proxy = FaultProxy::start(daemon).await.expect("proxy");
    let url = format!("git://{}/fleet.git", proxy.addr());
    let allowed = format!("git://{}/", proxy.addr());
    let signer = Signer::new(6);
    let mut rig = StoreRig::new(STORE, &["all"], dir.path(), cloud, &signer, &allowed);
    rig.agent_cfg.file.git.fetch_timeout_s = Some(2);
    rig.start_bridge();
    wait_bridge_ready(rig.edge, &fleet, STORE).await;
    rig.start_agent();
    let t = Duration::from_secs(30);
    let converged = |rev: &str| {
        fleet
            .events(STORE)
            .into_iter()
            .filter(|e| e.ty == EventType::Converged.as_str() && rev_of(e) == Some(rev))
            .count()
    };
    let roll = |seq: u64, rev: &str| {
        signer.sign(&signer.rollout(DEPLOYMENT, Scope::Fleet, seq, &url, rev, APP))
    };
    publish(cloud, &fleet_topic(), roll(1, &rev1)).await;
    eventually(t, "rev1 converged", || {
        (converged(&rev1) == 1).then_some(())
    })
    .await;
    let rev2 = git.commit(&refs(&web_app("2", FILES)), &[], "v2");
    publish(cloud, &fleet_topic(), roll(2, &rev2)).await;
    eventually(t, "rev2 converged", || {
        (converged(&rev2) == 1).then_some(())
    })
    .await;

    // The Git server stops answering (a half-open link).
    proxy.blackhole();
    // A rollback to a cached revision applies at once.
    publish(cloud, &fleet_topic(), roll(3, &rev1)).await;
    eventually(t, "rollback to the cached rev1 converged offline", || {
        (converged(&rev1) == 2).then_some(())
    })
    .await;
    // A new commit cannot be fetched: fetch.failed, retried.
    let rev3 = git.commit(&refs(&web_app("3", FILES)), &[], "v3");
    publish(cloud, &fleet_topic(), roll(4, &rev3)).await;
    let failures = || {
        fleet
            .events(STORE)
            .into_iter()
            .filter(|e| e.ty == EventType::FetchFailed.as_str() && rev_of(e) == Some(rev3.as_str()))
            .count()
    };
    eventually(t, "two fetch.failed for rev3 (a retry)", || {
        (failures() >= 2).then_some(())
    })
    .await;
    assert_eq!(converged(&rev3), 0);
    // The server answers again: the next retry converges.
    let t_heal = Instant::now();
    proxy.heal();
    eventually(t, "rev3 converged after the Git server returned", || {
        (converged(&rev3) == 1).then_some(())
    })
    .await;
    assert_eq!(rig.live_files(DEPLOYMENT), under(git.files(), APP));
    let reasons: BTreeSet<String> = fleet
        .events(STORE)
        .into_iter()
        .filter(|e| e.ty == EventType::FetchFailed.as_str())
        .filter_map(|e| e.reason().map(str::to_owned))
        .collect();
    assert_eq!(reasons, BTreeSet::from(["fetch_failed".to_string()]));
    println!(
        "chaos git: cached rollback applied offline; fetch.failed x{} while blackholed; converged {} ms after the Git server returned; in {:.1} s",
        failures(),
        t_heal.elapsed().as_millis(),
        started.elapsed().as_secs_f64()
    );
    rig.stop_agent().await;
}
