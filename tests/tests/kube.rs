//! Kubernetes target scenarios. Each runs by default against the project's test API server
//! (`roost_tests::kube_api`, a documented test double) and, unchanged, against a real cluster
//! from `KUBECONFIG` in the `*_real_cluster` copies (`cargo test -p roost-tests --test kube --
//! --ignored`). Against a real API server without kubelets, Deployments that must converge use
//! `replicas: 0`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use roost_agent::config::{KubernetesConfig, TargetConfig};
use roost_schemas::{CloudEvent, Scope, Topics};
use roost_tests::fixtures::roost_up_once;
use roost_tests::harness::{self, publish, CloudRig, GitServer, Observer, Signer, StoreRig};
use roost_tests::kube_api::TestApiServer;
use serde_json::json;

const T: Duration = Duration::from_secs(45);
const APP: &str = "apps/shop";

enum ClusterKind {
    Double(TestApiServer),
    Real,
}

/// A cluster to run a scenario against, with a unique namespace prefix.
struct Cluster {
    kind: ClusterKind,
    kubeconfig: Option<PathBuf>,
    client: kube::Client,
    prefix: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn double() -> Cluster {
        harness::init();
        let server = TestApiServer::start().await.expect("test API server");
        let dir = tempfile::tempdir().expect("tmp");
        let kc = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kc).expect("kubeconfig");
        Cluster {
            client: server.client(),
            kind: ClusterKind::Double(server),
            kubeconfig: Some(kc),
            prefix: format!("t{:08x}-", rand::random::<u32>()),
            _dir: dir,
        }
    }

    async fn real() -> Cluster {
        harness::init();
        let client = kube::Client::try_default()
            .await
            .expect("KUBECONFIG must point at a cluster");
        Cluster {
            kind: ClusterKind::Real,
            kubeconfig: std::env::var_os("KUBECONFIG").map(PathBuf::from),
            client,
            prefix: format!("rt{:08x}-", rand::random::<u32>()),
            _dir: tempfile::tempdir().expect("tmp"),
        }
    }

    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }

    /// Makes a Deployment never available: a knob on the double; on a real cluster the
    /// manifest's unpullable image does it.
    fn never_available(&self, ns: &str, name: &str) {
        if let ClusterKind::Double(s) = &self.kind {
            s.never_available(ns, name);
        }
    }

    fn api(&self, group: &str, version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    async fn get(
        &self,
        group: &str,
        version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<DynamicObject> {
        self.api(group, version, kind, ns)
            .get_opt(name)
            .await
            .expect("get")
    }

    async fn cleanup(&self) {
        let nss = self.api("", "v1", "Namespace", None);
        if let Ok(list) = nss.list(&Default::default()).await {
            for n in list {
                let name = n.metadata.name.unwrap_or_default();
                if name.starts_with(&self.prefix) {
                    let _ = nss.delete(&name, &Default::default()).await;
                }
            }
        }
    }
}

struct Scene {
    /// This scenario's store and deployment names (unique: scenarios share one cluster).
    store_name: String,
    dep: String,
    cluster: Cluster,
    _dir: tempfile::TempDir,
    cloud: std::net::SocketAddr,
    git: GitServer,
    signer: Signer,
    obs: Observer,
    store: StoreRig,
    seq: u64,
}

fn ns_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn cm_yaml(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: shop\ndata:\n  value: \"{value}\"\n")
}

fn svc_yaml() -> String {
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  selector:\n    app: web\n  ports:\n    - port: 80\n      targetPort: 8080\n".into()
}

fn deploy_yaml(name: &str, replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels:\n      app: {name}\n  template:\n    metadata:\n      labels:\n        app: {name}\n    spec:\n      containers:\n        - name: main\n          image: {image}\n"
    )
}

/// A CustomResourceDefinition of namespaced `widgets` (kind Widget, v1) in API group `group`.
fn crd_yaml(group: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names:\n    plural: widgets\n    singular: widget\n    kind: Widget\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema:\n          type: object\n          x-kubernetes-preserve-unknown-fields: true\n"
    )
}

/// Widget `w1` (of [`crd_yaml`]'s kind) in namespace `shop`.
fn widget_yaml(group: &str) -> String {
    format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w1\n  namespace: shop\nspec:\n  size: 3\n")
}

fn base_files() -> Vec<(String, String)> {
    vec![
        (format!("{APP}/00-namespace.yaml"), ns_yaml("shop")),
        (format!("{APP}/config.yaml"), cm_yaml("settings", "1")),
        (format!("{APP}/service.yaml"), svc_yaml()),
        (
            format!("{APP}/deployment.yaml"),
            deploy_yaml("web", 0, "registry.k8s.io/pause:3.9"),
        ),
    ]
}

