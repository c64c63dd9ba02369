//! Prometheus metrics shared by the agent, the bridge and the fleet service: the MQTT link's
//! and the outbox's series, and the small HTTP server that serves a registry at `/metrics`.
//!
//! Nothing here is global: each component builds its own [`Registry`], hands the metric
//! handles to the code that counts (a handle is a few `Arc`s, an update one atomic add), and
//! serves the registry with [`serve`]. Values that live elsewhere (the outbox's backlog, the
//! fleet database) are read by a [`Refresh`] hook right before each scrape, so they cost
//! nothing between scrapes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::outbox::Outbox;

pub use prometheus_client;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listen address could not be bound.
    #[error("metrics listener {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Brings values kept elsewhere up to date right before a scrape.
pub type Refresh = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A registry and the hooks that refresh it: what `/metrics` serves.
#[derive(Clone)]
pub struct Exporter {
    registry: Arc<Registry>,
    refresh: Vec<Refresh>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("refresh_hooks", &self.refresh.len())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// Serves `registry` (complete: nothing can be registered after this).
    pub fn new(registry: Registry) -> Exporter {
        Exporter {
            registry: Arc::new(registry),
            refresh: Vec::new(),
        }
    }

    /// Adds a hook run before every scrape.
    pub fn with_refresh(mut self, f: Refresh) -> Exporter {
        self.refresh.push(f);
        self
    }

    /// The registry in the Prometheus text format (0.0.4), after running the hooks.
    pub async fn render(&self) -> String {
        for f in &self.refresh {
            f().await;
        }
        let mut out = String::new();
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            warn!(%error, "cannot encode metrics");
        }
        out
    }

    /// `GET /metrics`, to serve alone or merged into another router.
    pub fn router(&self) -> axum::Router {
        let me = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let me = me.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        me.render().await,
                    )
                }
            }),
        )
    }
}

/// Binds `addr` and serves `/metrics` until `cancel` fires (graceful: a scrape in progress
/// finishes). Returns the bound address (logged as `metrics listening`) and the server task.
pub async fn serve(
    addr: SocketAddr,
    exporter: Exporter,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "metrics listening");
    let app = exporter.router();
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
        {
            warn!(%error, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

/// A component's `/metrics` on `addr`, when one is configured: the series `register` adds,
/// brought up to date by `refresh` before every scrape. Returns the server task.
pub async fn serve_if(
    addr: Option<SocketAddr>,
    register: impl FnOnce(&mut Registry),
    refresh: Refresh,
    cancel: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, MetricsError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let mut registry = Registry::default();
    register(&mut registry);
    let exporter = Exporter::new(registry).with_refresh(refresh);
    Ok(Some(serve(addr, exporter, cancel).await?.1))
}

/// The `link` label: which broker connection (`edge`, `cloud`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    /// Link name.
    pub link: String,
}

/// MQTT connection series, per link.
#[derive(Clone, Debug, Default)]
pub struct LinkMetrics {
    connects: Family<LinkLabels, Counter>,
    disconnects: Family<LinkLabels, Counter>,
    connect_failures: Family<LinkLabels, Counter>,
    connected: Family<LinkLabels, Gauge>,
}

impl LinkMetrics {
    /// Registers `roost_mqtt_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "roost_mqtt_connects",
            "MQTT connections established (CONNACK received), per link",
            self.connects.clone(),
        );
        r.register(
            "roost_mqtt_disconnects",
            "Established MQTT connections that were lost, per link (a clean stop is not counted)",
            self.disconnects.clone(),
        );
        r.register(
            "roost_mqtt_connect_failures",
            "MQTT connection attempts that failed before a CONNACK, per link",
            self.connect_failures.clone(),
        );
        r.register(
            "roost_mqtt_connected",
            "1 while the link is connected, else 0",
            self.connected.clone(),
        );
    }

    fn labels(link: &str) -> LinkLabels {
        LinkLabels { link: link.into() }
    }

    /// A CONNACK arrived on `link`.
    pub fn connected(&self, link: &str) {
        let l = Self::labels(link);
        self.connects.get_or_create(&l).inc();
        self.connected.get_or_create(&l).set(1);
    }

    /// An established connection of `link` ended; `lost` unless the component stopped it.
    pub fn disconnected(&self, link: &str, lost: bool) {
        let l = Self::labels(link);
        if lost {
            self.disconnects.get_or_create(&l).inc();
        }
        self.connected.get_or_create(&l).set(0);
    }

    /// A connection attempt of `link` failed before its CONNACK.
    pub fn connect_failed(&self, link: &str) {
        let l = Self::labels(link);
        self.connect_failures.get_or_create(&l).inc();
        self.connected.get_or_create(&l).set(0);
    }
}

