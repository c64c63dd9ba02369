//! `roost`: brokers, the store agent and bridge, cloud-side commands and the one-machine demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use roost::cloud::{self, RolloutSpec};
use roost::process::{interruptible, Interrupted, LogFormat};
use roost::view;
use roost_schemas::{Policy, Scope, Topics};
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
    cmd: Cmd,
}

/// TLS and credentials for the cloud broker (`roost fleet`, `rollout`, `status`, `events`).
#[derive(Args, Clone, Default)]
struct BrokerSecurity {
    /// CA certificate(s) (PEM) that sign the broker's certificate; implies TLS. Without it,
    /// an `mqtts://` broker is checked against the system's trust store.
    #[arg(long, env = "ROOST_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its Common Name is the identity that
    /// mosquitto-acl.conf authorizes (`roost-controller`).
    #[arg(long, env = "ROOST_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ROOST_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// MQTT username.
    #[arg(long, env = "ROOST_USERNAME")]
    username: Option<String>,
    /// A file holding the MQTT password (read on every connection attempt).
    #[arg(
        long,
        env = "ROOST_PASSWORD_FILE",
        value_name = "FILE",
        requires = "username"
    )]
    password_file: Option<PathBuf>,
}

impl BrokerSecurity {
    fn security(&self) -> roost_runtime::Security {
        let tls =
            (self.tls_ca.is_some() || self.tls_cert.is_some()).then(|| roost_runtime::TlsFiles {
                ca_file: self.tls_ca.clone(),
                cert_file: self.tls_cert.clone(),
                key_file: self.tls_key.clone(),
            });
        roost_runtime::Security {
            tls,
            username: self.username.clone(),
            password: self
                .password_file
                .clone()
                .map(roost_runtime::Password::File),
            field_prefix: "--".into(),
        }
    }

    /// The broker address with this security, its files checked.
    fn target(&self, broker: &str) -> Result<cloud::BrokerTarget, cloud::CloudError> {
        cloud::BrokerTarget::parse(broker, self.security())
    }
}

const BROKER_ABOUT: &str = "An embedded MQTT broker (rumqttd) from a configuration file";

const BROKER_LONG_ABOUT: &str = "An embedded MQTT broker (rumqttd) from a configuration file \
(broker-config/: edge.toml, cloud.toml on loopback; edge-tls.toml, cloud-tls.toml with TLS and \
client certificates).

It refuses a listener on a non-loopback address that lacks TLS or authentication (client \
certificates via tls.capath, or connections.auth), unless --insecure is given, and checks the \
TLS files before it starts.

rumqttd has NO topic ACLs (rumqtt issue 495): every authenticated client may publish and \
subscribe to every topic, so one store could publish another store's status or a rollout. \
For per-store authorization run mosquitto (or another broker with ACLs) as the cloud broker: \
broker-config/mosquitto-cloud-tls.conf with broker-config/mosquitto-acl.conf.";