impl Scene {
    async fn new(cluster: Cluster, policy: impl FnOnce(&mut KubernetesConfig)) -> Scene {
        let CloudRig {
            dir,
            cloud,
            git,
            obs,
            ..
        } = CloudRig::start(&[("README", "shop\n")]).await;
        let signer = Signer::new(7);
        let id = cluster.prefix.trim_end_matches('-').to_owned();
        let store_name = format!("store-{id}");
        let dep = format!("shop-{id}");
        let mut store = StoreRig::new(
            &store_name,
            &["all"],
            dir.path(),
            cloud,
            &signer,
            &git.allowed(),
        );
        let mut k = KubernetesConfig {
            kubeconfig: cluster.kubeconfig.clone(),
            namespace_prefix: Some(cluster.prefix.clone()),
            default_namespace: Some("shop".into()),
            ..Default::default()
        };
        policy(&mut k);
        store.agent_cfg.file.target = TargetConfig::Kubernetes(k);
        store.start();
        Scene {
            store_name,
            dep,
            cluster,
            _dir: dir,
            cloud,
            git,
            signer,
            obs,
            store,
            seq: 0,
        }
    }

    /// Commits `files` (replacing the app directory) and rolls it out; returns the revision.
    async fn roll_files(&mut self, files: &[(String, String)], health_timeout_s: u64) -> String {
        let rev = self.git.commit_replacing(APP, files, "change");
        self.seq += 1;
        let mut r = self.signer.rollout(
            &self.dep,
            Scope::Fleet,
            self.seq,
            &self.git.url(),
            &rev,
            APP,
        );
        r.policy.health_timeout_s = health_timeout_s;
        publish(
            self.cloud,
            &Topics::default().deployment(&Scope::Fleet, &self.dep),
            self.signer.sign(&r),
        )
        .await;
        rev
    }

    async fn tombstone(&mut self) {
        self.seq += 1;
        let mut r = self.signer.rollout(
            &self.dep,
            Scope::Fleet,
            self.seq,
            &self.git.url(),
            &"0".repeat(40),
            APP,
        );
        r.remove = true;
        publish(
            self.cloud,
            &Topics::default().deployment(&Scope::Fleet, &self.dep),
            self.signer.sign(&r),
        )
        .await;
    }

    async fn event(&self, ty: &str, pred: impl Fn(&CloudEvent) -> bool) -> CloudEvent {
        self.obs.wait_event(&self.store_name, ty, T, pred).await
    }

    async fn converged(&self, rev: &str) -> CloudEvent {
        self.obs.wait_converged(&self.store_name, rev, T).await
    }

    /// Events of this scenario's store of type `ty`.
    fn seen(&self, ty: &str) -> Vec<CloudEvent> {
        self.obs
            .snapshot()
            .of(&self.store_name, ty)
            .into_iter()
            .cloned()
            .collect()
    }

    async fn phase(&self, phase: &str, rev: Option<&str>) -> roost_schemas::StatusDoc {
        self.obs
            .wait_phase(&self.store_name, &self.dep, phase, rev, T)
            .await
    }

    async fn finish(mut self) {
        self.store.stop_agent().await;
        self.cluster.cleanup().await;
    }
}

/// The uid of the Endpoints of Service `web` (made by the endpoints controller).
async fn endpoints_uid(c: &Cluster, ns: &str) -> Option<String> {
    c.api("", "v1", "Endpoints", Some(ns))
        .get_opt("web")
        .await
        .ok()
        .flatten()
        .and_then(|e| e.metadata.uid)
}

/// Uids of the objects of a kind in `ns` that have a controller owner (made by controllers).
async fn owned_uids(c: &Cluster, group: &str, version: &str, kind: &str, ns: &str) -> Vec<String> {
    let Ok(list) = c
        .api(group, version, kind, Some(ns))
        .list(&Default::default())
        .await
    else {
        return Vec::new(); // the kind is not served (the test API server without it)
    };
    let mut uids: Vec<String> = list
        .into_iter()
        .filter(|o| {
            o.metadata
                .owner_references
                .as_ref()
                .is_some_and(|r| r.iter().any(|r| r.controller == Some(true)))
        })
        .filter_map(|o| o.metadata.uid)
        .collect();
    uids.sort();
    uids
}

fn label(o: &DynamicObject, k: &str) -> Option<String> {
    o.metadata.labels.as_ref()?.get(k).cloned()
}

