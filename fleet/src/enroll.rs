//! `roost store enroll` and `roost store retire`. Enrollment writes the store's inventory entry
//! into the fleet repository (a commit, or a branch for a pull request), issues its client
//! certificate (CN = the store), makes its age identity, and writes a bundle from which the
//! store's bridge and agent start unedited. Retirement removes the entry; the tombstoning of
//! the store's retained desired state is [`tombstone_store`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use roost_runtime::sealed::{Identity, SealedError};
use roost_schemas::fleet::API_VERSION;
use roost_schemas::inventory::{StoreEntry, KIND};
use roost_schemas::selector::Labels;

use crate::fleet_repo::{self as inventory, FleetRepo, RepoError};
use crate::git::{ChangeError, Changeable, CommitTo, Committed, Edit};
use crate::inventory::DIR as STORES_DIR;
use crate::pki::{self, Ca, PkiError, Usage};

/// The bundle's agent configuration.
pub const AGENT_TOML: &str = "agent.toml";
/// The bundle's bridge configuration.
pub const BRIDGE_TOML: &str = "bridge.toml";
/// The store's age identity, relative to the bundle: in the agent's state directory, where
/// the agent looks for it by default (`STATE/age-identity.txt`).
pub const IDENTITY: &str = "state/agent/age-identity.txt";
/// The store's age recipient (public), relative to the bundle.
pub const RECIPIENT: &str = "age-recipient.txt";

/// Enrollment or retirement failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The store is already in the inventory.
    #[error("{store} is already enrolled ({file})")]
    Exists {
        /// The store.
        store: String,
        /// Its inventory file.
        file: String,
    },
    /// The store is not in the inventory.
    #[error("{0} is not in the inventory (stores/*.yaml)")]
    NotEnrolled(String),
    /// The inventory in the fleet repository.
    #[error("inventory")]
    Inventory(#[from] RepoError),
    /// The fleet repository.
    #[error("fleet repository")]
    Git(#[from] ChangeError),
    /// The CA or the store's certificate.
    #[error("certificate")]
    Pki(#[from] PkiError),
    /// The store's age identity.
    #[error("age identity")]
    Sealed(#[from] SealedError),
    /// The cloud broker.
    #[error("cloud broker")]
    Cloud(#[from] crate::cloud::CloudError),
    /// The fleet record.
    #[error("fleet database")]
    Db(#[from] crate::db::DbError),
    /// Writing the bundle.
    #[error("{}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The target the bundle's agent applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleTarget {
    /// A directory per deployment (sites without Kubernetes).
    Files,
    /// The store's cluster, limited to these namespaces (none: not limited).
    Kubernetes {
        /// `allowed_namespaces`.
        namespaces: Vec<String>,
    },
}

/// Where the fleet repository change goes.
#[derive(Debug, Clone)]
pub struct RepoChange {
    /// The fleet repository (a local checkout, or a URL that accepts a push).
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// Commit onto the branch instead of a new branch.
    pub direct: bool,
}

/// What to enroll.
#[derive(Debug, Clone)]
pub struct EnrollSpec {
    /// The store's name (its MQTT identity).
    pub store: String,
    /// Labels.
    pub labels: Labels,
    /// IANA time zone.
    pub timezone: Option<String>,
    /// Vars.
    pub vars: BTreeMap<String, String>,
    /// The fleet repository change.
    pub change: RepoChange,
    /// The CA directory (`roost ca init --dir`).
    pub ca_dir: PathBuf,
    /// The bundle directory to write (absent or empty).
    pub out: PathBuf,
    /// Where the bundle will be on the store: the configurations' paths point there (default:
    /// `out`, absolute).
    pub install_dir: Option<PathBuf>,
    /// The cloud broker, `mqtts://HOST:PORT` (HOST as in its certificate).
    pub cloud: String,
    /// The CA that signed the cloud broker's certificate (default: the fleet CA).
    pub cloud_ca: Option<PathBuf>,
    /// The store's edge broker, `HOST:PORT`.
    pub edge: String,
    /// Public keys the agent trusts (`KEYID.pub` of `roost keygen`).
    pub trusted_keys: Vec<PathBuf>,
    /// Git source prefixes the agent may fetch (default: the deployments' source URLs in
    /// `roost.yaml`).
    pub git_allow: Vec<String>,
    /// The groups the bridge and agent start with (default: the groups `roost.yaml` defines
    /// that the store is a member of); the store profile replaces them once it arrives.
    pub groups: Option<Vec<String>>,
    /// The agent's target.
    pub target: BundleTarget,
    /// Days the client certificate is valid.
    pub days: u32,
}

/// What enrollment did.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The store's age recipient.
    pub recipient: String,
    /// The inventory commit.
    pub committed: Committed,
    /// The groups written into the configurations.
    pub groups: Vec<String>,
    /// The bundle's files, relative to it.
    pub files: Vec<String>,
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn q_path(p: &Path) -> String {
    q(&p.display().to_string())
}

fn q_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

fn host_port(s: &str, what: &str) -> Result<(String, u16), EnrollError> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| EnrollError::Usage(format!("{what} {s:?}: expected HOST:PORT")))?;
    let port = p
        .parse()
        .map_err(|_| EnrollError::Usage(format!("{what} {s:?}: {p:?} is not a port")))?;
    Ok((h.trim_matches(['[', ']']).to_owned(), port))
}

/// A trusted key from a `KEYID.pub` file: (key id, base64 public key). The id is computed
/// from the key, not taken from the file name.
fn trusted_key(path: &Path) -> Result<(String, String), EnrollError> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let b64 = text.trim().to_owned();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&b64)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            EnrollError::Usage(format!(
                "{}: not a roost public key (base64 of 32 bytes, as `roost keygen` writes KEYID.pub)",
                path.display()
            ))
        })?;
    Ok((roost_schemas::dsse::key_id(&raw), b64))
}

