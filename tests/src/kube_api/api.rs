//! HTTP routing and the REST verbs: discovery, get, list, create, update,
//! patch (apply, merge, strategic, JSON), delete and deletecollection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::defaults;
use super::error::{ApiError, ApiResult, Cause};
use super::fields::{self, Apply, Conflict, Schema, Scope};
use super::patch;
use super::resources::{self, ResourceType};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ObjKey, Store};
use super::watch as watch_api;

/// The real server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Shared server state.
pub(crate) struct Inner {
    store: Mutex<Store>,
    /// Latest resourceVersion; changes whenever the store is written.
    pub changes: watch::Receiver<u64>,
    pub shutdown: CancellationToken,
    /// `127.0.0.1:PORT`.
    pub address: String,
    pub bookmark_interval: Duration,
}

impl Inner {
    pub fn new(address: String, bookmark_interval: Duration) -> Self {
        let (tx, rx) = watch::channel(1);
        Inner {
            store: Mutex::new(Store::new(tx)),
            changes: rx,
            shutdown: CancellationToken::new(),
            address,
            bookmark_interval,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// RFC 3339 UTC time with second precision, as Kubernetes writes timestamps.
pub(crate) fn now() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A random (version 4) UID.
pub(crate) fn new_uid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A name from a `generateName` prefix, like the apiserver's `SimpleNameGenerator`: the
/// prefix cut to 58 characters, then 5 random ones.
pub(crate) fn generate_name(prefix: &str) -> String {
    let base: String = prefix.chars().take(58).collect();
    format!("{base}{}", random_suffix(5))
}

/// Random suffix alphabet of `generateName` and ReplicaSet hashes.
pub(crate) fn random_suffix(n: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        v.to_string(),
    )
        .into_response()
}

/// The object as returned to a client asking for `rt`'s version.
pub(crate) fn render(rt: &ResourceType, obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version()));
        m.insert("kind".into(), json!(rt.kind));
    }
    o
}

/// `PartialObjectMetadata` form.
pub(crate) fn render_meta(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
    })
}

pub(crate) fn output(rt: &ResourceType, obj: &Value, meta_only: bool) -> Value {
    if meta_only {
        render_meta(obj)
    } else {
        render(rt, obj)
    }
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

pub(crate) fn schema_of(rt: &ResourceType) -> Schema {
    if rt.custom {
        Schema::custom(rt.schema.clone())
    } else {
        Schema::builtin(&rt.kind)
    }
}

fn main_scope(rt: &ResourceType) -> Scope {
    Scope::Main {
        status_subresource: rt.status_subresource,
    }
}

/// Decode `application/x-www-form-urlencoded` text.
fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode_component(k), decode_component(v)),
            None => (decode_component(p), String::new()),
        })
        .collect()
}

/// One API request after the body was read.
pub(crate) struct Req {
    pub method: Method,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    fn accept(&self) -> &str {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Whether the client asked for `PartialObjectMetadata(List)`.
    pub fn meta_only(&self) -> bool {
        let accept = self.accept();
        let first = accept.split(',').next().unwrap_or("");
        first.contains("as=PartialObjectMetadata")
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
    }

    fn dry_run(&self) -> ApiResult<bool> {
        match self.q("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid dry run value: {other:?}: supported values: \"All\""
            ))),
        }
    }

    /// `fieldManager`, else the user agent's product, else `unknown`.
    fn manager(&self) -> String {
        if let Some(m) = self.q("fieldManager").filter(|m| !m.is_empty()) {
            return m.to_string();
        }
        let ua = self
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let prefix = ua.split('/').next().unwrap_or("").trim();
        if prefix.is_empty() {
            "unknown".to_string()
        } else {
            prefix.chars().take(128).collect()
        }
    }

    /// The body as JSON, or YAML when the content type says so.
    fn object_body(&self) -> ApiResult<Value> {
        let text = std::str::from_utf8(&self.body)
            .map_err(|e| ApiError::bad_request(format!("request body is not UTF-8: {e}")))?;
        let v: Value = if self.content_type().contains("yaml") {
            parse_yaml_or_json(text)?
        } else {
            serde_json::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))?
        };
        if !v.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        Ok(v)
    }
}

fn parse_yaml_or_json(text: &str) -> ApiResult<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return Ok(v);
    }
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

#[derive(Debug)]
enum Route {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(String),
    GroupVersion(String, String),
    Resource {
        group: String,
        version: String,
        namespace: Option<String>,
        plural: String,
        name: Option<String>,
        sub: Option<String>,
    },
    Unknown,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "livez" | "readyz"] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", g] => return Route::Group(g.to_string()),
        ["api", v] => return Route::GroupVersion(String::new(), v.to_string()),
        ["apis", g, v] => return Route::GroupVersion(g.to_string(), v.to_string()),
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Route::Unknown,
    };
    let ns_subresource = group.is_empty()
        && rest.len() == 3
        && rest[0] == "namespaces"
        && matches!(rest[2], "status" | "finalize");
    let (namespace, rest) = if rest.len() >= 3 && rest[0] == "namespaces" && !ns_subresource {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    if rest.is_empty() || rest.len() > 3 || rest.iter().any(|s| s.is_empty()) {
        return Route::Unknown;
    }
    Route::Resource {
        group: group.to_string(),
        version: version.to_string(),
        namespace,
        plural: rest[0].to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        sub: rest.get(2).map(|s| s.to_string()),
    }
}

