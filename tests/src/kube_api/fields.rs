//! Field ownership (`metadata.managedFields`) and server-side apply, after the
//! semantics of Kubernetes' structured-merge-diff.
//!
//! A field set is a set of paths; a path is a list of encoded elements exactly as
//! they appear in `fieldsV1`: `f:spec` (a field), `k:{"name":"app"}` (an item of an
//! associative list, identified by its keys), `v:"x"` (a value of a set list). A
//! path is in a set when the node it names is owned: leaves (scalars, atomic
//! lists/maps, empty maps) and associative-list items themselves (the `"."` entry
//! of the `fieldsV1` encoding).
//!
//! List semantics come from a small schema: built-in kinds use the list types of
//! the real API (containers by `name`, container ports by `containerPort`+`protocol`,
//! env by `name`, ...; everything else atomic); custom resources use the CRD's
//! `x-kubernetes-list-type` / `x-kubernetes-list-map-keys` / `x-kubernetes-map-type`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

pub(crate) type Path = Vec<String>;
pub(crate) type FieldSet = BTreeSet<Path>;

/// How a list merges.
#[derive(Debug, Clone)]
pub(crate) enum ListType {
    Atomic,
    Set,
    /// Associative list with key fields and their defaults.
    Map(Vec<(String, Option<Value>)>),
}

/// The little schema knowledge SSA needs.
#[derive(Debug, Clone)]
pub(crate) struct Schema {
    /// The kind, for built-in types.
    builtin_kind: Option<String>,
    /// For custom resources: the version's `openAPIV3Schema`.
    crd: Option<Value>,
}

const ITEM: &str = "*";

impl Schema {
    pub fn builtin(kind: &str) -> Self {
        Schema {
            builtin_kind: Some(kind.to_string()),
            crd: None,
        }
    }

    pub fn custom(schema: Option<Value>) -> Self {
        Schema {
            builtin_kind: None,
            crd: schema,
        }
    }

    fn crd_node(&self, spath: &[String]) -> Option<&Value> {
        let mut node = self.crd.as_ref()?;
        for seg in spath {
            node = if seg == ITEM {
                node.get("items")?
            } else if let Some(p) = node.get("properties").and_then(|p| p.get(seg)) {
                p
            } else {
                match node.get("additionalProperties") {
                    Some(ap) if ap.is_object() => ap,
                    _ => return None,
                }
            };
        }
        Some(node)
    }

    pub fn list_type(&self, spath: &[String]) -> ListType {
        let fields: Vec<&str> = spath
            .iter()
            .map(String::as_str)
            .filter(|s| *s != ITEM)
            .collect();
        if fields == ["metadata", "finalizers"] {
            return ListType::Set;
        }
        if fields == ["metadata", "ownerReferences"] {
            return key_list(&[("uid", None)]);
        }
        if fields.first() == Some(&"metadata") {
            return ListType::Atomic;
        }
        let Some(kind) = &self.builtin_kind else {
            return self.crd_list_type(spath);
        };
        let Some(last) = fields.last() else {
            return ListType::Atomic;
        };
        let parent = fields.len().checked_sub(2).map(|i| fields[i]);
        let tcp = Some(Value::String("TCP".into()));
        match *last {
            "containers" | "initContainers" | "ephemeralContainers" => key_list(&[("name", None)]),
            "ports"
                if matches!(
                    parent,
                    Some("containers" | "initContainers" | "ephemeralContainers")
                ) =>
            {
                key_list(&[("containerPort", None), ("protocol", tcp)])
            }
            "ports" if kind == "Service" && fields == ["spec", "ports"] => {
                key_list(&[("port", None), ("protocol", tcp)])
            }
            "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
                key_list(&[("name", None)])
            }
            "volumeMounts" => key_list(&[("mountPath", None)]),
            "volumeDevices" => key_list(&[("devicePath", None)]),
            "hostAliases" => key_list(&[("ip", None)]),
            "conditions" => key_list(&[("type", None)]),
            "topologySpreadConstraints" => {
                key_list(&[("topologyKey", None), ("whenUnsatisfiable", None)])
            }
            _ => ListType::Atomic,
        }
    }

    fn crd_list_type(&self, spath: &[String]) -> ListType {
        let Some(node) = self.crd_node(spath) else {
            return ListType::Atomic;
        };
        match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListType::Set,
            Some("map") => {
                let keys = node
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let keys: Vec<(String, Option<Value>)> = keys
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|k| {
                        let default = node
                            .pointer(&format!("/items/properties/{k}/default"))
                            .cloned();
                        (k.to_string(), default)
                    })
                    .collect();
                if keys.is_empty() {
                    ListType::Atomic
                } else {
                    ListType::Map(keys)
                }
            }
            _ => ListType::Atomic,
        }
    }

    /// Whether the map/struct at `spath` is atomic (replaced as a whole).
    pub fn map_atomic(&self, spath: &[String]) -> bool {
        let Some(last) = spath.last() else {
            return false;
        };
        if spath.first().map(String::as_str) == Some("metadata") {
            return false;
        }
        if self.builtin_kind.is_some() {
            // LabelSelector is `+structType=atomic`; Service and Pod node selectors are
            // `+mapType=atomic`.
            return matches!(
                last.as_str(),
                "selector" | "nodeSelector" | "labelSelector" | "namespaceSelector"
            );
        }
        self.crd_node(spath)
            .and_then(|n| n.get("x-kubernetes-map-type"))
            .and_then(Value::as_str)
            == Some("atomic")
    }
}

