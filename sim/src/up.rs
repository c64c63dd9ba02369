//! `roost up`: a whole fleet on one machine — a cloud broker, and per store an edge broker,
//! a bridge and an agent — with an app repository and a fleet repository (`roost.yaml`:
//! canary, 50 % and fleet waves) served by `git daemon` on loopback, a fresh signing key, and
//! the GitOps controller rolling the fleet file out; then the fleet's convergence, live. Edit
//! a manifest or `roost.yaml`, `git commit`, and the waves roll.

use roost_schemas::ShortRev;
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use roost_agent::config::{AgentFile, GitConfig, Limits, TargetConfig, TrustedKey};
use roost_agent::AgentConfig;
use roost_bridge::BridgeConfig;
use roost_schemas::{Phase, SigningKey, StatusDoc, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use roost_fleet::cloud;

/// A boxed error from one of the many components a one-machine fleet starts.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of `roost up` and `roost sim`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// The options (or this machine's limits) do not allow the run; the message says what
    /// to change.
    #[error("{0}")]
    Invalid(String),
    /// A step of setting the fleet up failed.
    #[error("{what}")]
    Setup {
        /// The step.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: BoxError,
    },
    /// The fleet did not converge in time.
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    /// A component failed.
    #[error("{0}")]
    Failed(String),
}

/// Maps an error of the step `what` to [`UpError::Setup`], keeping it as the source.
pub(crate) fn setup<E: Into<BoxError>>(what: &'static str) -> impl Fn(E) -> UpError {
    move |e| UpError::Setup {
        what,
        source: e.into(),
    }
}

/// Options of `roost up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of stores.
    pub stores: usize,
    /// State directory (default: a new temporary directory).
    pub state_dir: Option<PathBuf>,
    /// Cloud broker listen address (default: a free loopback port).
    pub cloud_listen: Option<SocketAddr>,
    /// `files` (default) or `kubernetes`.
    pub target: String,
    /// Exit after convergence.
    pub once: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Dashboard and API listen address (default: a free loopback port).
    pub http: Option<SocketAddr>,
}

/// A sample repository with two revisions of the demo deployment.
#[derive(Debug, Clone)]
pub struct SampleRepo {
    /// Working repository (non-bare) path.
    pub path: PathBuf,
    /// First commit.
    pub first: String,
}

/// The demo app's files (path → content).
pub const MANIFESTS: &[(&str, &str)] = &[
    (
        "apps/kitchen-display/namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kitchen\n",
    ),
    (
        "apps/kitchen-display/configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kitchen-display\ndata:\n  menu: \"breakfast\"\n  refresh_seconds: \"30\"\n  # Each store's own values, from the fleet repository's stores/ (policy.substitute).\n  store: ${roost.store}\n  store_number: ${roost.vars.store_number:=none}\n",
    ),
    (
        "apps/kitchen-display/deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: kitchen-display\n  labels:\n    app: kitchen-display\nspec:\n  replicas: 0\n  selector:\n    matchLabels:\n      app: kitchen-display\n  template:\n    metadata:\n      labels:\n        app: kitchen-display\n    spec:\n      containers:\n        - name: display\n          image: registry.example/kitchen-display:1.0.0\n          ports:\n            - containerPort: 8080\n",
    ),
    (
        "apps/kitchen-display/service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: kitchen-display\nspec:\n  selector:\n    app: kitchen-display\n  ports:\n    - port: 80\n      targetPort: 8080\n",
    ),
];

/// Creates a Git repository with the demo manifests and returns its first commit.
pub fn create_sample_repo(dir: &Path) -> Result<SampleRepo, UpError> {
    let repo = git2::Repository::init(dir).map_err(setup("git init"))?;
    let mut files = BTreeMap::new();
    for (p, c) in MANIFESTS {
        files.insert((*p).to_owned(), (*c).to_owned());
    }
    let first = commit_files(&repo, &files, "kitchen-display 1.0.0")?;
    Ok(SampleRepo {
        path: dir.to_owned(),
        first,
    })
}

