//! Test harness: real brokers (embedded rumqttd, or `roost broker` child processes where a
//! test restarts one), real Git repositories served by `git daemon`, real SQLite files, and
//! builders that keep tests short.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use roost_agent::config::TargetConfig;
use roost_schemas::{
    CloudEvent, Envelope, Policy, Profile, Rollout, Scope, SigningKey, Source, StatusDoc, Topics,
    PAYLOAD_TYPE, PROFILE_PAYLOAD_TYPE,
};
use roost_sim::up::{GitDaemon, StoreSpec};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fixtures::{free_addr, refs, shipped, status_doc};

pub use crate::brokers::MosquittoCloud;
pub use roost_sim::nats::{suback_ok, NatsCluster, NatsNode};

/// Installs tracing (once) according to `ROOST_LOG`, and the crypto provider.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        roost_runtime::install_crypto_provider();
        let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=error"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The `roost` binary of this checkout, for tests that run it as a process.
///
/// `CARGO_BIN_EXE_roost` is set only for the `roost` package's own tests, and a binary found
/// next to the test executable may be older than the sources. So the harness builds it, once
/// per test process: `cargo build -p roost --bin roost` with the cargo that runs the tests
/// (`$CARGO`) in the test executable's profile, and takes the path cargo reports. Cargo's own
/// freshness check makes the binary match the sources; after the README's `cargo build
/// --workspace --bins` it is a no-op. `ROOST_BIN` overrides it (a binary built elsewhere).
pub fn roost_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ROOST_BIN") {
            return PathBuf::from(p);
        }
        build_roost_bin()
    })
    .clone()
}

fn build_roost_bin() -> PathBuf {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    // The test executable is …/PROFILE/deps/NAME-HASH: build the binary in the same profile.
    let exe = std::env::current_exe().expect("current exe");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let mut cmd = std::process::Command::new(&cargo);
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args([
            "build",
            "-p",
            "roost",
            "--bin",
            "roost",
            "--message-format=json",
        ]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cargo:?} build -p roost --bin roost: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p roost --bin roost failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "roost")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the roost executable")
}

/// Failures of in-process components, with the name of the test that started them: libtest
/// runs each test on a thread named after it, and a test's body (where components are
/// started and where `eventually` waits) runs on that thread.
static FAILURES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn current_test() -> String {
    std::thread::current().name().unwrap_or_default().to_owned()
}

/// Panics if an in-process component (agent, bridge, fleet service) that the current test
/// started has failed: a dead component fails the test at once instead of a wait timing out.
pub fn check_components() {
    let test = current_test();
    let failed: Vec<String> = FAILURES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(t, _)| *t == test)
        .map(|(_, f)| f.clone())
        .collect();
    if !failed.is_empty() && !std::thread::panicking() {
        panic!("{}", failed.join("; "));
    }
}

/// Waits until `f` returns Some, or panics with `what` after `timeout`, or at once when a
/// component of the test has failed.
pub async fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        check_components();
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// [`eventually`] for a check that awaits (an HTTP call, say).
pub async fn eventually_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        check_components();
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A broker run as a `roost broker` child process, so that it can be killed and restarted.
pub struct BrokerProcess {
    process: RoostProcess,
    /// Address.
    pub addr: SocketAddr,
    _logs: tempfile::TempDir,
}

impl BrokerProcess {
    /// Starts a `cloud` or `edge` profile broker on a free port.
    pub fn start(profile: &'static str) -> BrokerProcess {
        let addr = free_addr();
        let cfg = shipped(&format!("{profile}.toml"));
        let logs = tempfile::tempdir().expect("tmp");
        let process = RoostProcess::start(
            [
                std::ffi::OsString::from("broker"),
                "--config".into(),
                cfg.into_os_string(),
                "--listen".into(),
                addr.to_string().into(),
            ],
            &logs.path().join("broker.log"),
        );
        roost_broker::wait_listening(addr, Duration::from_secs(10)).expect("broker listening");
        BrokerProcess {
            process,
            addr,
            _logs: logs,
        }
    }

    /// Kills the broker with SIGKILL (everything it held in memory is gone).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.process.restart();
        roost_broker::wait_listening(self.addr, Duration::from_secs(10)).expect("broker listening");
    }
}

/// A Git repository served by `git daemon` on loopback.
pub struct GitServer {
    _dir: tempfile::TempDir,
    repo: git2::Repository,
    daemon: GitDaemon,
    files: BTreeMap<String, String>,
}

impl GitServer {
    /// A repository `fleet.git` with the given files in its first commit.
    pub fn start(files: &[(&str, &str)]) -> (GitServer, String) {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("fleet.git");
        let repo = git2::Repository::init(&path).expect("init");
        let daemon = GitDaemon::start(dir.path()).expect("git daemon");
        let mut s = GitServer {
            _dir: dir,
            repo,
            daemon,
            files: BTreeMap::new(),
        };
        let rev = s.commit(files, &[], "first");
        (s, rev)
    }

