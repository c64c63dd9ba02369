//! `roost plan`: the GitOps controller's rollout plans (status, pause, resume, abort).

use std::path::PathBuf;

use roost_fleet::db::{self, FleetDb, Request};
use roost_fleet::gitops;

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
    let (db, request) = match action {
        PlanAction::Status { deployment, db } => {
            let fdb = FleetDb::open(&db)?;
            print!("{}", gitops::plan_status_text(&fdb, deployment.as_deref())?);
            return Ok(());
        }
        PlanAction::Pause { deployment, db } => (db, Request::Pause(deployment)),
        PlanAction::Resume { deployment, db } => (db, Request::Resume(deployment)),
        PlanAction::Abort { deployment, db } => (db, Request::Abort(deployment)),
    };
    let deployment = request.deployment().unwrap_or_default();
    let fdb = FleetDb::open(&db)?;
    let known = fdb.with_conn(|c| Ok(db::gitops::plans(c)?.contains_key(deployment)))?;
    if !known {
        anyhow::bail!("no plan for deployment {deployment} in {}", db.display());
    }
    fdb.request(&request)?;
    println!("{} requested for {deployment}", request.action());
    Ok(())
}
