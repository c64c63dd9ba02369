//! `roost agent`: the store agent, and `roost agent rbac`.

use std::net::SocketAddr;
use std::path::PathBuf;

use roost_agent::config::{AgentFile, TargetConfig};
use roost_agent::targets::rbac;
use tokio_util::sync::CancellationToken;

/// Arguments of `roost agent`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    /// Agent TOML configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    sub: Option<AgentCmd>,
    /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

/// `roost agent` subcommands.
#[derive(clap::Subcommand)]
enum AgentCmd {
    /// Print (YAML for `kubectl apply -f -`) exactly the RBAC the agent's Kubernetes policy
    /// needs: per allowed namespace a Role and RoleBinding for the allowed kinds, a
    /// ClusterRole for discovery and (only with allow_cluster_scoped) cluster-scoped kinds.
    Rbac {
        /// Agent TOML configuration (only its [target] is read).
        #[arg(long)]
        config: PathBuf,
        /// The agent's ServiceAccount (with --namespace).
        #[arg(long, requires = "namespace", conflicts_with = "user")]
        service_account: Option<String>,
        /// The ServiceAccount's namespace.
        #[arg(long, requires = "service_account")]
        namespace: Option<String>,
        /// The agent's user name (kubeconfig credentials) instead of a ServiceAccount.
        #[arg(long)]
        user: Option<String>,
        /// Name of the Roles, ClusterRole and bindings.
        #[arg(long, default_value = "roost-agent")]
        name: String,
        /// With no allowed_namespaces in the policy: grant the kinds in every namespace.
        #[arg(long)]
        cluster_wide: bool,
    },
}

pub async fn run(a: AgentArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    match a.sub {
        Some(AgentCmd::Rbac {
            config,
            service_account,
            namespace,
            user,
            name,
            cluster_wide,
        }) => {
            let file = AgentFile::read(&config)?;
            let TargetConfig::Kubernetes(policy) = &file.target else {
                anyhow::bail!("{}: [target] kind is not \"kubernetes\"", config.display());
            };
            let subject = match (service_account, namespace, user) {
                (_, _, Some(name)) => rbac::Subject::User { name },
                (Some(name), Some(namespace), None) => {
                    rbac::Subject::ServiceAccount { name, namespace }
                }
                _ => rbac::Subject::ServiceAccount {
                    name: "roost-agent".into(),
                    namespace: "roost-system".into(),
                },
            };
            let opts = rbac::RbacOptions { name, cluster_wide };
            let objects = rbac::rbac_for(policy, &subject, &opts)?;
            print!(
                "{}",
                rbac::to_yaml(&rbac::header(policy, &subject), &objects)?
            );
        }
        None => {
            let Some(config) = a.config else {
                anyhow::bail!("roost agent needs --config FILE (or a subcommand: rbac)");
            };
            roost_agent::run_file(&config, a.metrics_listen, cancel).await?;
        }
    }
    Ok(())
}
