//! `roost fleet`: the cloud-side fleet record and, with a fleet repository, the GitOps
//! controller; `roost fleet sync` asks a running controller to look at the repository now.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_fleet::db::{self, FleetDb, Request};
use roost_fleet::{api, cloud, gitops, metrics, record};
use roost_runtime::process::interruptible;
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

const DEFAULT_BRANCH: &str = "main";
const DEFAULT_FILE: &str = "roost.yaml";
const DEFAULT_POLL_S: u64 = 30;
const DEFAULT_SNAPSHOT_S: u64 = 300;

/// Arguments of `roost fleet`.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// `sync`: ask a running controller to look at the fleet repository now.
    #[command(subcommand)]
    action: Option<FleetAction>,
    /// Cloud broker HOST:PORT or mqtts://HOST:PORT; several comma-separated (a cluster's
    /// nodes: the next is tried when one fails or is lost).
    #[arg(long, env = "ROOST_BROKER")]
    broker: Option<String>,
    /// Seconds between audits of the cloud broker's retained desired state against the
    /// record (one also runs after every connection) [default: 60].
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    audit_interval: u64,
    /// Do not publish end-to-end confirmations (`roost/v1/stores/{store}/confirmed`): the
    /// stores' bridges then delete events at the broker's PUBACK.
    #[arg(long)]
    no_confirm: bool,
    #[command(flatten)]
    security: BrokerSecurity,
    /// The fleet database: a SQLite file, or `postgres://USER@HOST:PORT/DB` (several
    /// `roost fleet` processes may share one: one leads, the others stand by).
    #[arg(long, default_value = "fleet.db")]
    db: PathBuf,
    /// Where the controller caches fetched repositories [default: the SQLite file's name
    /// with `.git`; with PostgreSQL `roost-fleet.git` in the working directory].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// MQTT client id (a persistent session).
    #[arg(long, default_value = "roost-fleet")]
    client_id: String,
    /// The fleet repository (GitOps): its `--file` on `--branch` is the fleet's desired state.
    #[arg(long)]
    repo: Option<String>,
    /// Branch of the fleet repository [default: main].
    #[arg(long)]
    branch: Option<String>,
    /// The fleet file in the repository [default: roost.yaml].
    #[arg(long)]
    file: Option<String>,
    /// Signing key for the controller's rollouts (`roost keygen`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Seconds between polls of the fleet repository and the tracked refs [default: 30].
    #[arg(long)]
    poll_interval: Option<u64>,
    /// Serve the dashboard (`/`), the API (`/api/v1/`, `schemas/openapi.yaml`), `POST
    /// /hooks/git` (a Git server's webhook) and `GET /plans` here.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The bearer token (a file holding it) that allows plan actions (pause, resume,
    /// abort) over HTTP; without it the API is read-only.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Seconds between signed fleet snapshots (`roost/v1/fleet/snapshot`; one also goes
    /// out right after desired state is published) [default: 300].
    #[arg(long)]
    snapshot_interval: Option<u64>,
    /// Seconds a fleet snapshot stays valid (default: 3 × --snapshot-interval).
    #[arg(long)]
    snapshot_expires: Option<u64>,
    /// A TOML file with a `[gitops]` section (repo, branch, file, key, poll_interval_s,
    /// http, snapshot_interval_s, snapshot_expires_s), an `[api]` section (token_file)
    /// `metrics_listen` and `notify` (the `--notify` file); flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (also served on `--http`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Notification sinks (a TOML file: webhooks signed with HMAC-SHA256, Slack, commit
    /// statuses; docs/notifications.md), delivered by the leader.
    #[arg(long, value_name = "FILE")]
    notify: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum FleetAction {
    /// Ask the running controller (same `--db`) to look at the fleet repository now.
    Sync {
        /// The fleet database of the running `roost fleet` (a SQLite file or a
        /// `postgres://` URL).
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

/// `roost fleet --config FILE`.
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
    /// The notification sinks' file (`--notify`).
    #[serde(default)]
    notify: Option<PathBuf>,
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

impl FleetConfigFile {
    fn read(path: &Path) -> anyhow::Result<FleetConfigFile> {
        toml::from_str(&std::fs::read_to_string(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// The controller's settings: a flag given on the command line wins over the configuration
/// file, which wins over the default.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    repo: Option<String>,
    branch: String,
    file: String,
    key: Option<PathBuf>,
    poll_interval_s: u64,
    http: Option<SocketAddr>,
    snapshot_interval_s: u64,
    snapshot_expires_s: u64,
    metrics_listen: Option<SocketAddr>,
    api_token_file: Option<PathBuf>,
    notify: Option<PathBuf>,
}

/// Merges the flags with the configuration file: one rule, flag → file → default, for every
/// setting (an explicit flag equal to the default still wins over the file).
fn settings(a: &FleetArgs, cfg: FleetConfigFile) -> anyhow::Result<Settings> {
    let g = cfg.gitops;
    let snapshot_interval_s = a
        .snapshot_interval
        .or(g.snapshot_interval_s)
        .unwrap_or(DEFAULT_SNAPSHOT_S);
    if snapshot_interval_s == 0 {
        anyhow::bail!("--snapshot-interval: at least 1 second");
    }
    let snapshot_expires_s = a
        .snapshot_expires
        .or(g.snapshot_expires_s)
        .unwrap_or(snapshot_interval_s.saturating_mul(3));
    if snapshot_expires_s < snapshot_interval_s {
        anyhow::bail!(
            "--snapshot-expires: at least --snapshot-interval ({snapshot_interval_s} s), or every store's snapshot expires between two"
        );
    }
    Ok(Settings {
        repo: a.repo.clone().or(g.repo),
        branch: a
            .branch
            .clone()
            .or(g.branch)
            .unwrap_or_else(|| DEFAULT_BRANCH.into()),
        file: a
            .file
            .clone()
            .or(g.file)
            .unwrap_or_else(|| DEFAULT_FILE.into()),
        key: a.key.clone().or(g.key),
        poll_interval_s: a
            .poll_interval
            .or(g.poll_interval_s)
            .unwrap_or(DEFAULT_POLL_S)
            .max(1),
        http: a.http.or(g.http),
        snapshot_interval_s,
        snapshot_expires_s,
        metrics_listen: a.metrics_listen.or(cfg.metrics_listen),
        api_token_file: a.api_token_file.clone().or(cfg.api.token_file),
        notify: a.notify.clone().or(cfg.notify),
    })
}

pub async fn run(a: FleetArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    if let Some(FleetAction::Sync { db, wait, timeout }) = a.action {
        return sync(&db, wait, timeout, cancel).await;
    }
    let cfg = match &a.config {
        Some(p) => FleetConfigFile::read(p)?,
        None => FleetConfigFile::default(),
    };
    let s = settings(&a, cfg)?;
    let broker = a
        .broker
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--broker is required"))?;
    let target = a.security.target(&broker)?;
    let (host, port) = (target.host.clone(), target.port);
    // Checked whole before anything starts (secrets and tokens read from their files).
    let notify = s
        .notify
        .as_deref()
        .map(roost_fleet::notify::NotifyConfig::read)
        .transpose()?;
    let fdb = FleetDb::open_blocking(&a.db).await?;
    // Several instances on one PostgreSQL database: one leads (controller, publishing),
    // every one records and serves; on SQLite this process is the only one.
    let leadership = match fdb.postgres_url() {
        Some(url) => roost_fleet::leadership::Leadership::start(
            url,
            roost_fleet::leadership::LeaseTimes::default(),
            cancel.child_token(),
        ),
        None => roost_fleet::leadership::Leadership::solo(),
    };
    let exporter = match (s.metrics_listen, s.http) {
        (None, None) => None,
        _ => Some(metrics::FleetMetrics::exporter(fdb.clone())),
    };
    let metrics_server = match (s.metrics_listen, &exporter) {
        (Some(addr), Some(e)) => Some(
            roost_runtime::metrics::serve(addr, e.clone(), cancel.child_token())
                .await?
                .1,
        ),
        _ => None,
    };
    // Checked before anything starts: a bad token file is a bad configuration.
    let token = s
        .api_token_file
        .as_deref()
        .map(api::ApiOptions::token_from_file)
        .transpose()?;
    // Plan actions and webhook syncs from the API reach the controller of this process at
    // once, over its channel.
    let (handle, inbox) = if s.repo.is_some() && s.http.is_some() {
        let (h, i) = gitops::ControllerHandle::channel();
        (Some(h), Some(i))
    } else {
        (None, None)
    };
    if let Some(addr) = s.http {
        let api = api::Api::new(
            fdb.clone(),
            api::ApiOptions {
                token,
                controller: handle,
                ..Default::default()
            },
            cancel.clone(),
        )?;
        let router = match &exporter {
            Some(e) => api.router().merge(e.router()),
            None => api.router(),
        };
        let bound = api::serve(addr, router, cancel.clone()).await?;
        println!("roost fleet: dashboard http://{bound}/  API http://{bound}/api/v1/");
    }
    let controller = match s.repo {
        Some(repo) => {
            let key = s.key.ok_or_else(|| {
                anyhow::anyhow!("--key is required with --repo (the controller signs rollouts)")
            })?;
            let key = cloud::load_key(&key)?;
            let opts = gitops::GitopsOptions {
                repo,
                branch: s.branch,
                file: s.file,
                poll: Duration::from_secs(s.poll_interval_s),
                host: host.clone(),
                port,
                fallbacks: target.fallbacks.clone(),
                security: target.security.clone(),
                cache_dir: a.cache_dir.clone().unwrap_or_else(|| {
                    if fdb.postgres_url().is_some() {
                        PathBuf::from("roost-fleet.git")
                    } else {
                        a.db.with_extension("git")
                    }
                }),
                snapshot_interval: Duration::from_secs(s.snapshot_interval_s),
                snapshot_expiry: Duration::from_secs(s.snapshot_expires_s),
            };
            Some(tokio::spawn(gitops::run_led(
                opts,
                fdb.clone(),
                key,
                inbox,
                leadership.clone(),
                cancel.clone(),
            )))
        }
        None => None,
    };
    let notifier = notify.map(|cfg| {
        tokio::spawn(roost_fleet::notify::deliver::run(
            cfg,
            fdb.clone(),
            leadership.clone(),
            Duration::from_secs(1),
            cancel.clone(),
        ))
    });
    record::run(
        record::FleetOptions {
            host,
            port,
            db: a.db,
            client_id: a.client_id,
            security: target.security.clone(),
            fallbacks: target.fallbacks.clone(),
            audit_interval: Duration::from_secs(a.audit_interval),
            confirm: !a.no_confirm,
            leadership,
        },
        fdb,
        cancel,
    )
    .await?;
    if let Some(c) = controller {
        c.await??;
    }
    if let Some(n) = notifier {
        n.await??;
    }
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    Ok(())
}

async fn sync(
    db: &Path,
    wait: bool,
    timeout: u64,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let fdb = FleetDb::open_blocking(db).await?;
    let since = db::now_ms();
    fdb.call(|db| db.request(&Request::Sync)).await?;
    println!("sync requested");
    if wait {
        let w = interruptible(&cancel, async {
            Ok(gitops::wait_for_sync(&fdb, since, Duration::from_secs(timeout)).await?)
        })
        .await?;
        for l in &w.lines {
            println!("{l}");
        }
        if !w.ok {
            anyhow::bail!("the fleet did not roll out cleanly");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn args(flags: &[&str]) -> FleetArgs {
        let argv = ["fleet", "--broker", "127.0.0.1:1883"].iter().chain(flags);
        Cli::try_parse_from(argv).expect("flags").fleet
    }

    fn file(toml: &str) -> FleetConfigFile {
        toml::from_str(toml).expect("config")
    }

    const CONFIG: &str = r#"
        metrics_listen = "127.0.0.1:9100"
        notify = "/etc/roost/notify.toml"
        [gitops]
        repo = "git://h/fleet"
        branch = "production"
        file = "fleet/roost.yaml"
        key = "/etc/roost/config.key"
        poll_interval_s = 10
        snapshot_interval_s = 60
        [api]
        token_file = "/etc/roost/config-token"
    "#;

    #[test]
    fn an_explicit_flag_wins_even_when_it_equals_the_default() {
        let a = args(&[
            "--branch",
            "main",
            "--file",
            "roost.yaml",
            "--poll-interval",
            "30",
            "--snapshot-interval",
            "300",
            "--repo",
            "git://h/other",
            "--key",
            "/k",
            "--api-token-file",
            "/t",
        ]);
        let s = settings(&a, file(CONFIG)).expect("settings");
        assert_eq!(s.branch, "main");
        assert_eq!(s.file, "roost.yaml");
        assert_eq!(s.poll_interval_s, 30);
        assert_eq!(s.snapshot_interval_s, 300);
        assert_eq!(s.snapshot_expires_s, 900);
        assert_eq!(s.repo.as_deref(), Some("git://h/other"));
        assert_eq!(s.key, Some(PathBuf::from("/k")));
        assert_eq!(s.api_token_file, Some(PathBuf::from("/t")));
    }

    #[test]
    fn the_file_fills_what_no_flag_gives_and_defaults_the_rest() {
        let s = settings(&args(&[]), file(CONFIG)).expect("settings");
        assert_eq!(s.branch, "production");
        assert_eq!(s.file, "fleet/roost.yaml");
        assert_eq!(s.poll_interval_s, 10);
        assert_eq!(s.snapshot_interval_s, 60);
        assert_eq!(s.snapshot_expires_s, 180);
        assert_eq!(s.metrics_listen, "127.0.0.1:9100".parse().ok());
        assert_eq!(
            s.api_token_file,
            Some(PathBuf::from("/etc/roost/config-token"))
        );
        assert_eq!(s.notify, Some(PathBuf::from("/etc/roost/notify.toml")));
        let d = settings(&args(&[]), FleetConfigFile::default()).expect("defaults");
        assert_eq!(
            (
                d.branch.as_str(),
                d.file.as_str(),
                d.poll_interval_s,
                d.snapshot_interval_s
            ),
            ("main", "roost.yaml", 30, 300)
        );
        assert_eq!(d.repo, None);
    }

    #[test]
    fn snapshot_settings_are_checked() {
        assert!(settings(
            &args(&["--snapshot-interval", "0"]),
            FleetConfigFile::default()
        )
        .is_err());
        assert!(settings(
            &args(&["--snapshot-interval", "60", "--snapshot-expires", "30"]),
            FleetConfigFile::default()
        )
        .is_err());
    }
}
