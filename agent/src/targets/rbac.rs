//! Least-privilege RBAC for the Kubernetes target, derived from its policy: exactly the verbs
//! the agent uses, on exactly the kinds and namespaces its `[target]` allows (`roost agent rbac`).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject as RbacSubject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{NamespaceResourceScope, Resource};

use crate::config::KubernetesConfig;

/// What the agent does with every kind it may apply (see `targets/kube.rs`): `get` (ownership
/// check, apply, health, drift, prune), `list` and `watch` (drift watches, inventory
/// recovery), `create` (a server-side apply that creates an object is authorized as create),
/// `patch` (server-side apply and its dry runs), `delete` (prune).
pub const AGENT_VERBS: [&str; 6] = ["get", "list", "watch", "create", "patch", "delete"];

/// Discovery paths the agent reads (`/api/v1`, `/apis/GROUP/VERSION`).
pub const DISCOVERY_URLS: [&str; 4] = ["/api", "/api/*", "/apis", "/apis/*"];

/// Who the agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A ServiceAccount (in-cluster agents).
    ServiceAccount {
        /// Its name.
        name: String,
        /// Its namespace.
        namespace: String,
    },
    /// A user (a kubeconfig with a client certificate or token).
    User {
        /// User name as the API server authenticates it.
        name: String,
    },
}

/// Choices that are not in the policy.
#[derive(Debug, Clone)]
pub struct RbacOptions {
    /// Name of every Role, ClusterRole and binding.
    pub name: String,
    /// Accept namespaced rights in every namespace when the policy does not list its
    /// namespaces (Kubernetes RBAC cannot grant by namespace prefix).
    pub cluster_wide: bool,
}

impl Default for RbacOptions {
    fn default() -> Self {
        RbacOptions {
            name: "roost-agent".into(),
            cluster_wide: false,
        }
    }
}

/// Why no RBAC can be derived from a policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RbacError {
    /// `allowed_kinds` is empty: any kind, so RBAC would be every resource.
    #[error("target.allowed_kinds is empty: the agent may apply any kind, so its RBAC would have to grant every resource (Secrets, pods/exec, RBAC itself); list the kinds the agent applies")]
    AnyKind,
    /// A bare kind that is not built into Kubernetes.
    #[error("target.allowed_kinds: {0} is not a built-in kind: write it as GROUP/{0} so its API group and resource are known")]
    UnknownKind(String),
    /// The namespaces are not known in advance.
    #[error("target.allowed_namespaces is empty: the agent may write to any namespace{}, and Kubernetes RBAC cannot grant by namespace name pattern; list the namespaces (recommended), or pass --cluster-wide to grant the kinds' rights in every namespace", .prefix.as_ref().map(|p| format!(" starting with {p}")).unwrap_or_default())]
    NamespacesUnknown {
        /// The policy's `namespace_prefix`.
        prefix: Option<String>,
    },
}

/// A kind the agent may apply, resolved to its API group and resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KindRights {
    /// API group (`""` for core).
    pub group: String,
    /// Resource (plural).
    pub resource: String,
    /// Kind.
    pub kind: String,
    /// Namespaced?
    pub namespaced: bool,
}

fn entry<T: Resource>() -> KindRights
where
    T::Scope: 'static,
{
    KindRights {
        group: T::GROUP.to_owned(),
        resource: T::URL_PATH_SEGMENT.to_owned(),
        kind: T::KIND.to_owned(),
        namespaced: std::any::TypeId::of::<T::Scope>()
            == std::any::TypeId::of::<NamespaceResourceScope>(),
    }
}

