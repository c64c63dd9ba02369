//! Reporting: events go into the outbox (gap-free `roostseq`), and the status board keeps the
//! retained status document, republished through the outbox on every change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_runtime::outbox::Payload;
use roost_runtime::{NewMessage, Outbox};
use roost_schemas::{CloudEvent, DeploymentStatus, EventType, StatusDoc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Emits events through the outbox.
#[derive(Clone, Debug)]
pub struct Reporter {
    outbox: Outbox,
    topic: String,
    source: String,
}

impl Reporter {
    /// A reporter publishing to `topic` as `source`.
    pub fn new(outbox: Outbox, topic: String, source: String) -> Reporter {
        Reporter {
            outbox,
            topic,
            source,
        }
    }

    /// Stores one event durably. Failing to store is logged: it must not stop reconciling.
    pub async fn emit(&self, ty: EventType, deployment: Option<&str>, data: serde_json::Value) {
        let ev = CloudEvent::new(&self.source, ty, deployment, data);
        match self
            .outbox
            .enqueue(vec![NewMessage::event(self.topic.clone(), ev)])
            .await
        {
            Ok(seq) => {
                info!(event = ty.as_str(), deployment = deployment.unwrap_or(""), roostseq = ?seq.first().copied().flatten(), "event")
            }
            Err(error) => warn!(%error, event = ty.as_str(), "could not store event"),
        }
    }
}

/// The per-deployment status of this store, published as the retained status document.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Mutex<BTreeMap<String, DeploymentStatus>>>,
    changed: Arc<Notify>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusBoard")
    }
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            inner: Arc::default(),
            changed: Arc::new(Notify::new()),
        }
    }
}

impl StatusBoard {
    /// Updates one deployment's entry and schedules a publish if it changed.
    pub fn update(&self, deployment: &str, f: impl FnOnce(&mut DeploymentStatus)) {
        let mut m = match self.inner.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let entry = m.entry(deployment.to_owned()).or_default();
        let before = entry.clone();
        f(entry);
        if *entry != before {
            self.changed.notify_one();
        }
    }

    /// Schedules a publish of the current document (after a reconnect: a restarted edge
    /// broker has lost the retained copy).
    pub fn touch(&self) {
        self.changed.notify_one();
    }

    /// A copy of the current entries.
    pub fn snapshot(&self) -> BTreeMap<String, DeploymentStatus> {
        match self.inner.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publishes the status document after each change (debounced), until cancelled; and
    /// once at start so a restarted agent refreshes the retained document.
    pub async fn run_publisher(
        self,
        outbox: Outbox,
        topic: String,
        store: String,
        cancel: CancellationToken,
    ) {
        self.changed.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.changed.notified() => {}
            }
            // Coalesce bursts of changes into one document.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let deployments = self.snapshot();
            let store = store.clone();
            let render = move |roostseq: u64, backlog: u64| {
                let doc = StatusDoc {
                    store: store.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                    updated_at: roost_schemas::now_rfc3339(),
                    roostseq,
                    outbox_backlog: backlog,
                    deployments: deployments.clone(),
                };
                serde_json::to_vec(&doc).unwrap_or_default()
            };
            let msg = NewMessage {
                topic: topic.clone(),
                payload: Payload::WithCounters(Arc::new(render)),
                retain: true,
                compact: true,
            };
            if let Err(error) = outbox.enqueue(vec![msg]).await {
                warn!(%error, "could not store status document");
            }
        }
    }
}
