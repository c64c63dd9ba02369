//! `roost store enroll` and `roost store retire`: a store joins the fleet (inventory entry,
//! client certificate, age identity, a bundle it starts from) or leaves it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use roost_fleet::db::FleetDb;
use roost_fleet::enroll::{self, BundleTarget, EnrollSpec, RepoChange};
use roost_fleet::git::Committed;
use roost_runtime::process::interruptible;
use roost_schemas::ShortRev;
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

/// `roost store` subcommands.
#[derive(clap::Subcommand)]
pub enum StoreCmd {
    /// Enroll a store: write its inventory entry `stores/NAME.yaml` (labels, time zone, vars,
    /// age recipient) into the fleet repository as a commit on a new branch `enroll/NAME`
    /// (or `--direct` onto the branch); issue its client certificate (CN = NAME) from the CA;
    /// make its age identity; and write a bundle into --out: agent.toml, bridge.toml,
    /// tls/ (the cloud's CA, NAME.pem, NAME.key mode 0600), state/agent/age-identity.txt
    /// (mode 0600) and age-recipient.txt. The store starts from it unedited:
    /// `roost bridge --config bridge.toml`, `roost-agent --config agent.toml`.
    Enroll(EnrollArgs),
    /// Retire a store: remove its inventory entry (a commit on a new branch `retire/NAME`, or
    /// `--direct`), then tombstone its store-scoped desired state: every
    /// `roost/v1/stores/NAME/deployments/…` and `…/profile` topic that the fleet record holds
    /// or the cloud broker retains gets an empty retained message (the broker drops it) and is
    /// deleted from the fleet record (so `roost fleet` does not restore it). The store's own
    /// retained status and presence stay (the controller's identity may not write them), and
    /// its certificate stays valid until it expires.
    Retire(RetireArgs),
}

/// The fleet repository change (enroll and retire).
#[derive(clap::Args)]
pub struct ChangeArgs {
    /// The fleet repository: a local checkout (changed in place) or a URL that accepts a push.
    #[arg(long)]
    repo: String,
    /// Its branch (HEAD: the checked-out branch, or the remote's default branch).
    #[arg(long, default_value = "HEAD")]
    branch: String,
    /// Commit onto --branch instead of a new branch for a pull request.
    #[arg(long)]
    direct: bool,
}

impl ChangeArgs {
    fn change(&self) -> RepoChange {
        RepoChange {
            repo: self.repo.clone(),
            branch: self.branch.clone(),
            direct: self.direct,
        }
    }
}

/// Arguments of `roost store enroll`.
#[derive(clap::Args)]
pub struct EnrollArgs {
    /// The store's name: its MQTT identity and topic segment.
    name: String,
    #[command(flatten)]
    change: ChangeArgs,
    /// Labels, `k=v,...` (Kubernetes label syntax).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// IANA time zone (`America/Chicago`); UTC when absent.
    #[arg(long)]
    tz: Option<String>,
    /// Vars for `${roost.vars.KEY}`, `k=v,...`.
    #[arg(long, value_delimiter = ',')]
    vars: Vec<String>,
    /// The CA directory (`roost ca init --dir`).
    #[arg(long)]
    ca: PathBuf,
    /// The bundle directory (new or empty).
    #[arg(long)]
    out: PathBuf,
    /// Where the bundle will be on the store: the paths in agent.toml and bridge.toml point
    /// there (default: --out, absolute). The state directories are INSTALL_DIR/state/agent
    /// and INSTALL_DIR/state/bridge.
    #[arg(long)]
    install_dir: Option<PathBuf>,
    /// The cloud broker as the store reaches it: mqtts://HOST:PORT (HOST as in the broker's
    /// certificate).
    #[arg(long)]
    cloud: String,
    /// The CA that signed the cloud broker's certificate (default: the fleet CA).
    #[arg(long, value_name = "PEM")]
    cloud_ca: Option<PathBuf>,
    /// The store's edge broker, HOST:PORT, for the bridge and the agent.
    #[arg(long, default_value = "127.0.0.1:1883")]
    edge: String,
    /// A public key the agent trusts (KEYID.pub of `roost keygen`); repeat for several.
    #[arg(long = "trusted-key", required = true, value_name = "PUB")]
    trusted_keys: Vec<PathBuf>,
    /// A Git URL prefix the agent may fetch from; repeat for several (default: the
    /// deployments' source URLs in roost.yaml).
    #[arg(long = "git-allow", value_name = "URL")]
    git_allow: Vec<String>,
    /// The groups the store starts with, `g1,g2` in precedence order (default: the groups
    /// roost.yaml defines that the store is a member of); its profile replaces them.
    #[arg(long, value_delimiter = ',')]
    groups: Option<Vec<String>>,
    /// The agent's target: files, or kubernetes (the store's cluster).
    #[arg(long, default_value = "files", value_parser = ["files", "kubernetes"])]
    target: String,
    /// With --target kubernetes: the namespaces the agent may write, `a,b`.
    #[arg(long, value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Days the store's certificate is valid.
    #[arg(long, default_value_t = roost_fleet::pki::LEAF_DAYS)]
    days: u32,
}

