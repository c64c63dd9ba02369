//! The store inventory in the fleet repository: files `stores/*.yaml` beside `roost.yaml`,
//! each holding one or more `kind: Store` documents. Parsed from YAML by `roost fleet`,
//! validated against `schema/store.schema.json` and by the rules here. A store missing from
//! the inventory keeps working as before (its groups from its own configuration).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::API_VERSION;
use crate::selector::{validate_labels, Labels};
use crate::validate_name;

/// `kind` of an inventory document.
pub const KIND: &str = "Store";

/// Most vars one store may carry.
pub const MAX_VARS: usize = 256;

/// Longest var value, in bytes.
pub const MAX_VAR_BYTES: usize = 4096;

/// One store of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreEntry {
    /// `roost.dev/v1alpha1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// `Store`.
    pub kind: String,
    /// The store's name (its MQTT identity and topic segment).
    pub name: String,
    /// Labels, Kubernetes syntax: what selectors in `roost.yaml` match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// IANA time zone (`America/Chicago`); UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Values for `${roost.vars.KEY}` in the store's manifests (strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, String>,
    /// The store's public age key (`age1…`), written by enrollment: sealed secrets for the
    /// store are encrypted to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_recipient: Option<String>,
}

/// Why an inventory entry is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct StoreEntryError {
    /// Which field (`labels`, `vars.printer_ip`, …).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> StoreEntryError {
    StoreEntryError {
        field: field.into(),
        message: message.into(),
    }
}

/// A var name: a letter or `_`, then letters, digits and `_`; at most 63 characters.
pub fn validate_var_name(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether `s` looks like a time zone name (`UTC`, `Area/City`, `Area/Sub/City`): the
/// syntax only; the fleet controller checks it against the time zone database.
pub fn looks_like_timezone(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('/').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'+'))
        })
}

/// Whether `s` has the form of an age X25519 recipient (`age1` and 58 bech32 characters).
pub fn looks_like_age_recipient(s: &str) -> bool {
    const BECH32: &[u8] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
    s.len() == 62 && s.starts_with("age1") && s.as_bytes()[4..].iter().all(|c| BECH32.contains(c))
}

impl StoreEntry {
    /// The rules beyond the JSON Schema.
    pub fn validate(&self) -> Result<(), StoreEntryError> {
        if self.api_version != API_VERSION {
            return Err(err("apiVersion", format!("must be {API_VERSION}")));
        }
        if self.kind != KIND {
            return Err(err("kind", format!("must be {KIND}")));
        }
        validate_name(&self.name).map_err(|e| err("name", e.to_string()))?;
        validate_labels(&self.labels).map_err(|e| err("labels", e.to_string()))?;
        if let Some(tz) = &self.timezone {
            if !looks_like_timezone(tz) {
                return Err(err("timezone", "not an IANA time zone name"));
            }
        }
        if self.vars.len() > MAX_VARS {
            return Err(err(
                "vars",
                format!("{} vars: at most {MAX_VARS}", self.vars.len()),
            ));
        }
        for (k, v) in &self.vars {
            if !validate_var_name(k) {
                return Err(err(
                    "vars",
                    format!(
                        "{:?}: a letter or '_', then letters, digits, '_' (at most 63)",
                        k.chars().take(80).collect::<String>()
                    ),
                ));
            }
            if v.len() > MAX_VAR_BYTES {
                return Err(err(
                    format!("vars.{k}"),
                    format!("{} bytes: at most {MAX_VAR_BYTES}", v.len()),
                ));
            }
        }
        if let Some(r) = &self.age_recipient {
            if !looks_like_age_recipient(r) {
                return Err(err("age_recipient", "not an age X25519 recipient (age1…)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"apiVersion": "roost.dev/v1alpha1", "kind": "Store", "name": "store-0042",
        "labels": {"region": "us-south", "format": "drive-thru"}, "timezone": "America/Chicago",
        "vars": {"store_number": "0042", "printer_ip": "10.42.0.17"},
        "age_recipient": "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"}"#;

    type Patch = Box<dyn FnOnce(&mut serde_json::Value)>;

    fn entry(patch: impl FnOnce(&mut serde_json::Value)) -> Result<(), StoreEntryError> {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).expect("json");
        patch(&mut v);
        let e: StoreEntry = serde_json::from_value(v).map_err(|e| err("", e.to_string()))?;
        e.validate()
    }

    #[test]
    fn rules() {
        assert_eq!(entry(|_| {}), Ok(()));
        let bad: Vec<(&str, Patch)> = vec![
            ("kind", Box::new(|v| v["kind"] = "Fleet".into())),
            ("name", Box::new(|v| v["name"] = "Store 42".into())),
            (
                "labels",
                Box::new(|v| v["labels"]["region"] = "us\nsouth".into()),
            ),
            ("labels", Box::new(|v| v["labels"]["bad key"] = "x".into())),
            (
                "timezone",
                Box::new(|v| v["timezone"] = "../etc/passwd".into()),
            ),
            ("vars", Box::new(|v| v["vars"]["no-dash"] = "x".into())),
            (
                "vars.big",
                Box::new(|v| v["vars"]["big"] = "x".repeat(MAX_VAR_BYTES + 1).into()),
            ),
            (
                "age_recipient",
                Box::new(|v| v["age_recipient"] = "age1short".into()),
            ),
        ];
        for (field, patch) in bad {
            assert_eq!(entry(patch).expect_err(field).field, field);
        }
        let many = entry(|v| {
            v["vars"] = (0..MAX_VARS + 1)
                .map(|i| (format!("v{i}"), serde_json::Value::from("x")))
                .collect::<serde_json::Map<_, _>>()
                .into()
        });
        assert!(many.expect_err("many").message.contains("at most 256"));
        // A var value may hold anything (substitution inserts it as one string scalar).
        assert_eq!(
            entry(|v| v["vars"]["note"] = "x\n  evil: true".into()),
            Ok(())
        );
        // Unknown fields are refused.
        assert!(entry(|v| v["extra"] = 1.into()).is_err());
    }
}
