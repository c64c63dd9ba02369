//! One real store as separate processes of this binary: a cloud broker and an edge broker
//! (`roost broker`), `roost bridge`, `roost agent` (files target), a Git repository served by
//! `git daemon`, and an observer on the cloud broker that timestamps every event it receives.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::{CloudEvent, EventType, Policy, Scope, SigningKey, Topics};
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;

use super::{setup, BenchError, TempDir};
use crate::up::{self, GitDaemon};
use roost_fleet::cloud::{self, RolloutSpec};

/// The store's name and its one deployment.
pub const STORE: &str = "bench-store";
/// The deployment.
pub const DEPLOYMENT: &str = "bench";

/// How the rig is built.
#[derive(Debug, Clone)]
pub struct RigOptions {
    /// Manifest files (one ConfigMap each) in the deployment's directory.
    pub objects: usize,
    /// The lean `roost-agent` binary to run the agent with, instead of `roost agent`.
    pub agent_bin: Option<PathBuf>,
}

/// Figures of a process from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStat {
    /// Resident set size (bytes).
    pub rss_bytes: u64,
    /// Of which anonymous pages: heap, stacks, relocated (copied-on-write) data (bytes).
    pub rss_anon_bytes: u64,
    /// Of which file-backed pages: the binary's and the shared libraries' (bytes).
    pub rss_file_bytes: u64,
    /// User + system CPU time (seconds).
    pub cpu_s: f64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
}

impl ProcStat {
    /// Reads /proc/PID (zeros for what cannot be read).
    pub fn read(pid: u32) -> ProcStat {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after the last ')';
        // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            rest.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        ProcStat {
            rss_bytes: field("VmRSS:") * 1024,
            rss_anon_bytes: field("RssAnon:") * 1024,
            rss_file_bytes: field("RssFile:") * 1024,
            cpu_s: (ticks(11) + ticks(12)) / 100.0,
            threads: field("Threads:"),
            fds,
        }
    }
}

/// Resident bytes of `pid`'s mappings of the file `path` (its own binary's pages), from
/// /proc/PID/smaps; 0 when it cannot be read.
pub fn rss_of_file(pid: u32, path: &std::path::Path) -> u64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = path.to_string_lossy();
    let mut mine = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.ends_with(':') {
            // A field of the current mapping.
            if mine && first == "Rss:" {
                kib += words
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        } else {
            // A mapping's header: address range, perms, offset, device, inode, path.
            mine = line.split_whitespace().nth(5) == Some(&*want);
        }
    }
    kib * 1024
}

/// The names of `pid`'s threads (`/proc/PID/task/*/comm`), sorted.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A child process, killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: the agent and the bridge stop cleanly; then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::debug!(process = self.name, "did not stop on SIGTERM; killing");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One bridged store made of real processes.
pub struct Rig {
    /// Cloud broker.
    pub cloud: SocketAddr,
    /// Edge broker.
    pub edge: SocketAddr,
    /// Events received at the cloud, with their arrival time.
    pub events: mpsc::UnboundedReceiver<(CloudEvent, Instant)>,
    agent: Option<Proc>,
    bridge: Option<Proc>,
    brokers: Vec<Proc>,
    daemon: GitDaemon,
    repo: git2::Repository,
    files: BTreeMap<String, String>,
    key: SigningKey,
    sequence: u64,
    state: PathBuf,
    observer: tokio::task::JoinHandle<()>,
    // Last: removed after the processes stopped.
    dir: TempDir,
}

fn configmap(i: usize, round: u64) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bench-{i:03}\ndata:\n  round: \"{round}\"\n  payload: \"{}\"\n",
        "x".repeat(64)
    )
}

fn spawn(
    name: &'static str,
    args: &[&str],
    log: &Path,
    env: &[(&str, &str)],
) -> Result<Proc, BenchError> {
    let exe = std::env::current_exe().map_err(setup("current exe"))?;
    spawn_exe(&exe, name, args, log, env)
}

