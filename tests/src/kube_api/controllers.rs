//! Background controllers standing in for kube-controller-manager and the
//! apiextensions/namespace machinery: CRD establishment and cleanup, namespace
//! termination and per-namespace defaults, workload status (StatefulSets, DaemonSets,
//! Jobs), PVC binding and ownerReference garbage collection. Deployments and
//! ReplicaSets are in `deployments.rs`, Endpoints and EndpointSlices in `endpoints.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::api::{self, meta_str, DeleteOptions, Inner};
use super::deployments::DeploymentControllers;
use super::endpoints::EndpointsControllers;
use super::fields::Scope;
use super::resources::{self, ResourceType, CRD_GROUP};
use super::store::{ObjKey, Store};

/// The manager name controllers write with, like the real kube-controller-manager.
const MANAGER: &str = "kube-controller-manager";
const TICK: Duration = Duration::from_millis(20);
/// How long a rollout takes before workloads report availability.
pub(crate) const ROLLOUT: Duration = Duration::from_millis(150);
/// Delay between NamesAccepted and Established for CRDs.
const ESTABLISH: Duration = Duration::from_millis(200);
/// Delay between a terminating namespace becoming empty and its removal.
const NAMESPACE_FINALIZE: Duration = Duration::from_millis(50);
const PVC_BIND: Duration = Duration::from_millis(30);

pub(crate) async fn run(inner: Arc<Inner>) {
    let mut state = State::default();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut store = inner.lock();
        state.step(&mut store, Instant::now());
    }
}

#[derive(Default)]
struct State {
    /// Workload uid -> (generation, when the rollout completes).
    rollouts: HashMap<String, (i64, Instant)>,
    /// CRD uid -> when its names were accepted.
    accepted: HashMap<String, Instant>,
    /// Terminating namespace -> when it was found empty.
    emptied: HashMap<String, Instant>,
    /// Object uid -> when a controller first saw it.
    seen: HashMap<String, Instant>,
    deployments: DeploymentControllers,
    endpoints: EndpointsControllers,
}

