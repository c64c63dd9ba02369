//! The resource types the server knows (built-in ones and those of established
//! CustomResourceDefinitions) and the discovery documents built from them.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::store::Store;

/// The API group of CustomResourceDefinitions.
pub(crate) const CRD_GROUP: &str = "apiextensions.k8s.io";
/// The API group of EndpointSlices.
pub(crate) const DISCOVERY_GROUP: &str = "discovery.k8s.io";

/// One resource (like `apps/v1 deployments`) as served at one version.
#[derive(Debug, Clone)]
pub(crate) struct ResourceType {
    pub group: String,
    /// The version this view serves (the URL's version).
    pub version: String,
    /// The version objects are stored at (equal to `version` for built-ins).
    pub storage_version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Whether a `/status` subresource exists (main-resource writes then ignore `status`).
    pub status_subresource: bool,
    /// Served by a CustomResourceDefinition (unstructured semantics).
    pub custom: bool,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
    /// Whether a successful delete answers with the deleted object instead of a `Status`.
    pub returns_deleted_object: bool,
    /// For custom resources: the version's `openAPIV3Schema`.
    pub schema: Option<Value>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        group_version(&self.group, &self.version)
    }

    pub fn storage_api_version(&self) -> String {
        group_version(&self.group, &self.storage_version)
    }

    /// `deployments.apps` / `configmaps`.
    pub fn qualified(&self) -> String {
        super::error::qualified(&self.group, &self.plural)
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.group.is_empty() && self.plural == "namespaces" {
            vec![
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        } else {
            vec![
                "create",
                "delete",
                "deletecollection",
                "get",
                "list",
                "patch",
                "update",
                "watch",
            ]
        }
    }

    fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }

    pub fn is_namespace(&self) -> bool {
        self.is("", "namespaces")
    }
}

pub(crate) fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

struct Builtin {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    all: bool,
    status: bool,
    generation: bool,
    returns_deleted_object: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        short: &["ns"],
        all: false,
        status: true,
        generation: false,
        returns_deleted_object: true,
    },
    Builtin {
        group: "",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
        short: &["cm"],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
        short: &[],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "",
        kind: "Service",
        plural: "services",
        namespaced: true,
        short: &["svc"],
        all: true,
        status: true,
        generation: false,
        returns_deleted_object: true,
    },
    Builtin {
        group: "",
        kind: "Endpoints",
        plural: "endpoints",
        namespaced: true,
        short: &["ep"],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
        short: &["sa"],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "",
        kind: "PersistentVolumeClaim",
        plural: "persistentvolumeclaims",
        namespaced: true,
        short: &["pvc"],
        all: false,
        status: true,
        generation: false,
        returns_deleted_object: true,
    },
    Builtin {
        group: "",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        short: &["po"],
        all: true,
        status: true,
        generation: false,
        returns_deleted_object: true,
    },
    Builtin {
        group: "apps",
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
        short: &["deploy"],
        all: true,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: "apps",
        kind: "StatefulSet",
        plural: "statefulsets",
        namespaced: true,
        short: &["sts"],
        all: true,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: "apps",
        kind: "DaemonSet",
        plural: "daemonsets",
        namespaced: true,
        short: &["ds"],
        all: true,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: "apps",
        kind: "ReplicaSet",
        plural: "replicasets",
        namespaced: true,
        short: &["rs"],
        all: true,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: "batch",
        kind: "Job",
        plural: "jobs",
        namespaced: true,
        short: &[],
        all: true,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        kind: "Role",
        plural: "roles",
        namespaced: true,
        short: &[],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        kind: "RoleBinding",
        plural: "rolebindings",
        namespaced: true,
        short: &[],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        kind: "ClusterRole",
        plural: "clusterroles",
        namespaced: false,
        short: &[],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        namespaced: false,
        short: &[],
        all: false,
        status: false,
        generation: false,
        returns_deleted_object: false,
    },
    Builtin {
        group: DISCOVERY_GROUP,
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        short: &[],
        all: false,
        status: false,
        generation: true,
        returns_deleted_object: false,
    },
    Builtin {
        group: CRD_GROUP,
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        namespaced: false,
        short: &["crd", "crds"],
        all: false,
        status: true,
        generation: true,
        returns_deleted_object: false,
    },
];

/// Built-in groups in the order a real server lists them (by group priority).
const BUILTIN_GROUPS: &[&str] = &[
    "apps",
    "batch",
    "rbac.authorization.k8s.io",
    CRD_GROUP,
    DISCOVERY_GROUP,
];

fn builtin_type(b: &Builtin) -> ResourceType {
    ResourceType {
        group: b.group.to_string(),
        version: "v1".to_string(),
        storage_version: "v1".to_string(),
        kind: b.kind.to_string(),
        list_kind: format!("{}List", b.kind),
        plural: b.plural.to_string(),
        singular: b.kind.to_ascii_lowercase(),
        namespaced: b.namespaced,
        short_names: b.short.iter().map(|s| s.to_string()).collect(),
        categories: if b.all {
            vec!["all".to_string()]
        } else if b.group == CRD_GROUP {
            vec!["api-extensions".to_string()]
        } else {
            vec![]
        },
        status_subresource: b.status,
        custom: false,
        generation: b.generation,
        returns_deleted_object: b.returns_deleted_object,
        schema: None,
    }
}