    /// The repository URL.
    pub fn url(&self) -> String {
        self.daemon.url("fleet.git")
    }

    /// The repository's working directory (a path `git` can clone and push to).
    pub fn path(&self) -> PathBuf {
        self.repo
            .workdir()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// The allow-list prefix that matches this server.
    pub fn allowed(&self) -> String {
        format!("git://127.0.0.1:{}/", self.daemon.port)
    }

    /// Commits changes: `set` files (path, content) and `delete` paths.
    pub fn commit(&mut self, set: &[(&str, &str)], delete: &[&str], msg: &str) -> String {
        for (p, c) in set {
            self.files.insert((*p).to_owned(), (*c).to_owned());
        }
        for p in delete {
            self.files.remove(*p);
            let _ = std::fs::remove_file(self.repo.workdir().expect("workdir").join(p));
        }
        roost_sim::up::commit_files(&self.repo, &self.files, msg).expect("commit")
    }

    /// Commits `files` as everything under `prefix`: every other file under it is deleted.
    pub fn commit_replacing(
        &mut self,
        prefix: &str,
        files: &[(String, String)],
        msg: &str,
    ) -> String {
        let old: Vec<String> = self
            .files()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let delete: Vec<&str> = old
            .iter()
            .map(String::as_str)
            .filter(|k| !files.iter().any(|(p, _)| p == k))
            .collect();
        self.commit(&refs(files), &delete, msg)
    }

    /// Current files of the last commit.
    pub fn files(&self) -> &BTreeMap<String, String> {
        &self.files
    }

    /// The served repository, for tests that write commits `git` itself would refuse.
    pub fn repo(&self) -> &git2::Repository {
        &self.repo
    }
}

/// A signing key and helpers to sign rollouts and store profiles.
pub struct Signer {
    /// The key.
    pub key: SigningKey,
}

impl Signer {
    /// A fixed test key.
    pub fn new(seed: u8) -> Signer {
        Signer {
            key: SigningKey::from_seed(&[seed; 32]).expect("key"),
        }
    }

    /// A rollout payload.
    pub fn rollout(
        &self,
        deployment: &str,
        scope: Scope,
        sequence: u64,
        url: &str,
        revision: &str,
        path: &str,
    ) -> Rollout {
        Rollout {
            schedule: Default::default(),
            deployment: deployment.into(),
            scope,
            sequence,
            issued_at: roost_schemas::now_rfc3339(),
            source: Some(Source {
                url: url.into(),
                revision: revision.into(),
                path: path.into(),
            }),
            not_before: None,
            policy: Policy {
                on_failure: None,
                prune: true,
                self_heal: true,
                health_timeout_s: 30,
                substitute: false,
            },
            remove: false,
            origin: None,
        }
    }

    /// Signs arbitrary JSON as a rollout envelope.
    pub fn sign_value(&self, v: &serde_json::Value) -> Vec<u8> {
        self.sign_as(PAYLOAD_TYPE, v)
    }

    /// Signs arbitrary JSON as an envelope of `payload_type`.
    pub fn sign_as(&self, payload_type: &str, v: &serde_json::Value) -> Vec<u8> {
        let body = serde_json::to_vec(v).expect("json");
        serde_json::to_vec(&self.key.sign(payload_type, &body)).expect("json")
    }

    /// A store profile payload naming `groups` (in precedence order), without labels, vars
    /// or time zone.
    pub fn profile(&self, store: &str, sequence: u64, groups: &[&str]) -> Profile {
        Profile {
            store: store.into(),
            sequence,
            issued_at: roost_schemas::now_rfc3339(),
            labels: Default::default(),
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
            timezone: None,
            vars: Default::default(),
        }
    }

    /// Signs a store profile into envelope bytes (for `roost/v1/stores/{store}/profile`).
    pub fn sign_profile(&self, p: &Profile) -> Vec<u8> {
        self.sign_as(
            PROFILE_PAYLOAD_TYPE,
            &serde_json::to_value(p).expect("json"),
        )
    }

    /// Signs a rollout into envelope bytes.
    pub fn sign(&self, r: &Rollout) -> Vec<u8> {
        self.sign_value(&serde_json::to_value(r).expect("json"))
    }