async fn scenario_apply_update_prune_tombstone(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    let rev1 = s.roll_files(&base_files(), 60).await;
    s.converged(&rev1).await;
    let cm = s
        .cluster
        .get("", "v1", "ConfigMap", Some(&ns), "settings")
        .await
        .expect("configmap applied");
    assert_eq!(
        label(&cm, "app.kubernetes.io/managed-by").as_deref(),
        Some("roost")
    );
    assert_eq!(
        label(&cm, "roost.dev/deployment").as_deref(),
        Some(s.dep.as_str())
    );
    assert_eq!(
        label(&cm, "roost.dev/store").as_deref(),
        Some(s.store_name.as_str())
    );
    assert!(
        cm.metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.keys().any(|k| k.starts_with("roost.dev/"))),
        "no per-revision annotation on objects: {:?}",
        cm.metadata.annotations
    );
    let svc = s
        .cluster
        .get("", "v1", "Service", Some(&ns), "web")
        .await
        .expect("service");
    let dep = s
        .cluster
        .get("apps", "v1", "Deployment", Some(&ns), "web")
        .await
        .expect("deployment");
    assert!(s
        .cluster
        .get("", "v1", "Namespace", None, &ns)
        .await
        .is_some());
    let fm = cm.metadata.managed_fields.clone().unwrap_or_default();
    assert!(
        fm.iter()
            .any(|f| f.manager.as_deref() == Some("roost")
                && f.operation.as_deref() == Some("Apply")),
        "server-side applied by roost"
    );

    // What the cluster's controllers made for roost's objects (a real cluster's endpoints
    // and Deployment controllers; the test API server emulates them).
    let endpoints = endpoints_uid(&s.cluster, &ns).await;
    let replicasets = owned_uids(&s.cluster, "apps", "v1", "ReplicaSet", &ns).await;
    let slices = owned_uids(&s.cluster, "discovery.k8s.io", "v1", "EndpointSlice", &ns).await;

    // Update: only the changed object changes.
    let mut files = base_files();
    files[1].1 = cm_yaml("settings", "2");
    let rev2 = s.roll_files(&files, 60).await;
    let applied = s
        .event("dev.roost.apply.succeeded", |e| {
            e.data["revision"] == rev2.as_str()
        })
        .await;
    let changed: Vec<String> =
        serde_json::from_value(applied.data["changed"].clone()).expect("changed list");
    assert!(
        changed
            .iter()
            .any(|k| k.ends_with(&format!("/ConfigMap/{ns}/settings"))),
        "{changed:?}"
    );
    s.converged(&rev2).await;
    let cm2 = s
        .cluster
        .get("", "v1", "ConfigMap", Some(&ns), "settings")
        .await
        .expect("configmap");
    assert_eq!(cm2.data["data"]["value"], "2");
    let svc2 = s
        .cluster
        .get("", "v1", "Service", Some(&ns), "web")
        .await
        .expect("service");
    let dep2 = s
        .cluster
        .get("apps", "v1", "Deployment", Some(&ns), "web")
        .await
        .expect("deployment");
    assert_eq!(
        svc2.data["spec"], svc.data["spec"],
        "service spec untouched"
    );
    assert_eq!(
        svc2.metadata.uid, svc.metadata.uid,
        "service not re-created"
    );
    assert_eq!(
        svc2.data["spec"]["clusterIP"], svc.data["spec"]["clusterIP"],
        "service keeps its clusterIP"
    );
    assert_eq!(
        svc2.metadata.resource_version, svc.metadata.resource_version,
        "service not written"
    );
    assert_eq!(
        dep2.metadata.generation, dep.metadata.generation,
        "deployment untouched (generation)"
    );
    assert_eq!(changed.len(), 1, "only the config map changed: {changed:?}");
    assert_eq!(applied.data["unchanged"], 3, "{}", applied.data);
    assert_eq!(
        endpoints_uid(&s.cluster, &ns).await,
        endpoints,
        "Endpoints never deleted by roost"
    );
    assert_eq!(
        owned_uids(&s.cluster, "apps", "v1", "ReplicaSet", &ns).await,
        replicasets,
        "ReplicaSets never deleted by roost"
    );
    assert_eq!(
        owned_uids(&s.cluster, "discovery.k8s.io", "v1", "EndpointSlice", &ns).await,
        slices,
        "EndpointSlices never deleted by roost"
    );
    let nsobj = s
        .cluster
        .get("", "v1", "Namespace", None, &ns)
        .await
        .expect("namespace");
    assert_eq!(
        nsobj.data["status"]["phase"], "Active",
        "namespace stays Active"
    );

    // Remove a file: its object is pruned.
    let files: Vec<(String, String)> = files
        .into_iter()
        .filter(|(p, _)| !p.ends_with("service.yaml"))
        .collect();
    let rev3 = s.roll_files(&files, 60).await;
    let pruned = s
        .event("dev.roost.pruned", |e| e.data["revision"] == rev3.as_str())
        .await;
    assert!(
        pruned.data["pruned"].to_string().contains("/Service/"),
        "{}",
        pruned.data
    );
    s.converged(&rev3).await;
    assert!(
        s.cluster
            .get("", "v1", "Service", Some(&ns), "web")
            .await
            .is_none(),
        "pruned"
    );
    assert!(
        s.cluster
            .get("", "v1", "ConfigMap", Some(&ns), "settings")
            .await
            .is_some(),
        "kept"
    );

    // Tombstone: everything pruned, the namespace last.
    s.tombstone().await;
    s.event("dev.roost.removed", |_| true).await;
    assert!(s
        .cluster
        .get("", "v1", "ConfigMap", Some(&ns), "settings")
        .await
        .is_none());
    assert!(s
        .cluster
        .get("apps", "v1", "Deployment", Some(&ns), "web")
        .await
        .is_none());
    let deadline = Instant::now() + T;
    while s
        .cluster
        .get("", "v1", "Namespace", None, &ns)
        .await
        .is_some_and(|n| n.metadata.deletion_timestamp.is_none())
    {
        assert!(Instant::now() < deadline, "namespace deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.finish().await;
}

async fn scenario_degraded(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    s.cluster.never_available(&ns, "stuck");
    let mut files = base_files();
    files.push((
        format!("{APP}/stuck.yaml"),
        deploy_yaml("stuck", 1, "registry.invalid/never-pulls:0"),
    ));
    let rev = s.roll_files(&files, 3).await;
    let d = s
        .event("dev.roost.degraded", |e| e.data["revision"] == rev.as_str())
        .await;
    assert_eq!(d.reason(), Some("health_timeout"));
    assert!(
        d.data["not_ready"]
            .to_string()
            .contains(&format!("Deployment/{ns}/stuck")),
        "{}",
        d.data
    );
    assert!(s.seen("dev.roost.converged").is_empty());
    s.phase("Degraded", Some(&rev)).await;
    s.finish().await;
}

async fn scenario_drift(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    let rev = s.roll_files(&base_files(), 60).await;
    s.converged(&rev).await;
    let cms = s.cluster.api("", "v1", "ConfigMap", Some(&ns));

    // A change to a field roost does not manage (another manager adds a key) is not drift.
    let other = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    cms.patch(
        "settings",
        &other,
        &Patch::Merge(json!({"data": {"added-by-hand": "x"}})),
    )
    .await
    .expect("patch");
    // The marker is the first managed-field edit below: its drift report must be the first
    // one, and no report ever names the other manager's field.

    // kubectl-style edits of a managed field: detected, named, corrected — ten times, timed.
    let mut detect_ms = Vec::new();
    for i in 0..10 {
        let before = s.seen("dev.roost.drift.corrected").len();
        let t0 = Instant::now();
        cms.patch(
            "settings",
            &other,
            &Patch::Merge(json!({"data": {"value": format!("edited-{i}")}})),
        )
        .await
        .expect("edit");
        let found = harness::eventually(T, "drift detected", || {
            let all = s.seen("dev.roost.drift.detected");
            (all.len() > i).then(|| all[i].clone())
        })
        .await;
        assert!(
            found.data["items"].to_string().contains("data.value"),
            "names the field: {}",
            found.data
        );
        assert!(
            !found.data["items"].to_string().contains("added-by-hand"),
            "unmanaged field is not drift: {}",
            found.data
        );
        detect_ms.push(t0.elapsed().as_millis() as u64);
        harness::eventually(T, "drift corrected", || {
            (s.seen("dev.roost.drift.corrected").len() > before).then_some(())
        })
        .await;
        let cm = cms.get("settings").await.expect("get");
        assert_eq!(
            cm.data["data"]["value"], "1",
            "self-heal restored the managed field"
        );
        assert_eq!(
            cm.data["data"]["added-by-hand"], "x",
            "the other manager's field is kept"
        );
    }
    detect_ms.sort_unstable();
    eprintln!("kube drift: out-of-band edit -> drift.detected at the cloud, median of 10 = {} ms (min {} max {})", detect_ms[4], detect_ms[0], detect_ms[9]);

    // An object deleted by hand is recreated.
    s.cluster
        .api("", "v1", "Service", Some(&ns))
        .delete("web", &Default::default())
        .await
        .expect("delete");
    s.event("dev.roost.drift.detected", |e| {
        e.data["items"].to_string().contains("deleted")
    })
    .await;
    let deadline = Instant::now() + T;
    while s
        .cluster
        .get("", "v1", "Service", Some(&ns), "web")
        .await
        .is_none()
    {
        assert!(Instant::now() < deadline, "service recreated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.finish().await;
}

async fn scenario_policy_denied(c: Cluster) {
    let mut s = Scene::new(c, |k| {
        k.denied_kinds = vec!["ClusterRole".into()];
        k.allowed_namespaces = vec!["shop".into()];
    })
    .await;
    let ns = s.cluster.ns("shop");
    // (extra file, its content, expected reason, what the message must name)
    let cases = [
        (
            "role.yaml",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: roost-test-denied\nrules: []\n",
            "policy_denied",
            "ClusterRole",
        ),
        (
            "elsewhere.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: kube-system\n",
            "policy_denied",
            "kube-system",
        ),
        (
            "noname.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n",
            "invalid_manifest",
            "noname.yaml#1",
        ),
    ];
    for (file, content, reason, names) in cases {
        let mut files = base_files();
        files.push((format!("{APP}/{file}"), content.to_owned()));
        let rev = s.roll_files(&files, 60).await;
        let r = s
            .event("dev.roost.rollout.rejected", |e| {
                e.data["revision"] == rev.as_str()
            })
            .await;
        assert_eq!(r.reason(), Some(reason), "{file}");
        let message = r.data["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{file}: {message}");
        assert!(
            s.cluster
                .get("", "v1", "ConfigMap", Some(&ns), "settings")
                .await
                .is_none(),
            "{file}: nothing applied"
        );
    }
    // More objects than the agent's limit: too_large, nothing applied.
    s.store.stop_agent().await;
    s.store.agent_cfg.file.limits.max_objects = 3;
    s.store.start_agent();
    // One file (under the file limit) with four documents (over the object limit).
    let all: Vec<String> = base_files().into_iter().map(|(_, c)| c).collect();
    let rev4 = s
        .roll_files(&[(format!("{APP}/all.yaml"), all.join("---\n"))], 60)
        .await;
    let r4 = s
        .event("dev.roost.rollout.rejected", |e| {
            e.data["revision"] == rev4.as_str()
        })
        .await;
    assert_eq!(r4.reason(), Some("too_large"));
    assert!(
        r4.data["message"]
            .as_str()
            .unwrap_or_default()
            .contains("4 objects, limit 3"),
        "{}",
        r4.data
    );
    assert!(
        s.cluster
            .get("", "v1", "ConfigMap", Some(&ns), "settings")
            .await
            .is_none(),
        "nothing applied"
    );
    s.finish().await;
}

async fn scenario_crd_and_custom_resource(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    let group = format!(
        "{}widgets.roost.dev",
        s.cluster.prefix.trim_end_matches('-').to_owned() + "."
    );
    let mut files = base_files();
    // Alphabetically the custom resource comes first: roost must order it after its CRD.
    files.push((format!("{APP}/a-widget.yaml"), widget_yaml(&group)));
    files.push((format!("{APP}/z-crd.yaml"), crd_yaml(&group)));
    let rev = s.roll_files(&files, 60).await;
    s.converged(&rev).await;
    let w = s
        .cluster
        .get(&group, "v1", "Widget", Some(&ns), "w1")
        .await
        .expect("custom resource applied");
    assert_eq!(w.data["spec"]["size"], 3);
    s.tombstone().await;
    s.event("dev.roost.removed", |_| true).await;
    s.finish().await;
}

async fn scenario_state_loss(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    let rev1 = s.roll_files(&base_files(), 60).await;
    s.converged(&rev1).await;
    // The agent's records are lost (a restored backup without them): inventory, applied
    // record, replay guard. The event outbox (and its roostseq) survives.
    s.store.stop_agent().await;
    {
        let db = rusqlite::Connection::open(s.store.agent_cfg.file.state_dir.join("outbox.db"))
            .expect("agent database");
        db.execute_batch("DELETE FROM agent_deployments; DELETE FROM agent_accepted;")
            .expect("forget the ledger");
    }
    s.store.start_agent();
    // The retained rollout is accepted again and re-applied (nothing changes in the cluster).
    s.phase("Converged", Some(&rev1)).await;
    // A revision without the Service: the inventory recovered from the labels finds it.
    let files: Vec<(String, String)> = base_files()
        .into_iter()
        .filter(|(p, _)| !p.ends_with("service.yaml"))
        .collect();
    let rev2 = s.roll_files(&files, 60).await;
    let pruned = s
        .event("dev.roost.pruned", |e| e.data["revision"] == rev2.as_str())
        .await;
    assert!(
        pruned.data["pruned"]
            .to_string()
            .contains(&format!("/Service/{ns}/web")),
        "{}",
        pruned.data
    );
    assert!(s
        .cluster
        .get("", "v1", "Service", Some(&ns), "web")
        .await
        .is_none());
    s.finish().await;
}

async fn scenario_apply_failed(c: Cluster) {
    let mut s = Scene::new(c, |_| {}).await;
    let ns = s.cluster.ns("shop");
    let rev1 = s.roll_files(&base_files(), 60).await;
    s.converged(&rev1).await;
    // A Deployment's selector is immutable: the API server refuses the change.
    let mut files = base_files();
    files[3].1 = files[3]
        .1
        .replace("app: web\n  template", "app: web-v2\n  template")
        .replace("labels:\n        app: web", "labels:\n        app: web-v2");
    assert!(files[3].1.contains("web-v2"), "{}", files[3].1);
    let rev2 = s.roll_files(&files, 60).await;
    let f = s
        .event("dev.roost.apply.failed", |e| {
            e.data["revision"] == rev2.as_str()
        })
        .await;
    assert_eq!(f.reason(), Some("apply_failed"));
    let message = f.data["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("apps/v1/Deployment/{ns}/web")),
        "names the object: {message}"
    );
    assert!(
        message.to_lowercase().contains("immutable"),
        "carries the API server's message: {message}"
    );
    let doc = s.phase("Failed", None).await;
    let st = &doc.deployments[&s.dep];
    assert_eq!(
        st.applied_revision.as_deref(),
        Some(rev1.as_str()),
        "still at the last good revision"
    );
    assert_eq!(st.last_attempted_revision.as_deref(), Some(rev2.as_str()));
    s.finish().await;
}

macro_rules! scenarios {
    ($($name:ident => $f:ident),* $(,)?) => {
        mod test_api_server {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $f(Cluster::double().await).await;
                }
            )*
        }
        mod real_cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs a Kubernetes cluster"]
                async fn $name() {
                    $f(Cluster::real().await).await;
                }
            )*
        }
    };
}

