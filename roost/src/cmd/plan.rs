//! `roost plan`: the GitOps controller's rollout plans (status, pause, resume, abort).

use std::path::PathBuf;

use roost_fleet::gitops;
use roost_fleet::record::FleetDb;

#[derive(clap::Subcommand)]
pub enum PlanAction {
    /// Waves, stores per wave, converged/failed/deferred counts, what each plan waits for.
    Status {
        /// Only this deployment.
        deployment: Option<String>,
        /// SQLite file of `roost fleet`.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
    },
    /// Hold a plan where it is.
    Pause {
        /// Deployment.
        deployment: String,
        /// SQLite file of `roost fleet`.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
    },
    /// Continue a paused plan.
    Resume {
        /// Deployment.
        deployment: String,
        /// SQLite file of `roost fleet`.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
    },
    /// Stop a plan and restore the previous revision everywhere it went.
    Abort {
        /// Deployment.
        deployment: String,
        /// SQLite file of `roost fleet`.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
    },
}

pub fn run(action: PlanAction) -> anyhow::Result<()> {
    let (db, deployment, verb) = match action {
        PlanAction::Status { deployment, db } => {
            let fdb = FleetDb::open(&db)?;
            gitops::store::migrate(&fdb)?;
            print!("{}", gitops::plan_status_text(&fdb, deployment.as_deref())?);
            return Ok(());
        }
        PlanAction::Pause { deployment, db } => (db, deployment, "pause"),
        PlanAction::Resume { deployment, db } => (db, deployment, "resume"),
        PlanAction::Abort { deployment, db } => (db, deployment, "abort"),
    };
    let fdb = FleetDb::open(&db)?;
    gitops::store::migrate(&fdb)?;
    let known = fdb.with_conn(|c| Ok(gitops::store::plans(c)?.contains_key(&deployment)))?;
    if !known {
        anyhow::bail!("no plan for deployment {deployment} in {}", db.display());
    }
    fdb.with_conn(|c| gitops::store::request(c, Some(&deployment), verb))?;
    println!("{verb} requested for {deployment}");
    Ok(())
}
