//! `roost events`: follow the event stream.

use std::time::Duration;

use roost_fleet::cloud;
use roost_schemas::topics::StoreTopicKind;
use roost_schemas::Topics;
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

/// Arguments of `roost events`.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// Cloud broker HOST:PORT or mqtts://HOST:PORT.
    #[arg(long, env = "ROOST_BROKER")]
    broker: String,
    #[command(flatten)]
    security: BrokerSecurity,
    /// Only this store.
    #[arg(long)]
    store: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<usize>,
}

pub async fn run(a: EventsArgs, cancel: CancellationToken) -> anyhow::Result<()> {
    let topics = Topics::default();
    let filter = match &a.store {
        Some(s) => topics.events(s),
        None => topics.all_stores(StoreTopicKind::Events),
    };
    let broker = a.security.target(&a.broker)?;
    let (client, mut ev) = cloud::connect(&broker, "roost-events")?;
    let mut seen = 0usize;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            e = ev.poll() => match e {
                // A clean session: subscribe again on every connection.
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    tracing::info!(%filter, "following events");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    println!("{}", String::from_utf8_lossy(&p.payload));
                    seen += 1;
                    if a.count.is_some_and(|c| seen >= c) { break; }
                }
                Ok(_) => {}
                Err(e) => {
                    // A TLS or auth problem says what is wrong; retried all the same.
                    eprintln!(
                        "roost events: {}; reconnecting",
                        roost_runtime::error_chain(&broker.error(e))
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}
