//! The fleet's HTTP API and dashboard, served by `roost fleet --http ADDR` (and `roost up`):
//! JSON under `/api/v1/` (summary, stores, deployments, the source-vs-target rows with
//! server-side filtering and paging, plans with their waves, events by time range), plan
//! actions behind a bearer token, a server-sent-event stream of coalesced changes, the page
//! at `/`, and the controller's `POST /hooks/git` and `GET /plans`. Described by
//! `schemas/openapi.yaml`. [`Api::router`] builds the routes; [`serve`] serves them.

pub mod model;
pub mod source;
pub mod stream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::db::{DbError, FleetDb, Request};
use crate::gitops::{handle::ControllerGone, ControllerHandle};
use model::{RowFilter, Snapshot};

/// The OpenAPI document of this API (also served at `/api/v1/openapi.yaml`).
pub const OPENAPI_YAML: &str = include_str!("../../../schemas/openapi.yaml");

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Errors of the HTTP API's setup and serving.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The listener could not bind.
    #[error("http listener {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file.
    #[error("api token file {path}: {reason}")]
    Token {
        /// File.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The fleet database.
    #[error("fleet database")]
    Db(#[from] DbError),
}

/// How the API runs.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The bearer token for plan actions (None: read-only).
    pub token: Option<String>,
    /// How often the live stream looks for changes (its coalescing window).
    pub tick: Duration,
    /// The GitOps controller in this process, which gets plan actions and webhook syncs at
    /// once (None: they go through the fleet database's request table, for a controller in
    /// another process).
    pub controller: Option<ControllerHandle>,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            token: None,
            tick: Duration::from_millis(500),
            controller: None,
        }
    }
}

impl ApiOptions {
    /// Reads the token from a file (trimmed; empty is an error).
    pub fn token_from_file(path: &std::path::Path) -> Result<String, ApiError> {
        let err = |reason: String| ApiError::Token {
            path: path.to_owned(),
            reason,
        };
        let t = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let t = t.trim();
        if t.is_empty() {
            return Err(err("empty".into()));
        }
        if t.len() < 16 {
            return Err(err("shorter than 16 characters".into()));
        }
        Ok(t.to_owned())
    }
}

/// The API's shared state.
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

struct Inner {
    db: FleetDb,
    opts: ApiOptions,
    cache: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// One snapshot is taken at a time: concurrent requests wait for it and share it.
    taking: tokio::sync::Mutex<()>,
    hub: stream::Hub,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Api")
    }
}

/// An error answer: `{"error": {"code": …, "message": …}}`.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Self {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            roost_runtime::error_chain(&e),
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": {"code": self.code, "message": self.message}}));
        let mut r = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"roost\""),
            );
        }
        r
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

impl Api {
    /// The API over `db`; its live stream's task runs until `cancel`.
    pub fn new(db: FleetDb, opts: ApiOptions, cancel: CancellationToken) -> Result<Api, ApiError> {
        let hub = stream::Hub::new();
        let api = Api {
            inner: Arc::new(Inner {
                db,
                opts,
                cache: Mutex::new(None),
                taking: tokio::sync::Mutex::new(()),
                hub,
            }),
        };
        tokio::spawn(stream::run_hub(api.clone(), cancel));
        Ok(api)
    }

    fn db(&self) -> &FleetDb {
        &self.inner.db
    }

    /// Hands `request` to the controller: over its channel when it runs in this process,
    /// else (or should it have stopped) through the fleet database's request table, where a
    /// controller in another process on this database takes it within its poll.
    async fn ask(&self, request: Request) -> Result<(), DbError> {
        let request = match &self.inner.opts.controller {
            Some(c) => match c.send(request).await {
                Ok(()) => return Ok(()),
                Err(ControllerGone(r)) => r,
            },
            None => request,
        };
        self.db().call(move |db| db.request(&request)).await
    }

