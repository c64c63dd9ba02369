//! The deployment and replicaset controllers of kube-controller-manager, for a
//! cluster without pods or kubelets.
//!
//! The deployment controller follows the real one: a ReplicaSet per pod template
//! (`<deployment>-<pod-template-hash>`, owned by the Deployment, with the template's
//! labels plus `pod-template-hash` and the Deployment's annotations plus the
//! `deployment.kubernetes.io/*` ones), rolling updates bounded by `maxSurge` and
//! `maxUnavailable` (or Recreate), old ReplicaSets scaled to zero and cleaned up
//! beyond `revisionHistoryLimit`, and a status computed from the ReplicaSets with the
//! real `Available` and `Progressing` conditions.
//!
//! Pods are not made. The replicaset controller reports a ReplicaSet's replicas at
//! once, and them ready and available [`ROLLOUT`] after they were asked for, unless
//! the ReplicaSet (or its Deployment) is in `never_available`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::api;
use super::controllers::{
    create, delete_quietly, deleting, items, pod_template_hash, uid, write, write_main,
    write_status, ROLLOUT,
};
use super::fields::Scope;
use super::resources::{self, ResourceType};
use super::selectors::LabelSelector;
use super::store::{ObjKey, Store};

const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const HASH_LABEL: &str = "pod-template-hash";
/// Deployment annotations the controller does not copy to ReplicaSets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

#[derive(Default)]
pub(crate) struct DeploymentControllers {
    /// ReplicaSet uid -> (replicas asked for, when they become available).
    pending: HashMap<String, (i64, Instant)>,
    /// Deployment uid -> when its Progressing condition last recorded progress.
    progress: HashMap<String, Instant>,
}

fn int(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn spec_replicas(v: &Value) -> i64 {
    v.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.pointer("/metadata/annotations")?.get(key)?.as_str()
}

fn revision(rs: &Value) -> i64 {
    annotation(rs, REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn rolling(d: &Value) -> bool {
    d.pointer("/spec/strategy/type").and_then(Value::as_str) != Some("Recreate")
}

/// An int-or-percent of `total`, rounded up or down (`GetScaledValueFromIntOrPercent`).
fn scaled(v: Option<&Value>, total: i64, round_up: bool) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::String(s)) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            if round_up {
                (pct * total + 99) / 100
            } else {
                pct * total / 100
            }
        }
        _ => 0,
    }
}

/// `(maxSurge, maxUnavailable)` resolved against `spec.replicas`, as
/// `ResolveFenceposts`, `MaxSurge` and `MaxUnavailable` do; both 0 for Recreate.
fn fenceposts(d: &Value) -> (i64, i64) {
    if !rolling(d) {
        return (0, 0);
    }
    let replicas = spec_replicas(d);
    let ru = d.pointer("/spec/strategy/rollingUpdate");
    let surge = scaled(ru.and_then(|r| r.get("maxSurge")), replicas, true);
    let mut unavailable = scaled(ru.and_then(|r| r.get("maxUnavailable")), replicas, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable.min(replicas))
}

fn max_unavailable(d: &Value) -> i64 {
    if spec_replicas(d) == 0 {
        0
    } else {
        fenceposts(d).1
    }
}

fn has_progress_deadline(d: &Value) -> bool {
    d.pointer("/spec/progressDeadlineSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|s| s != i64::from(i32::MAX))
}

/// The template without the `pod-template-hash` label (`EqualIgnoreHash`).
fn template_without_hash(v: &Value) -> Value {
    let mut t = v.pointer("/spec/template").cloned().unwrap_or(json!({}));
    if let Some(labels) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(HASH_LABEL);
        if labels.is_empty() {
            if let Some(meta) = t.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("labels");
            }
        }
    }
    t
}