/// Kubernetes' built-in kinds (groups, plurals and scopes from k8s-openapi, not typed by hand).
pub fn builtin_kinds() -> Vec<KindRights> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, autoscaling::v2 as hpa,
        batch::v1 as batch, coordination::v1 as coord, core::v1 as core, discovery::v1 as disc,
        networking::v1 as net, node::v1 as node, policy::v1 as policy, rbac::v1 as rbac,
        scheduling::v1 as sched, storage::v1 as storage,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    vec![
        entry::<core::Namespace>(),
        entry::<core::ConfigMap>(),
        entry::<core::Secret>(),
        entry::<core::Service>(),
        entry::<core::ServiceAccount>(),
        entry::<core::PersistentVolumeClaim>(),
        entry::<core::PersistentVolume>(),
        entry::<core::Pod>(),
        entry::<core::PodTemplate>(),
        entry::<core::ReplicationController>(),
        entry::<core::Endpoints>(),
        entry::<core::LimitRange>(),
        entry::<core::ResourceQuota>(),
        entry::<apps::Deployment>(),
        entry::<apps::StatefulSet>(),
        entry::<apps::DaemonSet>(),
        entry::<apps::ReplicaSet>(),
        entry::<batch::Job>(),
        entry::<batch::CronJob>(),
        entry::<hpa::HorizontalPodAutoscaler>(),
        entry::<policy::PodDisruptionBudget>(),
        entry::<net::Ingress>(),
        entry::<net::IngressClass>(),
        entry::<net::NetworkPolicy>(),
        entry::<disc::EndpointSlice>(),
        entry::<coord::Lease>(),
        entry::<rbac::Role>(),
        entry::<rbac::RoleBinding>(),
        entry::<rbac::ClusterRole>(),
        entry::<rbac::ClusterRoleBinding>(),
        entry::<storage::StorageClass>(),
        entry::<storage::CSIDriver>(),
        entry::<sched::PriorityClass>(),
        entry::<node::RuntimeClass>(),
        entry::<adm::MutatingWebhookConfiguration>(),
        entry::<adm::ValidatingWebhookConfiguration>(),
        entry::<ext::CustomResourceDefinition>(),
    ]
}

/// The kinds a policy lets the agent apply, resolved: `allowed_kinds` minus `denied_kinds`,
/// cluster-scoped ones only when `allow_cluster_scoped`. A `GROUP/Kind` that is not built in
/// is a custom resource: namespaced, plural as the agent derives it before discovery
/// (kube's `ApiResource::from_gvk`).
pub fn allowed_kinds(policy: &KubernetesConfig) -> Result<Vec<KindRights>, RbacError> {
    if policy.allowed_kinds.is_empty() {
        return Err(RbacError::AnyKind);
    }
    let builtin = builtin_kinds();
    let mut out = BTreeSet::new();
    for entry in &policy.allowed_kinds {
        let found: Vec<KindRights> = match entry.rsplit_once('/') {
            Some((group, kind)) => {
                let b: Vec<KindRights> = builtin
                    .iter()
                    .filter(|k| k.group == group && k.kind == kind)
                    .cloned()
                    .collect();
                if b.is_empty() {
                    let gvk = kube::core::GroupVersionKind::gvk(group, "v1", kind);
                    vec![KindRights {
                        group: group.to_owned(),
                        resource: kube::core::ApiResource::from_gvk(&gvk).plural,
                        kind: kind.to_owned(),
                        namespaced: true,
                    }]
                } else {
                    b
                }
            }
            None => builtin
                .iter()
                .filter(|k| k.kind == *entry)
                .cloned()
                .collect(),
        };
        if found.is_empty() {
            return Err(RbacError::UnknownKind(entry.clone()));
        }
        out.extend(found.into_iter().filter(|k| {
            policy.kind_denied(&k.group, &k.kind).is_none()
                && (k.namespaced || policy.cluster_scoped_allowed())
        }));
    }
    Ok(out.into_iter().collect())
}