fn key_list(keys: &[(&str, Option<Value>)]) -> ListType {
    ListType::Map(
        keys.iter()
            .map(|(k, d)| (k.to_string(), d.clone()))
            .collect(),
    )
}

/// Canonical JSON with sorted keys (independent of serde_json's `preserve_order`).
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            let parts: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), canonical(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(canonical).collect();
            format!("[{}]", parts.join(","))
        }
        other => other.to_string(),
    }
}

/// `k:{...}` for an item of an associative list, if it carries all keys (or defaults).
fn item_key(item: &Value, keys: &[(String, Option<Value>)]) -> Option<String> {
    let obj = item.as_object()?;
    let mut key = Map::new();
    for (k, default) in keys {
        match obj.get(k).filter(|v| !v.is_null()).or(default.as_ref()) {
            Some(v) => {
                key.insert(k.clone(), v.clone());
            }
            None => return None,
        }
    }
    Some(format!("k:{}", canonical(&Value::Object(key))))
}

fn value_elem(v: &Value) -> String {
    format!("v:{}", canonical(v))
}

/// The keys of every item of `items`, or `None` when one lacks a key (then the list is atomic).
fn keyed(items: &[Value], keys: &[(String, Option<Value>)]) -> Option<Vec<String>> {
    items.iter().map(|i| item_key(i, keys)).collect()
}

/// Walk state: the encoded path plus the schema path (field names and `*` for items).
struct Walk<'a> {
    schema: &'a Schema,
    path: Path,
    spath: Vec<String>,
}

impl<'a> Walk<'a> {
    fn new(schema: &'a Schema) -> Self {
        Walk {
            schema,
            path: Vec::new(),
            spath: Vec::new(),
        }
    }

    fn push_field(&mut self, k: &str) {
        self.path.push(format!("f:{k}"));
        self.spath.push(k.to_string());
    }

    fn push_item(&mut self, elem: String) {
        self.path.push(elem);
        self.spath.push(ITEM.to_string());
    }

    fn pop(&mut self) {
        self.path.pop();
        self.spath.pop();
    }

    fn leaf(&self, out: &mut FieldSet) {
        if !self.path.is_empty() {
            out.insert(self.path.clone());
        }
    }

    /// Whether `v` is owned as a single node (no finer-grained paths).
    fn is_leaf(&self, v: &Value) -> bool {
        match v {
            Value::Object(m) => m.is_empty() || self.schema.map_atomic(&self.spath),
            Value::Array(items) => {
                items.is_empty()
                    || match self.schema.list_type(&self.spath) {
                        ListType::Atomic => true,
                        ListType::Set => false,
                        ListType::Map(keys) => keyed(items, &keys).is_none(),
                    }
            }
            _ => true,
        }
    }

