//! The endpoints and endpointslice controllers of kube-controller-manager (1.24), for
//! a cluster without pods: every Service with a selector gets an `Endpoints` object
//! (same name, the Service's labels, no subsets) and a placeholder `EndpointSlice`
//! per address type (`<service>-<random>`, owned by the Service, no endpoints).

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::api::{self, meta_str};
use super::controllers::{create, delete_quietly, deleting, items, uid, write_main};
use super::resources::{self, ResourceType, DISCOVERY_GROUP};
use super::store::{ObjKey, Store};

/// Set on the children of headless Services (`clusterIP: None`).
const HEADLESS: &str = "service.kubernetes.io/headless";
/// EndpointSlice labels the endpointslice controller owns (reserved: never copied).
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Default)]
pub(crate) struct EndpointsControllers {
    /// `namespace/name` of every Service seen, to delete its Endpoints once it is gone.
    services: HashSet<(String, String)>,
    /// Service uids each controller's trigger-time tracker knows: the first sync of a
    /// Service exports its creation time as the last-change trigger time, later ones
    /// (with no pods ever changing) export none.
    endpoints_synced: HashSet<String>,
    slices_synced: HashSet<String>,
}

fn labels(obj: &Value) -> Map<String, Value> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Set `metadata.<field>`, leaving it out when empty (as an empty map is stored).
fn set_meta_map(obj: &mut Value, field: &str, m: Map<String, Value>) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if m.is_empty() {
            meta.remove(field);
        } else {
            meta.insert(field.into(), Value::Object(m));
        }
    }
}

/// Whether the controllers give the Service endpoints: it has a (non-empty) selector.
/// In 1.24 that includes ExternalName Services (controllers from 1.27 skip them).
fn has_endpoints(svc: &Value) -> bool {
    svc.pointer("/spec/selector")
        .and_then(Value::as_object)
        .is_some_and(|m| !m.is_empty())
}

/// The slices' address types (`getAddressTypesForService`): the Service's IP
/// families; without any, the family of its cluster IP; without one (ExternalName),
/// both.
fn address_types(svc: &Value) -> Vec<String> {
    let families: Vec<String> = svc
        .pointer("/spec/ipFamilies")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .filter_map(Value::as_str)
                .filter(|f| matches!(*f, "IPv4" | "IPv6"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if !families.is_empty() {
        return families;
    }
    if headless(svc) {
        return vec!["IPv4".to_string(), "IPv6".to_string()];
    }
    let ip = svc
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default();
    vec![if ip.contains(':') { "IPv6" } else { "IPv4" }.to_string()]
}

/// `!IsServiceIPSet`: no cluster IP, or `None`.
fn headless(svc: &Value) -> bool {
    matches!(
        svc.pointer("/spec/clusterIP").and_then(Value::as_str),
        None | Some("") | Some("None")
    )
}

fn is_empty_list(v: Option<&Value>) -> bool {
    v.is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty))
}

impl EndpointsControllers {
    pub(crate) fn step(&mut self, store: &mut Store) {
        let (Some(ep_rt), Some(slice_rt)) = (
            resources::builtin("", "endpoints"),
            resources::builtin(DISCOVERY_GROUP, "endpointslices"),
        ) else {
            return;
        };
        let services = items(store, "", "services");
        let present: HashSet<(String, String)> = services
            .iter()
            .map(|(k, _)| (k.namespace.clone(), k.name.clone()))
            .collect();
        let uids: HashSet<String> = services.iter().map(|(_, s)| uid(s)).collect();
        // A Service that is gone: the endpoints controller deletes the Endpoints of that
        // name (the garbage collector takes the EndpointSlices, by owner reference).
        let gone: Vec<(String, String)> = self.services.difference(&present).cloned().collect();
        for (ns, name) in gone {
            self.services.remove(&(ns.clone(), name.clone()));
            let key = ObjKey::new("", "endpoints", &ns, &name);
            if store.get(&key).is_some() {
                delete_quietly(store, &key, None);
            }
        }
        self.endpoints_synced.retain(|u| uids.contains(u));
        self.slices_synced.retain(|u| uids.contains(u));
        for (key, svc) in services {
            self.services
                .insert((key.namespace.clone(), key.name.clone()));
            if !has_endpoints(&svc) {
                continue;
            }
            self.sync_endpoints(store, &ep_rt, &key, &svc);
            self.sync_slices(store, &slice_rt, &key, &svc);
        }
    }