    /// The envelope of bytes (for tampering).
    pub fn envelope(bytes: &[u8]) -> Envelope {
        serde_json::from_slice(bytes).expect("envelope")
    }
}

/// Publishes retained QoS 1 messages to a broker and waits for the PUBACK.
pub async fn publish(broker: SocketAddr, topic: &str, payload: Vec<u8>) {
    roost_fleet::cloud::publish_retained(&broker.to_string(), topic, payload)
        .await
        .expect("publish");
}

/// What a cloud-side observer has seen: events and latest status per store.
#[derive(Default, Clone)]
pub struct Seen {
    /// Events in arrival order, with duplicates (by id) dropped.
    pub events: Vec<CloudEvent>,
    /// Duplicate deliveries dropped.
    pub duplicates: usize,
    /// Latest status per store.
    pub status: BTreeMap<String, StatusDoc>,
}

impl Seen {
    /// Events of one store.
    pub fn store_events(&self, store: &str) -> Vec<&CloudEvent> {
        let src = format!("roost://stores/{store}/");
        self.events
            .iter()
            .filter(|e| e.source.starts_with(&src))
            .collect()
    }

    /// Events of one store and type.
    pub fn of(&self, store: &str, ty: &str) -> Vec<&CloudEvent> {
        self.store_events(store)
            .into_iter()
            .filter(|e| e.ty == ty)
            .collect()
    }

