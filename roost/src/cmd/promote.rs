//! `roost promote`: make `--to` run what `--from` runs, as a Git change to the fleet file.

use roost_schemas::ShortRev;
use std::path::PathBuf;

use roost_fleet::db::FleetDb;
use roost_fleet::gitops::promote;

/// Arguments of `roost promote`.
#[derive(clap::Args)]
pub struct PromoteArgs {
    /// Deployment.
    deployment: String,
    /// Whose running revision: `group:NAME` or `store:NAME`.
    #[arg(long)]
    from: String,
    /// Who gets it: `fleet` or `store:NAME`.
    #[arg(long, default_value = "fleet")]
    to: String,
    /// The fleet repository (a path or URL that accepts a push).
    #[arg(long)]
    repo: String,
    /// Branch of the fleet repository.
    #[arg(long, default_value = "main")]
    branch: String,
    /// The fleet file.
    #[arg(long, default_value = "roost.yaml")]
    file: String,
    /// SQLite file of `roost fleet` (where the stores' status is).
    #[arg(long, default_value = "fleet.db")]
    db: PathBuf,
    /// Commit onto `--branch` instead of a new branch.
    #[arg(long)]
    direct: bool,
}

pub fn run(a: PromoteArgs) -> anyhow::Result<()> {
    let fdb = FleetDb::open(&a.db)?;
    let work = std::env::temp_dir().join(format!("roost-promote-{:08x}", rand::random::<u32>()));
    let spec = promote::PromoteSpec {
        deployment: a.deployment,
        from: a.from,
        to: a.to,
        repo: a.repo,
        branch: a.branch,
        file: a.file,
        direct: a.direct,
    };
    let res = promote::promote(&fdb, &spec, &work);
    let _ = std::fs::remove_dir_all(&work);
    let p = res?;
    println!(
        "promoted {} {} from {} to {}: commit {} on branch {}{}",
        spec.deployment,
        ShortRev::of(&p.revision),
        spec.from,
        spec.to,
        ShortRev::of(&p.commit),
        p.branch,
        if spec.direct {
            ""
        } else {
            " (open a pull request from it)"
        }
    );
    Ok(())
}