/// A resolved resource request.
pub(crate) struct Target {
    pub rt: ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

impl Target {
    fn key(&self, name: &str) -> ObjKey {
        let ns = if self.rt.namespaced {
            self.namespace.as_deref().unwrap_or_default()
        } else {
            ""
        };
        ObjKey::new(&self.rt.group, &self.rt.plural, ns, name)
    }

    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }
}

/// The axum handler for every request.
pub(crate) async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(413, "RequestEntityTooLarge", format!("request body: {e}"))
                .into_response()
        }
    };
    let req = Req {
        method: parts.method.clone(),
        query: parse_query(parts.uri.query()),
        headers: parts.headers,
        body,
    };
    let path = parts.uri.path().to_string();
    tracing::debug!(method = %req.method, uri = %parts.uri, "kube-api request");
    let response = match dispatch(&inner, &req, &path) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(code = e.code, reason = e.reason, message = %e.message, "kube-api failure");
            e.into_response()
        }
    };
    response
}

fn dispatch(inner: &Arc<Inner>, req: &Req, path: &str) -> ApiResult<Response> {
    let r = route(path);
    if !matches!(r, Route::Resource { .. }) && req.method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    match r {
        Route::Version => Ok(json_response(
            200,
            &json!({
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-roost-test-double",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        )),
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::CoreVersions => Ok(json_response(
            200,
            &resources::core_versions(&inner.address),
        )),
        Route::Groups => Ok(json_response(200, &resources::group_list(&inner.lock()))),
        Route::Group(g) => resources::group(&inner.lock(), &g)
            .map(|v| json_response(200, &v))
            .ok_or_else(ApiError::no_resource),
        Route::GroupVersion(g, v) => resources::resource_list(&inner.lock(), &g, &v)
            .map(|doc| json_response(200, &doc))
            .ok_or_else(ApiError::no_resource),
        Route::Unknown => Err(ApiError::no_resource()),
        Route::Resource {
            group,
            version,
            namespace,
            plural,
            name,
            sub,
        } => {
            let rt = {
                let store = inner.lock();
                resources::resolve(&store, &group, &version, &plural)
            }
            .ok_or_else(ApiError::no_resource)?;
            if (namespace.is_some() && !rt.namespaced)
                || (!rt.namespaced && sub.is_some() && name.is_none())
            {
                return Err(ApiError::no_resource());
            }
            if rt.namespaced && namespace.is_none() && name.is_some() {
                return Err(ApiError::no_resource());
            }
            let target = Target {
                rt,
                namespace,
                name,
                sub,
            };
            resource(inner, req, target)
        }
    }
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("true" | "1"))
}

fn resource(inner: &Arc<Inner>, req: &Req, t: Target) -> ApiResult<Response> {
    match (&t.name, &t.sub) {
        (None, _) => match req.method {
            Method::GET if truthy(req.q("watch")) => watch_api::start(inner, req, t),
            Method::GET => list(&inner.lock(), req, &t),
            Method::POST if t.rt.namespaced && t.namespace.is_none() => {
                Err(ApiError::method_not_allowed())
            }
            Method::POST => create(&mut inner.lock(), req, &t),
            Method::DELETE if t.rt.namespaced && t.namespace.is_none() => {
                Err(ApiError::method_not_allowed())
            }
            Method::DELETE => delete_collection(&mut inner.lock(), req, &t),
            _ => Err(ApiError::method_not_allowed()),
        },
        (Some(name), None) => {
            let name = name.clone();
            match req.method {
                Method::GET => get(&inner.lock(), req, &t, &name),
                Method::PUT => replace(&mut inner.lock(), req, &t, &name, main_scope(&t.rt)),
                Method::PATCH => patch(&mut inner.lock(), req, &t, &name, main_scope(&t.rt)),
                Method::DELETE => delete(&mut inner.lock(), req, &t, &name),
                _ => Err(ApiError::method_not_allowed()),
            }
        }
        (Some(name), Some(sub)) => {
            let name = name.clone();
            match sub.as_str() {
                "status" if t.rt.status_subresource => match req.method {
                    Method::GET => get(&inner.lock(), req, &t, &name),
                    Method::PUT => replace(&mut inner.lock(), req, &t, &name, Scope::Status),
                    Method::PATCH => patch(&mut inner.lock(), req, &t, &name, Scope::Status),
                    _ => Err(ApiError::method_not_allowed()),
                },
                "finalize" if t.rt.is_namespace() && req.method == Method::PUT => {
                    finalize_namespace(&mut inner.lock(), req, &t, &name)
                }
                _ => Err(ApiError::no_resource()),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reads

fn get(store: &Store, req: &Req, t: &Target, name: &str) -> ApiResult<Response> {
    let obj = store
        .get(&t.key(name))
        .ok_or_else(|| ApiError::not_found(&t.rt, name))?;
    Ok(json_response(200, &output(&t.rt, obj, req.meta_only())))
}

pub(crate) fn selectors(req: &Req, rt: &ResourceType) -> ApiResult<(LabelSelector, FieldSelector)> {
    let label = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let field = FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), rt)
        .map_err(ApiError::bad_request)?;
    Ok((label, field))
}

fn encode_continue(rv: u64, start: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{start}\u{0}")});
    base64::engine::general_purpose::URL_SAFE.encode(token.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(u64, String)> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let start = v["start"].as_str().ok_or_else(bad)?;
    Ok((rv, start.trim_end_matches('\u{0}').to_string()))
}

fn list(store: &Store, req: &Req, t: &Target) -> ApiResult<Response> {
    let rt = &t.rt;
    let (label, field) = selectors(req, rt)?;
    let current = store.rv();
    if let Some(rv) = req
        .q("resourceVersion")
        .filter(|r| !r.is_empty() && *r != "0")
    {
        let n: u64 = rv.parse().map_err(|_| {
            ApiError::invalid_kind(
                "ListOptions",
                "meta.k8s.io",
                "",
                vec![Cause::invalid(
                    "resourceVersion",
                    &json!(rv),
                    "must be a number",
                )],
            )
        })?;
        if n > current {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {n}, current: {current}"),
            )
            .with_details(json!({
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            })));
        }
        if req.q("resourceVersionMatch") == Some("Exact") && n != current && store.is_expired(n) {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {n} ({current})"),
            ));
        }
    }
    let (list_rv, start) = match req.q("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, start) = decode_continue(token)?;
            if store.is_expired(rv) {
                return Err(ApiError::new(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."));
            }
            (rv, Some(start))
        }
        None => (current, None),
    };
    let limit: Option<usize> = req
        .q("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l: &usize| *l > 0);
    let pos = |k: &ObjKey| {
        if rt.namespaced {
            format!("{}/{}", k.namespace, k.name)
        } else {
            k.name.clone()
        }
    };
    let matching: Vec<(String, &Value)> = store
        .objects_in(&rt.group, &rt.plural, t.namespace.as_deref())
        .filter(|(k, _)| start.as_ref().is_none_or(|s| pos(k) > *s))
        .filter(|(_, o)| label.matches(o) && field.matches(o))
        .map(|(k, o)| (pos(k), o))
        .collect();
    let total = matching.len();
    let page: Vec<&(String, &Value)> = matching.iter().take(limit.unwrap_or(usize::MAX)).collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if page.len() < total {
        if let Some((last, _)) = page.last() {
            metadata["continue"] = json!(encode_continue(list_rv, last));
            if label.is_empty() && req.q("fieldSelector").is_none_or(str::is_empty) {
                metadata["remainingItemCount"] = json!(total - page.len());
            }
        }
    }
    let meta_only = req.meta_only();
    let items: Vec<Value> = page
        .iter()
        .map(|(_, o)| {
            if meta_only {
                render_meta(o)
            } else if rt.custom {
                render(rt, o)
            } else {
                // Typed lists carry no kind/apiVersion on their items.
                let mut item = (*o).clone();
                if let Some(m) = item.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                item
            }
        })
        .collect();
    let (kind, api_version) = if meta_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (rt.list_kind.clone(), rt.api_version())
    };
    Ok(json_response(
        200,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}),
    ))
}

// ---------------------------------------------------------------------------
// Writes

/// Check a request object's `apiVersion`/`kind` against the URL.
fn check_type(rt: &ResourceType, obj: &Value) -> ApiResult<()> {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{obj}'"
        )));
    }
    if api_version.is_empty() {
        return Err(ApiError::bad_request(format!(
            "Object 'apiVersion' is missing in '{obj}'"
        )));
    }
    if api_version != rt.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    if kind != rt.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            rt.kind
        )));
    }
    Ok(())
}

