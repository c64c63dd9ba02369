//! `roost broker`: an embedded MQTT broker (rumqttd) from a configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

pub const ABOUT: &str = "An embedded MQTT broker (rumqttd) from a configuration file";

pub const LONG_ABOUT: &str = "An embedded MQTT broker (rumqttd) from a configuration file \
(broker-config/: edge.toml, cloud.toml on loopback; edge-tls.toml, cloud-tls.toml with TLS and \
client certificates).

It refuses a listener on a non-loopback address that lacks TLS or authentication (client \
certificates via tls.capath, or connections.auth), unless --insecure is given, and checks the \
TLS files before it starts.

rumqttd has NO topic ACLs (rumqtt issue 495): every authenticated client may publish and \
subscribe to every topic, so one store could publish another store's status or a rollout. \
For per-store authorization run mosquitto (or another broker with ACLs) as the cloud broker: \
broker-config/mosquitto-cloud-tls.conf with broker-config/mosquitto-acl.conf.";

/// Arguments of `roost broker`.
#[derive(clap::Args)]
pub struct BrokerArgs {
    /// rumqttd TOML configuration (see broker-config/).
    #[arg(long)]
    config: PathBuf,
    /// Override the address of the first [v4.*] listener (in name order).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Run even if a listener on a non-loopback address has no TLS or no authentication.
    #[arg(long)]
    insecure: bool,
}

pub async fn run(a: BrokerArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let cfg = roost_broker::load_config(&a.config, a.listen)?;
    roost_broker::check_config(&cfg, &a.config.display().to_string(), a.insecure)?;
    // rumqttd's `Broker::start()` never returns and has no shutdown API: run it on a
    // thread of its own and, on a signal, leave it there. Returning from `main` ends
    // the process and the broker with it; it holds nothing to flush (no persistence).
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let _ = tx.send(roost_broker::run_forever(cfg));
        })?;
    tokio::select! {
        r = rx => match r {
            Ok(Ok(())) => anyhow::bail!("the broker stopped by itself"),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => anyhow::bail!("the broker thread died"),
        },
        _ = cancel.cancelled() => tracing::info!("broker stopped"),
    }
    Ok(())
}
