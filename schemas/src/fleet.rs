//! The fleet repository file (`roost.yaml`): the whole fleet's desired state, in Git. Parsed
//! from YAML, validated against `schema/fleet.schema.json` by `roost fleet` and by the rules
//! here (which a JSON Schema cannot say: unknown groups, duplicate wave names, paths).
//!
//! Groups are either named (the v1.1 list form: membership from each store's configuration)
//! or defined here with their members (v1.2: by store list or label selector over the store
//! inventory), in which case their declaration order is the stores' precedence order.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::rollout::{OnFailure, Schedule};
use crate::selector::{Labels, Selector};
use crate::window::{Blackout, Window};
use crate::{validate_name, Policy};

/// `apiVersion` of the file.
pub const API_VERSION: &str = "roost.dev/v1alpha1";

/// The file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// `roost.dev/v1alpha1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// `Fleet`.
    pub kind: String,
    /// The groups waves may name (optional; when given, others are an error): a list of
    /// names, or definitions with members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Groups>,
    /// What every deployment gets unless it says otherwise (v1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<Defaults>,
    /// Deployments by name.
    #[serde(default)]
    pub deployments: BTreeMap<String, FleetDeployment>,
}

/// `defaults:` (v1.2): windows, blackouts, urgency and the failure policy every deployment
/// gets unless it gives its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Store-local operating windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Window>>,
    /// Store-local blackout dates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackouts: Option<Vec<Blackout>>,
    /// Ignore windows and blackouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgent: Option<bool>,
    /// `policy.on_failure`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<DefaultsPolicy>,
}

/// `defaults.policy`: the policy fields a fleet-wide default makes sense for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsPolicy {
    /// `stay` or `rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

/// `groups:` of the fleet file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Groups {
    /// `[canary, all]`: names only; each store's configuration says which it is in.
    Names(Vec<String>),
    /// `{canary: {stores: [...]}, us-south: {selector: {region: us-south}}}`: members from
    /// the inventory, precedence in declaration order.
    Defined(IndexMap<String, GroupDef>),
}

/// A group defined in the fleet file: listed stores, stores whose labels match, or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    /// Stores named explicitly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<String>,
    /// Stores whose inventory labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
}

impl GroupDef {
    /// Whether the store `name` with `labels` is a member.
    pub fn contains(&self, name: &str, labels: &Labels) -> bool {
        self.stores.iter().any(|s| s == name)
            || self.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

impl Groups {
    /// The group names, in declaration order.
    pub fn names(&self) -> Vec<String> {
        match self {
            Groups::Names(n) => n.clone(),
            Groups::Defined(d) => d.keys().cloned().collect(),
        }
    }

    /// The groups of a store in precedence order, when the file defines members; `None` for
    /// the list form (the store's own configuration decides).
    pub fn of(&self, name: &str, labels: &Labels) -> Option<Vec<String>> {
        match self {
            Groups::Names(_) => None,
            Groups::Defined(d) => Some(
                d.iter()
                    .filter(|(_, g)| g.contains(name, labels))
                    .map(|(n, _)| n.clone())
                    .collect(),
            ),
        }
    }
}

/// Which stores a deployment is for (`targets:`); absent: every store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Stores whose inventory labels match.
    pub selector: Selector,
}

/// One deployment of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetDeployment {
    /// Where its manifests are (required unless `remove`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FleetSource>,
    /// Convergence policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Stage now, activate then (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Only these stores get the deployment (by inventory labels); absent: every store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// Waves; default one wave, the whole fleet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// When a plan stops by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
    /// Per-store pins (store scope; outside waves).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stores: BTreeMap<String, StorePin>,
    /// A tombstone on every scope roost published the deployment to.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remove: bool,
    /// Store-local operating windows (v1.2); absent: `defaults.windows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Window>>,
    /// Store-local blackout dates (v1.2); absent: `defaults.blackouts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackouts: Option<Vec<Blackout>>,
    /// Ignore windows and blackouts (v1.2); absent: `defaults.urgent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgent: Option<bool>,
    /// Deployments of this file that must converge on a store before it applies this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
}

