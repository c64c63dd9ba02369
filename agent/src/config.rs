//! The agent's configuration: a TOML file, loaded and validated completely before anything
//! starts, so that a bad configuration exits with one clear message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_schemas::{validate_name, Keyring};
use serde::Deserialize;

use crate::decide::SourceUrl;

/// A TOML error as `line L, column C: message`, without the snippet of the offending line
/// that `toml` prints (it could show a token from `[[git.credentials]]`).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            format!("line {line}, column {col}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// Why a configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The edge broker connection (`[broker]`).
pub type BrokerConfig = roost_runtime::Endpoint;

/// A trusted rollout signing key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// Key id (checked against the key).
    pub id: String,
    /// Base64 of the raw 32-byte Ed25519 public key.
    pub public_key: String,
    /// Signatures by this key count up to this time (RFC 3339), not after it: the gentle way
    /// to retire a key during a rotation. Default: no end.
    #[serde(default)]
    pub not_after: Option<String>,
}

/// How many distinct trusted keys must sign a rollout, per scope kind (`[thresholds]`).
/// Unset kinds need one signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Fleet-scope rollouts.
    #[serde(default)]
    pub fleet: Option<usize>,
    /// Group-scope rollouts.
    #[serde(default)]
    pub group: Option<usize>,
    /// Store-scope rollouts.
    #[serde(default)]
    pub store: Option<usize>,
    /// Signed fleet snapshots (`roost/v1/fleet/snapshot`). Its own kind, default 1: the
    /// controller signs snapshots unattended every few minutes, and a snapshot can only make
    /// the agent report staleness, never apply or remove anything, so it needs no
    /// two-person rule even where fleet rollouts have one.
    #[serde(default)]
    pub snapshot: Option<usize>,
}

impl Thresholds {
    /// Signatures needed for a rollout of `scope`.
    pub fn for_scope(&self, scope: &roost_schemas::Scope) -> usize {
        let t = match scope {
            roost_schemas::Scope::Fleet => self.fleet,
            roost_schemas::Scope::Group(_) => self.group,
            roost_schemas::Scope::Store(_) => self.store,
        };
        t.unwrap_or(1).max(1)
    }

    /// Signatures needed for a fleet snapshot.
    pub fn for_snapshot(&self) -> usize {
        self.snapshot.unwrap_or(1).max(1)
    }

    /// Signatures needed for a store profile: the store kind's (a profile is store-scoped;
    /// it decides which group rollouts the store follows, never their content).
    pub fn for_profile(&self) -> usize {
        self.for_scope(&roost_schemas::Scope::Store(String::new()))
    }
}

/// Credentials for HTTPS sources. `Debug` never shows the token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredential {
    /// The https URL (scheme, host, port and leading path segments, matched like
    /// `git.allowed_sources`) the credential is sent to.
    pub url_prefix: String,
    /// Username (default `x-access-token`).
    #[serde(default)]
    pub username: Option<String>,
    /// Token, or…
    #[serde(default)]
    pub token: Option<String>,
    /// …a file holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for GitCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredential")
            .field("url_prefix", &self.url_prefix)
            .field("username", &self.username)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// Git settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// Source URLs the agent may fetch from, each `scheme://host[:port]/path`: a rollout's
    /// URL must have the same scheme (https, git or file), host and port, and
    /// start with the entry's whole path segments.
    #[serde(default)]
    pub allowed_sources: Vec<String>,
    /// HTTPS credentials.
    #[serde(default)]
    pub credentials: Vec<GitCredential>,
    /// Fetch timeout in seconds (network stalls abort the fetch).
    #[serde(default)]
    pub fetch_timeout_s: Option<u64>,
    /// PEM file with the CA certificate(s) that sign the https Git servers' certificates (a
    /// private CA). When set it is the only trust for https sources (the system store is not
    /// consulted); read again on every fetch.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Files target settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Where deployments are written; default `STATE/targets`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// A command run after each switch (argv). Gets `ROOST_DEPLOYMENT`, `ROOST_REVISION`,
    /// `ROOST_DIR` in its environment; a non-zero exit makes the deployment `Degraded`.
    #[serde(default)]
    pub hook: Option<Vec<String>>,
}