/// Commits exactly `files` (path → content) as the new tree of HEAD; returns the commit id.
pub fn commit_files(
    repo: &git2::Repository,
    files: &BTreeMap<String, String>,
    message: &str,
) -> Result<String, UpError> {
    roost_fleet::git::commit_files(repo, files, message).map_err(setup("commit"))
}

/// A `git daemon` serving a directory on a free loopback port; killed on drop.
pub struct GitDaemon {
    child: std::process::Child,
    /// Port.
    pub port: u16,
}

impl GitDaemon {
    /// Serves every repository under `base` read-only at `git://127.0.0.1:PORT/NAME`, with
    /// no limit on concurrent fetches.
    pub fn start(base: &Path) -> Result<GitDaemon, UpError> {
        Self::start_limited(base, 0)
    }

    /// Like [`GitDaemon::start`], with git-daemon's `--max-connections` (0: unlimited).
    ///
    /// git-daemon's own default is 32, and what it does beyond the limit is costly for a
    /// fleet: it SIGTERMs a running fetch from an address that has two, sleeps a second in
    /// its accept loop, and drops the new connection if still over. Every store here comes
    /// from 127.0.0.1, so a fleet-wide rollout turned into killed fetches and retries (the
    /// `git_fetch` share of `roost sim`'s breakdown).
    pub fn start_limited(base: &Path, max_connections: u32) -> Result<GitDaemon, UpError> {
        let port = roost_broker::free_port().map_err(setup("port"))?;
        // Run git-daemon itself, not the `git daemon` wrapper: killing the wrapper would
        // leave the daemon running as an orphan.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("git-daemon"))
            .filter(|p| p.exists());
        let mut cmd = match &exec_path {
            Some(p) => std::process::Command::new(p),
            None => {
                let mut c = std::process::Command::new("git");
                c.arg("daemon");
                c
            }
        };
        let child = cmd
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg(format!("--max-connections={max_connections}"))
            .arg(format!("--base-path={}", base.display()))
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(base)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(setup("git daemon (is git installed?)"))?;
        roost_broker::wait_listening(([127, 0, 0, 1], port).into(), Duration::from_secs(10))
            .map_err(setup("git daemon"))?;
        Ok(GitDaemon { child, port })
    }