/// A deployment's source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSource {
    /// Repository URL.
    pub url: String,
    /// A tracked branch or tag.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// A pinned commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Directory in the repository.
    pub path: String,
}

/// One wave of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// Name.
    pub name: String,
    /// A group (its group topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A percentage of the fleet (store topics of a stable hash subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Named stores (store topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stores: Option<Vec<String>>,
    /// The whole fleet (fleet topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<bool>,
    /// Stores whose inventory labels match (store topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Share of the wave's online stores that must converge (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_pct: Option<u32>,
    /// Soak time after the share is reached (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_s: Option<u64>,
}

/// What a wave targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaveTarget {
    /// A group.
    Group(String),
    /// A percentage of the fleet.
    Percent(u32),
    /// Named stores.
    Stores(Vec<String>),
    /// The fleet.
    Fleet,
    /// Stores whose inventory labels match.
    Selector(Selector),
}

impl Wave {
    /// The one target this wave names.
    pub fn target(&self) -> Option<WaveTarget> {
        let n = [
            self.group.is_some(),
            self.percent.is_some(),
            self.stores.is_some(),
            self.fleet == Some(true),
            self.selector.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            return None;
        }
        if let Some(g) = &self.group {
            return Some(WaveTarget::Group(g.clone()));
        }
        if let Some(p) = self.percent {
            return Some(WaveTarget::Percent(p));
        }
        if let Some(s) = &self.stores {
            return Some(WaveTarget::Stores(s.clone()));
        }
        if let Some(s) = &self.selector {
            return Some(WaveTarget::Selector(s.clone()));
        }
        Some(WaveTarget::Fleet)
    }

    /// Share to converge (percent).
    pub fn converged_pct(&self) -> u32 {
        self.converged_pct.unwrap_or(100)
    }

    /// Soak seconds.
    pub fn soak_s(&self) -> u64 {
        self.soak_s.unwrap_or(0)
    }
}

/// When a plan stops by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// Abort when more than this share of the finished stores failed (default 5).
    #[serde(default = "default_failed_pct")]
    pub failed_pct: u32,
    /// ... once at least this many stores finished (default 1).
    #[serde(default = "default_min_finished")]
    pub min_finished: u32,
    /// Abort when a wave runs longer than this (default 3600).
    #[serde(default = "default_wave_timeout")]
    pub wave_timeout_s: u64,
}

fn default_failed_pct() -> u32 {
    5
}
fn default_min_finished() -> u32 {
    1
}
fn default_wave_timeout() -> u64 {
    3600
}

impl Default for Abort {
    fn default() -> Self {
        Abort {
            failed_pct: default_failed_pct(),
            min_finished: default_min_finished(),
            wave_timeout_s: default_wave_timeout(),
        }
    }
}

/// A store pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorePin {
    /// Pinned commit.
    pub revision: String,
}

/// Why a fleet file is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FleetFileError {
    /// Where (`deployments.web.waves[1]`).
    pub path: String,
    /// What.
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> FleetFileError {
    FleetFileError {
        path: path.into(),
        message: message.into(),
    }
}