    /// The highest `roostseq` among the store's events (0 = none).
    pub fn max_roostseq(&self, store: &str) -> u64 {
        self.store_events(store)
            .iter()
            .map(|e| e.roostseq)
            .max()
            .unwrap_or(0)
    }
}

/// A cloud-side observer subscribed to every store's events and status; reconnects quickly
/// when the broker restarts.
pub struct Observer {
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
    connected: tokio::sync::watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Observer {
    /// Starts observing `broker`.
    pub async fn start(broker: SocketAddr) -> Observer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            let topics = Topics::default();
            let mut ids = std::collections::HashSet::new();
            let mut subacks = 0u64;
            loop {
                let mut o = MqttOptions::new(
                    format!("observer-{}", rand::random::<u32>()),
                    broker.ip().to_string(),
                    broker.port(),
                );
                o.set_keep_alive(Duration::from_secs(5));
                o.set_max_packet_size(4 << 20, 4 << 20);
                let (client, mut ev) = AsyncClient::new(o, 100);
                let _ = client
                    .subscribe_many([
                        rumqttc::SubscribeFilter::new(
                            topics.all_stores(roost_schemas::topics::StoreTopicKind::Events),
                            QoS::AtLeastOnce,
                        ),
                        rumqttc::SubscribeFilter::new(
                            topics.all_stores(roost_schemas::topics::StoreTopicKind::Status),
                            QoS::AtLeastOnce,
                        ),
                    ])
                    .await;
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks += 1;
                            tx.send_replace(subacks);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let mut s = s2.lock().expect("lock");
                            if p.topic.ends_with("/events") {
                                if let Ok(e) = serde_json::from_slice::<CloudEvent>(&p.payload) {
                                    if ids.insert(e.id.clone()) {
                                        s.events.push(e);
                                    } else {
                                        s.duplicates += 1;
                                    }
                                }
                            } else if let Ok(d) = serde_json::from_slice::<StatusDoc>(&p.payload) {
                                s.status.insert(d.store.clone(), d);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut o = Observer {
            seen,
            connected: rx,
            task,
        };
        o.wait_subscribed(1).await;
        o
    }

    /// Waits until the observer has had `n` SUBACKs in total (one per (re)connection).
    pub async fn wait_subscribed(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while *self.connected.borrow() < n {
            check_components();
            assert!(
                Instant::now() < deadline,
                "observer subscribed {n} times in 20 s"
            );
            let _ =
                tokio::time::timeout(Duration::from_millis(100), self.connected.changed()).await;
        }
    }

    /// Subscriptions made so far.
    pub fn subscriptions(&self) -> u64 {
        *self.connected.borrow()
    }

    /// A copy of what was seen.
    pub fn snapshot(&self) -> Seen {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits for an event of `ty` from `store` matching `pred`; returns it.
    pub async fn wait_event(
        &self,
        store: &str,
        ty: &str,
        timeout: Duration,
        pred: impl Fn(&CloudEvent) -> bool,
    ) -> CloudEvent {
        let seen = self.seen.clone();
        eventually(timeout, &format!("{ty} from {store}"), || {
            let s = seen.lock().expect("lock");
            s.of(store, ty).into_iter().find(|e| pred(e)).cloned()
        })
        .await
    }

    /// Waits for the store's `dev.roost.converged` event naming `revision`; returns it.
    pub async fn wait_converged(
        &self,
        store: &str,
        revision: &str,
        timeout: Duration,
    ) -> CloudEvent {
        self.wait_event(store, "dev.roost.converged", timeout, |e| {
            crate::fixtures::rev_of(e) == Some(revision)
        })
        .await
    }

    /// Waits until the store's latest status document satisfies `pred` (`what` names that in
    /// the timeout's panic); returns it.
    pub async fn wait_status(
        &self,
        store: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&StatusDoc) -> bool,
    ) -> StatusDoc {
        let seen = self.seen.clone();
        eventually(timeout, &format!("{store}: {what}"), || {
            let s = seen.lock().expect("lock");
            s.status.get(store).filter(|d| pred(d)).cloned()
        })
        .await
    }

    /// Waits until the store's status says `deployment` is in `phase` at `revision`.
    pub async fn wait_phase(
        &self,
        store: &str,
        deployment: &str,
        phase: &str,
        revision: Option<&str>,
        timeout: Duration,
    ) -> StatusDoc {
        self.wait_status(store, &format!("{deployment} {phase}"), timeout, |doc| {
            doc.deployments.get(deployment).is_some_and(|d| {
                d.phase.as_str() == phase
                    && (revision.is_none() || d.applied_revision.as_deref() == revision)
            })
        })
        .await
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cloud side most end-to-end tests start from; fields are public, for destructuring.
pub struct CloudRig {
    /// A temporary directory for the test's state (stores, databases, files).
    pub dir: tempfile::TempDir,
    /// The embedded cloud broker.
    pub cloud: SocketAddr,
    /// The fleet repository, served by `git daemon`.
    pub git: GitServer,
    /// Its first revision.
    pub rev: String,
    /// An observer subscribed on the cloud broker.
    pub obs: Observer,
}

impl CloudRig {
    /// [`init`], a temporary directory, an embedded cloud broker, a repository with `files`
    /// in its first commit, and an observer on the broker.
    pub async fn start(files: &[(&str, &str)]) -> CloudRig {
        init();
        let dir = tempfile::tempdir().expect("tmp");
        let cloud = roost_broker::spawn_free("cloud").expect("cloud broker");
        let (git, rev) = GitServer::start(files);
        let obs = Observer::start(cloud).await;
        CloudRig {
            dir,
            cloud,
            git,
            rev,
            obs,
        }
    }
}

/// The configuration spec of store `name` (files target) with its state under `DIR/NAME/`.
fn store_spec(
    name: &str,
    groups: &[&str],
    dir: &Path,
    cloud: SocketAddr,
    edge: SocketAddr,
    allowed: &str,
) -> StoreSpec {
    StoreSpec {
        store: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        dir: dir.join(name),
        edge,
        cloud,
        allowed: allowed.into(),
        target: TargetConfig::Files(Default::default()),
    }
}

/// One store running in-process: edge broker, bridge and agent, each restartable.
pub struct StoreRig {
    /// Store name.
    pub name: String,
    /// Edge broker address.
    pub edge: SocketAddr,
    /// Agent configuration.
    pub agent_cfg: roost_agent::AgentConfig,
    /// Bridge configuration.
    pub bridge_cfg: roost_bridge::BridgeConfig,
    agent: Option<Component>,
    bridge: Option<Component>,
    /// State directory.
    pub dir: PathBuf,
}

impl StoreRig {
    /// Builds a store with an embedded edge broker (not started yet).
    pub fn new(
        name: &str,
        groups: &[&str],
        dir: &Path,
        cloud: SocketAddr,
        signer: &Signer,
        allowed: &str,
    ) -> StoreRig {
        let edge = roost_broker::spawn_free("edge").expect("edge broker");
        Self::with_edge(name, groups, dir, cloud, edge, signer, allowed)
    }

    /// Builds a store on a given edge broker.
    pub fn with_edge(
        name: &str,
        groups: &[&str],
        dir: &Path,
        cloud: SocketAddr,
        edge: SocketAddr,
        signer: &Signer,
        allowed: &str,
    ) -> StoreRig {
        let spec = store_spec(name, groups, dir, cloud, edge, allowed);
        let (mut agent_cfg, bridge_cfg) =
            roost_sim::up::store_configs(&spec, &signer.key).expect("configs");
        agent_cfg.retry = (Duration::from_millis(200), Duration::from_secs(2));
        agent_cfg.drift_interval = Duration::from_secs(2);
        StoreRig {
            name: name.into(),
            edge,
            agent_cfg,
            bridge_cfg,
            agent: None,
            bridge: None,
            dir: spec.dir,
        }
    }

    /// Starts the agent (a running one is aborted first, as in a crash).
    pub fn start_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.abort();
        }
        let cfg = self.agent_cfg.clone();
        let what = format!("agent of {}", self.name);
        self.agent = Some(Component::spawn(what, move |c| roost_agent::run(cfg, c)));
    }

    /// Stops the agent gracefully and waits for it; panics if it failed or does not stop.
    pub async fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop().await;
        }
    }

    /// Starts the bridge (a running one is aborted first, as in a crash).
    pub fn start_bridge(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
        let cfg = self.bridge_cfg.clone();
        let what = format!("bridge of {}", self.name);
        self.bridge = Some(Component::spawn(what, move |c| roost_bridge::run(cfg, c)));
    }

    /// Starts agent and bridge.
    pub fn start(&mut self) {
        self.start_bridge();
        self.start_agent();
    }

