//! `roost up`: a whole fleet on this machine with embedded brokers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use roost_runtime::process::Interrupted;
use tokio_util::sync::CancellationToken;

/// Arguments of `roost up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Number of stores.
    #[arg(long, default_value_t = 3)]
    stores: usize,
    /// Cloud broker listen address (default: a free loopback port).
    #[arg(long)]
    cloud_listen: Option<SocketAddr>,
    /// State directory (default: a new temporary directory).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// files or kubernetes.
    #[arg(long, default_value = "files")]
    target: String,
    /// Exit 0 once every store has converged.
    #[arg(long)]
    once: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Serve the dashboard and API here (default: a free loopback port).
    #[arg(long)]
    http: Option<SocketAddr>,
}

pub async fn run(a: UpArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let opts = roost_sim::up::UpOptions {
        stores: a.stores,
        state_dir: a.state_dir,
        cloud_listen: a.cloud_listen,
        target: a.target,
        once: a.once,
        timeout: Duration::from_secs(a.timeout),
        http: a.http,
    };
    roost_sim::up::run(opts, cancel.clone()).await?;
    // `--once` is a question ("does the fleet converge?"): a signal leaves it open.
    if a.once && cancel.is_cancelled() {
        return Err(Interrupted.into());
    }
    Ok(())
}
