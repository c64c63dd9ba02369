//! `roost status`: the fleet as a table (source vs target), from the broker or the database.

use std::path::PathBuf;
use std::time::Duration;

use roost_fleet::db::{now_ms, FleetDb};
use roost_fleet::{cloud, view};
use roost_runtime::process::interruptible;
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::Topics;
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

/// Arguments of `roost status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Cloud broker HOST:PORT or mqtts://HOST:PORT (reads the retained documents); several
    /// comma-separated (a cluster's nodes: the next is tried when one fails).
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
    /// Only stores whose inventory labels match (kubectl's -l form:
    /// `region=us-south,format in (drive-thru),!legacy`).
    #[arg(long, short = 'l')]
    selector: Option<roost_schemas::Selector>,
    /// Add a LABELS column (the stores' inventory labels).
    #[arg(long)]
    show_labels: bool,
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
}

pub async fn run(a: StatusArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let topics = Topics::default();
    let compare = a
        .compare
        .map(|c| -> anyhow::Result<(view::Selector, view::Selector)> {
            let parse = |s: &str| s.parse::<view::Selector>().map_err(anyhow::Error::msg);
            Ok((parse(&c[0])?, parse(&c[1])?))
        })
        .transpose()?;
    let filter = view::Filter {
        group: a.group,
        phase: a.phase,
        stale: a.stale,
        deployment: a.deployment,
        store: None,
        selector: a.selector,
    };
    let db = match a.db {
        Some(d) => Some(FleetDb::open_blocking(&d).await?),
        None => None,
    };
    let broker = match (&db, a.broker) {
        (Some(_), _) => None,
        (None, Some(b)) => Some(a.security.target(&b)?),
        (None, None) => anyhow::bail!("give --broker or --db"),
    };
    loop {
        let inputs = match (&db, &broker) {
            (Some(db), _) => db.call(view::load).await?,
            (None, Some(broker)) => {
                let filters = vec![
                    topics.all_stores(StoreTopicKind::Status),
                    topics.all_stores(StoreTopicKind::Presence),
                    topics.all_profiles(),
                ];
                let read = async {
                    Ok(cloud::read_retained(broker, &filters, Duration::from_secs(a.wait)).await?)
                };
                view::from_retained(&topics, &interruptible(&cancel, read).await?)
            }
            (None, None) => anyhow::bail!("give --broker or --db"),
        };
        let v = view::build(&inputs, now_ms());
        let text = match (&compare, a.json) {
            (Some((x, y)), true) => serde_json::to_string_pretty(&view::compare(&v, x, y))? + "\n",
            (Some((x, y)), false) => view::render_compare(x, y, &view::compare(&v, x, y)),
            (None, true) => {
                let rows = view::filter(&v, &filter);
                serde_json::to_string_pretty(&serde_json::json!({
                    "generated_at": v.generated_at,
                    "summary": v.summary,
                    "broker_audit": v.broker_audit,
                    "notifications": v.notifications,
                    "stores": rows,
                }))? + "\n"
            }
            (None, false) => {
                view::render_summary(&v.summary)
                    + &view::render_audit(v.broker_audit.as_ref())
                    + &roost_fleet::db::notify::render_failing(v.notifications.as_ref())
                    + &view::render(&view::filter(&v, &filter), a.show_labels)
            }
        };
        let Some(every) = a.watch else {
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
    Ok(())
}