fn conditions(status: &Value) -> Vec<Value> {
    status
        .get("conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn find_condition<'a>(conds: &'a [Value], ctype: &str) -> Option<&'a Value> {
    conds.iter().find(|c| c["type"] == ctype)
}

fn new_condition(ctype: &str, status: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({
        "type": ctype, "status": status,
        "lastUpdateTime": now, "lastTransitionTime": now,
        "reason": reason, "message": message,
    })
}

/// `SetDeploymentCondition`: no change for the same status and reason; otherwise the
/// condition replaces the old one (moving to the end), keeping lastTransitionTime
/// while the status stays the same.
fn set_condition(conds: &mut Vec<Value>, mut c: Value) {
    if let Some(cur) = find_condition(conds, c["type"].as_str().unwrap_or_default()) {
        if cur["status"] == c["status"] && cur["reason"] == c["reason"] {
            return;
        }
        if cur["status"] == c["status"] {
            c["lastTransitionTime"] = cur["lastTransitionTime"].clone();
        }
    }
    conds.retain(|x| x["type"] != c["type"]);
    conds.push(c);
}

/// A Deployment's ReplicaSets: its own (by controller reference), oldest first.
fn owned(store: &Store, key: &ObjKey, d: &Value) -> Vec<(ObjKey, Value)> {
    let id = uid(d);
    let mut out: Vec<(ObjKey, Value)> = store
        .objects_in("apps", "replicasets", Some(&key.namespace))
        .filter(|(_, rs)| controller_uid(rs).as_deref() == Some(id.as_str()))
        .map(|(k, rs)| (k.clone(), rs.clone()))
        .collect();
    out.sort_by(|a, b| {
        let ts = |v: &Value| {
            api::meta_str(v, "creationTimestamp")
                .unwrap_or_default()
                .to_string()
        };
        ts(&a.1).cmp(&ts(&b.1)).then_with(|| a.0.cmp(&b.0))
    });
    out
}

fn controller_uid(obj: &Value) -> Option<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r["controller"] == true)
        .and_then(|r| r["uid"].as_str())
        .map(str::to_string)
}

/// Status counts summed over ReplicaSets.
fn sum(rss: &[(ObjKey, Value)], f: impl Fn(&Value) -> i64) -> i64 {
    rss.iter().map(|(_, rs)| f(rs)).sum()
}

fn available(rs: &Value) -> i64 {
    int(rs, "/status/availableReplicas")
}

/// `DeploymentComplete`.
fn complete(d: &Value, status: &Value) -> bool {
    let replicas = spec_replicas(d);
    int(status, "/updatedReplicas") == replicas
        && int(status, "/replicas") == replicas
        && int(status, "/availableReplicas") == replicas
        && int(status, "/observedGeneration") >= int(d, "/metadata/generation")
}

impl DeploymentControllers {
    pub(crate) fn step(&mut self, store: &mut Store, now: Instant) {
        let (Some(d_rt), Some(rs_rt)) = (
            resources::builtin("apps", "deployments"),
            resources::builtin("apps", "replicasets"),
        ) else {
            return;
        };
        let deployments = items(store, "apps", "deployments");
        let ids: std::collections::HashSet<String> =
            deployments.iter().map(|(_, d)| uid(d)).collect();
        self.progress.retain(|id, _| ids.contains(id));
        for (key, d) in &deployments {
            if !deleting(d) {
                self.sync(store, &d_rt, &rs_rt, key, now);
            }
        }
        self.replicasets(store, &rs_rt, now);
        for (key, _) in &deployments {
            if let Some(d) = store.get(key).cloned().filter(|d| !deleting(d)) {
                self.sync_status(store, &d_rt, key, &d, now);
            }
        }
    }

    /// Adopt orphaned ReplicaSets the selector matches (`ClaimReplicaSets`).
    fn adopt(&self, store: &mut Store, rs_rt: &ResourceType, key: &ObjKey, d: &Value) {
        let Ok(selector) =
            LabelSelector::from_object(d.pointer("/spec/selector").unwrap_or(&Value::Null))
        else {
            return;
        };
        if selector.is_empty() {
            return;
        }
        let orphans: Vec<(ObjKey, Value)> = store
            .objects_in("apps", "replicasets", Some(&key.namespace))
            .filter(|(_, rs)| controller_uid(rs).is_none() && !deleting(rs) && selector.matches(rs))
            .map(|(k, rs)| (k.clone(), rs.clone()))
            .collect();
        for (k, rs) in orphans {
            let mut adopted = rs.clone();
            let mut refs = rs
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            refs.push(owner_ref(key, d));
            adopted["metadata"]["ownerReferences"] = json!(refs);
            write_main(store, rs_rt, &k, adopted);
        }
    }