    /// URL of a repository under the base directory.
    pub fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one in-process store is made of.
#[derive(Debug, Clone)]
pub struct StoreSpec {
    /// Store name.
    pub store: String,
    /// Groups in precedence order.
    pub groups: Vec<String>,
    /// State directory of the store (agent/ and bridge/ below it).
    pub dir: PathBuf,
    /// Edge broker.
    pub edge: SocketAddr,
    /// Cloud broker.
    pub cloud: SocketAddr,
    /// Allowed source URL prefix.
    pub allowed: String,
    /// Target.
    pub target: TargetConfig,
}

/// Agent and bridge configuration for an in-process store trusting `key`.
pub fn store_configs(
    spec: &StoreSpec,
    key: &SigningKey,
) -> Result<(AgentConfig, BridgeConfig), UpError> {
    use base64::Engine as _;
    let StoreSpec {
        store,
        groups,
        dir,
        edge,
        cloud,
        allowed,
        target,
    } = spec.clone();
    let (store, groups, dir, edge, cloud) = (
        store.as_str(),
        groups.as_slice(),
        dir.as_path(),
        edge,
        cloud,
    );
    let file = AgentFile {
        store: store.to_owned(),
        groups: groups.to_vec(),
        topic_prefix: None,
        state_dir: dir.join("agent"),
        broker: roost_runtime::Endpoint::local(edge, 5),
        trusted_keys: vec![TrustedKey {
            id: key.key_id(),
            public_key: base64::engine::general_purpose::STANDARD.encode(key.public_key()),
            not_after: None,
        }],
        revoked_keys: vec![],
        thresholds: Default::default(),
        git: GitConfig {
            allowed_sources: vec![allowed],
            credentials: vec![],
            fetch_timeout_s: Some(30),
            ca_file: None,
        },
        target,
        limits: Limits::default(),
        secrets: Default::default(),
        drift_interval_s: None,
        outbox_max_mib: None,
        retry_ms: Some((500, 10_000)),
        status_heartbeat_s: None,
        confirm_via_bridge: None,
        metrics_listen: None,
    };
    let agent = AgentConfig::from_file(file).map_err(setup("agent config"))?;
    let endpoint = |a: SocketAddr| roost_runtime::Endpoint::local(a, 5);
    let bridge = BridgeConfig {
        store: store.to_owned(),
        groups: groups.to_vec(),
        topic_prefix: None,
        state_dir: dir.join("bridge"),
        edge: endpoint(edge),
        cloud: endpoint(cloud),
        outbox_max_mib: None,
        metrics_listen: None,
    };
    bridge.validate().map_err(setup("bridge config"))?;
    Ok((agent, bridge))
}

/// Store name of the i-th store (from 1).
pub fn store_name(i: usize) -> String {
    format!("store-{i:04}")
}

/// Groups of the i-th store: `store-0001` is the canary; all are in `all`.
pub fn store_groups(i: usize) -> Vec<String> {
    if i == 1 {
        vec!["canary".into(), "all".into()]
    } else {
        vec!["all".into()]
    }
}

/// Runs `roost up`.
pub async fn run(opts: UpOptions, cancel: CancellationToken) -> Result<(), UpError> {
    if opts.stores == 0 {
        return Err(UpError::Invalid("--stores must be at least 1".into()));
    }
    let target = match opts.target.as_str() {
        "files" => TargetConfig::Files(Default::default()),
        "kubernetes" => TargetConfig::Kubernetes(Default::default()),
        other => {
            return Err(UpError::Invalid(format!(
                "unknown --target {other:?} (files|kubernetes)"
            )))
        }
    };
    let (_tmp, state_dir) = match &opts.state_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile_dir()?;
            let p = t.clone();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&state_dir).map_err(setup("state dir"))?;
    let cloud_addr = match opts.cloud_listen {
        Some(a) => roost_broker::spawn(
            roost_broker::builtin_config("cloud", a).map_err(setup("cloud broker"))?,
        )
        .map_err(setup("cloud broker"))?,
        None => roost_broker::spawn_free("cloud").map_err(setup("cloud broker"))?,
    };
    let cloud = cloud_addr.to_string();
    let repos = state_dir.join("repos");
    let repo = create_sample_repo(&repos.join("apps"))?;
    let daemon = GitDaemon::start(&repos)?;
    let url = daemon.url("apps");
    let fleet_repo_dir = repos.join("fleet");
    let fleet_repo = git2::Repository::init(&fleet_repo_dir).map_err(setup("git init"))?;
    let mut fleet_files = BTreeMap::new();
    fleet_files.insert("roost.yaml".to_owned(), sample_fleet_file(&url));
    fleet_files.insert(
        "stores/stores.yaml".to_owned(),
        sample_inventory(opts.stores),
    );
    commit_files(
        &fleet_repo,
        &fleet_files,
        "the fleet: kitchen-display in three waves to the stores of the inventory",
    )?;
    let fleet_url = daemon.url("fleet");
    let key_dir = state_dir.join("keys");
    let (key_id, _) = cloud::keygen(&key_dir).map_err(setup("keygen"))?;
    let key = cloud::load_key(&key_dir.join(format!("{key_id}.key"))).map_err(setup("key"))?;
    println!(
        "roost up: cloud broker mqtt://{cloud}  fleet repository {fleet_url}  apps {url}  keys {}",
        key_dir.display()
    );
    let allowed = format!("git://127.0.0.1:{}/", daemon.port);
    let topics = Topics::default();
    // The watcher subscribes (SUBACK received) before anything publishes: events are not
    // retained, so a watcher that subscribed later would miss the canary's first ones.
    let watcher = Watcher::subscribe(&cloud, &topics).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let child = cancel.child_token();
    // The cloud-side fleet record (events deduplicated, gaps detected, desired state kept).
    let fleet_db_path = state_dir.join("fleet.db");
    let fleet_db = roost_fleet::db::FleetDb::open(&fleet_db_path).map_err(setup("fleet db"))?;
    let fleet_opts = roost_fleet::record::FleetOptions {
        host: cloud_addr.ip().to_string(),
        port: cloud_addr.port(),
        db: fleet_db_path.clone(),
        client_id: "roost-fleet".into(),
        security: Default::default(),
        fallbacks: Vec::new(),
        audit_interval: roost_fleet::record::DEFAULT_AUDIT_INTERVAL,
        confirm: true,
        leadership: roost_fleet::leadership::Leadership::solo(),
    };
    let c = child.clone();
    let db2 = fleet_db.clone();
    tasks.spawn(async move {
        roost_fleet::record::run(fleet_opts, db2, c)
            .await
            .map_err(|e| format!("fleet: {e}"))
    });
    // The dashboard and API, with a fresh token for the plan actions (in the state dir);
    // the actions reach the controller started below over its channel.
    let token = format!("{:032x}", rand::random::<u128>());
    let token_file = state_dir.join("api-token");
    std::fs::write(&token_file, format!("{token}\n")).map_err(setup("api token"))?;
    let (controller, inbox) = roost_fleet::gitops::ControllerHandle::channel();
    let api = roost_fleet::api::Api::new(
        fleet_db.clone(),
        roost_fleet::api::ApiOptions {
            token: Some(token),
            controller: Some(controller),
            ..Default::default()
        },
        child.clone(),
    )
    .map_err(setup("api"))?;
    let http = roost_fleet::api::serve(
        opts.http.unwrap_or(([127, 0, 0, 1], 0).into()),
        api.router(),
        child.clone(),
    )
    .await
    .map_err(setup("http"))?;
    println!(
        "roost up: dashboard http://{http}/  (API http://{http}/api/v1/, token for plan actions in {})",
        token_file.display()
    );
    for i in 1..=opts.stores {
        let name = store_name(i);
        let edge = roost_broker::spawn_free("edge").map_err(setup("edge broker"))?;
        let spec = StoreSpec {
            store: name.clone(),
            groups: store_groups(i),
            dir: state_dir.join(&name),
            edge,
            cloud: cloud_addr,
            allowed: allowed.clone(),
            target: match &target {
                // Each store applies into its own namespace prefix, so stores can share a cluster.
                TargetConfig::Kubernetes(k) => {
                    TargetConfig::Kubernetes(roost_agent::config::KubernetesConfig {
                        default_namespace: Some("kitchen".into()),
                        namespace_prefix: Some(format!("{name}-")),
                        ..k.clone()
                    })
                }
                other => other.clone(),
            },
        };
        let (acfg, bcfg) = store_configs(&spec, &key)?;
        let c = child.clone();
        let n = name.clone();
        tasks.spawn(async move {
            roost_bridge::run(bcfg, c)
                .await
                .map_err(|e| format!("{n} bridge: {e}"))
        });
        let c = child.clone();
        let n = name.clone();
        tasks.spawn(async move {
            roost_agent::run(acfg, c)
                .await
                .map_err(|e| format!("{n} agent: {e}"))
        });
    }
    // The waves are the demo: start the controller once every store is connected, so none
    // is deferred as offline merely because it started late on a busy machine.
    let mut watcher = watcher;
    let t0 = Instant::now();
    let online = tokio::select! {
        r = watcher.wait_online(opts.stores, opts.timeout) => r?,
        Some(Ok(Err(e))) = tasks.join_next() => return Err(UpError::Failed(e)),
    };
    println!(
        "roost up: {online}/{} stores online in {} ms",
        opts.stores,
        t0.elapsed().as_millis()
    );
    // The GitOps controller: roost.yaml in the fleet repository is the desired state.
    let gopts = roost_fleet::gitops::GitopsOptions {
        repo: fleet_url.clone(),
        branch: "HEAD".into(),
        file: "roost.yaml".into(),
        poll: Duration::from_secs(2),
        host: cloud_addr.ip().to_string(),
        port: cloud_addr.port(),
        fallbacks: Vec::new(),
        security: Default::default(),
        cache_dir: state_dir.join("controller-git"),
        snapshot_interval: roost_fleet::gitops::snapshot::DEFAULT_INTERVAL,
        snapshot_expiry: roost_fleet::gitops::snapshot::DEFAULT_EXPIRY,
    };
    let ckey = cloud::load_key(&key_dir.join(format!("{key_id}.key"))).map_err(setup("key"))?;
    let c = child.clone();
    tasks.spawn(async move {
        roost_fleet::gitops::run_with_handle(gopts, fleet_db, ckey, Some(inbox), c)
            .await
            .map_err(|e| format!("controller: {}", roost_runtime::error_chain(&e)))
    });
    println!(
        "roost up: controller rolls out kitchen-display {} from roost.yaml (waves: canary, half, everyone)",
        ShortRev::of(&repo.first)
    );
    let published = Instant::now();
    // In a terminal (and not --once): one frame redrawn in place, for 3 stores or 2,000.
    let live = !opts.once && std::io::stdout().is_terminal();
    if live {
        let header = format!(
            "roost up: {} stores  cloud mqtt://{cloud}  dashboard http://{http}/  (Ctrl-C to stop)\n\
             roll out: commit to {} (the app) or {} (roost.yaml, the waves)",
            opts.stores,
            repos.join("apps").display(),
            fleet_repo_dir.display(),
        );
        let db = roost_fleet::db::FleetDb::open(&fleet_db_path).map_err(setup("fleet db"))?;
        let c = child.clone();
        tasks.spawn(async move {
            crate::up_view::run(db, header, Duration::from_millis(500), c).await;
            Ok(())
        });
    }
    let watch = watcher.watch_convergence(opts.stores, &repo.first, opts.timeout, published, live);
    let outcome = tokio::select! {
        r = watch => r,
        Some(Ok(Err(e))) = tasks.join_next() => Err(UpError::Failed(e)),
        _ = cancel.cancelled() => Ok(()),
    };
    match &outcome {
        Ok(()) if opts.once => {}
        Ok(()) if live => {
            tokio::select! {
                _ = cancel.cancelled() => {}
                Some(Ok(Err(e))) = tasks.join_next() => {
                    child.cancel();
                    return Err(UpError::Failed(e));
                }
            }
        }
        Ok(()) => {
            println!("roost up: fleet converged; staying up (Ctrl-C to stop).");
            println!("Change the fleet the GitOps way — edit, commit, watch the waves roll:");
            println!(
                "  $EDITOR {}/apps/kitchen-display/configmap.yaml && git -C {} commit -qam 'new menu'",
                repos.join("apps").display(),
                repos.join("apps").display()
            );
            println!(
                "  $EDITOR {}/roost.yaml && git -C {} commit -qam 'change the waves'",
                fleet_repo_dir.display(),
                fleet_repo_dir.display()
            );
            println!("  open http://{http}/ (the dashboard)");
            println!("  roost plan status --db {}", fleet_db_path.display());
            println!("  roost status --db {}", fleet_db_path.display());
            println!("  roost events --broker {cloud}");
            let _ = (&url, &key_id);
            follow_events(&cloud, &topics, &cancel).await;
        }
        Err(_) => {}
    }
    child.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    drop(daemon);
    outcome
}