impl FleetFile {
    /// The rules beyond the JSON Schema.
    pub fn validate(&self) -> Result<(), FleetFileError> {
        if self.api_version != API_VERSION {
            return Err(err("apiVersion", format!("must be {API_VERSION}")));
        }
        if self.kind != "Fleet" {
            return Err(err("kind", "must be Fleet"));
        }
        let group_names = self.groups.as_ref().map(Groups::names);
        if let Some(gs) = &group_names {
            let mut seen = std::collections::BTreeSet::new();
            for g in gs {
                validate_name(g).map_err(|e| err("groups", e.to_string()))?;
                if !seen.insert(g) {
                    return Err(err("groups", format!("{g} twice")));
                }
            }
        }
        if let Some(Groups::Defined(defs)) = &self.groups {
            for (g, def) in defs {
                let at = format!("groups.{g}");
                if def.stores.is_empty() && def.selector.is_none() {
                    return Err(err(&at, "give stores, a selector, or both"));
                }
                for s in &def.stores {
                    validate_name(s).map_err(|e| err(format!("{at}.stores"), e.to_string()))?;
                }
                if let Some(sel) = &def.selector {
                    sel.validate()
                        .map_err(|e| err(format!("{at}.selector"), e.to_string()))?;
                }
            }
        }
        if let Some(def) = &self.defaults {
            crate::window::validate(
                def.windows.as_deref().unwrap_or_default(),
                def.blackouts.as_deref().unwrap_or_default(),
            )
            .map_err(|(f, m)| err(format!("defaults.{f}"), m))?;
        }
        self.validate_dependencies()?;
        for (name, d) in &self.deployments {
            let at = format!("deployments.{name}");
            validate_name(name).map_err(|e| err(&at, e.to_string()))?;
            if d.remove {
                continue;
            }
            let src = d
                .source
                .as_ref()
                .ok_or_else(|| err(format!("{at}.source"), "required unless remove: true"))?;
            match (&src.git_ref, &src.revision) {
                (Some(_), Some(_)) => {
                    return Err(err(
                        format!("{at}.source"),
                        "exactly one of ref and revision, not both",
                    ))
                }
                (None, None) => {
                    return Err(err(format!("{at}.source"), "ref or revision is required"))
                }
                (None, Some(r)) if !crate::rollout::is_full_sha(r) => {
                    return Err(err(
                        format!("{at}.source.revision"),
                        "must be a full 40-hex commit id",
                    ))
                }
                _ => {}
            }
            crate::rollout::normalize_path(&src.path)
                .map_err(|e| err(format!("{at}.source.path"), e))?;
            if let Some(nb) = &d.not_before {
                crate::parse_rfc3339(nb)
                    .ok_or_else(|| err(format!("{at}.not_before"), "not an RFC 3339 time"))?;
            }
            crate::window::validate(
                d.windows.as_deref().unwrap_or_default(),
                d.blackouts.as_deref().unwrap_or_default(),
            )
            .map_err(|(f, m)| err(format!("{at}.{f}"), m))?;
            if let Some(t) = &d.targets {
                t.selector
                    .validate()
                    .map_err(|e| err(format!("{at}.targets.selector"), e.to_string()))?;
            }
            let mut names = std::collections::BTreeSet::new();
            for (i, w) in d.waves.iter().enumerate() {
                let wat = format!("{at}.waves[{i}]");
                validate_name(&w.name).map_err(|e| err(&wat, e.to_string()))?;
                if !names.insert(&w.name) {
                    return Err(err(&wat, format!("duplicate wave name {}", w.name)));
                }
                match w.target() {
                    None => {
                        return Err(err(
                            &wat,
                            "exactly one of group, percent, stores, selector, fleet: true",
                        ))
                    }
                    Some(WaveTarget::Selector(sel)) => {
                        sel.validate()
                            .map_err(|e| err(format!("{wat}.selector"), e.to_string()))?;
                    }
                    Some(WaveTarget::Group(g)) => {
                        validate_name(&g).map_err(|e| err(&wat, e.to_string()))?;
                        if let Some(gs) = &group_names {
                            if !gs.contains(&g) {
                                return Err(err(
                                    &wat,
                                    format!("unknown group {g} (not in groups: {gs:?})"),
                                ));
                            }
                        }
                    }
                    Some(WaveTarget::Percent(p)) if p == 0 || p > 100 => {
                        return Err(err(&wat, "percent must be 1..100"))
                    }
                    Some(WaveTarget::Stores(s)) => {
                        for x in &s {
                            validate_name(x).map_err(|e| err(&wat, e.to_string()))?;
                        }
                    }
                    _ => {}
                }
                if w.converged_pct() > 100 {
                    return Err(err(&wat, "converged_pct must be 0..100"));
                }
            }
            for (store, pin) in &d.stores {
                validate_name(store).map_err(|e| err(format!("{at}.stores"), e.to_string()))?;
                if !crate::rollout::is_full_sha(&pin.revision) {
                    return Err(err(
                        format!("{at}.stores.{store}.revision"),
                        "must be a full 40-hex commit id",
                    ));
                }
            }
        }
        Ok(())
    }

