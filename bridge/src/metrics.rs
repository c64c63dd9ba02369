//! The bridge's Prometheus series: messages forwarded up and down, upward messages dropped by
//! reason (read from [`UpwardStats`] at scrape time, so they are counted once), the cloud-bound
//! outbox, and both MQTT links (`edge`, `cloud`).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use roost_runtime::{LinkMetrics, OutboxMetrics};

use crate::upward::{DropReason, UpwardStats};

/// The bridge's metrics.
#[derive(Clone, Debug, Default)]
pub struct BridgeMetrics {
    /// Upward counts (also read by tests and whoever started the bridge).
    pub upward: Arc<UpwardStats>,
    /// Desired-state envelopes passed down to the edge broker.
    pub down: Counter,
    /// Both links' connection series.
    pub link: LinkMetrics,
    /// The cloud-bound outbox.
    pub outbox: OutboxMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Encodes the forwarded/dropped counters from their sources at scrape time.
#[derive(Debug)]
struct Forwarding {
    upward: Arc<UpwardStats>,
    down: Counter,
}

impl Collector for Forwarding {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        {
            let mut m = encoder.encode_descriptor(
                "roost_bridge_forwarded",
                "Messages forwarded: up (status and events into the cloud-bound outbox) and down (desired state to the edge broker)",
                None,
                MetricType::Counter,
            )?;
            for (direction, v) in [("up", self.upward.forwarded()), ("down", self.down.get())] {
                let labels = DirectionLabels { direction };
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "roost_bridge_dropped",
                "Upward messages dropped (acknowledged at the edge, never forwarded), by reason",
                None,
                MetricType::Counter,
            )?;
            for r in DropReason::ALL {
                let labels = ReasonLabels { reason: r.as_str() };
                ConstCounter::new(self.upward.dropped(r)).encode(m.encode_family(&labels)?)?;
            }
        }
        let gauges = [
            (
                "roost_bridge_cloud_confirmed_roostseq",
                "The fleet database's latest end-to-end confirmation for this store (roostseq)",
                self.upward.cloud_confirmed(),
            ),
            (
                "roost_bridge_holding_for_confirmation",
                "1 while events stay in the outbox until the fleet confirms them (0: deleted at the cloud broker's PUBACK)",
                u64::from(self.upward.holding()),
            ),
        ];
        for (name, help, v) in gauges {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "roost_bridge_confirmation_stall_resends",
            "Times the unconfirmed events were sent again because no confirmation came",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.upward.stall_resends()).encode(m)?;
        Ok(())
    }
}

impl BridgeMetrics {
    /// Metrics counting upward messages in `upward`.
    pub fn with_upward(upward: Arc<UpwardStats>) -> BridgeMetrics {
        BridgeMetrics {
            upward,
            ..BridgeMetrics::default()
        }
    }

    /// Registers every series.
    pub fn register(&self, r: &mut Registry) {
        r.register_collector(Box::new(Forwarding {
            upward: self.upward.clone(),
            down: self.down.clone(),
        }));
        self.link.register(r);
        self.outbox.register(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwarded_and_dropped_come_from_the_upward_stats() {
        let m = BridgeMetrics::default();
        let mut r = Registry::default();
        m.register(&mut r);
        m.upward.forwarded_one();
        m.upward.forwarded_one();
        m.upward.dropped_one(DropReason::Schema);
        m.down.inc();
        m.upward.confirmed(42, true);
        m.upward.stall_resend();
        let text = roost_runtime::Exporter::new(r).render().await;
        for want in [
            "# TYPE roost_bridge_forwarded_total counter",
            "roost_bridge_forwarded_total{direction=\"up\"} 2",
            "roost_bridge_forwarded_total{direction=\"down\"} 1",
            "roost_bridge_dropped_total{reason=\"schema\"} 1",
            "roost_bridge_dropped_total{reason=\"foreign_topic\"} 0",
            "roost_bridge_cloud_confirmed_roostseq 42",
            "roost_bridge_holding_for_confirmation 1",
            "roost_bridge_confirmation_stall_resends_total 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
