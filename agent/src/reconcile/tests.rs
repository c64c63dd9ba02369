//! `run_worker` against the fake target: phase transitions, retries, rejections, prune
//! failures, interruptions, restarts and no-churn, with a real outbox and a `file://` Git
//! repository in a temporary directory (no network, no cluster).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use roost_runtime::{Outbox, OutboxConfig};
use roost_schemas::{CloudEvent, Phase, Policy, Rollout, Scope, Source};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{run_worker, Ctx};
use crate::config::{AgentConfig, AgentFile};
use crate::decide::Desired;
use crate::git::GitCache;
use crate::ledger::Ledger;
use crate::targets::fake::{FakeFailure, FakeTarget};

const T: Duration = Duration::from_secs(60);

struct Repo {
    dir: tempfile::TempDir,
    repo: git2::Repository,
    parent: Option<git2::Oid>,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().expect("tmp");
        let repo = git2::Repository::init(dir.path()).expect("init");
        Repo {
            dir,
            repo,
            parent: None,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Replaces `app/` with `files` and commits; returns the commit id.
    fn commit(&mut self, files: &[(&str, &str)]) -> String {
        let app = self.dir.path().join("app");
        let _ = std::fs::remove_dir_all(&app);
        std::fs::create_dir_all(&app).expect("mkdir");
        let mut index = self.repo.index().expect("index");
        index.clear().expect("clear");
        for (p, c) in files {
            std::fs::write(app.join(p), c).expect("write");
            index.add_path(&Path::new("app").join(p)).expect("add");
        }
        let tree = self
            .repo
            .find_tree(index.write_tree().expect("tree"))
            .expect("tree");
        let sig = git2::Signature::now("t", "t@t").expect("sig");
        let parents: Vec<git2::Commit> = self
            .parent
            .iter()
            .map(|p| self.repo.find_commit(*p).expect("parent"))
            .collect();
        let refs: Vec<&git2::Commit> = parents.iter().collect();
        let id = self
            .repo
            .commit(Some("HEAD"), &sig, &sig, "c", &tree, &refs)
            .expect("commit");
        self.parent = Some(id);
        id.to_string()
    }
}

struct Rig {
    _state: tempfile::TempDir,
    outbox: Outbox,
    ctx: Ctx<FakeTarget>,
    fake: FakeTarget,
    tx: watch::Sender<Desired>,
    cancel: CancellationToken,
    worker: Option<tokio::task::JoinHandle<()>>,
    seq: u64,
}

fn config(state: &Path) -> AgentConfig {
    let k = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
    use base64::Engine as _;
    let pk = base64::engine::general_purpose::STANDARD.encode(k.public_key());
    let text = format!(
        "store = \"s1\"\nstate_dir = \"{}\"\nretry_ms = [20, 40]\ndrift_interval_s = 3600\n[broker]\nport = 1883\n[[trusted_keys]]\nid = \"{}\"\npublic_key = \"{pk}\"\n[git]\nallowed_sources = [\"file:///\"]\n[target]\nkind = \"files\"\n",
        state.display(),
        k.key_id()
    );
    let f: AgentFile = toml::from_str(&text).expect("config");
    AgentConfig::from_file(f).expect("valid")
}

impl Rig {
    async fn new() -> Rig {
        Rig::on(tempfile::tempdir().expect("tmp"), FakeTarget::new()).await
    }

