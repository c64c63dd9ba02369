//! `roost sim --controller`: the GitOps controller at fleet scale, with simulated stores. N
//! stores' status documents are published to the embedded cloud broker (measuring how fast
//! `roost fleet` ingests them into the fleet database), a fleet repository commit with canary,
//! 10 % and fleet waves is handed to the controller, and each wave is answered by status
//! documents that report `Converged`. Prints the time from the commit to the first wave's
//! messages on the broker, each gate to its next wave's messages, and plan-step costs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use roost_schemas::{DeploymentStatus, DesiredRef, Phase, StatusDoc, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::up::{commit_files, setup, UpError};

/// Figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerReport {
    /// Stores simulated.
    pub stores: usize,
    /// Status documents per second into the fleet database.
    pub status_ingest_per_s: f64,
    /// Fleet-repo commit (controller start) → first wave's message on the broker.
    pub commit_to_first_wave_ms: u64,
    /// Per later wave: (name, messages, gate met → its messages on the broker in ms).
    pub waves: Vec<(String, usize, u64)>,
    /// Commit → plan done (every wave through, wave messages tombstoned).
    pub commit_to_done_ms: u64,
    /// One `plan::step` over the whole fleet, median of 20 (µs).
    pub step_us: u64,
}

/// A status document of `store` in `groups`: `deployment` converged on `rev` (None: no
/// deployment yet). Also the tests' simulated stores.
pub fn status_doc(store: &str, groups: &[String], deployment: &str, rev: Option<&str>) -> Vec<u8> {
    let mut deployments = BTreeMap::new();
    if let Some(r) = rev {
        deployments.insert(
            deployment.to_owned(),
            DeploymentStatus {
                desired: Some(DesiredRef {
                    revision: r.to_owned(),
                    sequence: 1,
                    scope: "fleet".into(),
                    origin: None,
                }),
                applied_revision: Some(r.to_owned()),
                last_attempted_revision: Some(r.to_owned()),
                phase: Phase::Converged,
                ..Default::default()
            },
        );
    }
    let doc = StatusDoc {
        store: store.to_owned(),
        agent_version: "sim".into(),
        updated_at: roost_schemas::now_rfc3339(),
        roostseq: 1,
        outbox_backlog: 0,
        heartbeat_s: None,
        profile_sequence: None,
        deployments,
        freshness: Default::default(),
        groups: groups.to_vec(),
    };
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Runs the controller benchmark.
pub async fn run(stores: usize, timeout: Duration) -> Result<ControllerReport, UpError> {
    let dir = std::env::temp_dir().join(format!(
        "roost-sim-controller-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(setup("temp dir"))?;
    let cloud = roost_broker::spawn_free("cloud").map_err(setup("cloud broker"))?;
    let cancel = CancellationToken::new();
    let db_path = dir.join("fleet.db");
    let db = roost_fleet::db::FleetDb::open(&db_path).map_err(setup("fleet db"))?;
    let fopts = roost_fleet::record::FleetOptions {
        host: cloud.ip().to_string(),
        port: cloud.port(),
        db: db_path.clone(),
        client_id: "roost-fleet-sim".into(),
        security: Default::default(),
        fallbacks: Vec::new(),
        audit_interval: roost_fleet::record::DEFAULT_AUDIT_INTERVAL,
        confirm: true,
        leadership: roost_fleet::leadership::Leadership::solo(),
    };
    let fleet = tokio::spawn(roost_fleet::record::run(
        fopts,
        db.clone(),
        cancel.child_token(),
    ));
    let topics = Topics::default();
    let names: Vec<String> = (1..=stores).map(|i| format!("store-{i:05}")).collect();
    let canary: usize = (stores / 100).max(1);
    let groups_of = |i: usize| -> Vec<String> {
        if i < canary {
            vec!["canary".into()]
        } else {
            Vec::new()
        }
    };
    // One client publishes every store's status (the stores' agents, simulated).
    let (client, mut ev) = roost_fleet::cloud::connect(&cloud.to_string(), "roost-sim-stores")
        .map_err(setup("connect"))?;
    let (sub, mut ev_watch) = roost_fleet::cloud::connect(&cloud.to_string(), "roost-sim-watch")
        .map_err(setup("connect"))?;
    sub.subscribe(topics.all_deployment_filters()[0].clone(), QoS::AtLeastOnce)
        .await
        .map_err(setup("subscribe"))?;
    for f in topics.all_deployment_filters().into_iter().skip(1) {
        sub.subscribe(f, QoS::AtLeastOnce)
            .await
            .map_err(setup("subscribe"))?;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    tokio::spawn(async move {
        while let Ok(e) = ev_watch.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send((p.topic.clone(), Instant::now()));
            }
        }
    });
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let deployment = "menu";
    let t_ingest = Instant::now();
    for (i, s) in names.iter().enumerate() {
        client
            .publish(
                topics.status(s),
                QoS::AtLeastOnce,
                true,
                status_doc(s, &groups_of(i), deployment, None),
            )
            .await
            .map_err(setup("publish"))?;
    }
    let count = |db: &roost_fleet::db::FleetDb| {
        db.with_conn(|c| c.query_value::<i64>("SELECT COUNT(*) FROM status", &[]))
            .unwrap_or(0) as usize
    };
    let deadline = Instant::now() + timeout;
    while count(&db) < stores {
        if Instant::now() > deadline {
            return Err(UpError::Timeout(timeout, "status ingest".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ingest_s = t_ingest.elapsed().as_secs_f64();
    // An app repository and a fleet repository with canary, 10 % and fleet waves.
    let apps = git2::Repository::init(dir.join("apps")).map_err(setup("git init"))?;
    let mut files = BTreeMap::new();
    files.insert(
        "apps/menu/menu.yaml".to_owned(),
        "kind: ConfigMap\n".to_owned(),
    );
    let rev = commit_files(&apps, &files, "menu")?;
    let apps_url = format!("file://{}", dir.join("apps").display());
    let fleet_dir = dir.join("fleet");
    let fleet_repo = git2::Repository::init(&fleet_dir).map_err(setup("git init"))?;
    let mut ff = BTreeMap::new();
    ff.insert(
        "roost.yaml".to_owned(),
        format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ndeployments:\n  {deployment}:\n    source: {{url: \"{apps_url}\", ref: HEAD, path: apps/menu}}\n    waves:\n      - {{name: canary, group: canary}}\n      - {{name: early, percent: 10}}\n      - {{name: everyone, fleet: true}}\n    abort: {{failed_pct: 5, min_finished: 10, wave_timeout_s: 3600}}\n"
        ),
    );
    commit_files(&fleet_repo, &ff, "the fleet")?;
    let key = roost_schemas::SigningKey::generate().map_err(setup("key"))?;
    let gopts = roost_fleet::gitops::GitopsOptions {
        repo: format!("file://{}", fleet_dir.display()),
        branch: "HEAD".into(),
        file: "roost.yaml".into(),
        poll: Duration::from_secs(3600),
        host: cloud.ip().to_string(),
        port: cloud.port(),
        fallbacks: Vec::new(),
        cache_dir: dir.join("controller-git"),
        snapshot_interval: roost_fleet::gitops::snapshot::DEFAULT_INTERVAL,
        snapshot_expiry: roost_fleet::gitops::snapshot::DEFAULT_EXPIRY,
        security: Default::default(),
    };
    let t0 = Instant::now();
    let controller = tokio::spawn(roost_fleet::gitops::run(
        gopts,
        db.clone(),
        key,
        cancel.child_token(),
    ));
    // Waits for `n` deployment messages whose topics satisfy `pred`; returns the last time.
    async fn wait_msgs(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
        n: usize,
        pred: impl Fn(&str) -> bool,
        deadline: Instant,
    ) -> Result<Instant, UpError> {
        let mut seen = 0;
        let mut last = Instant::now();
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some((t, at))) if pred(&t) => {
                    seen += 1;
                    last = at;
                }
                Ok(Some(_)) => {}
                _ => {
                    return Err(UpError::Timeout(
                        Duration::ZERO,
                        format!("{seen}/{n} wave messages"),
                    ))
                }
            }
        }
        Ok(last)
    }
    let first = wait_msgs(&mut rx, 1, |t| t.contains("/groups/canary/"), deadline).await?;
    let mut report = ControllerReport {
        stores,
        status_ingest_per_s: stores as f64 / ingest_s.max(1e-9),
        commit_to_first_wave_ms: first.duration_since(t0).as_millis() as u64,
        waves: Vec::new(),
        commit_to_done_ms: 0,
        step_us: 0,
    };
    // Answers a wave: its stores report Converged on the revision.
    let converge = |idx: &[usize]| {
        let c = client.clone();
        let docs: Vec<(String, Vec<u8>)> = idx
            .iter()
            .map(|&i| {
                (
                    topics.status(&names[i]),
                    status_doc(&names[i], &groups_of(i), deployment, Some(&rev)),
                )
            })
            .collect();
        async move {
            for (t, d) in docs {
                let _ = c.publish(t, QoS::AtLeastOnce, true, d).await;
            }
        }
    };
    converge(&(0..canary).collect::<Vec<_>>()).await;
    let t_gate = Instant::now();
    let early = (stores * 10).div_ceil(100) - canary.min((stores * 10).div_ceil(100));
    let last = wait_msgs(&mut rx, early, |t| t.contains("/stores/"), deadline).await?;
    report.waves.push((
        "early".into(),
        early,
        last.duration_since(t_gate).as_millis() as u64,
    ));
    converge(&(0..stores).collect::<Vec<_>>()).await;
    let t_gate = Instant::now();
    let last = wait_msgs(&mut rx, 1, |t| t.contains("/fleet/"), deadline).await?;
    report.waves.push((
        "everyone".into(),
        1,
        last.duration_since(t_gate).as_millis() as u64,
    ));
    loop {
        let done = db
            .with_conn(roost_fleet::db::gitops::plans)
            .ok()
            .and_then(|p| p.get(deployment).cloned())
            .is_some_and(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done);
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err(UpError::Timeout(timeout, "plan done".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.commit_to_done_ms = t0.elapsed().as_millis() as u64;
    // The wave engine alone over the whole fleet.
    let view = db
        .with_conn(|c| roost_fleet::db::gitops::view(c, deployment))
        .map_err(setup("view"))?;
    let plan = db
        .with_conn(roost_fleet::db::gitops::plans)
        .ok()
        .and_then(|p| p.get(deployment).cloned())
        .ok_or_else(|| UpError::Failed(format!("no plan for {deployment}")))?;
    let mut us = Vec::new();
    for _ in 0..20 {
        let mut p = plan.clone();
        p.status = roost_fleet::gitops::plan::PlanStatus::Running;
        p.wave = 1;
        let t = Instant::now();
        let _ = roost_fleet::gitops::plan::step(
            &mut p,
            &view,
            &Default::default(),
            roost_fleet::db::now_ms(),
        );
        us.push(t.elapsed().as_micros() as u64);
    }
    us.sort_unstable();
    report.step_us = us[us.len() / 2];
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = controller.await;
        let _ = fleet.await;
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report)
}

/// Prints the report.
pub fn print(r: &ControllerReport) {
    println!("roost sim --controller: {} simulated stores", r.stores);
    println!(
        "  status ingest into the fleet DB: {:.0} documents/s",
        r.status_ingest_per_s
    );
    println!(
        "  fleet-repo commit -> first wave published: {} ms",
        r.commit_to_first_wave_ms
    );
    for (name, n, ms) in &r.waves {
        println!("  gate met -> wave {name} published ({n} messages): {ms} ms");
    }
    println!("  commit -> plan done: {} ms", r.commit_to_done_ms);
    println!(
        "  one plan step over the fleet (median of 20): {} µs",
        r.step_us
    );
}
