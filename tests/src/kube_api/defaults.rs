//! Per-kind defaulting, allocation (cluster IPs, node ports) and validation of
//! built-in kinds, after the real API server's registry strategies.

use base64::Engine;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ApiResult, Cause};
use super::resources::ResourceType;
use super::selectors::LabelSelector;
use super::store::Store;

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    let Value::Object(m) = v else {
        unreachable!("just made an object")
    };
    let entry = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    match entry {
        Value::Object(inner) => inner,
        _ => unreachable!("just made an object"),
    }
}

fn default_field(m: &mut Map<String, Value>, key: &str, value: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), value);
    }
}

fn kind_key(rt: &ResourceType) -> (&str, &str) {
    (rt.group.as_str(), rt.kind.as_str())
}

/// Apply defaults to a (new or updated) object. `live` is the stored object on updates.
pub(crate) fn apply_defaults(
    rt: &ResourceType,
    obj: &mut Value,
    store: &mut Store,
    live: Option<&Value>,
) {
    if rt.custom {
        return;
    }
    let creating = live.is_none();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    match kind_key(rt) {
        ("", "Namespace") => {
            let meta = obj_mut(obj, "metadata");
            obj_mut_in(meta, "labels").insert("kubernetes.io/metadata.name".into(), json!(name));
            // The namespace strategy: a create always gets the `kubernetes` finalizer;
            // an update cannot change `spec.finalizers` (only `/finalize` can).
            match live {
                None => {
                    let spec = obj_mut(obj, "spec");
                    let mut finalizers: Vec<Value> = spec
                        .get("finalizers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    if !finalizers.iter().any(|f| f == "kubernetes") {
                        finalizers.push(json!("kubernetes"));
                    }
                    spec.insert("finalizers".into(), json!(finalizers));
                }
                Some(l) => {
                    let old = l.pointer("/spec/finalizers").cloned();
                    let spec = obj_mut(obj, "spec");
                    match old {
                        Some(f) => {
                            spec.insert("finalizers".into(), f);
                        }
                        None => {
                            spec.remove("finalizers");
                        }
                    }
                }
            }
            let status = obj_mut(obj, "status");
            default_field(status, "phase", json!("Active"));
        }
        ("", "Secret") => {
            default_field(obj_mut_root(obj), "type", json!("Opaque"));
            if let Some(Value::Object(string_data)) = obj_mut_root(obj).remove("stringData") {
                let data = obj_mut(obj, "data");
                for (k, v) in string_data {
                    let s = v.as_str().unwrap_or_default();
                    data.insert(
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(s.as_bytes())),
                    );
                }
            }
        }
        ("", "Service") => {
            if let Some(live) = live {
                keep_allocated(obj, live);
            }
            default_service(obj, store, creating)
        }
        ("", "PersistentVolumeClaim") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "volumeMode", json!("Filesystem"));
            let status = obj_mut(obj, "status");
            default_field(status, "phase", json!("Pending"));
            if creating {
                add_finalizer(obj, "kubernetes.io/pvc-protection");
            }
        }
        ("", "Pod") => {
            default_pod_spec(obj_mut(obj, "spec"), Some("Always"));
            let status = obj_mut(obj, "status");
            default_field(status, "phase", json!("Pending"));
            default_field(status, "qosClass", json!("BestEffort"));
        }
        ("apps", "Deployment") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "replicas", json!(1));
            default_field(spec, "revisionHistoryLimit", json!(10));
            default_field(spec, "progressDeadlineSeconds", json!(600));
            let strategy = obj_mut_in(spec, "strategy");
            default_field(strategy, "type", json!("RollingUpdate"));
            if strategy.get("type") == Some(&json!("RollingUpdate")) {
                let ru = obj_mut_in(strategy, "rollingUpdate");
                default_field(ru, "maxSurge", json!("25%"));
                default_field(ru, "maxUnavailable", json!("25%"));
            }
            default_template(spec, Some("Always"));
            obj_mut(obj, "status");
        }
        ("apps", "ReplicaSet") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "replicas", json!(1));
            default_template(spec, Some("Always"));
            default_field(obj_mut(obj, "status"), "replicas", json!(0));
        }
        ("apps", "StatefulSet") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "replicas", json!(1));
            default_field(spec, "podManagementPolicy", json!("OrderedReady"));
            default_field(spec, "revisionHistoryLimit", json!(10));
            let us = obj_mut_in(spec, "updateStrategy");
            default_field(us, "type", json!("RollingUpdate"));
            if us.get("type") == Some(&json!("RollingUpdate")) {
                default_field(obj_mut_in(us, "rollingUpdate"), "partition", json!(0));
            }
            let retention = obj_mut_in(spec, "persistentVolumeClaimRetentionPolicy");
            default_field(retention, "whenDeleted", json!("Retain"));
            default_field(retention, "whenScaled", json!("Retain"));
            default_template(spec, Some("Always"));
            let status = obj_mut(obj, "status");
            default_field(status, "replicas", json!(0));
            default_field(status, "availableReplicas", json!(0));
        }
        ("apps", "DaemonSet") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "revisionHistoryLimit", json!(10));
            let us = obj_mut_in(spec, "updateStrategy");
            default_field(us, "type", json!("RollingUpdate"));
            if us.get("type") == Some(&json!("RollingUpdate")) {
                let ru = obj_mut_in(us, "rollingUpdate");
                default_field(ru, "maxUnavailable", json!(1));
                default_field(ru, "maxSurge", json!(0));
            }
            default_template(spec, Some("Always"));
            let status = obj_mut(obj, "status");
            for f in [
                "currentNumberScheduled",
                "numberMisscheduled",
                "desiredNumberScheduled",
                "numberReady",
            ] {
                default_field(status, f, json!(0));
            }
        }
        ("batch", "Job") => default_job(obj, creating),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            let spec = obj_mut(obj, "spec");
            default_field(spec, "conversion", json!({"strategy": "None"}));
            if creating {
                add_finalizer(obj, "customresourcecleanup.apiextensions.k8s.io");
                let storage = obj
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .and_then(|vs| vs.iter().find(|v| v["storage"] == true))
                    .and_then(|v| v["name"].as_str())
                    .map(str::to_string);
                let status = obj_mut(obj, "status");
                default_field(status, "acceptedNames", json!({"kind": "", "plural": ""}));
                if let Some(s) = storage {
                    default_field(status, "storedVersions", json!([s]));
                }
            }
        }
        _ => {}
    }
}