    /// One pass of the rollout (`rolloutRolling` / `rolloutRecreate`).
    fn sync(
        &mut self,
        store: &mut Store,
        d_rt: &ResourceType,
        rs_rt: &ResourceType,
        key: &ObjKey,
        now: Instant,
    ) {
        let Some(d) = store.get(key).cloned() else {
            return;
        };
        self.adopt(store, rs_rt, key, &d);
        if d.pointer("/spec/paused") == Some(&json!(true)) {
            return;
        }
        let rss = owned(store, key, &d);
        let template = template_without_hash(&d);
        let new_key = rss
            .iter()
            .find(|(_, rs)| template_without_hash(rs) == template)
            .map(|(k, _)| k.clone());
        let olds: Vec<ObjKey> = rss
            .iter()
            .filter(|(k, _)| Some(k) != new_key.as_ref())
            .map(|(k, _)| k.clone())
            .collect();
        let max_old = rss
            .iter()
            .filter(|(k, _)| olds.contains(k))
            .map(|(_, rs)| revision(rs))
            .max()
            .unwrap_or(0);
        let new_revision = max_old + 1;
        let replicas = spec_replicas(&d);
        let get = |store: &Store, k: &ObjKey| store.get(k).cloned().unwrap_or(json!({}));

        if !rolling(&d) {
            // Recreate: all old pods go first, then the new ReplicaSet comes up.
            let mut scaled_down = false;
            for k in &olds {
                if spec_replicas(&get(store, k)) > 0 {
                    self.scale(store, rs_rt, k, &d, 0);
                    scaled_down = true;
                }
            }
            if scaled_down
                || olds
                    .iter()
                    .any(|k| int(&get(store, k), "/status/replicas") > 0)
            {
                return;
            }
            let new_key = match new_key {
                Some(k) => self.existing_new(store, d_rt, rs_rt, key, &d, &k, new_revision, now),
                None => self.create_new(store, d_rt, rs_rt, key, &d, new_revision, replicas, now),
            };
            let Some(new_key) = new_key else { return };
            if spec_replicas(&get(store, &new_key)) != replicas {
                self.scale(store, rs_rt, &new_key, &d, replicas);
                return;
            }
            self.cleanup_if_complete(store, key, &olds);
            return;
        }

        // RollingUpdate.
        let new_key = match new_key {
            Some(k) => self.existing_new(store, d_rt, rs_rt, key, &d, &k, new_revision, now),
            None => {
                let (surge, _) = fenceposts(&d);
                let current: i64 = olds.iter().map(|k| spec_replicas(&get(store, k))).sum();
                let count = (replicas + surge - current).clamp(0, replicas);
                self.create_new(store, d_rt, rs_rt, key, &d, new_revision, count, now)
            }
        };
        let Some(new_key) = new_key else { return };
        // Scale up the new ReplicaSet, if it can be.
        let new_rs = get(store, &new_key);
        let new_replicas = spec_replicas(&new_rs);
        if new_replicas > replicas {
            self.scale(store, rs_rt, &new_key, &d, replicas);
            return;
        }
        if new_replicas < replicas {
            let (surge, _) = fenceposts(&d);
            let current: i64 = olds
                .iter()
                .chain(std::iter::once(&new_key))
                .map(|k| spec_replicas(&get(store, k)))
                .sum();
            let max_total = replicas + surge;
            if current < max_total {
                let up = (max_total - current).min(replicas - new_replicas);
                self.scale(store, rs_rt, &new_key, &d, new_replicas + up);
                return;
            }
        }
        // Scale down old ReplicaSets, if it can be.
        let old_pods: i64 = olds.iter().map(|k| spec_replicas(&get(store, k))).sum();
        if old_pods > 0 {
            let all_pods = old_pods + new_replicas;
            let min_available = replicas - max_unavailable(&d);
            let new_unavailable = new_replicas - available(&new_rs);
            let max_scaled_down = all_pods - min_available - new_unavailable;
            if max_scaled_down > 0 {
                // First the old replicas that are not available.
                let mut cleaned = 0;
                for k in &olds {
                    if cleaned >= max_scaled_down {
                        break;
                    }
                    let rs = get(store, k);
                    let (want, avail) = (spec_replicas(&rs), available(&rs));
                    if want == 0 || want == avail {
                        continue;
                    }
                    let n = (max_scaled_down - cleaned).min(want - avail);
                    self.scale(store, rs_rt, k, &d, want - n);
                    cleaned += n;
                }
                // Then available ones, down to the minimum availability.
                let available_pods: i64 = olds
                    .iter()
                    .chain(std::iter::once(&new_key))
                    .map(|k| available(&get(store, k)))
                    .sum();
                let mut scaled = 0;
                if available_pods > min_available {
                    let total = available_pods - min_available;
                    for k in &olds {
                        if scaled >= total {
                            break;
                        }
                        let want = spec_replicas(&get(store, k));
                        if want == 0 {
                            continue;
                        }
                        let n = want.min(total - scaled);
                        self.scale(store, rs_rt, k, &d, want - n);
                        scaled += n;
                    }
                }
                if cleaned + scaled > 0 {
                    return;
                }
            }
        }
        self.cleanup_if_complete(store, key, &olds);
    }