    /// The live directory of a deployment (files target).
    pub fn current(&self, deployment: &str) -> PathBuf {
        self.agent_cfg.files_root().join(deployment).join("current")
    }

    /// Files under the live directory (relative path → content), empty if absent.
    pub fn live_files(&self, deployment: &str) -> BTreeMap<String, String> {
        files_under(&self.current(deployment))
    }

    /// Replaces the agent's configuration with `file`, keeping the quick retry and drift
    /// timings the rig set (a restarted agent takes it).
    pub fn set_agent_file(&mut self, file: roost_agent::config::AgentFile) {
        let (retry, drift) = (self.agent_cfg.retry, self.agent_cfg.drift_interval);
        self.agent_cfg = roost_agent::AgentConfig::from_file(file).expect("agent config");
        self.agent_cfg.retry = retry;
        self.agent_cfg.drift_interval = drift;
    }
}

/// A component running in-process until it is stopped (agent, bridge, fleet service). If it
/// fails (an error, a panic, or returning before it was stopped), the test that started it
/// fails: at its next `eventually`/`wait_*`, when the component is stopped, or when it is
/// dropped. Tokio alone would keep a spawned task's panic to itself unless it is joined.
pub struct Component {
    what: String,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Component {
    /// How long a stopped component may take to return.
    const STOP_TIMEOUT: Duration = Duration::from_secs(15);

    /// Spawns `run` with a new token.
    pub fn spawn<F, E>(
        what: impl Into<String>,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> Component
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Self::spawn_with(what, CancellationToken::new(), run)
    }

    /// Spawns `run` with `cancel` (e.g. a child of a test-wide token).
    pub fn spawn_with<F, E>(
        what: impl Into<String>,
        cancel: CancellationToken,
        run: impl FnOnce(CancellationToken) -> F,
    ) -> Component
    where
        F: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let what = what.into();
        let failure = Arc::new(Mutex::new(None));
        let fut = run(cancel.clone());
        let (w, c, f, test) = (
            what.clone(),
            cancel.clone(),
            failure.clone(),
            current_test(),
        );
        let task = tokio::spawn(async move {
            let message = match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(())) if c.is_cancelled() => return,
                Ok(Ok(())) => format!("{w} returned before it was stopped"),
                Ok(Err(e)) => format!("{w} failed: {e}"),
                Err(panic) => format!("{w} panicked: {}", panic_message(&*panic)),
            };
            tracing::error!(component = %w, %message, "component failed");
            *f.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
            FAILURES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((test, message));
        });
        Component {
            what,
            cancel,
            task,
            failure,
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops it gracefully and joins it; panics if it failed or did not stop in time.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let task = &mut self.task;
        if tokio::time::timeout(Self::STOP_TIMEOUT, task)
            .await
            .is_err()
        {
            panic!(
                "{} did not stop within {:?} of being cancelled",
                self.what,
                Self::STOP_TIMEOUT
            );
        }
        if let Some(f) = self.failure() {
            panic!("{f}");
        }
    }