/// The sample inventory (`stores/stores.yaml`): `n` stores, odd ones in region us-east
/// (New York), even ones in us-south (Chicago), each with its number as a var.
pub fn sample_inventory(n: usize) -> String {
    let mut out = String::from(
        "# The stores of the fleet. Change a label and commit: the store moves between groups.\n",
    );
    for i in 1..=n {
        let (region, tz) = if i % 2 == 1 {
            ("us-east", "America/New_York")
        } else {
            ("us-south", "America/Chicago")
        };
        if i > 1 {
            out.push_str("---\n");
        }
        out.push_str(&format!(
            "apiVersion: roost.dev/v1alpha1\nkind: Store\nname: {}\nlabels: {{region: {region}}}\ntimezone: {tz}\nvars: {{store_number: \"{i:04}\"}}\n",
            store_name(i)
        ));
    }
    out
}

/// The sample fleet file: kitchen-display from the apps repository's HEAD, in three waves,
/// with each store's values substituted; groups defined by store list and by label.
pub fn sample_fleet_file(apps_url: &str) -> String {
    [
        "# The fleet's desired state. Commit a change and roost rolls it out, wave by wave.",
        "apiVersion: roost.dev/v1alpha1",
        "kind: Fleet",
        "groups:                     # in precedence order; stores/ has the labels",
        "  canary: {stores: [store-0001]}",
        "  us-east: {selector: {region: us-east}}",
        "  us-south: {selector: {region: us-south}}",
        "deployments:",
        "  kitchen-display:",
        "    source:",
        &format!("      url: {apps_url}"),
        "      ref: HEAD",
        "      path: apps/kitchen-display",
        "    policy: {prune: true, self_heal: true, health_timeout_s: 120, substitute: true}",
        "    waves:",
        "      - {name: canary, group: canary}",
        "      - {name: half, percent: 50}",
        "      - {name: everyone, fleet: true}",
        "    abort: {failed_pct: 20, min_finished: 1, wave_timeout_s: 600}",
        "",
    ]
    .join("\n")
}

