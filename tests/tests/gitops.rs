//! GitOps for the fleet, end to end on loopback: a fleet repository and an app repository
//! served by `git daemon`, the embedded cloud broker, `roost fleet` with its controller (in
//! process, and as a process for the kill -9 test), and stores with edge broker, bridge and
//! agent. Edit, commit, watch it roll.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use roost_schemas::CloudEvent;
use roost_tests::harness::{self, Component, FleetService, GitServer, Observer, Signer, StoreRig};

const T: Duration = Duration::from_secs(60);
const APP: &str = "apps/menu";

struct Rig {
    dir: tempfile::TempDir,
    cloud: SocketAddr,
    app: GitServer,
    fleet_repo: GitServer,
    signer: Signer,
    obs: Observer,
    fleet: Option<FleetService>,
    controller: Option<Component>,
    stores: Vec<StoreRig>,
    db: PathBuf,
    dep: String,
}

fn manifest(v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: menu\ndata:\n  version: \"{v}\"\n")
}

impl Rig {
    /// `n` stores; the first `canary` of them in group `canary`.
    async fn new(n: usize, canary: usize) -> Rig {
        harness::init();
        let dir = tempfile::tempdir().expect("tmp");
        let cloud = roost::broker::spawn_free("cloud").expect("cloud broker");
        let (app, _) = GitServer::start(&[(&format!("{APP}/menu.yaml"), &manifest("1"))]);
        let (fleet_repo, _) = GitServer::start(&[("README", "fleet\n")]);
        // A generated key (it has a PKCS#8 form, so it can be written for a controller process).
        let signer = Signer {
            key: roost_schemas::SigningKey::generate().expect("key"),
        };
        let obs = Observer::start(cloud).await;
        let id = format!("{:06x}", rand::random::<u32>() & 0xffffff);
        let allowed = app.allowed();
        let mut stores = Vec::new();
        for i in 1..=n {
            let groups: &[&str] = if i <= canary { &["canary"] } else { &[] };
            let mut s = StoreRig::new(
                &format!("s{id}-{i:02}"),
                groups,
                dir.path(),
                cloud,
                &signer,
                &allowed,
            );
            // A hook that fails while the store's marker file exists (for the abort test).
            let marker = s.dir.join("fail-marker");
            s.agent_cfg.file.target =
                roost_agent::config::TargetConfig::Files(roost_agent::config::FilesConfig {
                    root: None,
                    hook: Some(vec![
                        "sh".into(),
                        "-c".into(),
                        format!("test ! -e {}", marker.display()),
                    ]),
                });
            s.start();
            stores.push(s);
        }
        let db = dir.path().join("fleet.db");
        let fleet = FleetService::start(cloud, &db);
        Rig {
            dep: format!("menu-{id}"),
            dir,
            cloud,
            app,
            fleet_repo,
            signer,
            obs,
            fleet: Some(fleet),
            controller: None,
            stores,
            db,
        }
    }

    fn start_controller(&mut self) {
        let opts = roost::gitops::GitopsOptions {
            repo: self.fleet_repo.url(),
            branch: "HEAD".into(),
            file: "roost.yaml".into(),
            poll: Duration::from_millis(500),
            host: self.cloud.ip().to_string(),
            port: self.cloud.port(),
            security: Default::default(),
            cache_dir: self.dir.path().join("controller-git"),
            http: None,
        };
        let db = roost::fleet::FleetDb::open(&self.db).expect("db");
        let key = roost_schemas::SigningKey::from_pkcs8(self.signer.key.pkcs8().expect("pkcs8"))
            .expect("key");
        self.controller = Some(Component::spawn("controller", move |c| {
            roost::gitops::run(opts, db, key, c)
        }));
    }