    fn cached(&self, max_age: Duration) -> Option<Arc<Snapshot>> {
        let c = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.as_ref()
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(_, s)| s.clone())
    }

    /// The fleet now (at most one tick old: every request within a tick shares one).
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>, DbError> {
        if let Some(s) = self.cached(self.inner.opts.tick) {
            return Ok(s);
        }
        let _one = self.inner.taking.lock().await;
        // Taken by another request while this one waited?
        if let Some(s) = self.cached(self.inner.opts.tick) {
            return Ok(s);
        }
        self.take().await
    }

    /// A snapshot taken after this call began (for reads right after an action).
    async fn refresh(&self) -> Result<Arc<Snapshot>, DbError> {
        let start = Instant::now();
        let _one = self.inner.taking.lock().await;
        if let Some(s) = self.cached(start.elapsed()) {
            return Ok(s);
        }
        self.take().await
    }

    async fn take(&self) -> Result<Arc<Snapshot>, DbError> {
        let s = Arc::new(self.db().call(source::snapshot).await?);
        *self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), s.clone()));
        Ok(s)
    }

    /// The routes: `/`, `/assets/*`, `/api/v1/*`, `/hooks/git`, `/plans`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/assets/app.js", get(app_js))
            .route("/assets/app.css", get(app_css))
            .route("/api/v1/openapi.yaml", get(openapi))
            .route("/api/v1/summary", get(summary))
            .route("/api/v1/rows", get(rows))
            .route("/api/v1/stores", get(stores))
            .route("/api/v1/stores/{store}", get(store))
            .route("/api/v1/deployments", get(deployments))
            .route("/api/v1/deployments/{deployment}", get(deployment))
            .route("/api/v1/plans", get(plans))
            .route("/api/v1/plans/{deployment}", get(plan))
            .route("/api/v1/plans/{deployment}/{action}", post(plan_action))
            .route("/api/v1/events", get(events))
            .route("/api/v1/notifications", get(notifications))
            .route("/api/v1/stream", get(stream::sse))
            .route("/hooks/git", post(hook))
            .route("/plans", get(legacy_plans))
            .with_state(self.clone())
    }
}

/// Binds `addr` and serves `router` until `cancel`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> Result<SocketAddr, ApiError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "fleet http listening (dashboard /, API /api/v1, POST /hooks/git)");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
        {
            tracing::warn!(%error, "fleet http server stopped");
        }
    });
    Ok(bound)
}

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}

async fn app_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
}

async fn app_css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

/// `GET /api/v1/summary`.
#[derive(Debug, Serialize)]
struct SummaryDoc {
    #[serde(flatten)]
    summary: model::Summary,
    plans: PlanCounts,
    /// The last audit of the cloud broker's retained desired state (absent before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_audit: Option<crate::db::audit::AuditRecord>,
    /// Notification deliveries: counts and the newest failing (absent before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    notifications: Option<crate::db::notify::Notifications>,
    taken_at: String,
}

#[derive(Debug, Serialize, Default)]
struct PlanCounts {
    running: usize,
    paused: usize,
    aborted: usize,
    done: usize,
}

fn summary_doc(s: &Snapshot) -> SummaryDoc {
    let mut plans = PlanCounts::default();
    for p in s.plans.values() {
        match p.status.as_str() {
            "running" => plans.running += 1,
            "paused" => plans.paused += 1,
            "aborted" => plans.aborted += 1,
            _ => plans.done += 1,
        }
    }
    SummaryDoc {
        summary: s.summary.clone(),
        plans,
        broker_audit: s.broker_audit.clone(),
        notifications: s.notifications.clone(),
        taken_at: s.taken_at.clone(),
    }
}

async fn summary(State(api): State<Api>) -> ApiResult<SummaryDoc> {
    Ok(Json(summary_doc(&*api.snapshot().await?)))
}

fn bad_query(e: axum::extract::rejection::QueryRejection) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
}

async fn rows(
    State(api): State<Api>,
    q: Result<Query<RowFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<model::RowsPage> {
    let Query(f) = q.map_err(bad_query)?;
    let s = api.snapshot().await?;
    Ok(Json(model::page_rows(&s.rows, &f, &s.taken_at)))
}

#[derive(Debug, Serialize)]
struct StoresDoc {
    stores: Vec<model::StoreInfo>,
    taken_at: String,
}

async fn stores(State(api): State<Api>) -> ApiResult<StoresDoc> {
    let s = api.snapshot().await?;
    Ok(Json(StoresDoc {
        stores: s.stores.values().cloned().collect(),
        taken_at: s.taken_at.clone(),
    }))
}

#[derive(Debug, Serialize)]
struct StoreDoc {
    #[serde(flatten)]
    info: model::StoreInfo,
    rows: Vec<model::Row>,
    taken_at: String,
}

async fn store(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<StoreDoc> {
    let s = api.snapshot().await?;
    let info = s.stores.get(&name).cloned().ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no store {name}"),
        )
    })?;
    Ok(Json(StoreDoc {
        info,
        rows: s.rows.iter().filter(|r| r.store == name).cloned().collect(),
        taken_at: s.taken_at.clone(),
    }))
}