    fn collect_set(&mut self, v: &Value, out: &mut FieldSet) {
        if self.is_leaf(v) {
            self.leaf(out);
            return;
        }
        match v {
            Value::Object(m) => {
                for (k, c) in m {
                    self.push_field(k);
                    self.collect_set(c, out);
                    self.pop();
                }
            }
            Value::Array(items) => match self.schema.list_type(&self.spath) {
                ListType::Set => {
                    for item in items {
                        self.path.push(value_elem(item));
                        self.leaf(out);
                        self.path.pop();
                    }
                }
                ListType::Map(keys) => {
                    for item in items {
                        let Some(k) = item_key(item, &keys) else {
                            continue;
                        };
                        self.push_item(k);
                        self.leaf(out);
                        if let Value::Object(m) = item {
                            for (f, c) in m {
                                self.push_field(f);
                                self.collect_set(c, out);
                                self.pop();
                            }
                        }
                        self.pop();
                    }
                }
                ListType::Atomic => self.leaf(out),
            },
            _ => self.leaf(out),
        }
    }

    fn compare(&mut self, old: Option<&Value>, new: Option<&Value>, diff: &mut Diff) {
        match (old, new) {
            (None, None) => {}
            (None, Some(n)) => self.collect_set(n, &mut diff.added),
            (Some(o), None) => self.collect_set(o, &mut diff.removed),
            (Some(o), Some(n)) => {
                if o == n {
                    return;
                }
                if self.is_leaf(o) && self.is_leaf(n) {
                    diff.modified.insert(self.path.clone());
                    return;
                }
                match (o, n) {
                    (Value::Object(a), Value::Object(b))
                        if !self.is_leaf(o) && !self.is_leaf(n) =>
                    {
                        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                        for k in keys {
                            self.push_field(k);
                            self.compare(a.get(k), b.get(k), diff);
                            self.pop();
                        }
                    }
                    (Value::Array(a), Value::Array(b)) if !self.is_leaf(o) && !self.is_leaf(n) => {
                        match self.schema.list_type(&self.spath) {
                            ListType::Set => {
                                let av: BTreeSet<String> = a.iter().map(value_elem).collect();
                                let bv: BTreeSet<String> = b.iter().map(value_elem).collect();
                                for e in bv.difference(&av) {
                                    self.path.push(e.clone());
                                    self.leaf(&mut diff.added);
                                    self.path.pop();
                                }
                                for e in av.difference(&bv) {
                                    self.path.push(e.clone());
                                    self.leaf(&mut diff.removed);
                                    self.path.pop();
                                }
                            }
                            ListType::Map(keys) => {
                                let index = |items: &'_ [Value]| -> BTreeMap<String, usize> {
                                    items
                                        .iter()
                                        .enumerate()
                                        .filter_map(|(i, it)| item_key(it, &keys).map(|k| (k, i)))
                                        .collect()
                                };
                                let ai = index(a);
                                let bi = index(b);
                                let all: BTreeSet<&String> = ai.keys().chain(bi.keys()).collect();
                                for k in all {
                                    let (oi, ni) =
                                        (ai.get(k).map(|i| &a[*i]), bi.get(k).map(|i| &b[*i]));
                                    self.push_item(k.clone());
                                    match (oi, ni) {
                                        (None, Some(_)) => self.leaf(&mut diff.added),
                                        (Some(_), None) => self.leaf(&mut diff.removed),
                                        _ => {}
                                    }
                                    let fields =
                                        |v: Option<&Value>| v.and_then(Value::as_object).cloned();
                                    let (om, nm) = (fields(oi), fields(ni));
                                    let names: BTreeSet<String> = om
                                        .iter()
                                        .flat_map(|m| m.keys().cloned())
                                        .chain(nm.iter().flat_map(|m| m.keys().cloned()))
                                        .collect();
                                    for f in names {
                                        self.push_field(&f);
                                        self.compare(
                                            om.as_ref().and_then(|m| m.get(&f)),
                                            nm.as_ref().and_then(|m| m.get(&f)),
                                            diff,
                                        );
                                        self.pop();
                                    }
                                    self.pop();
                                }
                            }
                            ListType::Atomic => {
                                diff.modified.insert(self.path.clone());
                            }
                        }
                    }
                    _ => {
                        self.collect_set(o, &mut diff.removed);
                        self.collect_set(n, &mut diff.added);
                    }
                }
            }
        }
    }

    fn merge(&mut self, live: &Value, cfg: &Value) -> Value {
        match (live, cfg) {
            (Value::Object(l), Value::Object(c)) if !self.schema.map_atomic(&self.spath) => {
                let mut out = l.clone();
                for (k, cv) in c {
                    if cv.is_null() {
                        out.remove(k);
                        continue;
                    }
                    self.push_field(k);
                    let merged = match l.get(k) {
                        Some(lv) => self.merge(lv, cv),
                        None => strip_nulls(cv),
                    };
                    self.pop();
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            (Value::Array(l), Value::Array(c)) => match self.schema.list_type(&self.spath) {
                ListType::Set => {
                    let mut out = l.clone();
                    for v in c {
                        if !out.contains(v) {
                            out.push(strip_nulls(v));
                        }
                    }
                    Value::Array(out)
                }
                ListType::Map(keys) => {
                    let (Some(lk), Some(ck)) = (keyed(l, &keys), keyed(c, &keys)) else {
                        return strip_nulls(cfg);
                    };
                    let mut out = l.clone();
                    let mut out_keys = lk;
                    for (item, key) in c.iter().zip(ck) {
                        if let Some(i) = out_keys.iter().position(|k| *k == key) {
                            self.push_item(key);
                            out[i] = self.merge(&out[i], item);
                            self.pop();
                        } else {
                            out.push(strip_nulls(item));
                            out_keys.push(key);
                        }
                    }
                    Value::Array(out)
                }
                ListType::Atomic => strip_nulls(cfg),
            },
            _ => strip_nulls(cfg),
        }
    }

    /// Remove the node at `rest` (relative to `v`); empty maps/lists left behind below
    /// the top level are removed too, like Go's `omitempty` does for typed objects.
    fn remove(&mut self, v: &mut Value, rest: &[String]) {
        let Some((head, tail)) = rest.split_first() else {
            return;
        };
        if let Some(field) = head.strip_prefix("f:") {
            let Some(obj) = v.as_object_mut() else {
                return;
            };
            if tail.is_empty() {
                obj.remove(field);
                return;
            }
            let Some(child) = obj.get_mut(field) else {
                return;
            };
            self.push_field(field);
            self.remove(child, tail);
            self.pop();
            if is_empty_container(child) && !self.spath.is_empty() {
                obj.remove(field);
            }
        } else if head.starts_with("k:") {
            let ListType::Map(keys) = self.schema.list_type(&self.spath) else {
                return;
            };
            let Some(items) = v.as_array_mut() else {
                return;
            };
            let Some(i) = items
                .iter()
                .position(|it| item_key(it, &keys).as_deref() == Some(head.as_str()))
            else {
                return;
            };
            if tail.is_empty() {
                items.remove(i);
            } else {
                self.push_item(head.clone());
                self.remove(&mut items[i], tail);
                self.pop();
            }
        } else if head.starts_with("v:") {
            if let Some(items) = v.as_array_mut() {
                items.retain(|it| value_elem(it) != *head);
            }
        }
    }
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Drop `null` map entries (a `null` in an applied config means "no value").
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, c)| !c.is_null())
                .map(|(k, c)| (k.clone(), strip_nulls(c)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// Which part of an object a request may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The main resource; `status` is ignored when the type has a status subresource.
    Main { status_subresource: bool },
    /// The `/status` subresource: only `status` counts.
    Status,
}

impl Scope {
    pub fn subresource(self) -> &'static str {
        match self {
            Scope::Main { .. } => "",
            Scope::Status => "status",
        }
    }
}