    /// Scale a ReplicaSet, updating its desired/max replicas annotations (`scaleReplicaSet`).
    fn scale(&self, store: &mut Store, rs_rt: &ResourceType, k: &ObjKey, d: &Value, n: i64) {
        let Some(rs) = store.get(k).cloned() else {
            return;
        };
        let mut new = rs.clone();
        new["spec"]["replicas"] = json!(n);
        set_replicas_annotations(&mut new, d);
        if new != rs {
            write_main(store, rs_rt, k, new);
        }
    }

    /// `cleanupDeployment`: once the rollout is complete, old ReplicaSets scaled to zero
    /// beyond `revisionHistoryLimit` are deleted, oldest revision first.
    fn cleanup_if_complete(&self, store: &mut Store, key: &ObjKey, olds: &[ObjKey]) {
        let Some(d) = store.get(key).cloned() else {
            return;
        };
        if !complete(&d, d.get("status").unwrap_or(&Value::Null)) {
            return;
        }
        let limit = d
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10);
        let mut alive: Vec<(ObjKey, Value)> = olds
            .iter()
            .filter_map(|k| store.get(k).map(|rs| (k.clone(), rs.clone())))
            .filter(|(_, rs)| !deleting(rs))
            .collect();
        let excess = alive.len() as i64 - limit;
        if excess <= 0 {
            return;
        }
        alive.sort_by_key(|(_, rs)| revision(rs));
        for (k, rs) in alive.into_iter().take(excess as usize) {
            let idle = int(&rs, "/status/replicas") == 0
                && spec_replicas(&rs) == 0
                && int(&rs, "/metadata/generation") <= int(&rs, "/status/observedGeneration");
            if idle {
                delete_quietly(store, &k, None);
            }
        }
    }

    /// The ReplicaSet for the current template exists: bring its annotations up to date,
    /// and the Deployment's revision annotation (`getNewReplicaSet`).
    #[allow(clippy::too_many_arguments)]
    fn existing_new(
        &mut self,
        store: &mut Store,
        d_rt: &ResourceType,
        rs_rt: &ResourceType,
        key: &ObjKey,
        d: &Value,
        rs_key: &ObjKey,
        new_revision: i64,
        now: Instant,
    ) -> Option<ObjKey> {
        let rs = store.get(rs_key)?.clone();
        let mut updated = rs.clone();
        let annotations_changed = set_new_rs_annotations(d, &mut updated, new_revision, true);
        let min_ready = d.pointer("/spec/minReadySeconds").cloned();
        let min_ready_changed = rs.pointer("/spec/minReadySeconds") != min_ready.as_ref();
        if annotations_changed || min_ready_changed {
            match min_ready {
                Some(m) => updated["spec"]["minReadySeconds"] = m,
                None => {
                    if let Some(spec) = updated.get_mut("spec").and_then(Value::as_object_mut) {
                        spec.remove("minReadySeconds");
                    }
                }
            }
            write_main(store, rs_rt, rs_key, updated);
            return Some(rs_key.clone());
        }
        let rs_revision = annotation(&rs, REVISION).unwrap_or_default().to_string();
        let mut new_d = d.clone();
        let mut changed = false;
        if annotation(d, REVISION) != Some(rs_revision.as_str()) {
            new_d["metadata"]["annotations"][REVISION] = json!(rs_revision);
            changed = true;
        }
        let mut conds = conditions(d.get("status").unwrap_or(&Value::Null));
        if has_progress_deadline(d) && find_condition(&conds, "Progressing").is_none() {
            let msg = format!("Found new replica set \"{}\"", rs_key.name);
            set_condition(
                &mut conds,
                new_condition(
                    "Progressing",
                    "True",
                    "FoundNewReplicaSet",
                    &msg,
                    &api::now(),
                ),
            );
            new_d["status"]["conditions"] = json!(conds);
            self.progress.insert(uid(d), now);
            changed = true;
        }
        if changed {
            // UpdateStatus: the annotation goes with it, without a new generation.
            write(store, d_rt, key, new_d, Scope::Status);
        }
        Some(rs_key.clone())
    }

    /// Create the ReplicaSet for the current template (`getNewReplicaSet`).
    #[allow(clippy::too_many_arguments)]
    fn create_new(
        &mut self,
        store: &mut Store,
        d_rt: &ResourceType,
        rs_rt: &ResourceType,
        key: &ObjKey,
        d: &Value,
        new_revision: i64,
        replicas: i64,
        now: Instant,
    ) -> Option<ObjKey> {
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let collisions = d
            .pointer("/status/collisionCount")
            .and_then(Value::as_u64)
            .map(|c| c as u32);
        let hash = pod_template_hash(&template, collisions);
        let name = format!("{}-{hash}", key.name);
        let rs_key = ObjKey::new("apps", "replicasets", &key.namespace, &name);
        if store.get(&rs_key).is_some() {
            // A ReplicaSet of that name with another template: a hash collision. The
            // controller counts it and tries the next hash.
            let mut status = d.get("status").cloned().unwrap_or(json!({}));
            status["collisionCount"] = json!(collisions.unwrap_or(0) + 1);
            write_status(store, d_rt, key, status);
            return None;
        }
        let mut rs_template = template.clone();
        rs_template["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = d.pointer("/spec/selector").cloned().unwrap_or(json!({}));
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let mut rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": name,
                "namespace": key.namespace,
                "labels": rs_template["metadata"]["labels"],
                "ownerReferences": [owner_ref(key, d)],
            },
            "spec": {"replicas": replicas, "selector": selector, "template": rs_template},
        });
        if let Some(m) = d
            .pointer("/spec/minReadySeconds")
            .filter(|m| **m != json!(0))
        {
            rs["spec"]["minReadySeconds"] = m.clone();
        }
        set_new_rs_annotations(d, &mut rs, new_revision, false);
        create(store, rs_rt, &key.namespace, rs);
        store.get(&rs_key)?;
        let mut new_d = d.clone();
        new_d["metadata"]["annotations"][REVISION] = json!(new_revision.to_string());
        if has_progress_deadline(d) {
            let mut conds = conditions(d.get("status").unwrap_or(&Value::Null));
            let msg = format!("Created new replica set \"{name}\"");
            set_condition(
                &mut conds,
                new_condition(
                    "Progressing",
                    "True",
                    "NewReplicaSetCreated",
                    &msg,
                    &api::now(),
                ),
            );
            new_d["status"]["conditions"] = json!(conds);
            self.progress.insert(uid(d), now);
        }
        write(store, d_rt, key, new_d, Scope::Status);
        Some(rs_key)
    }

    /// The replicaset controller, without pods: `status.replicas` follows the spec at
    /// once; the replicas become ready and available [`ROLLOUT`] after they were asked
    /// for (never for `never_available` workloads); scaling down is immediate.
    fn replicasets(&mut self, store: &mut Store, rs_rt: &ResourceType, now: Instant) {
        let rss = items(store, "apps", "replicasets");
        let ids: std::collections::HashSet<String> = rss.iter().map(|(_, rs)| uid(rs)).collect();
        self.pending.retain(|id, _| ids.contains(id));
        for (key, rs) in rss {
            if deleting(&rs) {
                continue;
            }
            let id = uid(&rs);
            let want = spec_replicas(&rs);
            let owner = rs
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .and_then(|refs| refs.iter().find(|r| r["controller"] == true))
                .and_then(|r| r["name"].as_str())
                .map(str::to_string);
            let never = [Some(key.name.clone()), owner]
                .into_iter()
                .flatten()
                .any(|n| {
                    store
                        .never_available
                        .contains(&format!("{}/{n}", key.namespace))
                });
            let prev = available(&rs);
            let ready = if want <= prev {
                self.pending.remove(&id);
                want
            } else if never {
                self.pending.remove(&id);
                prev
            } else {
                let entry = self
                    .pending
                    .entry(id.clone())
                    .or_insert((want, now + ROLLOUT));
                if entry.0 != want {
                    *entry = (want, now + ROLLOUT);
                }
                if now >= entry.1 {
                    self.pending.remove(&id);
                    want
                } else {
                    prev
                }
            };
            let mut s = Map::new();
            s.insert("replicas".into(), json!(want));
            for (field, n) in [
                ("fullyLabeledReplicas", want),
                ("readyReplicas", ready),
                ("availableReplicas", ready),
                ("observedGeneration", int(&rs, "/metadata/generation")),
            ] {
                if n != 0 {
                    s.insert(field.into(), json!(n));
                }
            }
            if let Some(c) = rs.pointer("/status/conditions") {
                s.insert("conditions".into(), c.clone());
            }
            write_status(store, rs_rt, &key, Value::Object(s));
        }
    }

    /// `syncRolloutStatus`: the status computed from the ReplicaSets, with the
    /// Available condition and, while a rollout is under way, the Progressing one.
    fn sync_status(
        &mut self,
        store: &mut Store,
        d_rt: &ResourceType,
        key: &ObjKey,
        d: &Value,
        now: Instant,
    ) {
        let rss = owned(store, key, d);
        let template = template_without_hash(d);
        let new_rs = rss
            .iter()
            .find(|(_, rs)| template_without_hash(rs) == template);
        let replicas = spec_replicas(d);
        let old_status = d.get("status").cloned().unwrap_or(json!({}));
        let available_pods = sum(&rss, available);
        let total = sum(&rss, spec_replicas);
        let mut s = Map::new();
        let counts = [
            ("observedGeneration", int(d, "/metadata/generation")),
            ("replicas", sum(&rss, |rs| int(rs, "/status/replicas"))),
            (
                "updatedReplicas",
                new_rs.map_or(0, |(_, rs)| int(rs, "/status/replicas")),
            ),
            (
                "readyReplicas",
                sum(&rss, |rs| int(rs, "/status/readyReplicas")),
            ),
            ("availableReplicas", available_pods),
            ("unavailableReplicas", (total - available_pods).max(0)),
        ];
        for (field, n) in counts {
            if n != 0 {
                s.insert(field.into(), json!(n));
            }
        }
        if let Some(c) = old_status.get("collisionCount") {
            s.insert("collisionCount".into(), c.clone());
        }
        let ts = api::now();
        let mut conds = conditions(&old_status);
        if available_pods >= replicas - max_unavailable(d) {
            set_condition(
                &mut conds,
                new_condition(
                    "Available",
                    "True",
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.",
                    &ts,
                ),
            );
        } else {
            set_condition(
                &mut conds,
                new_condition(
                    "Available",
                    "False",
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.",
                    &ts,
                ),
            );
        }
        let new_status = Value::Object(s.clone());
        let id = uid(d);
        let what = match new_rs {
            Some((k, _)) => format!("ReplicaSet \"{}\"", k.name),
            None => format!("Deployment \"{}\"", key.name),
        };
        if d.pointer("/spec/paused") == Some(&json!(true)) {
            let msg = "Deployment is paused";
            set_condition(
                &mut conds,
                new_condition("Progressing", "Unknown", "DeploymentPaused", msg, &ts),
            );
        } else if !has_progress_deadline(d) {
            conds.retain(|c| c["type"] != "Progressing");
        } else {
            let current = find_condition(&conds, "Progressing").cloned();
            let done = int(&new_status, "/replicas") == int(&new_status, "/updatedReplicas")
                && current
                    .as_ref()
                    .is_some_and(|c| c["reason"] == "NewReplicaSetAvailable");
            if !done {
                let old_old = int(&old_status, "/replicas") - int(&old_status, "/updatedReplicas");
                let new_old = int(&new_status, "/replicas") - int(&new_status, "/updatedReplicas");
                let progressed = int(&new_status, "/updatedReplicas")
                    > int(&old_status, "/updatedReplicas")
                    || new_old < old_old
                    || int(&new_status, "/readyReplicas") > int(&old_status, "/readyReplicas")
                    || int(&new_status, "/availableReplicas")
                        > int(&old_status, "/availableReplicas");
                let deadline = Duration::from_secs(
                    d.pointer("/spec/progressDeadlineSeconds")
                        .and_then(Value::as_u64)
                        .unwrap_or(600),
                );
                let since = *self.progress.entry(id.clone()).or_insert(now);
                let timed_out = current.as_ref().is_some_and(|c| {
                    c["reason"] == "ProgressDeadlineExceeded"
                        || now.duration_since(since) > deadline
                });
                if complete(d, &new_status) {
                    let msg = format!("{what} has successfully progressed.");
                    set_condition(
                        &mut conds,
                        new_condition("Progressing", "True", "NewReplicaSetAvailable", &msg, &ts),
                    );
                } else if progressed {
                    let msg = format!("{what} is progressing.");
                    let mut c =
                        new_condition("Progressing", "True", "ReplicaSetUpdated", &msg, &ts);
                    if let Some(cur) = current.as_ref().filter(|c| c["status"] == "True") {
                        c["lastTransitionTime"] = cur["lastTransitionTime"].clone();
                    }
                    conds.retain(|c| c["type"] != "Progressing");
                    conds.push(c);
                    self.progress.insert(id.clone(), now);
                } else if timed_out {
                    let msg = format!("{what} has timed out progressing.");
                    set_condition(
                        &mut conds,
                        new_condition(
                            "Progressing",
                            "False",
                            "ProgressDeadlineExceeded",
                            &msg,
                            &ts,
                        ),
                    );
                }
            }
        }
        if !conds.is_empty() {
            s.insert("conditions".into(), json!(conds));
        }
        write_status(store, d_rt, key, Value::Object(s));
    }
}