fn check_namespace(t: &Target, obj: &Value) -> ApiResult<()> {
    if !t.rt.namespaced {
        return Ok(());
    }
    match meta_str(obj, "namespace") {
        Some(ns) if !ns.is_empty() && ns != t.ns() => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

fn check_name(obj: &Value, name: &str) -> ApiResult<()> {
    let body_name = meta_str(obj, "name").unwrap_or("");
    if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

/// Creating `name` (of type `rt`) into `ns` requires the namespace to exist and not be
/// terminating, as the NamespaceLifecycle admission plugin checks. `name` is what
/// admission sees: the `generateName` prefix when the name is still to be generated.
pub(crate) fn ensure_namespace(
    store: &Store,
    rt: &ResourceType,
    name: &str,
    ns: &str,
) -> ApiResult<()> {
    let Some(obj) = store.get(&ObjKey::new("", "namespaces", "", ns)) else {
        return Err(ApiError::namespace_not_found(ns));
    };
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        let name = if name.is_empty() { "Unknown" } else { name };
        return Err(ApiError::forbidden(format!(
            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
            rt.qualified()
        ))
        .with_details(json!({
            "name": name, "group": rt.group, "kind": rt.plural,
            "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}],
        })));
    }
    Ok(())
}

fn ensure_crd_active(store: &Store, rt: &ResourceType) -> ApiResult<()> {
    if !rt.custom {
        return Ok(());
    }
    let crd = store.get(&ObjKey::new(
        resources::CRD_GROUP,
        "customresourcedefinitions",
        "",
        &format!("{}.{}", rt.plural, rt.group),
    ));
    if crd.is_some_and(|c| c.pointer("/metadata/deletionTimestamp").is_some()) {
        return Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "create not allowed while custom resource definition is terminating",
        ));
    }
    Ok(())
}

