//! The rollout payload: "deployment D should be at Git revision R, path P, for this scope".

use serde::{Deserialize, Serialize};

use crate::names::validate_name;
use crate::window::{Blackout, Window};

/// Who a rollout is for. On the wire: `{"fleet": true}`, `{"group": "canary"}` or
/// `{"store": "store-0042"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every store.
    Fleet,
    /// Every store in the group.
    Group(String),
    /// One store.
    Store(String),
}

impl Scope {
    /// The compact text form used in status documents and logs: `fleet`, `group:NAME`, `store:NAME`.
    pub fn key(&self) -> String {
        match self {
            Scope::Fleet => "fleet".to_owned(),
            Scope::Group(g) => format!("group:{g}"),
            Scope::Store(s) => format!("store:{s}"),
        }
    }

    /// Parses the compact text form (`fleet`, `group:NAME`, `store:NAME`).
    pub fn from_key(key: &str) -> Option<Scope> {
        if key == "fleet" {
            return Some(Scope::Fleet);
        }
        let (kind, name) = key.split_once(':')?;
        validate_name(name).ok()?;
        match kind {
            "group" => Some(Scope::Group(name.to_owned())),
            "store" => Some(Scope::Store(name.to_owned())),
            _ => None,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fleet: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<String>,
}

impl Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = match self {
            Scope::Fleet => ScopeWire {
                fleet: Some(true),
                group: None,
                store: None,
            },
            Scope::Group(g) => ScopeWire {
                fleet: None,
                group: Some(g.clone()),
                store: None,
            },
            Scope::Store(st) => ScopeWire {
                fleet: None,
                group: None,
                store: Some(st.clone()),
            },
        };
        wire.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let w = ScopeWire::deserialize(d)?;
        match (w.fleet, w.group, w.store) {
            (Some(true), None, None) => Ok(Scope::Fleet),
            (None, Some(g), None) => Ok(Scope::Group(g)),
            (None, None, Some(s)) => Ok(Scope::Store(s)),
            _ => Err(D::Error::custom(
                "scope must be exactly one of {\"fleet\": true}, {\"group\": NAME}, {\"store\": NAME}",
            )),
        }
    }
}

/// Where the desired state lives: a Git repository, a full commit id and a directory in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Repository URL (`file://`, `git://`, `https://`).
    pub url: String,
    /// Full 40-hex commit id.
    pub revision: String,
    /// Directory inside the repository, relative, without `..` segments. Empty = root.
    #[serde(default)]
    pub path: String,
}

/// The fleet-repository commit that caused a rollout (v1.1): which file, at which commit, in
/// which repository. Agents do not act on it; they echo it as `desired.origin` in their
/// status document, so the cloud can tell which commit of the fleet file a store runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The fleet repository's URL.
    pub repo: String,
    /// Full 40-hex commit id of the fleet repository.
    pub commit: String,
    /// The fleet file inside the repository (`roost.yaml` by default).
    pub path: String,
}

impl Origin {
    /// Checks the fields' rules (URL length, commit form, a relative path that stays inside
    /// the repository). `Err` carries the field name and what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.repo.is_empty() || self.repo.len() > 2048 {
            return Err(("origin.repo", "must be 1..2048 characters".into()));
        }
        if !is_full_sha(&self.commit) {
            return Err((
                "origin.commit",
                "must be a full 40-character lowercase hex commit id".into(),
            ));
        }
        match normalize_path(&self.path) {
            Ok(p) if p.is_empty() => Err(("origin.path", "must name a file".into())),
            Ok(_) => Ok(()),
            Err(m) => Err(("origin.path", m)),
        }
    }
}

/// What the agent may do to converge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Delete objects that a previous revision applied and this one no longer has.
    #[serde(default = "default_true")]
    pub prune: bool,
    /// Correct drift automatically.
    #[serde(default = "default_true")]
    pub self_heal: bool,
    /// How long to wait for health before reporting `degraded`.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_s: u64,
    /// Replace `${roost.store}`, `${roost.labels.KEY}`, `${roost.vars.KEY}` (and
    /// `${roost.vars.KEY:=default}`) in the manifests with the store's own values (v1.2).
    /// Absent when false, so a payload without it keeps its bytes (and signatures).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub substitute: bool,
    /// What the store does when the revision fails (v1.2): `stay` (default) or `rollback` to
    /// the last revision that converged on it. Absent when `stay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
}

impl Policy {
    /// What to do when the revision fails (`stay` unless given).
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure.unwrap_or_default()
    }
}

/// `policy.on_failure` (v1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stay on the failed revision and report it (v1.1 behaviour).
    #[default]
    Stay,
    /// Re-apply the last revision that converged on this store.
    Rollback,
}