fn obj_mut_root(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = json!({});
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

fn obj_mut_in<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let entry = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    match entry {
        Value::Object(inner) => inner,
        _ => unreachable!("just made an object"),
    }
}

fn add_finalizer(obj: &mut Value, finalizer: &str) {
    let meta = obj_mut(obj, "metadata");
    let list = meta.entry("finalizers").or_insert_with(|| json!([]));
    if let Value::Array(items) = list {
        if !items.iter().any(|f| f == finalizer) {
            items.push(json!(finalizer));
        }
    }
}

fn default_template(spec: &mut Map<String, Value>, restart: Option<&str>) {
    let template = obj_mut_in(spec, "template");
    default_pod_spec(obj_mut_in(template, "spec"), restart);
}

fn default_pod_spec(spec: &mut Map<String, Value>, restart: Option<&str>) {
    if let Some(r) = restart {
        default_field(spec, "restartPolicy", json!(r));
    }
    default_field(spec, "terminationGracePeriodSeconds", json!(30));
    default_field(spec, "dnsPolicy", json!("ClusterFirst"));
    default_field(spec, "securityContext", json!({}));
    default_field(spec, "schedulerName", json!("default-scheduler"));
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for c in cs.iter_mut() {
                let Value::Object(c) = c else { continue };
                let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
                let last = image.rsplit('/').next().unwrap_or_default();
                let latest =
                    !last.contains(':') && !image.contains('@') || last.ends_with(":latest");
                let policy = if latest { "Always" } else { "IfNotPresent" };
                default_field(c, "imagePullPolicy", json!(policy));
                default_field(c, "terminationMessagePath", json!("/dev/termination-log"));
                default_field(c, "terminationMessagePolicy", json!("File"));
                default_field(c, "resources", json!({}));
                if let Some(Value::Array(ports)) = c.get_mut("ports") {
                    for p in ports.iter_mut() {
                        if let Value::Object(p) = p {
                            default_field(p, "protocol", json!("TCP"));
                        }
                    }
                }
            }
        }
    }
    if let Some(Value::Array(vols)) = spec.get_mut("volumes") {
        for v in vols.iter_mut() {
            let Value::Object(v) = v else { continue };
            for src in ["configMap", "secret"] {
                if let Some(Value::Object(s)) = v.get_mut(src) {
                    default_field(s, "defaultMode", json!(420));
                }
            }
        }
    }
}

