//! The object store: objects keyed like etcd keys, a global resourceVersion
//! counter, and a bounded event history that watches replay from.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::watch;

/// How many events the history keeps before old resourceVersions expire (410 Gone).
const HISTORY_LIMIT: usize = 20_000;

/// Where an object lives: `group`, resource `plural`, namespace ("" when cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjKey {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(group: &str, plural: &str, namespace: &str, name: &str) -> Self {
        ObjKey {
            group: group.to_string(),
            plural: plural.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches replay it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub rv: u64,
    pub key: ObjKey,
    pub etype: EventType,
    /// The object after the change (for `Deleted`: its last state, carrying the deletion's RV).
    pub object: Arc<Value>,
    /// The object before the change (for `Modified`), to turn selector transitions into ADDED/DELETED.
    pub prev: Option<Arc<Value>>,
}

/// A requested resourceVersion is older than the kept history.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expired {
    pub requested: u64,
}

pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Record>,
    /// Events with `rv <= compacted_rv` are gone.
    compacted_rv: u64,
    notify: watch::Sender<u64>,
    /// `namespace/name` of workloads the controllers never make available.
    pub never_available: HashSet<String>,
    pub next_cluster_ip: u32,
    pub used_node_ports: BTreeSet<u16>,
}

pub(crate) fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

impl Store {
    pub fn new(notify: watch::Sender<u64>) -> Self {
        Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 1,
            notify,
            never_available: HashSet::new(),
            next_cluster_ip: 1,
            used_node_ports: BTreeSet::new(),
        }
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &ObjKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// All objects of one resource, ordered by namespace then name.
    pub fn objects_of<'a>(
        &'a self,
        group: &'a str,
        plural: &'a str,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        let start = ObjKey::new(group, plural, "", "");
        self.objects
            .range(start..)
            .take_while(move |(k, _)| k.group == group && k.plural == plural)
    }

    /// All objects of one resource in one namespace (or all namespaces when `ns` is `None`).
    pub fn objects_in<'a>(
        &'a self,
        group: &'a str,
        plural: &'a str,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        self.objects_of(group, plural)
            .filter(move |(k, _)| ns.is_none_or(|n| k.namespace == n))
    }

    /// Every stored object.
    pub fn all(&self) -> impl Iterator<Item = (&ObjKey, &Value)> {
        self.objects.iter()
    }

    fn record(&mut self, key: ObjKey, etype: EventType, object: Value, prev: Option<Value>) {
        self.history.push_back(Record {
            rv: self.rv,
            key,
            etype,
            object: Arc::new(object),
            prev: prev.map(Arc::new),
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    /// Store a new object (ADDED); returns it with its resourceVersion.
    pub fn create(&mut self, key: ObjKey, mut obj: Value) -> Value {
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.objects.insert(key.clone(), obj.clone());
        self.record(key, EventType::Added, obj.clone(), None);
        obj
    }

    /// Replace an existing object (MODIFIED); returns it with its new resourceVersion.
    pub fn update(&mut self, key: ObjKey, mut obj: Value) -> Value {
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        let prev = self.objects.insert(key.clone(), obj.clone());
        self.record(key, EventType::Modified, obj.clone(), prev);
        obj
    }

    /// Remove an object (DELETED); returns its last state, carrying the deletion's resourceVersion.
    pub fn delete(&mut self, key: &ObjKey) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.record(key.clone(), EventType::Deleted, obj.clone(), None);
        Some(obj)
    }

    /// Events after `rv`, or `Expired` when the history no longer reaches back that far.
    pub fn events_after(&self, rv: u64) -> Result<Vec<Record>, Expired> {
        if rv < self.compacted_rv {
            return Err(Expired { requested: rv });
        }
        // History is ordered by rv; find the first record after `rv`.
        let start = self.history.partition_point(|r| r.rv <= rv);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Whether `rv` is older than the kept history.
    pub fn is_expired(&self, rv: u64) -> bool {
        rv < self.compacted_rv
    }

    /// Drop the whole event history: every resourceVersion before now expires.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }
}