/// When and after what a store applies a rollout (v1.2): operating windows and blackouts in
/// the store's local time, `urgent` to ignore both, and the deployments that must have
/// converged on the store first. Every field is absent when empty, so a v1.1 payload keeps
/// its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Schedule {
    /// Store-local windows in which the revision may be applied; none: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// Store-local dates on which nothing is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blackouts: Vec<Blackout>,
    /// Ignore windows and blackouts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub urgent: bool,
    /// Deployments that must be Converged on the store before this one is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
}

impl Schedule {
    /// Whether the windows and blackouts apply (some are given and the rollout is not urgent).
    pub fn timed(&self) -> bool {
        let none = self.windows.is_empty() && self.blackouts.is_empty();
        !self.urgent && !none
    }
}

fn default_true() -> bool {
    true
}

fn default_health_timeout() -> u64 {
    300
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            prune: true,
            self_heal: true,
            health_timeout_s: default_health_timeout(),
            substitute: false,
            on_failure: None,
        }
    }
}

/// The signed rollout payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Deployment name.
    pub deployment: String,
    /// Who the rollout is for; must match the topic that carried it.
    pub scope: Scope,
    /// Strictly increasing per (scope, deployment).
    pub sequence: u64,
    /// When the rollout was signed (RFC 3339).
    pub issued_at: String,
    /// The desired revision. Required unless `remove` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// Fetch now, activate no earlier than this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Convergence policy.
    #[serde(default)]
    pub policy: Policy,
    /// A tombstone: this scope no longer wants the deployment.
    #[serde(default)]
    pub remove: bool,
    /// The fleet-repository commit that caused this rollout (v1.1, optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// Windows, blackouts, urgency and dependencies (v1.2; every field optional).
    #[serde(flatten)]
    pub schedule: Schedule,
}