#[derive(Debug, Serialize)]
struct DeploymentsDoc {
    deployments: Vec<DeploymentSummary>,
    taken_at: String,
}

#[derive(Debug, Serialize)]
struct DeploymentSummary {
    deployment: String,
    stores: usize,
    by_phase: std::collections::BTreeMap<String, usize>,
    in_sync: usize,
    behind: usize,
    stale: usize,
    drifted: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
}

fn deployment_summary(s: &Snapshot, d: &str) -> DeploymentSummary {
    let mut out = DeploymentSummary {
        deployment: d.to_owned(),
        stores: 0,
        by_phase: Default::default(),
        in_sync: 0,
        behind: 0,
        stale: 0,
        drifted: 0,
        plan: s.plans.get(d).map(|p| p.status.clone()),
    };
    for r in s.rows.iter().filter(|r| r.deployment == d) {
        out.stores += 1;
        *out.by_phase.entry(r.shown.clone()).or_insert(0) += 1;
        match r.marker.as_str() {
            "=" => out.in_sync += 1,
            ">" => out.behind += 1,
            _ => {}
        }
        out.stale += r.stale as usize;
        out.drifted += r.drift as usize;
    }
    out
}

async fn deployments(State(api): State<Api>) -> ApiResult<DeploymentsDoc> {
    let s = api.snapshot().await?;
    let names: std::collections::BTreeSet<&str> = s
        .rows
        .iter()
        .map(|r| r.deployment.as_str())
        .chain(s.plans.keys().map(String::as_str))
        .collect();
    Ok(Json(DeploymentsDoc {
        deployments: names
            .into_iter()
            .map(|d| deployment_summary(&s, d))
            .collect(),
        taken_at: s.taken_at.clone(),
    }))
}

#[derive(Debug, Serialize)]
struct DeploymentDoc {
    #[serde(flatten)]
    summary: DeploymentSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan_doc: Option<model::PlanDoc>,
    #[serde(flatten)]
    page: model::RowsPage,
}

async fn deployment(
    State(api): State<Api>,
    Path(name): Path<String>,
    q: Result<Query<RowFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<DeploymentDoc> {
    let Query(mut f) = q.map_err(bad_query)?;
    let s = api.snapshot().await?;
    if !s.rows.iter().any(|r| r.deployment == name) && !s.plans.contains_key(&name) {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no deployment {name}"),
        ));
    }
    f.deployment = Some(name.clone());
    Ok(Json(DeploymentDoc {
        summary: deployment_summary(&s, &name),
        plan_doc: s.plans.get(&name).cloned(),
        page: model::page_rows(&s.rows, &f, &s.taken_at),
    }))
}

#[derive(Debug, Serialize)]
struct PlansDoc {
    plans: Vec<model::PlanDoc>,
    taken_at: String,
}

fn plans_doc(s: &Snapshot) -> PlansDoc {
    PlansDoc {
        plans: s.plans.values().cloned().collect(),
        taken_at: s.taken_at.clone(),
    }
}

async fn plans(State(api): State<Api>) -> ApiResult<PlansDoc> {
    Ok(Json(plans_doc(&*api.snapshot().await?)))
}

async fn plan(State(api): State<Api>, Path(d): Path<String>) -> ApiResult<model::PlanDoc> {
    // Fresh, not cached: a client that just asked for an action wants to see it.
    let s = api.refresh().await?;
    s.plans.get(&d).cloned().map(Json).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no plan for {d}"),
        )
    })
}

/// Who may act, from the `Authorization` header: pure, for the table test.
fn authorize(configured: Option<&str>, headers: &HeaderMap) -> Result<(), Failure> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
    let Some(given) = given else {
        return Err(Failure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "plan actions need Authorization: Bearer TOKEN",
        ));
    };
    let Some(want) = configured else {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this server has no API token configured (--api-token-file): it is read-only",
        ));
    };
    // Compare digests: equal-length inputs, so the comparison's time says nothing about the
    // token.
    use sha2::{Digest as _, Sha256};
    if Sha256::digest(given.as_bytes()) != Sha256::digest(want.as_bytes()) {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "wrong API token",
        ));
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct ActionDoc {
    deployment: String,
    action: String,
    status: String,
}

