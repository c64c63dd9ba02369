//! Watches: a chunked stream of newline-delimited JSON watch events, replayed
//! from the store's event history after the requested resourceVersion.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, Inner, Req, Target};
use super::error::{ApiError, ApiResult, Cause};
use super::resources::ResourceType;
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{EventType, Record};

/// What one watch selects and how it renders objects.
struct Filter {
    rt: ResourceType,
    namespace: Option<String>,
    label: LabelSelector,
    field: FieldSelector,
    meta_only: bool,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.label.matches(obj) && self.field.matches(obj)
    }

    fn line(&self, etype: &str, obj: &Value) -> Bytes {
        event_line(etype, api::output(&self.rt, obj, self.meta_only))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let (kind, api_version) = if self.meta_only {
            (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            )
        } else {
            (self.rt.kind.clone(), self.rt.api_version())
        };
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line(
            "BOOKMARK",
            json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
        )
    }

    /// The event (if any) this watch sees for one store change.
    fn translate(&self, r: &Record) -> Option<Bytes> {
        if r.key.group != self.rt.group || r.key.plural != self.rt.plural {
            return None;
        }
        if self
            .namespace
            .as_ref()
            .is_some_and(|ns| *ns != r.key.namespace)
        {
            return None;
        }
        let now = self.matches(&r.object);
        match r.etype {
            EventType::Added => now.then(|| self.line("ADDED", &r.object)),
            EventType::Deleted => now.then(|| self.line("DELETED", &r.object)),
            EventType::Modified => {
                let before = r.prev.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(self.line("MODIFIED", &r.object)),
                    (false, true) => Some(self.line("ADDED", &r.object)),
                    (true, false) => Some(self.line("DELETED", &r.object)),
                    (false, false) => None,
                }
            }
        }
    }
}

fn event_line(etype: &str, object: Value) -> Bytes {
    let mut s = json!({"type": etype, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn error_line(e: &ApiError) -> Bytes {
    event_line("ERROR", e.to_status())
}

fn expired(requested: u64, current: u64) -> ApiError {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {requested} ({current})"),
    )
}

/// Start a watch (`?watch=true`) and answer with its streaming body.
pub(crate) fn start(inner: &Arc<Inner>, req: &Req, t: Target) -> ApiResult<Response> {
    let (label, field) = api::selectors(req, &t.rt)?;
    let bookmarks = matches!(req.q("allowWatchBookmarks"), Some("true" | "1"));
    let send_initial = req.q("sendInitialEvents") == Some("true");
    if send_initial {
        let mut causes = Vec::new();
        if !bookmarks {
            causes.push(Cause::forbidden(
                "allowWatchBookmarks",
                "sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
        if req.q("resourceVersionMatch") != Some("NotOlderThan") {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid_kind(
                "ListOptions",
                "meta.k8s.io",
                "",
                causes,
            ));
        }
    }
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let filter = Filter {
        rt: t.rt,
        namespace: t.namespace,
        label,
        field,
        meta_only: req.meta_only(),
    };
    let rv_param = req.q("resourceVersion").unwrap_or("").to_string();

    let mut initial = Vec::new();
    let mut done = false;
    let cursor = {
        let store = inner.lock();
        let current = store.rv();
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            // Synthetic ADDED events for the current state, then changes from now on.
            for (_, o) in store.objects_in(
                &filter.rt.group,
                &filter.rt.plural,
                filter.namespace.as_deref(),
            ) {
                if filter.matches(o) {
                    initial.push(filter.line("ADDED", o));
                }
            }
            if send_initial {
                initial.push(filter.bookmark(current, true));
            }
            current
        } else {
            let n: u64 = rv_param.parse().map_err(|_| {
                ApiError::invalid_kind(
                    "ListOptions",
                    "meta.k8s.io",
                    "",
                    vec![Cause::invalid(
                        "resourceVersion",
                        &json!(rv_param),
                        "must be a number",
                    )],
                )
            })?;
            if n > current {
                let e = ApiError::new(
                    504,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {current}"),
                )
                .with_details(json!({
                    "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                    "retryAfterSeconds": 1,
                }));
                initial.push(error_line(&e));
                done = true;
            } else if store.is_expired(n) {
                initial.push(error_line(&expired(n, current)));
                done = true;
            }
            n
        }
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run(
        inner.clone(),
        filter,
        initial,
        cursor,
        done,
        bookmarks,
        timeout,
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    inner: Arc<Inner>,
    filter: Filter,
    initial: Vec<Bytes>,
    mut cursor: u64,
    done: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Bytes>,
) {
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if done {
        return;
    }
    let mut changes = inner.changes.clone();
    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(24 * 3600)));
    tokio::pin!(deadline);
    let period = inner.bookmark_interval;
    let mut bookmark = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let (lines, gone) = {
                    let store = inner.lock();
                    match store.events_after(cursor) {
                        Ok(records) => {
                            let lines: Vec<Bytes> =
                                records.iter().filter_map(|r| filter.translate(r)).collect();
                            cursor = records.last().map_or(cursor, |r| r.rv);
                            (lines, false)
                        }
                        Err(e) => (vec![error_line(&expired(e.requested, store.rv()))], true),
                    }
                };
                for line in lines {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                if gone {
                    return;
                }
            }
            _ = bookmark.tick(), if bookmarks => {
                // Every event up to `cursor` that this watch selects has been sent.
                if tx.send(filter.bookmark(cursor, false)).await.is_err() {
                    return;
                }
            }
        }
    }
}
