//! `roost rollout`: sign and publish a rollout, and with `--wait` follow the stores.

use std::path::PathBuf;
use std::time::Duration;

use roost_fleet::cloud::{self, RolloutSpec};
use roost_runtime::process::interruptible;
use roost_schemas::{Policy, Scope, Topics};
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

/// Arguments of `roost rollout`.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// Broker HOST:PORT or mqtts://HOST:PORT; several comma-separated (a cluster's nodes:
    /// the next is tried when one fails).
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
    /// Replace `${roost.…}` variables in the manifests with each store's values
    /// (`policy.substitute`).
    #[arg(long)]
    substitute: bool,
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

pub async fn run(a: RolloutArgs, cancel: CancellationToken) -> anyhow::Result<()> {
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
    let revision =
        if a.remove && a.revision.is_empty() {
            String::new()
        } else {
            let repo = a.repo.clone();
            let rev = a.revision.clone();
            interruptible(&cancel, async {
                Ok(tokio::task::spawn_blocking(move || {
                    roost_fleet::git::resolve_revision(&repo, &rev)
                })
                .await??)
            })
            .await?
        };
    let spec = RolloutSpec {
        schedule: Default::default(),
        deployment: a.deployment,
        scope,
        url: a.repo,
        revision,
        path: a.path,
        policy: Policy {
            on_failure: None,
            prune: !a.no_prune,
            self_heal: !a.no_self_heal,
            health_timeout_s: a.health_timeout,
            substitute: a.substitute,
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
            interruptible(&cancel, async { Ok(watch.wait(&target, timeout).await?) }).await?;
        for line in report.lines() {
            println!("{line}");
        }
        if let Some(why) = report.failure() {
            anyhow::bail!(why);
        }
    }
    Ok(())
}