/// The contents of the bundle's configurations.
struct Configs {
    agent: String,
    bridge: String,
}

/// Paths of the bundle as the store sees them.
struct Layout {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    agent_state: PathBuf,
    bridge_state: PathBuf,
}

impl Layout {
    fn under(root: &Path, store: &str) -> Layout {
        Layout {
            ca: root.join("tls/ca.pem"),
            cert: root.join(format!("tls/{store}.pem")),
            key: root.join(format!("tls/{store}.key")),
            agent_state: root.join("state/agent"),
            bridge_state: root.join("state/bridge"),
        }
    }
}

fn configs(
    spec: &EnrollSpec,
    at: &Layout,
    groups: &[String],
    keys: &[(String, String)],
    allowed: &[String],
) -> Result<Configs, EnrollError> {
    let cloud = spec.cloud.strip_prefix("mqtts://").ok_or_else(|| {
        EnrollError::Usage(format!(
            "--cloud {}: expected mqtts://HOST:PORT (stores connect to the cloud with mutual TLS)",
            spec.cloud
        ))
    })?;
    let (cloud_host, cloud_port) = host_port(cloud, "--cloud")?;
    let (edge_host, edge_port) = host_port(
        spec.edge
            .strip_prefix("mqtt://")
            .unwrap_or(spec.edge.as_str()),
        "--edge",
    )?;
    let store = &spec.store;
    let header = format!(
        "# Written by `roost store enroll {store}` on {}.\n",
        roost_schemas::now_rfc3339()
    );
    let bridge = format!(
        "{header}# roost bridge --config {BRIDGE_TOML}\n\
         store = {store_q}\n\
         # Until the store's profile arrives from the cloud; then the profile's groups.\n\
         groups = {groups}\n\
         state_dir = {state}\n\
         \n\
         [edge]\n\
         host = {edge_host}\n\
         port = {edge_port}\n\
         \n\
         [cloud]\n\
         host = {cloud_host}\n\
         port = {cloud_port}\n\
         # Mutual TLS: the certificate's Common Name is {store}, the identity the broker's ACL\n\
         # authorizes.\n\
         tls = {{ ca_file = {ca}, cert_file = {cert}, key_file = {key} }}\n\
         keep_alive_s = 15\n",
        store_q = q(store),
        groups = q_list(groups),
        state = q_path(&at.bridge_state),
        edge_host = q(&edge_host),
        cloud_host = q(&cloud_host),
        ca = q_path(&at.ca),
        cert = q_path(&at.cert),
        key = q_path(&at.key),
    );
    let mut agent = format!(
        "{header}# roost-agent --config {AGENT_TOML} (or roost agent --config {AGENT_TOML})\n\
         store = {store_q}\n\
         groups = {groups}\n\
         # Holds the store's age identity (age-identity.txt, mode 0600) for sealed secrets.\n\
         state_dir = {state}\n\
         \n\
         [broker]\n\
         host = {edge_host}\n\
         port = {edge_port}\n",
        store_q = q(store),
        groups = q_list(groups),
        state = q_path(&at.agent_state),
        edge_host = q(&edge_host),
    );
    for (id, public) in keys {
        agent.push_str(&format!(
            "\n[[trusted_keys]]\nid = {}\npublic_key = {}\n",
            q(id),
            q(public)
        ));
    }
    agent.push_str(&format!(
        "\n[git]\nallowed_sources = {}\n\n[target]\n",
        q_list(allowed)
    ));
    match &spec.target {
        BundleTarget::Files => agent.push_str("kind = \"files\"\n"),
        BundleTarget::Kubernetes { namespaces } => {
            agent.push_str("kind = \"kubernetes\"\n");
            if !namespaces.is_empty() {
                agent.push_str(&format!("allowed_namespaces = {}\n", q_list(namespaces)));
            }
        }
    }
    Ok(Configs { agent, bridge })
}