/// All built-in resource types.
pub(crate) fn builtins() -> Vec<ResourceType> {
    BUILTINS.iter().map(builtin_type).collect()
}

pub(crate) fn builtin(group: &str, plural: &str) -> Option<ResourceType> {
    BUILTINS
        .iter()
        .find(|b| b.group == group && b.plural == plural)
        .map(builtin_type)
}

/// Whether a CRD object carries condition `ctype` with status `True`.
pub(crate) fn condition_true(obj: &Value, ctype: &str) -> bool {
    obj.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conds| {
            conds
                .iter()
                .any(|c| c["type"] == ctype && c["status"] == "True")
        })
}

/// Which CRDs count: the real server serves custom resources once a CRD's names are
/// accepted, but lists them in discovery only once it is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Serving,
    Discovery,
}

/// The resource types a CRD object serves (one per served version).
pub(crate) fn crd_types(crd: &Value, gate: Gate) -> Vec<ResourceType> {
    let on = match gate {
        Gate::Serving => condition_true(crd, "NamesAccepted") || condition_true(crd, "Established"),
        Gate::Discovery => condition_true(crd, "Established"),
    };
    if !on {
        return vec![];
    }
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default().to_string();
    let names = &spec["names"];
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    if group.is_empty() || kind.is_empty() || plural.is_empty() {
        return vec![];
    }
    let singular = names["singular"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_ascii_lowercase());
    let list_kind = names["listKind"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let storage_version = versions
        .iter()
        .find(|v| v["storage"] == true)
        .and_then(|v| v["name"].as_str())
        .unwrap_or_default()
        .to_string();
    versions
        .iter()
        .filter(|v| v["served"] != false)
        .filter_map(|v| {
            let version = v["name"].as_str()?.to_string();
            Some(ResourceType {
                group: group.clone(),
                version,
                storage_version: storage_version.clone(),
                kind: kind.clone(),
                list_kind: list_kind.clone(),
                plural: plural.clone(),
                singular: singular.clone(),
                namespaced: spec["scope"] != "Cluster",
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                status_subresource: v.pointer("/subresources/status").is_some(),
                custom: true,
                generation: true,
                returns_deleted_object: true,
                schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            })
        })
        .collect()
}

/// All custom resource types passing `gate`.
pub(crate) fn custom_types(store: &Store, gate: Gate) -> Vec<ResourceType> {
    store
        .objects_of(CRD_GROUP, "customresourcedefinitions")
        .flat_map(|(_, crd)| crd_types(crd, gate))
        .collect()
}

/// Resolve `group/version/plural` to a served resource type.
pub(crate) fn resolve(
    store: &Store,
    group: &str,
    version: &str,
    plural: &str,
) -> Option<ResourceType> {
    if version == "v1" {
        if let Some(b) = builtin(group, plural) {
            return Some(b);
        }
    }
    if group.is_empty() || BUILTIN_GROUPS.contains(&group) {
        return None;
    }
    custom_types(store, Gate::Serving)
        .into_iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
}

/// Every resource type served by a group/version.
fn types_of(store: &Store, group: &str, version: &str) -> Vec<ResourceType> {
    let mut out: Vec<ResourceType> = builtins()
        .into_iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    out.extend(
        custom_types(store, Gate::Discovery)
            .into_iter()
            .filter(|t| t.group == group && t.version == version),
    );
    out
}

/// group name -> served versions (preferred first), built-ins first then custom groups.
fn groups(store: &Store) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = BUILTIN_GROUPS
        .iter()
        .map(|g| (g.to_string(), vec!["v1".to_string()]))
        .collect();
    let mut custom: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in custom_types(store, Gate::Discovery) {
        let versions = custom.entry(t.group.clone()).or_default();
        if !versions.contains(&t.version) {
            versions.push(t.version.clone());
        }
    }
    for (group, mut versions) in custom {
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        out.push((group, versions));
    }
    out
}

/// Kubernetes version priority: GA > beta > alpha, higher numbers first.
fn version_priority(v: &str) -> (u8, u64, u64) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse::<u64>().unwrap_or(0);
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (level, num) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    (level, major, num.parse::<u64>().unwrap_or(0))
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": group_version(name, v), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `GET /api`.
pub(crate) fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `GET /apis`.
pub(crate) fn group_list(store: &Store) -> Value {
    let groups: Vec<Value> = groups(store)
        .iter()
        .map(|(name, versions)| group_json(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`.
pub(crate) fn group(store: &Store, name: &str) -> Option<Value> {
    groups(store)
        .into_iter()
        .find(|(g, _)| g == name)
        .map(|(g, versions)| {
            let mut doc = group_json(&g, &versions);
            doc["kind"] = json!("APIGroup");
            doc["apiVersion"] = json!("v1");
            doc
        })
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`.
pub(crate) fn resource_list(store: &Store, group: &str, version: &str) -> Option<Value> {
    let types = types_of(store, group, version);
    if types.is_empty() && !(group.is_empty() && version == "v1") {
        return None;
    }
    let mut resources = Vec::new();
    for t in &types {
        let mut r = json!({
            "name": t.plural,
            "singularName": t.singular,
            "namespaced": t.namespaced,
            "kind": t.kind,
            "verbs": t.verbs(),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        if t.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", t.plural),
                "singularName": "",
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(group, version),
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::version_priority;

    #[test]
    fn version_order() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1", "foo"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(v, vec!["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }
}