    async fn on(state: tempfile::TempDir, fake: FakeTarget) -> Rig {
        let cfg = Arc::new(config(state.path()));
        let outbox =
            Outbox::open(OutboxConfig::new(state.path().join("outbox.db"))).expect("outbox");
        let ledger = Ledger::open(
            outbox.clone(),
            "ev".into(),
            "roost://stores/s1/agent".into(),
            crate::personalize::StoreContext::from_config(&cfg.file),
        )
        .await
        .expect("ledger");
        let ctx = Ctx {
            clock: super::Clock::system(),
            cfg: cfg.clone(),
            ledger,
            git: GitCache::new(state.path().join("git"), vec![], Duration::from_secs(10)),
            target: Arc::new(fake.clone()),
            metrics: Default::default(),
            personalizer: crate::personalize::Personalizer::new(
                crate::personalize::StoreContext::from_config(&cfg.file),
                None,
            ),
        };
        let (tx, _) = watch::channel(Desired::Unknown);
        Rig {
            _state: state,
            outbox,
            ctx,
            fake,
            tx,
            cancel: CancellationToken::new(),
            worker: None,
            seq: 0,
        }
    }

    fn start(&mut self) {
        let rx = self.tx.subscribe();
        self.worker = Some(tokio::spawn(run_worker(
            self.ctx.clone(),
            "web".into(),
            rx,
            self.cancel.clone(),
        )));
    }

    async fn stop(mut self) -> (tempfile::TempDir, FakeTarget) {
        self.cancel.cancel();
        if let Some(w) = self.worker.take() {
            tokio::time::timeout(T, w)
                .await
                .expect("worker stops on cancel")
                .expect("worker did not panic");
        }
        (self._state, self.fake)
    }

    fn want(&mut self, url: &str, rev: &str, policy: Policy) {
        self.seq += 1;
        let r = Rollout {
            schedule: Default::default(),
            deployment: "web".into(),
            scope: Scope::Fleet,
            sequence: self.seq,
            issued_at: "2026-12-01T00:00:00Z".into(),
            source: Some(Source {
                url: url.into(),
                revision: rev.into(),
                path: "app".into(),
            }),
            not_before: None,
            policy,
            remove: false,
            origin: None,
        };
        self.tx.send_replace(Desired::Apply {
            rollout: Box::new(r),
            context: None,
        });
    }

    fn remove(&mut self) {
        self.seq += 1;
        let r = Rollout {
            schedule: Default::default(),
            deployment: "web".into(),
            scope: Scope::Fleet,
            sequence: self.seq,
            issued_at: "2026-12-01T00:00:00Z".into(),
            source: None,
            not_before: None,
            policy: Policy::default(),
            remove: true,
            origin: None,
        };
        self.tx.send_replace(Desired::Remove {
            rollout: Box::new(r),
        });
    }

    async fn events(&self) -> Vec<CloudEvent> {
        self.outbox
            .peek(0, 10_000)
            .await
            .expect("peek")
            .into_iter()
            .filter_map(|m| serde_json::from_slice::<CloudEvent>(&m.payload).ok())
            .filter(|e| !e.ty.is_empty() && e.specversion == "1.0")
            .collect()
    }

    /// Waits for an event of type `ty` about `rev` (any revision when None).
    async fn wait(&self, ty: &str, rev: Option<&str>) -> CloudEvent {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(e) = self
                .events()
                .await
                .into_iter()
                .find(|e| e.ty == ty && rev.is_none_or(|r| e.data["revision"] == r))
            {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {ty} {rev:?}; events: {:?}",
                self.types().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn types(&self) -> Vec<String> {
        self.events()
            .await
            .into_iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e.ty.trim_start_matches("dev.roost."),
                    e.data["revision"].as_str().map(|r| &r[..7]).unwrap_or("")
                )
            })
            .collect()
    }

    fn phase(&self) -> Phase {
        self.ctx.ledger.record("web").phase
    }

    /// Waits until the status of `web` satisfies `pred` (the record is updated right after
    /// the commit that stored its events).
    async fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&roost_schemas::DeploymentStatus) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + T;
        while !self.ctx.ledger.statuses().get("web").is_some_and(&pred) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn count(calls: &[String], prefix: &str) -> usize {
    calls.iter().filter(|c| c.starts_with(prefix)).count()
}

