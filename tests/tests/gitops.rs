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
            // A hook that, while the store's marker file exists, passes only for the revisions
            // it lists (for the abort test: the previous revision passes, a new one fails).
            let marker = s.dir.join("fail-marker");
            s.agent_cfg.file.target =
                roost_agent::config::TargetConfig::Files(roost_agent::config::FilesConfig {
                    root: None,
                    hook: Some(vec![
                        "sh".into(),
                        "-c".into(),
                        format!(
                            "test ! -e {m} || grep -qx \"$ROOST_REVISION\" {m}",
                            m = marker.display()
                        ),
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
            metrics: None,
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
    // The fleet view: every store's desired revision with its commit subject (described by
    // the controller) and the fleet commit it came from; canary and fleet run the same.
    let v = harness::eventually(T, "release commit described", || {
        let v = roost::view::build(
            &roost::view::load(&r.db()).expect("view"),
            roost::fleet::now_ms(),
        );
        v.stores
            .iter()
            .flat_map(|s| &s.deployments)
            .all(|c| {
                c.desired
                    .as_ref()
                    .is_some_and(|d| d.commit.subject.as_deref() == Some("app change"))
            })
            .then_some(v)
    })
    .await;
    for s in &v.stores {
        let c = &s.deployments[0];
        let d = c.desired.as_ref().expect("desired");
        assert_eq!(d.commit.revision, rev1);
        assert_eq!(
            d.origin.as_ref().map(|o| o.commit.as_str()),
            Some(origin.as_str())
        );
        assert_eq!(
            (c.marker, c.shown.as_str()),
            (roost::view::Marker::Same, "Converged")
        );
        assert!(s.stale.is_none(), "{s:?}");
    }
    let cmp = roost::view::compare(
        &v,
        &roost::view::Selector::Group("canary".into()),
        &roost::view::Selector::Fleet,
    );
    assert_eq!(cmp.len(), 1);
    assert_eq!(cmp[0].marker, "=");
    assert!(
        !cmp[0].updatable,
        "the fleet already runs what the canary runs"
    );

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
    // From now on the canary store's hook passes only for rev1; a new revision goes out.
    let canary = r.stores[0].name.clone();
    std::fs::write(r.stores[0].dir.join("fail-marker"), format!("{rev1}\n")).expect("marker");
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
    // The canary store gets the previous revision back (its hook passes for it).
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

/// "Promote all" the GitOps way: the canary runs a revision the fleet does not; `roost
/// promote` writes the fleet-file change on a branch for a pull request; merged, the
/// controller rolls it out to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_writes_the_git_change_that_makes_the_fleet_run_what_the_canary_runs() {
    let mut r = Rig::new(3, 1).await;
    let rev1 = r.commit_app("1");
    // Only a canary wave: the rest of the fleet does not get it.
    let yaml = r.fleet_yaml("      - {name: canary, group: canary}\n", "");
    r.commit_fleet(&yaml);
    r.start_controller();
    let canary = r.stores[0].name.clone();
    r.obs
        .wait_phase(&canary, &r.dep, "Converged", Some(&rev1), T)
        .await;
    // The app moves on; the canary still runs rev1, which is what gets promoted.
    let work = r.dir.path().join("promote-work");
    let spec = roost::gitops::promote::PromoteSpec {
        deployment: r.dep.clone(),
        from: "group:canary".into(),
        to: "fleet".into(),
        repo: r.fleet_repo.path().display().to_string(),
        branch: "HEAD".into(),
        file: "roost.yaml".into(),
        direct: false,
    };
    let p = roost::gitops::promote::promote(&r.db(), &spec, &work).expect("promote");
    assert_eq!(p.revision, rev1);
    assert!(
        p.branch.starts_with(&format!("promote/{}-", r.dep)),
        "{}",
        p.branch
    );
    // The branch holds the change: the fleet pinned to what the canary runs, every wave.
    let repo = git2::Repository::open(r.fleet_repo.path()).expect("repo");
    let commit = repo
        .find_branch(&p.branch, git2::BranchType::Local)
        .expect("branch pushed")
        .get()
        .peel_to_commit()
        .expect("commit");
    let blob = commit
        .tree()
        .expect("tree")
        .get_path(std::path::Path::new("roost.yaml"))
        .expect("roost.yaml")
        .to_object(&repo)
        .expect("blob")
        .peel_to_blob()
        .expect("blob");
    let promoted = roost::gitops::parse_fleet_file(blob.content()).expect("valid fleet file");
    let src = promoted.deployments[&r.dep].source.clone().expect("source");
    assert_eq!(src.revision.as_deref(), Some(rev1.as_str()));
    assert_eq!(src.git_ref, None);
    // Merging the pull request (the same file on the tracked branch) rolls it out; with a
    // fleet wave added, every store converges on the canary's revision.
    let text = String::from_utf8_lossy(blob.content()).to_string();
    let mut merged = promoted.clone();
    merged
        .deployments
        .get_mut(&r.dep)
        .expect("dep")
        .waves
        .push(roost_schemas::fleet::Wave {
            name: "everyone".into(),
            group: None,
            percent: None,
            stores: None,
            fleet: Some(true),
            converged_pct: None,
            soak_s: None,
        });
    assert!(text.contains("Promoted"), "{text}");
    let merged_yaml = serde_saphyr::to_string(&merged).expect("yaml");
    r.commit_fleet(&merged_yaml);
    r.all_converged(&rev1).await;
    r.finish().await;
}

/// `roost up --stores 20` is GitOps: canary, then 50 %, then the fleet, each gate observed in
/// the order its events reached the cloud (the lines `roost up` prints as they arrive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_up_rolls_out_in_waves_canary_half_everyone() {
    harness::init();
    let dir = tempfile::tempdir().expect("tmp");
    let out = tokio::process::Command::new(harness::roost_bin())
        .args([
            "up",
            "--once",
            "--stores",
            "20",
            "--timeout",
            "120",
            "--state-dir",
        ])
        .arg(dir.path())
        .env("ROOST_LOG", "error")
        .output()
        .await
        .expect("roost up");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("converged 20/20 in ")),
        "{stdout}"
    );
    // Line order = arrival order at the cloud.
    let lines: Vec<&str> = stdout.lines().collect();
    let at = |store: &str, what: &str| {
        lines
            .iter()
            .position(|l| l.contains(&format!("  {store}  {what}")))
    };
    let stores: Vec<String> = (1..=20).map(|i| format!("store-{i:04}")).collect();
    let canary_done = at("store-0001", "converged").expect("canary converged");
    // `roost up` subscribes before anything is published, so every store's events are there,
    // the canary's first.
    let mut first_received: Vec<(usize, String)> = stores
        .iter()
        .map(|s| (at(s, "rollout.received").expect("received"), s.clone()))
        .collect();
    first_received.sort();
    assert_eq!(first_received[0].1, "store-0001", "{stdout}");
    // The 50 % wave: 10 stores with the canary; the next 9 after the canary converged.
    let half: Vec<&String> = first_received[1..10].iter().map(|(_, s)| s).collect();
    for (i, s) in &first_received[1..10] {
        assert!(
            *i > canary_done,
            "{s} got it before the canary wave was done:\n{stdout}"
        );
    }
    let half_done = half
        .iter()
        .map(|s| at(s, "converged").expect("converged"))
        .max()
        .expect("half");
    for (i, s) in &first_received[10..] {
        assert!(
            *i > half_done,
            "{s} got it before the 50 % wave was done:\n{stdout}"
        );
    }
    // The plan says so too.
    let plan = std::process::Command::new(harness::roost_bin())
        .args(["plan", "status", "--db"])
        .arg(dir.path().join("fleet.db"))
        .output()
        .expect("roost plan status");
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("wave 1 canary"), "{text}");
    assert!(
        text.contains("wave 2 half       done     stores=9"),
        "{text}"
    );
}