    /// Stops it at once (no graceful shutdown, as in a crash); panics if it had failed.
    pub fn abort(self) {
        // Drop does it.
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.task.abort();
        if let Some(f) = self.failure() {
            if !std::thread::panicking() {
                panic!("{f}");
            }
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The files of `all` under `prefix/`, with the prefix stripped (what the files target writes).
pub fn under(all: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    all.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&format!("{prefix}/"))
                .map(|r| (r.to_owned(), v.clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers for the chaos tests (tests/tests/chaos.rs): the fleet service in-process, `roost`
// child processes that can be SIGKILLed, configuration files, and probes.

/// The cloud-side fleet service (`roost_fleet::record::run`) running in-process on a SQLite file.
pub struct FleetService {
    /// The database it records into.
    pub db: roost_fleet::db::FleetDb,
    pub(crate) component: Option<Component>,
}

impl FleetService {
    /// Starts recording everything on the `cloud` broker into `path`.
    pub fn start(cloud: SocketAddr, path: &Path) -> FleetService {
        let db = roost_fleet::db::FleetDb::open(path).expect("fleet db");
        let opts = roost_fleet::record::FleetOptions {
            host: cloud.ip().to_string(),
            port: cloud.port(),
            db: path.to_owned(),
            client_id: format!("roost-fleet-{:08x}", rand::random::<u32>()),
            security: Default::default(),
            fallbacks: Vec::new(),
            audit_interval: roost_fleet::record::DEFAULT_AUDIT_INTERVAL,
            confirm: true,
            leadership: roost_fleet::leadership::Leadership::solo(),
        };
        let db2 = db.clone();
        let component = Component::spawn("fleet service", move |c| {
            roost_fleet::record::run(opts, db2, c)
        });
        FleetService {
            db,
            component: Some(component),
        }
    }

    /// Stops it gracefully; panics if it failed.
    pub async fn stop(mut self) {
        if let Some(c) = self.component.take() {
            c.stop().await;
        }
    }

    /// The latest status document recorded for `store`.
    pub fn status(&self, store: &str) -> Option<StatusDoc> {
        self.latest(|t| t.status(store))
    }

    /// The latest presence document recorded for `store`.
    pub fn presence(&self, store: &str) -> Option<roost_schemas::Presence> {
        self.latest(|t| t.presence(store))
    }

    /// The latest document recorded on the status-like topic `topic` picks, parsed.
    fn latest<T: serde::de::DeserializeOwned>(
        &self,
        topic: impl FnOnce(&Topics) -> String,
    ) -> Option<T> {
        let topics = Topics::default();
        let want = topic(&topics);
        self.db
            .status_messages(&topics)
            .ok()?
            .into_iter()
            .find(|(t, _)| *t == want)
            .and_then(|(_, p)| serde_json::from_slice(&p).ok())
    }

    /// The store's distinct events in first-arrival order, parsed.
    pub fn events(&self, store: &str) -> Vec<CloudEvent> {
        self.db
            .events(store)
            .expect("fleet events")
            .iter()
            .map(|e| serde_json::from_str(&e.json).expect("stored event"))
            .collect()
    }

    /// The highest `roostseq` recorded for `store` (0 = none).
    pub fn max_roostseq(&self, store: &str) -> u64 {
        self.db
            .events(store)
            .expect("fleet events")
            .iter()
            .map(|e| e.roostseq)
            .max()
            .unwrap_or(0)
    }
}

/// Publishes one QoS 1 message (retained or not) and waits for the PUBACK.
pub async fn publish_qos1(broker: SocketAddr, topic: &str, payload: Vec<u8>, retain: bool) {
    let (client, mut ev) =
        roost_fleet::cloud::connect(&broker.to_string(), "roost-test-pub").expect("client");
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("publish to {broker}: {e}"),
            }
        }
    })
    .await
    .expect("PUBACK in time");
    let _ = client.disconnect().await;
}

/// Waits until the bridge of `store` carries the store's topics from `edge` to the fleet
/// service: publishes a probe status document (not retained) on the edge broker until the
/// fleet records it. Needed before anything publishes events: the edge broker keeps messages
/// only for subscriptions that exist.
pub async fn wait_bridge_ready(edge: SocketAddr, fleet: &FleetService, store: &str) {
    let topic = Topics::default().status(store);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_components();
        let marker = format!("probe-{:08x}", rand::random::<u32>());
        let doc = status_doc(store, &marker, 0);
        publish_qos1(edge, &topic, serde_json::to_vec(&doc).expect("json"), false).await;
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            if fleet
                .status(store)
                .is_some_and(|d| d.agent_version == marker)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge of {store} did not carry a probe from the edge to the fleet in 30 s"
        );
    }
}

/// The agent's retained status document and the bridge's delivery confirmation for `store`,
/// as the edge broker holds them now (each None if absent or not parsable).
pub async fn edge_retained(
    edge: SocketAddr,
    store: &str,
) -> Result<(Option<StatusDoc>, Option<roost_schemas::Confirmation>), roost_fleet::cloud::CloudError>
{
    let topics = Topics::default();
    let (status, ack) = (topics.status(store), topics.ack(store));
    let got = roost_fleet::cloud::read_retained(
        &edge.to_string(),
        &[status.clone(), ack.clone()],
        Duration::from_secs(2),
    )
    .await?;
    let find = |t: &str| got.iter().find(|(topic, _)| topic == t).map(|(_, p)| p);
    Ok((
        find(&status).and_then(|p| serde_json::from_slice(p).ok()),
        find(&ack).and_then(|p| serde_json::from_slice(p).ok()),
    ))
}