/// Kubernetes target settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Namespace for namespaced objects without one.
    #[serde(default)]
    pub default_namespace: Option<String>,
    /// Namespaces objects may be in (empty = any).
    #[serde(default)]
    pub allowed_namespaces: Vec<String>,
    /// Kinds allowed (`Kind` or `group/Kind`; empty = any).
    #[serde(default)]
    pub allowed_kinds: Vec<String>,
    /// Kinds denied.
    #[serde(default)]
    pub denied_kinds: Vec<String>,
    /// Whether cluster-scoped objects are allowed.
    #[serde(default)]
    pub allow_cluster_scoped: Option<bool>,
    /// Force ownership on field-manager conflicts (default true, as Flux does).
    #[serde(default)]
    pub force_conflicts: Option<bool>,
    /// Prefix for namespaces (so several stores can share one cluster in demos).
    #[serde(default)]
    pub namespace_prefix: Option<String>,
    /// A kubeconfig file; default: in-cluster credentials, else `KUBECONFIG` / `~/.kube/config`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

impl KubernetesConfig {
    /// A namespace name as the agent writes it: with `namespace_prefix` in front unless it
    /// already starts with it.
    pub fn prefixed(&self, ns: &str) -> String {
        match &self.namespace_prefix {
            Some(p) if !ns.starts_with(p.as_str()) => format!("{p}{ns}"),
            _ => ns.to_owned(),
        }
    }

    /// The namespaces objects may be in, as the agent names them (prefixed); `None` when the
    /// policy does not limit them (`allowed_namespaces` empty).
    pub fn effective_namespaces(&self) -> Option<std::collections::BTreeSet<String>> {
        (!self.allowed_namespaces.is_empty()).then(|| {
            self.allowed_namespaces
                .iter()
                .map(|n| self.prefixed(n))
                .collect()
        })
    }

    /// Whether cluster-scoped objects may be applied (default true).
    pub fn cluster_scoped_allowed(&self) -> bool {
        self.allow_cluster_scoped.unwrap_or(true)
    }

    /// Why `group`/`kind` is not allowed by `allowed_kinds`/`denied_kinds` (each entry
    /// `Kind` or `group/Kind`), or `None` when it is.
    pub fn kind_denied(&self, group: &str, kind: &str) -> Option<String> {
        let names = [kind.to_owned(), format!("{group}/{kind}")];
        if self.denied_kinds.iter().any(|k| names.contains(k)) {
            return Some(format!("kind {kind} is denied"));
        }
        if !self.allowed_kinds.is_empty() && !self.allowed_kinds.iter().any(|k| names.contains(k)) {
            return Some(format!("kind {kind} is not in the allowed kinds"));
        }
        None
    }
}

/// Which target to apply to.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetConfig {
    /// A directory per deployment.
    Files(FilesConfig),
    /// The store's Kubernetes cluster.
    Kubernetes(KubernetesConfig),
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig::Files(FilesConfig::default())
    }
}

/// Limits that protect the agent from hostile or broken input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted MQTT message (bytes).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Largest rendered revision (bytes of all manifest files).
    #[serde(default = "default_max_render")]
    pub max_render_bytes: u64,
    /// Most files / objects in one revision.
    #[serde(default = "default_max_objects")]
    pub max_objects: usize,
    /// Largest single file of a revision (bytes; default 4 MiB). Checked before the file is
    /// read from the Git object database.
    #[serde(default = "default_max_file")]
    pub max_file_bytes: u64,
}

fn default_max_file() -> u64 {
    4 * 1024 * 1024
}

fn default_max_message() -> usize {
    256 * 1024
}
fn default_max_render() -> u64 {
    16 * 1024 * 1024
}
fn default_max_objects() -> usize {
    2000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: default_max_message(),
            max_render_bytes: default_max_render(),
            max_objects: default_max_objects(),
            max_file_bytes: default_max_file(),
        }
    }
}

/// Sealed secrets (`[secrets]`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// The store's age identity (an `age-keygen` file, mode 0600 or stricter; the agent
    /// refuses to start when group or others can read it). Default `STATE/age-identity.txt`,
    /// used when it exists. Enrollment writes it; the agent never creates one.
    #[serde(default)]
    pub identity_file: Option<PathBuf>,
}