/// After the first convergence: keeps printing the fleet's events as they arrive (a later
/// rollout's waves show up too), until cancelled.
async fn follow_events(broker: &str, topics: &Topics, cancel: &CancellationToken) {
    let Ok((client, mut ev)) = cloud::connect(broker, "roost-up-follow") else {
        cancel.cancelled().await;
        return;
    };
    let filter = topics.all_stores(roost_schemas::topics::StoreTopicKind::Events);
    loop {
        let e = tokio::select! {
            _ = cancel.cancelled() => return,
            e = ev.poll() => e,
        };
        match e {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(e) = serde_json::from_slice::<roost_schemas::CloudEvent>(&p.payload) {
                    let store = e.source.split('/').nth(3).unwrap_or("?").to_owned();
                    let rev = e
                        .rollout_ref()
                        .and_then(|r| r.revision)
                        .map(|r| r[..r.len().min(12)].to_owned())
                        .unwrap_or_default();
                    println!(
                        "{}  {store:<12} {:<24} {} {rev} {}",
                        &e.time[..e.time.len().min(23)],
                        e.ty.trim_start_matches("dev.roost."),
                        e.subject.as_deref().unwrap_or(""),
                        e.reason().unwrap_or("")
                    );
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn tempfile_dir() -> Result<PathBuf, UpError> {
    let base = std::env::temp_dir().join(format!(
        "roost-up-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&base).map_err(setup("temp dir"))?;
    Ok(base)
}

/// A cloud-broker connection subscribed to every store's status and events.
struct Watcher {
    client: rumqttc::AsyncClient,
    ev: rumqttc::EventLoop,
}

impl Watcher {
    /// Connects and returns once the broker acknowledged both subscriptions.
    async fn subscribe(broker: &str, topics: &Topics) -> Result<Watcher, UpError> {
        let (client, mut ev) = cloud::connect(broker, "roost-up").map_err(setup("watch"))?;
        for kind in [
            roost_schemas::topics::StoreTopicKind::Status,
            roost_schemas::topics::StoreTopicKind::Events,
            roost_schemas::topics::StoreTopicKind::Presence,
        ] {
            client
                .subscribe(topics.all_stores(kind), QoS::AtLeastOnce)
                .await
                .map_err(setup("subscribe"))?;
        }
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while acked < 3 {
            match tokio::time::timeout_at(deadline, ev.poll()).await {
                Err(_) => {
                    return Err(UpError::Timeout(
                        Duration::from_secs(10),
                        "watch: no SUBACK from the cloud broker".into(),
                    ))
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(setup("watch")(e)),
            }
        }
        Ok(Watcher { client, ev })
    }

    /// Waits until `stores` stores report presence online (or the timeout passes: then
    /// the rollout starts anyway and the wave engine defers the missing ones). Returns how
    /// many are online.
    async fn wait_online(&mut self, stores: usize, timeout: Duration) -> Result<usize, UpError> {
        let topics = Topics::default();
        let mut online = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while online.len() < stores {
            let p = match tokio::time::timeout_at(deadline, self.ev.poll()).await {
                Err(_) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => p,
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => {
                    warn!(%error, "status watch connection");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if let Some((store, roost_schemas::topics::StoreTopicKind::Presence)) =
                topics.parse_store_topic(&p.topic)
            {
                match serde_json::from_slice::<roost_schemas::Presence>(&p.payload) {
                    Ok(pr) if pr.state == roost_schemas::PresenceState::Online => {
                        online.insert(store);
                    }
                    _ => {
                        online.remove(&store);
                    }
                }
            }
        }
        Ok(online.len())
    }

    /// Follows the retained status documents on the cloud broker, printing phase changes,
    /// until every store reports `Converged` on `revision`, or the timeout passes.
    async fn watch_convergence(
        self,
        stores: usize,
        revision: &str,
        timeout: Duration,
        since: Instant,
        quiet: bool,
    ) -> Result<(), UpError> {
        let Watcher { client, mut ev } = self;
        // In a terminal the live frame shows all this; plain lines otherwise.
        macro_rules! say {
            ($($t:tt)*) => { if !quiet { println!($($t)*); } };
        }
        let mut phases: BTreeMap<String, (Phase, Option<String>)> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let e = match tokio::time::timeout_at(deadline, ev.poll()).await {
                Err(_) => {
                    let pending: Vec<String> = phases
                        .iter()
                        .filter(|(_, (p, _))| *p != Phase::Converged)
                        .map(|(s, (p, _))| format!("{s}={}", p.as_str()))
                        .collect();
                    return Err(UpError::Timeout(
                        timeout,
                        format!(
                            "{} of {stores} stores converged; others: {}",
                            phases
                                .values()
                                .filter(|(p, _)| *p == Phase::Converged)
                                .count(),
                            pending.join(", ")
                        ),
                    ));
                }
                Ok(e) => e,
            };
            let p = match e {
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(error) => {
                    warn!(%error, "status watch connection");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if p.topic.ends_with("/events") {
                // Progress as it happens: every event of the demo deployment, one line each.
                if let Ok(e) = serde_json::from_slice::<roost_schemas::CloudEvent>(&p.payload) {
                    let store = e
                        .source
                        .trim_start_matches("roost://stores/")
                        .split('/')
                        .next()
                        .unwrap_or("?")
                        .to_owned();
                    let what = e.ty.trim_start_matches("dev.roost.");
                    let detail = e
                        .data
                        .get("message")
                        .and_then(|m| m.as_str())
                        .unwrap_or_default();
                    say!(
                        "  {:>8} ms  {store}  {what:<18} {detail}",
                        since.elapsed().as_millis()
                    );
                }
                continue;
            }
            let Ok(doc) = serde_json::from_slice::<StatusDoc>(&p.payload) else {
                continue;
            };
            let Some(st) = doc.deployments.get("kitchen-display") else {
                continue;
            };
            let now = (st.phase, st.applied_revision.clone());
            if phases.get(&doc.store) != Some(&now) {
                say!(
                    "  {:>8} ms  {}  status: {}",
                    since.elapsed().as_millis(),
                    doc.store,
                    st.phase.as_str(),
                );
                phases.insert(doc.store.clone(), now);
            }
            let done = phases
                .values()
                .filter(|(p, a)| *p == Phase::Converged && a.as_deref() == Some(revision))
                .count();
            if done == stores {
                say!(
                    "converged {done}/{stores} in {} ms",
                    since.elapsed().as_millis()
                );
                let _ = client.disconnect().await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod sample_tests {
    #[test]
    fn the_sample_fleet_file_is_valid() {
        let f = super::sample_fleet_file("git://127.0.0.1:9418/apps");
        let file = roost_fleet::gitops::parse_fleet_file(f.as_bytes()).expect("valid");
        assert_eq!(file.deployments["kitchen-display"].waves.len(), 3);
        let files = std::collections::BTreeMap::from([(
            "stores/stores.yaml".to_owned(),
            super::sample_inventory(3).into_bytes(),
        )]);
        let inv = roost_fleet::inventory::parse(&files).expect("valid inventory");
        let groups = file.groups.expect("groups");
        let of = |s: &str| groups.of(s, &inv.labels(s)).expect("defined");
        assert_eq!(of("store-0001"), ["canary", "us-east"]);
        assert_eq!(of("store-0002"), ["us-south"]);
    }
}