const STRIPPED_META: &[&str] = &[
    "name",
    "namespace",
    "creationTimestamp",
    "selfLink",
    "uid",
    "generation",
    "managedFields",
    "resourceVersion",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Remove the fields no manager ever owns, and those outside `scope`.
fn strip(set: &mut FieldSet, scope: Scope) {
    set.retain(|p| {
        let first = p.first().map(String::as_str);
        if p.len() == 1 && matches!(first, Some("f:apiVersion" | "f:kind" | "f:metadata")) {
            return false;
        }
        if first == Some("f:metadata")
            && p.get(1)
                .and_then(|e| e.strip_prefix("f:"))
                .is_some_and(|f| STRIPPED_META.contains(&f))
        {
            return false;
        }
        match scope {
            Scope::Main {
                status_subresource: true,
            } => first != Some("f:status"),
            Scope::Main { .. } => true,
            // Annotations only ever differ here for kinds whose status strategy keeps
            // them (Deployments); see `api::status_writes_annotations`.
            Scope::Status => {
                first == Some("f:status")
                    || (first == Some("f:metadata")
                        && p.get(1).map(String::as_str) == Some("f:annotations"))
            }
        }
    });
}

/// The field set of an object or applied configuration.
pub(crate) fn field_set(schema: &Schema, v: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    Walk::new(schema).collect_set(v, &mut out);
    strip(&mut out, scope);
    out
}

/// What changed between two versions of an object.
#[derive(Debug, Default, Clone)]
pub(crate) struct Diff {
    pub added: FieldSet,
    pub modified: FieldSet,
    pub removed: FieldSet,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.modified.is_empty() && self.removed.is_empty()
    }
}

