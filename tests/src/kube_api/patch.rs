//! Non-apply patches: JSON merge patch (RFC 7386), a strategic merge patch for
//! built-in kinds, and JSON patch (RFC 6902).

use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The `patchMergeKey` of a built-in list field, or `None` for lists that are replaced.
fn merge_key(spath: &[String], kind: &str) -> Option<&'static str> {
    let last = spath.last()?.as_str();
    let parent = spath.len().checked_sub(2).map(|i| spath[i].as_str());
    match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => Some("name"),
        "ports"
            if matches!(
                parent,
                Some("containers" | "initContainers" | "ephemeralContainers")
            ) =>
        {
            Some("containerPort")
        }
        "ports" if kind == "Service" => Some("port"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "hostAliases" => Some("ip"),
        "conditions" => Some("type"),
        "topologySpreadConstraints" => Some("topologyKey"),
        "ownerReferences" => Some("uid"),
        _ => None,
    }
}

/// Lists of scalars that merge (`patchStrategy: merge`) instead of being replaced.
fn merges_primitives(spath: &[String]) -> bool {
    spath == ["metadata", "finalizers"]
}

/// A strategic merge patch (the directives `$patch`, `$retainKeys`,
/// `$deleteFromPrimitiveList/` and `$setElementOrder/` are understood).
pub(crate) fn strategic_merge_patch(target: &mut Value, patch: &Value, kind: &str) {
    smp(target, patch, kind, &mut Vec::new());
}

fn smp(target: &mut Value, patch: &Value, kind: &str, spath: &mut Vec<String>) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = p.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(del)) = (t.get_mut(field), v.as_array()) {
                items.retain(|i| !del.contains(i));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        spath.push(k.clone());
        match v {
            Value::Object(_) => smp(t.entry(k.clone()).or_insert(Value::Null), v, kind, spath),
            Value::Array(items) => {
                let current = t.entry(k.clone()).or_insert(Value::Array(vec![]));
                merge_list(current, items, kind, spath);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
        spath.pop();
    }
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
}

fn merge_list(current: &mut Value, items: &[Value], kind: &str, spath: &mut Vec<String>) {
    if let Some(key) = merge_key(spath, kind) {
        let Value::Array(cur) = current else {
            *current = Value::Array(items.to_vec());
            return;
        };
        for item in items {
            let Some(k) = item.get(key) else {
                continue;
            };
            let pos = cur.iter().position(|c| c.get(key) == Some(k));
            let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
            match (pos, delete) {
                (Some(i), true) => {
                    cur.remove(i);
                }
                (None, true) => {}
                (Some(i), false) => smp(&mut cur[i], item, kind, spath),
                (None, false) => {
                    let mut fresh = Value::Null;
                    smp(&mut fresh, item, kind, spath);
                    cur.push(fresh);
                }
            }
        }
    } else if merges_primitives(spath) {
        let Value::Array(cur) = current else {
            *current = Value::Array(items.to_vec());
            return;
        };
        for item in items {
            if !cur.contains(item) {
                cur.push(item.clone());
            }
        }
    } else {
        *current = Value::Array(items.to_vec());
    }
}

/// RFC 6902 JSON patch.
pub(crate) fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or_else(|| "json patch must be an array of operations".to_string())?;
    for op in ops {
        let name = op["op"].as_str().ok_or("operation has no \"op\"")?;
        let path = op["path"].as_str().ok_or("operation has no \"path\"")?;
        match name {
            "add" => add(target, path, value_of(op)?)?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                add(target, path, value_of(op)?)?;
            }
            "move" => {
                let from = op["from"].as_str().ok_or("move has no \"from\"")?;
                let v = remove(target, from)?;
                add(target, path, v)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("copy has no \"from\"")?;
                let v = target
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| format!("copy from missing path {from}"))?;
                add(target, path, v)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value_of(op)?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected kind of operation {other:?}")),
        }
    }
    Ok(())
}

fn value_of(op: &Value) -> Result<Value, String> {
    op.get("value")
        .cloned()
        .ok_or_else(|| "operation has no \"value\"".to_string())
}

fn split(path: &str) -> Result<(String, String), String> {
    let i = path
        .rfind('/')
        .ok_or_else(|| format!("invalid json pointer {path:?}"))?;
    let last = path[i + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..i].to_string(), last))
}

fn add(target: &mut Value, path: &str, v: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = v;
        return Ok(());
    }
    let (parent, last) = split(path)?;
    let container = target
        .pointer_mut(&parent)
        .ok_or_else(|| format!("add operation does not apply: doc is missing path: {path:?}"))?;
    match container {
        Value::Object(m) => {
            m.insert(last, v);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(v);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if i > a.len() {
                return Err(format!(
                    "add operation does not apply: index {i} out of bounds"
                ));
            }
            a.insert(i, v);
            Ok(())
        }
        _ => Err(format!(
            "add operation does not apply: doc is missing path: {path:?}"
        )),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: {path:?}");
    match target.pointer_mut(&parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(&last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}}}});
        strategic_merge_patch(
            &mut d,
            &json!({"spec": {"template": {"spec": {"containers": [
                {"name": "b", "image": "z"}, {"name": "a", "$patch": "delete"}]}}}}),
            "Deployment",
        );
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"],
            json!([{"name": "b", "image": "z"}])
        );
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut d,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "replace", "path": "/b/c", "value": 2},
                {"op": "move", "from": "/b", "path": "/d"},
                {"op": "test", "path": "/d/c", "value": 2}
            ]),
        )
        .expect("patch");
        assert_eq!(d, json!({"a": [1, 2, 3], "d": {"c": 2}}));
        assert!(json_patch(&mut d, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