fn check_spec(spec: &EnrollSpec) -> Result<StoreEntry, EnrollError> {
    let entry = StoreEntry {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        name: spec.store.clone(),
        labels: spec.labels.clone(),
        timezone: spec.timezone.clone(),
        vars: spec.vars.clone(),
        age_recipient: None,
    };
    entry
        .validate()
        .map_err(|e| EnrollError::Usage(format!("{}: {e}", spec.store)))?;
    if spec.trusted_keys.is_empty() {
        return Err(EnrollError::Usage(
            "--trusted-key: at least one public key (KEYID.pub of `roost keygen`) the agent trusts"
                .into(),
        ));
    }
    if let Ok(mut d) = std::fs::read_dir(&spec.out) {
        if d.next().is_some() {
            return Err(EnrollError::Usage(format!(
                "--out {}: not empty (a bundle is written into a new directory)",
                spec.out.display()
            )));
        }
    }
    Ok(entry)
}

/// Reads the inventory at the tip of the branch being changed.
fn inventory_of(repo: &Changeable) -> Result<FleetRepo, EnrollError> {
    let mut files = Vec::new();
    for p in repo.files_under(STORES_DIR)? {
        if crate::inventory::is_inventory_file(&p) {
            if let Some(b) = repo.read(&p)? {
                files.push((p, b));
            }
        }
    }
    if let Some(b) = repo.read(inventory::FLEET_FILE)? {
        files.push((inventory::FLEET_FILE.to_owned(), b));
    }
    Ok(FleetRepo::from_files(
        files.iter().map(|(p, b)| (p.as_str(), b.as_slice())),
    )?)
}