pub(crate) fn compare(schema: &Schema, old: &Value, new: &Value, scope: Scope) -> Diff {
    let mut diff = Diff::default();
    Walk::new(schema).compare(Some(old), Some(new), &mut diff);
    strip(&mut diff.added, scope);
    strip(&mut diff.modified, scope);
    strip(&mut diff.removed, scope);
    diff
}

/// `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: String,
    pub set: FieldSet,
}

impl Entry {
    fn is(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

/// Read `metadata.managedFields`.
pub(crate) fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return vec![];
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                time: e.get("time").and_then(Value::as_str).map(str::to_string),
                subresource: s("subresource"),
                set: e.get("fieldsV1").map(decode).unwrap_or_default(),
            }
        })
        .collect()
}

/// Write `metadata.managedFields` (sorted like the real server; empty entries dropped).
pub(crate) fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
        return;
    }
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), Value::String(e.manager.clone()));
            m.insert("operation".into(), Value::String(e.operation.clone()));
            m.insert("apiVersion".into(), Value::String(e.api_version.clone()));
            if let Some(t) = &e.time {
                m.insert("time".into(), Value::String(t.clone()));
            }
            m.insert("fieldsType".into(), Value::String("FieldsV1".into()));
            m.insert("fieldsV1".into(), encode(&e.set));
            if !e.subresource.is_empty() {
                m.insert("subresource".into(), Value::String(e.subresource.clone()));
            }
            Value::Object(m)
        })
        .collect();
    meta.insert("managedFields".into(), Value::Array(list));
}

#[derive(Default)]
struct Node {
    member: bool,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        if self.member && !self.children.is_empty() {
            m.insert(".".into(), Value::Object(Map::new()));
        }
        for (k, c) in &self.children {
            m.insert(k.clone(), c.to_json());
        }
        Value::Object(m)
    }
}

/// Encode a field set as `fieldsV1`.
pub(crate) fn encode(set: &FieldSet) -> Value {
    let mut root = Node::default();
    for path in set {
        let mut node = &mut root;
        for elem in path {
            node = node.children.entry(elem.clone()).or_default();
        }
        node.member = true;
    }
    root.to_json()
}