/// Waits until the agent's retained status document on the edge broker satisfies `pred`,
/// and returns it. The agent's outbox publishes in order, so the edge broker has had every
/// event the document counts (up to its `roostseq`).
pub async fn wait_edge_status(
    edge: SocketAddr,
    store: &str,
    timeout: Duration,
    pred: impl Fn(&StatusDoc) -> bool,
) -> StatusDoc {
    let deadline = Instant::now() + timeout;
    loop {
        check_components();
        if let (Some(doc), _) = edge_retained(edge, store).await.unwrap_or_default() {
            if pred(&doc) {
                return doc;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the status of {store} on its edge broker did not become as expected in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agent's retained status document on the edge broker satisfies `pred` and
/// the bridge has confirmed every event up to it: they are all in the bridge's durable outbox.
pub async fn wait_in_bridge_outbox(
    edge: SocketAddr,
    store: &str,
    timeout: Duration,
    pred: impl Fn(&StatusDoc) -> bool,
) -> StatusDoc {
    let deadline = Instant::now() + timeout;
    loop {
        check_components();
        if let (Some(doc), Some(ack)) = edge_retained(edge, store).await.unwrap_or_default() {
            if pred(&doc) && ack.roostseq >= doc.roostseq {
                return doc;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the bridge of {store} did not confirm the agent's events in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `doc` says `deployment` is converged on `revision`.
pub fn converged_on(doc: &StatusDoc, deployment: &str, revision: &str) -> bool {
    doc.deployments.get(deployment).is_some_and(|d| {
        d.phase == roost_schemas::Phase::Converged
            && d.applied_revision.as_deref() == Some(revision)
    })
}

/// Whether `doc` says `deployment` is converged on `revision`, desired at `sequence`.
pub fn converged_at(doc: &StatusDoc, deployment: &str, revision: &str, sequence: u64) -> bool {
    converged_on(doc, deployment, revision)
        && doc.deployments[deployment]
            .desired
            .as_ref()
            .is_some_and(|x| x.sequence == sequence)
}

/// A `roost` child process (agent, bridge, …) that can be SIGKILLed and started again with
/// the same arguments; stderr is appended to a log file.
pub struct RoostProcess {
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    /// `ROOST_LOG` of the process; None: `ROOST_CHILD_LOG`, else info.
    level: Option<String>,
    child: Option<std::process::Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl RoostProcess {
    /// Starts `roost ARGS…`, logging to `log`.
    pub fn start<I, S>(args: I, log: &Path) -> RoostProcess
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        Self::start_logged(args, log, None)
    }

    /// Starts `roost ARGS…`, logging to `log` with the `ROOST_LOG` filter `level` (None: the
    /// test's `ROOST_CHILD_LOG`, else `info`).
    pub fn start_logged<I, S>(args: I, log: &Path, level: Option<&str>) -> RoostProcess
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let mut p = RoostProcess {
            args: args.into_iter().map(Into::into).collect(),
            log: log.to_owned(),
            level: level.map(str::to_owned),
            child: None,
            starts: 0,
        };
        p.restart();
        p
    }

    /// Kills it with SIGKILL (no shutdown code runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again (killing a running one first).
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = std::process::Command::new(roost_bin())
            .args(&self.args)
            .env(
                "ROOST_LOG",
                self.level.clone().unwrap_or_else(|| {
                    std::env::var("ROOST_CHILD_LOG").unwrap_or_else(|_| "info,rumqttd=error".into())
                }),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn roost");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Whether the process is running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` to it (SIGSTOP pauses it with every socket open, SIGCONT resumes it).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, signal).expect("signal the roost process");
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RoostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A store whose agent runs as a `roost agent` process that logs to a file, beside an
/// in-process bridge and its own embedded edge broker: for tests that search everything the
/// agent writes, its log included. Everything of it is under `DIR/NAME/`.
pub struct ProcessStore {
    /// Store name.
    pub name: String,
    /// The agent's state directory.
    pub state: PathBuf,
    /// The bridge's state directory.
    pub bridge_state: PathBuf,
    /// The agent's log file.
    pub log: PathBuf,
    agent: RoostProcess,
    bridge: Option<Component>,
}

impl ProcessStore {
    /// Starts the store `name` in `groups` under `dir`, trusting `signer`, fetching from
    /// `allowed`, its agent logging at `level`. `agent_toml` may change the agent's
    /// configuration file (from [`agent_toml`], files target) and its state directory (an
    /// identity file, say) before the agent starts.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        name: &str,
        groups: &[&str],
        dir: &Path,
        cloud: SocketAddr,
        signer: &Signer,
        allowed: &str,
        level: &str,
        agent_toml: impl FnOnce(String, &Path) -> String,
    ) -> ProcessStore {
        let edge = roost_broker::spawn_free("edge").expect("edge broker");
        let spec = store_spec(name, groups, dir, cloud, edge, allowed);
        let (_, bridge_cfg) = roost_sim::up::store_configs(&spec, &signer.key).expect("configs");
        let bridge_state = bridge_cfg.state_dir.clone();
        let bridge = Component::spawn(format!("bridge of {name}"), move |c| {
            roost_bridge::run(bridge_cfg, c)
        });
        let state = spec.dir.join("agent");
        std::fs::create_dir_all(&state).expect("state dir");
        let text = agent_toml(
            self::agent_toml(name, groups, &state, edge, signer, allowed),
            &state,
        );
        let config = spec.dir.join("agent.toml");
        std::fs::write(&config, text).expect("agent.toml");
        let log = spec.dir.join("agent.log");
        let agent = RoostProcess::start_logged(
            [
                std::ffi::OsString::from("agent"),
                "--config".into(),
                config.into_os_string(),
            ],
            &log,
            Some(level),
        );
        ProcessStore {
            name: name.into(),
            state,
            bridge_state,
            log,
            agent,
            bridge: Some(bridge),
        }
    }

    /// Kills the agent and stops the bridge gracefully (panics if it failed).
    pub async fn stop(&mut self) {
        self.agent.kill();
        if let Some(b) = self.bridge.take() {
            b.stop().await;
        }
    }
}

/// An agent configuration file (TOML) for `roost agent --config`, trusting `signer`.
pub fn agent_toml(
    store: &str,
    groups: &[&str],
    state_dir: &Path,
    edge: SocketAddr,
    signer: &Signer,
    allowed: &str,
) -> String {
    use base64::Engine as _;
    let groups: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
    format!(
        r#"store = "{store}"
groups = [{groups}]
state_dir = {state_dir:?}
drift_interval_s = 2
retry_ms = [200, 2000]
[broker]
host = "{host}"
port = {port}
keep_alive_s = 5
[[trusted_keys]]
id = "{id}"
public_key = "{public}"
[git]
allowed_sources = [{allowed:?}]
fetch_timeout_s = 10
[target]
kind = "files"
"#,
        groups = groups.join(", "),
        state_dir = state_dir.display().to_string(),
        host = edge.ip(),
        port = edge.port(),
        id = signer.key.key_id(),
        public = base64::engine::general_purpose::STANDARD.encode(signer.key.public_key()),
    )
}

/// A bridge configuration file (TOML) for `roost bridge --config`.
pub fn bridge_toml(
    store: &str,
    groups: &[&str],
    state_dir: &Path,
    edge: SocketAddr,
    cloud: SocketAddr,
    cloud_keep_alive_s: u64,
) -> String {
    let groups: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
    format!(
        r#"store = "{store}"
groups = [{groups}]
state_dir = {state_dir:?}
[edge]
host = "{eh}"
port = {ep}
keep_alive_s = 5
[cloud]
host = "{ch}"
port = {cp}
keep_alive_s = {cloud_keep_alive_s}
"#,
        groups = groups.join(", "),
        state_dir = state_dir.display().to_string(),
        eh = edge.ip(),
        ep = edge.port(),
        ch = cloud.ip(),
        cp = cloud.port(),
    )
}

/// Every regular file under `dir` (relative path → content; files that are not UTF-8 left
/// out); empty if `dir` is absent.
pub fn files_under(dir: &Path) -> BTreeMap<String, String> {
    paths_under(dir)
        .into_iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
            Some((rel, std::fs::read_to_string(&p).ok()?))
        })
        .collect()
}

/// The path of everything under `dir` that is not a directory, depth first; empty if `dir`
/// is absent.
pub fn paths_under(dir: &Path) -> Vec<PathBuf> {
    fn rec(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                rec(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    rec(dir, &mut out);
    out
}

impl StoreRig {
    /// Stops the bridge gracefully and waits for it; panics if it failed or does not stop.
    pub async fn stop_bridge(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.stop().await;
        }
    }
}

/// `GET path` from a local HTTP server (HTTP/1.1, one request per connection): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read response");
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// Scrapes `http://addr/metrics` and parses it with a Prometheus text-format parser.
pub async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics from {addr}:\n{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics of {addr} does not parse: {e}\n{body}"))
}

/// The value of the sample `name` with (at least) `labels`; None if there is none. A
/// histogram gives its count.
pub fn metric(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

/// The address a `roost` process with `--log-format json` logged as `metrics listening`.
pub fn metrics_addr_in_json_log(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "metrics listening")
        .and_then(|v| v["addr"].as_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until_cancelled(c: CancellationToken) -> Result<(), String> {
        c.cancelled().await;
        Ok(())
    }

    async fn panics_when_stopped(c: CancellationToken) -> Result<(), String> {
        c.cancelled().await;
        panic!("kaboom")
    }

    #[tokio::test]
    #[should_panic(expected = "probe failed: boom")]
    async fn a_failed_component_fails_the_next_wait_at_once() {
        let _c = Component::spawn("probe", |_| async { Err::<(), _>("boom") });
        // Without the check this would time out after a minute with another message.
        eventually(
            Duration::from_secs(60),
            "something that never happens",
            || None::<()>,
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "probe panicked: kaboom")]
    async fn a_panic_inside_a_component_fails_its_stop() {
        let c = Component::spawn("probe", panics_when_stopped);
        c.stop().await;
    }

    #[tokio::test]
    #[should_panic(expected = "probe returned before it was stopped")]
    async fn a_component_that_ends_by_itself_fails_when_dropped() {
        let c = Component::spawn("probe", |_| async { Ok::<(), String>(()) });
        while !c.task.is_finished() {
            tokio::task::yield_now().await;
        }
        drop(c);
    }

    #[tokio::test]
    async fn a_component_that_stops_when_told_passes() {
        let c = Component::spawn("probe", until_cancelled);
        eventually(Duration::from_millis(100), "a moment", || Some(())).await;
        c.stop().await;
        check_components();
    }
}
