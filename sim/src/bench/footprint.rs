//! `roost bench footprint`: a real `roost agent` (files target) with its edge broker, bridge
//! and a cloud broker converges a revision of N objects, then sits idle; reports the agent's
//! resident memory, its CPU over the idle window, open file descriptors, threads, and the size
//! of this binary.

use std::time::{Duration, Instant};

use super::rig::{rss_of_file, thread_names, ProcStat, Rig, RigOptions};
use super::BenchError;

/// Options.
#[derive(Debug, Clone)]
pub struct FootprintOptions {
    /// Objects in the revision.
    pub objects: usize,
    /// Idle window.
    pub idle: Duration,
    /// The agent binary: the lean `roost-agent`, or `None` for `roost agent`.
    pub agent_bin: Option<std::path::PathBuf>,
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(opts: &FootprintOptions) -> Result<serde_json::Value, BenchError> {
    let mut rig = Rig::start(&RigOptions {
        objects: opts.objects,
        agent_bin: opts.agent_bin.clone(),
    })
    .await?;
    let revision = rig.commit(1)?;
    let converge = rig.converge(&revision, Duration::from_secs(60)).await?;
    let files = std::fs::read_dir(rig.current())
        .map(|d| d.count())
        .unwrap_or(0);
    if files < opts.objects {
        return Err(BenchError::Invalid(format!(
            "converged, but {} holds {files} files, not {}",
            rig.current().display(),
            opts.objects
        )));
    }
    // Let the status document and the debounced work after convergence settle first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = rig.agent_pid();
    let before = ProcStat::read(pid);
    let t = Instant::now();
    tokio::time::sleep(opts.idle).await;
    let window = t.elapsed().as_secs_f64();
    let after = ProcStat::read(pid);
    let agent_exe = match &opts.agent_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().unwrap_or_default(),
    };
    let rss_own_binary = rss_of_file(pid, &agent_exe);
    let threads = thread_names(pid);
    let bridge = ProcStat::read(rig.bridge_pid());
    let size = |p: std::io::Result<std::path::PathBuf>| {
        p.and_then(std::fs::metadata).map(|m| m.len()).unwrap_or(0)
    };
    let binary = size(std::env::current_exe());
    let agent_binary = match &opts.agent_bin {
        Some(b) => size(Ok(b.clone())),
        None => binary,
    };
    rig.stop();
    let mib = |b: u64| ((b as f64 / 1048576.0) * 10.0).round() / 10.0;
    let idle_cpu = (after.cpu_s - before.cpu_s).max(0.0);
    Ok(serde_json::json!({
        "bench": "footprint",
        "objects": opts.objects,
        "converge_ms": converge.as_millis() as u64,
        "idle_s": (window * 10.0).round() / 10.0,
        "agent_rss_bytes": after.rss_bytes,
        "agent_rss_mib": mib(after.rss_bytes),
        // VmRSS = anonymous (heap, stacks, relocated data) + file-backed (binary, shared
        // libraries) + shmem. The own binary's pages (smaps) include its relocated data.
        "agent_rss_anon_mib": mib(after.rss_anon_bytes),
        "agent_rss_file_mib": mib(after.rss_file_bytes),
        "agent_rss_own_binary_mib": mib(rss_own_binary),
        "agent_idle_cpu_s": (idle_cpu * 100.0).round() / 100.0,
        "agent_idle_cpu_pct": ((idle_cpu / window * 100.0) * 100.0).round() / 100.0,
        "agent_cpu_total_s": (after.cpu_s * 100.0).round() / 100.0,
        "agent_fds": after.fds,
        "agent_threads": after.threads,
        "agent_thread_names": threads,
        "bridge_rss_mib": ((bridge.rss_bytes as f64 / 1048576.0) * 10.0).round() / 10.0,
        "bridge_threads": bridge.threads,
        "agent_binary": if opts.agent_bin.is_some() { "roost-agent" } else { "roost agent" },
        "agent_binary_bytes": agent_binary,
        "agent_binary_mib": ((agent_binary as f64 / 1048576.0) * 10.0).round() / 10.0,
        "binary_bytes": binary,
        "binary_mib": ((binary as f64 / 1048576.0) * 10.0).round() / 10.0,
    }))
}