fn default_service(obj: &mut Value, store: &mut Store, creating: bool) {
    let spec = obj_mut(obj, "spec");
    default_field(spec, "type", json!("ClusterIP"));
    let svc_type = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    default_field(spec, "sessionAffinity", json!("None"));
    if svc_type != "ExternalName" {
        let ip = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if ip.is_empty() && creating {
            let n = store.next_cluster_ip;
            store.next_cluster_ip += 1;
            let ip = format!("10.96.{}.{}", (n / 250) % 256, n % 250 + 2);
            spec.insert("clusterIP".into(), json!(ip));
            spec.insert("clusterIPs".into(), json!([ip]));
        } else if !ip.is_empty() {
            default_field(spec, "clusterIPs", json!([ip]));
        }
        default_field(spec, "ipFamilies", json!(["IPv4"]));
        default_field(spec, "ipFamilyPolicy", json!("SingleStack"));
        default_field(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    let node_ports = svc_type == "NodePort" || svc_type == "LoadBalancer";
    if node_ports {
        default_field(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if svc_type == "LoadBalancer" {
        default_field(spec, "allocateLoadBalancerNodePorts", json!(true));
    }
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports.iter_mut() {
            let Value::Object(p) = p else { continue };
            default_field(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                default_field(p, "targetPort", port);
            }
            if node_ports && p.get("nodePort").is_none_or(Value::is_null) {
                let free = (30000u16..=32767).find(|n| !store.used_node_ports.contains(n));
                if let Some(n) = free {
                    store.used_node_ports.insert(n);
                    p.insert("nodePort".into(), json!(n));
                }
            }
        }
    }
    let status = obj_mut(obj, "status");
    default_field(status, "loadBalancer", json!({}));
}

/// An update that leaves out allocated values keeps them (the Service registry's
/// `patchAllocatedValues`): the cluster IPs, and the node port of each port (by port
/// number and protocol) while the type still needs node ports.
fn keep_allocated(obj: &mut Value, live: &Value) {
    let ty = |v: &Value| {
        v.pointer("/spec/type")
            .and_then(Value::as_str)
            .unwrap_or("ClusterIP")
            .to_string()
    };
    let (old_type, new_type) = (ty(live), ty(obj));
    if old_type == "ExternalName" || new_type == "ExternalName" {
        return;
    }
    let spec = obj_mut(obj, "spec");
    let unset = |v: Option<&Value>| v.is_none_or(|v| v.is_null() || v == "");
    if unset(spec.get("clusterIP")) {
        if let Some(ip) = live.pointer("/spec/clusterIP") {
            spec.insert("clusterIP".into(), ip.clone());
        }
    }
    let no_ips = spec
        .get("clusterIPs")
        .is_none_or(|v| v.is_null() || v.as_array().is_some_and(Vec::is_empty));
    if no_ips && spec.get("clusterIP") == live.pointer("/spec/clusterIP") {
        if let Some(ips) = live.pointer("/spec/clusterIPs") {
            spec.insert("clusterIPs".into(), ips.clone());
        }
    }
    let node_ports = |t: &str| t == "NodePort" || t == "LoadBalancer";
    if !(node_ports(&old_type) && node_ports(&new_type)) {
        return;
    }
    let old_ports = live
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(Value::Array(ports)) = spec.get_mut("ports") {
        for p in ports.iter_mut() {
            let Value::Object(p) = p else { continue };
            if p.get("nodePort").is_some_and(|n| !n.is_null()) {
                continue;
            }
            let protocol = |m: &Map<String, Value>| {
                m.get("protocol")
                    .and_then(Value::as_str)
                    .unwrap_or("TCP")
                    .to_string()
            };
            let found = old_ports
                .iter()
                .filter_map(Value::as_object)
                .find(|o| o.get("port") == p.get("port") && protocol(o) == protocol(p));
            if let Some(n) = found.and_then(|o| o.get("nodePort")) {
                p.insert("nodePort".into(), n.clone());
            }
        }
    }
}

fn default_job(obj: &mut Value, creating: bool) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let spec = obj_mut(obj, "spec");
    let parallelism_set = spec.get("parallelism").is_some_and(|v| !v.is_null());
    default_field(spec, "parallelism", json!(1));
    if !parallelism_set {
        default_field(spec, "completions", json!(1));
    }
    default_field(spec, "backoffLimit", json!(6));
    default_field(spec, "completionMode", json!("NonIndexed"));
    default_field(spec, "suspend", json!(false));
    default_field(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    let manual = spec.get("manualSelector") == Some(&json!(true));
    if creating && !manual {
        spec.insert(
            "selector".into(),
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        );
        let template = obj_mut_in(spec, "template");
        let labels = obj_mut_in(obj_mut_in(template, "metadata"), "labels");
        labels.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
        labels.insert("batch.kubernetes.io/job-name".into(), json!(name));
        labels.insert("controller-uid".into(), json!(uid));
        labels.insert("job-name".into(), json!(name));
    }
    default_template(spec, None);
    obj_mut(obj, "status");
}

// ---------------------------------------------------------------------------
// Validation

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1035_LABEL: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

fn is_dns1035(s: &str) -> bool {
    is_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn name_causes(rt: &ResourceType, name: &str) -> Vec<Cause> {
    let v = json!(name);
    let bad = |msg: &str| vec![Cause::invalid("metadata.name", &v, msg)];
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") if !is_label(name) => bad(DNS1123_LABEL),
        ("", "services") if !is_dns1035(name) => bad(DNS1035_LABEL),
        ("", "namespaces" | "services") => vec![],
        ("rbac.authorization.k8s.io", _) => {
            if name == "." || name == ".." {
                bad(&format!("may not be '{name}'"))
            } else if name.contains('/') || name.contains('%') {
                bad("may not contain '/' or '%'")
            } else {
                vec![]
            }
        }
        _ if !is_subdomain(name) => bad(DNS1123_SUBDOMAIN),
        _ => vec![],
    }
}

fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn metadata_causes(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let Some(s) = v.as_str() else {
                causes.push(Cause::invalid(
                    format!("metadata.labels.{k}"),
                    v,
                    "label values must be strings",
                ));
                continue;
            };
            if !label_value_ok(s) {
                causes.push(Cause::invalid(
                    "metadata.labels",
                    v,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
                ));
            }
        }
    }
    if let Some(ann) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        for (k, v) in ann {
            if !v.is_string() {
                causes.push(Cause::invalid(
                    format!("metadata.annotations.{k}"),
                    v,
                    "annotation values must be strings",
                ));
            }
        }
    }
    causes
}

