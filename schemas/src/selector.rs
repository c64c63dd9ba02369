//! Store labels and label selectors, with Kubernetes semantics: label keys and values as
//! Kubernetes validates them, `matchLabels` and `matchExpressions` (`In`, `NotIn`, `Exists`,
//! `DoesNotExist`), all terms ANDed. In the fleet file a selector is written either as
//! `{matchLabels: …, matchExpressions: […]}` or, for the common case, as a plain map of
//! labels (`{region: us-south}`), which means `matchLabels`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A store's labels.
pub type Labels = BTreeMap<String, String>;

/// Most labels one store may carry.
pub const MAX_LABELS: usize = 64;

/// Why a label or selector is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A label key is not a Kubernetes qualified name (`[prefix/]name`).
    #[error("label key {key:?}: {why}")]
    Key {
        /// The key (as given, possibly truncated).
        key: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A label value is not a Kubernetes label value.
    #[error("label {key}: value {value:?}: {why}")]
    Value {
        /// The key.
        key: String,
        /// The value (as given, possibly truncated).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A match expression is malformed.
    #[error("matchExpressions[{index}]: {why}")]
    Expression {
        /// Which expression.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// More labels than [`MAX_LABELS`].
    #[error("{0} labels: at most {MAX_LABELS}")]
    TooMany(usize),
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `[a-z0-9A-Z]` at both ends, `[-_.a-z0-9A-Z]` between, at most `max` characters.
fn name_part(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > max {
        return Err(if max == 63 {
            "at most 63 characters"
        } else {
            "too long"
        });
    }
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    let b = s.as_bytes();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("must start and end with a letter or digit");
    }
    if !b
        .iter()
        .all(|&c| alnum(c) || c == b'-' || c == b'_' || c == b'.')
    {
        return Err("only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// A DNS-1123 subdomain (a key's prefix): lowercase, dots between labels, at most 253.
fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("prefix must be 1..253 characters");
    }
    for part in s.split('.') {
        let b = part.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err("prefix must be a lowercase DNS subdomain");
        }
    }
    Ok(())
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters.
pub fn validate_label_key(key: &str) -> Result<(), SelectorError> {
    let fail = |why| SelectorError::Key {
        key: clip(key),
        why,
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(fail)?;
            name
        }
        None => key,
    };
    name_part(name, 63).map_err(fail)
}

/// Checks a label value: empty, or at most 63 characters of the name alphabet (no spaces,
/// no newlines, nothing YAML or a shell could read as structure).
pub fn validate_label_value(key: &str, value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    name_part(value, 63).map_err(|why| SelectorError::Value {
        key: clip(key),
        value: clip(value),
        why,
    })
}

/// Checks a store's labels.
pub fn validate_labels(labels: &Labels) -> Result<(), SelectorError> {
    if labels.len() > MAX_LABELS {
        return Err(SelectorError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        validate_label_key(k)?;
        validate_label_value(k, v)?;
    }
    Ok(())
}

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label is set to one of `values`.
    In,
    /// The label is not set, or set to none of `values`.
    NotIn,
    /// The label is set (any value).
    Exists,
    /// The label is not set.
    DoesNotExist,
}

/// One `matchExpressions` term.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expression {
    /// The label key.
    pub key: String,
    /// The operator.
    pub operator: Operator,
    /// Values (`In`/`NotIn`: at least one; `Exists`/`DoesNotExist`: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The long form of a selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorTerms {
    /// Labels that must equal these values.
    #[serde(
        rename = "matchLabels",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub match_labels: Labels,
    /// Expressions that must all hold.
    #[serde(
        rename = "matchExpressions",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<Expression>,
}

/// A label selector: the long form, or a plain map of labels meaning `matchLabels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Selector {
    /// `{matchLabels: …, matchExpressions: […]}`.
    Terms(SelectorTerms),
    /// `{region: us-south}`.
    Labels(Labels),
}

impl Selector {
    /// The selector as its terms.
    pub fn terms(&self) -> SelectorTerms {
        match self {
            Selector::Terms(t) => t.clone(),
            Selector::Labels(l) => SelectorTerms {
                match_labels: l.clone(),
                match_expressions: Vec::new(),
            },
        }
    }

