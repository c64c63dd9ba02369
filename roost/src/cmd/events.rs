//! `roost events`: follow the event stream.

use std::time::Duration;

use roost_schemas::topics::StoreTopicKind;
use roost_schemas::Topics;
use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::BrokerSecurity;

/// Arguments of `roost events`.
#[derive(clap::Args)]
pub struct EventsArgs {
    /// Cloud broker HOST:PORT or mqtts://HOST:PORT; several comma-separated (a cluster's
    /// nodes: the next is tried when one fails).
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
    let id = format!("roost-events-{:016x}", rand::random::<u64>());
    let count = broker.addresses().len();
    let mut at = 0usize;
    let (mut client, mut ev) = rumqttc::AsyncClient::new(broker.options(&id, at)?, 1024);
    let mut seen = 0usize;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            e = ev.poll() => match e {
                // A clean session: subscribe again on every connection.
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if roost_runtime::suback_refused(&ack) {
                        // Not following: a failed connection, tried again at the next address.
                        eprintln!("roost events: {} refused the subscription; reconnecting", broker.only(at).addresses()[0]);
                        at = roost_runtime::next_address(at, count);
                        (client, ev) = rumqttc::AsyncClient::new(broker.options(&id, at)?, 1024);
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    } else {
                        tracing::info!(%filter, "following events");
                    }
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
                        roost_runtime::error_chain(&broker.only(at).error(e))
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if count > 1 {
                        at = roost_runtime::next_address(at, count);
                        (client, ev) = rumqttc::AsyncClient::new(broker.options(&id, at)?, 1024);
                    }
                }
            }
        }
    }
    let _ = client.try_disconnect();
    Ok(())
}