/// Enrolls a store: checks the arguments and the inventory, writes the bundle into
/// `spec.out`, then commits the inventory entry (`work`: where a remote repository is
/// cloned). If the commit fails, the bundle is removed again.
pub fn enroll(spec: &EnrollSpec, work: &Path) -> Result<Enrolled, EnrollError> {
    let mut entry = check_spec(spec)?;
    let ca = Ca::open(&spec.ca_dir)?;
    let keys = spec
        .trusted_keys
        .iter()
        .map(|p| trusted_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let repo = Changeable::open(&spec.change.repo, &spec.change.branch, work)?;
    let inv = inventory_of(&repo)?;
    if let Some((file, _)) = inv.stores.get(&spec.store) {
        return Err(EnrollError::Exists {
            store: spec.store.clone(),
            file: file.clone(),
        });
    }
    let groups = match &spec.groups {
        Some(g) => g.clone(),
        None => inv.groups_of(&entry),
    };
    for g in &groups {
        roost_schemas::validate_name(g)
            .map_err(|e| EnrollError::Usage(format!("group {g}: {e}")))?;
    }
    let allowed = if spec.git_allow.is_empty() {
        inv.source_urls()
    } else {
        spec.git_allow.clone()
    };
    if allowed.is_empty() {
        return Err(EnrollError::Usage(
            "--git-allow: roost.yaml names no source URLs, so say which Git URLs the store may fetch"
                .into(),
        ));
    }
    let cloud_ca = match &spec.cloud_ca {
        Some(p) => std::fs::read_to_string(p).map_err(io(p))?,
        None => ca.cert_pem().to_owned(),
    };

    let out = std::path::absolute(&spec.out).map_err(io(&spec.out))?;
    let install = spec.install_dir.clone().unwrap_or_else(|| out.clone());
    let at = Layout::under(&install, &spec.store);
    let cfg = configs(spec, &at, &groups, &keys, &allowed)?;

    let identity = Identity::generate();
    entry.age_recipient = Some(identity.recipient());
    let issued = ca.issue(&spec.store, &Usage::Client, spec.days)?;

    let files = match write_bundle(&out, &spec.store, &cfg, &cloud_ca, &issued, &identity) {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            return Err(e);
        }
    };
    let text = inventory::store_file_text(
        &format!(
            "Enrolled by roost store enroll on {}.",
            roost_schemas::now_rfc3339()
        ),
        std::slice::from_ref(&entry),
    )?;
    let to = if spec.change.direct {
        CommitTo::Direct
    } else {
        CommitTo::NewBranch(format!("enroll/{}", spec.store))
    };
    let committed = repo
        .commit(
            &[Edit::Put {
                path: format!("{STORES_DIR}/{}.yaml", spec.store),
                content: text.into_bytes(),
            }],
            &format!("Enroll store {}", spec.store),
            "roost store enroll",
            &to,
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&out);
        })?;
    Ok(Enrolled {
        recipient: identity.recipient(),
        committed,
        groups,
        files,
    })
}

fn write_bundle(
    out: &Path,
    store: &str,
    cfg: &Configs,
    cloud_ca: &str,
    issued: &pki::Issued,
    identity: &Identity,
) -> Result<Vec<String>, EnrollError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let here = Layout::under(out, store);
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true).mode(0o700);
    for d in [
        out.to_path_buf(),
        out.join("tls"),
        here.agent_state.clone(),
        here.bridge_state.clone(),
    ] {
        dirs.create(&d).map_err(io(&d))?;
    }
    pki::write_public(&out.join(AGENT_TOML), cfg.agent.as_bytes())?;
    pki::write_public(&out.join(BRIDGE_TOML), cfg.bridge.as_bytes())?;
    pki::write_public(&here.ca, cloud_ca.as_bytes())?;
    pki::write_public(&here.cert, issued.cert_pem.as_bytes())?;
    pki::write_private(&here.key, issued.key_pem.as_bytes())?;
    pki::write_private(&out.join(IDENTITY), identity.file_text().as_bytes())?;
    pki::write_public(
        &out.join(RECIPIENT),
        format!("{}\n", identity.recipient()).as_bytes(),
    )?;
    Ok(vec![
        AGENT_TOML.into(),
        BRIDGE_TOML.into(),
        "tls/ca.pem".into(),
        format!("tls/{store}.pem"),
        format!("tls/{store}.key"),
        IDENTITY.into(),
        RECIPIENT.into(),
    ])
}

/// What retirement changed in the fleet repository.
#[derive(Debug, Clone)]
pub struct Retired {
    /// The commit.
    pub committed: Committed,
    /// The inventory file changed (removed, or rewritten without the store).
    pub file: String,
    /// Places in `roost.yaml` that still name the store (for the operator to edit).
    pub still_named_in_fleet_file: bool,
}