fn spawn_exe(
    exe: &Path,
    name: &'static str,
    args: &[&str],
    log: &Path,
    env: &[(&str, &str)],
) -> Result<Proc, BenchError> {
    let log = std::fs::File::create(log).map_err(setup("log file"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().map_err(setup("spawn roost"))?;
    Ok(Proc { name, child })
}

fn broker(dir: &Path, profile: &'static str) -> Result<(Proc, SocketAddr), BenchError> {
    let text = match profile {
        "cloud" => include_str!("../../../broker-config/cloud.toml"),
        _ => include_str!("../../../broker-config/edge.toml"),
    };
    let cfg = dir.join(format!("{profile}.toml"));
    std::fs::write(&cfg, text).map_err(setup("broker config"))?;
    let port = roost_broker::free_port().map_err(setup("port"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let p = spawn(
        if profile == "cloud" {
            "cloud broker"
        } else {
            "edge broker"
        },
        &[
            "broker",
            "--config",
            &cfg.display().to_string(),
            "--listen",
            &addr.to_string(),
        ],
        &dir.join(format!("{profile}.log")),
        &[],
    )?;
    roost_broker::wait_listening(addr, Duration::from_secs(20)).map_err(setup("broker"))?;
    Ok((p, addr))
}

impl Rig {
    /// Starts everything and waits until the observer is subscribed at the cloud.
    pub async fn start(opts: &RigOptions) -> Result<Rig, BenchError> {
        let dir = TempDir::new("rig")?;
        let d = dir.path().to_owned();
        let repos = d.join("repos");
        let sample = up::create_sample_repo(&repos.join("apps.git")).map_err(setup("repo"))?;
        let repo = git2::Repository::open(&sample.path).map_err(setup("repo"))?;
        let mut files = BTreeMap::new();
        for i in 0..opts.objects.max(1) {
            files.insert(format!("apps/{DEPLOYMENT}/cm-{i:03}.yaml"), configmap(i, 0));
        }
        up::commit_files(&repo, &files, "bench").map_err(setup("commit"))?;
        let daemon = GitDaemon::start(&repos).map_err(setup("git daemon"))?;
        let key = SigningKey::generate().map_err(setup("key"))?;
        let (cloud_p, cloud) = broker(&d, "cloud")?;
        let (edge_p, edge) = broker(&d, "edge")?;

        // The observer subscribes before any store component runs, so it sees every event.
        let (client, mut ev) =
            cloud::connect(&cloud.to_string(), "roost-bench").map_err(setup("observer"))?;
        client
            .subscribe(
                Topics::default().all_stores(StoreTopicKind::Events),
                QoS::AtLeastOnce,
            )
            .await
            .map_err(setup("subscribe"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let observer = tokio::spawn(async move {
            let _client = client;
            let mut sub_tx = Some(sub_tx);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = sub_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = Instant::now();
                        if let Ok(e) = serde_json::from_slice::<CloudEvent>(&p.payload) {
                            if tx.send((e, at)).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), sub_rx)
            .await
            .map_err(|_| BenchError::Timeout("observer SUBACK".into()))?
            .map_err(|_| BenchError::Failed("observer stopped".into()))?;

        let state = d.join("store");
        let agent_cfg = d.join("agent.toml");
        std::fs::write(
            &agent_cfg,
            format!(
                r#"store = "{STORE}"
groups = ["bench"]
state_dir = {state:?}
retry_ms = [200, 2000]
[broker]
host = "127.0.0.1"
port = {ep}
[[trusted_keys]]
id = "{id}"
public_key = "{public}"
[git]
allowed_sources = ["git://127.0.0.1:{gp}/"]
[target]
kind = "files"
"#,
                state = state.join("agent").display().to_string(),
                ep = edge.port(),
                id = key.key_id(),
                public = base64::engine::general_purpose::STANDARD.encode(key.public_key()),
                gp = daemon.port,
            ),
        )
        .map_err(setup("agent config"))?;
        let bridge_cfg = d.join("bridge.toml");
        std::fs::write(
            &bridge_cfg,
            format!(
                r#"store = "{STORE}"
groups = ["bench"]
state_dir = {state:?}
[edge]
host = "127.0.0.1"
port = {ep}
[cloud]
host = "127.0.0.1"
port = {cp}
"#,
                state = state.join("bridge").display().to_string(),
                ep = edge.port(),
                cp = cloud.port(),
            ),
        )
        .map_err(setup("bridge config"))?;
        let bridge = spawn(
            "bridge",
            &["bridge", "--config", &bridge_cfg.display().to_string()],
            &d.join("bridge.log"),
            &[],
        )?;
        let agent_cfg = agent_cfg.display().to_string();
        let agent = match &opts.agent_bin {
            Some(bin) => spawn_exe(
                bin,
                "agent",
                &["--config", &agent_cfg],
                &d.join("agent.log"),
                &[],
            )?,
            None => spawn(
                "agent",
                &["agent", "--config", &agent_cfg],
                &d.join("agent.log"),
                &[],
            )?,
        };
        Ok(Rig {
            cloud,
            edge,
            events: rx,
            agent: Some(agent),
            bridge: Some(bridge),
            brokers: vec![cloud_p, edge_p],
            daemon,
            repo,
            files,
            key,
            sequence: roost_fleet::db::now_ms(),
            state,
            observer,
            dir,
        })
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().map(|p| p.child.id()).unwrap_or(0)
    }

    /// The bridge's process id.
    pub fn bridge_pid(&self) -> u32 {
        self.bridge.as_ref().map(|p| p.child.id()).unwrap_or(0)
    }

    /// The live directory of the deployment (files target).
    pub fn current(&self) -> PathBuf {
        self.state
            .join("agent")
            .join("targets")
            .join(DEPLOYMENT)
            .join("current")
    }

    /// Commits a new revision (file `cm-000.yaml` changes) and returns its id.
    pub fn commit(&mut self, round: u64) -> Result<String, BenchError> {
        self.files.insert(
            format!("apps/{DEPLOYMENT}/cm-000.yaml"),
            configmap(0, round),
        );
        up::commit_files(&self.repo, &self.files, &format!("round {round}"))
            .map_err(setup("commit"))
    }

    /// Signs and publishes a fleet rollout of `revision` (retained, QoS 1); returns when the
    /// cloud broker acknowledged it.
    pub async fn publish(&mut self, revision: &str) -> Result<(), BenchError> {
        self.sequence += 1;
        let spec = RolloutSpec {
            schedule: Default::default(),
            deployment: DEPLOYMENT.into(),
            scope: Scope::Fleet,
            url: self.daemon.url("apps.git"),
            revision: revision.to_owned(),
            path: format!("apps/{DEPLOYMENT}"),
            policy: Policy::default(),
            not_before: None,
            remove: false,
            sequence: Some(self.sequence),
            origin: None,
        };
        cloud::rollout(
            &self.cloud.to_string(),
            &Topics::default(),
            std::slice::from_ref(&self.key),
            &spec,
        )
        .await
        .map_err(setup("rollout"))?;
        Ok(())
    }

    /// Waits for an event of `ty` about `revision` (any revision if None) arriving after
    /// `since`; returns its arrival time.
    pub async fn wait_event(
        &mut self,
        ty: EventType,
        revision: Option<&str>,
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant, BenchError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(Some((e, at))) = tokio::time::timeout_at(deadline, self.events.recv()).await
            else {
                return Err(BenchError::Timeout(format!(
                    "no {} within {timeout:?}",
                    ty.as_str()
                )));
            };
            if at < since || e.event_type() != Some(ty) {
                continue;
            }
            let ours = revision.is_none_or(|r| {
                e.rollout_ref()
                    .and_then(|x| x.revision)
                    .is_some_and(|x| x == r)
            });
            if ours {
                return Ok(at);
            }
        }
    }

    /// Publishes `revision` and waits for its `converged` event: the time it took.
    pub async fn converge(
        &mut self,
        revision: &str,
        timeout: Duration,
    ) -> Result<Duration, BenchError> {
        let t0 = Instant::now();
        self.publish(revision).await?;
        let at = self
            .wait_event(EventType::Converged, Some(revision), t0, timeout)
            .await?;
        Ok(at.saturating_duration_since(t0))
    }

    /// Where the logs are (kept only while the rig lives).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops every process (agent and bridge first, with SIGTERM).
    pub fn stop(mut self) {
        self.observer.abort();
        drop(self.agent.take());
        drop(self.bridge.take());
        self.brokers.clear();
    }
}
