//! `roost bench`: benchmarks with real processes or backlogs; they print figures.

use std::path::PathBuf;
use std::time::Duration;

use roost_runtime::process::interruptible;
use roost_sim::bench;
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// A real agent with its edge broker, bridge and a cloud broker converges N objects and
    /// idles: the agent's RSS, idle CPU, fds, threads, and this binary's size.
    Footprint {
        /// Objects (files) in the revision.
        #[arg(long, default_value_t = 50)]
        objects: usize,
        /// Idle window in seconds.
        #[arg(long, default_value_t = 30)]
        idle: u64,
        /// Run the agent as this lean `roost-agent` binary instead of `roost agent`.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
    },
    /// One bridged store of real processes: rollout -> converged and drift edit ->
    /// drift.detected at the cloud, percentiles over the trials.
    Latency {
        /// Trials.
        #[arg(long, default_value_t = 100)]
        trials: usize,
    },
    /// roost bridge vs mosquitto's bridge between two mosquitto brokers, alternating runs;
    /// then with the cloud broker restarted mid-run.
    BridgeLoad {
        /// QoS 1 messages per run.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// Runs per bridge.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Skip the runs with a cloud broker restart.
        #[arg(long)]
        no_restart: bool,
        /// The mosquitto binary.
        #[arg(long, default_value = "/usr/sbin/mosquitto")]
        mosquitto: PathBuf,
    },
    /// The controller's work on a large store inventory, in this process: parse and validate
    /// `stores/*.yaml`, the fleet file, each store's profile, a plan's first steps.
    Inventory {
        /// Stores in the inventory.
        #[arg(long, default_value_t = 20_000)]
        stores: usize,
    },
    /// An outbox backlog of N events: enqueue rate, drain rate to the edge broker, time until
    /// the cloud has all of them through a bridge.
    Outbox {
        /// Events in the backlog.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
}

pub async fn run(kind: BenchCmd, cancel: CancellationToken) -> anyhow::Result<()> {
    let report = interruptible(&cancel, async {
        Ok(match kind {
            BenchCmd::Footprint {
                objects,
                idle,
                agent_bin,
            } => {
                bench::footprint::run(&bench::footprint::FootprintOptions {
                    objects,
                    idle: Duration::from_secs(idle),
                    agent_bin,
                })
                .await?
            }
            BenchCmd::Latency { trials } => {
                bench::latency::run(&bench::latency::LatencyOptions { trials }).await?
            }
            BenchCmd::BridgeLoad {
                messages,
                runs,
                no_restart,
                mosquitto,
            } => {
                bench::bridge_load::run(&bench::bridge_load::BridgeLoadOptions {
                    messages,
                    runs,
                    restart: !no_restart,
                    mosquitto,
                })
                .await?
            }
            BenchCmd::Inventory { stores } => {
                bench::inventory::run(&bench::inventory::InventoryOptions { stores }).await?
            }
            BenchCmd::Outbox { events } => {
                bench::outbox::run(&bench::outbox::OutboxOptions { events }).await?
            }
        })
    })
    .await?;
    println!("{report}");
    Ok(())
}
