//! `roost-agent`: the store agent alone, for the nodes of a store's cluster. The same agent
//! as `roost agent --config FILE`, without the brokers, the bridge, the fleet controller, the
//! dashboard and the benchmarks linked in: a smaller binary, so fewer of its pages are
//! resident (see BENCHMARKS.md, footprint).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use roost::process::LogFormat;

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
    roost::process::init_tracing(cli.log_format, roost::process::SERVICE_LOG);
    roost::process::main(true, None, |cancel| {
        roost::process::run_agent(cli.config, cli.metrics_listen, cancel)
    })
}