    /// Checks keys, values and operators. An empty selector is refused: it would select
    /// every store, which is what `fleet: true` says explicitly.
    pub fn validate(&self) -> Result<(), SelectorError> {
        let t = self.terms();
        if t.match_labels.is_empty() && t.match_expressions.is_empty() {
            return Err(SelectorError::Expression {
                index: 0,
                why: "an empty selector selects every store; say fleet: true instead",
            });
        }
        for (k, v) in &t.match_labels {
            validate_label_key(k)?;
            validate_label_value(k, v)?;
        }
        for (index, e) in t.match_expressions.iter().enumerate() {
            validate_label_key(&e.key)?;
            match e.operator {
                Operator::In | Operator::NotIn if e.values.is_empty() => {
                    return Err(SelectorError::Expression {
                        index,
                        why: "In and NotIn need at least one value",
                    })
                }
                Operator::Exists | Operator::DoesNotExist if !e.values.is_empty() => {
                    return Err(SelectorError::Expression {
                        index,
                        why: "Exists and DoesNotExist take no values",
                    })
                }
                _ => {}
            }
            for v in &e.values {
                validate_label_value(&e.key, v)?;
            }
        }
        Ok(())
    }

    /// Whether a store with `labels` is selected (every term must hold).
    pub fn matches(&self, labels: &Labels) -> bool {
        let t = self.terms();
        t.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && t.match_expressions.iter().all(|e| {
                let got = labels.get(&e.key);
                match e.operator {
                    Operator::In => got.is_some_and(|v| e.values.contains(v)),
                    Operator::NotIn => !got.is_some_and(|v| e.values.contains(v)),
                    Operator::Exists => got.is_some(),
                    Operator::DoesNotExist => got.is_none(),
                }
            })
    }
}