fn strip_for_generation(rt: &ResourceType, v: &Value) -> Value {
    let mut o = v.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
        if rt.status_subresource {
            m.remove("status");
        }
    }
    o
}

/// `metadata.<field>` as a map, where missing, `null` and `{}` are the same (Go's
/// semantic equality treats nil and empty maps alike).
fn meta_map<'a>(v: &'a Value, field: &str) -> Option<&'a Map<String, Value>> {
    v.get("metadata")?
        .get(field)?
        .as_object()
        .filter(|m| !m.is_empty())
}

/// Whether an update bumps `metadata.generation`, after the registry strategies'
/// `PrepareForUpdate`:
/// - Deployments: the spec or the annotations changed (annotations are copied to the
///   ReplicaSets, so the controller has to see them; labels do not count);
/// - EndpointSlices: anything but metadata, or the labels;
/// - the other built-ins with a generation (StatefulSets, DaemonSets, ReplicaSets,
///   Jobs, CRDs): the spec only;
/// - custom resources: anything but metadata (and status with a status subresource).
fn generation_changed(rt: &ResourceType, old: &Value, new: &Value) -> bool {
    let body = strip_for_generation(rt, old) != strip_for_generation(rt, new);
    if rt.custom {
        return body;
    }
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("apps", "Deployment") => {
            body || meta_map(old, "annotations") != meta_map(new, "annotations")
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            body || meta_map(old, "labels") != meta_map(new, "labels")
        }
        _ => body,
    }
}

/// Whether a `/status` write may also change `metadata.annotations`: the Deployment
/// status strategy resets only spec and labels, and the deployment controller writes
/// its `deployment.kubernetes.io/revision` annotation that way (no generation bump).
pub(crate) fn status_writes_annotations(rt: &ResourceType) -> bool {
    !rt.custom && rt.group == "apps" && rt.kind == "Deployment"
}

const SYSTEM_META: &[&str] = &[
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Turn a requested object into the one to store: identity, system metadata, status
/// handling, defaults, validation and generation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare(
    store: &mut Store,
    rt: &ResourceType,
    live: Option<&Value>,
    mut new: Value,
    scope: Scope,
    ns: &str,
    name: &str,
    now: &str,
) -> ApiResult<Value> {
    if scope == Scope::Status {
        let live = live.ok_or_else(|| ApiError::not_found(rt, name))?;
        let mut out = live.clone();
        if let Some(m) = out.as_object_mut() {
            match new.get("status") {
                Some(s) => {
                    m.insert("status".into(), s.clone());
                }
                None => {
                    m.remove("status");
                }
            }
        }
        if status_writes_annotations(rt) {
            if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
                match new
                    .pointer("/metadata/annotations")
                    .filter(|a| !a.is_null())
                {
                    Some(a) => {
                        meta.insert("annotations".into(), a.clone());
                    }
                    None => {
                        meta.remove("annotations");
                    }
                }
            }
        }
        return Ok(out);
    }
    let Some(m) = new.as_object_mut() else {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    };
    m.insert("apiVersion".into(), json!(rt.storage_api_version()));
    m.insert("kind".into(), json!(rt.kind));
    let meta = m.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    if let Some(meta) = meta.as_object_mut() {
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.remove("selfLink");
        match live {
            Some(l) => {
                for f in SYSTEM_META {
                    match l.pointer(&format!("/metadata/{f}")) {
                        Some(v) => {
                            meta.insert((*f).into(), v.clone());
                        }
                        None => {
                            meta.remove(*f);
                        }
                    }
                }
                if let Some(rv) = l.pointer("/metadata/resourceVersion") {
                    meta.insert("resourceVersion".into(), rv.clone());
                }
            }
            None => {
                for f in SYSTEM_META {
                    meta.remove(*f);
                }
                meta.remove("resourceVersion");
                meta.insert("uid".into(), json!(new_uid()));
                meta.insert("creationTimestamp".into(), json!(now));
                if rt.generation {
                    meta.insert("generation".into(), json!(1));
                }
            }
        }
    }
    if rt.status_subresource {
        match live.and_then(|l| l.get("status")) {
            Some(s) => {
                m.insert("status".into(), s.clone());
            }
            None => {
                m.remove("status");
            }
        }
    }
    defaults::apply_defaults(rt, &mut new, store, live);
    defaults::validate(rt, live, &new)?;
    if let (Some(l), true) = (live, rt.generation) {
        if generation_changed(rt, l, &new) {
            let g = l
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("generation".into(), json!(g + 1));
            }
        }
    }
    Ok(new)
}