/// The agent configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Store name.
    pub store: String,
    /// Groups in precedence order.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Topic prefix.
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// State directory (SQLite files, Git cache, files target).
    pub state_dir: PathBuf,
    /// Edge broker.
    pub broker: BrokerConfig,
    /// Trusted signing keys.
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKey>,
    /// Key ids whose signatures never count again (a compromised or retired key), whether
    /// or not they are still listed in `trusted_keys`.
    #[serde(default)]
    pub revoked_keys: Vec<String>,
    /// Signatures from distinct trusted keys needed per scope kind (default 1 each).
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Git.
    #[serde(default)]
    pub git: GitConfig,
    /// Target.
    #[serde(default)]
    pub target: TargetConfig,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Sealed secrets: the store's age identity.
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// Periodic drift check interval in seconds (default 300; files target 30).
    #[serde(default)]
    pub drift_interval_s: Option<u64>,
    /// Outbox disk cap in MiB (default 256).
    #[serde(default)]
    pub outbox_max_mib: Option<u64>,
    /// Keep events until the store's bridge confirms it stored them (default true). Turn off
    /// only for an agent that publishes to a broker without a roost bridge.
    #[serde(default)]
    pub confirm_via_bridge: Option<bool>,
    /// Retry backoff for failed fetches/applies: initial and max milliseconds.
    #[serde(default)]
    pub retry_ms: Option<(u64, u64)>,
    /// The status document is republished at least this often, changes or not (default
    /// 60 s): the fleet's readers show a store silent for much longer as stale.
    #[serde(default)]
    pub status_heartbeat_s: Option<u64>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (`roost agent --metrics-listen`).
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl AgentFile {
    /// The status heartbeat interval.
    pub fn status_heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.status_heartbeat_s.unwrap_or(60).max(1))
    }
}

impl AgentFile {
    /// Reads and parses a TOML file without validating it (`roost agent rbac` needs only the
    /// `[target]` policy of a file whose keys may still be placeholders).
    pub fn read(path: &Path) -> Result<AgentFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(&text, &e),
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The parsed file.
    pub file: AgentFile,
    /// Trusted keys (with their expiry times and the revocation list).
    pub keyring: Keyring,
    /// `git.allowed_sources`, parsed.
    pub allowed_sources: Vec<SourceUrl>,
    /// Drift check interval.
    pub drift_interval: Duration,
    /// Retry backoff bounds.
    pub retry: (Duration, Duration),
}

