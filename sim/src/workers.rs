//! The stores of `roost sim`, in this process or spread over worker processes.
//!
//! A bridged store holds about 24 open files (an edge broker's listener and sessions, a
//! bridge's links and SQLite buffer, an agent's outbox, ledger and Git cache), so 2,000 of
//! them need ~48,000 where this machine's hard limit is 20,000. Real stores are separate
//! machines; here they become separate processes: `roost sim` starts `roost sim --worker
//! FILE` children, each running a contiguous range of stores under its own limit. The cloud
//! broker, the Git server and the observer stay in the parent, which measures as before; the
//! CPU and memory of the workers are read from `/proc/<pid>` and added to the parent's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_agent::config::TargetConfig;
use tokio_util::sync::CancellationToken;

use crate::process::KillOnDrop;
use crate::sim::Topology;
use crate::up::{self, setup, StoreSpec, UpError};

/// Open files one store holds (estimated, with headroom).
pub fn fds_per_store(topology: Topology) -> u64 {
    match topology {
        Topology::Direct => 8,
        Topology::Bridged => 24,
    }
}

/// How many stores one process can run under the open-file limit `limit` (0: unknown, no
/// limit): 256 are kept for the process's own files (the per-store figures have headroom).
pub fn stores_per_process(topology: Topology, limit: u64) -> usize {
    if limit == 0 {
        return usize::MAX;
    }
    let usable = limit.saturating_sub(256);
    (usable / fds_per_store(topology)).max(1) as usize
}

/// Raises this process's soft open-file limit to its hard limit (children inherit it).
/// Best effort: on failure the limit stays and the stores are spread more thinly.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(%error, "could not raise the open-file limit");
            }
        }
    }
}

/// A contiguous range of simulated stores and where they connect.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoreRange {
    /// The first store's number (1-based, as in `store-0001`).
    pub first: usize,
    /// How many.
    pub count: usize,
    /// Bridged or direct.
    #[serde(with = "topology_name")]
    pub topology: Topology,
    /// The cloud broker.
    pub cloud: SocketAddr,
    /// The fleet's Git server on loopback.
    pub git_port: u16,
    /// The directory the stores' state directories go under.
    pub dir: PathBuf,
}

mod topology_name {
    use super::Topology;

    pub fn serialize<S: serde::Serializer>(t: &Topology, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match t {
            Topology::Direct => "direct",
            Topology::Bridged => "bridged",
        })
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Topology, D::Error> {
        match <String as serde::Deserialize>::deserialize(d)?.as_str() {
            "direct" => Ok(Topology::Direct),
            "bridged" => Ok(Topology::Bridged),
            other => Err(serde::de::Error::custom(format!("topology {other}"))),
        }
    }
}

/// What a worker process is told (a JSON file only its parent and it read, mode 0600: it
/// holds the benchmark's signing key, from which the stores' trusted key is written).
#[derive(serde::Serialize, serde::Deserialize)]
struct WorkerSpec {
    stores: StoreRange,
    /// The signing key's PKCS#8 document, base64.
    key_pkcs8: String,
}

/// Starts `range`'s stores (per store an agent and, bridged, an edge broker and a bridge) as
/// tasks of this process.
pub async fn start_stores(
    range: &StoreRange,
    key: &roost_schemas::SigningKey,
    cancel: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), UpError> {
    for i in range.first..range.first + range.count {
        // Paced: the cloud broker accepts about one connection per ms, and 2,000 clients
        // connecting at once on a loaded machine time out (5 s), reconnect with the same
        // client id and kick each other off: a herd that never settles.
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        let name = up::store_name(i);
        let edge = match range.topology {
            Topology::Bridged => roost_broker::spawn_free("edge").map_err(setup("edge broker"))?,
            Topology::Direct => range.cloud,
        };
        let spec = StoreSpec {
            store: name.clone(),
            groups: up::store_groups(i),
            dir: range.dir.join(&name),
            edge,
            cloud: range.cloud,
            allowed: format!("git://127.0.0.1:{}/", range.git_port),
            target: TargetConfig::Files(Default::default()),
        };
        let (mut a, b) = up::store_configs(&spec, key)?;
        if range.topology == Topology::Bridged {
            let c = cancel.clone();
            tasks.spawn(async move {
                let _ = roost_bridge::run(b, c).await;
            });
        } else {
            // No bridge to confirm delivery: the cloud broker's PUBACK is the end.
            a.file.confirm_via_bridge = Some(false);
        }
        let c = cancel.clone();
        tasks.spawn(async move {
            let _ = roost_agent::run(a, c).await;
        });
    }
    Ok(())
}

