//! `roost sim`: the fleet benchmark, N stores in this process.

use std::path::PathBuf;
use std::time::Duration;

use roost_runtime::process::interruptible;
use roost_sim::cloud_tier::CloudBroker;
use roost_sim::sim::{self, GitServerKind, SimOptions, Topology};
use tokio_util::sync::CancellationToken;

/// Arguments of `roost sim`.
#[derive(clap::Args)]
pub struct SimArgs {
    /// Number of stores.
    #[arg(long, default_value_t = 10)]
    stores: usize,
    /// Successive rollouts.
    #[arg(long, default_value_t = 10)]
    rollouts: usize,
    /// Per-rollout timeout in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Benchmark the GitOps controller instead, with simulated stores (status
    /// documents): ingest rate, commit → first wave, gate → next wave, plan-step cost.
    #[arg(long)]
    controller: bool,
    /// Benchmark the cloud tier alone with thin stores (MQTT clients that answer each
    /// rollout with an agent's events and status): `roost fleet` as its own process,
    /// controller start → profiles, status ingest, commit → waves, the broker audit,
    /// the controller's CPU and memory. `--cloud-broker` picks the broker.
    #[arg(long, conflicts_with = "controller")]
    cloud_tier: bool,
    /// Thin stores per MQTT connection (`--cloud-tier`; default 250, on NATS 30: a NATS
    /// MQTT session holds at most 63 QoS 1 subscriptions, two per thin store).
    #[arg(long)]
    per_connection: Option<usize>,
    /// direct (agents on the cloud broker) or bridged (an edge broker and a bridge per
    /// store); default: direct above 200 stores.
    #[arg(long)]
    topology: Option<String>,
    /// The fleet Git server's (git-daemon) limit on concurrent fetches; 0: unlimited.
    /// git-daemon's own default, 32, kills running fetches beyond it.
    #[arg(long, default_value_t = 0)]
    git_max_connections: u32,
    /// The fleet's Git server: roost (`roost git-serve` in this process, one cached pack
    /// per revision) or daemon (`git daemon`, two processes per fetch).
    #[arg(long, default_value = "roost")]
    git_server: String,
    /// The cloud broker: embedded (rumqttd in this process), the path of a mosquitto
    /// binary to run as it, or (`--cloud-tier` only) `nats` or `nats:PATH`: a 3-node
    /// nats-server cluster on loopback (`/usr/sbin/nats-server` or `nats-server` on the
    /// PATH; PATH: that binary).
    #[arg(long, default_value = "embedded")]
    cloud_broker: String,
    /// The most blocking threads of the process, which every store's git and file work
    /// shares (default: tokio's 512). A real store has its own process and cores.
    #[arg(long)]
    pub blocking_threads: Option<usize>,
    /// Directory for the stores' state (default: the system's temporary directory).
    /// All stores share its file system, where a real store has its own disk.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print one JSON line.
    #[arg(long)]
    json: bool,
    /// Run `roost fleet`'s record in the process: `none`, `confirm` (with end-to-end
    /// confirmations, as `roost fleet` runs) or `no-confirm` (`roost fleet --no-confirm`).
    #[arg(long, default_value = "none", value_name = "MODE")]
    fleet_record: String,
    /// Internal: run the stores a `roost sim` parent wrote to FILE (a worker process, for
    /// fleets that do not fit under one process's open-file limit).
    #[arg(long, hide = true, value_name = "FILE")]
    worker: Option<PathBuf>,
}

pub async fn run(a: SimArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    if let Some(spec) = &a.worker {
        return Ok(roost_sim::workers::run_worker(spec, cancel).await?);
    }
    if a.controller {
        let stores = a.stores;
        let timeout = Duration::from_secs(a.timeout);
        let report = interruptible(&cancel, async {
            Ok(roost_sim::controller::run(stores, timeout).await?)
        })
        .await?;
        roost_sim::controller::print(&report);
        return Ok(());
    }
    let cloud = match a.cloud_broker.as_str() {
        "embedded" => CloudBroker::Embedded,
        "nats" => CloudBroker::Nats(roost_sim::nats::default_bin()),
        other => match other.strip_prefix("nats:") {
            Some(path) => CloudBroker::Nats(PathBuf::from(path)),
            None => CloudBroker::Mosquitto(PathBuf::from(other)),
        },
    };
    if a.cloud_tier {
        let opts = roost_sim::cloud_tier::CloudTierOptions {
            stores: a.stores,
            per_connection: a.per_connection,
            timeout: Duration::from_secs(a.timeout),
            broker: cloud,
            exe: std::env::current_exe()?,
        };
        let report = interruptible(&cancel, async {
            Ok(roost_sim::cloud_tier::run(opts).await?)
        })
        .await?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            roost_sim::cloud_tier::print(&report);
        }
        return Ok(());
    }
    let git_server = match a.git_server.as_str() {
        "roost" => GitServerKind::Roost,
        "daemon" => GitServerKind::Daemon,
        other => anyhow::bail!("--git-server {other}: roost or daemon"),
    };
    let topology = match a.topology.as_deref() {
        Some("direct") => Topology::Direct,
        Some("bridged") => Topology::Bridged,
        None if a.stores > 200 => Topology::Direct,
        None => Topology::Bridged,
        Some(other) => anyhow::bail!("--topology {other}: direct or bridged"),
    };
    let cloud_mosquitto = match cloud {
        CloudBroker::Embedded => None,
        CloudBroker::Mosquitto(path) => Some(path),
        CloudBroker::Nats(_) => {
            anyhow::bail!("--cloud-broker nats: only with --cloud-tier (stores there are thin)")
        }
    };
    let opts = SimOptions {
        stores: a.stores,
        rollouts: a.rollouts,
        timeout: Duration::from_secs(a.timeout),
        topology,
        git_max_connections: a.git_max_connections,
        git_server,
        cloud_mosquitto,
        state_dir: a.state_dir,
        fleet_record: match a.fleet_record.as_str() {
            "none" => None,
            "confirm" => Some(true),
            "no-confirm" => Some(false),
            other => anyhow::bail!("--fleet-record {other}: none, confirm or no-confirm"),
        },
        worker_exe: std::env::current_exe().ok(),
    };
    let report = interruptible(&cancel, async { Ok(sim::run(opts.clone()).await?) }).await?;
    if a.json {
        println!("{}", sim::json(&opts, &report));
    } else {
        sim::print(&opts, &report);
    }
    Ok(())
}