/// Arguments of `roost store retire`.
#[derive(clap::Args)]
pub struct RetireArgs {
    /// The store.
    name: String,
    #[command(flatten)]
    change: ChangeArgs,
    /// The cloud broker (HOST:PORT or mqtts://HOST:PORT), with the controller's identity.
    #[arg(long, env = "ROOST_BROKER")]
    broker: String,
    #[command(flatten)]
    security: BrokerSecurity,
    /// SQLite file of `roost fleet` (the record of what was published).
    #[arg(long, default_value = "fleet.db")]
    db: PathBuf,
}

fn pairs(flag: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--{flag} {s:?}: expected k=v"))
        })
        .collect()
}

/// Runs `f` with a new work directory (where a remote fleet repository is cloned), removed
/// afterwards.
fn in_work_dir<T>(what: &str, f: impl FnOnce(&std::path::Path) -> T) -> T {
    let work = std::env::temp_dir().join(format!("roost-{what}-{:08x}", rand::random::<u32>()));
    let out = f(&work);
    let _ = std::fs::remove_dir_all(&work);
    out
}

/// "in commit C on branch B", and for a new branch what to do with it.
fn where_committed(c: &Committed, direct: bool) -> String {
    format!(
        "in commit {} on branch {}{}",
        ShortRev::of(&c.commit),
        c.branch,
        if direct {
            ""
        } else {
            " (open a pull request from it)"
        }
    )
}

pub async fn run(cmd: StoreCmd, cancel: CancellationToken) -> anyhow::Result<()> {
    match cmd {
        StoreCmd::Enroll(a) => enroll(a),
        StoreCmd::Retire(a) => retire(a, cancel).await,
    }
}

fn enroll(a: EnrollArgs) -> anyhow::Result<()> {
    let spec = EnrollSpec {
        store: a.name,
        labels: pairs("labels", &a.labels)?,
        timezone: a.tz,
        vars: pairs("vars", &a.vars)?,
        change: a.change.change(),
        ca_dir: a.ca,
        out: a.out,
        install_dir: a.install_dir,
        cloud: a.cloud,
        cloud_ca: a.cloud_ca,
        edge: a.edge,
        trusted_keys: a.trusted_keys,
        git_allow: a.git_allow,
        groups: a.groups,
        target: if a.target == "kubernetes" {
            BundleTarget::Kubernetes {
                namespaces: a.namespaces,
            }
        } else {
            BundleTarget::Files
        },
        days: a.days,
    };
    let e = in_work_dir("enroll", |work| enroll::enroll(&spec, work))?;
    println!(
        "enrolled {}: stores/{}.yaml {}",
        spec.store,
        spec.store,
        where_committed(&e.committed, spec.change.direct)
    );
    println!("age recipient {}", e.recipient);
    println!(
        "groups until its profile arrives: [{}]",
        e.groups.join(", ")
    );
    println!("bundle {}:", spec.out.display());
    for f in &e.files {
        println!("  {f}");
    }
    Ok(())
}

async fn retire(a: RetireArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    roost_schemas::validate_name(&a.name).map_err(|e| anyhow::anyhow!("{}: {e}", a.name))?;
    let broker = a.security.target(&a.broker)?;
    let db = FleetDb::open_blocking(&a.db).await?;
    let change = a.change.change();
    let name = a.name.clone();
    let r = tokio::task::spawn_blocking(move || {
        in_work_dir("retire", |work| enroll::retire(&name, &change, work))
    })
    .await??;
    println!(
        "retired {}: {} changed {}",
        a.name,
        r.file,
        where_committed(&r.committed, a.change.direct)
    );
    if r.still_named_in_fleet_file {
        println!(
            "note: roost.yaml still names {} (groups, waves or pins)",
            a.name
        );
    }
    let topics = interruptible(&cancel, async {
        Ok(enroll::tombstone_store(&broker, &db, &a.name).await?)
    })
    .await?;
    if topics.is_empty() {
        println!("no store-scoped desired state to tombstone");
    }
    for t in topics {
        println!("tombstoned {t}");
    }
    Ok(())
}