fn containers_causes(pod_spec: &Value, prefix: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    match pod_spec.get("containers").and_then(Value::as_array) {
        Some(cs) if !cs.is_empty() => {
            for (i, c) in cs.iter().enumerate() {
                if c["name"].as_str().is_none_or(str::is_empty) {
                    causes.push(Cause::required(
                        format!("{prefix}.containers[{i}].name"),
                        "",
                    ));
                }
                if c["image"].as_str().is_none_or(str::is_empty) {
                    causes.push(Cause::required(
                        format!("{prefix}.containers[{i}].image"),
                        "",
                    ));
                }
            }
        }
        _ => causes.push(Cause::required(format!("{prefix}.containers"), "")),
    }
    causes
}

fn workload_causes(obj: &Value, needs_selector: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    let selector = obj.pointer("/spec/selector");
    let template_labels = obj
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    match selector {
        Some(sel) if sel.is_object() => {
            let empty = sel
                .get("matchLabels")
                .and_then(Value::as_object)
                .is_none_or(Map::is_empty)
                && sel
                    .get("matchExpressions")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            if empty && needs_selector {
                causes.push(Cause::invalid(
                    "spec.selector",
                    sel,
                    "empty selector is invalid for deployment",
                ));
            } else {
                match LabelSelector::from_object(sel) {
                    Ok(s) => {
                        let fake = json!({"metadata": {"labels": template_labels}});
                        if !s.matches(&fake) {
                            causes.push(Cause::invalid(
                                "spec.template.metadata.labels",
                                &template_labels,
                                "`selector` does not match template `labels`",
                            ));
                        }
                    }
                    Err(e) => causes.push(Cause::invalid("spec.selector", sel, &e)),
                }
            }
        }
        _ if needs_selector => causes.push(Cause::required("spec.selector", "")),
        _ => {}
    }
    causes.extend(containers_causes(
        obj.pointer("/spec/template/spec").unwrap_or(&Value::Null),
        "spec.template.spec",
    ));
    causes
}