fn without_times(v: &Value) -> Value {
    let mut o = v.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
            for e in entries.iter_mut() {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    o
}

/// Store the prepared object (unless dry-run); a no-op update writes nothing.
pub(crate) fn commit(
    store: &mut Store,
    key: ObjKey,
    live: Option<&Value>,
    obj: Value,
    dry_run: bool,
) -> Value {
    match live {
        None if dry_run => obj,
        None => store.create(key, obj),
        Some(l) => {
            if without_times(l) == without_times(&obj) {
                return l.clone();
            }
            if dry_run {
                return obj;
            }
            // An update that leaves an object being deleted without finalizers deletes it
            // instead (the registry's ShouldDeleteDuringUpdate): the update itself is not
            // stored, so watchers see one DELETED event carrying the last stored state.
            // For a Namespace, `spec.finalizers` count too.
            let deleting = l.pointer("/metadata/deletionTimestamp").is_some()
                && obj.pointer("/metadata/deletionTimestamp").is_some();
            let is_namespace = key.group.is_empty() && key.plural == "namespaces";
            let non_empty = |p: &str| {
                obj.pointer(p)
                    .and_then(Value::as_array)
                    .is_some_and(|f| !f.is_empty())
            };
            let finalizers = non_empty("/metadata/finalizers")
                || (is_namespace && non_empty("/spec/finalizers"));
            if deleting && !finalizers {
                return store.delete(&key).unwrap_or(obj);
            }
            store.update(key, obj)
        }
    }
}

/// Ownership recorded for an `Update` by `manager` (base: `managedFields` in `entries_from`).
pub(crate) fn record(
    rt: &ResourceType,
    old: &Value,
    new: &mut Value,
    entries_from: &Value,
    scope: Scope,
    manager: &str,
    now: &str,
) {
    let entries = fields::read_entries(entries_from);
    let entries = fields::record_update(
        &schema_of(rt),
        old,
        new,
        scope,
        manager,
        &rt.api_version(),
        now,
        entries,
    );
    fields::write_entries(new, entries);
}

fn create(store: &mut Store, req: &Req, t: &Target) -> ApiResult<Response> {
    let rt = &t.rt;
    let dry_run = req.dry_run()?;
    let mut body = req.object_body()?;
    check_type(rt, &body)?;
    check_namespace(t, &body)?;
    let generate = meta_str(&body, "generateName")
        .unwrap_or_default()
        .to_string();
    let admitted_name = meta_str(&body, "name")
        .filter(|n| !n.is_empty())
        .unwrap_or(&generate)
        .to_string();
    let name = match meta_str(&body, "name").filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => match Some(generate.as_str()).filter(|n| !n.is_empty()) {
            Some(prefix) => generate_name(prefix),
            None => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    vec![Cause::required(
                        "metadata.name",
                        "name or generateName is required",
                    )],
                ))
            }
        },
    };
    if meta_str(&body, "resourceVersion").is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    if rt.namespaced {
        ensure_namespace(store, rt, &admitted_name, t.ns())?;
    }
    ensure_crd_active(store, rt)?;
    let key = t.key(&name);
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(rt, &name));
    }
    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("name".into(), json!(name));
    }
    let now = now();
    let user_fields = body
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let mut obj = prepare(
        store,
        rt,
        None,
        body.clone(),
        main_scope(rt),
        t.ns(),
        &name,
        &now,
    )?;
    if !user_fields {
        record(
            rt,
            &json!({}),
            &mut obj,
            &json!({}),
            main_scope(rt),
            &req.manager(),
            &now,
        );
    }
    let stored = commit(store, key, None, obj, dry_run);
    Ok(json_response(201, &output(rt, &stored, req.meta_only())))
}

