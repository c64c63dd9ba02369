//! Label selectors (full set-based grammar) and field selectors.

use serde_json::Value;

use super::resources::ResourceType;

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed `labelSelector` (requirements are ANDed).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::NotEq);
                i += 2;
            }
            '!' => {
                out.push(Tok::Not);
                i += 1;
            }
            '=' if chars.get(i + 1) == Some(&'=') => {
                out.push(Tok::DoubleEq);
                i += 2;
            }
            '=' => {
                out.push(Tok::Eq);
                i += 1;
            }
            '>' => {
                out.push(Tok::Gt);
                i += 1;
            }
            '<' => {
                out.push(Tok::Lt);
                i += 1;
            }
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            _ => {
                let start = i;
                while i < chars.len() && !" \t!=><(),".contains(chars[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
        }
    }
    Ok(out)
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let toks = lex(s)?;
        let mut reqs = Vec::new();
        let mut i = 0;
        let err = |m: &str| format!("unable to parse requirement: {m}");
        while i < toks.len() {
            let req = match &toks[i] {
                Tok::Not => {
                    let Some(Tok::Ident(key)) = toks.get(i + 1) else {
                        return Err(err("found '!', expected: identifier"));
                    };
                    i += 2;
                    Requirement {
                        key: key.clone(),
                        op: Op::NotExists,
                    }
                }
                Tok::Ident(key) => {
                    let key = key.clone();
                    i += 1;
                    match toks.get(i) {
                        None | Some(Tok::Comma) => Requirement {
                            key,
                            op: Op::Exists,
                        },
                        Some(Tok::Eq | Tok::DoubleEq | Tok::NotEq | Tok::Gt | Tok::Lt) => {
                            let op = toks[i].clone();
                            i += 1;
                            let value = match toks.get(i) {
                                Some(Tok::Ident(v)) => {
                                    i += 1;
                                    v.clone()
                                }
                                // `a=` selects the empty value.
                                None | Some(Tok::Comma) => String::new(),
                                Some(t) => return Err(err(&format!("unexpected {t:?}"))),
                            };
                            let num = || {
                                value.parse::<i64>().map_err(|_| {
                                    err(&format!("for 'Gt', 'Lt' operators, the value must be an integer: {value}"))
                                })
                            };
                            let op = match op {
                                Tok::Eq | Tok::DoubleEq => Op::Eq(value.clone()),
                                Tok::NotEq => Op::NotEq(value.clone()),
                                Tok::Gt => Op::Gt(num()?),
                                _ => Op::Lt(num()?),
                            };
                            Requirement { key, op }
                        }
                        Some(Tok::Ident(word)) if word == "in" || word == "notin" => {
                            let negate = word == "notin";
                            i += 1;
                            if toks.get(i) != Some(&Tok::Open) {
                                return Err(err("expected '(' after set operator"));
                            }
                            i += 1;
                            let mut values = Vec::new();
                            loop {
                                match toks.get(i) {
                                    Some(Tok::Ident(v)) => {
                                        values.push(v.clone());
                                        i += 1;
                                    }
                                    Some(Tok::Comma) => i += 1,
                                    Some(Tok::Close) => {
                                        i += 1;
                                        break;
                                    }
                                    _ => return Err(err("expected ')' closing the value set")),
                                }
                            }
                            let op = if negate {
                                Op::NotIn(values)
                            } else {
                                Op::In(values)
                            };
                            Requirement { key, op }
                        }
                        Some(t) => return Err(err(&format!("unexpected {t:?} after key {key}"))),
                    }
                }
                t => return Err(err(&format!("unexpected {t:?}"))),
            };
            validate_key(&req.key).map_err(|e| err(&e))?;
            reqs.push(req);
            match toks.get(i) {
                None => {}
                Some(Tok::Comma) => i += 1,
                Some(t) => return Err(err(&format!("expected ',' but got {t:?}"))),
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// The selector described by a `LabelSelector` object (`matchLabels`/`matchExpressions`).
    pub fn from_object(sel: &Value) -> Result<Self, String> {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(Requirement {
                    key: k.clone(),
                    op: Op::Eq(v.as_str().unwrap_or_default().to_string()),
                });
            }
        }
        if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
            for e in exprs {
                let key = e["key"].as_str().unwrap_or_default().to_string();
                let values: Vec<String> = e["values"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let op = match e["operator"].as_str() {
                    Some("In") => Op::In(values),
                    Some("NotIn") => Op::NotIn(values),
                    Some("Exists") => Op::Exists,
                    Some("DoesNotExist") => Op::NotExists,
                    other => {
                        return Err(format!("{other:?} is not a valid label selector operator"))
                    }
                };
                reqs.push(Requirement { key, op });
            }
        }
        Ok(LabelSelector(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
                Op::Eq(x) => v == Some(x.as_str()),
                Op::NotEq(x) => v != Some(x.as_str()),
                Op::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.iter().any(|x| x == v)),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

fn validate_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() || prefix.len() > 253 {
                return Err(format!(
                    "invalid label key {key:?}: prefix part must be a DNS subdomain"
                ));
            }
            name
        }
        None => key,
    };
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
        ))
    }
}

/// A parsed `fieldSelector`.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

/// The field labels a resource supports in field selectors.
fn supported_fields(rt: &ResourceType) -> &'static [&'static str] {
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") => &["type"],
        ("", "namespaces") => &["status.phase"],
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "persistentvolumeclaims") => &[],
        ("batch", "jobs") => &["status.successful"],
        _ => &[],
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Split on unescaped `sep`.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push('\\');
            cur.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

impl FieldSelector {
    pub fn parse(s: &str, rt: &ResourceType) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_unescaped(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (key, negate, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let key = key.trim().to_string();
            if key != "metadata.name"
                && key != "metadata.namespace"
                && !supported_fields(rt).contains(&key.as_str())
            {
                return Err(format!("field label not supported: {key}"));
            }
            reqs.push((key, negate, unescape(value.trim())));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(key, negate, value)| {
            let pointer = format!("/{}", key.replace('.', "/"));
            let actual = match obj.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) != *negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_grammar() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "fe", "n": "5"}}});
        let ok = |s: &str| LabelSelector::parse(s).expect(s).matches(&obj);
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(!ok("app!=web"));
        assert!(ok("missing!=x"));
        assert!(ok("!missing"));
        assert!(!ok("!app"));
        assert!(ok("app in (web, api),tier notin (be)"));
        assert!(!ok("app in (api)"));
        assert!(ok("n>4,n<6"));
        assert!(ok(""));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
    }
}
