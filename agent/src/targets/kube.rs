//! The Kubernetes target: server-side apply (field manager `roost`) of a revision's objects,
//! in dependency order, writing only objects whose manifest changed; prune strictly from the
//! agent's inventory, and only objects roost applied for this store and deployment (never one
//! another controller owns); health by kstatus rules; drift by comparing each live object with
//! a server-side-apply dry run of the desired one, so fields roost does not manage are not
//! drift, with watches scoped to the plan's namespaces triggering the comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, ApiCapabilities, Scope as KScope};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt as _;
use roost_schemas::Policy;
use serde_json::{json, Value};
use tokio::sync::{mpsc, RwLock};
use tracing::{debug, info, warn};

use super::{
    digest_json, ApplyReport, DriftReport, Health, InventoryEntry, ObjectRef, TargetError,
};
use crate::config::KubernetesConfig;
use crate::git::{is_manifest, parse_documents, Rendered};

/// Label marking roost's objects.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the deployment.
pub const DEPLOYMENT_LABEL: &str = "roost.dev/deployment";
/// Label naming the store, so that stores sharing a cluster never touch each other's objects.
pub const STORE_LABEL: &str = "roost.dev/store";
/// Field manager.
pub const FIELD_MANAGER: &str = "roost";

/// One object of a plan, resolved against discovery. `Debug` leaves the object's content out
/// (a Secret's data).
#[derive(Clone)]
pub struct KubeObject {
    /// The object as it is applied (labels and namespace set).
    pub obj: Value,
    /// API resource.
    pub ar: ApiResource,
    /// Namespaced?
    pub namespaced: bool,
    /// Namespace (namespaced objects).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Where it came from (`file#doc`).
    pub origin: String,
    /// Digest of `obj`.
    pub digest: String,
    /// Its kind is defined by a CRD of the same revision (discovered after applying it).
    pub from_revision_crd: bool,
    /// It came from a sealed file: its digest is keyed, and drift names its top-level fields
    /// only.
    pub sealed: bool,
}

impl std::fmt::Debug for KubeObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeObject")
            .field("object", &self.object_ref())
            .field("origin", &self.origin)
            .field("digest", &self.digest)
            .field("sealed", &self.sealed)
            .finish_non_exhaustive()
    }
}

impl KubeObject {
    /// The object's reference.
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::Kube {
            group: self.ar.group.clone(),
            version: self.ar.version.clone(),
            kind: self.ar.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// A revision resolved for the cluster: its objects in apply order.
#[derive(Debug, Clone)]
pub struct KubePlan {
    /// Deployment.
    pub deployment: String,
    /// Commit.
    pub revision: String,
    /// Objects, Namespaces and CRDs first, then cluster-scoped, then namespaced.
    pub objects: Vec<KubeObject>,
    /// The rollout's policy.
    pub policy: Policy,
}

impl KubePlan {
    /// Namespaces the plan's namespaced objects are in.
    pub fn namespaces(&self) -> BTreeSet<String> {
        self.objects
            .iter()
            .filter_map(|o| o.namespace.clone())
            .collect()
    }
}

/// Apply order: Namespaces and CRDs first, then other cluster-scoped, then namespaced.
fn apply_rank(d: &KubeObject) -> u8 {
    match (d.ar.group.as_str(), d.ar.kind.as_str()) {
        ("", "Namespace") => 0,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
        _ if !d.namespaced => 2,
        _ => 3,
    }
}

/// Delete order for prune: namespaced first, then cluster-scoped, Namespaces and CRDs last.
fn prune_rank(group: &str, kind: &str, namespaced: bool) -> u8 {
    match (group, kind) {
        ("", "Namespace") => 3,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 2,
        _ if !namespaced => 1,
        _ => 0,
    }
}

/// Whether a live object is one roost applied for this store and deployment: labelled for
/// them, written by roost's field manager with server-side apply, and not controlled by any
/// other object (the endpoints controller copies a Service's labels onto its Endpoints and
/// EndpointSlices; a Deployment's ReplicaSets carry its template labels).
pub fn is_ours(o: &DynamicObject, deployment: &str, store: &str) -> bool {
    let labels = o.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(DEPLOYMENT_LABEL) != Some(deployment)
        || label(STORE_LABEL) != Some(store)
        || label(MANAGED_BY) != Some("roost")
    {
        return false;
    }
    let controlled = o
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.controller == Some(true)));
    let applied_by_roost = o.metadata.managed_fields.as_ref().is_some_and(|mf| {
        mf.iter().any(|f| {
            f.manager.as_deref() == Some(FIELD_MANAGER) && f.operation.as_deref() == Some("Apply")
        })
    });
    !controlled && applied_by_roost
}

