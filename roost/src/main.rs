//! `roost`: the command line. One module per command in `cmd/`; the work is in the libraries
//! (`roost-fleet` for the cloud side, `roost-agent`, `roost-bridge`, `roost-broker`, and
//! `roost-sim` for the one-machine fleet and the benchmarks).

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use roost_runtime::process::{self, LogFormat};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "roost",
    version,
    about = "GitOps for fleets of edge clusters, over MQTT"
)]
struct Cli {
    /// Log format on stderr: text, or json (one object per line, with the span fields
    /// such as store, deployment, revision and sequence).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A whole fleet on this machine with embedded brokers.
    Up(cmd::up::UpArgs),
    /// Benchmarks with real processes or backlogs (footprint, latency, bridge-load, outbox);
    /// see bench/README.md. They print figures and one JSON line.
    Bench {
        #[command(subcommand)]
        kind: cmd::bench::BenchCmd,
    },
    /// The fleet benchmark: N stores in this process, K rollouts, latency percentiles.
    Sim(cmd::sim::SimArgs),
    /// A read-only Git server for the fleet (git://, fetch only): every bare repository
    /// directly under --base as /NAME. One pack per revision is built and cached for every
    /// store that fetches it, instead of two processes per fetch as with `git daemon`.
    GitServe(cmd::git_serve::GitServeArgs),
    #[command(about = cmd::broker::ABOUT, long_about = cmd::broker::LONG_ABOUT)]
    Broker(cmd::broker::BrokerArgs),
    /// The store agent (`roost agent --config FILE`), or `roost agent rbac`.
    Agent(cmd::agent::AgentArgs),
    /// The store bridge.
    Bridge(cmd::bridge::BridgeArgs),
    /// Generate an Ed25519 signing key pair.
    Keygen(cmd::keygen::KeygenArgs),
    /// The fleet's certificate authority for mutual TLS: `init`, `issue`.
    Ca {
        #[command(subcommand)]
        action: cmd::ca::CaCmd,
    },
    /// Stores joining and leaving the fleet: `enroll`, `retire`.
    Store {
        #[command(subcommand)]
        action: cmd::store::StoreCmd,
    },
    /// Sealed secrets (age): `seal`, `reseal`.
    Secret {
        #[command(subcommand)]
        action: cmd::secret::SecretCmd,
    },
    /// Sign and publish a rollout.
    Rollout(cmd::rollout::RolloutArgs),
    /// The fleet as a table (source vs target).
    Status(cmd::status::StatusArgs),
    /// The cloud-side fleet record: status, events (deduplicated, gaps detected) and desired
    /// state, kept in SQLite; puts back retained desired state the cloud broker lost (checked on
    /// every connection).
    ///
    /// With `--repo` it is also the GitOps controller: it watches the fleet repository's
    /// `roost.yaml` and rolls each change out as signed rollouts, wave by wave.
    Fleet(cmd::fleet::FleetArgs),
    /// Promote all, the GitOps way: make `--to` run what `--from` runs, as a Git change to
    /// the fleet file (a new branch for a pull request, or `--direct` onto the branch).
    Promote(cmd::promote::PromoteArgs),
    /// Rollout plans of the GitOps controller.
    Plan {
        #[command(subcommand)]
        action: cmd::plan::PlanAction,
    },
    /// Follow the event stream.
    Events(cmd::events::EventsArgs),
}

fn init_tracing(format: LogFormat, cmd: &Command) {
    // Long-running services log their work; interactive commands only problems. The embedded
    // broker's own logs are wanted only when it is the command.
    let default = match cmd {
        Command::Agent(_) | Command::Bridge(_) | Command::Fleet(_) => process::SERVICE_LOG,
        Command::Broker(_) => "warn,roost=info,roost_broker=info,rumqttd=warn",
        Command::GitServe(_) => "warn,roost=info,roost_fleet=info",
        _ => "warn,rumqttd=off",
    };
    process::init_tracing(format, default);
}

/// Runs a command. Long-running ones (`up`, `broker`, `agent`, `bridge`, `fleet`, `events`)
/// stop cleanly when `cancel` fires and return Ok (`up --once` then says `Interrupted`); the
/// one-shot commands are abandoned with `Interrupted`.
async fn run(cmd: Command, cancel: CancellationToken) -> anyhow::Result<()> {
    match cmd {
        Command::Up(a) => cmd::up::run(a, cancel).await,
        Command::Bench { kind } => cmd::bench::run(kind, cancel).await,
        Command::Sim(a) => cmd::sim::run(a, cancel).await,
        Command::GitServe(a) => cmd::git_serve::run(a, cancel).await,
        Command::Broker(a) => cmd::broker::run(a, cancel).await,
        Command::Agent(a) => cmd::agent::run(a, cancel).await,
        Command::Bridge(a) => cmd::bridge::run(a, cancel).await,
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Ca { action } => cmd::ca::run(action),
        Command::Store { action } => cmd::store::run(action, cancel).await,
        Command::Secret { action } => cmd::secret::run(action),
        Command::Rollout(a) => cmd::rollout::run(a, cancel).await,
        Command::Status(a) => cmd::status::run(a, cancel).await,
        Command::Fleet(a) => cmd::fleet::run(a, cancel).await,
        // Blocking (the fleet database's client on PostgreSQL is blocking): off the runtime.
        Command::Promote(a) => tokio::task::spawn_blocking(move || cmd::promote::run(a)).await?,
        Command::Plan { action } => {
            tokio::task::spawn_blocking(move || cmd::plan::run(action)).await?
        }
        Command::Events(a) => cmd::events::run(a, cancel).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.cmd);
    // Before any thread exists: libgit2's transport list is not locked.
    roost_agent::git_https::register();
    // A store's agent is a tiny service on a node shared with the workloads: one runtime
    // thread. Everything else (brokers, the bridge, which carries the store's traffic, the
    // fleet, benchmarks) gets a worker per core.
    let tiny = matches!(cli.cmd, Command::Agent(_));
    let max_blocking = match &cli.cmd {
        Command::Sim(a) => a.blocking_threads,
        _ => None,
    };
    process::main(tiny, max_blocking, |cancel| run(cli.cmd, cancel))
}
