//! The Kubernetes target: server-side apply (field manager `roost`) of a revision's objects,
//! in dependency order; prune by inventory; health by kstatus rules; drift by comparing each
//! live object with a server-side-apply dry run of the desired one, so fields roost does not
//! manage (an autoscaler's replicas) are not drift, and a watch on roost's labels triggers the
//! comparison within seconds of a change.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, ApiCapabilities, Scope as KScope};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, RwLock};
use tracing::{debug, info, warn};

use super::{ApplyReport, DriftReport, Health, TargetError};
use crate::config::KubernetesConfig;
use crate::git::{is_manifest, parse_documents, Rendered};

/// Label marking roost's objects.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the deployment.
pub const DEPLOYMENT_LABEL: &str = "roost.dev/deployment";
/// Label naming the store, so that stores sharing a cluster never touch each other's objects.
pub const STORE_LABEL: &str = "roost.dev/store";
/// Annotation with the applied revision.
pub const REVISION_ANNOTATION: &str = "roost.dev/revision";
/// Field manager.
pub const FIELD_MANAGER: &str = "roost";

/// One desired object, resolved against discovery.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The object as it will be applied (labels, namespace set).
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
}

impl Desired {
    /// Inventory key `group/version/Kind/namespace/name`.
    pub fn key(&self) -> String {
        item_key(
            &self.ar.group,
            &self.ar.version,
            &self.ar.kind,
            self.namespace.as_deref(),
            &self.name,
        )
    }
}

/// Inventory key of an object.
pub fn item_key(group: &str, version: &str, kind: &str, ns: Option<&str>, name: &str) -> String {
    format!("{group}/{version}/{kind}/{}/{name}", ns.unwrap_or(""))
}

/// Parses an inventory key.
pub fn parse_key(k: &str) -> Option<(String, String, String, Option<String>, String)> {
    let p: Vec<&str> = k.split('/').collect();
    if p.len() != 5 {
        return None;
    }
    let ns = (!p[3].is_empty()).then(|| p[3].to_owned());
    Some((
        p[0].to_owned(),
        p[1].to_owned(),
        p[2].to_owned(),
        ns,
        p[4].to_owned(),
    ))
}

