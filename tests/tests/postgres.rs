//! The fleet database on a real PostgreSQL (a cluster made by `initdb` in a temporary
//! directory) and `roost fleet` processes standing by for each other on it: every `FleetDb`
//! path round-trips on PostgreSQL; a leader killed with `-9` mid-plan is replaced within
//! 10 s and its plan resumes without a duplicate or skipped wave; a leader paused with
//! SIGSTOP past its lease and resumed publishes and writes nothing.
//!
//! Each test starts its own PostgreSQL and broker, skips on a developer machine without
//! PostgreSQL and fails under `CI=true` (`.ci/run` installs it).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use roost_fleet::db::{self, FleetDb};
use roost_schemas::Topics;
use roost_tests::harness::{self, GitServer, RoostProcess};
use roost_tests::postgres::{postgres_bin, Postgres};
use rumqttc::{Event, Packet, QoS};

const T: Duration = Duration::from_secs(60);

#[test]
fn every_fleet_db_path_round_trips_on_postgres() {
    let Some(bin) = postgres_bin("every_fleet_db_path_round_trips_on_postgres") else {
        return;
    };
    let pg = Postgres::start(&bin);
    let url = pg.create("round_trip");
    let db = FleetDb::open(Path::new(&url)).expect("open on PostgreSQL");
    assert_eq!(db.engine(), db::Engine::Postgres);
    db::conformance::round_trip(&db);
    // Opened again (a second instance): nothing to migrate, every table there.
    let again = FleetDb::open(Path::new(&url)).expect("reopen");
    again
        .with_conn(|c| {
            assert_eq!(db::schema::version(c)?, i64::from(db::schema::latest()));
            for t in ["events", "gitops_plans", "broker_audit", "leader"] {
                assert!(db::schema::has_table(c, t)?, "{t}");
            }
            Ok(())
        })
        .expect("schema");
    // Events from two instances at once are recorded once.
    let ev = |id: &str, seq: u64| {
        let mut e = roost_schemas::CloudEvent::new(
            "roost://stores/s9/agent",
            roost_schemas::EventType::ApplyStarted,
            None,
            serde_json::json!({}),
        );
        e.id = id.into();
        e.roostseq = seq;
        ("s9".to_string(), e, "{}".to_string())
    };
    let batch: Vec<_> = (1..=50).map(|i| ev(&format!("s9-{i}"), i)).collect();
    let (b1, b2) = (batch.clone(), batch);
    let (d1, d2) = (db.clone(), again.clone());
    let t1 = std::thread::spawn(move || d1.record_events(&b1).expect("instance 1"));
    let t2 = std::thread::spawn(move || d2.record_events(&b2).expect("instance 2"));
    let new = t1.join().expect("t1") + t2.join().expect("t2");
    assert_eq!(new, 50, "each event recorded by exactly one instance");
    assert_eq!(db.events("s9").expect("events").len(), 50);
    // The fence: the controller's writes go through only under the leader's term.
    let mut lease = db::leader::LeaseSession::connect(&url, "holder-1").expect("lease session");
    let seen = lease.observe(None).expect("observe");
    assert!(seen.have_lock && seen.row.is_none());
    assert!(lease
        .take_over(1, "holder-1", Duration::from_secs(5))
        .expect("take over"));
    struct F(u64, &'static str);
    impl db::Fence for F {
        fn current(&self) -> Option<(u64, String)> {
            Some((self.0, self.1.into()))
        }
        fn lost(&self, _: u64) {}
    }
    db.fenced(Arc::new(F(1, "holder-1")))
        .touch_sync()
        .expect("the leader writes");
    for stale in [F(2, "holder-1"), F(1, "holder-2")] {
        match db.fenced(Arc::new(stale)).touch_sync() {
            Err(db::DbError::Fenced { .. }) => {}
            other => panic!("a stale term wrote: {other:?}"),
        }
    }
    println!("postgres: every FleetDb path round-trips; events deduplicated across instances");
}

/// A message seen on the broker: when (the wall clock, to compare with the processes'
/// logs), topic, payload.
type Seen = (SystemTime, String, Vec<u8>);

/// Everything published on `roost/#` from the moment the subscription is acknowledged.
struct Watch {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Watch {
    async fn start(broker: SocketAddr) -> Watch {
        let (client, mut ev) =
            roost_fleet::cloud::connect(&broker.to_string(), "pg-test-watch").expect("connect");
        client
            .subscribe("roost/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s2 = seen.clone();
        tokio::spawn(async move {
            let _client = client;
            let mut tx = Some(tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => s2.lock().expect("seen").push((
                        SystemTime::now(),
                        p.topic.clone(),
                        p.payload.to_vec(),
                    )),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(T, rx)
            .await
            .expect("SUBACK in time")
            .expect("SUBACK");
        Watch { seen }
    }

    fn all(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Waits for a rollout (not a tombstone) on `topic`.
    async fn rollout(&self, topic: &str) {
        harness::eventually(T, topic, || {
            self.all()
                .iter()
                .any(|(_, t, p)| t == topic && rollout(p).is_some_and(|(_, _, remove)| !remove))
                .then_some(())
        })
        .await;
    }
}

/// A rollout envelope's (revision, sequence, remove).
fn rollout(payload: &[u8]) -> Option<(String, u64, bool)> {
    use base64::Engine as _;
    let env: roost_schemas::dsse::Envelope = serde_json::from_slice(payload).ok()?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(env.payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((
        v["source"]["revision"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        v["sequence"].as_u64()?,
        v["remove"].as_bool().unwrap_or(false),
    ))
}

fn status_doc(store: &str, group: &str, rev: Option<&str>) -> Vec<u8> {
    roost_sim::controller::status_doc(store, &[group.to_owned()], "web", rev)
}

/// PostgreSQL, a broker, a fleet repository (three one-store group waves and a fleet
/// wave) and a controller key: what several `roost fleet` processes share.
struct Rig {
    _pg: Postgres,
    url: String,
    broker: SocketAddr,
    git: GitServer,
    rev: String,
    key: PathBuf,
    dir: tempfile::TempDir,
}

const STORES: [(&str, &str); 3] = [("s1", "g1"), ("s2", "g2"), ("s3", "g3")];

impl Rig {
    async fn start(bin: &Path, name: &str) -> Rig {
        harness::init();
        let bin = bin.to_owned();
        let db = name.to_owned();
        let (pg, url) = tokio::task::spawn_blocking(move || {
            let pg = Postgres::start(&bin);
            let url = pg.create(&db);
            (pg, url)
        })
        .await
        .expect("postgres");
        let broker = roost_broker::spawn_free("cloud").expect("broker");
        let (mut git, _) = GitServer::start(&[("README", "fleet")]);
        let yaml = format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups: [g1, g2, g3]\ndeployments:\n  web:\n    source: {{url: \"{}\", ref: HEAD, path: apps/web}}\n    waves:\n      - {{name: w1, group: g1}}\n      - {{name: w2, group: g2}}\n      - {{name: w3, group: g3}}\n      - {{name: all, fleet: true}}\n",
            git.url()
        );
        let rev = git.commit(
            &[
                ("roost.yaml", &yaml),
                (
                    "apps/web/configmap.yaml",
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: web\n",
                ),
            ],
            &[],
            "the fleet",
        );
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("controller.key");
        {
            use base64::Engine as _;
            let k = roost_schemas::SigningKey::generate().expect("key");
            std::fs::write(
                &key,
                base64::engine::general_purpose::STANDARD.encode(k.pkcs8().expect("pkcs8")),
            )
            .expect("key file");
        }
        for (s, g) in STORES {
            harness::publish(broker, &Topics::default().status(s), status_doc(s, g, None)).await;
        }
        Rig {
            _pg: pg,
            url,
            broker,
            git,
            rev,
            key,
            dir,
        }
    }

    /// `roost fleet` instance `name` on the shared database, logging to `DIR/name.log`.
    fn fleet(&self, name: &str) -> RoostProcess {
        self.fleet_with(name, &[])
    }

    /// [`Rig::fleet`] with more arguments.
    fn fleet_with(&self, name: &str, extra: &[String]) -> RoostProcess {
        let mut args: Vec<String> = vec![
            "fleet".into(),
            "--broker".into(),
            self.broker.to_string(),
            "--db".into(),
            self.url.clone(),
            "--client-id".into(),
            format!("roost-fleet-{name}"),
            "--cache-dir".into(),
            self.dir
                .path()
                .join(format!("{name}-git"))
                .display()
                .to_string(),
            "--repo".into(),
            self.git.url(),
            "--branch".into(),
            "HEAD".into(),
            "--key".into(),
            self.key.display().to_string(),
            "--poll-interval".into(),
            "1".into(),
        ];
        args.extend_from_slice(extra);
        RoostProcess::start(&args, &self.dir.path().join(format!("{name}.log")))
    }

    /// A store reports the rollout converged.
    async fn converge(&self, store: &str) {
        let group = STORES
            .iter()
            .find(|(s, _)| *s == store)
            .map(|(_, g)| *g)
            .unwrap_or_default();
        harness::publish(
            self.broker,
            &Topics::default().status(store),
            status_doc(store, group, Some(&self.rev)),
        )
        .await;
    }

    /// Reads the database (on the blocking pool: the PostgreSQL client is blocking).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&FleetDb) -> Result<T, db::DbError> + Send + 'static,
    ) -> T {
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let db = FleetDb::open(Path::new(&url)).expect("open");
            f(&db).expect("read")
        })
        .await
        .expect("read task")
    }
}

/// What the controller wrote: the leader row, the plans, the publications, the last sync.
type ControllerState = (
    Option<db::leader::LeaderRow>,
    BTreeMap<String, roost_fleet::gitops::plan::Plan>,
    Vec<db::gitops::Published>,
    Option<db::SyncState>,
);

fn controller_state(db: &FleetDb) -> Result<ControllerState, db::DbError> {
    db.with_conn(|c| {
        Ok((
            db::leader::row(c)?,
            db::gitops::plans(c)?,
            db::gitops::published(c)?,
            db::gitops::sync_state(c)?.map(|(s, _)| s),
        ))
    })
}

/// When `p` logged the `n`th line (from 1) with `marker`, by its log's timestamp.
fn logged_time(p: &RoostProcess, marker: &str, n: usize) -> Option<SystemTime> {
    let text = p.log_text();
    let line = text.lines().filter(|l| l.contains(marker)).nth(n - 1)?;
    // Text logs: an RFC 3339 timestamp first, perhaps inside colour codes.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let stamp = plain.split_whitespace().next()?;
    let t =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.into())
}

/// Waits until `p`'s log has `marker` at least `n` times; returns when it was seen.
async fn logged(p: &RoostProcess, marker: &str, n: usize) -> Instant {
    harness::eventually(T, &format!("{} logs {marker:?}", p.log().display()), || {
        (p.log_text().matches(marker).count() >= n).then(Instant::now)
    })
    .await
}

fn topic(scope: &str) -> String {
    format!("roost/v1/{scope}/deployments/web")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_leader_mid_plan_without_duplicate_or_skipped_waves() {
    const TEST: &str = "a_standby_takes_over_a_killed_leader_mid_plan";
    let Some(bin) = postgres_bin(TEST) else {
        return;
    };
    let r = Rig::start(&bin, "failover").await;
    let watch = Watch::start(r.broker).await;
    let mut a = r.fleet("a");
    logged(&a, "leading:", 1).await;
    let http = roost_tests::fixtures::free_addr();
    let b = r.fleet_with("b", &["--http".into(), http.to_string()]);
    logged(&b, "campaigning", 1).await;

    watch.rollout(&topic("groups/g1")).await;
    r.converge("s1").await;
    watch.rollout(&topic("groups/g2")).await;
    // Mid-plan: wave 2 is out, its store has not converged.
    let plan = r
        .read(|db| db.with_conn(db::gitops::plans))
        .await
        .remove("web")
        .expect("plan");
    assert_eq!(plan.wave, 1, "{plan:?}");
    // The standby records and serves: its API shows every store and the leader's plan.
    let api = |path: &'static str| {
        let url = format!("http://{http}{path}");
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            agent
                .get(&url)
                .call()
                .ok()
                .filter(|r| r.status() == 200)
                .and_then(|mut r| r.body_mut().read_to_string().ok())
        })
    };
    harness::eventually_async(
        T,
        "the standby's API shows the stores and the plan",
        || async {
            let stores = api("/api/v1/stores").await.ok()??;
            let plans = api("/api/v1/plans").await.ok()??;
            (STORES
                .iter()
                .all(|(s, _)| stores.contains(&format!("\"{s}\"")))
                && plans.contains("\"web\""))
            .then_some(())
        },
    )
    .await;
    let killed = Instant::now();
    a.kill();
    r.converge("s2").await;
    let leading = logged(&b, "leading:", 1).await;
    let failover = leading.duration_since(killed);
    watch.rollout(&topic("groups/g3")).await;
    let resumed = killed.elapsed();
    println!(
        "postgres failover: the standby leads {:.1} s after the leader's kill -9; the plan's next wave is out {:.1} s after",
        failover.as_secs_f64(),
        resumed.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(10),
        "the standby took {failover:?} to lead"
    );
    r.converge("s3").await;
    watch.rollout(&topic("fleet")).await;
    let done = harness::eventually_async(T, "plan done", || async {
        r.read(|db| db.with_conn(db::gitops::plans))
            .await
            .remove("web")
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await;
    assert_eq!(done.wave, 3, "{done:?}");
    // Every wave's rollout went out exactly once (one sequence per topic), none skipped,
    // and in order.
    let mut firsts = Vec::new();
    for scope in ["groups/g1", "groups/g2", "groups/g3", "fleet"] {
        let t = topic(scope);
        let rollouts: Vec<(SystemTime, u64)> = watch
            .all()
            .iter()
            .filter(|(_, topic, _)| *topic == t)
            .filter_map(|(at, _, p)| {
                rollout(p)
                    .filter(|(rev, _, remove)| *rev == r.rev && !remove)
                    .map(|(_, s, _)| (*at, s))
            })
            .collect();
        let mut seqs: Vec<u64> = rollouts.iter().map(|(_, s)| *s).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), 1, "{scope}: {rollouts:?}");
        firsts.push(rollouts[0].0);
    }
    assert!(firsts.windows(2).all(|w| w[0] <= w[1]), "waves in order");
    let published = r.read(|db| db.with_conn(db::gitops::published)).await;
    for scope in ["groups/g1", "groups/g2", "groups/g3", "fleet"] {
        assert!(
            published.iter().any(|p| p.topic == topic(scope)),
            "{scope} recorded: {published:?}"
        );
    }
    let leader = r
        .read(|db| db.with_conn(db::leader::row))
        .await
        .expect("leader row");
    assert_eq!(leader.term, 2, "one takeover: {leader:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_publishes_and_writes_nothing_when_resumed() {
    const TEST: &str = "a_leader_paused_past_its_lease";
    let Some(bin) = postgres_bin(TEST) else {
        return;
    };
    let r = Rig::start(&bin, "paused").await;
    let a = r.fleet("a");
    logged(&a, "leading:", 1).await;
    let mut b = r.fleet("b");
    logged(&b, "campaigning", 1).await;
    let watch = Watch::start(r.broker).await;
    // The leader is busy: the plan's first wave is out.
    watch.rollout(&topic("groups/g1")).await;

    let stopped = Instant::now();
    a.signal(Signal::SIGSTOP);
    logged(&b, "leading:", 1).await;
    println!(
        "postgres takeover from a paused leader: {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    assert!(
        b.log_text().contains("sessions were terminated"),
        "the paused leader's sessions were terminated"
    );
    // The new leader goes away too: whatever appears on the broker from now on is the
    // resumed old leader's.
    b.kill();
    let before = r.read(controller_state).await;
    let resumed = Instant::now();
    let resumed_at = SystemTime::now();
    a.signal(Signal::SIGCONT);
    logged(&a, "stepped down", 1).await;
    let stepped_down = resumed.elapsed();
    let after = r.read(controller_state).await;
    assert_eq!(before, after, "the resumed old leader wrote");
    let leader = after.0.expect("leader row");
    assert_eq!(leader.term, 2, "{leader:?}");
    // It still records (a store's events reach the database through it, the only instance
    // left) but confirms nothing until it leads again: when B's lease has run out, it takes
    // a new term and confirms them. Everything it published since SIGCONT came after that.
    let source = "roost://stores/s1/agent";
    for seq in 1..=3u64 {
        let mut e = roost_schemas::CloudEvent::new(
            source,
            roost_schemas::EventType::ApplyStarted,
            Some("web"),
            serde_json::json!({}),
        );
        e.roostseq = seq;
        harness::publish_qos1(
            r.broker,
            &Topics::default().events("s1"),
            serde_json::to_vec(&e).expect("event"),
            false,
        )
        .await;
    }
    harness::eventually_async(T, "the resumed instance recorded the events", || async {
        (!r.read(|db| db.events("s1")).await.is_empty()).then_some(())
    })
    .await;
    let confirmed = Topics::default().confirmed("s1");
    harness::eventually(T, "the events confirmed once it leads again", || {
        watch
            .all()
            .iter()
            .any(|(_, t, _)| *t == confirmed)
            .then_some(())
    })
    .await;
    logged(&a, "leading:", 2).await;
    let leads_again = logged_time(&a, "leading:", 2).expect("the time it leads again");
    // (The store's events are this test's own.)
    let early: Vec<(SystemTime, String)> = watch
        .all()
        .into_iter()
        .filter(|(at, t, _)| *at >= resumed_at && *at < leads_again && !t.ends_with("/events"))
        .map(|(at, t, _)| (at, t))
        .collect();
    assert!(
        early.is_empty(),
        "the resumed old leader published before it led again: {early:?}"
    );
    println!(
        "postgres: the old leader resumed after losing its lease stepped down {:.2} s after SIGCONT, wrote nothing, and published nothing until it led again {:.1} s after SIGCONT",
        stepped_down.as_secs_f64(),
        leads_again
            .duration_since(resumed_at)
            .unwrap_or_default()
            .as_secs_f64()
    );
}
