//! A real HTTP receiver for the notification tests: it records every request (path, headers,
//! body) and answers 200, or 500 while it is told to fail; it runs until dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};

/// One request as received, with what it was answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path and query.
    pub path: String,
    /// Headers, names lower-case.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
    /// What it was answered.
    pub status: u16,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The body as JSON (Null when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    failing: bool,
}

/// The receiver.
pub struct Receiver {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: tokio_util::sync::DropGuard,
}

impl Receiver {
    /// Starts one on a free loopback port.
    pub async fn start() -> Receiver {
        let state: Arc<Mutex<State>> = Arc::default();
        let s2 = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = s2.clone();
            async move {
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let status = if s.failing { 500 } else { 200 };
                s.received.push(Received {
                    path: uri.to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                        .collect(),
                    body: body.to_vec(),
                    status,
                });
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("address");
        let cancel = tokio_util::sync::CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(c2.cancelled_owned())
                .await;
        });
        Receiver {
            addr,
            state,
            _stop: cancel.drop_guard(),
        }
    }

    /// While `failing`, every request is answered 500.
    pub fn set_failing(&self, failing: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failing = failing;
    }

    /// Every request so far whose path starts with `prefix`.
    pub fn received(&self, prefix: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Those answered 200.
    pub fn accepted(&self, prefix: &str) -> Vec<Received> {
        self.received(prefix)
            .into_iter()
            .filter(|r| r.status == 200)
            .collect()
    }
}