impl AgentConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_file(AgentFile::read(path)?)
    }

    /// Validates a parsed file.
    pub fn from_file(file: AgentFile) -> Result<AgentConfig, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        validate_name(&file.store).map_err(|e| invalid(format!("store: {e}")))?;
        for g in &file.groups {
            validate_name(g).map_err(|e| invalid(format!("groups: {e}")))?;
        }
        let mut keyring = Keyring::new();
        for k in &file.trusted_keys {
            if file.trusted_keys.iter().filter(|o| o.id == k.id).count() > 1 {
                return Err(invalid(format!(
                    "trusted_keys: key {} is listed twice",
                    k.id
                )));
            }
            keyring
                .add_base64(&k.public_key, Some(&k.id))
                .map_err(|e| invalid(format!("trusted_keys: {e}")))?;
            if let Some(na) = &k.not_after {
                let t = roost_schemas::parse_rfc3339(na).ok_or_else(|| {
                    invalid(format!(
                        "trusted_keys: not_after of {} is not an RFC 3339 time: {na:?}",
                        k.id
                    ))
                })?;
                keyring.set_not_after(&k.id, t);
            }
        }
        for id in &file.revoked_keys {
            if id.len() != 16 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(invalid(format!(
                    "revoked_keys: {id:?} is not a key id (16 lowercase hex characters)"
                )));
            }
            keyring.revoke(id);
        }
        if keyring.unrevoked() == 0 {
            return Err(invalid(
                "trusted_keys: at least one key that is not revoked is required (the agent would accept nothing)"
                    .into(),
            ));
        }
        for (kind, t) in [
            ("fleet", file.thresholds.fleet),
            ("group", file.thresholds.group),
            ("store", file.thresholds.store),
            ("snapshot", file.thresholds.snapshot),
        ] {
            if let Some(t) = t {
                if t == 0 || t > keyring.unrevoked() {
                    return Err(invalid(format!(
                        "thresholds.{kind}: must be between 1 and the number of trusted keys that are not revoked ({})",
                        keyring.unrevoked()
                    )));
                }
            }
        }
        if file.git.allowed_sources.is_empty() {
            return Err(invalid(
                "git.allowed_sources: at least one source URL is required".into(),
            ));
        }
        let mut allowed_sources = Vec::new();
        for a in &file.git.allowed_sources {
            allowed_sources.push(
                SourceUrl::parse(a.trim())
                    .map_err(|e| invalid(format!("git.allowed_sources: {e}")))?,
            );
        }
        for c in &file.git.credentials {
            if c.token.is_none() && c.token_file.is_none() {
                return Err(invalid(format!(
                    "git.credentials for {}: token or token_file is required",
                    crate::decide::redact_url(&c.url_prefix)
                )));
            }
            match SourceUrl::parse(&c.url_prefix) {
                Ok(u) if u.scheme == "https" => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "git.credentials: url_prefix {} must be an https:// URL (tokens are only sent over TLS)",
                        crate::decide::redact_url(&c.url_prefix)
                    )))
                }
                Err(e) => return Err(invalid(format!("git.credentials: url_prefix: {e}"))),
            }
        }
        if let Some(p) = &file.git.ca_file {
            roost_runtime::security::read_certs("git.ca_file", p)
                .map_err(|e| invalid(e.to_string()))?;
        }
        // The port, credentials and TLS files (readable, PEM), naming the field.
        file.broker
            .validate("broker")
            .map_err(|e| invalid(e.to_string()))?;
        if file.limits.max_message_bytes < 1024 {
            return Err(invalid("limits.max_message_bytes: at least 1024".into()));
        }
        if let TargetConfig::Files(f) = &file.target {
            if let Some(h) = &f.hook {
                if h.is_empty() {
                    return Err(invalid("target.hook: must name a program".into()));
                }
            }
        }
        let default_drift = match file.target {
            TargetConfig::Files(_) => 30,
            TargetConfig::Kubernetes(_) => 300,
        };
        let drift = file.drift_interval_s.unwrap_or(default_drift);
        if drift == 0 {
            return Err(invalid("drift_interval_s: must be at least 1".into()));
        }
        let (ri, rm) = file.retry_ms.unwrap_or((1000, 60_000));
        if ri == 0 || rm < ri {
            return Err(invalid("retry_ms: (initial > 0, max >= initial)".into()));
        }
        if file.limits.max_file_bytes == 0 {
            return Err(invalid("limits.max_file_bytes: at least 1".into()));
        }
        Ok(AgentConfig {
            keyring,
            allowed_sources,
            drift_interval: Duration::from_secs(drift),
            retry: (Duration::from_millis(ri), Duration::from_millis(rm)),
            file,
        })
    }

    /// The topic helper.
    pub fn topics(&self) -> roost_schemas::Topics {
        roost_schemas::Topics::new(
            self.file
                .topic_prefix
                .as_deref()
                .unwrap_or(roost_schemas::topics::DEFAULT_PREFIX),
        )
    }

    /// Where the files target writes.
    pub fn files_root(&self) -> PathBuf {
        match &self.file.target {
            TargetConfig::Files(FilesConfig { root: Some(r), .. }) => r.clone(),
            _ => self.file.state_dir.join("targets"),
        }
    }

    /// The CloudEvents source of this agent.
    pub fn event_source(&self) -> String {
        format!("roost://stores/{}/agent", self.file.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
store = "store-0001"
groups = ["canary", "all"]
state_dir = "/tmp/x"
[broker]
port = 1883
[[trusted_keys]]
id = "KEYID"
public_key = "PUB"
[git]
allowed_sources = ["git://127.0.0.1"]
[target]
kind = "files"
"#;

    fn with_key(text: &str) -> String {
        let k = roost_schemas::SigningKey::from_seed(&[1; 32]).expect("key");
        use base64::Engine as _;
        let pk = base64::engine::general_purpose::STANDARD.encode(k.public_key());
        text.replace("KEYID", &k.key_id()).replace("PUB", &pk)
    }

    #[test]
    fn good_config_loads() {
        let f: AgentFile = toml::from_str(&with_key(GOOD)).expect("parse");
        let c = AgentConfig::from_file(f).expect("valid");
        assert_eq!(c.keyring.len(), 1);
        assert_eq!(c.drift_interval, Duration::from_secs(30));
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        let cases = [
            (GOOD.replace("store-0001", "Store_1"), "store"),
            (GOOD.replace("\"canary\"", "\"Canary\""), "groups"),
            (GOOD.replace("git://127.0.0.1", ""), "allowed_sources"),
            (GOOD.replace("port = 1883", "port = 0"), "broker.port"),
        ];
        for (text, field) in cases {
            let text = with_key(&text);
            let err = match toml::from_str::<AgentFile>(&text) {
                Ok(f) => AgentConfig::from_file(f).expect_err(field).to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(field), "{field}: {err}");
        }
        // Keys: expiry, revocation, thresholds.
        let rotation = |extra: &str| {
            let text = with_key(GOOD).replace(
                "state_dir = \"/tmp/x\"",
                &format!("state_dir = \"/tmp/x\"\n{extra}"),
            );
            toml::from_str::<AgentFile>(&text)
                .map_err(|e| e.to_string())
                .and_then(|f| AgentConfig::from_file(f).map_err(|e| e.to_string()))
        };
        let kid = roost_schemas::SigningKey::from_seed(&[1; 32])
            .expect("key")
            .key_id();
        assert!(rotation(&format!("revoked_keys = [\"{}\"]", "ab".repeat(8))).is_ok());
        let err = rotation(&format!("revoked_keys = [\"{kid}\"]")).expect_err("none left");
        assert!(err.contains("not revoked"), "{err}");
        let err = rotation("revoked_keys = [\"KEY\"]").expect_err("bad id");
        assert!(err.contains("revoked_keys"), "{err}");
        let err = rotation("thresholds = { fleet = 2 }").expect_err("one key only");
        assert!(err.contains("thresholds.fleet"), "{err}");
        let err = rotation("thresholds = { fleet = 0 }").expect_err("zero");
        assert!(err.contains("thresholds.fleet"), "{err}");
        let c = rotation("thresholds = { fleet = 1 }").expect("ok");
        assert_eq!(c.file.thresholds.for_scope(&roost_schemas::Scope::Fleet), 1);
        let expiring = with_key(GOOD).replace(
            "public_key = \"",
            "not_after = \"2026-11-27T03:00:00Z\"\npublic_key = \"",
        );
        let f: AgentFile = toml::from_str(&expiring).expect("parse");
        assert!(AgentConfig::from_file(f).is_ok());
        let bad_time = expiring.replace("2026-11-27T03:00:00Z", "tomorrow");
        let f: AgentFile = toml::from_str(&bad_time).expect("parse");
        let err = AgentConfig::from_file(f).expect_err("bad time").to_string();
        assert!(err.contains("not_after"), "{err}");
        // Allow-list entries and credentials are parsed URLs.
        for (bad, field) in [
            ("\"ext::sh\"", "git.allowed_sources"),
            ("\"http://git.example/\"", "git.allowed_sources"),
            ("\"https://u:p@git.example/\"", "git.allowed_sources"),
        ] {
            let text = with_key(GOOD).replace("[\"git://127.0.0.1\"]", &format!("[{bad}]"));
            let f: AgentFile = toml::from_str(&text).expect("parse");
            let err = AgentConfig::from_file(f).expect_err(bad).to_string();
            assert!(err.contains(field), "{err}");
            assert!(!err.contains(":p@"), "no password in messages: {err}");
        }
        let creds = with_key(GOOD).replace(
            "[target]",
            "[[git.credentials]]\nurl_prefix = \"git://127.0.0.1/\"\ntoken = \"s3cret\"\n[target]",
        );
        let f: AgentFile = toml::from_str(&creds).expect("parse");
        let err = AgentConfig::from_file(f)
            .expect_err("not https")
            .to_string();
        assert!(err.contains("https"), "{err}");
        let ok = creds.replace("git://127.0.0.1/", "https://git.example/");
        let f: AgentFile = toml::from_str(&ok).expect("parse");
        let c = AgentConfig::from_file(f).expect("https credential");
        assert!(!format!("{c:?}").contains("s3cret"), "Debug hides tokens");
        // A TOML error names line and column but never shows the line itself.
        let broken = ok.replace("token = \"s3cret\"", "token = s3cret");
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, broken).expect("write");
        let err = AgentConfig::load(&p).expect_err("broken").to_string();
        assert!(err.contains("line "), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        // git.ca_file must be a readable PEM file.
        let mut f: AgentFile = toml::from_str(&with_key(GOOD)).expect("parse");
        f.git.ca_file = Some("/nonexistent/git-ca.pem".into());
        let err = AgentConfig::from_file(f)
            .expect_err("no CA file")
            .to_string();
        assert!(
            err.contains("git.ca_file: /nonexistent/git-ca.pem"),
            "{err}"
        );
        // A wrong key id is caught.
        let text = with_key(GOOD).replace("id = \"", "id = \"00");
        let f: AgentFile = toml::from_str(&text).expect("parse");
        assert!(AgentConfig::from_file(f).is_err());
    }
}
