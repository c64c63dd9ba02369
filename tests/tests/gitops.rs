//! GitOps for the fleet, end to end on loopback: a fleet repository and an app repository
//! served by `git daemon`, the embedded cloud broker, `roost fleet` with its controller (in
//! process, and as a process for the kill -9 test), and stores with edge broker, bridge and
//! agent. Edit, commit, watch it roll.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use roost_schemas::CloudEvent;
use roost_tests::fixtures::{roost_up_once, skip_unless_ci};
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
    /// The running controller's handle: an API served after it sends plan actions and
    /// webhook syncs over it, as `roost fleet` does.
    handle: Option<roost_fleet::gitops::ControllerHandle>,
    stores: Vec<StoreRig>,
    db: PathBuf,
    dep: String,
    /// The HTTP API's servers, stopped with the rig.
    api: Vec<tokio_util::sync::DropGuard>,
}

fn manifest(v: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: menu\ndata:\n  version: \"{v}\"\n")
}

impl Rig {
    /// `n` stores; the first `canary` of them in group `canary`.
    async fn new(n: usize, canary: usize) -> Rig {
        harness::init();
        let dir = tempfile::tempdir().expect("tmp");
        let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
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
                        // With a `slow` file, deployments matching the pattern it holds
                        // take 3 s in the hook (a slow dependency; a window to cut the link).
                        format!(
                            "{{ test ! -e {slow} || case \"$ROOST_DEPLOYMENT\" in $(cat {slow})) sleep 3;; esac; }}; test ! -e {m} || grep -qx \"$ROOST_REVISION\" {m}",
                            m = marker.display(),
                            slow = s.dir.join("slow").display()
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
            handle: None,
            stores,
            db,
            api: Vec::new(),
        }
    }

    /// Serves the dashboard and API on a free loopback port with `token` for plan actions.
    async fn serve_api(&mut self, token: Option<&str>) -> SocketAddr {
        let cancel = tokio_util::sync::CancellationToken::new();
        let api = roost_fleet::api::Api::new(
            self.db(),
            roost_fleet::api::ApiOptions {
                token: token.map(str::to_owned),
                controller: self.handle.clone(),
                ..Default::default()
            },
            cancel.clone(),
        )
        .expect("api");
        let addr =
            roost_fleet::api::serve(([127, 0, 0, 1], 0).into(), api.router(), cancel.clone())
                .await
                .expect("serve");
        self.api.push(cancel.drop_guard());
        addr
    }

    fn start_controller(&mut self) {
        let opts = roost_fleet::gitops::GitopsOptions {
            repo: self.fleet_repo.url(),
            branch: "HEAD".into(),
            file: "roost.yaml".into(),
            poll: Duration::from_millis(500),
            host: self.cloud.ip().to_string(),
            port: self.cloud.port(),
            fallbacks: Vec::new(),
            security: Default::default(),
            cache_dir: self.dir.path().join("controller-git"),
            snapshot_interval: roost_fleet::gitops::snapshot::DEFAULT_INTERVAL,
            snapshot_expiry: roost_fleet::gitops::snapshot::DEFAULT_EXPIRY,
        };
        let db = roost_fleet::db::FleetDb::open(&self.db).expect("db");
        let key = roost_schemas::SigningKey::from_pkcs8(self.signer.key.pkcs8().expect("pkcs8"))
            .expect("key");
        let (handle, inbox) = roost_fleet::gitops::ControllerHandle::channel();
        self.handle = Some(handle);
        self.controller = Some(Component::spawn("controller", move |c| {
            roost_fleet::gitops::run_with_handle(opts, db, key, Some(inbox), c)
        }));
    }

    /// `roost fleet --repo` as a process on the rig's database (the in-process fleet service
    /// stopped first), with `extra` flags, logging to `fleet.log`.
    async fn controller_process(&mut self, extra: &[&str]) -> harness::RoostProcess {
        if let Some(f) = self.fleet.take() {
            f.stop().await;
        }
        let key_dir = self.dir.path().join("keys");
        std::fs::create_dir_all(&key_dir).expect("keys");
        let key_file = key_dir.join("controller.key");
        {
            use base64::Engine as _;
            std::fs::write(
                &key_file,
                base64::engine::general_purpose::STANDARD
                    .encode(self.signer.key.pkcs8().expect("pkcs8")),
            )
            .expect("key");
        }
        let mut args: Vec<String> = vec![
            "fleet".into(),
            "--broker".into(),
            self.cloud.to_string(),
            "--db".into(),
            self.db.display().to_string(),
            "--repo".into(),
            self.fleet_repo.url(),
            "--branch".into(),
            "HEAD".into(),
            "--key".into(),
            key_file.display().to_string(),
            "--poll-interval".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        harness::RoostProcess::start(&args, &self.dir.path().join("fleet.log"))
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
        self.obs.wait_converged(store, rev, T).await
    }

    async fn all_converged(&self, rev: &str) {
        for s in self.names() {
            self.obs
                .wait_phase(&s, &self.dep, "Converged", Some(rev), T)
                .await;
        }
    }

    fn db(&self) -> roost_fleet::db::FleetDb {
        roost_fleet::db::FleetDb::open(&self.db).expect("db")
    }

    fn plan(&self) -> Option<roost_fleet::gitops::plan::Plan> {
        self.db()
            .with_conn(roost_fleet::db::gitops::plans)
            .expect("plans")
            .remove(&self.dep)
    }

    fn published(&self) -> Vec<roost_fleet::db::gitops::Published> {
        self.db()
            .with_conn(roost_fleet::db::gitops::published)
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
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
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
    let status = roost_fleet::gitops::plan_status_text(&r.db(), Some(&r.dep)).expect("status");
    assert!(status.contains(&origin[..12]), "{status}");
    assert!(status.contains("done"), "{status}");
    // The fleet view: every store's desired revision with its commit subject (described by
    // the controller) and the fleet commit it came from; canary and fleet run the same.
    let v = harness::eventually(T, "release commit described", || {
        let v = roost_fleet::view::build(
            &roost_fleet::view::load(&r.db()).expect("view"),
            roost_fleet::db::now_ms(),
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
            (roost_fleet::view::Marker::Same, "Converged")
        );
        assert!(s.stale.is_none(), "{s:?}");
    }
    let cmp = roost_fleet::view::compare(
        &v,
        &roost_fleet::view::Selector::Group("canary".into()),
        &roost_fleet::view::Selector::Fleet,
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
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
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
                && matches!(p.status, roost_fleet::gitops::plan::PlanStatus::Aborted(_))
        })
    })
    .await;
    let roost_fleet::gitops::plan::PlanStatus::Aborted(reason) = &plan.status else {
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
    let status = roost_fleet::gitops::plan_status_text(&r.db(), Some(&r.dep)).expect("status");
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
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
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
        .with_conn(roost_fleet::db::gitops::sync_state)
        .expect("sync")
        .expect("synced")
        .0
        .commit;
    for (what, yaml, reason) in bad {
        let c = r.commit_fleet(&yaml);
        let st = harness::eventually(T, "bad file recorded", || {
            r.db()
                .with_conn(roost_fleet::db::gitops::sync_state)
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
    let retained = roost_fleet::cloud::read_retained(
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
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
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
            p.release.revision == rev2 && p.status == roost_fleet::gitops::plan::PlanStatus::Done
        })
    })
    .await;
    for s in &offline {
        assert_eq!(
            plan.outcomes.get(s),
            Some(&roost_fleet::gitops::plan::StoreOutcome::Deferred),
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
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(
        "      - {name: canary, group: canary, soak_s: 4}\n      - {name: everyone, fleet: true}\n",
        "",
    );
    r.commit_fleet(&yaml);
    // The in-process fleet service is replaced by the process.
    let mut p = r.controller_process(&[]).await;
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
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
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
    // `roost promote` reads the fleet record, which may record the status a moment after the
    // observer saw it.
    harness::eventually(T, "the canary converged in the fleet record", || {
        let v = roost_fleet::view::build(
            &roost_fleet::view::load(&r.db()).ok()?,
            roost_fleet::db::now_ms(),
        );
        v.stores
            .iter()
            .find(|s| s.store == canary)?
            .deployments
            .iter()
            .any(|c| {
                c.deployment == r.dep
                    && c.phase == "Converged"
                    && c.applied.as_ref().is_some_and(|a| a.revision == rev1)
            })
            .then_some(())
    })
    .await;
    // The app moves on; the canary still runs rev1, which is what gets promoted.
    let work = r.dir.path().join("promote-work");
    let spec = roost_fleet::gitops::promote::PromoteSpec {
        deployment: r.dep.clone(),
        from: "group:canary".into(),
        to: "fleet".into(),
        repo: r.fleet_repo.path().display().to_string(),
        branch: "HEAD".into(),
        file: "roost.yaml".into(),
        direct: false,
    };
    let p = roost_fleet::gitops::promote::promote(&r.db(), &spec, &work).expect("promote");
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
    let promoted = roost_fleet::gitops::parse_fleet_file(blob.content()).expect("valid fleet file");
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
            selector: None,
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
    let out = roost_up_once(&["--stores", "20", "--timeout", "120"], dir.path(), &[]).await;
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

// ---- The HTTP API and the dashboard ----

const TOKEN: &str = "test-token-0123456789abcdef";

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// `GET` or `POST` (empty body), with a bearer token if given.
async fn call(method: &'static str, url: String, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    tokio::task::spawn_blocking(move || {
        let agent = http_agent(Duration::from_secs(30));
        let resp = match method {
            "GET" => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_empty()
            }
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_owned();
        let body = resp.into_body().read_to_string().expect("body");
        Answer {
            status,
            content_type,
            body,
        }
    })
    .await
    .expect("http task")
}

/// schemas/openapi.yaml, checked as a document, and the responses checked against it.
struct OpenApi {
    doc: serde_json::Value,
    /// (method, path template) of every operation a test exercised.
    seen: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

impl OpenApi {
    /// Loads the document: it must parse as OpenAPI 3.1 (oas3), every `$ref` must resolve
    /// inside it, every operation must have a unique `operationId` and responses, and every
    /// component schema must be valid JSON Schema 2020-12 (the 3.1 dialect).
    fn load() -> OpenApi {
        let doc: serde_json::Value =
            serde_saphyr::from_str(roost_fleet::api::OPENAPI_YAML).expect("openapi.yaml is YAML");
        let spec = oas3::from_json(serde_json::to_string(&doc).expect("json"))
            .unwrap_or_else(|e| panic!("schemas/openapi.yaml is not OpenAPI 3.1: {e}"));
        assert!(spec.openapi.starts_with("3.1."), "{}", spec.openapi);
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(
            all.len() > 50,
            "the document uses its components: {}",
            all.len()
        );
        for r in &all {
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{r}: only local references"));
            assert!(doc.pointer(ptr).is_some(), "{r} does not resolve");
        }
        let mut ids = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path}: operationId"));
                assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path}: responses"
                );
            }
        }
        for (name, schema) in doc["components"]["schemas"].as_object().expect("schemas") {
            let mut root = schema.clone();
            root["components"] = doc["components"].clone();
            jsonschema::draft202012::meta::validate(schema)
                .unwrap_or_else(|e| panic!("components/schemas/{name}: {e}"));
            jsonschema::draft202012::new(&root)
                .unwrap_or_else(|e| panic!("components/schemas/{name}: {e}"));
        }
        OpenApi {
            doc,
            seen: Default::default(),
        }
    }

    fn resolve<'a>(&'a self, v: &'a serde_json::Value) -> &'a serde_json::Value {
        match v["$ref"].as_str() {
            Some(r) => self.doc.pointer(&r[1..]).expect("resolves"),
            None => v,
        }
    }

    fn validate(&self, what: &str, schema: &serde_json::Value, value: &serde_json::Value) {
        let mut root = schema.clone();
        root["components"] = self.doc["components"].clone();
        let v = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&root)
            .expect("schema");
        let errors: Vec<String> = v
            .iter_errors(value)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} does not match schemas/openapi.yaml:\n  {}\n{}",
            errors.join("\n  "),
            &value.to_string()[..value.to_string().len().min(2000)]
        );
    }

    /// Checks an answer of `method template` against the documented response of its status
    /// and content type; returns the JSON body (Null for other content).
    fn check(&self, method: &str, template: &str, a: &Answer) -> serde_json::Value {
        let what = format!("{method} {template} -> {}", a.status);
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{what}: not documented");
        let resp = self.resolve(&op["responses"][a.status.to_string()]);
        assert!(
            resp.is_object(),
            "{what}: status not documented ({})",
            a.body
        );
        let schema = &resp["content"][&a.content_type]["schema"];
        assert!(
            schema.is_object(),
            "{what}: content type {:?} not documented",
            a.content_type
        );
        self.seen
            .lock()
            .expect("seen")
            .insert((method.to_owned(), template.to_owned()));
        if a.content_type != "application/json" {
            return serde_json::Value::Null;
        }
        let body: serde_json::Value =
            serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        self.validate(&what, schema, &body);
        body
    }

    /// Every documented operation was exercised.
    fn assert_all_seen(&self) {
        let seen = self.seen.lock().expect("seen");
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("item").keys() {
                assert!(
                    seen.contains(&(method.to_uppercase(), path.clone())),
                    "{} {path} is documented but no test called it",
                    method.to_uppercase()
                );
            }
        }
    }
}

