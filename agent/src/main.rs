//! `roost-agent`: the store agent alone, for the nodes of a store's cluster. The same agent
//! as `roost agent --config FILE`, built from the agent crate, whose dependency tree has no
//! broker, bridge, fleet controller, dashboard or benchmarks: a smaller binary, so fewer of
//! its pages are resident (see bench/README.md, footprint).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use roost_runtime::process::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "roost-agent",
    version,
    about = "The roost store agent: verifies rollouts, fetches Git revisions, applies them and reports back"
)]
struct Cli {
    /// Agent TOML configuration.
    #[arg(long)]
    config: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format on stderr: text, or json (one object per line, with the span fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    process::init_tracing(cli.log_format, process::SERVICE_LOG);
    // Before any thread exists: libgit2's transport list is not locked.
    roost_agent::git_https::register();
    process::main(true, None, |cancel| async move {
        roost_agent::run_file(&cli.config, cli.metrics_listen, cancel).await?;
        Ok(())
    })
}