scenarios! {
    apply_update_prune_tombstone => scenario_apply_update_prune_tombstone,
    degraded_after_health_timeout => scenario_degraded,
    drift_detected_and_corrected => scenario_drift,
    policy_denied_applies_nothing => scenario_policy_denied,
    crd_and_custom_resource_in_one_revision => scenario_crd_and_custom_resource,
    inventory_recovered_from_labels_after_state_loss => scenario_state_loss,
    apply_failure_names_the_object_and_the_server_message => scenario_apply_failed,
}

/// `deploy/roost.yaml`: every document is a valid object, the embedded configurations parse,
/// and the whole file applies to the test API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_manifests_parse_and_apply() {
    let c = Cluster::double().await;
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/roost.yaml"))
            .expect("deploy/roost.yaml")
            + "---\n"
            + &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
                .expect("deploy/rbac.yaml");
    let file = roost_agent::git::ManifestFile {
        path: "roost.yaml".into(),
        data: text.into_bytes(),
    };
    let docs = roost_agent::git::parse_documents(&file).expect("YAML");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&k), "deploy/roost.yaml has a {k}");
    }
    for d in &docs {
        if d["kind"] != "ConfigMap" {
            continue;
        }
        for (name, body) in d["data"].as_object().expect("data") {
            let body = body.as_str().expect("string");
            match name.as_str() {
                "agent.toml" => {
                    let f: roost_agent::config::AgentFile =
                        toml::from_str(body).expect("agent.toml parses");
                    assert!(matches!(f.target, TargetConfig::Kubernetes(_)));
                }
                "bridge.toml" => {
                    let b: roost_bridge::BridgeConfig =
                        toml::from_str(body).expect("bridge.toml parses");
                    b.validate().expect("bridge.toml valid");
                }
                "edge.toml" => {
                    roost_broker::parse_config(body, "edge.toml").expect("edge.toml parses");
                }
                other => panic!("unexpected config {other}"),
            }
        }
    }
    // Apply it the way roost applies anything: through the Kubernetes target.
    let target = roost_agent::targets::kube::KubeTarget::new(
        c.client.clone(),
        KubernetesConfig::default(),
        "store-0042",
    );
    let rendered = roost_agent::git::Rendered {
        revision: "0".repeat(40),
        files: vec![file],
        sealed: Default::default(),
    };
    let plan = target
        .build("roost-system", rendered, &roost_schemas::Policy::default())
        .await
        .expect("deploy/roost.yaml builds");
    let report = target
        .apply(&plan, &[])
        .await
        .expect("deploy/roost.yaml applies");
    assert_eq!(report.changed.len(), docs.len(), "every object created");
    assert!(c
        .get("apps", "v1", "Deployment", Some("roost-system"), "roost")
        .await
        .is_some());
}

