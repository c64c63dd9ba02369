//! A test double of the Kubernetes API server.
//!
//! [`TestApiServer`] is an in-process HTTP server (plain HTTP on `127.0.0.1`) that
//! speaks the parts of the Kubernetes REST API roost's Kubernetes target uses, with
//! the semantics of a real API server, so that scenarios written against it also
//! hold against a real cluster:
//!
//! * discovery (`/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`, `/version`),
//!   including the kinds of established CustomResourceDefinitions;
//! * get, list (label/field selectors, `limit`/`continue`), watch (resourceVersion
//!   replay, BOOKMARKs, 410 Gone for expired versions, `sendInitialEvents`);
//! * create, update, JSON/merge/strategic merge patch and server-side apply with
//!   `metadata.managedFields` ownership, conflicts, `force` and `dryRun`;
//! * delete with finalizers and propagation policies, namespace termination,
//!   ownerReference garbage collection;
//! * small controllers: ReplicaSets and status for Deployments, StatefulSet/DaemonSet/
//!   Job status, PVC binding, CRD `NamesAccepted`/`Established`, Endpoints and
//!   EndpointSlices for Services (these follow kube-controller-manager v1.24).
//!
//! What it emulates and what it does not is written down in `README.md` next to
//! this file.

mod api;
mod controllers;
mod defaults;
mod deployments;
mod endpoints;
mod error;
mod fields;
mod patch;
mod resources;
mod selectors;
mod store;
mod watch;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use serde_json::json;

use api::Inner;
use fields::Scope;
use store::ObjKey;

/// How often watches that allow bookmarks get a BOOKMARK event.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// A running test Kubernetes API server. Shuts down when dropped.
pub struct TestApiServer {
    inner: Arc<Inner>,
    url: String,
}

impl TestApiServer {
    /// Start on `127.0.0.1:0` (plain HTTP) in the current tokio runtime.
    pub async fn start() -> anyhow::Result<TestApiServer> {
        // kube's rustls stack needs a process-wide crypto provider; ignore "already installed".
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the test API server")?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::new(addr.to_string(), BOOKMARK_INTERVAL));
        bootstrap(&inner);
        let app = Router::new()
            .fallback(api::handle)
            .with_state(inner.clone());
        let shutdown = inner.shutdown.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "test API server stopped");
            }
        });
        tokio::spawn(controllers::run(inner.clone()));
        let url = format!("http://{addr}");
        tracing::debug!(%url, "test Kubernetes API server started");
        Ok(TestApiServer { inner, url })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A kube client talking to this server (default namespace `default`).
    ///
    /// # Panics
    /// If the client cannot be built (no TLS is involved, so this does not happen in practice).
    pub fn client(&self) -> kube::Client {
        let uri: axum::http::Uri = self.url.parse().expect("the server URL is a valid URI");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        kube::Client::try_from(config).expect("building a kube client for the test API server")
    }

    /// Write a kubeconfig file pointing at this server (context `roost-test`).
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: roost-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: roost-test\n  context:\n    cluster: roost-test\n    user: roost-test\n    namespace: default\n\
             current-context: roost-test\n\
             preferences: {{}}\n\
             users:\n\
             - name: roost-test\n  user:\n    token: roost-test-token\n",
            url = self.url
        );
        std::fs::write(path, text).with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Workload knob: the Deployment (or StatefulSet/DaemonSet/Job) `namespace/name`
    /// never becomes available.
    pub fn never_available(&self, namespace: &str, name: &str) {
        self.inner
            .lock()
            .never_available
            .insert(format!("{namespace}/{name}"));
    }

    /// Drop the watch event history: every watch resuming from an older resourceVersion
    /// (and every `continue` token) then gets 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        self.inner.lock().compact();
    }

    /// Shut down: stop accepting connections, end open watches and the controllers.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The objects a fresh cluster has: system namespaces and the `kubernetes` Service.
fn bootstrap(inner: &Inner) {
    let mut store = inner.lock();
    let now = api::now();
    let mut create = |group: &str, plural: &str, ns: &str, obj: serde_json::Value| {
        let Some(rt) = resources::builtin(group, plural) else {
            return;
        };
        let name = api::meta_str(&obj, "name").unwrap_or_default().to_string();
        let scope = Scope::Main {
            status_subresource: rt.status_subresource,
        };
        match api::prepare(&mut store, &rt, None, obj, scope, ns, &name, &now) {
            Ok(mut o) => {
                api::record(
                    &rt,
                    &json!({}),
                    &mut o,
                    &json!({}),
                    scope,
                    "kube-apiserver",
                    &now,
                );
                api::commit(
                    &mut store,
                    ObjKey::new(group, plural, ns, &name),
                    None,
                    o,
                    false,
                );
            }
            Err(e) => tracing::warn!(message = %e.message, "bootstrap object rejected"),
        }
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        create(
            "",
            "namespaces",
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    create(
        "",
        "services",
        "default",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
        }),
    );
    // The apiserver keeps the endpoints of its own (selectorless) Service.
    create(
        "",
        "endpoints",
        "default",
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}],
        }),
    );
    create(
        resources::DISCOVERY_GROUP,
        "endpointslices",
        "default",
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }),
    );
}