async fn plan_action(
    State(api): State<Api>,
    Path((d, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<ActionDoc>), Failure> {
    authorize(api.inner.opts.token.as_deref(), &headers)?;
    let request = match Request::new(&action, Some(d.clone())) {
        Some(r) if r != Request::Sync => r,
        _ => {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no action {action} (pause, resume, abort)"),
            ))
        }
    };
    let s = api.refresh().await?;
    let p = s.plans.get(&d).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no plan for {d}"),
        )
    })?;
    let allowed = matches!(
        (action.as_str(), p.status.as_str()),
        ("pause", "running") | ("resume", "paused") | ("abort", "running" | "paused")
    );
    if !allowed {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("cannot {action} a {} plan", p.status),
        ));
    }
    api.ask(request).await?;
    info!(deployment = %d, %action, "plan action requested over http");
    Ok((
        StatusCode::ACCEPTED,
        Json(ActionDoc {
            deployment: d,
            action,
            status: "requested".into(),
        }),
    ))
}

/// `GET /api/v1/events` query.
#[derive(Debug, Deserialize, Default)]
struct EventQuery {
    since: Option<String>,
    until: Option<String>,
    store: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    after: Option<i64>,
    before: Option<i64>,
    order: Option<String>,
    limit: Option<usize>,
}

/// One recorded event.
#[derive(Debug, Clone, Serialize)]
pub struct EventDoc {
    /// Arrival order at the fleet service (the paging cursor).
    pub arrival: i64,
    /// Store.
    pub store: String,
    /// The CloudEvent as received.
    pub event: serde_json::Value,
}

#[derive(Debug, Serialize)]
struct EventsDoc {
    events: Vec<EventDoc>,
    /// Pass as `after` for the next page (ascending order; absent: this was the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<i64>,
    /// Pass as `before` for the next page (descending order; absent: this was the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before: Option<i64>,
}

/// Which events [`events_page`] returns.
#[derive(Debug, Clone, Default)]
pub struct EventRange {
    /// Event time at or after (RFC 3339, normalized).
    pub since: Option<String>,
    /// Event time before.
    pub until: Option<String>,
    /// One store.
    pub store: Option<String>,
    /// One type.
    pub ty: Option<String>,
    /// Arrival greater than.
    pub after: i64,
    /// Arrival less than.
    pub before: Option<i64>,
    /// Newest first.
    pub desc: bool,
    /// At most.
    pub limit: usize,
}

/// Events in arrival order (or newest first) with `after < arrival < before`, time within
/// `[since, until)` (RFC 3339 instants normalized to the stored millisecond form, so text
/// order is time order), at most `limit`; and whether there are more.
pub fn events_page(
    c: &crate::db::Conn<'_>,
    r: &EventRange,
) -> Result<(Vec<EventDoc>, bool), DbError> {
    use crate::db::sql::Value;
    // Only the filters given: a parameter in `?N IS NULL` has no type PostgreSQL can infer.
    let mut conds = vec!["arrival > ?1".to_owned()];
    let mut args = vec![Value::from(r.after)];
    let mut add = |cond: &str, v: Value| {
        args.push(v);
        conds.push(cond.replace('?', &format!("?{}", args.len())));
    };
    if let Some(b) = r.before {
        add("arrival < ?", Value::from(b));
    }
    if let Some(t) = &r.since {
        add("time >= ?", Value::from(t));
    }
    if let Some(t) = &r.until {
        add("time < ?", Value::from(t));
    }
    if let Some(s) = &r.store {
        add("store = ?", Value::from(s));
    }
    if let Some(t) = &r.ty {
        add("type = ?", Value::from(t));
    }
    let limit = r.limit;
    args.push(Value::from((limit + 1) as i64));
    let sql = format!(
        "SELECT arrival, store, json FROM events WHERE {} ORDER BY arrival {} LIMIT ?{}",
        conds.join(" AND "),
        if r.desc { "DESC" } else { "ASC" },
        args.len()
    );
    let rows = c.query(&sql, &args)?;
    let mut out = Vec::new();
    for row in rows {
        let (arrival, store, json): (i64, String, String) = (row.get(0)?, row.get(1)?, row.get(2)?);
        out.push(EventDoc {
            arrival,
            store,
            event: serde_json::from_str(&json).unwrap_or(serde_json::Value::Null),
        });
    }
    let more = out.len() > limit;
    out.truncate(limit);
    Ok((out, more))
}