pub(crate) fn items(store: &Store, group: &str, plural: &str) -> Vec<(ObjKey, Value)> {
    store
        .objects_of(group, plural)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub(crate) fn uid(obj: &Value) -> String {
    meta_str(obj, "uid").unwrap_or_default().to_string()
}

pub(crate) fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

fn generation(obj: &Value) -> i64 {
    obj.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn observed(obj: &Value) -> i64 {
    obj.pointer("/status/observedGeneration")
        .and_then(Value::as_i64)
        .unwrap_or(-1)
}

/// JSON with object keys in sorted order, so equal values hash alike.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A pod-template hash like the controllers' `ComputeHash`: FNV-32a over the template
/// (and the collision count), its decimal value encoded with the alphabet of
/// `rand.SafeEncodeString` (`5d78c9869d`).
pub(crate) fn pod_template_hash(template: &Value, collisions: Option<u32>) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut text = String::new();
    canonical(template, &mut text);
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(text.as_bytes());
    if let Some(c) = collisions {
        feed(&c.to_le_bytes());
    }
    h.to_string()
        .bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

fn type_of(store: &Store, group: &str, plural: &str) -> Option<ResourceType> {
    resources::builtin(group, plural).or_else(|| {
        resources::custom_types(store, resources::Gate::Serving)
            .into_iter()
            .find(|t| t.group == group && t.plural == plural)
    })
}

/// Write `status` through the status subresource, recording ownership like the real controller.
pub(crate) fn write_status(store: &mut Store, rt: &ResourceType, key: &ObjKey, status: Value) {
    let Some(live) = store.get(key).cloned() else {
        return;
    };
    if live.get("status") == Some(&status) {
        return;
    }
    let mut new = live;
    new["status"] = status;
    write(store, rt, key, new, Scope::Status);
}

/// Write a main-resource change (operation Update by the controller manager).
pub(crate) fn write_main(store: &mut Store, rt: &ResourceType, key: &ObjKey, new: Value) {
    let scope = Scope::Main {
        status_subresource: rt.status_subresource,
    };
    write(store, rt, key, new, scope);
}

/// An `Update` by the controller manager: through the same preparation as a client's
/// write (so generation, defaults and validation apply), unless the object is gone.
pub(crate) fn write(store: &mut Store, rt: &ResourceType, key: &ObjKey, new: Value, scope: Scope) {
    let Some(live) = store.get(key).cloned() else {
        return;
    };
    let now = api::now();
    match api::prepare(
        store,
        rt,
        Some(&live),
        new,
        scope,
        &key.namespace,
        &key.name,
        &now,
    ) {
        Ok(mut prepared) => {
            api::record(rt, &live, &mut prepared, &live, scope, MANAGER, &now);
            api::commit(store, key.clone(), Some(&live), prepared, false);
        }
        Err(e) => tracing::warn!(message = %e.message, "controller update rejected"),
    }
}

/// Create an object as the controller manager (ignored if it exists or is invalid).
pub(crate) fn create(store: &mut Store, rt: &ResourceType, ns: &str, obj: Value) {
    let name = meta_str(&obj, "name").unwrap_or_default().to_string();
    let key = ObjKey::new(&rt.group, &rt.plural, ns, &name);
    if store.get(&key).is_some() {
        return;
    }
    if rt.namespaced {
        // Admission applies to controllers too (no new content in a terminating namespace).
        if let Err(e) = api::ensure_namespace(store, rt, &name, ns) {
            tracing::debug!(message = %e.message, "controller create refused");
            return;
        }
    }
    let now = api::now();
    let scope = Scope::Main {
        status_subresource: rt.status_subresource,
    };
    match api::prepare(store, rt, None, obj, scope, ns, &name, &now) {
        Ok(mut prepared) => {
            api::record(
                rt,
                &json!({}),
                &mut prepared,
                &json!({}),
                scope,
                MANAGER,
                &now,
            );
            api::commit(store, key, None, prepared, false);
        }
        Err(e) => tracing::warn!(message = %e.message, "controller create failed"),
    }
}

fn condition(
    old_status: &Value,
    ctype: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
    update_time: bool,
) -> Value {
    let old = old_status
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == ctype));
    let transition = match old {
        Some(o) if o["status"] == status => o["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    let mut c = json!({
        "type": ctype,
        "status": status,
        "lastTransitionTime": transition,
        "reason": reason,
        "message": message,
    });
    if update_time {
        let same = old.is_some_and(|o| {
            o["status"] == status && o["reason"] == reason && o["message"] == message
        });
        c["lastUpdateTime"] = match old {
            Some(o) if same => o["lastUpdateTime"].clone(),
            _ => json!(now),
        };
    }
    c
}

fn insert_nonzero(m: &mut Map<String, Value>, key: &str, n: i64) {
    if n != 0 {
        m.insert(key.into(), json!(n));
    }
}

pub(crate) fn delete_quietly(store: &mut Store, key: &ObjKey, propagation: Option<&str>) {
    let Some(rt) = type_of(store, &key.group, &key.plural) else {
        store.delete(key);
        return;
    };
    let opts = DeleteOptions {
        propagation: propagation.map(str::to_string),
        dry_run: false,
        uid: None,
        resource_version: None,
    };
    if let Err(e) = api::delete_object(store, &rt, key, &opts) {
        tracing::debug!(message = %e.message, "controller delete failed");
    }
}

fn remove_finalizer(store: &mut Store, key: &ObjKey, finalizer: &str) {
    let Some(live) = store.get(key).cloned() else {
        return;
    };
    let Some(rt) = type_of(store, &key.group, &key.plural) else {
        return;
    };
    let mut new = live.clone();
    if let Some(Value::Array(fs)) = new.pointer_mut("/metadata/finalizers") {
        fs.retain(|f| f != finalizer);
        if fs.is_empty() {
            if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("finalizers");
            }
        }
    }
    write_main(store, &rt, key, new);
}

impl State {
    fn step(&mut self, store: &mut Store, now: Instant) {
        self.crds(store, now);
        self.namespaces(store, now);
        self.deployments.step(store, now);
        self.statefulsets(store, now);
        self.daemonsets(store, now);
        self.jobs(store, now);
        self.pvcs(store, now);
        self.endpoints.step(store);
        self.garbage_collect(store);
    }

