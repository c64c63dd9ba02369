//! `roost bench`: the benchmarks behind bench/README.md that need real processes or a backlog
//! (`footprint`, `latency`, `bridge-load`, `outbox`). Each prints figures (and one JSON line
//! with `--json`); none asserts a time. `roost sim` is the fleet benchmark.

pub mod bridge_load;
pub mod footprint;
pub mod inventory;
pub mod latency;
pub mod outbox;
mod rig;

pub use rig::{ProcStat, Rig, RigOptions};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The run cannot start as asked; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A step of setting the run up failed.
    #[error("{what}")]
    Setup {
        /// The step.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: crate::up::BoxError,
    },
    /// A component stopped or refused what the benchmark needs.
    #[error("{0}")]
    Failed(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Maps an error of the step `what` to [`BenchError::Setup`], keeping it as the source.
pub(crate) fn setup<E: Into<crate::up::BoxError>>(what: &'static str) -> impl Fn(E) -> BenchError {
    move |e| BenchError::Setup {
        what,
        source: e.into(),
    }
}

/// Percentiles of a list of milliseconds, as JSON (`p50`, `p99`, `max`, `n`).
pub fn summary_ms(v: &mut [f64]) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        (v[rank.clamp(1, v.len()) - 1] * 10.0).round() / 10.0
    };
    serde_json::json!({"p50": pick(50.0), "p99": pick(99.0), "max": pick(100.0), "n": v.len()})
}

/// A fresh temporary directory for one run, removed on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/roost-bench-WHAT-PID-RANDOM`.
    pub fn new(what: &str) -> Result<TempDir, BenchError> {
        let p = std::env::temp_dir().join(format!(
            "roost-bench-{what}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).map_err(setup("temp dir"))?;
        Ok(TempDir(p))
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_uses_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = super::summary_ms(&mut v);
        assert_eq!(s["p50"], 50.0);
        assert_eq!(s["p99"], 99.0);
        assert_eq!(s["max"], 100.0);
        assert_eq!(s["n"], 100);
    }
}