impl std::fmt::Display for Selector {
    /// Kubernetes' text form: `region=us-south,pos in (v7,v8),!legacy`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.terms();
        let mut parts: Vec<String> = t
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for e in &t.match_expressions {
            parts.push(match e.operator {
                Operator::In => format!("{} in ({})", e.key, e.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
                Operator::Exists => e.key.clone(),
                Operator::DoesNotExist => format!("!{}", e.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;

    /// The command line's form, as kubectl's `-l`: terms joined by commas, each `k=v` (or
    /// `k==v`), `k!=v`, `k in (a, b)`, `k notin (a, b)`, `k` (exists) or `!k` (does not).
    fn from_str(s: &str) -> Result<Selector, SelectorError> {
        let mut terms = SelectorTerms::default();
        // Commas inside a set's parentheses do not end a term.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        for (index, part) in parts.into_iter().map(str::trim).enumerate() {
            let set = |rest: &str| -> Option<Vec<String>> {
                let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some(
                    inner
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )
            };
            let words: Vec<&str> = part.splitn(3, char::is_whitespace).collect();
            if let [k, op @ ("in" | "notin"), rest] = words.as_slice() {
                let values = set(rest).ok_or(SelectorError::Expression {
                    index,
                    why: "a set is written (a, b)",
                })?;
                terms.match_expressions.push(Expression {
                    key: (*k).to_owned(),
                    operator: if *op == "in" {
                        Operator::In
                    } else {
                        Operator::NotIn
                    },
                    values,
                });
            } else if let Some((k, v)) = part.split_once("!=") {
                terms.match_expressions.push(Expression {
                    key: k.trim().to_owned(),
                    operator: Operator::NotIn,
                    values: vec![v.trim().to_owned()],
                });
            } else if let Some((k, v)) = part.split_once('=') {
                terms.match_labels.insert(
                    k.trim().to_owned(),
                    v.trim().trim_start_matches('=').trim().to_owned(),
                );
            } else if let Some(k) = part.strip_prefix('!') {
                terms.match_expressions.push(Expression {
                    key: k.trim().to_owned(),
                    operator: Operator::DoesNotExist,
                    values: Vec::new(),
                });
            } else if !part.is_empty() {
                terms.match_expressions.push(Expression {
                    key: part.to_owned(),
                    operator: Operator::Exists,
                    values: Vec::new(),
                });
            } else {
                return Err(SelectorError::Expression {
                    index,
                    why: "empty term",
                });
            }
        }
        let sel = Selector::Terms(terms);
        sel.validate()?;
        Ok(sel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn yaml_like(json: &str) -> Selector {
        serde_json::from_str(json).expect("selector")
    }

    #[test]
    fn keys_and_values_follow_kubernetes() {
        for k in [
            "region",
            "roost.dev/format",
            "a",
            "pos_v7",
            "x.y-z",
            "example.com/A.b",
        ] {
            assert_eq!(validate_label_key(k), Ok(()), "{k}");
        }
        for k in [
            "",
            "-a",
            "a-",
            "UPPER.example/x",
            "a/b/c",
            "has space",
            &"k".repeat(64),
            "/x",
        ] {
            assert!(validate_label_key(k).is_err(), "{k:?}");
        }
        for v in ["", "us-south", "v7", "A.b_c"] {
            assert_eq!(validate_label_value("k", v), Ok(()), "{v}");
        }
        for v in [
            "line\nbreak",
            "has space",
            "-x",
            "x-",
            &"v".repeat(64),
            "a:b",
        ] {
            assert!(validate_label_value("k", v).is_err(), "{v:?}");
        }
        let too_many: Labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(validate_labels(&too_many), Err(SelectorError::TooMany(65)));
    }

    #[test]
    fn short_and_long_forms_match_like_kubernetes() {
        let store = labels(&[
            ("region", "us-south"),
            ("format", "drive-thru"),
            ("pos", "v7"),
        ]);
        let other = labels(&[("region", "eu-west"), ("pos", "v6")]);
        let short = yaml_like(r#"{"region": "us-south", "format": "drive-thru"}"#);
        assert!(short.matches(&store));
        assert!(!short.matches(&other));
        let long = yaml_like(
            r#"{"matchLabels": {"region": "us-south"},
                "matchExpressions": [{"key": "pos", "operator": "In", "values": ["v7", "v8"]},
                                     {"key": "legacy", "operator": "DoesNotExist"}]}"#,
        );
        assert!(long.matches(&store));
        assert!(!long.matches(&other));
        let not_in = yaml_like(
            r#"{"matchExpressions": [{"key": "pos", "operator": "NotIn", "values": ["v7"]}]}"#,
        );
        assert!(!not_in.matches(&store));
        assert!(not_in.matches(&other));
        // NotIn also selects stores without the label, as in Kubernetes.
        assert!(not_in.matches(&Labels::new()));
        let exists =
            yaml_like(r#"{"matchExpressions": [{"key": "format", "operator": "Exists"}]}"#);
        assert!(exists.matches(&store));
        assert!(!exists.matches(&other));
        assert_eq!(long.to_string(), "region=us-south,pos in (v7,v8),!legacy");
    }

    #[test]
    fn malformed_selectors_are_refused() {
        let bad = [
            r#"{}"#,
            r#"{"matchExpressions": [{"key": "pos", "operator": "In", "values": []}]}"#,
            r#"{"matchExpressions": [{"key": "pos", "operator": "Exists", "values": ["x"]}]}"#,
            r#"{"region": "us south"}"#,
            r#"{"bad key": "x"}"#,
        ];
        for b in bad {
            let s: Selector = serde_json::from_str(b).expect("shape");
            assert!(s.validate().is_err(), "{b}");
        }
        // An unknown operator or field does not parse as the long form; as the short form
        // its value is not a string, so it does not parse at all.
        assert!(serde_json::from_str::<Selector>(
            r#"{"matchExpressions": [{"key": "pos", "operator": "Like", "values": ["x"]}]}"#
        )
        .is_err());
    }

    #[test]
    fn command_line_form() {
        let s: Selector = "region=us-south,format=drive-thru".parse().expect("parse");
        assert!(s.matches(&labels(&[("region", "us-south"), ("format", "drive-thru")])));
        assert!(!s.matches(&labels(&[("region", "us-south")])));
        let s: Selector = "pos!=v6,!legacy,format".parse().expect("parse");
        assert!(s.matches(&labels(&[("pos", "v7"), ("format", "x")])));
        assert!(!s.matches(&labels(&[("pos", "v6"), ("format", "x")])));
        assert!("".parse::<Selector>().is_err());
        assert!("a=b,,c=d".parse::<Selector>().is_err());
        let s: Selector = "region in (us-south, us-west),pos notin (v6),format==drive-thru"
            .parse()
            .expect("sets");
        let store =
            |region, pos| labels(&[("region", region), ("pos", pos), ("format", "drive-thru")]);
        assert!(s.matches(&store("us-west", "v7")));
        assert!(!s.matches(&store("us-east", "v7")));
        assert!(!s.matches(&store("us-south", "v6")));
        assert!("region in us-south".parse::<Selector>().is_err());
        assert!("region in ()".parse::<Selector>().is_err());
    }
}