/// The RBAC objects one policy needs, in `kubectl apply` order: per allowed namespace the
/// Namespace (it must exist to hold the Role), a Role and a RoleBinding; a ClusterRole and
/// ClusterRoleBinding for discovery and, only when cluster-scoped kinds are allowed, those
/// kinds (Namespaces by name). No rights on any kind the policy does not allow — Secrets
/// included.
pub fn rbac_for(
    policy: &KubernetesConfig,
    subject: &Subject,
    opts: &RbacOptions,
) -> Result<Vec<RbacObject>, RbacError> {
    let kinds = allowed_kinds(policy)?;
    let namespaces = policy.effective_namespaces();
    if namespaces.is_none() && !opts.cluster_wide {
        return Err(RbacError::NamespacesUnknown {
            prefix: policy.namespace_prefix.clone(),
        });
    }
    let (namespaced, cluster): (Vec<&KindRights>, Vec<&KindRights>) =
        kinds.iter().partition(|k| k.namespaced);
    let meta = |ns: Option<&str>| ObjectMeta {
        name: Some(opts.name.clone()),
        namespace: ns.map(str::to_owned),
        labels: Some(BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "roost-agent".to_owned(),
            ),
            ("app.kubernetes.io/component".to_owned(), "rbac".to_owned()),
        ])),
        ..Default::default()
    };
    let subjects = vec![match subject {
        Subject::ServiceAccount { name, namespace } => RbacSubject {
            kind: "ServiceAccount".into(),
            name: name.clone(),
            namespace: Some(namespace.clone()),
            api_group: None,
        },
        Subject::User { name } => RbacSubject {
            kind: "User".into(),
            name: name.clone(),
            namespace: None,
            api_group: Some("rbac.authorization.k8s.io".into()),
        },
    }];
    let role_ref = |kind: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: opts.name.clone(),
    };
    let mut out = Vec::new();
    if let Some(list) = &namespaces {
        if !namespaced.is_empty() {
            for ns in list {
                out.push(RbacObject::Namespace(Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                }));
                out.push(RbacObject::Role(Role {
                    metadata: meta(Some(ns)),
                    rules: Some(rules_by_group(&namespaced)),
                }));
                out.push(RbacObject::RoleBinding(RoleBinding {
                    metadata: meta(Some(ns)),
                    role_ref: role_ref("Role"),
                    subjects: Some(subjects.clone()),
                }));
            }
        }
    }
    let mut cluster_rules = vec![PolicyRule {
        non_resource_urls: Some(DISCOVERY_URLS.iter().map(|s| (*s).to_owned()).collect()),
        verbs: vec!["get".into()],
        ..Default::default()
    }];
    let is_ns = |k: &&KindRights| k.group.is_empty() && k.kind == "Namespace";
    if let (Some(list), true) = (&namespaces, cluster.iter().any(is_ns)) {
        // Only its own namespaces: by name for every verb (the agent lists and watches them
        // with a `metadata.name` field selector, the only way RBAC limits list and watch).
        cluster_rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["namespaces".into()]),
            resource_names: Some(list.iter().cloned().collect()),
            verbs: AGENT_VERBS.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        });
    }
    let others: Vec<&KindRights> = cluster
        .iter()
        .copied()
        .filter(|k| namespaces.is_none() || !is_ns(k))
        .chain(namespaced.iter().copied().filter(|_| namespaces.is_none()))
        .collect();
    cluster_rules.extend(rules_by_group(&others));
    out.push(RbacObject::ClusterRole(ClusterRole {
        metadata: meta(None),
        rules: Some(cluster_rules),
        ..Default::default()
    }));
    out.push(RbacObject::ClusterRoleBinding(ClusterRoleBinding {
        metadata: meta(None),
        role_ref: role_ref("ClusterRole"),
        subjects: Some(subjects),
    }));
    Ok(out)
}