    fn sync_endpoints(&mut self, store: &mut Store, rt: &ResourceType, key: &ObjKey, svc: &Value) {
        let first = self.endpoints_synced.insert(uid(svc));
        let trigger = first
            .then(|| meta_str(svc, "creationTimestamp").map(str::to_string))
            .flatten();
        let svc_labels = labels(svc);
        let mut desired = svc_labels.clone();
        if headless(svc) {
            desired.insert(HEADLESS.into(), json!(""));
        } else {
            desired.remove(HEADLESS);
        }
        let ep_key = ObjKey::new("", "endpoints", &key.namespace, &key.name);
        let current = store.get(&ep_key).cloned();
        let mut new = match current {
            None => json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": key.name, "namespace": key.namespace},
            }),
            Some(ep) => {
                // Subsets stay empty (no pods): only the labels can differ.
                let mut compare = labels(&ep);
                compare.remove(HEADLESS);
                if compare == svc_labels {
                    return;
                }
                ep
            }
        };
        set_meta_map(&mut new, "labels", desired);
        let mut annotations = new
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        match trigger {
            Some(t) => {
                annotations.insert(TRIGGER_TIME.into(), json!(t));
            }
            None => {
                annotations.remove(TRIGGER_TIME);
            }
        }
        set_meta_map(&mut new, "annotations", annotations);
        if store.get(&ep_key).is_some() {
            write_main(store, rt, &ep_key, new);
        } else {
            create(store, rt, &key.namespace, new);
        }
    }

    fn sync_slices(&mut self, store: &mut Store, rt: &ResourceType, key: &ObjKey, svc: &Value) {
        let first = self.slices_synced.insert(uid(svc));
        let trigger = first
            .then(|| meta_str(svc, "creationTimestamp").map(str::to_string))
            .flatten();
        let svc_uid = uid(svc);
        let mut desired = labels(svc);
        desired.remove(SERVICE_NAME);
        desired.remove(MANAGED_BY);
        if headless(svc) {
            desired.insert(HEADLESS.into(), json!(""));
        } else {
            desired.remove(HEADLESS);
        }
        desired.insert(SERVICE_NAME.into(), json!(key.name));
        desired.insert(MANAGED_BY.into(), json!(SLICE_CONTROLLER));
        let owner = json!([{
            "apiVersion": "v1", "kind": "Service", "name": key.name, "uid": svc_uid,
            "controller": true, "blockOwnerDeletion": true,
        }]);
        let families = address_types(svc);
        let owned_by_svc = |s: &Value| {
            s.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| {
                    refs.iter()
                        .any(|r| r["uid"] == svc_uid.as_str() && r["controller"] == true)
                })
        };
        // The slices the controller lists for the Service: by its two labels.
        let slices: Vec<(ObjKey, Value)> = store
            .objects_in(DISCOVERY_GROUP, "endpointslices", Some(&key.namespace))
            .filter(|(_, s)| {
                let l = labels(s);
                l.get(SERVICE_NAME) == Some(&json!(key.name))
                    && l.get(MANAGED_BY) == Some(&json!(SLICE_CONTROLLER))
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let mut by_family: HashMap<String, Vec<(ObjKey, Value)>> = HashMap::new();
        for (k, s) in slices {
            let family = s["addressType"].as_str().unwrap_or_default().to_string();
            if owned_by_svc(&s) && families.contains(&family) {
                by_family.entry(family).or_default().push((k, s));
            } else if !deleting(&s) {
                // Another (older) Service's, or a family the Service no longer has.
                delete_quietly(store, &k, None);
            }
        }
        for family in &families {
            let placeholder = |name: Option<&str>| {
                let mut meta = json!({
                    "namespace": key.namespace,
                    "generateName": format!("{}-", key.name),
                    "labels": desired,
                    "ownerReferences": owner,
                });
                meta["name"] = json!(name
                    .map(str::to_string)
                    .unwrap_or_else(|| { api::generate_name(&format!("{}-", key.name)) }));
                if let Some(t) = &trigger {
                    meta["annotations"] = json!({TRIGGER_TIME: t});
                }
                // No pods: no endpoints and no ports (stored as null, no omitempty).
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": meta,
                    "addressType": family,
                    "endpoints": null,
                    "ports": null,
                })
            };
            let mut existing = by_family.remove(family).unwrap_or_default();
            existing.sort_by(|a, b| a.0.cmp(&b.0));
            let mut rest = existing.into_iter();
            match rest.next() {
                None => {
                    // Not while the Service is being deleted (the garbage collector would
                    // race the controller).
                    if !deleting(svc) {
                        create(store, rt, &key.namespace, placeholder(None));
                    }
                }
                Some((k, s)) => {
                    let same = labels(&s) == desired
                        && s.pointer("/metadata/ownerReferences") == Some(&owner)
                        && is_empty_list(s.get("endpoints"))
                        && is_empty_list(s.get("ports"));
                    if !same {
                        // The placeholder is replaced in place: an update of the whole
                        // object, keeping the name.
                        write_main(store, rt, &k, placeholder(Some(&k.name)));
                    }
                }
            }
            for (k, s) in rest {
                if !deleting(&s) {
                    delete_quietly(store, &k, None);
                }
            }
        }
    }
}