    /// A deployment's policy with `defaults.policy` filled in where it gives nothing.
    pub fn policy_of(&self, d: &FleetDeployment) -> Policy {
        let mut p = d.policy.clone().unwrap_or_default();
        if p.on_failure.is_none() {
            p.on_failure = self
                .defaults
                .as_ref()
                .and_then(|x| x.policy.as_ref())
                .and_then(|x| x.on_failure);
        }
        p
    }

    /// A deployment's windows, blackouts, urgency and dependencies, `defaults:` filled in.
    pub fn schedule_of(&self, d: &FleetDeployment) -> Schedule {
        let def = self.defaults.clone().unwrap_or_default();
        Schedule {
            windows: d.windows.clone().or(def.windows).unwrap_or_default(),
            blackouts: d.blackouts.clone().or(def.blackouts).unwrap_or_default(),
            urgent: d.urgent.or(def.urgent).unwrap_or(false),
            depends_on: d.depends_on.clone(),
        }
    }

    /// `depends_on`: every name a deployment of this file that is not removed, and no cycle.
    fn validate_dependencies(&self) -> Result<(), FleetFileError> {
        for (name, d) in &self.deployments {
            let at = format!("deployments.{name}.depends_on");
            if d.remove && !d.depends_on.is_empty() {
                return Err(err(at, "a removed deployment depends on nothing"));
            }
            for dep in &d.depends_on {
                match self.deployments.get(dep) {
                    None => return Err(err(&at, format!("unknown deployment {dep}"))),
                    Some(x) if x.remove => {
                        return Err(err(&at, format!("{dep} is removed (remove: true)")))
                    }
                    Some(_) if dep == name => {
                        return Err(err(&at, "a deployment cannot depend on itself"))
                    }
                    Some(_) => {}
                }
            }
        }
        // Depth-first search; a node met again while on the path closes a cycle.
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks: BTreeMap<&str, Mark> = self
            .deployments
            .keys()
            .map(|k| (k.as_str(), Mark::New))
            .collect();
        fn visit<'a>(
            f: &'a FleetFile,
            n: &'a str,
            marks: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
        ) -> Result<(), FleetFileError> {
            match marks.get(n).copied() {
                Some(Mark::Done) | None => return Ok(()),
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|p| *p == n).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[from..].to_vec();
                    cycle.push(n);
                    return Err(err(
                        format!("deployments.{n}.depends_on"),
                        format!("dependency cycle: {}", cycle.join(" -> ")),
                    ));
                }
                Some(Mark::New) => {}
            }
            marks.insert(n, Mark::OnPath);
            path.push(n);
            if let Some(d) = f.deployments.get(n) {
                for dep in &d.depends_on {
                    visit(f, dep, marks, path)?;
                }
            }
            path.pop();
            marks.insert(n, Mark::Done);
            Ok(())
        }
        for n in self.deployments.keys() {
            visit(self, n, &mut marks, &mut Vec::new())?;
        }
        Ok(())
    }

    /// The waves of a deployment (default: one wave, the fleet).
    pub fn waves_of(d: &FleetDeployment) -> Vec<Wave> {
        if d.waves.is_empty() {
            vec![Wave {
                name: "fleet".into(),
                group: None,
                percent: None,
                stores: None,
                fleet: Some(true),
                selector: None,
                converged_pct: None,
                soak_s: None,
            }]
        } else {
            d.waves.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"apiVersion":"roost.dev/v1alpha1","kind":"Fleet","groups":["canary"],
      "deployments":{"web":{"source":{"url":"git://h/a.git","ref":"main","path":"apps/web"},
        "waves":[{"name":"canary","group":"canary"},{"name":"half","percent":50},{"name":"all","fleet":true}]},
        "old":{"remove":true}}}"#;

    fn file(patch: impl FnOnce(&mut serde_json::Value)) -> Result<(), FleetFileError> {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).expect("json");
        patch(&mut v);
        let f: FleetFile = serde_json::from_value(v).map_err(|e| err("", e.to_string()))?;
        f.validate()
    }

    #[test]
    fn rules() {
        assert_eq!(file(|_| {}), Ok(()));
        let both = file(|v| v["deployments"]["web"]["source"]["revision"] = "a".repeat(40).into());
        assert!(both.expect_err("both").message.contains("not both"));
        let unknown = file(|v| v["deployments"]["web"]["waves"][0]["group"] = "cnary".into());
        assert!(unknown
            .expect_err("group")
            .message
            .contains("unknown group cnary"));
        let two = file(|v| v["deployments"]["web"]["waves"][1]["fleet"] = true.into());
        assert!(two.expect_err("two").message.contains("exactly one"));
        let short = file(|v| {
            v["deployments"]["web"]["stores"] = serde_json::json!({"s1": {"revision": "abc"}})
        });
        assert!(short.is_err());
        let escape = file(|v| v["deployments"]["web"]["source"]["path"] = "../x".into());
        assert!(escape.is_err());
        let dup = file(|v| v["deployments"]["web"]["waves"][1]["name"] = "canary".into());
        assert!(dup.expect_err("dup").message.contains("duplicate"));
    }

    #[test]
    fn windows_defaults_and_dependencies() {
        let ok = file(|v| {
            v["defaults"] = serde_json::json!({
                "windows": [{"days": ["mon", "tue"], "start": "02:00", "duration": "3h"}],
                "blackouts": [{"from": "2026-12-24", "to": "2026-12-26"}],
                "policy": {"on_failure": "rollback"}});
            v["deployments"]["crds"] = serde_json::json!({
                "source": {"url": "git://h/a.git", "ref": "main", "path": "crds"}, "urgent": true});
            v["deployments"]["web"]["depends_on"] = serde_json::json!(["crds"]);
        });
        assert_eq!(ok, Ok(()));
        let cases: Vec<(Patch, &str)> = vec![
            (
                Box::new(|v| v["deployments"]["web"]["depends_on"] = serde_json::json!(["nope"])),
                "unknown deployment nope",
            ),
            (
                Box::new(|v| v["deployments"]["web"]["depends_on"] = serde_json::json!(["old"])),
                "old is removed",
            ),
            (
                Box::new(|v| v["deployments"]["web"]["depends_on"] = serde_json::json!(["web"])),
                "itself",
            ),
            (
                Box::new(|v| {
                    v["deployments"]["a"] = serde_json::json!({
                        "source": {"url": "git://h/a.git", "ref": "main", "path": "a"},
                        "depends_on": ["b"]});
                    v["deployments"]["b"] = serde_json::json!({
                        "source": {"url": "git://h/a.git", "ref": "main", "path": "b"},
                        "depends_on": ["web"]});
                    v["deployments"]["web"]["depends_on"] = serde_json::json!(["a"]);
                }),
                "dependency cycle: a -> b -> web -> a",
            ),
            (
                Box::new(|v| {
                    v["deployments"]["web"]["windows"] =
                        serde_json::json!([{"start": "2:00", "duration": "3h"}])
                }),
                "deployments.web.windows[0].start",
            ),
            (
                Box::new(|v| {
                    v["defaults"] = serde_json::json!({"blackouts": [{"from": "2026-12-26", "to": "2026-12-24"}]})
                }),
                "defaults.blackouts[0].to",
            ),
        ];
        for (patch, want) in cases {
            let e = file(patch).expect_err(want);
            assert!(e.to_string().contains(want), "{want}: got {e}");
        }
        // Defaults fill in what a deployment leaves out; its own fields win.
        let mut v: serde_json::Value = serde_json::from_str(GOOD).expect("json");
        v["defaults"] = serde_json::json!({"windows": [{"start": "02:00", "duration": "3h"}],
            "urgent": false, "policy": {"on_failure": "rollback"}});
        v["deployments"]["web"]["urgent"] = true.into();
        let f: FleetFile = serde_json::from_value(v).expect("parse");
        let web = &f.deployments["web"];
        let s = f.schedule_of(web);
        assert_eq!(s.windows.len(), 1);
        assert!(s.urgent && !s.timed());
        assert_eq!(f.policy_of(web).on_failure(), OnFailure::Rollback);
    }

    const V12: &str = r#"{"apiVersion":"roost.dev/v1alpha1","kind":"Fleet",
      "groups":{"canary":{"stores":["store-0001"]},
                "us-south":{"selector":{"region":"us-south"}},
                "new-pos":{"selector":{"matchExpressions":[{"key":"pos","operator":"In","values":["v7","v8"]}]}}},
      "deployments":{"kds":{"source":{"url":"git://h/a.git","ref":"main","path":"apps/kds"},
        "targets":{"selector":{"format":"drive-thru"}},
        "waves":[{"name":"canary","group":"canary"},
                 {"name":"texas","selector":{"region":"us-south"},"converged_pct":100,"soak_s":600},
                 {"name":"all","fleet":true}]}}}"#;

    type Patch = Box<dyn FnOnce(&mut serde_json::Value)>;

    fn v12(patch: impl FnOnce(&mut serde_json::Value)) -> Result<FleetFile, FleetFileError> {
        let mut v: serde_json::Value = serde_json::from_str(V12).expect("json");
        patch(&mut v);
        let f: FleetFile = serde_json::from_value(v).map_err(|e| err("", e.to_string()))?;
        f.validate()?;
        Ok(f)
    }

    #[test]
    fn defined_groups_selectors_and_targets() {
        // Parsed from the text (a serde_json::Value would sort the keys and lose the order).
        let f: FleetFile = serde_json::from_str(V12).expect("json");
        f.validate().expect("valid");
        let groups = f.groups.as_ref().expect("groups");
        // Declaration order is precedence order (not alphabetical).
        assert_eq!(groups.names(), ["canary", "us-south", "new-pos"]);
        let labels: Labels = [("region", "us-south"), ("pos", "v7")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            groups.of("store-0001", &labels).expect("defined"),
            ["canary", "us-south", "new-pos"]
        );
        assert_eq!(
            groups.of("store-0002", &Labels::new()).expect("defined"),
            Vec::<String>::new()
        );
        let d = &f.deployments["kds"];
        assert!(matches!(
            d.waves[1].target(),
            Some(WaveTarget::Selector(s)) if s.matches(&labels)
        ));
        assert!(d.targets.as_ref().expect("targets").selector.matches(
            &[("format".to_owned(), "drive-thru".to_owned())]
                .into_iter()
                .collect()
        ));
        // Serialized and read back, the order holds.
        let back: FleetFile =
            serde_json::from_str(&serde_json::to_string(&f).expect("json")).expect("back");
        assert_eq!(back, f);
        assert_eq!(
            back.groups.expect("groups").names(),
            ["canary", "us-south", "new-pos"]
        );
        // The list form: names only, membership from the stores.
        let list: Groups = serde_json::from_str(r#"["canary", "all"]"#).expect("list");
        assert_eq!(list.of("store-0001", &labels), None);
    }

    #[test]
    fn v12_rules() {
        let cases: Vec<(Patch, &str)> = vec![
            (
                Box::new(|v| v["groups"]["empty"] = serde_json::json!({})),
                "give stores, a selector",
            ),
            (
                Box::new(|v| v["groups"]["bad"] = serde_json::json!({"selector": {}})),
                "empty selector",
            ),
            (
                Box::new(|v| {
                    v["deployments"]["kds"]["waves"][1]["group"] = "canary".into();
                }),
                "exactly one",
            ),
            (
                Box::new(|v| {
                    v["deployments"]["kds"]["waves"][0]["group"] = "nope".into();
                }),
                "unknown group nope",
            ),
            (
                Box::new(|v| {
                    v["deployments"]["kds"]["targets"]["selector"] =
                        serde_json::json!({"format": "drive thru"});
                }),
                "targets.selector",
            ),
            (
                Box::new(|v| {
                    v["groups"]["canary"]["stores"] = serde_json::json!(["Store 1"]);
                }),
                "groups.canary.stores",
            ),
        ];
        for (patch, want) in cases {
            let e = v12(patch).expect_err(want);
            assert!(e.to_string().contains(want), "{want}: got {e}");
        }
    }
}