    fn fleet_yaml(&self, waves: &str, extra: &str) -> String {
        format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups: [canary]\ndeployments:\n  {}:\n    source:\n      url: {}\n      ref: HEAD\n      path: {APP}\n    waves:\n{waves}{extra}",
            self.dep,
            self.app.url()
        )
    }

    fn commit_fleet(&mut self, yaml: &str) -> String {
        self.fleet_repo
            .commit(&[("roost.yaml", yaml)], &[], "fleet change")
    }

    fn commit_app(&mut self, v: &str) -> String {
        self.app.commit(
            &[(&format!("{APP}/menu.yaml"), &manifest(v))],
            &[],
            "app change",
        )
    }

    fn names(&self) -> Vec<String> {
        self.stores.iter().map(|s| s.name.clone()).collect()
    }

    async fn converged(&self, store: &str, rev: &str) -> CloudEvent {
        self.obs
            .wait_event(store, "dev.roost.converged", T, |e| {
                e.data["revision"] == rev
            })
            .await
    }

    async fn all_converged(&self, rev: &str) {
        for s in self.names() {
            self.obs
                .wait_phase(&s, &self.dep, "Converged", Some(rev), T)
                .await;
        }
    }

    fn db(&self) -> roost::fleet::FleetDb {
        roost::fleet::FleetDb::open(&self.db).expect("db")
    }

    fn plan(&self) -> Option<roost::gitops::plan::Plan> {
        self.db()
            .with_conn(roost::gitops::store::plans)
            .expect("plans")
            .remove(&self.dep)
    }

    fn published(&self) -> Vec<roost::gitops::store::Published> {
        self.db()
            .with_conn(roost::gitops::store::published)
            .expect("published")
    }

    async fn finish(mut self) {
        if let Some(c) = self.controller.take() {
            c.stop().await;
        }
        for s in &mut self.stores {
            s.stop_agent().await;
            s.stop_bridge().await;
        }
        if let Some(f) = self.fleet.take() {
            f.stop().await;
        }
    }
}

const WAVES: &str = "      - {name: canary, group: canary}\n      - {name: half, percent: 50}\n      - {name: everyone, fleet: true}\n";

