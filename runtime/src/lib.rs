//! Shared runtime for roost's components: the durable SQLite outbox and the MQTT link task
//! that drains it, its transport security (TLS, credentials), reconnect backoff, the metrics
//! server, and the process glue every binary runs in (logging, signals, shutdown). The agent
//! and the bridge both use these, so that delivery guarantees are implemented (and tested)
//! once.

pub mod backoff;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod process;
pub mod sealed;
pub mod security;
pub mod sqlite;

pub use backoff::Backoff;
pub use link::{
    next_address, suback_refused, BrokerAddr, DirectMessage, Endpoint, Incoming, Link, LinkConfig,
    LinkError, LinkHandle, Will,
};
pub use metrics::{Exporter, LinkMetrics, MetricsError, OutboxMetrics};
pub use outbox::{
    Durability, NewMessage, Outbox, OutboxConfig, OutboxError, OutboxStats, Payload, StateWrite,
};
pub use security::{Password, Security, SecurityError, TlsFiles};

/// An error with its chain of causes, `outer: cause: root`, for logs and messages (a cause
/// whose text the outer message already contains is not repeated).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Installs the process-wide rustls crypto provider (ring) once. rumqttc and kube both use
/// rustls; without an explicit provider, building a client can panic.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