fn changed(old: &Value, new: &Value, pointer: &str) -> bool {
    old.pointer(pointer) != new.pointer(pointer)
}

/// Validate an object about to be written (`old` is the stored version on updates).
pub(crate) fn validate(rt: &ResourceType, old: Option<&Value>, obj: &Value) -> ApiResult<()> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut causes = Vec::new();
    if old.is_none() {
        causes.extend(name_causes(rt, name));
    }
    causes.extend(metadata_causes(obj));
    if !rt.custom {
        causes.extend(kind_causes(rt, old, obj));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(rt, name, causes))
    }
}

fn kind_causes(rt: &ResourceType, old: Option<&Value>, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match kind_key(rt) {
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            causes.extend(workload_causes(obj, true));
            if let Some(old) = old {
                if changed(old, obj, "/spec/selector") {
                    causes.push(Cause::immutable(
                        "spec.selector",
                        obj.pointer("/spec/selector").unwrap_or(&Value::Null),
                    ));
                }
                if rt.kind == "StatefulSet" {
                    let mut a = old["spec"].clone();
                    let mut b = obj["spec"].clone();
                    for f in [
                        "replicas",
                        "ordinals",
                        "template",
                        "updateStrategy",
                        "persistentVolumeClaimRetentionPolicy",
                        "minReadySeconds",
                    ] {
                        if let Some(m) = a.as_object_mut() {
                            m.remove(f);
                        }
                        if let Some(m) = b.as_object_mut() {
                            m.remove(f);
                        }
                    }
                    if a != b {
                        causes.push(Cause::forbidden("spec", "updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"));
                    }
                }
            }
        }
        ("batch", "Job") => {
            causes.extend(containers_causes(
                obj.pointer("/spec/template/spec").unwrap_or(&Value::Null),
                "spec.template.spec",
            ));
            let restart = obj
                .pointer("/spec/template/spec/restartPolicy")
                .and_then(Value::as_str);
            match restart {
                Some("Never" | "OnFailure") => {}
                Some(other) => causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "spec.template.spec.restartPolicy".into(),
                    message: format!(
                        "Unsupported value: {other:?}: supported values: \"OnFailure\", \"Never\""
                    ),
                }),
                None => causes.push(Cause::required("spec.template.spec.restartPolicy", "")),
            }
            if let Some(old) = old {
                if changed(old, obj, "/spec/selector") {
                    causes.push(Cause::immutable(
                        "spec.selector",
                        obj.pointer("/spec/selector").unwrap_or(&Value::Null),
                    ));
                }
                if changed(old, obj, "/spec/template")
                    && old.pointer("/spec/suspend") != Some(&json!(true))
                {
                    causes.push(Cause::immutable(
                        "spec.template",
                        obj.pointer("/spec/template").unwrap_or(&Value::Null),
                    ));
                }
                if changed(old, obj, "/spec/completions") {
                    causes.push(Cause::immutable(
                        "spec.completions",
                        obj.pointer("/spec/completions").unwrap_or(&Value::Null),
                    ));
                }
            }
        }
        ("", "Pod") => {
            causes.extend(containers_causes(
                obj.get("spec").unwrap_or(&Value::Null),
                "spec",
            ));
        }
        ("", "Service") => {
            let ty = obj
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            let headless = obj.pointer("/spec/clusterIP") == Some(&json!("None"));
            let ports = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(Vec::len)
                .unwrap_or(0);
            if ports == 0 && ty != "ExternalName" && !headless {
                causes.push(Cause::required("spec.ports", ""));
            }
            if let Some(old) = old {
                let old_ip = old
                    .pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let new_ip = obj
                    .pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !old_ip.is_empty() && old_ip != new_ip && ty != "ExternalName" {
                    causes.push(Cause::immutable("spec.clusterIPs[0]", &json!(new_ip)));
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            if let Some(old) = old {
                let strip = |v: &Value| {
                    let mut s = v["spec"].clone();
                    if let Some(m) = s.as_object_mut() {
                        m.remove("resources");
                        m.remove("volumeName");
                        m.remove("volumeAttributesClassName");
                    }
                    s
                };
                if strip(old) != strip(obj) {
                    causes.push(Cause::forbidden(
                        "spec",
                        "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
                    ));
                }
            }
        }
        ("", "ConfigMap" | "Secret") => {
            if let Some(old) = old {
                if old.get("immutable") == Some(&json!(true)) {
                    if obj.get("immutable") != Some(&json!(true)) {
                        causes.push(Cause::forbidden(
                            "immutable",
                            "field is immutable when `immutable` is set",
                        ));
                    }
                    if changed(old, obj, "/data") || changed(old, obj, "/binaryData") {
                        causes.push(Cause::forbidden(
                            "data",
                            "field is immutable when `immutable` is set",
                        ));
                    }
                }
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            causes.extend(crd_causes(old, obj));
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let address_type = obj.get("addressType").unwrap_or(&Value::Null);
            match address_type.as_str() {
                None | Some("") => causes.push(Cause::required("addressType", "")),
                Some("IPv4" | "IPv6" | "FQDN") => {}
                Some(other) => causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "addressType".into(),
                    message: format!(
                        "Unsupported value: {other:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
                    ),
                }),
            }
            if let Some(old) = old {
                if changed(old, obj, "/addressType") {
                    causes.push(Cause::immutable("addressType", address_type));
                }
            }
        }
        _ => {}
    }
    causes
}

fn crd_causes(old: Option<&Value>, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if group.is_empty() {
        causes.push(Cause::required("spec.group", ""));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural", ""));
    }
    if spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        causes.push(Cause::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: "spec.scope".into(),
            message: format!(
                "Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""
            ),
        }),
        None => causes.push(Cause::required("spec.scope", "")),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    } else {
        let storage = versions.iter().filter(|v| v["storage"] == true).count();
        if storage != 1 {
            causes.push(Cause::invalid(
                "spec.versions",
                &json!(versions.len()),
                "must have exactly one version marked as storage version",
            ));
        }
        for (i, v) in versions.iter().enumerate() {
            if v.pointer("/schema/openAPIV3Schema").is_none() {
                causes.push(Cause::required(
                    format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    "schemas are required",
                ));
            }
        }
    }
    if let Some(old) = old {
        if changed(old, obj, "/spec/scope") {
            causes.push(Cause::immutable("spec.scope", &spec["scope"]));
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_subdomain("web.example-1"));
        assert!(!is_subdomain("Web"));
        assert!(is_label("ns-1"));
        assert!(!is_label("a.b"));
        assert!(is_dns1035("svc"));
        assert!(!is_dns1035("1svc"));
    }
}