/// Removes `store` from the inventory: its file, or its document of a file holding several.
pub fn retire(store: &str, change: &RepoChange, work: &Path) -> Result<Retired, EnrollError> {
    let repo = Changeable::open(&change.repo, &change.branch, work)?;
    let inv = inventory_of(&repo)?;
    let (file, _) = inv
        .stores
        .get(store)
        .ok_or_else(|| EnrollError::NotEnrolled(store.to_owned()))?;
    let rest: Vec<StoreEntry> = inv
        .stores
        .values()
        .filter(|(f, e)| f == file && e.name != store)
        .map(|(_, e)| e.clone())
        .collect();
    let edit = if rest.is_empty() {
        Edit::Remove { path: file.clone() }
    } else {
        Edit::Put {
            path: file.clone(),
            content: inventory::store_file_text(
                &format!("{store} retired by roost store retire."),
                &rest,
            )?
            .into_bytes(),
        }
    };
    let to = if change.direct {
        CommitTo::Direct
    } else {
        CommitTo::NewBranch(format!("retire/{store}"))
    };
    let committed = repo.commit(
        &[edit],
        &format!("Retire store {store}"),
        "roost store retire",
        &to,
    )?;
    let named = repo
        .read(inventory::FLEET_FILE)?
        .is_some_and(|b| names_word(&String::from_utf8_lossy(&b), store));
    Ok(Retired {
        committed,
        file: file.clone(),
        still_named_in_fleet_file: named,
    })
}

/// Tombstones `store`'s store-scoped desired state: every `roost/v1/stores/STORE/…` topic
/// of a deployment or the profile that the fleet record (`db`) holds or the cloud broker
/// retains gets an empty retained message (the broker forgets it), and the record forgets
/// it too, so `roost fleet` does not restore it. Returns the topics, sorted.
pub async fn tombstone_store(
    broker: &crate::cloud::BrokerTarget,
    db: &crate::db::FleetDb,
    store: &str,
) -> Result<Vec<String>, EnrollError> {
    use roost_schemas::{Scope, Topics};
    let topics = Topics::default();
    let own = |t: &str| {
        topics
            .parse_deployment(t)
            .is_some_and(|d| d.scope == Scope::Store(store.to_owned()))
            || topics.parse_profile_topic(t).as_deref() == Some(store)
    };
    let mut found: std::collections::BTreeSet<String> = db
        .call(|db| db.desired())
        .await?
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| own(t))
        .collect();
    let retained = crate::cloud::read_retained(
        broker,
        &[
            topics.deployment_filter(&Scope::Store(store.to_owned())),
            topics.profile(store),
        ],
        std::time::Duration::from_secs(3),
    )
    .await?;
    found.extend(
        retained
            .into_iter()
            .filter(|(t, p)| !p.is_empty() && own(t))
            .map(|(t, _)| t),
    );
    for t in &found {
        crate::cloud::publish_retained(broker, t, Vec::new()).await?;
        let topic = t.clone();
        db.call(move |db| db.record_desired(&topic, &[])).await?;
    }
    Ok(found.into_iter().collect())
}

/// Whether `text` has `word` delimited by characters that cannot be part of a name.
fn names_word(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '-';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_as_whole_words() {
        assert!(names_word("stores: [store-1, store-2]", "store-1"));
        assert!(!names_word("stores: [store-10]", "store-1"));
        assert!(!names_word("a-store-1", "store-1"));
    }

    #[test]
    fn toml_values_are_quoted() {
        for s in ["a\"b", "c:\\dir", "it's", "line\nbreak"] {
            let t: toml::Table = toml::from_str(&format!("x = {}", q(s))).expect("toml");
            assert_eq!(t["x"].as_str(), Some(s));
        }
        assert_eq!(q_list(&["x".into(), "y".into()]), "[\"x\", \"y\"]");
        assert_eq!(
            host_port("[::1]:1883", "--edge").expect("v6"),
            ("::1".into(), 1883)
        );
        assert!(host_port("nohost", "--edge").is_err());
    }
}