fn check_precondition(rt: &ResourceType, name: &str, live: &Value, obj: &Value) -> ApiResult<()> {
    if let Some(rv) = meta_str(obj, "resourceVersion").filter(|r| !r.is_empty()) {
        if Some(rv) != meta_str(live, "resourceVersion") {
            return Err(ApiError::conflict(
                rt,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
    }
    Ok(())
}

/// Shared tail of PUT and non-apply PATCH.
fn update_with(
    store: &mut Store,
    req: &Req,
    t: &Target,
    name: &str,
    live: &Value,
    new: Value,
    scope: Scope,
) -> ApiResult<Response> {
    let rt = &t.rt;
    let dry_run = req.dry_run()?;
    check_precondition(rt, name, live, &new)?;
    let now = now();
    let user_fields = new
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let entries_from = if user_fields {
        new.clone()
    } else {
        live.clone()
    };
    let mut obj = prepare(store, rt, Some(live), new, scope, t.ns(), name, &now)?;
    record(
        rt,
        live,
        &mut obj,
        &entries_from,
        scope,
        &req.manager(),
        &now,
    );
    let stored = commit(store, t.key(name), Some(live), obj, dry_run);
    Ok(json_response(200, &output(rt, &stored, req.meta_only())))
}

fn replace(
    store: &mut Store,
    req: &Req,
    t: &Target,
    name: &str,
    scope: Scope,
) -> ApiResult<Response> {
    let body = req.object_body()?;
    check_type(&t.rt, &body)?;
    check_name(&body, name)?;
    check_namespace(t, &body)?;
    let live = store
        .get(&t.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.rt, name))?;
    update_with(store, req, t, name, &live, body, scope)
}

fn patch(
    store: &mut Store,
    req: &Req,
    t: &Target,
    name: &str,
    scope: Scope,
) -> ApiResult<Response> {
    let ct = req.content_type().to_string();
    if ct == "application/apply-patch+yaml" {
        return apply(store, req, t, name, scope);
    }
    let known = [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ];
    if !known.contains(&ct.as_str())
        || (t.rt.custom && ct == "application/strategic-merge-patch+json")
    {
        return Err(ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{}",
            if t.rt.custom { "" } else { ", application/strategic-merge-patch+json" }
        )));
    }
    if req.q("force").is_some() {
        return Err(ApiError::invalid_kind(
            "PatchOptions",
            "meta.k8s.io",
            "",
            vec![Cause::forbidden(
                "force",
                "may not be specified for non-apply patch",
            )],
        ));
    }
    let live = store
        .get(&t.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.rt, name))?;
    let doc: Value = serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut patched = live.clone();
    // A resourceVersion in a patch is a precondition, not a value.
    if let Some(meta) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    match ct.as_str() {
        "application/merge-patch+json" => patch::merge_patch(&mut patched, &doc),
        "application/strategic-merge-patch+json" => {
            patch::strategic_merge_patch(&mut patched, &doc, &t.rt.kind)
        }
        _ => patch::json_patch(&mut patched, &doc).map_err(|e| {
            ApiError::new(
                422,
                "Invalid",
                format!("the server rejected our request due to an error in our request: {e}"),
            )
        })?,
    }
    if !patched.is_object() {
        return Err(ApiError::bad_request(
            "the patched object must be a JSON object",
        ));
    }
    update_with(store, req, t, name, &live, patched, scope)
}

fn conflict_error(conflicts: &[Conflict]) -> ApiError {
    let mut causes = Vec::new();
    let mut count = 0;
    for c in conflicts {
        for p in &c.paths {
            count += 1;
            causes.push(json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {}", c.describe_manager()),
                "field": fields::display_path(p),
            }));
        }
    }
    let message = if count == 1 {
        let c = &conflicts[0];
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            c.describe_manager(),
            fields::display_path(&c.paths[0])
        )
    } else {
        let mut sorted: Vec<&Conflict> = conflicts.iter().collect();
        sorted.sort_by(|a, b| a.manager.cmp(&b.manager));
        let mut lines = Vec::new();
        for c in sorted {
            lines.push(format!("conflicts with {}:", c.describe_manager()));
            for p in &c.paths {
                lines.push(format!("- {}", fields::display_path(p)));
            }
        }
        format!("Apply failed with {count} conflicts: {}", lines.join("\n"))
    };
    ApiError::new(409, "Conflict", message).with_details(json!({"causes": causes}))
}