/// Decode `fieldsV1`.
pub(crate) fn decode(v: &Value) -> FieldSet {
    fn walk(v: &Value, prefix: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else {
            return;
        };
        for (k, c) in m {
            if k == "." {
                out.insert(prefix.clone());
                continue;
            }
            prefix.push(k.clone());
            if c.as_object().is_some_and(Map::is_empty) {
                out.insert(prefix.clone());
            } else {
                walk(c, prefix, out);
            }
            prefix.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// `.spec.template.spec.containers[name="app"].image`, as conflict messages show paths.
pub(crate) fn display_path(path: &Path) -> String {
    let mut s = String::new();
    for elem in path {
        if let Some(f) = elem.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = elem.strip_prefix("k:") {
            let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(k)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_else(|_| vec![k.to_string()]);
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = elem.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        }
    }
    s
}

fn union_except(entries: &[Entry], skip: Option<usize>) -> FieldSet {
    entries
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .flat_map(|(_, e)| e.set.iter().cloned())
        .collect()
}

/// A field owned by another manager that an apply would change.
#[derive(Debug, Clone)]
pub(crate) struct Conflict {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: String,
    pub paths: Vec<Path>,
}

impl Conflict {
    /// How the real server names a manager in conflict messages.
    pub fn describe_manager(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s = format!("{s} with subresource {:?}", self.subresource);
        }
        if self.operation == "Update" {
            s = match &self.time {
                Some(t) => format!("{s} using {} at {t}", self.api_version),
                None => format!("{s} using {}", self.api_version),
            };
        }
        s
    }
}

/// One server-side apply.
pub(crate) struct Apply<'a> {
    pub schema: &'a Schema,
    pub manager: &'a str,
    pub api_version: &'a str,
    pub force: bool,
    pub scope: Scope,
    pub now: &'a str,
}

impl Apply<'_> {
    /// Apply `cfg` to `live` (its `managedFields` are the current ownership). Returns the new
    /// object (without `managedFields`) and the new ownership, or the conflicts.
    pub fn run(&self, live: &Value, cfg: &Value) -> Result<(Value, Vec<Entry>), Vec<Conflict>> {
        let mut entries = read_entries(live);
        let mut base = live.clone();
        if let Some(meta) = base.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        let cfg_set = field_set(self.schema, cfg, self.scope);
        let merged = Walk::new(self.schema).merge(&base, cfg);
        let diff = compare(self.schema, &base, &merged, self.scope);
        let changed: FieldSet = diff.modified.union(&diff.added).cloned().collect();
        let sub = self.scope.subresource();

        let mut conflicts = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.is(self.manager, "Apply", sub) {
                continue;
            }
            let paths: Vec<Path> = e.set.intersection(&changed).cloned().collect();
            if !paths.is_empty() {
                conflicts.push((i, paths));
            }
        }
        if !conflicts.is_empty() && !self.force {
            return Err(conflicts
                .into_iter()
                .map(|(i, paths)| Conflict {
                    manager: entries[i].manager.clone(),
                    operation: entries[i].operation.clone(),
                    api_version: entries[i].api_version.clone(),
                    time: entries[i].time.clone(),
                    subresource: entries[i].subresource.clone(),
                    paths,
                })
                .collect());
        }
        for (i, paths) in conflicts {
            for p in paths {
                entries[i].set.remove(&p);
            }
        }

        let idx = match entries
            .iter()
            .position(|e| e.is(self.manager, "Apply", sub))
        {
            Some(i) => i,
            None => {
                entries.push(Entry {
                    manager: self.manager.to_string(),
                    operation: "Apply".into(),
                    api_version: self.api_version.to_string(),
                    time: None,
                    subresource: sub.to_string(),
                    set: FieldSet::new(),
                });
                entries.len() - 1
            }
        };
        let prev = std::mem::replace(&mut entries[idx].set, cfg_set.clone());
        entries[idx].api_version = self.api_version.to_string();
        entries[idx].time = Some(self.now.to_string());

        // Prune what this manager applied before, no longer applies, and nobody else owns.
        let others = union_except(&entries, Some(idx));
        let owned: FieldSet = others.union(&cfg_set).cloned().collect();
        let mut result = merged;
        for path in prev.difference(&cfg_set) {
            if others.contains(path) {
                continue;
            }
            // Keep nodes with owned descendants.
            let has_owned_child = owned
                .range(path.clone()..)
                .take_while(|p| p.starts_with(path))
                .any(|p| p.len() > path.len());
            if has_owned_child {
                continue;
            }
            Walk::new(self.schema).remove(&mut result, path);
        }
        Ok((result, entries))
    }
}