fn rules_by_group(kinds: &[&KindRights]) -> Vec<PolicyRule> {
    let mut by_group: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for k in kinds {
        by_group
            .entry(k.group.as_str())
            .or_default()
            .insert(k.resource.as_str());
    }
    by_group
        .into_iter()
        .map(|(g, rs)| PolicyRule {
            api_groups: Some(vec![g.to_owned()]),
            resources: Some(rs.into_iter().map(str::to_owned).collect()),
            verbs: AGENT_VERBS.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .collect()
}

/// One generated object.
#[derive(Debug, Clone, PartialEq)]
pub enum RbacObject {
    /// A namespace the Role lives in.
    Namespace(Namespace),
    /// Rights in one namespace.
    Role(Role),
    /// Binds the Role.
    RoleBinding(RoleBinding),
    /// Discovery and cluster-scoped rights.
    ClusterRole(ClusterRole),
    /// Binds the ClusterRole.
    ClusterRoleBinding(ClusterRoleBinding),
}

impl RbacObject {
    /// As a Kubernetes object (with `apiVersion` and `kind`).
    pub fn to_value(&self) -> serde_json::Value {
        fn typed<T: Resource + serde::Serialize>(o: &T) -> serde_json::Value {
            let mut v = serde_json::to_value(o).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("apiVersion".into(), T::API_VERSION.into());
                m.insert("kind".into(), T::KIND.into());
            }
            v
        }
        match self {
            RbacObject::Namespace(o) => typed(o),
            RbacObject::Role(o) => typed(o),
            RbacObject::RoleBinding(o) => typed(o),
            RbacObject::ClusterRole(o) => typed(o),
            RbacObject::ClusterRoleBinding(o) => typed(o),
        }
    }
}

/// What the generated YAML says about itself (comment lines).
pub fn header(policy: &KubernetesConfig, subject: &Subject) -> String {
    let who = match subject {
        Subject::ServiceAccount { name, namespace } => {
            format!("ServiceAccount {namespace}/{name}")
        }
        Subject::User { name } => format!("user {name}"),
    };
    let kinds = allowed_kinds(policy)
        .map(|ks| {
            ks.iter()
                .map(|k| k.kind.clone())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let mut h = format!(
        "# RBAC for the roost agent ({who}), generated by `roost agent rbac` from the agent's\n\
         # [target] policy: verbs {verbs} on the allowed kinds ({kinds}), and nothing else.\n",
        verbs = AGENT_VERBS.join(", "),
    );
    match policy.effective_namespaces() {
        Some(list) => {
            let list: Vec<String> = list.into_iter().collect();
            h.push_str(&format!(
                "# Namespaced rights only in: {}. A Namespace the agent prunes takes its Role with it:\n\
                 # apply this file again before rolling out into that namespace again.\n",
                list.join(", ")
            ));
        }
        None => h.push_str(
            "# WARNING: target.allowed_namespaces is empty, so these namespaced rights hold in EVERY\n\
             # namespace (RBAC cannot grant by namespace prefix). List the namespaces instead.\n",
        ),
    }
    if policy.cluster_scoped_allowed() {
        h.push_str("# Cluster-scoped kinds are allowed: the ClusterRole holds their rights (Namespaces by name).\n");
    } else {
        h.push_str(
            "# Cluster-scoped kinds are not allowed: the ClusterRole holds discovery only.\n",
        );
    }
    h
}

/// The objects as one multi-document YAML stream (`kubectl apply -f`), after `header`.
pub fn to_yaml(header: &str, objects: &[RbacObject]) -> Result<String, serde_saphyr::ser::Error> {
    let values: Vec<serde_json::Value> = objects.iter().map(RbacObject::to_value).collect();
    Ok(format!(
        "{header}---\n{}",
        serde_saphyr::to_string_multiple(&values)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn policy(kinds: &[&str], namespaces: &[&str], cluster: bool) -> KubernetesConfig {
        KubernetesConfig {
            allowed_kinds: kinds.iter().map(|s| (*s).to_owned()).collect(),
            allowed_namespaces: namespaces.iter().map(|s| (*s).to_owned()).collect(),
            allow_cluster_scoped: Some(cluster),
            ..Default::default()
        }
    }

    fn sa() -> Subject {
        Subject::ServiceAccount {
            name: "roost-agent".into(),
            namespace: "roost-system".into(),
        }
    }

    fn values(p: &KubernetesConfig, opts: &RbacOptions) -> Vec<Value> {
        rbac_for(p, &sa(), opts)
            .expect("rbac")
            .iter()
            .map(RbacObject::to_value)
            .collect()
    }

    /// (kind, namespace) of every object.
    fn shape(v: &[Value]) -> Vec<(String, String)> {
        v.iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_owned(),
                    o["metadata"]["namespace"]
                        .as_str()
                        .or(o["metadata"]["name"]
                            .as_str()
                            .filter(|_| o["kind"] == "Namespace"))
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    fn s(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn namespaced_kinds_get_a_role_per_namespace_and_discovery_only_cluster_wide() {
        let v = values(
            &policy(&["ConfigMap", "Deployment", "Service"], &["a", "b"], false),
            &RbacOptions::default(),
        );
        assert_eq!(
            shape(&v),
            s(&[
                ("Namespace", "a"),
                ("Role", "a"),
                ("RoleBinding", "a"),
                ("Namespace", "b"),
                ("Role", "b"),
                ("RoleBinding", "b"),
                ("ClusterRole", ""),
                ("ClusterRoleBinding", ""),
            ])
        );
        assert_eq!(
            v[1]["rules"],
            json!([
                {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": AGENT_VERBS},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": AGENT_VERBS},
            ])
        );
        assert_eq!(
            v[6]["rules"],
            json!([{"nonResourceURLs": DISCOVERY_URLS, "verbs": ["get"]}]),
            "no cluster-scoped rights"
        );
        assert_eq!(
            v[2]["subjects"],
            json!([{"kind": "ServiceAccount", "name": "roost-agent", "namespace": "roost-system"}])
        );
        assert_eq!(v[2]["roleRef"]["kind"], "Role");
        assert!(!serde_json::to_string(&v).expect("json").contains("secrets"));
    }

    #[test]
    fn table_of_policies() {
        // (allowed kinds, denied kinds, namespaces, cluster-scoped, prefix) -> the rules'
        // resources per object kind (`group/resource`, `namespaces@names`)
        type Case<'a> = (
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            bool,
            Option<&'a str>,
            &'a [(&'a str, &'a [&'a str])],
        );
        let cases: &[Case] = &[
            // Secrets only when allowed, and then only in the allowed namespaces.
            (
                &["Secret", "ConfigMap"],
                &[],
                &["a"],
                true,
                None,
                &[("Role", &["/configmaps", "/secrets"]), ("ClusterRole", &[])],
            ),
            // Denied kinds are left out; cluster-scoped kinds dropped when not allowed.
            (
                &["Secret", "ConfigMap", "Namespace", "ClusterRole"],
                &["Secret"],
                &["a"],
                false,
                None,
                &[("Role", &["/configmaps"]), ("ClusterRole", &[])],
            ),
            // Namespaces by name, with the prefix the agent puts in front; CRDs cluster-wide.
            (
                &[
                    "Namespace",
                    "ConfigMap",
                    "CustomResourceDefinition",
                    "x.example/Widget",
                ],
                &[],
                &["shop"],
                true,
                Some("p-"),
                &[
                    ("Role", &["/configmaps", "x.example/widgets"]),
                    (
                        "ClusterRole",
                        &[
                            "namespaces@p-shop",
                            "apiextensions.k8s.io/customresourcedefinitions",
                        ],
                    ),
                ],
            ),
            // Only cluster-scoped kinds: no namespace, no Role.
            (
                &[
                    "ClusterRole",
                    "apiextensions.k8s.io/CustomResourceDefinition",
                ],
                &[],
                &["a"],
                true,
                None,
                &[(
                    "ClusterRole",
                    &[
                        "apiextensions.k8s.io/customresourcedefinitions",
                        "rbac.authorization.k8s.io/clusterroles",
                    ],
                )],
            ),
        ];
        for (i, (kinds, denied, nss, cluster, prefix, want)) in cases.iter().enumerate() {
            let mut p = policy(kinds, nss, *cluster);
            p.denied_kinds = denied.iter().map(|s| (*s).to_owned()).collect();
            p.namespace_prefix = prefix.map(str::to_owned);
            let v = values(&p, &RbacOptions::default());
            let mut got: Vec<(String, Vec<String>)> = Vec::new();
            for o in &v {
                let kind = o["kind"].as_str().unwrap_or_default();
                if !matches!(kind, "Role" | "ClusterRole") || got.iter().any(|(k, _)| k == kind) {
                    continue;
                }
                let mut res = Vec::new();
                for r in o["rules"].as_array().into_iter().flatten() {
                    if r.get("nonResourceURLs").is_some() {
                        continue;
                    }
                    for x in r["resources"].as_array().into_iter().flatten() {
                        let x = x.as_str().unwrap_or_default();
                        match r.get("resourceNames") {
                            Some(n) => res.push(format!(
                                "{x}@{}",
                                n.as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join(",")
                            )),
                            None => res.push(format!(
                                "{}/{x}",
                                r["apiGroups"][0].as_str().unwrap_or_default()
                            )),
                        }
                    }
                }
                got.push((kind.to_owned(), res));
            }
            let want: Vec<(String, Vec<String>)> = want
                .iter()
                .map(|(k, r)| ((*k).to_owned(), r.iter().map(|s| (*s).to_owned()).collect()))
                .collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn policies_that_cannot_be_enumerated_are_refused_or_explicitly_cluster_wide() {
        let opts = RbacOptions::default();
        assert_eq!(
            rbac_for(&policy(&[], &["a"], false), &sa(), &opts),
            Err(RbacError::AnyKind)
        );
        assert_eq!(
            rbac_for(&policy(&["Widget"], &["a"], false), &sa(), &opts),
            Err(RbacError::UnknownKind("Widget".into()))
        );
        let mut p = policy(&["ConfigMap", "Namespace"], &[], true);
        p.namespace_prefix = Some("store-1-".into());
        let err = rbac_for(&p, &sa(), &opts).expect_err("no namespaces");
        assert!(err.to_string().contains("starting with store-1-"), "{err}");
        // Cluster-wide on request: no Role, everything in the ClusterRole.
        let v = values(
            &p,
            &RbacOptions {
                cluster_wide: true,
                ..RbacOptions::default()
            },
        );
        assert_eq!(
            shape(&v),
            s(&[("ClusterRole", ""), ("ClusterRoleBinding", "")])
        );
        assert_eq!(
            v[0]["rules"][1],
            json!({"apiGroups": [""], "resources": ["configmaps", "namespaces"], "verbs": AGENT_VERBS})
        );
        assert!(header(&p, &sa()).contains("EVERY"));
    }

    #[test]
    fn users_and_yaml() {
        let p = policy(&["ConfigMap"], &["a"], false);
        let objs = rbac_for(
            &p,
            &Subject::User {
                name: "agent-1".into(),
            },
            &RbacOptions::default(),
        )
        .expect("rbac");
        let y = to_yaml(&header(&p, &sa()), &objs).expect("yaml");
        assert!(y.starts_with("# RBAC for the roost agent"), "{y}");
        let docs: Vec<Value> = y
            .split("\n---\n")
            .skip(1)
            .map(|d| serde_saphyr::from_str(d).expect("yaml doc"))
            .collect();
        let want: Vec<Value> = objs.iter().map(RbacObject::to_value).collect();
        assert_eq!(docs, want);
        assert_eq!(
            want[2]["subjects"],
            json!([{"kind": "User", "name": "agent-1", "apiGroup": "rbac.authorization.k8s.io"}])
        );
    }
}