/// Index of the first event matching `pred` in arrival order at the cloud.
fn first(events: &[CloudEvent], pred: impl Fn(&CloudEvent) -> bool) -> Option<usize> {
    events.iter().position(pred)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_rolls_out_wave_by_wave_and_a_new_app_commit_follows() {
    let mut r = Rig::new(6, 1).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(WAVES, "");
    let origin = r.commit_fleet(&yaml);
    r.start_controller();
    r.all_converged(&rev1).await;
    // The plan: done, from the fleet-repo commit, every wave through.
    let plan = harness::eventually(T, "plan done", || {
        r.plan()
            .filter(|p| p.status == roost::gitops::plan::PlanStatus::Done)
    })
    .await;
    assert_eq!(plan.origin, origin);
    assert_eq!(plan.release.revision, rev1);
    assert_eq!(
        plan.wave_stores[0].len(),
        1,
        "canary wave: the canary store"
    );
    // 50 % of 6 = 3 stores, the canary counts: 2 more.
    assert_eq!(plan.wave_stores[1].len(), 2, "{:?}", plan.wave_stores);
    // Gates: no store of a later wave received the revision before the earlier wave's
    // stores converged (arrival order at the cloud).
    let seen = r.obs.snapshot();
    let events: Vec<CloudEvent> = seen.events.clone();
    let received = |s: &str| {
        first(&events, |e| {
            e.source.contains(&format!("/{s}/"))
                && e.ty == "dev.roost.rollout.received"
                && e.data["revision"] == rev1.as_str()
        })
    };
    let converged = |s: &str| {
        first(&events, |e| {
            e.source.contains(&format!("/{s}/"))
                && e.ty == "dev.roost.converged"
                && e.data["revision"] == rev1.as_str()
        })
    };
    let canary = &plan.wave_stores[0][0];
    let half = &plan.wave_stores[1];
    let rest: Vec<String> = r
        .names()
        .into_iter()
        .filter(|s| s != canary && !half.contains(s))
        .collect();
    let c_done = converged(canary).expect("canary converged");
    for s in half {
        assert!(
            received(s).expect("received") > c_done,
            "{s} after the canary"
        );
    }
    let h_done = half
        .iter()
        .filter_map(|s| converged(s))
        .max()
        .expect("half converged");
    for s in &rest {
        assert!(
            received(s).expect("received") > h_done,
            "{s} after the 50 % wave"
        );
    }
    // The wave messages were tombstoned: only the fleet message stands.
    let live: Vec<String> = r
        .published()
        .into_iter()
        .filter(|p| !p.remove)
        .map(|p| p.topic)
        .collect();
    assert_eq!(live, vec![format!("roost/v1/fleet/deployments/{}", r.dep)]);
    let seq1 = r
        .published()
        .into_iter()
        .find(|p| p.topic.contains("/fleet/"))
        .expect("fleet")
        .sequence;
    let status = roost::gitops::plan_status_text(&r.db(), Some(&r.dep)).expect("status");
    assert!(status.contains(&origin[..12]), "{status}");
    assert!(status.contains("done"), "{status}");

    // A new commit on the tracked ref: a new plan, a higher sequence, everyone on it.
    let rev2 = r.commit_app("2");
    r.all_converged(&rev2).await;
    let seq2 = harness::eventually(T, "fleet message of rev2", || {
        r.published()
            .into_iter()
            .find(|p| p.topic.contains("/fleet/") && p.revision.as_deref() == Some(rev2.as_str()))
            .map(|p| p.sequence)
    })
    .await;
    assert!(seq2 > seq1, "{seq2} > {seq1}");
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_stores_abort_the_plan_and_get_the_previous_revision_back() {
    let mut r = Rig::new(4, 1).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(
        WAVES,
        "    abort: {failed_pct: 0, min_finished: 1, wave_timeout_s: 600}\n",
    );
    r.commit_fleet(&yaml);
    r.start_controller();
    r.all_converged(&rev1).await;
    harness::eventually(T, "first plan done", || {
        r.plan()
            .filter(|p| p.status == roost::gitops::plan::PlanStatus::Done)
    })
    .await;
    // The canary store's hook fails from now on; a new revision goes out.
    let canary = r.stores[0].name.clone();
    std::fs::write(r.stores[0].dir.join("fail-marker"), "x").expect("marker");
    let rev2 = r.commit_app("2");
    let degraded = r
        .obs
        .wait_event(&canary, "dev.roost.degraded", T, |e| {
            e.data["revision"] == rev2.as_str()
        })
        .await;
    assert_eq!(degraded.reason(), Some("hook_failed"));
    let plan = harness::eventually(T, "plan aborted", || {
        r.plan().filter(|p| {
            p.release.revision == rev2
                && matches!(p.status, roost::gitops::plan::PlanStatus::Aborted(_))
        })
    })
    .await;
    let roost::gitops::plan::PlanStatus::Aborted(reason) = &plan.status else {
        unreachable!()
    };
    assert!(reason.contains(&canary), "{reason}");
    // The canary store gets the previous revision back (and its hook is fine again).
    std::fs::remove_file(r.stores[0].dir.join("fail-marker")).expect("marker");
    r.obs
        .wait_phase(&canary, &r.dep, "Converged", Some(&rev1), T)
        .await;
    // No other store ever received rev2.
    let seen = r.obs.snapshot();
    for s in r.names().iter().filter(|s| **s != canary) {
        assert!(
            !seen
                .of(s, "dev.roost.rollout.received")
                .iter()
                .any(|e| e.data["revision"] == rev2.as_str()),
            "{s} never got the aborted revision"
        );
    }
    let status = roost::gitops::plan_status_text(&r.db(), Some(&r.dep)).expect("status");
    assert!(status.contains("aborted"), "{status}");
    assert!(status.contains(&canary), "the status says why: {status}");
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_fleet_file_publishes_nothing_and_the_last_good_one_stays() {
    let mut r = Rig::new(1, 1).await;
    let rev1 = r.commit_app("1");
    let good = r.fleet_yaml(WAVES, "");
    r.commit_fleet(&good);
    r.start_controller();
    r.all_converged(&rev1).await;
    harness::eventually(T, "plan done", || {
        r.plan()
            .filter(|p| p.status == roost::gitops::plan::PlanStatus::Done)
    })
    .await;
    let before = r.published();
    let app_url = r.app.url();
    let dep = r.dep.clone();
    let bad = vec![
        ("syntax", "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ndeployments: [unclosed\n".to_owned(), "YAML"),
        ("schema", good.replace("kind: Fleet", "kind: Fleat"), "schema"),
        ("unknown group", good.replace("group: canary}", "group: cnary}"), "unknown group cnary"),
        (
            "both ref and revision",
            format!(
                "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ndeployments:\n  {dep}:\n    source:\n      url: {app_url}\n      ref: HEAD\n      revision: {}\n      path: {APP}\n",
                "a".repeat(40)
            ),
            "schema",
        ),
    ];
    // Each bad file is recorded as invalid with its reason; the good commit stays in force.
    let good_commit = r
        .db()
        .with_conn(roost::gitops::store::sync_state)
        .expect("sync")
        .expect("synced")
        .0
        .commit;
    for (what, yaml, reason) in bad {
        let c = r.commit_fleet(&yaml);
        let st = harness::eventually(T, "bad file recorded", || {
            r.db()
                .with_conn(roost::gitops::store::sync_state)
                .ok()
                .flatten()
                .map(|(s, _)| s)
                .filter(|s| s.commit == c)
        })
        .await;
        assert!(!st.ok, "{what}: invalid");
        assert!(st.reason.contains(reason), "{what}: {}", st.reason);
        assert_eq!(
            st.good_commit.as_deref(),
            Some(good_commit.as_str()),
            "{what}"
        );
    }
    // Nothing was published for a bad file (a removal of the deployment among them).
    assert_eq!(r.published(), before);
    let retained = roost::cloud::read_retained(
        &r.cloud.to_string(),
        &[format!("roost/v1/fleet/deployments/{}", r.dep)],
        Duration::from_secs(5),
    )
    .await
    .expect("retained");
    assert_eq!(
        retained.len(),
        1,
        "the good file's rollout is still retained"
    );
    r.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_stores_are_deferred_and_converge_when_they_return() {
    let mut r = Rig::new(4, 1).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(WAVES, "");
    r.commit_fleet(&yaml);
    r.start_controller();
    r.all_converged(&rev1).await;
    harness::eventually(T, "first plan done", || {
        r.plan()
            .filter(|p| p.status == roost::gitops::plan::PlanStatus::Done)
    })
    .await;
    // Two stores go offline (their bridges stop: presence offline).
    for s in &mut r.stores[2..] {
        s.stop_bridge().await;
    }
    let offline: Vec<String> = r.stores[2..].iter().map(|s| s.name.clone()).collect();
    for s in &offline {
        harness::eventually(T, "offline presence", || {
            r.fleet
                .as_ref()
                .and_then(|f| f.presence(s))
                .filter(|p| p.state == roost_schemas::PresenceState::Offline)
        })
        .await;
    }
    let rev2 = r.commit_app("2");
    let plan = harness::eventually(T, "plan done without the offline stores", || {
        r.plan().filter(|p| {
            p.release.revision == rev2 && p.status == roost::gitops::plan::PlanStatus::Done
        })
    })
    .await;
    for s in &offline {
        assert_eq!(
            plan.outcomes.get(s),
            Some(&roost::gitops::plan::StoreOutcome::Deferred),
            "{s}: {:?}",
            plan.outcomes
        );
    }
    for s in &mut r.stores[2..] {
        s.start_bridge();
    }
    r.all_converged(&rev2).await;
    r.finish().await;
}

/// `roost fleet --repo` as a process, `kill -9`ed mid-plan (during the canary's soak) and
/// restarted: it resumes; every wave is published exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_resumes_without_duplicate_or_skipped_waves() {
    let mut r = Rig::new(3, 1).await;
    // The in-process fleet service is replaced by the process.
    if let Some(f) = r.fleet.take() {
        f.stop().await;
    }
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(
        "      - {name: canary, group: canary, soak_s: 4}\n      - {name: everyone, fleet: true}\n",
        "",
    );
    r.commit_fleet(&yaml);
    let key_dir = r.dir.path().join("keys");
    std::fs::create_dir_all(&key_dir).expect("keys");
    let key_file = key_dir.join("controller.key");
    {
        use base64::Engine as _;
        std::fs::write(
            &key_file,
            base64::engine::general_purpose::STANDARD.encode(r.signer.key.pkcs8().expect("pkcs8")),
        )
        .expect("key");
    }
    let args: Vec<String> = vec![
        "fleet".into(),
        "--broker".into(),
        r.cloud.to_string(),
        "--db".into(),
        r.db.display().to_string(),
        "--repo".into(),
        r.fleet_repo.url(),
        "--branch".into(),
        "HEAD".into(),
        "--key".into(),
        key_file.display().to_string(),
        "--poll-interval".into(),
        "1".into(),
    ];
    let log = r.dir.path().join("fleet.log");
    let mut p = harness::RoostProcess::start(&args, &log);
    let canary = r.stores[0].name.clone();
    r.converged(&canary, &rev1).await;
    // Mid-soak: the canary wave is published and converged, the fleet wave is not out yet.
    let plan = r.plan().expect("plan");
    assert_eq!(plan.wave, 0, "{plan:?}");
    p.kill();
    p.restart();
    r.all_converged(&rev1).await;
    harness::eventually(T, "plan done", || {
        r.plan()
            .filter(|p| p.status == roost::gitops::plan::PlanStatus::Done)
    })
    .await;
    // Each store received rev1 exactly once per scope: no wave published twice, none
    // skipped (the non-canary stores got it from the fleet wave).
    let seen = r.obs.snapshot();
    let mut per: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in r.names() {
        for e in seen
            .of(&s, "dev.roost.rollout.received")
            .iter()
            .filter(|e| e.data["revision"] == rev1.as_str())
        {
            *per.entry((s.clone(), e.data["scope"].as_str().unwrap_or("").to_owned()))
                .or_default() += 1;
        }
    }
    assert_eq!(
        per.get(&(canary.clone(), "group:canary".into())),
        Some(&1),
        "{per:?}"
    );
    for s in r.names() {
        assert_eq!(
            per.get(&(s.clone(), "fleet".into())),
            Some(&1),
            "{s}: {per:?}"
        );
    }
    p.kill();
    r.finish().await;
}