#[test]
fn the_openapi_document_is_valid_openapi_3_1() {
    let api = OpenApi::load();
    // The stream's messages are described too.
    let events = &api.doc["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["x-events"];
    for kind in ["summary", "plans", "rows", "events"] {
        assert!(events[kind]["$ref"].is_string(), "{kind}");
    }
}

/// Reads the SSE stream at `url` until every kind in `want` arrived (or `timeout`); returns
/// (kind, data) in order.
fn read_sse(url: &str, want: &[&str], timeout: Duration) -> Vec<(String, String)> {
    use std::io::BufRead as _;
    let resp = http_agent(timeout).get(url).call().expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut out = Vec::new();
    let (mut kind, mut data) = (String::new(), String::new());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push_str(d);
        } else if line.is_empty() && !kind.is_empty() {
            out.push((std::mem::take(&mut kind), std::mem::take(&mut data)));
            if want.iter().all(|w| out.iter().any(|(k, _)| k == w)) {
                break;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_endpoint_answers_as_its_openapi_document_says() {
    let spec = OpenApi::load();
    let mut r = Rig::new(2, 1).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(WAVES, "");
    r.commit_fleet(&yaml);
    r.start_controller();
    let addr = r.serve_api(Some(TOKEN)).await;
    let read_only = r.serve_api(None).await;
    let u = |p: &str| format!("http://{addr}{p}");
    r.all_converged(&rev1).await;
    harness::eventually(T, "plan done", || {
        r.plan()
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await;
    let dep = r.dep.clone();
    let store = r.names()[0].clone();
    let get = |p: String| call("GET", p, None);

    let a = get(u("/")).await;
    spec.check("GET", "/", &a);
    assert!(a.body.contains("/assets/app.js"), "the page");
    for asset in ["/assets/app.js", "/assets/app.css"] {
        assert_eq!(get(u(asset)).await.status, 200, "{asset}");
    }
    let a = get(u("/api/v1/openapi.yaml")).await;
    spec.check("GET", "/api/v1/openapi.yaml", &a);
    assert_eq!(a.body, roost_fleet::api::OPENAPI_YAML);

    // The summary counts what the stores report (the snapshot is at most a tick old).
    let sum = harness::eventually_async(T, "summary with both stores converged", || async {
        let a = get(u("/api/v1/summary")).await;
        let v = spec.check("GET", "/api/v1/summary", &a);
        (v["by_phase"]["Converged"] == 2).then_some(v)
    })
    .await;
    assert_eq!(
        (sum["stores"].clone(), sum["online"].clone()),
        (2.into(), 2.into())
    );
    assert_eq!(sum["plans"]["done"], 1);

    // Rows: filters and paging on the server.
    let cases: &[(&str, u16, Option<u64>)] = &[
        ("", 200, Some(2)),
        ("?phase=converged", 200, Some(2)),
        ("?phase=Failed", 200, Some(0)),
        ("?stale=true", 200, Some(0)),
        ("?group=canary", 200, Some(1)),
        ("?per_page=1&page=2", 200, Some(2)),
        ("?page=abc", 400, None),
        ("?stale=maybe", 400, None),
    ];
    for (q, status, total) in cases {
        let a = get(u(&format!("/api/v1/rows{q}"))).await;
        assert_eq!(a.status, *status, "rows{q}: {}", a.body);
        let v = spec.check("GET", "/api/v1/rows", &a);
        if let Some(t) = total {
            assert_eq!(v["total"], *t, "rows{q}");
        }
    }
    let page2 = spec.check(
        "GET",
        "/api/v1/rows",
        &get(u("/api/v1/rows?per_page=1&page=2")).await,
    );
    assert_eq!(page2["rows"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["pages"], 2);
    let row = &spec.check(
        "GET",
        "/api/v1/rows",
        &get(u(&format!("/api/v1/rows?q={store}"))).await,
    )["rows"][0];
    assert_eq!(row["desired"]["revision"], rev1.as_str());
    assert_eq!(row["applied"]["revision"], rev1.as_str(), "full revisions");
    assert_eq!(row["marker"], "=");
    assert_eq!(
        row["desired"]["origin"]["repo"],
        r.fleet_repo.url().as_str()
    );

    let v = spec.check("GET", "/api/v1/stores", &get(u("/api/v1/stores")).await);
    assert_eq!(v["stores"].as_array().map(Vec::len), Some(2));
    let v = spec.check(
        "GET",
        "/api/v1/stores/{store}",
        &get(u(&format!("/api/v1/stores/{store}"))).await,
    );
    assert_eq!(v["rows"][0]["deployment"], dep.as_str());
    let a = get(u("/api/v1/stores/no-such-store")).await;
    assert_eq!(a.status, 404);
    spec.check("GET", "/api/v1/stores/{store}", &a);

    let v = spec.check(
        "GET",
        "/api/v1/deployments",
        &get(u("/api/v1/deployments")).await,
    );
    assert_eq!(v["deployments"][0]["in_sync"], 2);
    let v = spec.check(
        "GET",
        "/api/v1/deployments/{deployment}",
        &get(u(&format!("/api/v1/deployments/{dep}?per_page=1"))).await,
    );
    assert_eq!(
        (v["total"].clone(), v["plan"].clone()),
        (2.into(), "done".into())
    );
    for (p, status) in [
        ("/api/v1/deployments/no-such-deployment".to_owned(), 404),
        (format!("/api/v1/deployments/{dep}?page=-1"), 400),
    ] {
        let a = get(u(&p)).await;
        assert_eq!(a.status, status, "{p}");
        spec.check("GET", "/api/v1/deployments/{deployment}", &a);
    }

    let v = spec.check("GET", "/api/v1/plans", &get(u("/api/v1/plans")).await);
    assert_eq!(v["plans"][0]["waves"].as_array().map(Vec::len), Some(3));
    let v = spec.check(
        "GET",
        "/api/v1/plans/{deployment}",
        &get(u(&format!("/api/v1/plans/{dep}"))).await,
    );
    assert_eq!(v["status"], "done");
    assert_eq!(v["waves"][0]["target"], "group canary");
    assert_eq!(v["waves"][0]["converged"], 1);
    let a = get(u("/api/v1/plans/no-such-deployment")).await;
    assert_eq!(a.status, 404);
    spec.check("GET", "/api/v1/plans/{deployment}", &a);

    // Plan actions: a token, the right one, on a plan they apply to.
    let action = "/api/v1/plans/{deployment}/{action}";
    let cases: Vec<(String, Option<&str>, u16, &str)> = vec![
        (
            u(&format!("/api/v1/plans/{dep}/pause")),
            None,
            401,
            "unauthorized",
        ),
        (
            u(&format!("/api/v1/plans/{dep}/pause")),
            Some("wrong-token"),
            403,
            "forbidden",
        ),
        (
            format!("http://{read_only}/api/v1/plans/{dep}/pause"),
            Some(TOKEN),
            403,
            "read_only",
        ),
        (
            u(&format!("/api/v1/plans/{dep}/pause")),
            Some(TOKEN),
            409,
            "conflict",
        ),
        (
            u(&format!("/api/v1/plans/{dep}/explode")),
            Some(TOKEN),
            404,
            "not_found",
        ),
        (
            u("/api/v1/plans/no-such-deployment/pause"),
            Some(TOKEN),
            404,
            "not_found",
        ),
    ];
    for (url, token, status, code) in cases {
        let a = call("POST", url.clone(), token).await;
        assert_eq!(a.status, status, "{url} {token:?}: {}", a.body);
        let v = spec.check("POST", action, &a);
        assert_eq!(v["error"]["code"], code, "{url}");
    }

    // Events: a time range, paged by cursor, either way round.
    let since =
        roost_schemas::format_rfc3339(time::OffsetDateTime::now_utc() - time::Duration::hours(1));
    let until = roost_schemas::now_rfc3339();
    let q = |extra: &str| {
        u(&format!(
            "/api/v1/events?since={since}&until={until}&store={store}{extra}"
        ))
    };
    let p1 = spec.check("GET", "/api/v1/events", &get(q("&limit=2")).await);
    let p1e = p1["events"].as_array().expect("events").clone();
    assert_eq!(p1e.len(), 2);
    let after = p1["next_after"].as_i64().expect("more pages");
    let p2 = spec.check(
        "GET",
        "/api/v1/events",
        &get(q(&format!("&limit=2&after={after}"))).await,
    );
    let first2 = p2["events"][0]["arrival"].as_i64().expect("arrival");
    assert!(first2 > after);
    let all = spec.check("GET", "/api/v1/events", &get(q("&limit=1000")).await);
    let all = all["events"].as_array().expect("events").clone();
    assert!(all.iter().all(|e| e["store"] == store.as_str()));
    assert!(all
        .iter()
        .any(|e| e["event"]["type"] == "dev.roost.converged"));
    let desc = spec.check(
        "GET",
        "/api/v1/events",
        &get(q("&order=desc&limit=1")).await,
    );
    assert_eq!(
        desc["events"][0]["arrival"],
        all.last().expect("last")["arrival"]
    );
    assert!(desc["next_before"].is_i64());
    let future =
        roost_schemas::format_rfc3339(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let none = spec.check(
        "GET",
        "/api/v1/events",
        &get(u(&format!("/api/v1/events?since={future}"))).await,
    );
    assert_eq!(none["events"].as_array().map(Vec::len), Some(0));
    for bad in ["?since=yesterday", "?order=sideways", "?limit=x"] {
        let a = get(u(&format!("/api/v1/events{bad}"))).await;
        assert_eq!(a.status, 400, "{bad}");
        spec.check("GET", "/api/v1/events", &a);
    }

    // Notification deliveries: none queued without --notify.
    let v = spec.check(
        "GET",
        "/api/v1/notifications",
        &get(u("/api/v1/notifications")).await,
    );
    assert_eq!(
        (v["queued"].as_u64(), v["failed"].as_u64()),
        (Some(0), Some(0))
    );

    // The controller's routes are still there.
    let a = call("POST", u("/hooks/git"), None).await;
    assert_eq!(a.status, 202);
    spec.check("POST", "/hooks/git", &a);
    let v = spec.check("GET", "/plans", &get(u("/plans")).await);
    assert!(v[&dep].is_object(), "{v}");

    // The live stream: a new revision shows as summary, plans, rows and events messages,
    // each as documented.
    let stream_url = u("/api/v1/stream");
    let reader = tokio::task::spawn_blocking(move || {
        read_sse(
            &stream_url,
            &["summary", "plans", "rows", "events"],
            Duration::from_secs(120),
        )
    });
    // The listener is subscribed once it got its first messages; committing a little later
    // is not needed for correctness (any later change is a message).
    let rev2 = r.commit_app("2");
    let got = reader.await.expect("stream reader");
    let x = &spec.doc["paths"]["/api/v1/stream"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["x-events"];
    for kind in ["summary", "plans", "rows", "events"] {
        assert!(
            got.iter().any(|(k, _)| k == kind),
            "a {kind} message: {got:?}"
        );
    }
    for (kind, data) in &got {
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON data");
        spec.validate(
            &format!("stream {kind}"),
            spec.resolve(&x[kind.as_str()]),
            &v,
        );
    }
    spec.seen
        .lock()
        .expect("seen")
        .insert(("GET".into(), "/api/v1/stream".into()));
    r.all_converged(&rev2).await;

    // A running plan: pause and resume it over HTTP; the controller takes the request.
    let soak = "      - {name: canary, group: canary, soak_s: 3600}\n      - {name: everyone, fleet: true}\n";
    let yaml = r.fleet_yaml(soak, "");
    r.commit_fleet(&yaml);
    harness::eventually(T, "a plan soaking after its canary", || {
        r.plan().filter(|p| {
            p.status == roost_fleet::gitops::plan::PlanStatus::Running
                && p.waves[0].soak_s == Some(3600)
        })
    })
    .await;
    for (verb, then) in [("pause", "paused"), ("resume", "running")] {
        let a = call(
            "POST",
            u(&format!("/api/v1/plans/{dep}/{verb}")),
            Some(TOKEN),
        )
        .await;
        assert_eq!(a.status, 202, "{verb}: {}", a.body);
        let v = spec.check("POST", action, &a);
        assert_eq!(v["status"], "requested");
        harness::eventually_async(T, then, || async {
            let a = get(u(&format!("/api/v1/plans/{dep}"))).await;
            let v = spec.check("GET", "/api/v1/plans/{deployment}", &a);
            (v["status"] == then).then_some(())
        })
        .await;
    }
    spec.assert_all_seen();
    r.finish().await;
}

/// A plan action from another process (`roost plan pause|resume` on the same database)
/// reaches the controller through the fleet database's request table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_plan_from_another_process_pauses_and_resumes_through_the_database() {
    let mut r = Rig::new(2, 1).await;
    r.commit_app("1");
    let soak = "      - {name: canary, group: canary, soak_s: 3600}\n      - {name: everyone, fleet: true}\n";
    let yaml = r.fleet_yaml(soak, "");
    r.commit_fleet(&yaml);
    r.start_controller();
    use roost_fleet::gitops::plan::PlanStatus;
    harness::eventually(T, "a running plan", || {
        r.plan().filter(|p| p.status == PlanStatus::Running)
    })
    .await;
    for (verb, then) in [
        ("pause", PlanStatus::Paused),
        ("resume", PlanStatus::Running),
    ] {
        let out = std::process::Command::new(harness::roost_bin())
            .args(["plan", verb, &r.dep, "--db"])
            .arg(&r.db)
            .output()
            .expect("roost plan");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "roost plan {verb}: {stdout}");
        assert!(
            stdout.contains(&format!("{verb} requested for {}", r.dep)),
            "{stdout}"
        );
        harness::eventually(T, verb, || r.plan().filter(|p| p.status == then)).await;
    }
    r.finish().await;
}

/// The browser test's tools: node, Debian's chromium and `npm ci` in tests/browser. None
/// (skip) when one is missing on a developer's machine; under CI (`CI=true`) that fails.
fn browser_tools() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let chromium = std::path::Path::new("/usr/bin/chromium").exists();
    let playwright = dir
        .join("node_modules/playwright-core/package.json")
        .exists();
    if node && chromium && playwright {
        return Some(dir);
    }
    let missing = format!(
        "node {node}, /usr/bin/chromium {chromium}, tests/browser/node_modules (npm ci) {playwright}"
    );
    skip_unless_ci(
        &format!("the browser test needs {missing}, and CI must run it (.ci/run installs them)"),
        &format!("skipping the browser test: {missing}"),
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_in_a_real_browser() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let Some(dir) = browser_tools() else { return };
    const STORES: usize = 20;
    let mut r = Rig::new(STORES, 1).await;
    let rev1 = r.commit_app("1");
    let waves = "      - {name: canary, group: canary}\n      - {name: everyone, fleet: true}\n";
    let yaml = r.fleet_yaml(waves, "");
    r.commit_fleet(&yaml);
    r.start_controller();
    let addr = r.serve_api(Some(TOKEN)).await;
    let out = r.dir.path().join("browser");
    std::fs::create_dir_all(&out).expect("out dir");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(dir.join("dashboard.mjs"))
        .current_dir(&dir)
        .env("DASH_URL", format!("http://{addr}/"))
        .env("DASH_TOKEN", TOKEN)
        .env("DASH_STORES", STORES.to_string())
        .env("DASH_DEPLOYMENT", &r.dep)
        .env("DASH_REV1", &rev1[..12])
        .env("DASH_OUT", &out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = std::env::var_os("ROOST_DASHBOARD_SCREENSHOT") {
        cmd.env("DASH_SCREENSHOT", p);
    }
    let mut child = cmd.spawn().expect("node");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut screenshot = None;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .expect("the browser script said nothing for 5 minutes")
            .expect("read")
            .expect("the browser script ended before DONE");
        println!("{line}");
        let reply = match line.as_str() {
            "DONE" => break,
            l if l.starts_with("FAILED") => {
                panic!("browser: {l} (screenshots in {})", out.display())
            }
            l if l.starts_with("SCREENSHOT ") => {
                screenshot = Some(PathBuf::from(&l["SCREENSHOT ".len()..]));
                continue;
            }
            "STEP commit" => r.commit_app("2")[..12].to_owned(),
            "STEP stop-bridge" => {
                let s = r.stores.last_mut().expect("store");
                s.stop_bridge().await;
                s.name.clone()
            }
            "STEP running-plan" => {
                // A changed wave (a long soak after the canary) makes a new plan that runs.
                let soak = "      - {name: canary, group: canary, soak_s: 3600}\n      - {name: everyone, fleet: true}\n";
                let yaml = r.fleet_yaml(soak, "");
                r.commit_fleet(&yaml);
                harness::eventually(T, "a plan soaking after its canary", || {
                    r.plan().filter(|p| {
                        p.status == roost_fleet::gitops::plan::PlanStatus::Running
                            && p.waves[0].soak_s == Some(3600)
                    })
                })
                .await;
                "go".to_owned()
            }
            _ => continue,
        };
        stdin
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .expect("to the browser script");
    }
    let status = child.wait().await.expect("node");
    assert!(status.success(), "browser script: {status}");
    // The pause clicked in the page reached the controller.
    let plan = r.plan().expect("plan");
    assert_eq!(plan.status, roost_fleet::gitops::plan::PlanStatus::Paused);
    let a = call("GET", format!("http://{addr}/api/v1/plans/{}", r.dep), None).await;
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(v["status"], "paused");
    let shot = std::fs::read(screenshot.expect("a screenshot")).expect("screenshot");
    assert!(shot.starts_with(b"\x89PNG"), "a PNG");
    r.finish().await;
}

/// A status document of a simulated store.
fn sim_status(store: &str, dep: &str, rev: &str, applied: &str, phase: &str) -> String {
    serde_json::json!({
        "store": store, "groups": if store.ends_with("0001") { vec!["canary"] } else { vec![] },
        "agent_version": "sim", "updated_at": roost_schemas::now_rfc3339(), "roostseq": 1,
        "outbox_backlog": 0,
        "deployments": {dep: {
            "desired": {"revision": rev, "sequence": 1, "scope": "fleet"},
            "applied_revision": applied, "last_attempted_revision": rev, "phase": phase}}
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints the dashboard's load time and live-update bytes for 2,000 stores"]
async fn bench_the_dashboard_with_2000_stores() {
    use roost_fleet::db::FleetItem;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let Some(dir) = browser_tools() else { return };
    harness::init();
    let n: usize = std::env::var("DASH_STORES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let tmp = tempfile::tempdir().expect("tmp");
    let db = roost_fleet::db::FleetDb::open(&tmp.path().join("fleet.db")).expect("db");
    let (rev1, rev2, dep) = ("1".repeat(40), "2".repeat(40), "kitchen-display");
    let name = |i: usize| format!("store-{i:04}");
    let presence = format!(
        "{{\"state\":\"online\",\"since\":\"{}\"}}",
        roost_schemas::now_rfc3339()
    );
    let mut items = Vec::new();
    for i in 1..=n {
        items.push(FleetItem::Status(
            name(i),
            sim_status(&name(i), dep, &rev1, &rev1, "Converged"),
        ));
        items.push(FleetItem::Presence(name(i), presence.clone()));
    }
    db.record_batch(&items).expect("fill");
    let cancel = tokio_util::sync::CancellationToken::new();
    let _guard = cancel.clone().drop_guard();
    let api =
        roost_fleet::api::Api::new(db.clone(), Default::default(), cancel.clone()).expect("api");
    let t = std::time::Instant::now();
    let snap = api.snapshot().await.expect("snapshot");
    println!(
        "snapshot of {} rows: {} ms",
        snap.rows.len(),
        t.elapsed().as_millis()
    );
    let addr = roost_fleet::api::serve(([127, 0, 0, 1], 0).into(), api.router(), cancel.clone())
        .await
        .expect("serve");
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("measure.mjs"))
        .current_dir(&dir)
        .env("DASH_URL", format!("http://{addr}/"))
        .env("DASH_STORES", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    while let Some(line) = lines.next_line().await.expect("read") {
        println!("{line}");
        if line == "STEP rollout" {
            // A rollout of rev2: 100 stores start applying every 250 ms, and the 100 before
            // them converge (about 20 s for 2,000 stores, 800 status documents a second).
            let batch = 100;
            let mut i = 0;
            while i <= n + batch {
                let mut items = Vec::new();
                for j in i + 1..=(i + batch).min(n) {
                    items.push(FleetItem::Status(
                        name(j),
                        sim_status(&name(j), dep, &rev2, &rev1, "Applying"),
                    ));
                }
                for j in (i + 1).saturating_sub(batch).max(1)..=i.min(n) {
                    items.push(FleetItem::Status(
                        name(j),
                        sim_status(&name(j), dep, &rev2, &rev2, "Converged"),
                    ));
                }
                db.call(move |db| db.record_batch(&items))
                    .await
                    .expect("batch");
                i += batch;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            stdin.write_all(b"go\n").await.expect("stdin");
        }
    }
    assert!(child.wait().await.expect("node").success());
}
/// The signed fleet snapshot: `roost fleet` with the controller publishes it (retained) right
/// after desired state, the stores' status documents say `fresh` with `desired_confirmed_at`;
/// then a hostile broker rolls the retained rollout back to an older signed envelope (the
/// controller and fleet record, which would restore it, are gone), and a store started fresh
/// reports `desired.stale` naming the topic, what it holds and what the snapshot lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_snapshots_confirm_freshness_and_a_rolled_back_broker_is_reported_stale() {
    use roost_schemas::{FreshnessState, Keyring, Scope, Snapshot, Topics, SNAPSHOT_PAYLOAD_TYPE};
    let mut r = Rig::new(2, 0).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml("      - {name: everyone, fleet: true}\n", "");
    r.commit_fleet(&yaml);
    r.start_controller();
    r.all_converged(&rev1).await;
    let topics = Topics::default();
    let fleet_topic = topics.deployment(&Scope::Fleet, &r.dep);
    let desired_seq = |r: &Rig| {
        r.db()
            .desired()
            .expect("desired")
            .into_iter()
            .find(|(t, _)| *t == fleet_topic)
            .map(|(_, p)| (roost_schemas::envelope_sequence(&p).expect("sequence"), p))
            .expect("the fleet topic is recorded")
    };
    let (seq1, env1) = desired_seq(&r);
    let fresh_at = |r: &Rig, seq: u64| {
        let names = r.names();
        let seen = r.obs.seen.clone();
        async move {
            for s in names {
                let seen = seen.clone();
                harness::eventually(T, &format!("{s} fresh with sequence {seq}"), || {
                    let st = seen.lock().expect("lock");
                    let d = st.status.get(&s)?;
                    let at = d.freshness.desired_confirmed_at.as_deref()?;
                    (d.freshness.desired_freshness == Some(FreshnessState::Fresh)
                        && d.deployments
                            .values()
                            .any(|x| x.desired.as_ref().is_some_and(|x| x.sequence == seq))
                        && roost_schemas::parse_rfc3339(at).is_some())
                    .then(|| d.freshness.snapshot_sequence.expect("snapshot sequence"))
                })
                .await;
            }
        }
    };
    fresh_at(&r, seq1).await;
    // The retained snapshot is signed by the controller's key and lists the rollout.
    let read_snapshot = |cloud: SocketAddr| {
        let snap_topic = topics.snapshot();
        async move {
            let got = roost_fleet::cloud::read_retained(
                &cloud.to_string(),
                &[snap_topic],
                Duration::from_secs(2),
            )
            .await
            .expect("read retained");
            let (_, payload) = got.into_iter().next().expect("a retained snapshot");
            payload
        }
    };
    let mut ring = Keyring::new();
    ring.add(r.signer.key.public_key()).expect("key");
    let verify = |payload: &[u8]| {
        let env: roost_schemas::Envelope = serde_json::from_slice(payload).expect("envelope");
        Snapshot::from_json(
            &ring
                .verify(&env, SNAPSHOT_PAYLOAD_TYPE)
                .expect("signed by the controller"),
        )
        .expect("a valid snapshot")
    };
    let s1 = verify(&read_snapshot(r.cloud).await);
    assert_eq!(s1.topics.get(&fleet_topic), Some(&seq1), "{s1:?}");
    let expires = roost_schemas::parse_rfc3339(&s1.expires).expect("expires");
    let issued = roost_schemas::parse_rfc3339(&s1.issued_at).expect("issued_at");
    assert_eq!(
        expires - issued,
        time::Duration::seconds(900),
        "3 × the default 300 s"
    );

    // A new app commit: the new rollout is covered by a snapshot at once (the interval is
    // the default 300 s, so only the publication can have triggered it).
    let rev2 = r.commit_app("2");
    r.all_converged(&rev2).await;
    let (seq2, _) = desired_seq(&r);
    assert!(seq2 > seq1);
    fresh_at(&r, seq2).await;
    let s2 = verify(&read_snapshot(r.cloud).await);
    assert_eq!(s2.topics.get(&fleet_topic), Some(&seq2));
    assert!(s2.sequence > s1.sequence, "snapshot sequences increase");

    // The hostile broker: the controller and the fleet record are gone (they would restore
    // the newest envelope), and the broker serves the older signed rollout again.
    if let Some(c) = r.controller.take() {
        c.stop().await;
    }
    if let Some(f) = r.fleet.take() {
        f.stop().await;
    }
    harness::publish(r.cloud, &fleet_topic, env1).await;
    let name = format!("{}-new", r.stores[0].name);
    let mut fresh = StoreRig::new(
        &name,
        &[],
        r.dir.path(),
        r.cloud,
        &r.signer,
        &r.app.allowed(),
    );
    fresh.start();
    let e = r
        .obs
        .wait_event(&name, "dev.roost.desired.stale", T, |_| true)
        .await;
    let stale: roost_schemas::payload::DesiredStale = e.typed().expect("typed desired.stale");
    assert_eq!(stale.reason, roost_schemas::Reason::DesiredStale);
    assert_eq!(stale.snapshot_sequence, s2.sequence);
    assert_eq!(
        stale.topics,
        vec![roost_schemas::payload::StaleTopic {
            topic: fleet_topic.clone(),
            listed: seq2,
            held: Some(seq1)
        }]
    );
    let doc = r
        .obs
        .wait_status(&name, "the fresh store's status says stale", T, |d| {
            d.freshness.desired_freshness == Some(FreshnessState::Stale)
        })
        .await;
    assert_eq!(doc.freshness.stale_topics, vec![fleet_topic.clone()]);
    eprintln!(
        "gitops snapshot: stores fresh at snapshot {} (rollout {seq2}); rolled back to {seq1}: {} reported desired.stale",
        s2.sequence, name
    );
    fresh.stop_agent().await;
    fresh.stop_bridge().await;
    r.finish().await;
}

/// The next whole minute at least 5 s away (a window's start has minute precision).
fn next_opening() -> jiff::Timestamp {
    let now = jiff::Timestamp::now().as_second();
    let mut t = (now / 60 + 1) * 60;
    if t - now < 5 {
        t += 60;
    }
    jiff::Timestamp::from_second(t).expect("timestamp")
}

/// Operating windows in store-local time: one store (Asia/Tokyo, from its signed profile)
/// whose window is open now applies at once; the other (UTC, no profile) reports `Waiting`
/// with the right next opening, and applies when it opens. The plan's wave completes its gate
/// on the first store meanwhile, without timing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_apply_in_their_local_window_and_a_waiting_store_does_not_block_the_wave() {
    let mut r = Rig::new(2, 0).await;
    let (tokyo, utc) = (r.stores[0].name.clone(), r.stores[1].name.clone());
    // The Tokyo store's profile gives its time zone.
    let topics = roost_schemas::Topics::default();
    let mut profile = r.signer.profile(&tokyo, 1, &[]);
    profile.groups = None;
    profile.timezone = Some("Asia/Tokyo".into());
    harness::publish(
        r.cloud,
        &topics.profile(&tokyo),
        r.signer.sign_profile(&profile),
    )
    .await;
    r.obs
        .wait_status(&tokyo, "profile accepted", T, |d| {
            d.profile_sequence == Some(1)
        })
        .await;
    let rev1 = r.commit_app("1");
    // Opens at `open` (HH:MM UTC wall time) for 10 h every day: in Tokyo (UTC+9) that wall
    // time came 9 h before `open`, so the window is open there now; in UTC it opens at `open`.
    let open = next_opening();
    let hhmm = open.strftime("%H:%M").to_string();
    let waves = format!(
        "      - {{name: first, stores: [{tokyo}, {utc}]}}\n      - {{name: everyone, fleet: true}}\n"
    );
    let yaml = r.fleet_yaml(
        &waves,
        &format!(
            "    windows: [{{start: \"{hhmm}\", duration: 10h}}]\n    abort: {{failed_pct: 0, min_finished: 1, wave_timeout_s: 600}}\n"
        ),
    );
    r.commit_fleet(&yaml);
    r.start_controller();
    r.obs
        .wait_phase(&tokyo, &r.dep, "Converged", Some(&rev1), T)
        .await;
    let waiting = r
        .obs
        .wait_event(&utc, "dev.roost.waiting", T, |e| {
            e.data["revision"] == rev1.as_str()
        })
        .await;
    let expected = open.strftime("%Y-%m-%dT%H:%M:%S+00:00").to_string();
    assert_eq!(waiting.reason(), Some("window"));
    assert_eq!(waiting.data["next_window"], expected.as_str());
    let doc = r.obs.wait_phase(&utc, &r.dep, "Waiting", None, T).await;
    assert_eq!(
        doc.deployments[&r.dep].next_window.as_deref(),
        Some(expected.as_str())
    );
    assert!(
        jiff::Timestamp::now() < open,
        "the UTC store waited, it was not late"
    );
    // The plan goes on on the converged store: every wave done while the other one waits.
    let plan = harness::eventually(T, "plan done while a store waits", || {
        r.plan()
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await;
    assert!(
        !matches!(
            plan.status,
            roost_fleet::gitops::plan::PlanStatus::Aborted(_)
        ),
        "{:?}",
        plan.status
    );
    // `roost status` says why and until when.
    let view = roost_fleet::view::build(
        &roost_fleet::view::load(&r.db()).expect("load"),
        roost_fleet::db::now_ms(),
    );
    let table = roost_fleet::view::render(&view.stores, false);
    if r.obs.snapshot().of(&utc, "dev.roost.converged").is_empty() {
        assert!(
            table.contains(&format!("window: waits until {expected}")),
            "{table}"
        );
    }
    // It applies when its window opens, not before, on its own timer: with its uplink down
    // (when there is time to take it down before the opening), seen on its edge broker.
    if jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(3))
        .is_ok_and(|t| t < open)
    {
        let edge = harness::Observer::start(r.stores[1].edge).await;
        r.stores[1].stop_bridge().await;
        let local = edge
            .wait_event(&utc, "dev.roost.converged", T, |e| {
                e.data["revision"] == rev1.as_str()
            })
            .await;
        let at: jiff::Timestamp = local.time.parse().expect("time");
        assert!(
            at >= open,
            "converged offline at {at}, window opens at {open}"
        );
        r.stores[1].start_bridge();
    }
    let converged = r.converged(&utc, &rev1).await;
    let at: jiff::Timestamp = converged.time.parse().expect("time");
    assert!(at >= open, "converged at {at}, window opens at {open}");
    r.finish().await;
}

/// Rollback at the store with the uplink cut: a revision whose hook fails is rolled back to
/// the last revision that converged there, by the store alone; the event reaches the cloud
/// when the link heals, and the controller's abort counts the store as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_revision_is_rolled_back_at_the_store_with_the_uplink_cut() {
    let mut r = Rig::new(1, 1).await;
    let store = r.stores[0].name.clone();
    // The store's uplink runs through a fault proxy.
    let proxy = roost_tests::proxy::FaultProxy::start(r.cloud)
        .await
        .expect("proxy");
    r.stores[0].stop_bridge().await;
    r.stores[0].bridge_cfg.cloud = roost_bridge::Endpoint::local(proxy.addr(), 2);
    r.stores[0].start_bridge();
    let rev1 = r.commit_app("1");
    // A soak keeps the plan open while the store is cut off (an offline store is deferred:
    // it does not block the gate).
    let yaml = r.fleet_yaml(
        "      - {name: everyone, fleet: true, soak_s: 120}\n",
        "    policy: {on_failure: rollback, health_timeout_s: 30}\n    abort: {failed_pct: 0, min_finished: 1, wave_timeout_s: 600}\n",
    );
    r.commit_fleet(&yaml);
    r.start_controller();
    r.converged(&store, &rev1).await;
    // From now on the hook takes 3 s and passes only for rev1.
    std::fs::write(r.stores[0].dir.join("fail-marker"), format!("{rev1}\n")).expect("marker");
    std::fs::write(r.stores[0].dir.join("slow"), "*").expect("slow");
    let rev2 = r.commit_app("2");
    r.obs
        .wait_event(&store, "dev.roost.apply.started", T, |e| {
            e.data["revision"] == rev2.as_str()
        })
        .await;
    // The uplink is cut while the hook runs; what the store does is seen on its own edge
    // broker, and nothing of it reaches the cloud until the link heals.
    let edge = harness::Observer::start(r.stores[0].edge).await;
    proxy.cut();
    let cut_at = jiff::Timestamp::now();
    // The store rolls back by itself: rev1's files are live again.
    edge.wait_event(&store, "dev.roost.rolled_back", T, |e| {
        e.data["failed_revision"] == rev2.as_str()
    })
    .await;
    let live = r.stores[0].current(&r.dep);
    let link = std::fs::read_link(&live).expect("current");
    assert!(link.to_string_lossy().contains(&rev1), "{}", link.display());
    assert!(
        r.obs
            .snapshot()
            .of(&store, "dev.roost.rolled_back")
            .is_empty(),
        "not at the cloud while the link is cut"
    );
    let healed_at = jiff::Timestamp::now();
    proxy.heal();
    let rb = r
        .obs
        .wait_event(&store, "dev.roost.rolled_back", T, |e| {
            e.data["failed_revision"] == rev2.as_str()
        })
        .await;
    assert_eq!(rb.data["restored_revision"], rev1.as_str());
    assert_eq!(rb.reason(), Some("hook_failed"));
    let at: jiff::Timestamp = rb.time.parse().expect("time");
    assert!(
        cut_at <= at && at <= healed_at,
        "rolled back while cut off ({cut_at} <= {at} <= {healed_at})"
    );
    let doc = r
        .obs
        .wait_phase(&store, &r.dep, "RolledBack", Some(&rev1), T)
        .await;
    assert_eq!(
        doc.deployments[&r.dep].failed_revision.as_deref(),
        Some(rev2.as_str())
    );
    // The controller counts it as failed: the plan aborts naming the store.
    let plan = harness::eventually(T, "plan aborted", || {
        r.plan().filter(|p| {
            p.release.revision == rev2
                && matches!(p.status, roost_fleet::gitops::plan::PlanStatus::Aborted(_))
        })
    })
    .await;
    let roost_fleet::gitops::plan::PlanStatus::Aborted(reason) = &plan.status else {
        unreachable!()
    };
    assert!(reason.contains(&store), "{reason}");
    // The failed revision was applied once: never retried.
    let applies = r
        .obs
        .snapshot()
        .of(&store, "dev.roost.apply.started")
        .iter()
        .filter(|e| e.data["revision"] == rev2.as_str())
        .count();
    assert_eq!(applies, 1);
    r.finish().await;
}

/// `depends_on`: the dependent waits (`Waiting`, reason `dependency`) until its dependency
/// converged on the store, then converges; a cycle makes the fleet file invalid and
/// publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_waits_for_its_dependency_and_a_cycle_publishes_nothing() {
    let mut r = Rig::new(1, 1).await;
    let store = r.stores[0].name.clone();
    // The dependency's hook takes 3 s, so its dependent is seen waiting.
    let crds = format!("crds-{}", &r.dep[5..]);
    std::fs::write(r.stores[0].dir.join("slow"), &crds).expect("slow");
    let rev1 = r.commit_app("1");
    let yaml = format!(
        "{}    depends_on: [{crds}]\n  {crds}:\n    source:\n      url: {}\n      ref: HEAD\n      path: {APP}\n",
        r.fleet_yaml("      - {name: everyone, fleet: true}\n", ""),
        r.app.url()
    );
    r.commit_fleet(&yaml);
    r.start_controller();
    let waiting = r
        .obs
        .wait_event(&store, "dev.roost.waiting", T, |e| {
            e.data["deployment"] == r.dep.as_str()
        })
        .await;
    assert_eq!(waiting.reason(), Some("dependency"));
    assert_eq!(waiting.data["waiting_for"], serde_json::json!([crds]));
    let dep_done = r
        .obs
        .wait_event(&store, "dev.roost.converged", T, |e| {
            e.data["deployment"] == crds.as_str()
        })
        .await;
    let done = r
        .obs
        .wait_event(&store, "dev.roost.converged", T, |e| {
            e.data["deployment"] == r.dep.as_str() && e.data["revision"] == rev1.as_str()
        })
        .await;
    let seen = r.obs.snapshot();
    let all = seen.of(&store, "dev.roost.converged");
    let pos = |id: &str| all.iter().position(|e| e.id == id);
    assert!(pos(&dep_done.id) < pos(&done.id), "dependency first");
    // The dependent was not applied before its dependency converged.
    let started = seen
        .of(&store, "dev.roost.apply.started")
        .into_iter()
        .find(|e| e.data["deployment"] == r.dep.as_str())
        .expect("applied");
    assert!(started.roostseq > dep_done.roostseq);
    // A cycle: invalid, nothing published.
    harness::eventually(T, "plans done", || {
        r.plan()
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await;
    let before = r.published();
    // The dependency (last in the file) now depends on its dependent.
    let cyclic = format!("{yaml}    depends_on: [{}]\n", r.dep);
    let c = r.commit_fleet(&cyclic);
    let st = harness::eventually(T, "cycle recorded", || {
        r.db()
            .with_conn(roost_fleet::db::gitops::sync_state)
            .ok()
            .flatten()
            .map(|(s, _)| s)
            .filter(|s| s.commit == c)
    })
    .await;
    assert!(!st.ok);
    assert!(st.reason.contains("dependency cycle"), "{}", st.reason);
    assert_eq!(r.published(), before);
    r.finish().await;
}

/// The inventory of `stores`: `(name, region, number)` as `kind: Store` documents.
fn inventory(stores: &[(&str, &str, usize)]) -> String {
    stores
        .iter()
        .map(|(name, region, n)| {
            format!(
                "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: {name}\nlabels: {{region: {region}}}\ntimezone: America/Chicago\nvars: {{store_number: \"{n:04}\"}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Six stores from an inventory in two regions, groups defined by selector, nothing about
/// groups in the stores' own configuration: a fleet-wide deployment substituting
/// `${roost.vars.store_number}` converges with each store's own number in its applied files,
/// and each region's stores run their region's deployment. Then one commit changes one
/// store's label: within a poll its profile moves it into the other region's group, it takes
/// that group's deployment and leaves the old one, with no change on the store; the plan
/// view and the fleet view show the new label. A malformed inventory then publishes nothing
/// and the last good one stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_gives_each_store_its_values_and_a_label_commit_moves_a_store() {
    let mut r = Rig::new(6, 0).await;
    let menu = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: menu\ndata:\n  store: ${roost.store}\n  number: ${roost.vars.store_number}\n  region: ${roost.labels.region}\n";
    let promo = |region: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: promo\ndata:\n  region: {region}\n")
    };
    let rev = r.app.commit(
        &[
            (&format!("{APP}/menu.yaml"), menu),
            ("apps/promo-east/promo.yaml", &promo("east")),
            ("apps/promo-south/promo.yaml", &promo("south")),
        ],
        &[],
        "menu with store values, promos per region",
    );
    let names = r.names();
    let region = |i: usize| if i < 3 { "us-east" } else { "us-south" };
    let mut entries: Vec<(&str, &str, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), region(i), i + 1))
        .collect();
    let (east, south) = (format!("{}-east", r.dep), format!("{}-south", r.dep));
    // Limited by `targets:` to us-south stores, rolled out with a fleet wave.
    let texas = format!("{}-tx", r.dep);
    let source = |path: &str| {
        format!(
            "    source: {{url: {}, ref: HEAD, path: {path}}}\n",
            r.app.url()
        )
    };
    let yaml = format!(
        "apiVersion: roost.dev/v1alpha1\nkind: Fleet\ngroups:\n  us-east: {{selector: {{region: us-east}}}}\n  us-south: {{selector: {{region: us-south}}}}\ndeployments:\n  {dep}:\n{menu_src}    policy: {{substitute: true}}\n    waves: [{{name: everyone, fleet: true}}]\n  {east}:\n{east_src}    waves: [{{name: east, group: us-east}}]\n  {south}:\n{south_src}    waves: [{{name: south, group: us-south}}]\n  {texas}:\n{south_src}    targets: {{selector: {{region: us-south}}}}\n    waves: [{{name: everyone, fleet: true}}]\n",
        dep = r.dep,
        menu_src = source(APP),
        east_src = source("apps/promo-east"),
        south_src = source("apps/promo-south"),
        texas = texas,
    );
    r.fleet_repo.commit(
        &[
            ("roost.yaml", &yaml),
            ("stores/east.yaml", &inventory(&entries[..3])),
            ("stores/south.yaml", &inventory(&entries[3..])),
        ],
        &[],
        "six stores in two regions",
    );
    r.start_controller();
    for (i, s) in r.stores.iter().enumerate() {
        let (mine, other) = if i < 3 {
            (&east, &south)
        } else {
            (&south, &east)
        };
        r.obs
            .wait_phase(&s.name, &r.dep, "Converged", Some(&rev), T)
            .await;
        let doc = r
            .obs
            .wait_phase(&s.name, mine, "Converged", Some(&rev), T)
            .await;
        assert!(!doc.deployments.contains_key(other), "{}: {doc:?}", s.name);
        if i >= 3 {
            r.obs
                .wait_phase(&s.name, &texas, "Converged", Some(&rev), T)
                .await;
        }
        assert_eq!(
            doc.groups,
            [region(i)],
            "{}: groups from the profile",
            s.name
        );
        let files = s.live_files(&r.dep);
        let text = files.values().cloned().collect::<String>();
        let want = format!("{:04}", i + 1);
        assert!(
            text.contains(&want) && text.contains(&s.name) && text.contains(region(i)),
            "{}: its own number {want}, name and region in {files:?}",
            s.name
        );
        assert!(!text.contains("${roost"), "rendered: {text}");
        for j in (1..=6).filter(|j| *j != i + 1) {
            assert!(
                !text.contains(&format!("{j:04}")),
                "only its own number: {text}"
            );
        }
    }
    // The profiles are retained, signed, and listed in the fleet snapshot.
    let topics = roost_schemas::Topics::default();
    let snapshot = harness::eventually_async(T, "profiles in the snapshot", || async {
        let retained = roost_fleet::cloud::read_retained(
            &r.cloud.to_string(),
            &[topics.snapshot()],
            Duration::from_secs(3),
        )
        .await
        .ok()?;
        let (_, env) = retained.into_iter().next()?;
        let payload = roost_schemas::envelope_payload(&env)?;
        let snap: roost_schemas::Snapshot = serde_json::from_slice(&payload).ok()?;
        names
            .iter()
            .all(|n| snap.topics.contains_key(&topics.profile(n)))
            .then_some(snap)
    })
    .await;
    assert!(snapshot.topics.len() >= 6 + 3);

    // One commit: store 3 moves from us-east to us-south. Nothing changes on the store.
    let moved = names[2].clone();
    entries[2].1 = "us-south";
    let before = r
        .obs
        .snapshot()
        .of(&moved, "dev.roost.profile.accepted")
        .len();
    let started = std::time::Instant::now();
    r.fleet_repo.commit(
        &[("stores/east.yaml", &inventory(&entries[..3]))],
        &[],
        "store 3 is in us-south now",
    );
    let doc = r
        .obs
        .wait_phase(&moved, &south, "Converged", Some(&rev), T)
        .await;
    let took_in = started.elapsed();
    let doc = if doc
        .deployments
        .get(&east)
        .is_some_and(|d| d.phase.as_str() != "Removed")
    {
        r.obs
            .wait_status(&moved, "left the us-east deployment", T, |d| {
                d.deployments
                    .get(&east)
                    .is_none_or(|d| d.phase.as_str() == "Removed")
            })
            .await
    } else {
        doc
    };
    let took_out = started.elapsed();
    // The deployment limited to us-south follows the label too (its plan was done).
    r.obs
        .wait_phase(&moved, &texas, "Converged", Some(&rev), T)
        .await;
    harness::eventually(T, "texas plan done", || {
        r.db()
            .with_conn(roost_fleet::db::gitops::plans)
            .ok()?
            .remove(&texas)
            .filter(|p| p.status == roost_fleet::gitops::plan::PlanStatus::Done)
    })
    .await;
    // Targets publish store messages only: no fleet or group message for it.
    let mut got: Vec<String> = r
        .published()
        .into_iter()
        .filter(|p| p.deployment == texas && !p.remove)
        .map(|p| p.topic)
        .collect();
    got.sort();
    let want: Vec<String> = names[2..]
        .iter()
        .map(|n| format!("roost/v1/stores/{n}/deployments/{texas}"))
        .collect();
    assert_eq!(got, want);
    for s in &r.stores[..2] {
        let doc = r
            .obs
            .snapshot()
            .status
            .get(&s.name)
            .cloned()
            .expect("status");
        assert!(
            !doc.deployments.contains_key(&texas),
            "{} is not a target",
            s.name
        );
    }
    assert_eq!(doc.groups, ["us-south"]);
    assert!(
        r.stores[2].live_files(&east).is_empty(),
        "the east promo is gone"
    );
    assert_eq!(
        r.stores[2]
            .live_files(&south)
            .values()
            .cloned()
            .collect::<String>(),
        promo("south")
    );
    let accepted = r.obs.snapshot();
    let accepted = accepted.of(&moved, "dev.roost.profile.accepted");
    assert_eq!(accepted.len(), before + 1, "one new profile");
    assert_eq!(
        accepted[before].data["previous_groups"],
        serde_json::json!(["us-east"])
    );
    // The menu was not re-applied for a label it does not read… it does read the region:
    // it converges rendered with the new one.
    harness::eventually(T, "menu rendered with the new region", || {
        let text = r.stores[2]
            .live_files(&r.dep)
            .values()
            .cloned()
            .collect::<String>();
        text.contains("us-south").then_some(())
    })
    .await;
    println!(
        "inventory commit -> moved store converged on its new group's deployment in {} ms, out of the old one in {} ms",
        took_in.as_millis(),
        took_out.as_millis()
    );
    // Only the moved store got a new profile.
    for n in names.iter().filter(|n| **n != moved) {
        assert_eq!(
            r.obs.snapshot().of(n, "dev.roost.profile.accepted").len(),
            1,
            "{n}: one profile"
        );
    }
    // The controller's views carry the inventory's labels.
    let v = roost_fleet::view::build(
        &roost_fleet::view::load(&r.db()).expect("view"),
        roost_fleet::db::now_ms(),
    );
    let south_stores: Vec<String> = roost_fleet::view::filter(
        &v,
        &roost_fleet::view::Filter {
            selector: Some("region=us-south".parse().expect("selector")),
            ..Default::default()
        },
    )
    .into_iter()
    .map(|s| s.store)
    .collect();
    assert_eq!(south_stores, names[2..].to_vec());
    let text = roost_fleet::view::render(&v.stores, true);
    assert!(
        text.contains("LABELS") && text.contains("region=us-south"),
        "{text}"
    );

    // A malformed inventory (a duplicate store) is recorded with its file and reason;
    // nothing is published and the last good inventory stays in force.
    let profiles_before = r
        .db()
        .with_conn(roost_fleet::db::inventory::profiles)
        .expect("profiles");
    let good = r
        .db()
        .with_conn(roost_fleet::db::gitops::sync_state)
        .expect("sync")
        .expect("synced")
        .0
        .commit;
    let mut dup = entries.clone();
    dup[0].1 = "us-south";
    let bad = r.fleet_repo.commit(
        &[("stores/zz-dup.yaml", &inventory(&dup[..1]))],
        &[],
        "a duplicate store",
    );
    let st = harness::eventually(T, "bad inventory recorded", || {
        r.db()
            .with_conn(roost_fleet::db::gitops::sync_state)
            .ok()
            .flatten()
            .map(|(s, _)| s)
            .filter(|s| s.commit == bad)
    })
    .await;
    assert!(!st.ok);
    assert!(
        st.reason.contains("stores/zz-dup.yaml") && st.reason.contains("already defined"),
        "{}",
        st.reason
    );
    assert_eq!(st.good_commit.as_deref(), Some(good.as_str()));
    assert_eq!(
        r.db()
            .with_conn(roost_fleet::db::inventory::profiles)
            .expect("profiles"),
        profiles_before,
        "no profile published"
    );
    assert_eq!(
        r.db()
            .with_conn(roost_fleet::db::inventory::inventory)
            .expect("inventory")
            .stores[&names[0]]
            .labels["region"],
        "us-east",
        "the last good inventory stays"
    );
    r.finish().await;
}

/// Whether `r`'s `X-Roost-Signature-256` is the HMAC-SHA256 of its body under `secret`
/// (checked here with the hmac crate, as a receiver would).
fn signed_by(r: &roost_tests::receiver::Received, secret: &str) -> bool {
    use hmac::Mac as _;
    let Some(sig) = r
        .header("X-Roost-Signature-256")
        .and_then(|s| s.strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(&r.body);
    mac.verify_slice(&sig).is_ok()
}

/// A `--notify` file in the rig's directory: a webhook (secret `webhook-secret`) at
/// `receiver/hook` for `hook_events` (every kind when empty); when `github`, a
/// GitHub-compatible API at `receiver/repos/acme/fleet` (token `gh-token`) and a Slack
/// webhook at `receiver/slack` for aborted plans.
fn notify_file(r: &Rig, receiver: SocketAddr, hook_events: &[&str], github: bool) -> String {
    let dir = r.dir.path();
    std::fs::write(dir.join("webhook.secret"), "webhook-secret\n").expect("secret");
    std::fs::write(dir.join("gh.token"), "gh-token\n").expect("token");
    let events = if hook_events.is_empty() {
        String::new()
    } else {
        format!(
            "events = [{}]\n",
            hook_events
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut text = format!(
        "coalesce_s = 1\nretry_base_s = 0.2\nretry_max_s = 1\n\n[[sink]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://{receiver}/hook\"\nsecret_file = \"webhook.secret\"\n{events}"
    );
    if github {
        text.push_str(&format!(
            "\n[[sink]]\nname = \"prs\"\nkind = \"github\"\nurl = \"http://{receiver}/repos/acme/fleet\"\ntoken_file = \"gh.token\"\n\n[[sink]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"http://{receiver}/slack\"\nevents = [\"plan_aborted\"]\n"
        ));
    }
    let path = dir.join("notify.toml");
    std::fs::write(&path, text).expect("notify file");
    path.display().to_string()
}

/// Notifications from a `roost fleet` process to a real HTTP receiver: a plan rolling out
/// sets a commit status on the fleet commit per wave (`canary 1/1, …`, success when done);
/// a plan aborted by its failing canary is exactly one webhook message, signed, with counts
/// and the failing store with its reason; the commit status turns to failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_an_aborting_plan_is_one_signed_webhook_and_commit_statuses_follow_the_waves()
{
    let receiver = roost_tests::receiver::Receiver::start().await;
    let mut r = Rig::new(4, 1).await;
    let rev1 = r.commit_app("1");
    let yaml = r.fleet_yaml(
        WAVES,
        "    abort: {failed_pct: 0, min_finished: 1, wave_timeout_s: 600}\n",
    );
    let origin = r.commit_fleet(&yaml);
    let notify = notify_file(&r, receiver.addr, &["plan_aborted"], true);
    let mut p = r.controller_process(&["--notify", &notify]).await;
    r.all_converged(&rev1).await;
    let statuses = format!("/repos/acme/fleet/statuses/{origin}");
    let context = format!("roost/{}", r.dep);
    // The first plan: statuses for its waves, then success on the fleet commit.
    let done = harness::eventually(T, "a success status for the done plan", || {
        receiver
            .accepted(&statuses)
            .into_iter()
            .find(|s| s.json()["state"] == "success" && s.json()["context"] == context.as_str())
    })
    .await;
    assert_eq!(done.header("Authorization"), Some("token gh-token"));
    let desc = done.json()["description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        desc.starts_with("canary 1/1, half 1/1, everyone 4/4"),
        "{desc}"
    );
    // One status per step, in order: started, each of the three waves, done.
    let seen: Vec<serde_json::Value> = receiver
        .accepted(&statuses)
        .iter()
        .map(|s| s.json())
        .collect();
    let states: Vec<&str> = seen.iter().filter_map(|s| s["state"].as_str()).collect();
    assert_eq!(
        states,
        ["pending", "pending", "pending", "pending", "success"],
        "{seen:?}"
    );
    assert!(
        seen[1]["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("canary 1/1")),
        "{seen:?}"
    );
    assert!(
        receiver.received("/hook").is_empty(),
        "no webhook for a plan that went well"
    );

    // The canary fails the next revision: the plan aborts.
    let canary = r.stores[0].name.clone();
    std::fs::write(r.stores[0].dir.join("fail-marker"), format!("{rev1}\n")).expect("marker");
    let rev2 = r.commit_app("2");
    let hook = harness::eventually(T, "the webhook for the abort", || {
        receiver.accepted("/hook").into_iter().next()
    })
    .await;
    assert!(
        signed_by(&hook, "webhook-secret"),
        "a valid signature: {:?}",
        hook.headers
    );
    assert!(!signed_by(&hook, "another-secret"));
    let body = hook.json();
    assert_eq!(body["counts"]["plan_aborted"], 1, "{body}");
    assert_eq!(hook.header("X-Roost-Delivery"), body["id"].as_str());
    let e = &body["events"][0];
    assert_eq!(e["kind"], "plan_aborted");
    assert_eq!(e["deployment"], r.dep.as_str());
    assert_eq!(e["revision"], rev2.as_str());
    assert_eq!(e["failed"], 1);
    assert_eq!(e["failing"][0]["store"], canary.as_str());
    assert!(
        e["failing"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("hook_failed")),
        "{e}"
    );
    // The commit status of the fleet commit turns to failure (the newest one posted).
    let failure = harness::eventually(T, "a failure status", || {
        receiver
            .accepted(&statuses)
            .into_iter()
            .rev()
            .find(|s| s.json()["context"] == context.as_str())
            .filter(|s| s.json()["state"] == "failure")
    })
    .await;
    assert!(
        failure.json()["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("aborted: 1 failed")),
        "{}",
        failure.json()
    );
    // Exactly one webhook message: every queued message is delivered, one of them to the
    // webhook.
    let db = r.db();
    let deliveries = harness::eventually(T, "every message delivered", || {
        let d = db
            .with_conn(|c| roost_fleet::db::notify::deliveries(c, 100))
            .expect("deliveries");
        d.iter().all(|m| m.state == "sent").then_some(d)
    })
    .await;
    assert_eq!(
        deliveries.iter().filter(|m| m.sink == "ops").count(),
        1,
        "{deliveries:?}"
    );
    assert_eq!(receiver.received("/hook").len(), 1);
    // Slack got the same news as one line of text.
    let slack = receiver.accepted("/slack");
    assert_eq!(slack.len(), 1);
    let text = slack[0].json()["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.starts_with("*roost*: ") && text.contains(&r.dep) && text.contains("aborted"),
        "{text}"
    );
    assert!(slack[0].header("X-Roost-Signature-256").is_none());
    p.kill();
    r.finish().await;
}

/// An invalid fleet commit notifies; the receiver answers 500 and the message is retried
/// (visible in `roost plan status`, the API's view and the metrics) until `roost fleet` is
/// SIGKILLed; restarted, it delivers that queued message once, with the same idempotency
/// key, when the receiver recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_retried_kept_across_a_kill_9_and_delivered_once() {
    let receiver = roost_tests::receiver::Receiver::start().await;
    receiver.set_failing(true);
    let mut r = Rig::new(1, 1).await;
    let rev1 = r.commit_app("1");
    let good = r.fleet_yaml(WAVES, "");
    r.commit_fleet(&good);
    let notify = notify_file(&r, receiver.addr, &["invalid_commit"], false);
    let mut p = r.controller_process(&["--notify", &notify]).await;
    r.all_converged(&rev1).await;
    let bad = r.commit_fleet(&good.replace("group: canary}", "group: cnary}"));
    let db = r.db();
    // Retried: at least two failed attempts of the one message.
    let queued = harness::eventually(T, "a message retried after 500s", || {
        db.with_conn(|c| roost_fleet::db::notify::deliveries(c, 10))
            .expect("deliveries")
            .into_iter()
            .find(|m| m.state == "queued" && m.attempts >= 2)
    })
    .await;
    assert!(queued.last_error.contains("500"), "{queued:?}");
    assert!(
        !queued.last_error.contains("/hook"),
        "no URL path in errors: {}",
        queued.last_error
    );
    let text = roost_fleet::gitops::plan_status_text(&db, None).expect("plan status");
    assert!(
        text.contains("being retried") && text.contains("retrying"),
        "{text}"
    );
    let m = roost_fleet::metrics::snapshot(&db).expect("metrics");
    assert!(m.notifications.failed_attempts >= 2 && m.notifications.queued == 1);
    // The API (what the dashboard reads) shows the failing delivery, as documented.
    let spec = OpenApi::load();
    let api = r.serve_api(None).await;
    let v = spec.check(
        "GET",
        "/api/v1/summary",
        &call("GET", format!("http://{api}/api/v1/summary"), None).await,
    );
    assert_eq!(v["notifications"]["retrying"], 1, "{v}");
    assert_eq!(v["notifications"]["failing"][0]["key"], queued.key.as_str());
    let v = spec.check(
        "GET",
        "/api/v1/notifications",
        &call("GET", format!("http://{api}/api/v1/notifications"), None).await,
    );
    assert_eq!(v["deliveries"][0]["sink"], "ops", "{v}");
    assert!(v.to_string().contains("500") && !v.to_string().contains("webhook-secret"));
    let first = receiver.received("/hook");
    assert!(first.len() >= 2 && first.iter().all(|h| h.status == 500));
    p.kill();
    // After the kill the receiver recovers; the restarted process delivers the same message.
    receiver.set_failing(false);
    p.restart();
    let got = harness::eventually(T, "the message delivered after the restart", || {
        receiver.accepted("/hook").into_iter().next()
    })
    .await;
    assert_eq!(got.header("X-Roost-Delivery"), Some(queued.key.as_str()));
    assert_eq!(got.header("Idempotency-Key"), Some(queued.key.as_str()));
    assert!(signed_by(&got, "webhook-secret"));
    // The same bytes as every attempt before.
    assert!(first.iter().all(|h| h.body == got.body));
    let body = got.json();
    assert_eq!(body["counts"]["invalid_commit"], 1, "{body}");
    assert_eq!(body["events"][0]["commit"], bad.as_str());
    assert!(
        body["events"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unknown group cnary")),
        "{body}"
    );
    let sent = harness::eventually(T, "recorded as sent", || {
        db.with_conn(|c| roost_fleet::db::notify::deliveries(c, 10))
            .expect("deliveries")
            .into_iter()
            .find(|m| m.key == queued.key && m.state == "sent")
    })
    .await;
    assert!(sent.attempts > queued.attempts);
    // Delivered once: later polls of the same commit tell nothing new.
    let after = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    harness::eventually(T, "two more polls of the bad commit", || {
        db.with_conn(roost_fleet::db::gitops::sync_state)
            .ok()
            .flatten()
            .filter(|(s, _)| roost_schemas::parse_rfc3339(&s.checked_at).is_some_and(|t| t > after))
    })
    .await;
    assert_eq!(receiver.accepted("/hook").len(), 1);
    assert_eq!(
        db.with_conn(|c| roost_fleet::db::notify::deliveries(c, 10))
            .expect("deliveries")
            .len(),
        1
    );
    p.kill();
    r.finish().await;
}