/// The worker processes of a run (none when every store runs in the parent). Dropping it
/// kills and reaps them.
pub struct Workers {
    children: Vec<KillOnDrop>,
}

impl Workers {
    /// No workers.
    pub fn none() -> Self {
        Workers {
            children: Vec::new(),
        }
    }

    /// Starts `exe sim --worker FILE` processes for `range`, at most `per_process` stores
    /// each, in ranges of equal size. Their logs go to `dir/worker-N.log`.
    pub fn start(
        exe: &Path,
        range: &StoreRange,
        per_process: usize,
        key: &roost_schemas::SigningKey,
        dir: &Path,
    ) -> Result<Self, UpError> {
        use base64::Engine as _;
        let pkcs8 = key
            .pkcs8()
            .ok_or_else(|| UpError::Invalid("the signing key has no PKCS#8 form".into()))?;
        let n = range.count.div_ceil(per_process.max(1));
        let each = range.count.div_ceil(n);
        let mut children = Vec::with_capacity(n);
        let mut first = range.first;
        let end = range.first + range.count;
        for w in 0..n {
            let count = each.min(end - first);
            let spec = WorkerSpec {
                stores: StoreRange {
                    first,
                    count,
                    ..range.clone()
                },
                key_pkcs8: base64::engine::general_purpose::STANDARD.encode(pkcs8),
            };
            let path = dir.join(format!("worker-{w}.json"));
            write_private(
                &path,
                &serde_json::to_vec(&spec).map_err(|e| UpError::Failed(e.to_string()))?,
            )?;
            let log = std::fs::File::create(dir.join(format!("worker-{w}.log")))
                .map_err(setup("worker log"))?;
            let child = KillOnDrop::spawn(
                std::process::Command::new(exe)
                    .arg("sim")
                    .arg("--worker")
                    .arg(&path)
                    .env(
                        "ROOST_LOG",
                        std::env::var("ROOST_LOG").unwrap_or("error".into()),
                    ),
                log,
            )
            .map_err(setup("worker process"))?;
            children.push(child);
            first += count;
        }
        println!(
            "sim: {} stores in {n} worker processes of up to {each} (open-file limit)",
            range.count
        );
        Ok(Workers { children })
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// CPU seconds (user + system) the workers have used so far.
    pub fn cpu_s(&self) -> f64 {
        self.children
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/stat", c.0.id())).ok())
            .map(|s| crate::sim::stat_cpu_s(&s))
            .sum()
    }

    /// Resident memory of the workers now (KiB).
    pub fn rss_kib(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.0.id())).ok())
            .filter_map(|s| crate::sim::status_kib(&s, "VmRSS:"))
            .sum()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), UpError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(setup("worker spec"))?;
    f.write_all(bytes).map_err(setup("worker spec"))
}

/// `roost sim --worker FILE`: runs the stores `FILE` names until cancelled (the parent kills
/// it at the end of its run). The file is removed once read.
pub async fn run_worker(spec: &Path, cancel: CancellationToken) -> Result<(), UpError> {
    use base64::Engine as _;
    raise_fd_limit();
    let bytes = std::fs::read(spec).map_err(setup("worker spec"))?;
    let _ = std::fs::remove_file(spec);
    let spec: WorkerSpec = serde_json::from_slice(&bytes)
        .map_err(|e| UpError::Invalid(format!("worker spec: {e}")))?;
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(&spec.key_pkcs8)
        .map_err(|e| UpError::Invalid(format!("worker key: {e}")))?;
    let key = roost_schemas::SigningKey::from_pkcs8(&pkcs8).map_err(setup("worker key"))?;
    let mut tasks = tokio::task::JoinSet::new();
    start_stores(&spec.stores, &key, &cancel, &mut tasks).await?;
    cancel.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_fit_under_the_limit_with_headroom() {
        // This machine: hard limit 20,000. 2,000 bridged stores need three processes.
        let per = stores_per_process(Topology::Bridged, 20_000);
        assert_eq!(per, 822);
        assert_eq!(2000usize.div_ceil(per), 3);
        assert!(per as u64 * fds_per_store(Topology::Bridged) + 256 <= 20_000);
        // 2,000 direct stores fit in one.
        assert!(stores_per_process(Topology::Direct, 20_000) >= 2000);
        assert_eq!(stores_per_process(Topology::Direct, 0), usize::MAX);
        assert_eq!(stores_per_process(Topology::Bridged, 100), 1);
    }
}