/// `roost up --target kubernetes` against the cluster of KUBECONFIG (here the test API
/// server): every store converges in its own namespace prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roost_up_target_kubernetes() {
    let c = Cluster::double().await;
    let dir = tempfile::tempdir().expect("tmp");
    let kubeconfig = c.kubeconfig.as_ref().expect("kubeconfig");
    let out = roost_up_once(
        &["--stores", "2", "--target", "kubernetes", "--timeout", "60"],
        dir.path(),
        &[("KUBECONFIG", kubeconfig.as_os_str())],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("converged 2/2 in ")),
        "{stdout}"
    );
    for store in ["store-0001", "store-0002"] {
        let ns = format!("{store}-kitchen");
        assert!(
            c.get("", "v1", "ConfigMap", Some(&ns), "kitchen-display")
                .await
                .is_some(),
            "{ns} has the config map"
        );
        assert!(
            c.get("apps", "v1", "Deployment", Some(&ns), "kitchen-display")
                .await
                .is_some(),
            "{ns} has the deployment"
        );
    }
}

/// `deploy/rbac.yaml` is exactly what `roost agent rbac` prints for the agent configuration in
/// `deploy/roost.yaml` (so the RBAC cannot drift from the policy), and grants no Secret outside
/// the allowed namespace.
#[test]
fn deploy_rbac_is_the_commands_output_for_deploys_agent_config() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/roost.yaml"))
            .expect("deploy/roost.yaml");
    let file = roost_agent::git::ManifestFile {
        path: "roost.yaml".into(),
        data: text.into_bytes(),
    };
    let docs = roost_agent::git::parse_documents(&file).expect("YAML");
    let agent_toml = docs
        .iter()
        .find_map(|d| d["data"]["agent.toml"].as_str())
        .expect("the agent ConfigMap");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, agent_toml).expect("write");
    let out = std::process::Command::new(harness::roost_bin())
        .args(["agent", "rbac", "--config"])
        .arg(&cfg)
        .args([
            "--service-account",
            "roost-agent",
            "--namespace",
            "roost-system",
        ])
        .output()
        .expect("roost agent rbac");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac.yaml"))
            .expect("deploy/rbac.yaml");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        shipped,
        "regenerate: roost agent rbac --config agent.toml --service-account roost-agent --namespace roost-system > deploy/rbac.yaml"
    );
    let rbac = roost_agent::git::parse_documents(&roost_agent::git::ManifestFile {
        path: "rbac.yaml".into(),
        data: shipped.into_bytes(),
    })
    .expect("YAML");
    for d in &rbac {
        let secrets = d["rules"].to_string().contains("secrets");
        if secrets {
            assert_eq!(d["kind"], "Role", "Secrets only in a namespace's Role: {d}");
            assert_eq!(d["metadata"]["namespace"], "apps");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Least privilege against a real API server with RBAC.

/// Whether the client's identity may do `verb` (SelfSubjectAccessReview).
async fn can(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: ns.map(str::to_owned),
                name: name.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&Default::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    r.status.is_some_and(|s| s.allowed)
}

/// The generated RBAC applied as admin for a fresh ServiceAccount; returns the agent's
/// kubeconfig (a token of that ServiceAccount) and its client.
async fn agent_identity(
    c: &Cluster,
    policy: &KubernetesConfig,
    sa_ns: &str,
    name: &str,
) -> (PathBuf, kube::Client) {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use roost_agent::targets::rbac;
    let admin = PatchParams::apply("roost-test").force();
    c.api("", "v1", "Namespace", None)
        .patch(
            sa_ns,
            &admin,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": sa_ns}}),
            ),
        )
        .await
        .expect("agent namespace");
    c.api("", "v1", "ServiceAccount", Some(sa_ns))
        .patch("roost-agent", &admin, &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "roost-agent", "namespace": sa_ns}})))
        .await
        .expect("service account");
    let subject = rbac::Subject::ServiceAccount {
        name: "roost-agent".into(),
        namespace: sa_ns.into(),
    };
    let opts = rbac::RbacOptions {
        name: name.into(),
        cluster_wide: false,
    };
    for o in rbac::rbac_for(policy, &subject, &opts).expect("rbac") {
        let v = o.to_value();
        let (group, version) = match v["apiVersion"].as_str().unwrap_or_default().split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), "v1".to_owned()),
        };
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        let ns = v["metadata"]["namespace"].as_str().map(str::to_owned);
        let oname = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        c.api(&group, &version, &kind, ns.as_deref())
            .patch(&oname, &admin, &Patch::Apply(&v))
            .await
            .unwrap_or_else(|e| panic!("apply {kind} {oname}: {e}"));
    }
    let token = Api::<ServiceAccount>::namespaced(c.client.clone(), sa_ns)
        .create_token_request(
            "roost-agent",
            &Default::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("token request")
        .status
        .expect("token")
        .token;
    let admin_kc = kube::config::Kubeconfig::read_from(c.kubeconfig.as_ref().expect("KUBECONFIG"))
        .expect("kubeconfig");
    let cluster = admin_kc.clusters[0].cluster.clone().expect("cluster");
    let kc = c._dir.path().join("agent-kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: agent\n  context: {{cluster: c, user: agent}}\ncurrent-context: agent\n",
            cluster.server.expect("server"),
            cluster.certificate_authority_data.expect("CA data"),
        ),
    )
    .expect("agent kubeconfig");
    let conf = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kc).expect("read"),
        &Default::default(),
    )
    .await
    .expect("config");
    (kc, kube::Client::try_from(conf).expect("client"))
}