    fn crds(&mut self, store: &mut Store, now: Instant) {
        let Some(rt) = resources::builtin(CRD_GROUP, "customresourcedefinitions") else {
            return;
        };
        let ts = api::now();
        for (key, crd) in items(store, CRD_GROUP, "customresourcedefinitions") {
            let id = uid(&crd);
            let status = crd.get("status").cloned().unwrap_or(json!({}));
            if deleting(&crd) {
                let group = crd
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let plural = crd
                    .pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if !resources::condition_true(&crd, "Terminating") {
                    let mut s = status.clone();
                    let mut conds: Vec<Value> =
                        s["conditions"].as_array().cloned().unwrap_or_default();
                    conds.retain(|c| c["type"] != "Terminating");
                    conds.push(condition(
                        &status,
                        "Terminating",
                        "True",
                        "InstanceDeletionInProgress",
                        "CustomResource deletion is in progress",
                        &ts,
                        false,
                    ));
                    s["conditions"] = json!(conds);
                    write_status(store, &rt, &key, s);
                }
                let instances: Vec<ObjKey> = store
                    .objects_of(&group, &plural)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &instances {
                    if store.get(k).is_some_and(|o| !deleting(o)) {
                        delete_quietly(store, k, None);
                    }
                }
                if store.objects_of(&group, &plural).next().is_none() {
                    remove_finalizer(store, &key, "customresourcecleanup.apiextensions.k8s.io");
                    self.accepted.remove(&id);
                }
                continue;
            }
            let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
            let mut accepted = names.clone();
            if let Some(kind) = names["kind"].as_str() {
                if accepted.get("singular").is_none() {
                    accepted["singular"] = json!(kind.to_ascii_lowercase());
                }
                if accepted.get("listKind").is_none() {
                    accepted["listKind"] = json!(format!("{kind}List"));
                }
            }
            let names_ok = resources::condition_true(&crd, "NamesAccepted");
            if !names_ok || status.get("acceptedNames") != Some(&accepted) {
                let mut s = status.clone();
                s["acceptedNames"] = accepted;
                let mut conds: Vec<Value> = s["conditions"].as_array().cloned().unwrap_or_default();
                conds.retain(|c| c["type"] != "NamesAccepted");
                conds.push(condition(
                    &status,
                    "NamesAccepted",
                    "True",
                    "NoConflicts",
                    "no conflicts found",
                    &ts,
                    false,
                ));
                s["conditions"] = json!(conds);
                write_status(store, &rt, &key, s);
                self.accepted.entry(id).or_insert(now);
                continue;
            }
            let since = *self.accepted.entry(id).or_insert(now);
            if !resources::condition_true(&crd, "Established")
                && now.duration_since(since) >= ESTABLISH
            {
                let mut s = status.clone();
                let mut conds: Vec<Value> = s["conditions"].as_array().cloned().unwrap_or_default();
                conds.retain(|c| c["type"] != "Established");
                conds.push(condition(
                    &status,
                    "Established",
                    "True",
                    "InitialNamesAccepted",
                    "the initial names have been accepted",
                    &ts,
                    false,
                ));
                s["conditions"] = json!(conds);
                write_status(store, &rt, &key, s);
            }
        }
    }