/// Why a rollout payload is not valid (beyond JSON shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// JSON did not parse into the type.
    #[error("payload does not match the rollout schema: {0}")]
    Shape(String),
    /// A field has an invalid value.
    #[error("{field}: {message}")]
    Field {
        /// JSON path of the field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl Rollout {
    /// Parses and validates a payload.
    pub fn from_json(bytes: &[u8]) -> Result<Rollout, RolloutError> {
        let r: Rollout =
            serde_json::from_slice(bytes).map_err(|e| RolloutError::Shape(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// Checks every field's rules (names, revision form, path safety, timestamps).
    pub fn validate(&self) -> Result<(), RolloutError> {
        let field = |field: &'static str, message: String| RolloutError::Field { field, message };
        validate_name(&self.deployment).map_err(|e| field("deployment", e.to_string()))?;
        match &self.scope {
            Scope::Fleet => {}
            Scope::Group(n) | Scope::Store(n) => {
                validate_name(n).map_err(|e| field("scope", e.to_string()))?
            }
        }
        if self.sequence == 0 {
            return Err(field("sequence", "must be at least 1".into()));
        }
        if crate::parse_rfc3339(&self.issued_at).is_none() {
            return Err(field("issued_at", "not an RFC 3339 timestamp".into()));
        }
        if let Some(nb) = &self.not_before {
            if crate::parse_rfc3339(nb).is_none() {
                return Err(field("not_before", "not an RFC 3339 timestamp".into()));
            }
        }
        if self.policy.health_timeout_s == 0 || self.policy.health_timeout_s > 86_400 {
            return Err(field(
                "policy.health_timeout_s",
                "must be between 1 and 86400".into(),
            ));
        }
        match (&self.source, self.remove) {
            (None, false) => {
                return Err(field("source", "required unless remove is true".into()));
            }
            (Some(src), _) => {
                if src.url.is_empty() || src.url.len() > 2048 {
                    return Err(field("source.url", "must be 1..2048 characters".into()));
                }
                if !is_full_sha(&src.revision) {
                    return Err(field(
                        "source.revision",
                        "must be a full 40-character lowercase hex commit id".into(),
                    ));
                }
                normalize_path(&src.path).map_err(|m| field("source.path", m))?;
            }
            (None, true) => {}
        }
        if let Some(origin) = &self.origin {
            origin.validate().map_err(|(f, m)| field(f, m))?;
        }
        crate::window::validate(&self.schedule.windows, &self.schedule.blackouts).map_err(
            |(at, m)| {
                let f = if at.starts_with("windows") {
                    "windows"
                } else {
                    "blackouts"
                };
                field(f, format!("{at}: {m}"))
            },
        )?;
        if self.schedule.depends_on.len() > 64 {
            return Err(field("depends_on", "at most 64 deployments".into()));
        }
        for d in &self.schedule.depends_on {
            validate_name(d).map_err(|e| field("depends_on", e.to_string()))?;
            if *d == self.deployment {
                return Err(field(
                    "depends_on",
                    "a deployment cannot depend on itself".into(),
                ));
            }
        }
        Ok(())
    }
}

/// True when `s` is a full, lowercase 40-hex commit id.
pub fn is_full_sha(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Normalizes a repository-relative path: strips `./` and trailing `/`; rejects absolute paths,
/// `..` segments and backslashes, which could escape the repository.
pub fn normalize_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') {
        return Err("must be relative to the repository root".into());
    }
    if path.contains('\\') || path.contains('\0') {
        return Err("must not contain backslashes or NUL".into());
    }
    let mut parts = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => continue,
            ".." => return Err("escapes the repository (contains '..')".into()),
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rollout {
        Rollout {
            schedule: Default::default(),
            deployment: "kitchen-display".into(),
            scope: Scope::Group("canary".into()),
            sequence: 17,
            issued_at: "2026-11-26T10:00:00Z".into(),
            source: Some(Source {
                url: "git://git.example/fleet.git".into(),
                revision: "0123456789abcdef0123456789abcdef01234567".into(),
                path: "apps/kitchen-display".into(),
            }),
            not_before: None,
            policy: Policy::default(),
            remove: false,
            origin: None,
        }
    }

    #[test]
    fn scope_wire_forms() {
        let cases = [
            (Scope::Fleet, r#"{"fleet":true}"#),
            (Scope::Group("canary".into()), r#"{"group":"canary"}"#),
            (
                Scope::Store("store-0042".into()),
                r#"{"store":"store-0042"}"#,
            ),
        ];
        for (scope, json) in cases {
            assert_eq!(serde_json::to_string(&scope).expect("ser"), json);
            assert_eq!(serde_json::from_str::<Scope>(json).expect("de"), scope);
            assert_eq!(Scope::from_key(&scope.key()), Some(scope));
        }
        for bad in [
            r#"{"fleet":false}"#,
            r#"{}"#,
            r#"{"group":"a","store":"b"}"#,
            r#"{"region":"x"}"#,
        ] {
            assert!(serde_json::from_str::<Scope>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn substitute_is_absent_unless_true() {
        // A payload from before `policy.substitute` existed serializes to the same bytes
        // (its signatures stay valid), and `true` travels.
        let json = serde_json::to_string(&sample()).expect("ser");
        assert!(!json.contains("substitute"), "{json}");
        let mut r = sample();
        r.policy.substitute = true;
        let json = serde_json::to_string(&r).expect("ser");
        assert!(json.contains(r#""substitute":true"#), "{json}");
        let back: Rollout = serde_json::from_str(&json).expect("de");
        assert!(back.policy.substitute);
    }

    #[test]
    fn validation() {
        assert!(sample().validate().is_ok());
        let mut r = sample();
        r.source.as_mut().expect("source").path = "../etc".into();
        assert!(matches!(
            r.validate(),
            Err(RolloutError::Field {
                field: "source.path",
                ..
            })
        ));
        let mut r = sample();
        r.source.as_mut().expect("source").revision = "main".into();
        assert!(r.validate().is_err());
        let mut r = sample();
        r.source = None;
        assert!(r.validate().is_err());
        r.remove = true;
        assert!(r.validate().is_ok());
        let mut r = sample();
        r.sequence = 0;
        assert!(r.validate().is_err());
        let mut r = sample();
        r.origin = Some(Origin {
            repo: "https://git.example/fleet-config.git".into(),
            commit: "fedcba9876543210fedcba9876543210fedcba98".into(),
            path: "roost.yaml".into(),
        });
        assert!(r.validate().is_ok());
        for (commit, path, bad) in [
            (
                "FEDCBA9876543210FEDCBA9876543210FEDCBA98",
                "roost.yaml",
                "origin.commit",
            ),
            ("fedcba98", "roost.yaml", "origin.commit"),
            (
                "fedcba9876543210fedcba9876543210fedcba98",
                "../roost.yaml",
                "origin.path",
            ),
            (
                "fedcba9876543210fedcba9876543210fedcba98",
                "",
                "origin.path",
            ),
        ] {
            let o = r.origin.as_mut().expect("origin");
            o.commit = commit.into();
            o.path = path.into();
            assert!(
                matches!(r.validate(), Err(RolloutError::Field { field, .. }) if field == bad),
                "{commit} {path}"
            );
        }
    }

    #[test]
    fn paths() {
        assert_eq!(normalize_path("./apps//x/").as_deref(), Ok("apps/x"));
        assert_eq!(normalize_path("").as_deref(), Ok(""));
        assert!(normalize_path("/abs").is_err());
        assert!(normalize_path("apps/../../x").is_err());
        assert!(normalize_path("a\\b").is_err());
    }
}
