//! `roost bridge`: the store bridge.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

/// Arguments of `roost bridge`.
#[derive(clap::Args)]
pub struct BridgeArgs {
    /// Bridge TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

pub async fn run(a: BridgeArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut cfg = roost_bridge::BridgeConfig::load(&a.config)?;
    if a.metrics_listen.is_some() {
        cfg.metrics_listen = a.metrics_listen;
    }
    roost_bridge::run(cfg, cancel).await?;
    Ok(())
}