/// The outbox's series, refreshed from [`Outbox::stats`] before each scrape.
#[derive(Clone, Debug, Default)]
pub struct OutboxMetrics {
    messages: Gauge,
    bytes: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
    dropped: Counter,
    dropped_seen: Arc<AtomicU64>,
}

impl OutboxMetrics {
    /// Registers `roost_outbox_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "roost_outbox_messages",
            "Messages in the outbox not yet delivered (backlog)",
            self.messages.clone(),
        );
        r.register(
            "roost_outbox_bytes",
            "Bytes of the outbox backlog, as counted against its cap",
            self.bytes.clone(),
        );
        r.register(
            "roost_outbox_oldest_age_seconds",
            "Age of the oldest message not yet delivered (0 when the outbox is empty)",
            self.oldest_age.clone(),
        );
        r.register(
            "roost_outbox_overflow_dropped",
            "Messages dropped because the outbox reached its cap (reported in an overflow event)",
            self.dropped.clone(),
        );
    }

    /// Reads the outbox's counters now.
    pub async fn refresh(&self, outbox: &Outbox) {
        let stats = match outbox.stats().await {
            Ok(s) => s,
            Err(error) => {
                warn!(%error, "cannot read the outbox for metrics");
                return;
            }
        };
        self.messages
            .set(i64::try_from(stats.backlog).unwrap_or(i64::MAX));
        self.bytes
            .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
        let age = stats
            .oldest_created_ms
            .map(|t| (crate::outbox::now_ms().saturating_sub(t)) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.oldest_age.set(age);
        // The outbox keeps its drop count durably: the counter follows it.
        let seen = self.dropped_seen.swap(stats.dropped, Ordering::Relaxed);
        if stats.dropped > seen {
            self.dropped.inc_by(stats.dropped - seen);
        }
    }

    /// A refresh hook for `outbox`.
    pub fn refresh_hook(&self, outbox: Outbox) -> Refresh {
        let me = self.clone();
        Arc::new(move || {
            let (me, outbox) = (me.clone(), outbox.clone());
            Box::pin(async move { me.refresh(&outbox).await })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn link_series_render_in_the_prometheus_text_format() {
        let m = LinkMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.connected("edge");
        m.disconnected("edge", true);
        m.connected("edge");
        m.connect_failed("cloud");
        let text = Exporter::new(r).render().await;
        assert!(
            text.contains("# TYPE roost_mqtt_connects_total counter"),
            "{text}"
        );
        assert!(
            text.contains("roost_mqtt_connects_total{link=\"edge\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("roost_mqtt_disconnects_total{link=\"edge\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("roost_mqtt_connected{link=\"edge\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("roost_mqtt_connected{link=\"cloud\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn outbox_series_follow_its_stats() {
        let dir = tempfile::tempdir().expect("tmp");
        let ob = Outbox::open(crate::OutboxConfig::new(dir.path().join("o.db"))).expect("open");
        let m = OutboxMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        let ex = Exporter::new(r).with_refresh(m.refresh_hook(ob.clone()));
        assert!(ex.render().await.contains("roost_outbox_messages 0"));
        ob.enqueue(vec![crate::NewMessage::retained("t/a", b"x".to_vec())])
            .await
            .expect("enqueue");
        let text = ex.render().await;
        assert!(text.contains("roost_outbox_messages 1"), "{text}");
        assert!(!text.contains("roost_outbox_bytes 0\n"), "{text}");
        let ids: Vec<i64> = ob
            .peek(0, 10)
            .await
            .expect("peek")
            .iter()
            .map(|m| m.id)
            .collect();
        ob.ack_wait(ids).await.expect("ack");
        let text = ex.render().await;
        assert!(text.contains("roost_outbox_messages 0"), "{text}");
        assert!(
            text.contains("roost_outbox_oldest_age_seconds 0.0\n"),
            "{text}"
        );
    }
}