/// Why a live object must not be taken over by this store's `deployment`: it carries roost's
/// labels for another deployment or store, or another object controls it. An object without
/// roost's labels and without a controller is adopted (as `kubectl apply` would).
pub fn owned_elsewhere(o: &DynamicObject, deployment: &str, store: &str) -> Option<String> {
    let labels = o.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    if label(MANAGED_BY) == Some("roost") {
        let (d, s) = (label(DEPLOYMENT_LABEL), label(STORE_LABEL));
        if d.is_some_and(|d| d != deployment) || s.is_some_and(|s| s != store) {
            return Some(format!(
                "belongs to roost deployment {} of store {}",
                d.unwrap_or("?"),
                s.unwrap_or("?")
            ));
        }
    }
    let controller = o
        .metadata
        .owner_references
        .as_ref()
        .and_then(|refs| refs.iter().find(|r| r.controller == Some(true)));
    controller.map(|r| format!("is controlled by {} {}", r.kind, r.name))
}

/// The Kubernetes target.
pub struct KubeTarget {
    client: kube::Client,
    cfg: KubernetesConfig,
    store: String,
    max_objects: usize,
    /// Discovery cache by `group/version/Kind`.
    cache: RwLock<HashMap<String, (ApiResource, ApiCapabilities)>>,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn split_api_version(av: &str) -> (String, String) {
    match av.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), av.to_owned()),
    }
}