fn instant(name: &str, v: Option<&str>) -> Result<Option<String>, Failure> {
    v.map(|s| {
        roost_schemas::parse_rfc3339(s)
            .map(roost_schemas::format_rfc3339)
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("{name}: not an RFC 3339 time: {s:?}"),
                )
            })
    })
    .transpose()
}

async fn events(
    State(api): State<Api>,
    q: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<EventsDoc> {
    let Query(q) = q.map_err(bad_query)?;
    let since = instant("since", q.since.as_deref())?;
    let until = instant("until", q.until.as_deref())?;
    let desc = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("order: asc or desc, not {other:?}"),
            ))
        }
    };
    let range = EventRange {
        since,
        until,
        store: q.store,
        ty: q.ty,
        after: q.after.unwrap_or(0),
        before: q.before,
        desc,
        limit: q.limit.unwrap_or(100).clamp(1, 1000),
    };
    let (events, more) = api
        .db()
        .call(move |db| db.with_conn(|c| events_page(c, &range)))
        .await?;
    let last = if more {
        events.last().map(|e| e.arrival)
    } else {
        None
    };
    let (next_after, next_before) = if desc { (None, last) } else { (last, None) };
    Ok(Json(EventsDoc {
        events,
        next_after,
        next_before,
    }))
}

/// `GET /api/v1/notifications`.
#[derive(Debug, Serialize)]
struct NotificationsDoc {
    #[serde(flatten)]
    counts: crate::db::notify::DeliveryCounts,
    /// The newest messages, newest first (at most 100).
    deliveries: Vec<crate::db::notify::Delivery>,
}

async fn notifications(State(api): State<Api>) -> ApiResult<NotificationsDoc> {
    let (counts, deliveries) = api
        .db()
        .call(|db| {
            db.with_conn(|c| {
                Ok((
                    crate::db::notify::delivery_counts(c)?,
                    crate::db::notify::deliveries(c, 100)?,
                ))
            })
        })
        .await?;
    Ok(Json(NotificationsDoc { counts, deliveries }))
}

/// A Git server's webhook: asks the controller to sync now.
async fn hook(State(api): State<Api>) -> Result<(StatusCode, &'static str), Failure> {
    api.ask(Request::Sync).await?;
    Ok((StatusCode::ACCEPTED, "sync scheduled\n"))
}

/// `GET /plans`: the controller's plans as stored (kept for existing users).
async fn legacy_plans(State(api): State<Api>) -> Result<Json<serde_json::Value>, Failure> {
    let plans = api
        .db()
        .call(|db| db.with_conn(crate::db::gitops::plans))
        .await?;
    Ok(Json(serde_json::to_value(plans).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_actions_need_the_configured_bearer_token() {
        let h = |v: Option<&str>| {
            let mut m = HeaderMap::new();
            if let Some(v) = v {
                m.insert(header::AUTHORIZATION, v.parse().expect("header"));
            }
            m
        };
        let cases: &[(Option<&str>, Option<&str>, Option<u16>)] = &[
            (
                Some("sekrit-token-0123"),
                Some("Bearer sekrit-token-0123"),
                None,
            ),
            (Some("sekrit-token-0123"), None, Some(401)),
            (Some("sekrit-token-0123"), Some("Basic abc"), Some(401)),
            (Some("sekrit-token-0123"), Some("Bearer wrong"), Some(403)),
            (
                Some("sekrit-token-0123"),
                Some("Bearer sekrit-token-01234"),
                Some(403),
            ),
            (None, Some("Bearer anything"), Some(403)),
            (None, None, Some(401)),
        ];
        for (configured, header, want) in cases {
            let got = authorize(*configured, &h(*header))
                .err()
                .map(|f| f.status.as_u16());
            assert_eq!(got, *want, "{configured:?} {header:?}");
        }
    }

    #[test]
    fn a_token_file_must_hold_a_real_token() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("t");
        std::fs::write(&p, "  0123456789abcdef\n").expect("write");
        assert_eq!(
            ApiOptions::token_from_file(&p).expect("token"),
            "0123456789abcdef"
        );
        std::fs::write(&p, "\n").expect("write");
        assert!(ApiOptions::token_from_file(&p).is_err());
        std::fs::write(&p, "short").expect("write");
        assert!(ApiOptions::token_from_file(&p).is_err());
        assert!(ApiOptions::token_from_file(&dir.path().join("none")).is_err());
    }
}