fn apply(
    store: &mut Store,
    req: &Req,
    t: &Target,
    name: &str,
    scope: Scope,
) -> ApiResult<Response> {
    let rt = &t.rt;
    let dry_run = req.dry_run()?;
    let manager = req.q("fieldManager").unwrap_or("").to_string();
    if manager.is_empty() {
        return Err(ApiError::invalid_kind(
            "PatchOptions",
            "meta.k8s.io",
            "",
            vec![Cause::required(
                "fieldManager",
                "is required for apply patch",
            )],
        ));
    }
    let force = match req.q("force") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid force value {other:?}"
            )))
        }
    };
    let text = std::str::from_utf8(&req.body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    let cfg = parse_yaml_or_json(text)?;
    if !cfg.is_object() {
        return Err(ApiError::bad_request(
            "error decoding YAML: the apply patch must be a YAML or JSON object",
        ));
    }
    let api_version = cfg.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api_version != rt.api_version() {
        return Err(ApiError::bad_request(format!(
            "Incorrect version specified in apply patch. Specified patch version: {api_version}, expected: {}",
            rt.api_version()
        )));
    }
    match cfg.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{cfg}'"
            )))
        }
        Some(k) if k != rt.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the apply patch ({k}) does not match the resource kind ({})",
                rt.kind
            )))
        }
        _ => {}
    }
    if cfg
        .pointer("/metadata/managedFields")
        .is_some_and(|m| !m.is_null())
    {
        return Err(ApiError::bad_request("metadata.managedFields must be nil"));
    }
    match meta_str(&cfg, "name") {
        None | Some("") => {
            return Err(ApiError::invalid(
                rt,
                name,
                vec![Cause::required("metadata.name", "name is required")],
            ))
        }
        Some(n) if n != name => check_name(&cfg, name)?,
        _ => {}
    }
    check_namespace(t, &cfg)?;
    let key = t.key(name);
    let live = store.get(&key).cloned();
    if live.is_none() {
        if scope == Scope::Status {
            return Err(ApiError::not_found(rt, name));
        }
        if rt.namespaced {
            ensure_namespace(store, rt, name, t.ns())?;
        }
        ensure_crd_active(store, rt)?;
    }
    let base = live.clone().unwrap_or_else(|| {
        let mut meta = json!({"name": name});
        if rt.namespaced {
            meta["namespace"] = json!(t.ns());
        }
        json!({"apiVersion": rt.storage_api_version(), "kind": rt.kind, "metadata": meta})
    });
    let cfg = match scope {
        Scope::Main {
            status_subresource: true,
        } => {
            let mut c = cfg;
            if let Some(m) = c.as_object_mut() {
                m.remove("status");
            }
            c
        }
        Scope::Main { .. } => cfg,
        Scope::Status => {
            let mut meta = json!({"name": name});
            if status_writes_annotations(rt) {
                if let Some(a) = cfg.pointer("/metadata/annotations") {
                    meta["annotations"] = a.clone();
                }
            }
            json!({
                "apiVersion": cfg["apiVersion"],
                "kind": cfg["kind"],
                "metadata": meta,
                "status": cfg.get("status").cloned().unwrap_or(json!({})),
            })
        }
    };
    let now = now();
    let schema = schema_of(rt);
    let api_version = rt.api_version();
    let applier = Apply {
        schema: &schema,
        manager: &manager,
        api_version: &api_version,
        force,
        scope,
        now: &now,
    };
    let (merged, mut entries) = applier.run(&base, &cfg).map_err(|c| conflict_error(&c))?;
    let mut obj = prepare(store, rt, live.as_ref(), merged, scope, t.ns(), name, &now)?;
    fields::drop_removed(&schema, &base, &obj, scope, &mut entries);
    fields::write_entries(&mut obj, entries);
    let created = live.is_none();
    let stored = commit(store, key, live.as_ref(), obj, dry_run);
    Ok(json_response(
        if created { 201 } else { 200 },
        &output(rt, &stored, req.meta_only()),
    ))
}

fn finalize_namespace(store: &mut Store, req: &Req, t: &Target, name: &str) -> ApiResult<Response> {
    let body = req.object_body()?;
    let live = store
        .get(&t.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.rt, name))?;
    let mut obj = live.clone();
    obj["spec"]["finalizers"] = body
        .pointer("/spec/finalizers")
        .cloned()
        .unwrap_or(json!([]));
    let stored = commit(store, t.key(name), Some(&live), obj, req.dry_run()?);
    Ok(json_response(200, &render(&t.rt, &stored)))
}

// ---------------------------------------------------------------------------
// Deletes

