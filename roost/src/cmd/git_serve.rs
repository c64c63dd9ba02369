//! `roost git-serve`: the fleet's read-only Git mirror.

use std::net::SocketAddr;
use std::path::PathBuf;

use roost_fleet::gitserve::{GitServeConfig, GitServer};
use tokio_util::sync::CancellationToken;

/// Arguments of `roost git-serve`.
#[derive(clap::Args)]
pub struct GitServeArgs {
    /// Directory of bare repositories.
    #[arg(long)]
    base: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:9418")]
    listen: SocketAddr,
    /// MiB of packs kept in memory.
    #[arg(long, default_value_t = 256)]
    cache_mib: usize,
    /// Listen on a non-loopback address: git:// has no TLS and no authentication, so
    /// anyone who reaches it can read every repository under --base (stores verify the
    /// signed commit id, not the server).
    #[arg(long)]
    insecure: bool,
}

pub async fn run(a: GitServeArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    if !a.listen.ip().is_loopback() && !a.insecure {
        anyhow::bail!("--listen {} is not loopback: git:// has no TLS or authentication (pass --insecure to serve anyway)", a.listen);
    }
    if !a.base.is_dir() {
        anyhow::bail!("--base {}: not a directory", a.base.display());
    }
    let server = GitServer::start(GitServeConfig {
        base: a.base,
        listen: a.listen,
        cache_bytes: a.cache_mib << 20,
    })?;
    println!("git-serve: listening on git://{}/", server.addr);
    cancel.cancelled().await;
    server.stop();
    Ok(())
}