#[derive(Subcommand)]
enum FleetAction {
    /// Ask the running controller (same `--db`) to look at the fleet repository now.
    Sync {
        /// SQLite file of the running `roost fleet`.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
        /// Wait until every plan is done or aborted; exit non-zero naming what was aborted
        /// or why the file is invalid.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum PlanAction {
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

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FleetConfigFile {
    #[serde(default)]
    gitops: GitopsSection,
    /// Serve Prometheus metrics there.
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    api: ApiSection,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    /// The bearer token for plan actions over HTTP.
    token_file: Option<PathBuf>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GitopsSection {
    repo: Option<String>,
    branch: Option<String>,
    file: Option<String>,
    key: Option<PathBuf>,
    poll_interval_s: Option<u64>,
    http: Option<SocketAddr>,
    snapshot_interval_s: Option<u64>,
    snapshot_expires_s: Option<u64>,
}

#[derive(Subcommand)]
enum Cmd {
    /// A whole fleet on this machine with embedded brokers.
    Up {
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
    },
    /// Benchmarks with real processes or backlogs (footprint, latency, bridge-load, outbox);
    /// see BENCHMARKS.md. They print figures and one JSON line.
    Bench {
        #[command(subcommand)]
        kind: BenchCmd,
    },
    /// The fleet benchmark: N stores in this process, K rollouts, latency percentiles.
    Sim {
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
        /// The cloud broker: embedded (rumqttd in this process) or the path of a mosquitto
        /// binary to run as it.
        #[arg(long, default_value = "embedded")]
        cloud_broker: String,
        /// The most blocking threads of the process, which every store's git and file work
        /// shares (default: tokio's 512). A real store has its own process and cores.
        #[arg(long)]
        blocking_threads: Option<usize>,
        /// Directory for the stores' state (default: the system's temporary directory).
        /// All stores share its file system, where a real store has its own disk.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// A read-only Git server for the fleet (git://, fetch only): every bare repository
    /// directly under --base as /NAME. One pack per revision is built and cached for every
    /// store that fetches it, instead of two processes per fetch as with `git daemon`.
    GitServe {
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
    },
    #[command(about = BROKER_ABOUT, long_about = BROKER_LONG_ABOUT)]
    Broker {
        /// rumqttd TOML configuration (see broker-config/).
        #[arg(long)]
        config: PathBuf,
        /// Override the address of the first [v4.*] listener (in name order).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Run even if a listener on a non-loopback address has no TLS or no authentication.
        #[arg(long)]
        insecure: bool,
    },
    /// The store agent (`roost agent --config FILE`), or `roost agent rbac`.
    #[command(args_conflicts_with_subcommands = true)]
    Agent {
        /// Agent TOML configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        sub: Option<AgentCmd>,
        /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// The store bridge.
    Bridge {
        /// Bridge TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Generate an Ed25519 signing key pair.
    Keygen {
        /// Directory for KEYID.key and KEYID.pub.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Sign and publish a rollout.
    Rollout(RolloutArgs),
    /// The fleet as a table (source vs target).
    Status {
        /// Cloud broker HOST:PORT or mqtts://HOST:PORT (reads the retained documents).
        #[arg(long, env = "ROOST_BROKER", required_unless_present = "db")]
        broker: Option<String>,
        #[command(flatten)]
        security: BrokerSecurity,
        /// Read from a `roost fleet` database instead, and also report event gaps.
        #[arg(long)]
        db: Option<PathBuf>,
        /// Print JSON (full revisions, the stale verdict and its reason, the summary).
        #[arg(long)]
        json: bool,
        /// Seconds to collect retained messages.
        #[arg(long, default_value_t = 2)]
        wait: u64,
        /// Only stores in this group.
        #[arg(long)]
        group: Option<String>,
        /// Only cells in this phase as shown (`Stale` included).
        #[arg(long)]
        phase: Option<String>,
        /// Only stale stores (offline, silent past their heartbeat, or desired state not
        /// confirmed fresh).
        #[arg(long)]
        stale: bool,
        /// Only this deployment.
        #[arg(long)]
        deployment: Option<String>,
        /// Compare what two sets of stores run, per deployment (`group:canary fleet`):
        /// which deployments are "Updatable" from the first to the second.
        #[arg(long, num_args = 2, value_names = ["SOURCE", "TARGET"])]
        compare: Option<Vec<String>>,
        /// Redraw every N seconds (default 2) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// The cloud-side fleet record: status, events (deduplicated, gaps detected) and desired
    /// state, kept in SQLite; puts back retained desired state the cloud broker lost (checked on
    /// every connection).
    ///
    /// With `--repo` it is also the GitOps controller: it watches the fleet repository's
    /// `roost.yaml` and rolls each change out as signed rollouts, wave by wave.
    Fleet {
        /// `sync`: ask a running controller to look at the fleet repository now.
        #[command(subcommand)]
        action: Option<FleetAction>,
        /// Cloud broker HOST:PORT or mqtts://HOST:PORT.
        #[arg(long, env = "ROOST_BROKER")]
        broker: Option<String>,
        #[command(flatten)]
        security: BrokerSecurity,
        /// SQLite file.
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
        /// MQTT client id (a persistent session).
        #[arg(long, default_value = "roost-fleet")]
        client_id: String,
        /// The fleet repository (GitOps): its `--file` on `--branch` is the fleet's desired state.
        #[arg(long)]
        repo: Option<String>,
        /// Branch of the fleet repository.
        #[arg(long, default_value = "main")]
        branch: String,
        /// The fleet file in the repository.
        #[arg(long, default_value = "roost.yaml")]
        file: String,
        /// Signing key for the controller's rollouts (`roost keygen`).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Seconds between polls of the fleet repository and the tracked refs.
        #[arg(long, default_value_t = 30)]
        poll_interval: u64,
        /// Serve the dashboard (`/`), the API (`/api/v1/`, `schemas/openapi.yaml`), `POST
        /// /hooks/git` (a Git server's webhook) and `GET /plans` here.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// The bearer token (a file holding it) that allows plan actions (pause, resume,
        /// abort) over HTTP; without it the API is read-only.
        #[arg(long)]
        api_token_file: Option<PathBuf>,
        /// Seconds between signed fleet snapshots (`roost/v1/fleet/snapshot`; one also goes
        /// out right after desired state is published).
        #[arg(long, default_value_t = 300)]
        snapshot_interval: u64,
        /// Seconds a fleet snapshot stays valid (default: 3 × --snapshot-interval).
        #[arg(long)]
        snapshot_expires: Option<u64>,
        /// A TOML file with a `[gitops]` section (repo, branch, file, key, poll_interval_s,
        /// http, snapshot_interval_s, snapshot_expires_s), an `[api]` section (token_file)
        /// and `metrics_listen`; flags win.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (also served on `--http`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Promote all, the GitOps way: make `--to` run what `--from` runs, as a Git change to
    /// the fleet file (a new branch for a pull request, or `--direct` onto the branch).
    Promote {
        /// Deployment.
        deployment: String,
        /// Whose running revision: `group:NAME` or `store:NAME`.
        #[arg(long)]
        from: String,
        /// Who gets it: `fleet` or `store:NAME`.
        #[arg(long, default_value = "fleet")]
        to: String,
        /// The fleet repository (a path or URL that accepts a push).
        #[arg(long)]
        repo: String,
        /// Branch of the fleet repository.
        #[arg(long, default_value = "main")]
        branch: String,
        /// The fleet file.
        #[arg(long, default_value = "roost.yaml")]
        file: String,
        /// SQLite file of `roost fleet` (where the stores' status is).
        #[arg(long, default_value = "fleet.db")]
        db: PathBuf,
        /// Commit onto `--branch` instead of a new branch.
        #[arg(long)]
        direct: bool,
    },
    /// Rollout plans of the GitOps controller.
    Plan {
        #[command(subcommand)]
        action: PlanAction,
    },
    /// Follow the event stream.
    Events {
        /// Cloud broker HOST:PORT or mqtts://HOST:PORT.
        #[arg(long, env = "ROOST_BROKER")]
        broker: String,
        #[command(flatten)]
        security: BrokerSecurity,
        /// Only this store.
        #[arg(long)]
        store: Option<String>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
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
    /// An outbox backlog of N events: enqueue rate, drain rate to the edge broker, time until
    /// the cloud has all of them through a bridge.
    Outbox {
        /// Events in the backlog.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
    },
}

#[derive(Args)]
struct RolloutArgs {
    /// Broker HOST:PORT or mqtts://HOST:PORT.
    #[arg(long, env = "ROOST_BROKER")]
    broker: String,
    #[command(flatten)]
    security: BrokerSecurity,
    /// Private key file (from `roost keygen`); repeat to sign with several keys (one
    /// signature each), as an agent's `[thresholds]` may require.
    #[arg(long, required = true)]
    key: Vec<PathBuf>,
    /// Deployment name.
    #[arg(long)]
    deployment: String,
    /// For every store.
    #[arg(long, conflicts_with_all = ["group", "store"])]
    fleet: bool,
    /// For a group.
    #[arg(long)]
    group: Option<String>,
    /// For one store.
    #[arg(long)]
    store: Option<String>,
    /// Repository URL.
    #[arg(long, default_value = "")]
    repo: String,
    /// Commit, branch or tag (resolved to a commit).
    #[arg(long, default_value = "")]
    revision: String,
    /// Directory in the repository.
    #[arg(long, default_value = "")]
    path: String,
    /// Sequence (default: max(retained + 1, milliseconds since the epoch), the contract's rule).
    #[arg(long)]
    sequence: Option<u64>,
    /// Activate no earlier than this RFC 3339 time.
    #[arg(long)]
    not_before: Option<String>,
    /// Do not prune.
    #[arg(long)]
    no_prune: bool,
    /// Do not correct drift.
    #[arg(long)]
    no_self_heal: bool,
    /// Health timeout in seconds.
    #[arg(long, default_value_t = 300)]
    health_timeout: u64,
    /// Publish a tombstone.
    #[arg(long)]
    remove: bool,
    /// Follow the targeted stores after publishing: exit 0 only when every targeted online
    /// store converged on the revision, non-zero naming each store that rejected it, failed or
    /// timed out (offline stores are deferred, stores where another scope wins overridden).
    #[arg(long, conflicts_with = "remove")]
    wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 300, requires = "wait")]
    timeout: u64,
}

/// `roost agent` subcommands.
#[derive(Subcommand)]
enum AgentCmd {
    /// Print (YAML for `kubectl apply -f -`) exactly the RBAC the agent's Kubernetes policy
    /// needs: per allowed namespace a Role and RoleBinding for the allowed kinds, a
    /// ClusterRole for discovery and (only with allow_cluster_scoped) cluster-scoped kinds.
    Rbac {
        /// Agent TOML configuration (only its [target] is read).
        #[arg(long)]
        config: PathBuf,
        /// The agent's ServiceAccount (with --namespace).
        #[arg(long, requires = "namespace", conflicts_with = "user")]
        service_account: Option<String>,
        /// The ServiceAccount's namespace.
        #[arg(long, requires = "service_account")]
        namespace: Option<String>,
        /// The agent's user name (kubeconfig credentials) instead of a ServiceAccount.
        #[arg(long)]
        user: Option<String>,
        /// Name of the Roles, ClusterRole and bindings.
        #[arg(long, default_value = "roost-agent")]
        name: String,
        /// With no allowed_namespaces in the policy: grant the kinds in every namespace.
        #[arg(long)]
        cluster_wide: bool,
    },
}

fn init_tracing(format: LogFormat, cmd: &Cmd) {
    // Long-running services log their work; interactive commands only problems. The embedded
    // broker's own logs are wanted only when it is the command.
    let default = match cmd {
        Cmd::Agent { .. } | Cmd::Bridge { .. } | Cmd::Fleet { .. } => roost::process::SERVICE_LOG,
        Cmd::Broker { .. } => "warn,roost=info,rumqttd=warn",
        Cmd::GitServe { .. } => "warn,roost=info",
        _ => "warn,rumqttd=off",
    };
    roost::process::init_tracing(format, default);
}

/// Runs a command. Long-running ones (`up`, `broker`, `agent`, `bridge`, `fleet`, `events`)
/// stop cleanly when `cancel` fires and return Ok (`up --once` then says `Interrupted`); the
/// one-shot commands are abandoned with `Interrupted`.
async fn run(cli: Cli, cancel: CancellationToken) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Up {
            stores,
            cloud_listen,
            state_dir,
            target,
            once,
            timeout,
            http,
        } => {
            let opts = roost::up::UpOptions {
                stores,
                state_dir,
                cloud_listen,
                target,
                once,
                timeout: Duration::from_secs(timeout),
                http,
            };
            roost::up::run(opts, cancel.clone()).await?;
            // `--once` is a question ("does the fleet converge?"): a signal leaves it open.
            if once && cancel.is_cancelled() {
                return Err(Interrupted.into());
            }
        }
        Cmd::Bench { kind } => {
            use roost::bench;
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
                    BenchCmd::Outbox { events } => {
                        bench::outbox::run(&bench::outbox::OutboxOptions { events }).await?
                    }
                })
            })
            .await?;
            println!("{report}");
        }
        Cmd::Sim {
            stores,
            timeout,
            controller: true,
            ..
        } => {
            let report = interruptible(&cancel, async {
                Ok(roost::sim_controller::run(stores, Duration::from_secs(timeout)).await?)
            })
            .await?;
            roost::sim_controller::print(&report);
        }
        Cmd::Sim {
            stores,
            rollouts,
            timeout,
            topology,
            git_max_connections,
            git_server,
            cloud_broker,
            state_dir,
            json,
            ..
        } => {
            let cloud_mosquitto = match cloud_broker.as_str() {
                "embedded" => None,
                path => Some(PathBuf::from(path)),
            };
            let git_server = match git_server.as_str() {
                "roost" => roost::sim::GitServerKind::Roost,
                "daemon" => roost::sim::GitServerKind::Daemon,
                other => anyhow::bail!("--git-server {other}: roost or daemon"),
            };
            let topology = match topology.as_deref() {
                Some("direct") => roost::sim::Topology::Direct,
                Some("bridged") => roost::sim::Topology::Bridged,
                None if stores > 200 => roost::sim::Topology::Direct,
                None => roost::sim::Topology::Bridged,
                Some(other) => anyhow::bail!("--topology {other}: direct or bridged"),
            };
            let opts = roost::sim::SimOptions {
                stores,
                rollouts,
                timeout: Duration::from_secs(timeout),
                topology,
                git_max_connections,
                git_server,
                cloud_mosquitto,
                state_dir,
            };
            let report =
                interruptible(&cancel, async { Ok(roost::sim::run(opts.clone()).await?) }).await?;
            if json {
                println!("{}", roost::sim::json(&opts, &report));
            } else {
                roost::sim::print(&opts, &report);
            }
        }
        Cmd::GitServe {
            base,
            listen,
            cache_mib,
            insecure,
        } => {
            if !listen.ip().is_loopback() && !insecure {
                anyhow::bail!("--listen {listen} is not loopback: git:// has no TLS or authentication (pass --insecure to serve anyway)");
            }
            if !base.is_dir() {
                anyhow::bail!("--base {}: not a directory", base.display());
            }
            let server = roost::gitserve::GitServer::start(roost::gitserve::GitServeConfig {
                base,
                listen,
                cache_bytes: cache_mib << 20,
            })?;
            println!("git-serve: listening on git://{}/", server.addr);
            cancel.cancelled().await;
            server.stop();
        }
        Cmd::Broker {
            config,
            listen,
            insecure,
        } => {
            let cfg = roost::broker::load_config(&config, listen)?;
            roost::broker::check_config(&cfg, &config.display().to_string(), insecure)?;
            // rumqttd's `Broker::start()` never returns and has no shutdown API: run it on a
            // thread of its own and, on a signal, leave it there. Returning from `main` ends
            // the process and the broker with it; it holds nothing to flush (no persistence).
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("rumqttd".into())
                .spawn(move || {
                    let _ = tx.send(roost::broker::run_forever(cfg));
                })?;
            tokio::select! {
                r = rx => match r {
                    Ok(Ok(())) => anyhow::bail!("the broker stopped by itself"),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => anyhow::bail!("the broker thread died"),
                },
                _ = cancel.cancelled() => tracing::info!("broker stopped"),
            }
        }
        Cmd::Agent {
            sub:
                Some(AgentCmd::Rbac {
                    config,
                    service_account,
                    namespace,
                    user,
                    name,
                    cluster_wide,
                }),
            ..
        } => {
            use roost_agent::targets::rbac;
            let file = roost_agent::config::AgentFile::read(&config)?;
            let roost_agent::config::TargetConfig::Kubernetes(policy) = &file.target else {
                anyhow::bail!("{}: [target] kind is not \"kubernetes\"", config.display());
            };
            let subject = match (service_account, namespace, user) {
                (_, _, Some(name)) => rbac::Subject::User { name },
                (Some(name), Some(namespace), None) => {
                    rbac::Subject::ServiceAccount { name, namespace }
                }
                _ => rbac::Subject::ServiceAccount {
                    name: "roost-agent".into(),
                    namespace: "roost-system".into(),
                },
            };
            let opts = rbac::RbacOptions { name, cluster_wide };
            let objects = rbac::rbac_for(policy, &subject, &opts)?;
            print!(
                "{}",
                rbac::to_yaml(&rbac::header(policy, &subject), &objects)?
            );
        }
        Cmd::Agent {
            config,
            sub: None,
            metrics_listen,
        } => {
            let Some(config) = config else {
                anyhow::bail!("roost agent needs --config FILE (or a subcommand: rbac)");
            };
            roost::process::run_agent(config, metrics_listen, cancel).await?;
        }
        Cmd::Bridge {
            config,
            metrics_listen,
        } => {
            let mut cfg = roost_bridge::BridgeConfig::load(&config)?;
            if metrics_listen.is_some() {
                cfg.metrics_listen = metrics_listen;
            }
            roost_bridge::run(cfg, cancel).await?;
        }
        Cmd::Keygen { dir } => {
            let (id, public) = cloud::keygen(&dir)?;
            println!(
                "key id {id}\nprivate key {}\n",
                dir.join(format!("{id}.key")).display()
            );
            println!("# agent configuration:\n[[trusted_keys]]\nid = \"{id}\"\npublic_key = \"{public}\"");
        }
        Cmd::Rollout(a) => {
            let scope = match (a.fleet, a.group, a.store) {
                (true, None, None) => Scope::Fleet,
                (false, Some(g), None) => Scope::Group(g),
                (false, None, Some(s)) => Scope::Store(s),
                _ => anyhow::bail!("give exactly one of --fleet, --group NAME, --store NAME"),
            };
            let keys = a
                .key
                .iter()
                .map(|k| cloud::load_key(k))
                .collect::<Result<Vec<_>, _>>()?;
            let broker = a.security.target(&a.broker)?;
            let revision = if a.remove && a.revision.is_empty() {
                String::new()
            } else {
                let repo = a.repo.clone();
                let rev = a.revision.clone();
                interruptible(&cancel, async {
                    Ok(
                        tokio::task::spawn_blocking(move || cloud::resolve_revision(&repo, &rev))
                            .await??,
                    )
                })
                .await?
            };
            let spec = RolloutSpec {
                deployment: a.deployment,
                scope,
                url: a.repo,
                revision,
                path: a.path,
                policy: Policy {
                    prune: !a.no_prune,
                    self_heal: !a.no_self_heal,
                    health_timeout_s: a.health_timeout,
                },
                not_before: a.not_before,
                remove: a.remove,
                sequence: a.sequence,
                origin: None,
            };
            // Subscribed before publishing: a rejection is an event, and an event from before
            // the subscription is never seen.
            let watch = if a.wait {
                Some(
                    interruptible(&cancel, async {
                        Ok(cloud::RolloutWatch::start(&a.broker).await?)
                    })
                    .await?,
                )
            } else {
                None
            };
            let r = interruptible(&cancel, async {
                Ok(cloud::rollout(&broker, &Topics::default(), &keys, &spec).await?)
            })
            .await?;
            println!("{}", serde_json::to_string(&r)?);
            if let Some(watch) = watch {
                let target = cloud::WaitTarget::of(&r)?;
                let timeout = Duration::from_secs(a.timeout);
                let report =
                    interruptible(&cancel, async { Ok(watch.wait(&target, timeout).await?) })
                        .await?;
                for line in report.lines() {
                    println!("{line}");
                }
                if let Some(why) = report.failure() {
                    anyhow::bail!(why);
                }
            }
        }
        Cmd::Status {
            broker,
            security,
            db,
            json,
            wait,
            group,
            phase,
            stale,
            deployment,
            compare,
            watch,
        } => {
            let topics = Topics::default();
            let compare = compare
                .map(|c| -> anyhow::Result<(view::Selector, view::Selector)> {
                    let parse = |s: &str| s.parse::<view::Selector>().map_err(anyhow::Error::msg);
                    Ok((parse(&c[0])?, parse(&c[1])?))
                })
                .transpose()?;
            let filter = view::Filter {
                group,
                phase,
                stale,
                deployment,
                store: None,
            };
            let db = db.map(|d| roost::fleet::FleetDb::open(&d)).transpose()?;
            let broker = match (&db, broker) {
                (Some(_), _) => None,
                (None, Some(b)) => Some(security.target(&b)?),
                (None, None) => anyhow::bail!("give --broker or --db"),
            };
            loop {
                let inputs = match (&db, &broker) {
                    (Some(db), _) => view::load(db)?,
                    (None, Some(broker)) => {
                        let filters = vec![
                            topics.all_stores(roost_schemas::topics::StoreTopicKind::Status),
                            topics.all_stores(roost_schemas::topics::StoreTopicKind::Presence),
                        ];
                        let read = async {
                            Ok(
                                cloud::read_retained(broker, &filters, Duration::from_secs(wait))
                                    .await?,
                            )
                        };
                        view::from_retained(&topics, &interruptible(&cancel, read).await?)
                    }
                    (None, None) => anyhow::bail!("give --broker or --db"),
                };
                let v = view::build(&inputs, roost::fleet::now_ms());
                let text = match (&compare, json) {
                    (Some((a, b)), true) => {
                        serde_json::to_string_pretty(&view::compare(&v, a, b))? + "\n"
                    }
                    (Some((a, b)), false) => view::render_compare(a, b, &view::compare(&v, a, b)),
                    (None, true) => {
                        let rows = view::filter(&v, &filter);
                        serde_json::to_string_pretty(&serde_json::json!({
                            "generated_at": v.generated_at,
                            "summary": v.summary,
                            "stores": rows,
                        }))? + "\n"
                    }
                    (None, false) => {
                        view::render_summary(&v.summary) + &view::render(&view::filter(&v, &filter))
                    }
                };
                let Some(every) = watch else {
                    print!("{text}");
                    break;
                };
                // Redraw in place: home, the new text, clear what is left of the old one.
                print!("\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"));
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(every.max(1))) => {}
                }
            }
        }
        Cmd::Promote {
            deployment,
            from,
            to,
            repo,
            branch,
            file,
            db,
            direct,
        } => {
            let fdb = roost::fleet::FleetDb::open(&db)?;
            roost::gitops::store::migrate(&fdb)?;
            let work =
                std::env::temp_dir().join(format!("roost-promote-{:08x}", rand::random::<u32>()));
            let spec = roost::gitops::promote::PromoteSpec {
                deployment,
                from,
                to,
                repo,
                branch,
                file,
                direct,
            };
            let res = roost::gitops::promote::promote(&fdb, &spec, &work);
            let _ = std::fs::remove_dir_all(&work);
            let p = res?;
            println!(
                "promoted {} {} from {} to {}: commit {} on branch {}{}",
                spec.deployment,
                &p.revision[..12],
                spec.from,
                spec.to,
                &p.commit[..12],
                p.branch,
                if spec.direct {
                    ""
                } else {
                    " (open a pull request from it)"
                }
            );
        }
        Cmd::Plan { action } => {
            let (db, deployment, verb) = match action {
                PlanAction::Status { deployment, db } => {
                    let fdb = roost::fleet::FleetDb::open(&db)?;
                    roost::gitops::store::migrate(&fdb)?;
                    print!(
                        "{}",
                        roost::gitops::plan_status_text(&fdb, deployment.as_deref())?
                    );
                    return Ok(());
                }
                PlanAction::Pause { deployment, db } => (db, deployment, "pause"),
                PlanAction::Resume { deployment, db } => (db, deployment, "resume"),
                PlanAction::Abort { deployment, db } => (db, deployment, "abort"),
            };
            let fdb = roost::fleet::FleetDb::open(&db)?;
            roost::gitops::store::migrate(&fdb)?;
            let known =
                fdb.with_conn(|c| Ok(roost::gitops::store::plans(c)?.contains_key(&deployment)))?;
            if !known {
                anyhow::bail!("no plan for deployment {deployment} in {}", db.display());
            }
            fdb.with_conn(|c| roost::gitops::store::request(c, Some(&deployment), verb))?;
            println!("{verb} requested for {deployment}");
        }
        Cmd::Fleet {
            action: Some(FleetAction::Sync { db, wait, timeout }),
            ..
        } => {
            let fdb = roost::fleet::FleetDb::open(&db)?;
            roost::gitops::store::migrate(&fdb)?;
            let since = roost::fleet::now_ms();
            fdb.with_conn(|c| roost::gitops::store::request(c, None, "sync"))?;
            println!("sync requested");
            if wait {
                let w = interruptible(&cancel, async {
                    Ok(
                        roost::gitops::wait_for_sync(&fdb, since, Duration::from_secs(timeout))
                            .await?,
                    )
                })
                .await?;
                for l in &w.lines {
                    println!("{l}");
                }
                if !w.ok {
                    anyhow::bail!("the fleet did not roll out cleanly");
                }
            }
        }
        Cmd::Fleet {
            action: None,
            broker,
            security,
            db,
            client_id,
            repo,
            branch,
            file,
            key,
            poll_interval,
            http,
            api_token_file,
            snapshot_interval,
            snapshot_expires,
            config,
            metrics_listen,
        } => {
            let cfg: FleetConfigFile = match &config {
                Some(p) => toml::from_str(&std::fs::read_to_string(p)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                None => FleetConfigFile::default(),
            };
            let g = cfg.gitops;
            let broker = broker.ok_or_else(|| anyhow::anyhow!("--broker is required"))?;
            let target = security.target(&broker)?;
            let (host, port) = (target.host.clone(), target.port);
            let fdb = roost::fleet::FleetDb::open(&db)?;
            let metrics_listen = metrics_listen.or(cfg.metrics_listen);
            let exporter = match (metrics_listen, http.or(g.http)) {
                (None, None) => None,
                _ => Some(roost::fleet_metrics::FleetMetrics::exporter(fdb.clone())?),
            };
            let metrics_server = match (metrics_listen, &exporter) {
                (Some(addr), Some(e)) => Some(
                    roost_runtime::metrics::serve(addr, e.clone(), cancel.child_token())
                        .await?
                        .1,
                ),
                _ => None,
            };
            // Checked before anything starts: a bad token file is a bad configuration.
            let token = api_token_file
                .or(cfg.api.token_file)
                .map(|p| roost::api::ApiOptions::token_from_file(&p))
                .transpose()?;
            if let Some(addr) = http.or(g.http) {
                let api = roost::api::Api::new(
                    fdb.clone(),
                    roost::api::ApiOptions {
                        token,
                        ..Default::default()
                    },
                    cancel.clone(),
                )?;
                let router = match &exporter {
                    Some(e) => api.router().merge(e.router()),
                    None => api.router(),
                };
                let bound = roost::api::serve(addr, router, cancel.clone()).await?;
                println!("roost fleet: dashboard http://{bound}/  API http://{bound}/api/v1/");
            }
            let repo = repo.or(g.repo);
            let controller = match repo {
                Some(repo) => {
                    let key = key.or(g.key).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--key is required with --repo (the controller signs rollouts)"
                        )
                    })?;
                    let key = cloud::load_key(&key)?;
                    let snapshot_interval_s = if snapshot_interval != 300 {
                        snapshot_interval
                    } else {
                        g.snapshot_interval_s.unwrap_or(snapshot_interval)
                    };
                    if snapshot_interval_s == 0 {
                        anyhow::bail!("--snapshot-interval: at least 1 second");
                    }
                    let snapshot_expires_s = snapshot_expires
                        .or(g.snapshot_expires_s)
                        .unwrap_or(snapshot_interval_s.saturating_mul(3));
                    if snapshot_expires_s < snapshot_interval_s {
                        anyhow::bail!(
                            "--snapshot-expires: at least --snapshot-interval ({snapshot_interval_s} s), or every store's snapshot expires between two"
                        );
                    }
                    let opts = roost::gitops::GitopsOptions {
                        repo,
                        branch: if branch != "main" {
                            branch
                        } else {
                            g.branch.unwrap_or(branch)
                        },
                        file: if file != "roost.yaml" {
                            file
                        } else {
                            g.file.unwrap_or(file)
                        },
                        poll: Duration::from_secs(
                            if poll_interval != 30 {
                                poll_interval
                            } else {
                                g.poll_interval_s.unwrap_or(poll_interval)
                            }
                            .max(1),
                        ),
                        host: host.clone(),
                        port,
                        security: target.security.clone(),
                        cache_dir: db.with_extension("git"),
                        // Served above, with the token.
                        http: None,
                        snapshot_interval: Duration::from_secs(snapshot_interval_s),
                        snapshot_expiry: Duration::from_secs(snapshot_expires_s),
                        metrics: None,
                    };
                    Some(tokio::spawn(roost::gitops::run(
                        opts,
                        fdb.clone(),
                        key,
                        cancel.clone(),
                    )))
                }
                None => None,
            };
            roost::fleet::run(
                roost::fleet::FleetOptions {
                    host,
                    port,
                    db,
                    client_id,
                    security: target.security.clone(),
                },
                fdb,
                cancel,
            )
            .await?;
            if let Some(c) = controller {
                c.await??;
            }
            if let Some(server) = metrics_server {
                let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
            }
        }
        Cmd::Events {
            broker,
            security,
            store,
            count,
        } => {
            use rumqttc::{Event, Packet, QoS};
            let topics = Topics::default();
            let filter = match &store {
                Some(s) => topics.events(s),
                None => topics.all_stores(roost_schemas::topics::StoreTopicKind::Events),
            };
            let broker = security.target(&broker)?;
            let (client, mut ev) = cloud::connect(&broker, "roost-events")?;
            let mut seen = 0usize;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    e = ev.poll() => match e {
                        // A clean session: subscribe again on every connection.
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            tracing::info!(%filter, "following events");
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            println!("{}", String::from_utf8_lossy(&p.payload));
                            seen += 1;
                            if count.is_some_and(|c| seen >= c) { break; }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // A TLS or auth problem says what is wrong; retried all the same.
                            eprintln!("roost events: {}; reconnecting", broker.error(&e));
                            tokio::select! {
                                _ = cancel.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
            let _ = client.try_disconnect();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.cmd);
    // A store's agent is a tiny service on a node shared with the workloads: one runtime
    // thread. Everything else (brokers, the bridge, which carries the store's traffic, the
    // fleet, benchmarks) gets a worker per core.
    let tiny = matches!(cli.cmd, Cmd::Agent { .. });
    let max_blocking = match &cli.cmd {
        Cmd::Sim {
            blocking_threads, ..
        } => *blocking_threads,
        _ => None,
    };
    roost::process::main(tiny, max_blocking, |cancel| run(cli, cancel))
}