/// Apply order: Namespaces and CRDs first, then other cluster-scoped, then namespaced.
fn apply_rank(d: &Desired) -> u8 {
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

/// The Kubernetes target.
pub struct KubeTarget {
    client: kube::Client,
    cfg: KubernetesConfig,
    store: String,
    max_objects: usize,
    /// Discovery cache by `group/version/Kind`.
    cache: RwLock<HashMap<String, (ApiResource, ApiCapabilities)>>,
    /// Resources per deployment, for watches.
    kinds: std::sync::Mutex<HashMap<String, Vec<(ApiResource, bool)>>>,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget").finish_non_exhaustive()
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

impl KubeTarget {
    /// A target using `client` with the given policy.
    pub fn new(client: kube::Client, cfg: KubernetesConfig, store: &str) -> KubeTarget {
        KubeTarget {
            client,
            cfg,
            store: store.to_owned(),
            max_objects: crate::config::Limits::default().max_objects,
            cache: RwLock::default(),
            kinds: Default::default(),
        }
    }

    /// A client from in-cluster credentials or `KUBECONFIG`.
    pub async fn from_env(cfg: KubernetesConfig, store: &str) -> Result<KubeTarget, TargetError> {
        let err = |e: String| TargetError::Internal(format!("kubernetes client: {e}"));
        let client = match &cfg.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
                let conf = kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| err(e.to_string()))?;
                kube::Client::try_from(conf).map_err(|e| err(e.to_string()))?
            }
            None => kube::Client::try_default()
                .await
                .map_err(|e| err(e.to_string()))?,
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
        match &self.cfg.namespace_prefix {
            Some(p) if !ns.starts_with(p.as_str()) => format!("{p}{ns}"),
            _ => ns.to_owned(),
        }
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
            Err(e) => Err(TargetError::Internal(format!(
                "discovery of {key}: {}",
                kube_msg(&e)
            ))),
        }
    }

    /// Parses, checks and resolves every object of a revision; applies nothing.
    pub async fn plan(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Vec<Desired>, TargetError> {
        // Kinds defined by CRDs in this same revision, with their scope.
        let mut docs = Vec::new();
        for f in rendered.files.iter().filter(|f| is_manifest(&f.path)) {
            let parsed =
                parse_documents(f).map_err(|e| TargetError::InvalidManifest(e.to_string()))?;
            for (i, d) in parsed.into_iter().enumerate() {
                docs.push((format!("{}#{}", f.path, i + 1), d));
            }
        }
        if docs.len() > self.max_objects {
            return Err(TargetError::TooLarge(format!(
                "{} objects, limit {}",
                docs.len(),
                self.max_objects
            )));
        }
        let mut crd_kinds: HashMap<(String, String), bool> = HashMap::new();
        for (_, d) in &docs {
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
        for (origin, mut d) in docs {
            let bad = |what: &str| TargetError::InvalidManifest(format!("{origin}: {what}"));
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
            if !d.is_object() || !d["metadata"].is_object() {
                return Err(bad("not an object"));
            }
            let (group, version) = split_api_version(&av);
            self.check_kind(&group, &kind)
                .map_err(|m| TargetError::PolicyDenied(format!("{origin}: {m}")))?;
            let (ar, namespaced) = match self.resolve(&group, &version, &kind, false).await? {
                Some((ar, caps)) => (ar, caps.scope == KScope::Namespaced),
                None => match crd_kinds.get(&(group.clone(), kind.clone())) {
                    Some(ns) => (
                        ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, &kind)),
                        *ns,
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
                if !self.cfg.allowed_namespaces.is_empty()
                    && !self
                        .cfg
                        .allowed_namespaces
                        .iter()
                        .any(|a| *a == ns || self.prefixed(a) == ns)
                {
                    return Err(TargetError::PolicyDenied(format!(
                        "{origin}: namespace {ns} is not allowed"
                    )));
                }
                d["metadata"]["namespace"] = json!(ns);
                Some(ns)
            } else {
                if !self.cfg.allow_cluster_scoped.unwrap_or(true) {
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
                if !self.cfg.allowed_namespaces.is_empty()
                    && !self
                        .cfg
                        .allowed_namespaces
                        .iter()
                        .any(|a| *a == n || self.prefixed(a) == n)
                {
                    return Err(TargetError::PolicyDenied(format!(
                        "{origin}: namespace {n} is not allowed"
                    )));
                }
                d["metadata"]["name"] = json!(n);
                n
            } else {
                name
            };
            let labels = d["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let mut labels = labels;
            labels.insert(MANAGED_BY.into(), json!("roost"));
            labels.insert(DEPLOYMENT_LABEL.into(), json!(deployment));
            labels.insert(STORE_LABEL.into(), json!(self.store));
            d["metadata"]["labels"] = Value::Object(labels);
            let mut ann = d["metadata"]["annotations"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            ann.insert(REVISION_ANNOTATION.into(), json!(rendered.revision));
            d["metadata"]["annotations"] = Value::Object(ann);
            let desired = Desired {
                obj: d,
                ar,
                namespaced,
                namespace,
                name,
                origin,
            };
            if !seen.insert(desired.key()) {
                return Err(TargetError::InvalidManifest(format!(
                    "{}: duplicate object {}",
                    desired.origin,
                    desired.key()
                )));
            }
            out.push(desired);
        }
        out.sort_by(|a, b| {
            apply_rank(a)
                .cmp(&apply_rank(b))
                .then_with(|| a.key().cmp(&b.key()))
        });
        if let Ok(mut k) = self.kinds.lock() {
            let mut kinds: Vec<(ApiResource, bool)> = Vec::new();
            for d in &out {
                if !kinds
                    .iter()
                    .any(|(a, _)| a.group == d.ar.group && a.kind == d.ar.kind)
                {
                    kinds.push((d.ar.clone(), d.namespaced));
                }
            }
            k.insert(deployment.to_owned(), kinds);
        }
        Ok(out)
    }

    fn check_kind(&self, group: &str, kind: &str) -> Result<(), String> {
        let names = [kind.to_owned(), format!("{group}/{kind}")];
        if self.cfg.denied_kinds.iter().any(|k| names.contains(k)) {
            return Err(format!("kind {kind} is denied"));
        }
        if !self.cfg.allowed_kinds.is_empty()
            && !self.cfg.allowed_kinds.iter().any(|k| names.contains(k))
        {
            return Err(format!("kind {kind} is not in the allowed kinds"));
        }
        Ok(())
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

    async fn apply_one(&self, d: &Desired, dry_run: bool) -> Result<DynamicObject, kube::Error> {
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
        Err(TargetError::Apply(format!(
            "CustomResourceDefinition {name} was not Established within 30 s"
        )))
    }

    pub(crate) async fn validate(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<(), TargetError> {
        self.plan(deployment, rendered).await.map(|_| ())
    }

    pub(crate) async fn apply(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<ApplyReport, TargetError> {
        let plan = self.plan(deployment, rendered).await?;
        let mut changed = Vec::new();
        for d in &plan {
            // A custom resource whose CRD came in this revision: discover it now.
            let mut d = d.clone();
            if self
                .cache
                .read()
                .await
                .get(&format!("{}/{}/{}", d.ar.group, d.ar.version, d.ar.kind))
                .is_none()
            {
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
            let before = self
                .api(&d.ar, d.namespaced, d.namespace.as_deref())
                .get_opt(&d.name)
                .await
                .ok()
                .flatten();
            let after = self.apply_one(&d, false).await.map_err(|e| {
                TargetError::Apply(format!("{} ({}): {}", d.key(), d.origin, kube_msg(&e)))
            })?;
            // Changed = anything but the revision annotation differs (that one moves with
            // every revision by design).
            let content = |o: &DynamicObject| {
                let mut v = comparable(o);
                if let Some(a) = v["metadata"]["annotations"].as_object_mut() {
                    a.remove(REVISION_ANNOTATION);
                }
                v
            };
            if before
                .as_ref()
                .is_none_or(|b| !diff_paths(&content(b), &content(&after)).is_empty())
            {
                changed.push(d.key());
            }
            if d.ar.kind == "CustomResourceDefinition" {
                self.wait_crd_established(&d.name).await?;
            }
        }
        info!(%deployment, objects = plan.len(), changed = changed.len(), "applied");
        Ok(ApplyReport {
            changed,
            inventory: plan.iter().map(Desired::key).collect(),
        })
    }

    /// Objects carrying the deployment's label, across every listable resource the cluster
    /// serves (inventory recovery when the agent's state was lost).
    async fn labelled(&self, deployment: &str) -> Result<Vec<String>, TargetError> {
        let disc = discovery::Discovery::new(self.client.clone())
            .run()
            .await
            .map_err(|e| TargetError::Internal(format!("discovery: {}", kube_msg(&e))))?;
        let lp = ListParams::default().labels(&format!(
            "{DEPLOYMENT_LABEL}={deployment},{STORE_LABEL}={},{MANAGED_BY}=roost",
            self.store
        ));
        let mut out = Vec::new();
        for group in disc.groups() {
            for (ar, caps) in group.recommended_resources() {
                if !caps.supports_operation(discovery::verbs::LIST) {
                    continue;
                }
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                if let Ok(list) = api.list(&lp).await {
                    for o in list {
                        out.push(item_key(
                            &ar.group,
                            &ar.version,
                            &ar.kind,
                            o.metadata.namespace.as_deref(),
                            &o.metadata.name.unwrap_or_default(),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn delete_items(
        &self,
        deployment: &str,
        items: &[String],
    ) -> Result<Vec<String>, TargetError> {
        let mut parsed = Vec::new();
        for k in items {
            let Some((g, v, kind, ns, name)) = parse_key(k) else {
                continue;
            };
            let namespaced = ns.is_some();
            parsed.push((
                prune_rank(&g, &kind, namespaced),
                k.clone(),
                g,
                v,
                kind,
                ns,
                name,
            ));
        }
        parsed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut deleted = Vec::new();
        for (_, key, g, v, kind, ns, name) in parsed {
            let ar = match self.resolve(&g, &v, &kind, false).await? {
                Some((ar, _)) => ar,
                None => continue, // the kind is gone (its CRD was removed): nothing to delete
            };
            let api = self.api(&ar, ns.is_some(), ns.as_deref());
            // Only delete what is still ours.
            match api.get_opt(&name).await {
                Ok(Some(o)) => {
                    let labels = o.metadata.labels.unwrap_or_default();
                    if labels.get(DEPLOYMENT_LABEL).map(String::as_str) != Some(deployment)
                        || labels.get(STORE_LABEL) != Some(&self.store)
                    {
                        warn!(item = %key, "not pruning: no longer labelled for this deployment");
                        continue;
                    }
                }
                Ok(None) => continue,
                Err(e) => return Err(TargetError::Prune(format!("{key}: {}", kube_msg(&e)))),
            }
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => deleted.push(key),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(TargetError::Prune(format!("{key}: {}", kube_msg(&e)))),
            }
        }
        Ok(deleted)
    }

    pub(crate) async fn prune(
        &self,
        deployment: &str,
        rendered: &Rendered,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        let plan = self.plan(deployment, rendered).await?;
        let keep: std::collections::HashSet<String> = plan.iter().map(Desired::key).collect();
        let mut previous = previous.to_vec();
        if previous.is_empty() {
            // State lost (or first apply): recover the inventory from the labels.
            previous = self.labelled(deployment).await?;
        }
        let stale: Vec<String> = previous.into_iter().filter(|k| !keep.contains(k)).collect();
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        self.delete_items(deployment, &stale).await
    }

    pub(crate) async fn remove(
        &self,
        deployment: &str,
        previous: &[String],
    ) -> Result<Vec<String>, TargetError> {
        let mut items = previous.to_vec();
        for k in self.labelled(deployment).await? {
            if !items.contains(&k) {
                items.push(k);
            }
        }
        self.delete_items(deployment, &items).await
    }

    pub(crate) async fn health(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Health, TargetError> {
        let plan = self.plan(deployment, rendered).await?;
        let mut not_ready = Vec::new();
        for d in &plan {
            match self
                .api(&d.ar, d.namespaced, d.namespace.as_deref())
                .get_opt(&d.name)
                .await
            {
                Ok(Some(o)) => {
                    if let Some(why) = kstatus(&d.ar.group, &d.ar.kind, &o) {
                        not_ready.push(format!("{}: {why}", d.key()));
                    }
                }
                Ok(None) => not_ready.push(format!("{}: not found", d.key())),
                Err(e) => not_ready.push(format!("{}: {}", d.key(), kube_msg(&e))),
            }
        }
        Ok(Health {
            ready: not_ready.is_empty(),
            not_ready,
        })
    }

    pub(crate) async fn drift(
        &self,
        deployment: &str,
        rendered: &Rendered,
    ) -> Result<Option<DriftReport>, TargetError> {
        let plan = self.plan(deployment, rendered).await?;
        let mut items = Vec::new();
        for d in &plan {
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
                    Err(e) => {
                        return Err(TargetError::Internal(format!(
                            "{}: {}",
                            d.key(),
                            kube_msg(&e)
                        )))
                    }
                };
                let dry = self.apply_one(d, true).await.map_err(|e| {
                    TargetError::Internal(format!("dry run {}: {}", d.key(), kube_msg(&e)))
                })?;
                if dry.metadata.resource_version == live.metadata.resource_version || attempt >= 3 {
                    break (Some(live), Some(dry));
                }
            };
            let (Some(live), Some(dry)) = (live, dry) else {
                items.push(format!("{}: deleted", d.key()));
                continue;
            };
            let paths = diff_paths(&comparable(&live), &comparable(&dry));
            if !paths.is_empty() {
                items.push(format!("{}: {}", d.key(), paths.join(", ")));
            }
        }
        debug!(%deployment, drift = !items.is_empty(), "drift check");
        Ok((!items.is_empty()).then_some(DriftReport { items }))
    }

    pub(crate) fn watch(&self, deployment: &str) -> Option<mpsc::Receiver<()>> {
        let kinds = self.kinds.lock().ok()?.get(deployment).cloned()?;
        let (tx, rx) = mpsc::channel(1);
        let selector = format!(
            "{DEPLOYMENT_LABEL}={deployment},{STORE_LABEL}={}",
            self.store
        );
        for (ar, _) in kinds {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let tx = tx.clone();
            let cfg = watcher::Config::default().labels(&selector);
            tokio::spawn(async move {
                let mut stream = watcher(api, cfg).default_backoff().boxed();
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(watcher::Event::Apply(_))
                        | Ok(watcher::Event::Delete(_))
                        | Ok(watcher::Event::InitDone) => {
                            if tx.is_closed() {
                                break;
                            }
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
                .filter(|(k, _)| k.as_str() != "kubectl.kubernetes.io/last-applied-configuration")
                .collect();
            meta.insert("annotations".into(), json!(a));
        }
        m.insert("metadata".into(), Value::Object(meta));
    }
    v
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
    fn kstatus_rules() {
        let dep = |gen: i64, st: Value| {
            obj(
                json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d","generation":gen},"spec":{"replicas":2},"status":st}),
            )
        };
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":1,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":2}))).is_some());
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":2,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":1}))).is_some());
        assert!(kstatus("apps", "Deployment", &dep(2, json!({"observedGeneration":2,"replicas":2,"updatedReplicas":2,"readyReplicas":2,"availableReplicas":2}))).is_none());
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
    fn keys_roundtrip_and_orders() {
        let k = item_key("apps", "v1", "Deployment", Some("ns"), "web");
        assert_eq!(k, "apps/v1/Deployment/ns/web");
        assert_eq!(
            parse_key(&k),
            Some((
                "apps".into(),
                "v1".into(),
                "Deployment".into(),
                Some("ns".into()),
                "web".into()
            ))
        );
        assert_eq!(parse_key("/v1/Namespace//kitchen").map(|p| p.3), Some(None));
        assert!(prune_rank("", "Namespace", false) > prune_rank("", "ConfigMap", true));
        assert!(
            prune_rank("apiextensions.k8s.io", "CustomResourceDefinition", false)
                > prune_rank("rbac.authorization.k8s.io", "ClusterRole", false)
        );
    }
}