fn kube_msg(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}): {}", s.reason, s.code, s.message),
        other => other.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Sorts a kube-rs error: the server refusing an object is `Refused` (a problem of the
/// object); anything else (connection, timeout, 5xx, 429) is the API server being unavailable.
fn classify(object: String, e: kube::Error) -> TargetError {
    match &e {
        kube::Error::Api(s) if s.code < 500 && s.code != 429 => TargetError::Refused {
            object,
            message: kube_msg(&e),
            source: Some(e),
        },
        _ => TargetError::Unavailable {
            what: object,
            source: e,
        },
    }
}

impl KubeTarget {
    /// A target using `client` with the given policy.
    pub fn new(client: kube::Client, cfg: KubernetesConfig, store: &str) -> KubeTarget {
        KubeTarget {
            client,
            cfg,
            store: store.to_owned(),
            max_objects: crate::config::Limits::default().max_objects,
            cache: RwLock::default(),
        }
    }

    /// A client from in-cluster credentials or `KUBECONFIG`.
    pub async fn from_env(cfg: KubernetesConfig, store: &str) -> Result<KubeTarget, TargetError> {
        let err = |what: String| {
            move |e: Box<dyn std::error::Error + Send + Sync>| TargetError::Client {
                what: what.clone(),
                source: e,
            }
        };
        let client = match &cfg.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| err(path.display().to_string())(Box::new(e)))?;
                let conf = kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| err(path.display().to_string())(Box::new(e)))?;
                kube::Client::try_from(conf).map_err(|e| err("client".into())(Box::new(e)))?
            }
            None => kube::Client::try_default()
                .await
                .map_err(|e| err("in-cluster or KUBECONFIG".into())(Box::new(e)))?,
        };
        Ok(KubeTarget::new(client, cfg, store))
    }

    /// Limits the objects of one revision (default: the agent's `limits.max_objects` default).
    pub fn with_max_objects(mut self, n: usize) -> KubeTarget {
        self.max_objects = n;
        self
    }

    fn default_namespace(&self) -> String {
        self.cfg
            .default_namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    }

    fn prefixed(&self, ns: &str) -> String {
        self.cfg.prefixed(ns)
    }

    fn namespace_allowed(&self, ns: &str) -> bool {
        self.cfg.allowed_namespaces.is_empty()
            || self
                .cfg
                .allowed_namespaces
                .iter()
                .any(|a| a == ns || self.prefixed(a) == ns)
    }

    fn cluster_scoped_allowed(&self) -> bool {
        self.cfg.cluster_scoped_allowed()
    }

    async fn resolve(
        &self,
        group: &str,
        version: &str,
        kind: &str,
        refresh: bool,
    ) -> Result<Option<(ApiResource, ApiCapabilities)>, TargetError> {
        let key = format!("{group}/{version}/{kind}");
        if !refresh {
            if let Some(v) = self.cache.read().await.get(&key) {
                return Ok(Some(v.clone()));
            }
        }
        let gvk = GroupVersionKind::gvk(group, version, kind);
        match discovery::pinned_kind(&self.client, &gvk).await {
            Ok(v) => {
                self.cache.write().await.insert(key, v.clone());
                Ok(Some(v))
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Discovery(_)) => Ok(None),
            // Discovery failing otherwise is the API server's problem, not the revision's.
            Err(e) => Err(TargetError::Unavailable {
                what: format!("discovery of {key}"),
                source: e,
            }),
        }
    }

    fn check_kind(&self, group: &str, kind: &str) -> Result<(), String> {
        match self.cfg.kind_denied(group, kind) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Parses, checks (policy, limits) and resolves every object of a revision; applies
    /// nothing. Unknown kinds are invalid; a failing discovery is the cluster's problem.
    pub async fn build(
        &self,
        deployment: &str,
        rendered: Rendered,
        policy: &Policy,
    ) -> Result<KubePlan, TargetError> {
        let mut docs = Vec::new();
        for f in rendered.files.iter().filter(|f| is_manifest(&f.path)) {
            let parsed =
                parse_documents(f).map_err(|e| TargetError::InvalidManifest(e.to_string()))?;
            for (i, d) in parsed.into_iter().enumerate() {
                docs.push((format!("{}#{}", f.path, i + 1), d, f.path.as_str()));
            }
        }
        if docs.len() > self.max_objects {
            return Err(TargetError::TooLarge(format!(
                "{} objects, limit {}",
                docs.len(),
                self.max_objects
            )));
        }
        // Kinds defined by CRDs in this same revision, with their scope.
        let mut crd_kinds: HashMap<(String, String), bool> = HashMap::new();
        for (_, d, _) in &docs {
            if d["kind"] == "CustomResourceDefinition" {
                let group = d["spec"]["group"].as_str().unwrap_or_default().to_owned();
                let kind = d["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                crd_kinds.insert((group, kind), d["spec"]["scope"] != "Cluster");
            }
        }
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (origin, mut d, path) in docs {
            let bad = |what: &str| TargetError::InvalidManifest(format!("{origin}: {what}"));
            if !d.is_object() || !d["metadata"].is_object() {
                return Err(bad("not an object with metadata"));
            }
            let av = d["apiVersion"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing apiVersion"))?
                .to_owned();
            let kind = d["kind"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing kind"))?
                .to_owned();
            let name = d["metadata"]["name"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing metadata.name"))?
                .to_owned();
            let (group, version) = split_api_version(&av);
            self.check_kind(&group, &kind)
                .map_err(|m| TargetError::PolicyDenied(format!("{origin}: {m}")))?;
            let (ar, namespaced, from_revision_crd) =
                match self.resolve(&group, &version, &kind, false).await? {
                    Some((ar, caps)) => (ar, caps.scope == KScope::Namespaced, false),
                    None => match crd_kinds.get(&(group.clone(), kind.clone())) {
                        Some(ns) => (
                            ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, &kind)),
                            *ns,
                            true,
                        ),
                        None => {
                            return Err(bad(&format!(
                                "unknown kind {av}/{kind} (not served by the cluster)"
                            )))
                        }
                    },
                };
            let namespace = if namespaced {
                let ns = d["metadata"]["namespace"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| self.default_namespace());
                let ns = self.prefixed(&ns);
                if !self.namespace_allowed(&ns) {
                    return Err(TargetError::PolicyDenied(format!(
                        "{origin}: namespace {ns} is not allowed"
                    )));
                }
                d["metadata"]["namespace"] = json!(ns);
                Some(ns)
            } else {
                if !self.cluster_scoped_allowed() {
                    return Err(TargetError::PolicyDenied(format!(
                        "{origin}: cluster-scoped {kind} is not allowed"
                    )));
                }
                if let Some(m) = d["metadata"].as_object_mut() {
                    m.remove("namespace");
                }
                None
            };
            let name = if group.is_empty() && kind == "Namespace" {
                let n = self.prefixed(&name);
                if !self.namespace_allowed(&n) {
                    return Err(TargetError::PolicyDenied(format!(
                        "{origin}: namespace {n} is not allowed"
                    )));
                }
                d["metadata"]["name"] = json!(n);
                n
            } else {
                name
            };
            // Ownership labels only: constant per deployment, so they never cause a write.
            // The revision lives in the agent's inventory, status and events, not on objects
            // (an annotation change bumps a Deployment's generation and rolls its ReplicaSets).
            let mut labels = d["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            labels.insert(MANAGED_BY.into(), json!("roost"));
            labels.insert(DEPLOYMENT_LABEL.into(), json!(deployment));
            labels.insert(STORE_LABEL.into(), json!(self.store));
            d["metadata"]["labels"] = Value::Object(labels);
            // An object of a sealed file gets a digest keyed with the store's identity: the
            // inventory (in the outbox database) must not let anyone test guesses of a secret.
            let keyed = rendered.sealed.digest(path, d.to_string().as_bytes());
            let object = KubeObject {
                sealed: keyed.is_some(),
                digest: keyed.unwrap_or_else(|| digest_json(&d)),
                obj: d,
                ar,
                namespaced,
                namespace,
                name,
                origin,
                from_revision_crd,
            };
            let key = object.object_ref();
            if !seen.insert(key.clone()) {
                return Err(TargetError::InvalidManifest(format!(
                    "{}: duplicate object {key}",
                    object.origin
                )));
            }
            out.push(object);
        }
        out.sort_by(|a, b| {
            apply_rank(a)
                .cmp(&apply_rank(b))
                .then_with(|| a.object_ref().cmp(&b.object_ref()))
        });
        // Ownership, for the whole revision before anything is written: a revision must not
        // take over another deployment's (or store's, or a controller's) objects.
        for o in out.iter().filter(|o| !o.from_revision_crd) {
            let key = o.object_ref();
            let live = self
                .api(&o.ar, o.namespaced, o.namespace.as_deref())
                .get_opt(&o.name)
                .await
                .map_err(|e| classify(format!("{key} ({})", o.origin), e))?;
            if let Some(why) = live
                .as_ref()
                .and_then(|l| owned_elsewhere(l, deployment, &self.store))
            {
                return Err(TargetError::PolicyDenied(format!(
                    "{}: {key} {why}",
                    o.origin
                )));
            }
        }
        Ok(KubePlan {
            deployment: deployment.to_owned(),
            revision: rendered.revision,
            objects: out,
            policy: policy.clone(),
        })
    }

    /// One entry per object, with its manifest digest.
    pub fn entries(&self, plan: &KubePlan) -> Vec<InventoryEntry> {
        plan.objects
            .iter()
            .map(|o| InventoryEntry {
                object: o.object_ref(),
                digest: o.digest.clone(),
            })
            .collect()
    }

    fn api(&self, ar: &ApiResource, namespaced: bool, ns: Option<&str>) -> Api<DynamicObject> {
        match (namespaced, ns) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, ar),
            _ => Api::all_with(self.client.clone(), ar),
        }
    }

    fn params(&self, dry_run: bool) -> PatchParams {
        let mut p = PatchParams::apply(FIELD_MANAGER);
        if self.cfg.force_conflicts.unwrap_or(true) {
            p = p.force();
        }
        if dry_run {
            p = p.dry_run();
        }
        p
    }

    async fn apply_one(&self, d: &KubeObject, dry_run: bool) -> Result<DynamicObject, kube::Error> {
        self.api(&d.ar, d.namespaced, d.namespace.as_deref())
            .patch(&d.name, &self.params(dry_run), &Patch::Apply(&d.obj))
            .await
    }

    async fn wait_crd_established(&self, name: &str) -> Result<(), TargetError> {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
        ));
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        for _ in 0..300 {
            if let Ok(o) = api.get(name).await {
                if condition_true(&o.data, "Established") {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TargetError::NotReady(format!(
            "CustomResourceDefinition {name} was not Established within 30 s"
        )))
    }

    /// Applies the plan in order. An object whose manifest digest equals the inventory's and
    /// that exists is not written; otherwise it is applied, and counts as changed when the
    /// server stored a new version (a no-op apply keeps the resourceVersion).
    pub async fn apply(
        &self,
        plan: &KubePlan,
        inventory: &[InventoryEntry],
    ) -> Result<ApplyReport, TargetError> {
        let known: HashMap<&ObjectRef, &str> = inventory
            .iter()
            .map(|e| (&e.object, e.digest.as_str()))
            .collect();
        let mut changed = Vec::new();
        let mut unchanged = 0;
        for d in &plan.objects {
            let mut d = d.clone();
            let key = d.object_ref();
            if d.from_revision_crd {
                // A custom resource whose CRD came in this revision: discover it now.
                for _ in 0..50 {
                    if let Some((ar, _)) = self
                        .resolve(&d.ar.group, &d.ar.version, &d.ar.kind, true)
                        .await?
                    {
                        d.ar = ar;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let api = self.api(&d.ar, d.namespaced, d.namespace.as_deref());
            let before = api
                .get_opt(&d.name)
                .await
                .map_err(|e| classify(format!("{key} ({})", d.origin), e))?;
            let same_manifest = known.get(&key).is_some_and(|dg| *dg == d.digest);
            if same_manifest && before.is_some() {
                unchanged += 1;
            } else {
                let after = self
                    .apply_one(&d, false)
                    .await
                    .map_err(|e| classify(format!("{key} ({})", d.origin), e))?;
                let rv = |o: &DynamicObject| o.metadata.resource_version.clone();
                if before.as_ref().is_none_or(|b| rv(b) != rv(&after)) {
                    changed.push(key);
                } else {
                    unchanged += 1;
                }
            }
            if d.ar.kind == "CustomResourceDefinition" {
                self.wait_crd_established(&d.name).await?;
            }
        }
        info!(deployment = %plan.deployment, objects = plan.objects.len(), changed = changed.len(), "applied");
        Ok(ApplyReport { changed, unchanged })
    }

    /// Deletes inventory objects that are still roost's (namespaced first, Namespaces and
    /// CRDs last). An object that is gone, re-labelled, or controlled by another object is
    /// skipped: roost only deletes what it applied.
    pub async fn prune(
        &self,
        deployment: &str,
        stale: &[ObjectRef],
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let mut items: Vec<&ObjectRef> = stale
            .iter()
            .filter(|r| matches!(r, ObjectRef::Kube { .. }))
            .collect();
        items.sort_by_key(|r| match r {
            ObjectRef::Kube {
                group,
                kind,
                namespace,
                ..
            } => (prune_rank(group, kind, namespace.is_some()), (*r).clone()),
            ObjectRef::File { .. } => (0, (*r).clone()),
        });
        let mut deleted = Vec::new();
        for r in items {
            let ObjectRef::Kube {
                group,
                version,
                kind,
                namespace,
                name,
            } = r
            else {
                continue;
            };
            let Some((ar, _)) = self.resolve(group, version, kind, false).await? else {
                continue; // the kind is gone (its CRD was removed): nothing to delete
            };
            let api = self.api(&ar, namespace.is_some(), namespace.as_deref());
            match api.get_opt(name).await {
                Ok(Some(o)) if is_ours(&o, deployment, &self.store) => {}
                Ok(Some(_)) => {
                    warn!(object = %r, "not pruning: no longer roost's for this store and deployment");
                    continue;
                }
                Ok(None) => continue,
                Err(e) => return Err(classify(r.to_string(), e)),
            }
            match api.delete(name, &DeleteParams::background()).await {
                Ok(_) => deleted.push(r.clone()),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(classify(r.to_string(), e)),
            }
        }
        Ok(deleted)
    }

    /// Recovers a lost inventory from the cluster: objects labelled for this store and
    /// deployment that roost applied (see [`is_ours`]). Listed only where the policy lets
    /// roost act: the allowed namespaces (or, without that limit, the cluster), and
    /// cluster-scoped kinds only when they are allowed.
    pub async fn recover(
        &self,
        deployment: &str,
        plan: Option<&KubePlan>,
    ) -> Result<Vec<ObjectRef>, TargetError> {
        let disc = discovery::Discovery::new(self.client.clone())
            .run()
            .await
            .map_err(|e| TargetError::Unavailable {
                what: "discovery".into(),
                source: e,
            })?;
        let lp = ListParams::default().labels(&format!(
            "{DEPLOYMENT_LABEL}={deployment},{STORE_LABEL}={},{MANAGED_BY}=roost",
            self.store
        ));
        let mut namespaces: Option<BTreeSet<String>> = (!self.cfg.allowed_namespaces.is_empty())
            .then(|| {
                self.cfg
                    .allowed_namespaces
                    .iter()
                    .map(|n| self.prefixed(n))
                    .collect()
            });
        if let (Some(ns), Some(p)) = (namespaces.as_mut(), plan) {
            ns.extend(p.namespaces());
        }
        let mut out = BTreeSet::new();
        for group in disc.groups() {
            for (ar, caps) in group.recommended_resources() {
                if !caps.supports_operation(discovery::verbs::LIST) {
                    continue;
                }
                let namespaced = caps.scope == KScope::Namespaced;
                if !namespaced && !self.cluster_scoped_allowed() {
                    continue;
                }
                // Only kinds the policy lets roost apply: it never made others, and listing
                // them would need rights its RBAC (`roost agent rbac`) does not grant.
                if self.check_kind(&ar.group, &ar.kind).is_err() {
                    continue;
                }
                let is_namespace_kind = ar.group.is_empty() && ar.kind == "Namespace";
                let apis: Vec<(Api<DynamicObject>, ListParams)> = match (&namespaces, namespaced) {
                    (Some(list), true) => list
                        .iter()
                        .map(|ns| {
                            (
                                Api::namespaced_with(self.client.clone(), ns, &ar),
                                lp.clone(),
                            )
                        })
                        .collect(),
                    // Namespaces by name: RBAC can limit a list to `resourceNames` only
                    // with a `metadata.name` field selector.
                    (Some(list), false) if is_namespace_kind => list
                        .iter()
                        .map(|ns| {
                            (
                                Api::all_with(self.client.clone(), &ar),
                                lp.clone().fields(&format!("metadata.name={ns}")),
                            )
                        })
                        .collect(),
                    _ => vec![(Api::all_with(self.client.clone(), &ar), lp.clone())],
                };
                for (api, lp) in apis {
                    let list = match api.list(&lp).await {
                        Ok(l) => l,
                        Err(e) if matches!(&e, kube::Error::Api(s) if s.code < 500) => continue,
                        Err(e) => return Err(classify(format!("list {}", ar.plural), e)),
                    };
                    for o in list {
                        if !is_ours(&o, deployment, &self.store) {
                            continue;
                        }
                        out.insert(ObjectRef::Kube {
                            group: ar.group.clone(),
                            version: ar.version.clone(),
                            kind: ar.kind.clone(),
                            namespace: o.metadata.namespace.clone(),
                            name: o.metadata.name.clone().unwrap_or_default(),
                        });
                    }
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    /// kstatus health of every object of the plan.
    pub async fn health(&self, plan: &KubePlan) -> Result<Health, TargetError> {
        let mut not_ready = Vec::new();
        for d in &plan.objects {
            let key = d.object_ref();
            match self
                .api(&d.ar, d.namespaced, d.namespace.as_deref())
                .get_opt(&d.name)
                .await
            {
                Ok(Some(o)) => {
                    if let Some(why) = kstatus(&d.ar.group, &d.ar.kind, &o) {
                        not_ready.push(format!("{key}: {why}"));
                    }
                }
                Ok(None) => not_ready.push(format!("{key}: not found")),
                Err(e) => return Err(classify(key.to_string(), e)),
            }
        }
        Ok(Health {
            ready: not_ready.is_empty(),
            not_ready,
            reason: None,
        })
    }

    /// Live objects against server-side-apply dry runs of the plan's objects.
    pub async fn drift(&self, plan: &KubePlan) -> Result<Option<DriftReport>, TargetError> {
        let mut items = Vec::new();
        for d in &plan.objects {
            let key = d.object_ref();
            let api = self.api(&d.ar, d.namespaced, d.namespace.as_deref());
            // The live read and the dry run are two requests: if something else (a
            // controller) wrote the object in between, they describe different versions and
            // would show a difference that is not drift. Compare only matching versions.
            let mut attempt = 0;
            let (live, dry) = loop {
                attempt += 1;
                let live = match api.get_opt(&d.name).await {
                    Ok(Some(o)) => o,
                    Ok(None) => break (None, None),
                    Err(e) => return Err(classify(key.to_string(), e)),
                };
                let dry = self
                    .apply_one(d, true)
                    .await
                    .map_err(|e| classify(format!("dry run {key}"), e))?;
                if dry.metadata.resource_version == live.metadata.resource_version || attempt >= 3 {
                    break (Some(live), Some(dry));
                }
            };
            let (Some(live), Some(dry)) = (live, dry) else {
                items.push(format!("{key}: deleted"));
                continue;
            };
            let paths = redact_paths(
                diff_paths(&comparable(&live), &comparable(&dry)),
                d.sealed || (d.ar.group.is_empty() && d.ar.kind == "Secret"),
            );
            if !paths.is_empty() {
                items.push(format!("{key}: {}", paths.join(", ")));
            }
        }
        debug!(deployment = %plan.deployment, drift = !items.is_empty(), "drift check");
        Ok((!items.is_empty()).then_some(DriftReport { items }))
    }

    /// Watches on the deployment's labels, one per kind of the plan, scoped to the plan's
    /// namespaces (cluster-scoped kinds: the cluster).
    pub fn watch(&self, plan: &KubePlan) -> Option<mpsc::Receiver<()>> {
        let (tx, rx) = mpsc::channel(1);
        let selector = format!(
            "{DEPLOYMENT_LABEL}={},{STORE_LABEL}={}",
            plan.deployment, self.store
        );
        // (group, version, kind, namespace, name): the name only for Namespaces, watched one
        // by one with a `metadata.name` field selector so that RBAC can limit the agent to
        // its own namespaces (`resourceNames` apply to list and watch only that way).
        type Scope = (String, String, String, Option<String>, Option<String>);
        let mut scopes: BTreeMap<Scope, ApiResource> = BTreeMap::new();
        for o in &plan.objects {
            let by_name = o.ar.group.is_empty() && o.ar.kind == "Namespace";
            scopes
                .entry((
                    o.ar.group.clone(),
                    o.ar.version.clone(),
                    o.ar.kind.clone(),
                    o.namespace.clone(),
                    by_name.then(|| o.name.clone()),
                ))
                .or_insert_with(|| o.ar.clone());
        }
        for ((_, _, _, ns, name), ar) in scopes {
            let api: Api<DynamicObject> = match &ns {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
                None => Api::all_with(self.client.clone(), &ar),
            };
            let tx = tx.clone();
            let mut cfg = watcher::Config::default().labels(&selector);
            if let Some(name) = &name {
                cfg = cfg.fields(&format!("metadata.name={name}"));
            }
            tokio::spawn(async move {
                let mut stream = watcher(api, cfg).default_backoff().boxed();
                loop {
                    let ev = tokio::select! {
                        _ = tx.closed() => break,
                        ev = stream.next() => match ev { Some(ev) => ev, None => break },
                    };
                    match ev {
                        Ok(watcher::Event::Apply(_))
                        | Ok(watcher::Event::Delete(_))
                        | Ok(watcher::Event::InitDone) => {
                            let _ = tx.try_send(());
                        }
                        Ok(_) => {}
                        Err(error) => debug!(%error, "watch error (retrying)"),
                    }
                }
            });
        }
        Some(rx)
    }
}

fn condition_true(data: &Value, ty: &str) -> bool {
    condition(data, ty).is_some_and(|c| c["status"] == "True")
}

fn condition<'a>(data: &'a Value, ty: &str) -> Option<&'a Value> {
    data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

fn num(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// kstatus-style readiness: `None` when current, else why not.
pub fn kstatus(group: &str, kind: &str, o: &DynamicObject) -> Option<String> {
    let data = &o.data;
    let st = &data["status"];
    let generation = o.metadata.generation.unwrap_or(0);
    let observed = st["observedGeneration"].as_i64();
    let stale = || {
        observed.is_some_and(|g| g < generation)
            || (observed.is_none()
                && generation > 0
                && matches!(
                    kind,
                    "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
                ))
    };
    match (group, kind) {
        ("apps", "Deployment") => {
            if stale() {
                return Some("status not observed yet".into());
            }
            let want = data["spec"]["replicas"].as_i64().unwrap_or(1);
            let (upd, ready, avail) = (
                num(&st["updatedReplicas"]),
                num(&st["readyReplicas"]),
                num(&st["availableReplicas"]),
            );
            if upd < want || ready < want || avail < want {
                return Some(format!(
                    "{avail}/{want} available, {upd} updated, {ready} ready"
                ));
            }
            // Mid-rollout the old ReplicaSets' pods still count: not done until they are gone.
            let total = num(&st["replicas"]);
            if total > upd {
                return Some(format!("{} old replicas pending termination", total - upd));
            }
            if let Some(c) = condition(data, "Progressing") {
                if c["reason"] == "ProgressDeadlineExceeded" {
                    return Some("progress deadline exceeded".into());
                }
            }
            None
        }
        ("apps", "StatefulSet") => {
            if stale() {
                return Some("status not observed yet".into());
            }
            let want = data["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = num(&st["readyReplicas"]);
            if ready < want {
                return Some(format!("{ready}/{want} ready"));
            }
            if st["updateRevision"].is_string() && st["currentRevision"] != st["updateRevision"] {
                return Some("rolling update in progress".into());
            }
            None
        }
        ("apps", "DaemonSet") => {
            if stale() {
                return Some("status not observed yet".into());
            }
            let want = num(&st["desiredNumberScheduled"]);
            let (avail, upd) = (
                num(&st["numberAvailable"]),
                num(&st["updatedNumberScheduled"]),
            );
            (avail < want || upd < want).then(|| format!("{avail}/{want} available, {upd} updated"))
        }
        ("apps", "ReplicaSet") => {
            if stale() {
                return Some("status not observed yet".into());
            }
            let want = data["spec"]["replicas"].as_i64().unwrap_or(1);
            let avail = num(&st["availableReplicas"]);
            (avail < want).then(|| format!("{avail}/{want} available"))
        }
        ("batch", "Job") => {
            if condition_true(data, "Complete") {
                None
            } else if condition_true(data, "Failed") {
                Some("job failed".into())
            } else {
                Some("job not complete".into())
            }
        }
        ("", "PersistentVolumeClaim") => (st["phase"] != "Bound")
            .then(|| format!("phase {}", st["phase"].as_str().unwrap_or("unknown"))),
        ("", "Service") => {
            if data["spec"]["type"] == "LoadBalancer"
                && st["loadBalancer"]["ingress"]
                    .as_array()
                    .is_none_or(|a| a.is_empty())
            {
                Some("load balancer has no ingress yet".into())
            } else {
                None
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            (!condition_true(data, "Established")).then(|| "not established".into())
        }
        _ => {
            if observed.is_some_and(|g| g < generation) {
                return Some("status not observed yet".into());
            }
            match condition(data, "Ready") {
                Some(c) if c["status"] != "True" => Some(format!(
                    "Ready={} {}",
                    c["status"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("")
                )),
                _ => None,
            }
        }
    }
}

/// The parts of an object that apply manages: everything but status and server-set metadata.
fn comparable(o: &DynamicObject) -> Value {
    let mut v = o.data.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
        let mut meta = serde_json::Map::new();
        if let Some(l) = &o.metadata.labels {
            meta.insert("labels".into(), json!(l));
        }
        if let Some(a) = &o.metadata.annotations {
            let a: BTreeMap<&String, &String> = a
                .iter()
                .filter(|(k, _)| {
                    k.as_str() != "kubectl.kubernetes.io/last-applied-configuration"
                        && k.as_str() != "deployment.kubernetes.io/revision"
                })
                .collect();
            meta.insert("annotations".into(), json!(a));
        }
        m.insert("metadata".into(), Value::Object(meta));
    }
    v
}

/// The drift report's fields of a secret object (a Secret, or anything from a sealed file):
/// only the top-level field (`data`), never the keys under it, so a drift event names the
/// object and never its data. Other objects' paths stay as they are.
pub fn redact_paths(paths: Vec<String>, secret: bool) -> Vec<String> {
    if !secret {
        return paths;
    }
    let mut out: Vec<String> = paths
        .into_iter()
        .map(|p| p.split(['.', '[']).next().unwrap_or_default().to_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// JSON paths where two values differ (pure; the drift report's field list).
pub fn diff_paths(live: &Value, want: &Value) -> Vec<String> {
    fn rec(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    rec(
                        &p,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    rec(&format!("{path}[{i}]"), p, q, out);
                }
            }
            _ if a == b => {}
            _ => out.push(if path.is_empty() {
                "<root>".into()
            } else {
                path.to_owned()
            }),
        }
    }
    let mut out = Vec::new();
    rec("", live, want, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("object")
    }

    #[test]
    fn diff_lists_changed_paths() {
        let a = json!({"spec": {"replicas": 1, "template": {"c": [{"image": "a"}]}}, "data": {"x": "1"}});
        let b = json!({"spec": {"replicas": 2, "template": {"c": [{"image": "b"}]}}, "data": {"x": "1"}});
        assert_eq!(
            diff_paths(&a, &b),
            vec!["spec.replicas", "spec.template.c[0].image"]
        );
        assert!(diff_paths(&a, &a).is_empty());
    }

    #[test]
    fn secret_drift_names_fields_never_keys() {
        let live = json!({"data": {"password": "aHVudGVyMg==", "user": "YQ=="}, "metadata": {"labels": {"a": "1"}}, "type": "Opaque"});
        let want = json!({"data": {"password": "c2VjcmV0", "user": "Yg=="}, "metadata": {"labels": {"a": "2"}}, "type": "Opaque"});
        let paths = diff_paths(&live, &want);
        assert_eq!(
            redact_paths(paths.clone(), false),
            vec!["data.password", "data.user", "metadata.labels.a"]
        );
        assert_eq!(redact_paths(paths, true), vec!["data", "metadata"]);
        assert_eq!(
            redact_paths(vec!["items[3].x".into(), "items[0]".into()], true),
            vec!["items"]
        );
    }

    #[test]
    fn kstatus_rules() {
        let dep = |gen: i64, st: Value| {
            obj(
                json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d","generation":gen},"spec":{"replicas":2},"status":st}),
            )
        };
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":1,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":2}))).is_some());
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":2,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":1}))).is_some());
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":2,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":2}))).is_none());
        // Mid-rollout: the new pods are all up, an old one is still running.
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":2,"replicas":3,"updatedReplicas":2,"readyReplicas":3,"availableReplicas":3}))).is_some());
        // replicas: 0 — the server omits zero-valued fields.
        let zero = obj(
            json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d","generation":1},"spec":{"replicas":0},"status":{"observedGeneration":1}}),
        );
        assert!(kstatus("apps", "Deployment", &zero).is_none());
        let pvc = obj(
            json!({"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"p"},"status":{"phase":"Pending"}}),
        );
        assert!(kstatus("", "PersistentVolumeClaim", &pvc).is_some());
        let lb = obj(
            json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},"spec":{"type":"LoadBalancer"},"status":{"loadBalancer":{}}}),
        );
        assert!(kstatus("", "Service", &lb).is_some());
        let cm = obj(json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}));
        assert!(kstatus("", "ConfigMap", &cm).is_none());
        let job = obj(
            json!({"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"j"},"status":{"conditions":[{"type":"Complete","status":"True"}]}}),
        );
        assert!(kstatus("batch", "Job", &job).is_none());
        let cr = obj(
            json!({"apiVersion":"x/v1","kind":"W","metadata":{"name":"w"},"status":{"conditions":[{"type":"Ready","status":"False","message":"m"}]}}),
        );
        assert!(kstatus("x", "W", &cr).is_some());
    }

    #[test]
    fn keys_and_orders() {
        let k = ObjectRef::Kube {
            group: "apps".into(),
            version: "v1".into(),
            kind: "Deployment".into(),
            namespace: Some("ns".into()),
            name: "web".into(),
        };
        assert_eq!(k.to_string(), "apps/v1/Deployment/ns/web");
        assert!(prune_rank("", "Namespace", false) > prune_rank("", "ConfigMap", true));
        assert!(
            prune_rank("apiextensions.k8s.io", "CustomResourceDefinition", false)
                > prune_rank("rbac.authorization.k8s.io", "ClusterRole", false)
        );
    }

    #[test]
    fn ownership_is_labels_plus_roost_apply_without_a_controller() {
        let mk = |extra: Value| {
            let mut v = json!({"apiVersion":"v1","kind":"Endpoints","metadata":{"name":"web","namespace":"ns",
                "labels":{MANAGED_BY:"roost",DEPLOYMENT_LABEL:"shop",STORE_LABEL:"s1"},
                "managedFields":[{"manager":"roost","operation":"Apply","apiVersion":"v1"}]}});
            if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra.as_object()) {
                for (k, x) in e {
                    m.insert(k.clone(), x.clone());
                }
            }
            obj(v)
        };
        assert!(is_ours(&mk(json!({})), "shop", "s1"));
        assert!(!is_ours(&mk(json!({})), "shop", "s2"), "another store");
        assert!(
            !is_ours(&mk(json!({})), "other", "s1"),
            "another deployment"
        );
        // The endpoints controller copies labels, but it writes with Update.
        assert!(!is_ours(
            &mk(
                json!({"managedFields":[{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1"}]})
            ),
            "shop",
            "s1"
        ));
        // An EndpointSlice or ReplicaSet has a controller owner.
        assert!(!is_ours(
            &mk(
                json!({"ownerReferences":[{"apiVersion":"v1","kind":"Service","name":"web","uid":"u","controller":true}]})
            ),
            "shop",
            "s1"
        ));
    }
}