/// Parsed `DeleteOptions` (from the body, with query parameters as fallback).
pub(crate) struct DeleteOptions {
    pub propagation: Option<String>,
    pub dry_run: bool,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

fn delete_options(req: &Req) -> ApiResult<DeleteOptions> {
    let body: Value = if req.body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let mut propagation = body["propagationPolicy"]
        .as_str()
        .or(req.q("propagationPolicy"))
        .map(str::to_string);
    let orphan = body["orphanDependents"]
        .as_bool()
        .or(match req.q("orphanDependents") {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        });
    if propagation.is_none() {
        if let Some(o) = orphan {
            propagation = Some(if o { "Orphan" } else { "Background" }.to_string());
        }
    }
    if let Some(p) = &propagation {
        if !matches!(p.as_str(), "Foreground" | "Background" | "Orphan") {
            return Err(ApiError::invalid_kind(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                vec![Cause {
                    reason: "FieldValueNotSupported",
                    field: "propagationPolicy".into(),
                    message: format!("Unsupported value: {p:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""),
                }],
            ));
        }
    }
    let dry_run = body["dryRun"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == "All"))
        || req.dry_run()?;
    Ok(DeleteOptions {
        propagation,
        dry_run,
        uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
        resource_version: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// What a delete answers: the object (still being deleted, or deleted) or a success Status.
pub(crate) enum Deleted {
    Object(Value),
    Status(Value),
}

/// Delete one object with real-server semantics (finalizers, propagation policies, namespaces).
pub(crate) fn delete_object(
    store: &mut Store,
    rt: &ResourceType,
    key: &ObjKey,
    opts: &DeleteOptions,
) -> ApiResult<Deleted> {
    let name = key.name.as_str();
    let live = store
        .get(key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(rt, name))?;
    if let Some(uid) = &opts.uid {
        let actual = meta_str(&live, "uid").unwrap_or("");
        if uid != actual {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            ));
        }
    }
    if let Some(rv) = &opts.resource_version {
        let actual = meta_str(&live, "resourceVersion").unwrap_or("");
        if rv != actual {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"),
            ));
        }
    }
    let now = now();
    if rt.is_namespace() {
        if matches!(name, "default" | "kube-system" | "kube-public") {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            ))
            .with_details(json!({"name": name, "kind": "namespaces"})));
        }
        if live.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(Deleted::Object(live));
        }
        // The namespace registry's first DELETE: deletionTimestamp, phase Terminating, and
        // the orphan/foregroundDeletion finalizers the propagation policy asks for. The
        // namespace controller then deletes the content and finalizes it.
        let mut obj = live.clone();
        obj["metadata"]["deletionTimestamp"] = json!(now);
        obj["status"]["phase"] = json!("Terminating");
        let extra = match opts.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        if let Some(f) = extra {
            let mut finalizers: Vec<Value> = live
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if !finalizers.iter().any(|x| x == f) {
                finalizers.push(json!(f));
            }
            obj["metadata"]["finalizers"] = json!(finalizers);
        }
        let stored = commit(store, key.clone(), Some(&live), obj, opts.dry_run);
        return Ok(Deleted::Object(stored));
    }
    if live.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(Deleted::Object(live));
    }
    let mut finalizers: Vec<Value> = live
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let extra = match opts.propagation.as_deref() {
        Some("Foreground") => Some("foregroundDeletion"),
        Some("Orphan") => Some("orphan"),
        _ => None,
    };
    if let Some(f) = extra {
        if !finalizers.iter().any(|x| x == f) {
            finalizers.push(json!(f));
        }
    }
    if !finalizers.is_empty() {
        let mut obj = live.clone();
        obj["metadata"]["finalizers"] = json!(finalizers);
        obj["metadata"]["deletionTimestamp"] = json!(now);
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if let Some(g) = live.pointer("/metadata/generation").and_then(Value::as_i64) {
            obj["metadata"]["generation"] = json!(g + 1);
        }
        let stored = commit(store, key.clone(), Some(&live), obj, opts.dry_run);
        return Ok(Deleted::Object(stored));
    }
    let deleted = if opts.dry_run {
        live.clone()
    } else {
        store.delete(key).unwrap_or(live.clone())
    };
    if rt.returns_deleted_object {
        Ok(Deleted::Object(deleted))
    } else {
        Ok(Deleted::Status(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": rt.group,
                "kind": rt.plural,
                "uid": meta_str(&live, "uid").unwrap_or(""),
            },
        })))
    }
}

fn delete(store: &mut Store, req: &Req, t: &Target, name: &str) -> ApiResult<Response> {
    let opts = delete_options(req)?;
    match delete_object(store, &t.rt, &t.key(name), &opts)? {
        Deleted::Object(o) => Ok(json_response(200, &output(&t.rt, &o, req.meta_only()))),
        Deleted::Status(s) => Ok(json_response(200, &s)),
    }
}

fn delete_collection(store: &mut Store, req: &Req, t: &Target) -> ApiResult<Response> {
    let rt = &t.rt;
    let opts = delete_options(req)?;
    let (label, field) = selectors(req, rt)?;
    let keys: Vec<ObjKey> = store
        .objects_in(&rt.group, &rt.plural, t.namespace.as_deref())
        .filter(|(_, o)| label.matches(o) && field.matches(o))
        .map(|(k, _)| k.clone())
        .collect();
    let mut items = Vec::new();
    for key in keys {
        let live = store.get(&key).cloned();
        match delete_object(store, rt, &key, &opts) {
            Ok(Deleted::Object(o)) => items.push(o),
            Ok(Deleted::Status(_)) => {
                if let Some(mut l) = live {
                    if let Some(m) = l.as_object_mut() {
                        m.remove("apiVersion");
                        m.remove("kind");
                    }
                    items.push(l);
                }
            }
            Err(e) => tracing::debug!(message = %e.message, "deletecollection item failed"),
        }
    }
    Ok(json_response(
        200,
        &json!({
            "kind": rt.list_kind,
            "apiVersion": rt.api_version(),
            "metadata": {"resourceVersion": store.rv().to_string()},
            "items": items,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(
            route("/api/v1/namespaces/x/configmaps/y"),
            Route::Resource { ref namespace, ref plural, ref name, .. }
                if namespace.as_deref() == Some("x") && plural == "configmaps" && name.as_deref() == Some("y")
        ));
        assert!(matches!(
            route("/api/v1/namespaces/x/status"),
            Route::Resource { ref namespace, ref plural, ref sub, .. }
                if namespace.is_none() && plural == "namespaces" && sub.as_deref() == Some("status")
        ));
        assert!(matches!(
            route("/apis/apps/v1/deployments"),
            Route::Resource { ref namespace, ref name, .. } if namespace.is_none() && name.is_none()
        ));
        assert!(matches!(route("/apis/apps/v1"), Route::GroupVersion(..)));
        assert_eq!(
            parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"))["labelSelector"],
            "app=web,tier in (a)"
        );
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, "ns/name");
        assert_eq!(
            decode_continue(&t).expect("decode"),
            (42, "ns/name".to_string())
        );
    }
}