fn owner_ref(key: &ObjKey, d: &Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "name": key.name, "uid": uid(d),
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// `SetReplicasAnnotations`: the Deployment's replicas and replicas plus surge.
fn set_replicas_annotations(rs: &mut Value, d: &Value) {
    let replicas = spec_replicas(d);
    let (surge, _) = fenceposts(d);
    rs["metadata"]["annotations"][DESIRED_REPLICAS] = json!(replicas.to_string());
    rs["metadata"]["annotations"][MAX_REPLICAS] = json!((replicas + surge).to_string());
}

/// `SetNewReplicaSetAnnotations`: copy the Deployment's annotations (added or changed
/// ones; removed ones stay), raise the revision (keeping the old one in the revision
/// history when a ReplicaSet comes back), and on creation set the replicas
/// annotations. Returns whether anything changed.
fn set_new_rs_annotations(d: &Value, rs: &mut Value, new_revision: i64, exists: bool) -> bool {
    let mut changed = false;
    let from = d
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if !rs["metadata"]["annotations"].is_object() {
        rs["metadata"]["annotations"] = json!({});
    }
    let ann = &mut rs["metadata"]["annotations"];
    for (k, v) in from {
        if NOT_COPIED.contains(&k.as_str()) || ann.get(&k) == Some(&v) {
            continue;
        }
        ann[k.as_str()] = v;
        changed = true;
    }
    let old = ann
        .get(REVISION)
        .and_then(Value::as_str)
        .map(str::to_string);
    let old_revision: i64 = old.as_deref().and_then(|r| r.parse().ok()).unwrap_or(0);
    if old_revision < new_revision {
        ann[REVISION] = json!(new_revision.to_string());
        changed = true;
        if let Some(old) = old {
            let history = ann
                .get(REVISION_HISTORY)
                .and_then(Value::as_str)
                .unwrap_or("");
            ann[REVISION_HISTORY] = json!(if history.is_empty() {
                old
            } else {
                format!("{history},{old}")
            });
        }
    }
    if !exists {
        set_replicas_annotations(rs, d);
        changed = true;
    }
    changed
}
