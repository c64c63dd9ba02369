//! The agent's configuration: a TOML file, loaded and validated completely before anything
//! starts, so that a bad configuration exits with one clear message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_schemas::{validate_name, Keyring};
use serde::Deserialize;

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
}

/// Credentials for HTTPS sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredential {
    /// URL prefix the credential applies to.
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

/// Git settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// Source URLs the agent may fetch from: a rollout's URL must start with one of them.
    #[serde(default)]
    pub allowed_sources: Vec<String>,
    /// HTTPS credentials.
    #[serde(default)]
    pub credentials: Vec<GitCredential>,
    /// Fetch timeout in seconds (network stalls abort the fetch).
    #[serde(default)]
    pub fetch_timeout_s: Option<u64>,
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
        }
    }
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
    /// Git.
    #[serde(default)]
    pub git: GitConfig,
    /// Target.
    #[serde(default)]
    pub target: TargetConfig,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
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
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The parsed file.
    pub file: AgentFile,
    /// Trusted keys.
    pub keyring: Keyring,
    /// Drift check interval.
    pub drift_interval: Duration,
    /// Retry backoff bounds.
    pub retry: (Duration, Duration),
}

impl AgentConfig {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: AgentFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        AgentConfig::from_file(file)
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
            keyring
                .add_base64(&k.public_key, Some(&k.id))
                .map_err(|e| invalid(format!("trusted_keys: {e}")))?;
        }
        if keyring.is_empty() {
            return Err(invalid(
                "trusted_keys: at least one key is required (the agent would accept nothing)"
                    .into(),
            ));
        }
        if file.git.allowed_sources.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(
                "git.allowed_sources: an empty prefix would allow every URL".into(),
            ));
        }
        if file.git.allowed_sources.is_empty() {
            return Err(invalid(
                "git.allowed_sources: at least one URL prefix is required".into(),
            ));
        }
        for c in &file.git.credentials {
            if c.token.is_none() && c.token_file.is_none() {
                return Err(invalid(format!(
                    "git.credentials for {}: token or token_file is required",
                    c.url_prefix
                )));
            }
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
        Ok(AgentConfig {
            keyring,
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
        // A wrong key id is caught.
        let text = with_key(GOOD).replace("id = \"", "id = \"00");
        let f: AgentFile = toml::from_str(&text).expect("parse");
        assert!(AgentConfig::from_file(f).is_err());
    }
}
