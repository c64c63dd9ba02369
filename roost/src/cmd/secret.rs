//! `roost secret seal` and `roost secret reseal`: Secret manifests encrypted with age to the
//! stores that may read them, in the deployment's overlay paths.

use std::path::PathBuf;

use roost_fleet::seal::{self, Resealed, SealSpec, SealTo};

/// `roost secret` subcommands.
#[derive(clap::Subcommand)]
pub enum SecretCmd {
    /// Encrypt a Secret manifest with age to exactly the stores given (and the fleet's sealing
    /// key, for reseal) into the deployment's overlay: PATH/_stores/STORE/FILE.age for
    /// --store, PATH/_groups/GROUP/FILE.age for --group (its members in the inventory now),
    /// and for --selector one PATH/_stores/STORE/FILE.age per store it matches now (stores
    /// that match later get nothing: use a group). Writes into the apps checkout; commit it.
    Seal(SealArgs),
    /// Encrypt every sealed file (`_stores/*/…age`, `_groups/*/…age`) of the apps checkout
    /// again to the stores the inventory names now: after a store joined or left a group or
    /// was enrolled again with a new key. Opens each file with the fleet's sealing identity
    /// (CA_DIR/sealing-identity.txt); files it cannot reseal are listed and left, and the
    /// command then exits non-zero.
    Reseal(ResealArgs),
}

/// Arguments of `roost secret seal`.
#[derive(clap::Args)]
pub struct SealArgs {
    /// The plaintext Secret manifest (YAML); it is not copied anywhere.
    file: PathBuf,
    /// The fleet repository checkout (roost.yaml, stores/).
    #[arg(long)]
    repo: PathBuf,
    /// The checkout of the repository that holds the deployment's path (default: --repo).
    #[arg(long)]
    apps: Option<PathBuf>,
    /// The deployment: its path is its source path in roost.yaml.
    #[arg(long, required_unless_present = "path")]
    deployment: Option<String>,
    /// The deployment's directory in the apps checkout (instead of roost.yaml's).
    #[arg(long)]
    path: Option<String>,
    /// Seal to one store.
    #[arg(long, conflicts_with_all = ["group", "selector"], required_unless_present_any = ["group", "selector"])]
    store: Option<String>,
    /// Seal to a group roost.yaml defines with members (stores: or selector:).
    #[arg(long, conflicts_with = "selector")]
    group: Option<String>,
    /// Seal to each store whose labels match, `k=v,k2=v2` (also `k!=v`, `k`, `!k`).
    #[arg(long)]
    selector: Option<String>,
    /// The CA directory (`roost ca init --dir`): its sealing-recipient.txt.
    #[arg(long)]
    ca: PathBuf,
}

/// Arguments of `roost secret reseal`.
#[derive(clap::Args)]
pub struct ResealArgs {
    /// The fleet repository checkout (roost.yaml, stores/).
    #[arg(long)]
    repo: PathBuf,
    /// The apps checkout whose sealed files are resealed (default: --repo).
    #[arg(long)]
    apps: Option<PathBuf>,
    /// The CA directory: its sealing-identity.txt opens the files.
    #[arg(long)]
    ca: PathBuf,
}

pub fn run(cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Seal(a) => {
            let to = match (a.store, a.group, a.selector) {
                (Some(s), None, None) => SealTo::Store(s),
                (None, Some(g), None) => SealTo::Group(g),
                (None, None, Some(s)) => SealTo::Selector(
                    s.parse()
                        .map_err(|e| anyhow::anyhow!("--selector {s:?}: {e}"))?,
                ),
                _ => anyhow::bail!("give exactly one of --store, --group, --selector"),
            };
            let spec = SealSpec {
                apps: a.apps.unwrap_or_else(|| a.repo.clone()),
                fleet: a.repo,
                path: a.path,
                deployment: a.deployment,
                to,
                file: a.file,
                ca_dir: a.ca,
            };
            for f in seal::seal(&spec)? {
                println!("sealed {} for {}", f.path, f.stores.join(", "));
            }
        }
        SecretCmd::Reseal(a) => {
            let apps = a.apps.unwrap_or_else(|| a.repo.clone());
            let mut left = 0;
            for r in seal::reseal(&a.repo, &apps, &a.ca)? {
                match r {
                    Resealed::Sealed(f) => {
                        println!("resealed {} for {}", f.path, f.stores.join(", "))
                    }
                    Resealed::Left { path, why } => {
                        left += 1;
                        println!("left {path}: {why}");
                    }
                }
            }
            if left > 0 {
                anyhow::bail!("{left} sealed file(s) left as they were");
            }
        }
    }
    Ok(())
}