    fn namespaces(&mut self, store: &mut Store, now: Instant) {
        let Some(ns_rt) = resources::builtin("", "namespaces") else {
            return;
        };
        let ts = api::now();
        for (key, ns) in items(store, "", "namespaces") {
            let name = key.name.clone();
            if !deleting(&ns) {
                self.emptied.remove(&name);
                if let Some(sa) = resources::builtin("", "serviceaccounts") {
                    create(
                        store,
                        &sa,
                        &name,
                        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
                    );
                }
                if let Some(cm) = resources::builtin("", "configmaps") {
                    create(
                        store,
                        &cm,
                        &name,
                        json!({
                            "apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "kube-root-ca.crt", "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
                            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nMIIBdGVzdC1kb3VibGUtY2E=\n-----END CERTIFICATE-----\n"},
                        }),
                    );
                }
                continue;
            }
            // Terminating: delete the content, then the namespace itself.
            let content: Vec<ObjKey> = store
                .all()
                .filter(|(k, _)| {
                    k.namespace == name && !(k.group.is_empty() && k.plural == "namespaces")
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in &content {
                if store.get(k).is_some_and(|o| !deleting(o)) {
                    delete_quietly(store, k, Some("Background"));
                }
            }
            let remaining = store
                .all()
                .filter(|(k, _)| {
                    k.namespace == name && !(k.group.is_empty() && k.plural == "namespaces")
                })
                .count();
            let status = ns.get("status").cloned().unwrap_or(json!({}));
            let (content_status, content_reason, content_msg) = if remaining == 0 {
                (
                    "False",
                    "ContentRemoved",
                    "All content successfully removed",
                )
            } else {
                (
                    "True",
                    "SomeResourcesRemain",
                    "Some resources are remaining",
                )
            };
            let conds = vec![
                condition(
                    &status,
                    "NamespaceDeletionDiscoveryFailure",
                    "False",
                    "ResourcesDiscovered",
                    "All resources successfully discovered",
                    &ts,
                    false,
                ),
                condition(
                    &status,
                    "NamespaceDeletionGroupVersionParsingFailure",
                    "False",
                    "ParsedGroupVersions",
                    "All legacy kube types successfully parsed",
                    &ts,
                    false,
                ),
                condition(
                    &status,
                    "NamespaceDeletionContentFailure",
                    "False",
                    "ContentDeleted",
                    "All content successfully deleted, may be waiting on finalization",
                    &ts,
                    false,
                ),
                condition(
                    &status,
                    "NamespaceContentRemaining",
                    content_status,
                    content_reason,
                    content_msg,
                    &ts,
                    false,
                ),
                condition(
                    &status,
                    "NamespaceFinalizersRemaining",
                    "False",
                    "ContentHasNoFinalizers",
                    "All content-preserving finalizers finished",
                    &ts,
                    false,
                ),
            ];
            let wanted = json!({"phase": "Terminating", "conditions": conds});
            let same = status
                .get("conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .zip(conds.iter())
                        .all(|(a, b)| a["type"] == b["type"] && a["status"] == b["status"])
                        && cs.len() == conds.len()
                });
            if !same {
                write_status(store, &ns_rt, &key, wanted);
            }
            if remaining > 0 {
                continue;
            }
            let since = *self.emptied.entry(name.clone()).or_insert(now);
            if now.duration_since(since) >= NAMESPACE_FINALIZE {
                // Empty: remove the `kubernetes` finalizer (PUT .../finalize). With no
                // other finalizers left, that update deletes the namespace.
                if let Some(live) = store.get(&key).cloned() {
                    let mut finalized = live.clone();
                    if let Some(spec) = finalized.get_mut("spec").and_then(Value::as_object_mut) {
                        if let Some(Value::Array(fs)) = spec.get_mut("finalizers") {
                            fs.retain(|f| f != "kubernetes");
                            if fs.is_empty() {
                                spec.remove("finalizers");
                            }
                        }
                    }
                    api::commit(store, key.clone(), Some(&live), finalized, false);
                }
                if store.get(&key).is_none() {
                    self.emptied.remove(&name);
                }
            }
        }
    }

    fn workload_target(
        &mut self,
        store: &Store,
        key: &ObjKey,
        obj: &Value,
        now: Instant,
    ) -> Option<Phase> {
        if deleting(obj) {
            return None;
        }
        let id = uid(obj);
        let gen = generation(obj);
        let never = store
            .never_available
            .contains(&format!("{}/{}", key.namespace, key.name));
        if observed(obj) != gen {
            if never {
                self.rollouts.remove(&id);
            } else {
                self.rollouts.insert(id, (gen, now + ROLLOUT));
            }
            return Some(Phase::Progressing);
        }
        match self.rollouts.get(&id) {
            Some((g, due)) if *g == gen && now >= *due => {
                self.rollouts.remove(&id);
                // `never_available` may have been set while the rollout was under way.
                (!never).then_some(Phase::Available)
            }
            _ => None,
        }
    }

    fn statefulsets(&mut self, store: &mut Store, now: Instant) {
        let Some(rt) = resources::builtin("apps", "statefulsets") else {
            return;
        };
        for (key, sts) in items(store, "apps", "statefulsets") {
            let Some(phase) = self.workload_target(store, &key, &sts, now) else {
                continue;
            };
            let replicas = sts
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
            let revision = format!("{}-{}", key.name, pod_template_hash(&template, None));
            let ready = if phase == Phase::Available {
                replicas
            } else {
                0
            };
            let mut s = Map::new();
            s.insert("observedGeneration".into(), json!(generation(&sts)));
            s.insert("replicas".into(), json!(replicas));
            s.insert("availableReplicas".into(), json!(ready));
            insert_nonzero(&mut s, "readyReplicas", ready);
            insert_nonzero(&mut s, "currentReplicas", replicas);
            insert_nonzero(&mut s, "updatedReplicas", replicas);
            s.insert("currentRevision".into(), json!(revision));
            s.insert("updateRevision".into(), json!(revision));
            s.insert("collisionCount".into(), json!(0));
            write_status(store, &rt, &key, Value::Object(s));
        }
    }

    fn daemonsets(&mut self, store: &mut Store, now: Instant) {
        let Some(rt) = resources::builtin("apps", "daemonsets") else {
            return;
        };
        for (key, ds) in items(store, "apps", "daemonsets") {
            let Some(phase) = self.workload_target(store, &key, &ds, now) else {
                continue;
            };
            // One (virtual) node.
            let ready = i64::from(phase == Phase::Available);
            let mut s = Map::new();
            s.insert("observedGeneration".into(), json!(generation(&ds)));
            s.insert("currentNumberScheduled".into(), json!(1));
            s.insert("desiredNumberScheduled".into(), json!(1));
            s.insert("numberMisscheduled".into(), json!(0));
            s.insert("numberReady".into(), json!(ready));
            insert_nonzero(&mut s, "numberAvailable", ready);
            insert_nonzero(&mut s, "numberUnavailable", 1 - ready);
            s.insert("updatedNumberScheduled".into(), json!(1));
            write_status(store, &rt, &key, Value::Object(s));
        }
    }

    fn jobs(&mut self, store: &mut Store, now: Instant) {
        let Some(rt) = resources::builtin("batch", "jobs") else {
            return;
        };
        let ts = api::now();
        for (key, job) in items(store, "batch", "jobs") {
            if deleting(&job) || job.pointer("/spec/suspend") == Some(&json!(true)) {
                continue;
            }
            let status = job.get("status").cloned().unwrap_or(json!({}));
            if status.get("completionTime").is_some() {
                continue;
            }
            let id = uid(&job);
            let first = *self.seen.entry(id.clone()).or_insert(now);
            let never = store
                .never_available
                .contains(&format!("{}/{}", key.namespace, key.name));
            let completions = job
                .pointer("/spec/completions")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            if status.get("startTime").is_none() {
                let s = json!({"startTime": ts, "active": 1, "ready": 0, "terminating": 0, "uncountedTerminatedPods": {}});
                write_status(store, &rt, &key, s);
                continue;
            }
            if never || now.duration_since(first) < ROLLOUT {
                continue;
            }
            let msg = "Reached expected number of succeeded pods";
            let s = json!({
                "startTime": status["startTime"],
                "completionTime": ts,
                "succeeded": completions,
                "ready": 0,
                "terminating": 0,
                "uncountedTerminatedPods": {},
                "conditions": [
                    condition(&status, "SuccessCriteriaMet", "True", "CompletionsReached", msg, &ts, false),
                    condition(&status, "Complete", "True", "CompletionsReached", msg, &ts, false),
                ],
            });
            let mut s = s;
            for c in s["conditions"].as_array_mut().into_iter().flatten() {
                c["lastProbeTime"] = json!(ts);
            }
            write_status(store, &rt, &key, s);
            self.seen.remove(&id);
        }
    }

    fn pvcs(&mut self, store: &mut Store, now: Instant) {
        let Some(rt) = resources::builtin("", "persistentvolumeclaims") else {
            return;
        };
        for (key, pvc) in items(store, "", "persistentvolumeclaims") {
            let id = uid(&pvc);
            if deleting(&pvc) {
                // No pod uses it: the pvc-protection controller lets it go.
                remove_finalizer(store, &key, "kubernetes.io/pvc-protection");
                self.seen.remove(&id);
                continue;
            }
            if pvc.pointer("/status/phase") != Some(&json!("Pending")) {
                continue;
            }
            let first = *self.seen.entry(id.clone()).or_insert(now);
            if now.duration_since(first) < PVC_BIND {
                continue;
            }
            let mut bound = pvc.clone();
            bound["spec"]["volumeName"] = json!(format!("pvc-{id}"));
            bound["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] = json!("yes");
            bound["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"] = json!("yes");
            write_main(store, &rt, &key, bound);
            let storage = pvc
                .pointer("/spec/resources/requests/storage")
                .cloned()
                .unwrap_or(json!("1Gi"));
            let modes = pvc
                .pointer("/spec/accessModes")
                .cloned()
                .unwrap_or(json!(["ReadWriteOnce"]));
            write_status(
                store,
                &rt,
                &key,
                json!({"phase": "Bound", "accessModes": modes, "capacity": {"storage": storage}}),
            );
            self.seen.remove(&id);
        }
    }

    fn garbage_collect(&mut self, store: &mut Store) {
        let uids: HashSet<String> = store.all().map(|(_, o)| uid(o)).collect();
        let mut orphaned = Vec::new();
        let mut dangling = Vec::new();
        let mut dependents: HashMap<String, Vec<ObjKey>> = HashMap::new();
        for (key, obj) in store.all() {
            let Some(refs) = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
            else {
                continue;
            };
            if refs.is_empty() {
                continue;
            }
            for r in refs {
                if let Some(u) = r["uid"].as_str() {
                    dependents
                        .entry(u.to_string())
                        .or_default()
                        .push(key.clone());
                }
            }
            if deleting(obj) {
                continue;
            }
            let live: Vec<&Value> = refs
                .iter()
                .filter(|r| r["uid"].as_str().is_some_and(|u| uids.contains(u)))
                .collect();
            if live.is_empty() {
                orphaned.push(key.clone());
            } else if live.len() != refs.len() {
                dangling.push(key.clone());
            }
        }
        for key in orphaned {
            delete_quietly(store, &key, Some("Background"));
        }
        for key in dangling {
            let (Some(obj), Some(rt)) = (
                store.get(&key).cloned(),
                type_of(store, &key.group, &key.plural),
            ) else {
                continue;
            };
            let mut new = obj.clone();
            if let Some(Value::Array(refs)) = new.pointer_mut("/metadata/ownerReferences") {
                refs.retain(|r| r["uid"].as_str().is_some_and(|u| uids.contains(u)));
            }
            write_main(store, &rt, &key, new);
        }
        // Foreground and orphan deletions.
        let waiting: Vec<(ObjKey, Value)> = store
            .all()
            .filter(|(_, o)| deleting(o))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (key, obj) in waiting {
            let finalizers: Vec<String> = obj
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .map(|fs| {
                    fs.iter()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let deps = dependents.get(&uid(&obj)).cloned().unwrap_or_default();
            if finalizers.iter().any(|f| f == "orphan") {
                for d in &deps {
                    let (Some(dobj), Some(drt)) =
                        (store.get(d).cloned(), type_of(store, &d.group, &d.plural))
                    else {
                        continue;
                    };
                    let mut new = dobj.clone();
                    let owner = uid(&obj);
                    if let Some(Value::Array(refs)) = new.pointer_mut("/metadata/ownerReferences") {
                        refs.retain(|r| r["uid"] != owner.as_str());
                    }
                    write_main(store, &drt, d, new);
                }
                remove_finalizer(store, &key, "orphan");
            } else if finalizers.iter().any(|f| f == "foregroundDeletion") {
                let remaining: Vec<&ObjKey> =
                    deps.iter().filter(|d| store.get(d).is_some()).collect();
                if remaining.is_empty() {
                    remove_finalizer(store, &key, "foregroundDeletion");
                } else {
                    for d in remaining.into_iter().cloned().collect::<Vec<_>>() {
                        if store.get(&d).is_some_and(|o| !deleting(o)) {
                            delete_quietly(store, &d, Some("Foreground"));
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The spec changed: the controller observed it and the rollout started.
    Progressing,
    /// The rollout finished.
    Available,
}