#[tokio::test]
async fn applies_reports_and_writes_only_what_changed() {
    let mut repo = Repo::new();
    let rev1 = repo.commit(&[("a.yaml", "a: 1\n"), ("b.yaml", "b: 1\n")]);
    let mut rig = Rig::new().await;
    rig.start();
    rig.want(&repo.url(), &rev1, Policy::default());
    rig.wait("dev.roost.converged", Some(&rev1)).await;
    rig.wait_status("converged", |s| s.phase == Phase::Converged)
        .await;
    let s = rig.ctx.ledger.statuses();
    assert_eq!(s["web"].applied_revision.as_deref(), Some(rev1.as_str()));
    assert_eq!(
        s["web"].last_attempted_revision.as_deref(),
        Some(rev1.as_str())
    );

    // Only b changes: only b is written; apply.succeeded says so.
    let rev2 = repo.commit(&[("a.yaml", "a: 1\n"), ("b.yaml", "b: 2\n")]);
    rig.want(&repo.url(), &rev2, Policy::default());
    let ok = rig.wait("dev.roost.apply.succeeded", Some(&rev2)).await;
    assert_eq!(ok.data["changed"], serde_json::json!(["b.yaml"]));
    assert_eq!(ok.data["unchanged"], 1);
    rig.wait("dev.roost.converged", Some(&rev2)).await;
    let writes: Vec<String> = rig
        .fake
        .state
        .lock()
        .expect("state")
        .writes
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(writes, vec!["a.yaml", "b.yaml", "b.yaml"]);
    let types = rig.types().await;
    let order: Vec<&str> = types
        .iter()
        .map(|t| t.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(
        order,
        vec![
            "apply.started",
            "apply.succeeded",
            "converged",
            "apply.started",
            "apply.succeeded",
            "converged"
        ]
    );
    rig.stop().await;
}

#[tokio::test]
async fn transient_target_failures_are_retried_never_rejected() {
    let mut repo = Repo::new();
    let rev = repo.commit(&[("a.yaml", "a: 1\n")]);
    let mut rig = Rig::new().await;
    // Discovery (build) and apply fail while the API server is down, twice each.
    rig.fake.fail("build", FakeFailure::Unavailable);
    rig.fake.fail("build", FakeFailure::Unavailable);
    rig.fake.fail("apply", FakeFailure::Unavailable);
    rig.start();
    rig.want(&repo.url(), &rev, Policy::default());
    rig.wait("dev.roost.converged", Some(&rev)).await;
    let events = rig.events().await;
    let failed: Vec<&CloudEvent> = events
        .iter()
        .filter(|e| e.ty == "dev.roost.apply.failed")
        .collect();
    assert_eq!(failed.len(), 3, "{:?}", rig.types().await);
    for f in &failed {
        assert_eq!(f.reason(), Some("target_unavailable"));
        assert_eq!(f.data["retryable"], true);
        assert!(f.data["retry_in_ms"].as_u64().is_some());
    }
    assert!(
        !events.iter().any(|e| e.ty == "dev.roost.rollout.rejected"),
        "an unavailable API server is not a rejection"
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_rejected_revision_is_not_retried_until_a_new_one_comes() {
    let mut repo = Repo::new();
    let bad = repo.commit(&[("a.yaml", "a: 1\n")]);
    let mut rig = Rig::new().await;
    rig.fake.fail("build", FakeFailure::PolicyDenied);
    rig.start();
    rig.want(&repo.url(), &bad, Policy::default());
    let r = rig.wait("dev.roost.rollout.rejected", Some(&bad)).await;
    assert_eq!(r.reason(), Some("policy_denied"));
    rig.wait_status("failed", |s| s.phase == Phase::Failed)
        .await;
    // The positive marker: a later revision converges; the rejected one was built once.
    let good = repo.commit(&[("a.yaml", "a: 2\n")]);
    rig.want(&repo.url(), &good, Policy::default());
    rig.wait("dev.roost.converged", Some(&good)).await;
    let calls = rig.fake.calls();
    assert_eq!(count(&calls, &format!("build {bad}")), 1, "{calls:?}");
    assert_eq!(count(&calls, &format!("apply {bad}")), 0, "{calls:?}");
    rig.stop().await;
}

#[tokio::test]
async fn a_prune_failure_leaves_failed_then_retries_to_converged() {
    let mut repo = Repo::new();
    let rev1 = repo.commit(&[("a.yaml", "a: 1\n"), ("b.yaml", "b: 1\n")]);
    let mut rig = Rig::new().await;
    rig.start();
    rig.want(&repo.url(), &rev1, Policy::default());
    rig.wait("dev.roost.converged", Some(&rev1)).await;
    rig.fake.fail("prune", FakeFailure::Refused);
    rig.fake.set_healthy(true);
    let rev2 = repo.commit(&[("a.yaml", "a: 1\n")]);
    rig.want(&repo.url(), &rev2, Policy::default());
    let f = rig.wait("dev.roost.apply.failed", Some(&rev2)).await;
    assert_eq!(f.reason(), Some("prune_failed"));
    // The retry prunes and converges; before it, nothing said converged for rev2.
    let pruned = rig.wait("dev.roost.pruned", Some(&rev2)).await;
    assert_eq!(pruned.data["pruned"], serde_json::json!(["b.yaml"]));
    rig.wait("dev.roost.converged", Some(&rev2)).await;
    let types = rig.types().await;
    let short2 = &rev2[..7];
    let failed_at = types
        .iter()
        .position(|t| t == &format!("apply.failed {short2}"))
        .expect("failed");
    let converged_at = types
        .iter()
        .position(|t| t == &format!("converged {short2}"))
        .expect("converged");
    assert!(failed_at < converged_at, "{types:?}");
    assert!(
        !types[..failed_at]
            .iter()
            .any(|t| t == &format!("converged {short2}")),
        "{types:?}"
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_new_revision_during_an_apply_supersedes_it() {
    let mut repo = Repo::new();
    let rev1 = repo.commit(&[("a.yaml", "a: 1\n")]);
    let rev2 = repo.commit(&[("a.yaml", "a: 2\n")]);
    let mut rig = Rig::new().await;
    rig.fake.hold_apply();
    let started = rig.fake.apply_started.clone();
    let notified = started.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    rig.start();
    rig.want(&repo.url(), &rev1, Policy::default());
    tokio::time::timeout(T, notified)
        .await
        .expect("apply of rev1 started");
    rig.want(&repo.url(), &rev2, Policy::default());
    rig.fake.release();
    rig.wait("dev.roost.converged", Some(&rev2)).await;
    let events = rig.events().await;
    assert!(
        !events
            .iter()
            .any(|e| e.ty == "dev.roost.converged" && e.data["revision"] == rev1.as_str()),
        "the superseded revision is never reported converged: {:?}",
        rig.types().await
    );
    rig.wait_status("rev2 applied", |s| {
        s.applied_revision.as_deref() == Some(rev2.as_str())
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn an_outcome_lost_to_a_restart_is_reported_without_reapplying() {
    let mut repo = Repo::new();
    let rev = repo.commit(&[("a.yaml", "a: 1\n")]);
    let mut rig = Rig::new().await;
    rig.fake.set_healthy(false);
    rig.start();
    let policy = Policy {
        health_timeout_s: 3600,
        ..Policy::default()
    };
    rig.want(&repo.url(), &rev, policy.clone());
    rig.wait("dev.roost.apply.succeeded", Some(&rev)).await;
    let (state, fake) = rig.stop().await;
    // A new agent on the same state: applied, outcome not reported yet.
    fake.set_healthy(true);
    let mut rig = Rig::on(state, fake).await;
    assert_eq!(
        rig.phase(),
        Phase::Progressing,
        "the record survived the restart"
    );
    rig.start();
    rig.seq = 0;
    rig.want(&repo.url(), &rev, policy);
    rig.wait("dev.roost.converged", Some(&rev)).await;
    let calls = rig.fake.calls();
    assert_eq!(count(&calls, &format!("apply {rev}")), 1, "{calls:?}");
    rig.stop().await;
}

#[tokio::test]
async fn drift_is_reported_once_and_healed() {
    let mut repo = Repo::new();
    let rev = repo.commit(&[("a.yaml", "a: 1\n")]);
    let mut rig = Rig::new().await;
    rig.fake.drift_next(&[]);
    rig.start();
    rig.want(&repo.url(), &rev, Policy::default());
    rig.wait("dev.roost.converged", Some(&rev)).await;
    rig.stop().await;
    // The drift check runs when the worker (re)enters the in-sync state.
    let mut repo2 = repo;
    let rev2 = repo2.commit(&[("a.yaml", "a: 2\n")]);
    let mut rig = Rig::new().await;
    rig.fake.drift_next(&["a.yaml: modified"]);
    rig.start();
    rig.want(&repo2.url(), &rev2, Policy::default());
    let d = rig.wait("dev.roost.drift.detected", Some(&rev2)).await;
    assert_eq!(d.reason(), Some("drift"));
    rig.wait("dev.roost.drift.corrected", Some(&rev2)).await;
    rig.wait_status("no drift", |s| !s.drift && s.phase == Phase::Converged)
        .await;
    rig.stop().await;
}

#[tokio::test]
async fn removal_deletes_the_inventory_and_records_removed() {
    let mut repo = Repo::new();
    let rev = repo.commit(&[("a.yaml", "a: 1\n"), ("b.yaml", "b: 1\n")]);
    let mut rig = Rig::new().await;
    rig.start();
    rig.want(&repo.url(), &rev, Policy::default());
    rig.wait("dev.roost.converged", None).await;
    rig.remove();
    let removed = rig.wait("dev.roost.removed", None).await;
    assert_eq!(removed.data["deployment"], "web");
    let pruned = rig.wait("dev.roost.pruned", None).await;
    assert_eq!(
        pruned.data["pruned"],
        serde_json::json!(["a.yaml", "b.yaml"])
    );
    rig.wait_status("removed", |s| s.phase == Phase::Removed)
        .await;
    assert!(rig.ctx.ledger.record("web").inventory.is_empty());
    rig.stop().await;
}

#[tokio::test]
async fn a_failed_revision_is_rolled_back_to_the_last_good_and_not_retried() {
    let mut repo = Repo::new();
    let good = repo.commit(&[("a.yaml", "a: 1\n")]);
    let bad = repo.commit(&[("a.yaml", "a: 2\n"), ("b.yaml", "b: 1\n")]);
    let mut rig = Rig::new().await;
    rig.start();
    let policy = Policy {
        on_failure: Some(roost_schemas::OnFailure::Rollback),
        health_timeout_s: 1,
        ..Policy::default()
    };
    rig.want(&repo.url(), &good, policy.clone());
    rig.wait("dev.roost.converged", Some(&good)).await;
    // The bad revision never gets healthy.
    rig.fake.set_healthy(false);
    rig.want(&repo.url(), &bad, policy.clone());
    let rb = rig.wait("dev.roost.rolled_back", Some(&bad)).await;
    assert_eq!(rb.data["failed_revision"], bad.as_str());
    assert_eq!(rb.data["restored_revision"], good.as_str());
    assert_eq!(rb.reason(), Some("health_timeout"));
    rig.wait_status("rolled back", |s| {
        s.phase == Phase::RolledBack
            && s.applied_revision.as_deref() == Some(good.as_str())
            && s.failed_revision.as_deref() == Some(bad.as_str())
    })
    .await;
    // What only the bad revision had is pruned again.
    let pruned = rig.wait("dev.roost.pruned", Some(&bad)).await;
    assert_eq!(pruned.data["pruned"], serde_json::json!(["b.yaml"]));
    // A new rollout is tried; the failed one was applied once only.
    rig.fake.set_healthy(true);
    let fixed = repo.commit(&[("a.yaml", "a: 3\n")]);
    rig.want(&repo.url(), &fixed, policy);
    rig.wait("dev.roost.converged", Some(&fixed)).await;
    let calls = rig.fake.calls();
    assert_eq!(count(&calls, &format!("apply {bad}")), 1, "{calls:?}");
    assert_eq!(count(&calls, &format!("apply {good}")), 2, "{calls:?}");
    rig.stop().await;
}

#[tokio::test]
async fn without_rollback_policy_a_failed_revision_stays() {
    let mut repo = Repo::new();
    let good = repo.commit(&[("a.yaml", "a: 1\n")]);
    let bad = repo.commit(&[("a.yaml", "a: 2\n")]);
    let mut rig = Rig::new().await;
    rig.start();
    let policy = Policy {
        health_timeout_s: 1,
        ..Policy::default()
    };
    rig.want(&repo.url(), &good, policy.clone());
    rig.wait("dev.roost.converged", Some(&good)).await;
    rig.fake.set_healthy(false);
    rig.want(&repo.url(), &bad, policy);
    rig.wait("dev.roost.degraded", Some(&bad)).await;
    rig.wait_status("degraded", |s| {
        s.phase == Phase::Degraded && s.applied_revision.as_deref() == Some(bad.as_str())
    })
    .await;
    assert!(!rig
        .events()
        .await
        .iter()
        .any(|e| e.ty == "dev.roost.rolled_back"));
    rig.stop().await;
}

#[tokio::test]
async fn a_revision_waits_for_its_window_then_applies() {
    let mut repo = Repo::new();
    let rev = repo.commit(&[("a.yaml", "a: 1\n")]);
    let mut rig = Rig::new().await;
    // The injected clock says 01:59:58 UTC; the window opens at 02:00.
    rig.ctx.clock = super::Clock::starting_at("2026-12-07T01:59:58Z".parse().expect("ts"));
    rig.start();
    rig.seq += 1;
    let r = Rollout {
        schedule: roost_schemas::Schedule {
            windows: vec![roost_schemas::window::Window {
                days: vec![],
                start: "02:00".into(),
                duration: "1h".into(),
            }],
            ..Default::default()
        },
        deployment: "web".into(),
        scope: Scope::Fleet,
        sequence: rig.seq,
        issued_at: "2026-12-01T00:00:00Z".into(),
        source: Some(Source {
            url: repo.url(),
            revision: rev.clone(),
            path: "app".into(),
        }),
        not_before: None,
        policy: Policy::default(),
        remove: false,
        origin: None,
    };
    rig.tx.send_replace(Desired::Apply {
        rollout: Box::new(r),
        context: None,
    });
    let w = rig.wait("dev.roost.waiting", Some(&rev)).await;
    assert_eq!(w.reason(), Some("window"));
    assert_eq!(w.data["next_window"], "2026-12-07T02:00:00+00:00");
    rig.wait_status("waiting", |s| {
        s.phase == Phase::Waiting && s.next_window.as_deref() == Some("2026-12-07T02:00:00+00:00")
    })
    .await;
    // Fetched and built at once; applied only when the window opens.
    assert_eq!(count(&rig.fake.calls(), &format!("build {rev}")), 1);
    assert_eq!(count(&rig.fake.calls(), &format!("apply {rev}")), 0);
    rig.wait("dev.roost.converged", Some(&rev)).await;
    assert!(rig.ctx.clock.now() >= "2026-12-07T02:00:00Z".parse().expect("ts"));
    rig.wait_status("converged", |s| {
        s.phase == Phase::Converged && s.next_window.is_none()
    })
    .await;
    rig.stop().await;
}