/// After a write, fields that no longer exist belong to nobody.
pub(crate) fn drop_removed(
    schema: &Schema,
    old: &Value,
    new: &Value,
    scope: Scope,
    entries: &mut [Entry],
) {
    let diff = compare(schema, old, new, scope);
    for e in entries.iter_mut() {
        for p in &diff.removed {
            e.set.remove(p);
        }
    }
}

/// Ownership after a non-apply write (operation `Update`) by `manager`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_update(
    schema: &Schema,
    old: &Value,
    new: &Value,
    scope: Scope,
    manager: &str,
    api_version: &str,
    now: &str,
    mut entries: Vec<Entry>,
) -> Vec<Entry> {
    let diff = compare(schema, old, new, scope);
    if diff.is_empty() {
        return entries;
    }
    let sub = scope.subresource();
    let changed: FieldSet = diff.modified.union(&diff.added).cloned().collect();
    for e in entries.iter_mut() {
        if !e.is(manager, "Update", sub) {
            for p in &changed {
                e.set.remove(p);
            }
        }
        for p in &diff.removed {
            e.set.remove(p);
        }
    }
    let idx = match entries.iter().position(|e| e.is(manager, "Update", sub)) {
        Some(i) => i,
        None => {
            entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: None,
                subresource: sub.to_string(),
                set: FieldSet::new(),
            });
            entries.len() - 1
        }
    };
    let e = &mut entries[idx];
    e.set.extend(changed);
    e.api_version = api_version.to_string();
    e.time = Some(now.to_string());
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(set: &FieldSet) -> Vec<String> {
        set.iter().map(display_path).collect()
    }

    #[test]
    fn deployment_field_set_encoding() {
        let schema = Schema::builtin("Deployment");
        let cfg = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                "template": {"spec": {"containers": [
                    {"name": "app", "image": "nginx", "ports": [{"containerPort": 80}]}]}}}
        });
        let set = field_set(
            &schema,
            &cfg,
            Scope::Main {
                status_subresource: true,
            },
        );
        let enc = encode(&set);
        assert_eq!(
            enc,
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {"f:selector": {}, "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {},
                        "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}}}}
                }}}}
            })
        );
        assert_eq!(decode(&enc), set);
        assert!(
            paths(&set).contains(&".spec.template.spec.containers[name=\"app\"].image".to_string())
        );
    }

    #[test]
    fn apply_prunes_and_detects_conflicts() {
        let schema = Schema::builtin("ConfigMap");
        let scope = Scope::Main {
            status_subresource: false,
        };
        let a = Apply {
            schema: &schema,
            manager: "a",
            api_version: "v1",
            force: false,
            scope,
            now: "t",
        };
        let live = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let (obj, entries) = a
            .run(
                &live,
                &json!({"metadata": {"name": "x"}, "data": {"k1": "1", "k2": "2"}}),
            )
            .expect("apply");
        let mut obj = obj;
        write_entries(&mut obj, entries);
        // b takes k2 with the same value: shared, no conflict.
        let b = Apply { manager: "b", ..a };
        let (obj2, entries) = b.run(&obj, &json!({"data": {"k2": "2"}})).expect("shared");
        let mut obj2 = obj2;
        write_entries(&mut obj2, entries);
        // b changes k1: conflict with a.
        let err = b
            .run(&obj2, &json!({"data": {"k1": "x"}}))
            .expect_err("conflict");
        assert_eq!(err[0].manager, "a");
        // a drops both keys: k1 is removed, k2 survives (b owns it).
        let (obj3, _) = a
            .run(&obj2, &json!({"metadata": {"name": "x"}}))
            .expect("prune");
        assert_eq!(obj3["data"], json!({"k2": "2"}));
    }
}
