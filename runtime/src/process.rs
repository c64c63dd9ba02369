//! What every roost process does around its command: logging, the tokio runtime, SIGTERM
//! and SIGINT handling with a shutdown deadline, and the exit status. Shared by `roost` and
//! the store's `roost-agent` binary. A process that fetches Git over https registers the
//! agent's transport (`roost_agent::git_https::register`) before calling [`main`], while no
//! other thread exists.

use std::future::Future;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, fields, and the current span's
    /// fields as well as every enclosing span's.
    Json,
}

/// The log filter of the long-running store and fleet services.
pub const SERVICE_LOG: &str =
    "warn,roost=info,roost_agent=info,roost_bridge=info,roost_fleet=info,roost_runtime=info,rumqttd=error";

/// Logs to stderr in `format`, filtered by `ROOST_LOG` or else `default`.
pub fn init_tracing(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ROOST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Span fields (store, deployment, revision, sequence) go with every line, so a log
        // pipeline can filter on them without parsing messages.
        LogFormat::Json => b
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
        LogFormat::Text => b.init(),
    }
}

/// How long a signal-initiated shutdown may take before the process gives up on it. Longer
/// than the agent's own bounded waits (10 s for its tasks, then 2 s for its MQTT link), so
/// that those get their chance first.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// A signal that asks the process to stop.
#[derive(Clone, Copy, Debug)]
enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }

    /// The shell's convention for "ended by this signal": 128 + its number.
    fn exit_code(self) -> u8 {
        match self {
            StopSignal::Term => 128 + 15,
            StopSignal::Int => 128 + 2,
        }
    }
}

/// SIGTERM and SIGINT handlers. Installed before any command starts, so that a signal never
/// meets the default disposition (which kills the process without flushing anything).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers; needs a runtime context.
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Term,
            _ = self.int.recv() => StopSignal::Int,
        }
    }
}

/// On the first signal: cancel `cancel` (every long-running command stops on it and returns
/// normally, exit 0) and arm a hard deadline. A second signal, or the deadline, ends the
/// process at once with a non-zero status.
fn stop_on_signals(
    mut signals: Signals,
    cancel: CancellationToken,
    first: Arc<OnceLock<StopSignal>>,
) {
    tokio::spawn(async move {
        let sig = signals.recv().await;
        let _ = first.set(sig);
        tracing::info!(signal = sig.name(), "stopping");
        cancel.cancel();
        // A plain thread, not a tokio timer: the deadline must hold even if the runtime is
        // wedged (a blocked worker is exactly what it is for).
        let _ = std::thread::Builder::new()
            .name("shutdown-deadline".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_DEADLINE);
                eprintln!(
                    "roost: still not stopped {} s after {}; exiting without finishing",
                    SHUTDOWN_DEADLINE.as_secs(),
                    sig.name()
                );
                std::process::exit(1);
            });
        let again = signals.recv().await;
        eprintln!(
            "roost: {} during shutdown; exiting without finishing",
            again.name()
        );
        std::process::exit(i32::from(again.exit_code()));
    });
}

/// A command that does not stop on the cancellation token itself was interrupted.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;

/// Runs a one-shot command until it finishes or a signal arrives (then `Interrupted`).
pub async fn interruptible<T>(
    cancel: &CancellationToken,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        _ = cancel.cancelled() => Err(Interrupted.into()),
    }
}

/// Runs `command` on a tokio runtime with the signal handling above and turns its result
/// into the exit status. `tiny`: one runtime thread (a store's agent, a small service on a
/// node shared with the workloads; its SQLite and git work runs on blocking threads that
/// end when idle); otherwise a worker per core. `max_blocking`: the most blocking threads
/// (tokio's default, 512, when `None`).
pub fn main<F, Fut>(tiny: bool, max_blocking: Option<usize>, command: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::install_crypto_provider();
    let mut builder = if tiny {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(n) = max_blocking {
        builder.max_blocking_threads(n.max(1));
    }
    let rt = match builder
        .enable_all()
        .thread_keep_alive(Duration::from_secs(5))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roost: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = {
        let _guard = rt.enter();
        match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("roost: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let cancel = CancellationToken::new();
    let stopped_by = Arc::new(OnceLock::new());
    let result = rt.block_on(async {
        stop_on_signals(signals, cancel.clone(), stopped_by.clone());
        command(cancel).await
    });
    // Blocking tasks still running (a git fetch abandoned at shutdown) must not hold the
    // process: everything that needed flushing was awaited by the command.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => {
            let sig = stopped_by.get().copied().unwrap_or(StopSignal::Int);
            eprintln!("roost: interrupted by {}", sig.name());
            ExitCode::from(sig.exit_code())
        }
        Err(e) => {
            // The chain with each cause once: some libraries' errors (rumqttc's) repeat their
            // source in their own message.
            eprintln!("roost: {}", crate::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