/// The fleet benchmark cannot rot: `roost sim --json` in both topologies converges every
/// store, loses no event, and reports where the time went (figures are printed, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_sim_json_smoke_in_both_topologies() {
    harness::init();
    for topology in ["direct", "bridged"] {
        let out = tokio::process::Command::new(harness::roost_bin())
            .args([
                "sim",
                "--stores",
                "5",
                "--rollouts",
                "2",
                "--json",
                "--topology",
                topology,
            ])
            .env("ROOST_LOG", "error")
            .output()
            .await
            .expect("roost sim");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().last().expect("a JSON line");
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        eprintln!("roost sim --json ({topology}): {v}");
        assert_eq!(v["topology"], topology);
        assert_eq!(v["stores"], 5);
        assert_eq!(v["converged"], 5, "{v}");
        assert_eq!(v["failed"], 0, "{v}");
        assert_eq!(v["events_lost"], 0, "{v}");
        assert!(
            v["events_received"]
                .as_u64()
                .is_some_and(|n| n >= 5 * 2 * 4),
            "{v}"
        );
        for k in [
            "mqtt_delivery",
            "queue_before_fetch",
            "git_fetch",
            "render",
            "apply",
            "report",
        ] {
            assert!(v["breakdown_ms"][k]["p50"].is_u64(), "{k}: {v}");
        }
        for k in [
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
            "cpu_s",
            "peak_rss_bytes",
            "duplicates",
        ] {
            assert!(!v[k].is_null(), "{k}: {v}");
        }
    }
}