/// Requests by `user` in the API server's audit log (`ROOST_AUDIT_LOG`): (all, the 403s).
fn audit(user: &str) -> Option<(usize, Vec<String>)> {
    let path = std::env::var_os("ROOST_AUDIT_LOG")?;
    let text = std::fs::read_to_string(path).expect("audit log");
    let mut n = 0;
    let mut denied = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if e["user"]["username"] != user {
            continue;
        }
        n += 1;
        if e["responseStatus"]["code"] == 403 {
            denied.push(format!(
                "{} {}",
                e["verb"].as_str().unwrap_or_default(),
                e["requestURI"].as_str().unwrap_or_default()
            ));
        }
    }
    Some((n, denied))
}

/// The agent with exactly the RBAC `roost agent rbac` prints for its policy: it may do what
/// the policy allows and nothing else (checked with SelfSubjectAccessReview), and converges,
/// prunes and removes the sample app with that identity alone, without one 403.
async fn scenario_least_privilege(cluster_scoped: bool) {
    let c = Cluster::real().await;
    let id = c.prefix.trim_end_matches('-').to_owned();
    let (shop, other, sa_ns) = (c.ns("shop"), c.ns("other"), c.ns("roost-system"));
    let group = format!("{id}.widgets.roost.dev");
    let widget = format!("{group}/Widget");
    let mut kinds = vec!["ConfigMap", "Service", "Deployment"];
    if cluster_scoped {
        kinds.extend(["Namespace", "CustomResourceDefinition", widget.as_str()]);
    }
    let kinds: Vec<String> = kinds.into_iter().map(str::to_owned).collect();
    let prefix = c.prefix.clone();
    let set_policy = |k: &mut KubernetesConfig| {
        k.namespace_prefix = Some(prefix.clone());
        k.default_namespace = Some("shop".into());
        k.allowed_namespaces = vec!["shop".into()];
        k.allowed_kinds = kinds.clone();
        k.allow_cluster_scoped = Some(cluster_scoped);
    };
    let mut policy = KubernetesConfig::default();
    set_policy(&mut policy);
    let role = format!("roost-agent-{id}");
    let (kc, agent) = agent_identity(&c, &policy, &sa_ns, &role).await;

    // What the policy allows.
    for verb in ["get", "list", "watch", "create", "patch", "delete"] {
        for (g, r) in [
            ("", "configmaps"),
            ("", "services"),
            ("apps", "deployments"),
        ] {
            assert!(
                can(&agent, verb, g, r, Some(&shop), None).await,
                "{verb} {r} in {shop}"
            );
        }
    }
    // And nothing more.
    // (verb, group, resource, namespace, name)
    type Check<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let denied: Vec<Check> = vec![
        ("get", "", "secrets", Some("kube-system"), None),
        ("list", "", "secrets", Some("kube-system"), None),
        ("list", "", "secrets", Some(&shop), None),
        ("get", "", "secrets", Some(&sa_ns), None),
        ("watch", "", "secrets", None, None),
        ("create", "", "configmaps", Some(&other), None),
        ("patch", "", "configmaps", Some("default"), None),
        ("delete", "apps", "deployments", Some("kube-system"), None),
        ("list", "", "configmaps", None, None),
        ("create", "", "pods", Some(&shop), None),
        ("create", "", "pods/exec", Some(&shop), None),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
            None,
        ),
        (
            "patch",
            "rbac.authorization.k8s.io",
            "roles",
            Some(&shop),
            None,
        ),
        ("list", "", "namespaces", None, None),
        ("delete", "", "namespaces", None, Some("kube-system")),
        ("create", "", "nodes", None, None),
    ];
    for (verb, g, r, ns, name) in &denied {
        assert!(
            !can(&agent, verb, g, r, *ns, *name).await,
            "must not {verb} {r} in {ns:?} {name:?}"
        );
    }
    let crds = "apiextensions.k8s.io";
    if cluster_scoped {
        assert!(
            can(
                &agent,
                "create",
                crds,
                "customresourcedefinitions",
                None,
                None
            )
            .await
        );
        assert!(can(&agent, "patch", "", "namespaces", None, Some(&shop)).await);
        assert!(can(&agent, "watch", "", "namespaces", None, Some(&shop)).await);
        assert!(!can(&agent, "patch", "", "namespaces", None, Some(&other)).await);
        assert!(can(&agent, "patch", &group, "widgets", Some(&shop), None).await);
        assert!(!can(&agent, "patch", &group, "widgets", Some(&other), None).await);
    } else {
        assert!(
            !can(
                &agent,
                "create",
                crds,
                "customresourcedefinitions",
                None,
                None
            )
            .await
        );
        assert!(!can(&agent, "patch", "", "namespaces", None, Some(&shop)).await);
    }

    // The agent with exactly that identity converges, prunes and removes the app.
    let agent_kc = kc.clone();
    let mut s = Scene::new(c, |k| {
        set_policy(k);
        k.kubeconfig = Some(agent_kc);
    })
    .await;
    let mut files = base_files();
    if cluster_scoped {
        files.push((format!("{APP}/a-widget.yaml"), widget_yaml(&group)));
        files.push((format!("{APP}/z-crd.yaml"), crd_yaml(&group)));
    } else {
        files.retain(|(p, _)| !p.ends_with("00-namespace.yaml"));
    }
    let rev1 = s.roll_files(&files, 60).await;
    s.converged(&rev1).await;
    if cluster_scoped {
        assert!(s
            .cluster
            .get(&group, "v1", "Widget", Some(&shop), "w1")
            .await
            .is_some());
    }
    files.retain(|(p, _)| !p.ends_with("service.yaml"));
    let rev2 = s.roll_files(&files, 60).await;
    let pruned = s
        .event("dev.roost.pruned", |e| e.data["revision"] == rev2.as_str())
        .await;
    assert!(
        pruned.data["pruned"].to_string().contains("/Service/"),
        "{}",
        pruned.data
    );
    s.converged(&rev2).await;
    s.tombstone().await;
    s.event("dev.roost.removed", |_| true).await;
    assert!(s
        .cluster
        .get("", "v1", "ConfigMap", Some(&shop), "settings")
        .await
        .is_none());
    let user = format!("system:serviceaccount:{sa_ns}:roost-agent");
    match audit(&user) {
        Some((n, forbidden)) => {
            eprintln!("kube least privilege (cluster_scoped={cluster_scoped}): {n} requests by {user}, {} forbidden: {forbidden:?}", forbidden.len());
            assert!(n > 0, "the audit log has the agent's requests");
            assert!(
                forbidden.is_empty(),
                "the agent needed no right it lacks: {forbidden:?}"
            );
        }
        None => eprintln!("kube least privilege: ROOST_AUDIT_LOG not set, audit log not checked"),
    }
    for kind in ["ClusterRoleBinding", "ClusterRole"] {
        let _ = s
            .cluster
            .api("rbac.authorization.k8s.io", "v1", kind, None)
            .delete(&role, &Default::default())
            .await;
    }
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster"]
async fn least_privilege_rbac_from_policy_namespaced_only() {
    scenario_least_privilege(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster"]
async fn least_privilege_rbac_from_policy_with_cluster_scoped_and_a_crd() {
    scenario_least_privilege(true).await;
}
