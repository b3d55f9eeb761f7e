//! The HTTP JSON API (`/api/v1/...`) used by the CLI and, later, the dashboard; described by
//! the OpenAPI document at `/api/v1/openapi.json`. Also serves `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::names::ServiceName;
use trellis_core::resources::{Kind, ResourceKey, parse_documents, referenced_services};

use crate::ca::Ca;
use crate::hub::Hub;
use crate::store::{Store, StoreError};
use crate::tokens::Tokens;

pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub hub: Hub,
    pub registry: Registry,
    /// Required (as `Authorization: Bearer`) for every write and for join tokens.
    pub admin_token: String,
    pub tokens: Arc<Tokens>,
    pub ca: Arc<Ca>,
    pub ca_ops: Arc<crate::rotation::CaOps>,
    pub trust_domain: String,
    pub observer: Arc<crate::observe::Observer>,
    /// This API's own address (the control plane's entry in the Prometheus target list).
    pub http_addr: std::net::SocketAddr,
    /// Recent traces exported here (`POST /v1/traces`), for the dashboard.
    pub traces: Arc<crate::traces::RecentTraces>,
}

type Shared = Arc<ApiState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/apply", axum::routing::post(apply))
        .route("/api/v1/resources", get(list_all))
        .route("/api/v1/resources/{kind}", get(list_kind))
        .route(
            "/api/v1/resources/{kind}/{namespace}/{name}",
            get(get_one).delete(delete_one),
        )
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/services", get(services))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/ca/bundle", get(trust_bundle))
        .route("/api/v1/ca/rotation", get(rotation_status).post(rotate))
        .route("/api/v1/check", get(check))
        .route("/api/v1/explain", get(explain))
        .route("/", get(dashboard))
        .route("/api/v1/stats/services", get(stats_services))
        .route("/api/v1/stats/edges", get(stats_edges))
        .route("/api/v1/stats/routes", get(stats_routes))
        .route("/api/v1/stats/paths", get(stats_paths))
        .route("/api/v1/tap", get(tap))
        .route("/api/v1/prometheus/targets", get(prometheus_targets))
        .route("/api/v1/traces", get(list_traces))
        .route("/api/v1/traces/{id}", get(get_trace))
        .route("/v1/traces", axum::routing::post(ingest_traces))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            trellis_core::resources::MAX_APPLY_BYTES + 1024,
        ))
        .with_state(state)
}

/// Writes and anything secret need the admin token; reads of configuration do not.
async fn require_admin(
    State(st): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read_only = matches!(request.method().as_str(), "GET" | "HEAD");
    // Proxies export spans here without a token (like any OTLP collector on the node); the
    // sink is bounded and only feeds the dashboard.
    if request.uri().path() == "/v1/traces" {
        return next.run(request).await;
    }
    // Tap shows live request metadata (paths, callers): operators only.
    let secret =
        request.uri().path().starts_with("/api/v1/tokens") || request.uri().path() == "/api/v1/tap";
    if read_only && !secret {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare digests so the comparison's timing says nothing about the token.
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    if presented.is_empty() || digest(presented).as_ref() != digest(&st.admin_token).as_ref() {
        return error(
            StatusCode::UNAUTHORIZED,
            "this needs the admin token (Authorization: Bearer <token>); it is in <data-dir>/admin-token, and the CLI finds it through the context `trellis up` writes or TRELLIS_ADMIN_TOKEN",
        );
    }
    next.run(request).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    service: String,
    #[serde(default)]
    namespace: Option<String>,
    /// e.g. `24h`.
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    max_uses: Option<u32>,
}

async fn create_token(State(st): State<Shared>, body: Bytes) -> Response {
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("token request: {e}")),
    };
    let service = match trellis_core::ServiceName::new(req.service.as_str()) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("service: {e}")),
    };
    let namespace = match req.namespace.as_deref().map(trellis_core::Namespace::new) {
        None => trellis_core::Namespace::default(),
        Some(Ok(ns)) => ns,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("namespace: {e}")),
    };
    let ttl = match req
        .ttl
        .as_deref()
        .map(trellis_core::duration::parse_duration)
    {
        None => std::time::Duration::from_secs(24 * 3600),
        Some(Ok(d)) => d,
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    let tokens = st.tokens.clone();
    let created =
        tokio::task::spawn_blocking(move || tokens.create(&service, &namespace, ttl, req.max_uses))
            .await;
    match created {
        Ok(Ok((token, record))) => {
            tracing::info!(id = %record.id, service = %record.service, namespace = %record.namespace, "join token created");
            axum::Json(json!({ "token": token, "record": redacted(&record) })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "token creation failed"),
    }
}

fn redacted(t: &crate::tokens::JoinToken) -> serde_json::Value {
    json!({
        "id": t.id, "service": t.service, "namespace": t.namespace,
        "created": t.created_unix, "expires": t.expires_unix, "revoked": t.revoked,
        "maxUses": t.max_uses, "uses": t.uses,
    })
}

async fn list_tokens(State(st): State<Shared>) -> Response {
    match st.tokens.list() {
        Ok(list) => axum::Json(json!({ "tokens": list.iter().map(redacted).collect::<Vec<_>>() }))
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn revoke_token(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    match st.tokens.revoke(&id) {
        Ok(true) => {
            tracing::info!(%id, "join token revoked");
            axum::Json(json!({ "revoked": id })).into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no join token {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn check(State(st): State<Shared>) -> Response {
    let checks = crate::check::run(&st.ca, &st.hub.proxy_reports());
    axum::Json(json!({ "checks": checks, "proxies": st.hub.proxy_reports() })).into_response()
}

async fn rotation_status(State(st): State<Shared>) -> Response {
    axum::Json(st.ca.rotation_status()).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    #[serde(default)]
    finish: bool,
    #[serde(default)]
    force: bool,
}

/// `{}` starts a root rotation, `{"finish": true}` retires the old root.
async fn rotate(State(st): State<Shared>, body: Bytes) -> Response {
    let req: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("rotation request: {e}")),
        }
    };
    let ops = st.ca_ops.clone();
    let outcome = if req.finish {
        ops.finish(req.force)
    } else {
        ops.start()
    };
    match outcome {
        Ok(status) => {
            tracing::info!(phase = %status.phase, roots = status.roots, "root rotation step done");
            axum::Json(status).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// The roots proxies must trust (public; a proxy needs it before it has anything else).
async fn trust_bundle(State(st): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        st.ca.bundle_pem().to_owned(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "errors": [{ "reason": message.into() }] })),
    )
        .into_response()
}

fn storage_error(e: StoreError) -> Response {
    match e {
        StoreError::Conflict(c) => {
            (StatusCode::CONFLICT, axum::Json(json!({ "errors": [c] }))).into_response()
        }
        StoreError::Storage(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-trellis-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .unwrap_or("anonymous")
        .to_owned()
}

/// A request the API refuses before touching the store.
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn kind(s: &str) -> Result<Kind, Refused> {
    Kind::parse_loose(s).ok_or_else(|| {
        Refused(
            StatusCode::NOT_FOUND,
            format!(
                "unknown kind {s:?}; known kinds: {}",
                Kind::ALL.map(|k| k.as_str()).join(", ")
            ),
        )
    })
}

async fn metrics(State(st): State<Shared>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &st.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed"),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

#[derive(Serialize)]
struct Warning {
    resource: String,
    path: String,
    message: String,
}

async fn apply(
    State(st): State<Shared>,
    Query(q): Query<ApplyQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not UTF-8 text");
    };
    let resources = match parse_documents(text) {
        Ok(r) => r,
        Err(errors) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "errors": errors })),
            )
                .into_response();
        }
    };
    // Unknown services are warnings: they may be applied or start later.
    let known = st.hub.snapshot();
    let declared: std::collections::HashSet<String> = st
        .store
        .list(Some(Kind::Service))
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.resource.metadata.name)
        .chain(
            resources
                .iter()
                .filter(|r| r.kind == Kind::Service)
                .map(|r| r.metadata.name.clone()),
        )
        .collect();
    let warnings: Vec<Warning> = resources
        .iter()
        .flat_map(|r| {
            referenced_services(r)
                .into_iter()
                .map(move |(path, name)| (r, path, name))
        })
        .filter(|(_, _, name)| {
            !declared.contains(name) && !known.keys().any(|k| k.as_str() == name)
        })
        .map(|(r, path, name)| Warning {
            resource: format!("{}/{}", r.kind, r.metadata.name),
            path,
            message: format!(
                "service {name:?} is not known (no Service resource, no running instance)"
            ),
        })
        .collect();
    let store = st.store.clone();
    let who = actor(&headers);
    let result =
        tokio::task::spawn_blocking(move || store.apply(&resources, &who, q.dry_run)).await;
    match result {
        Ok(Ok(outcome)) => axum::Json(json!({
            "version": outcome.version,
            "dryRun": outcome.dry_run,
            "results": outcome.results,
            "warnings": warnings,
        }))
        .into_response(),
        Ok(Err(e)) => storage_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list_all(State(st): State<Shared>) -> Response {
    match st.store.list(None) {
        Ok(items) => {
            axum::Json(json!({ "items": items, "version": st.store.version() })).into_response()
        }
        Err(e) => storage_error(e),
    }
}

async fn list_kind(State(st): State<Shared>, Path(k): Path<String>) -> Response {
    let kind = match kind(&k) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    match st.store.list(Some(kind)) {
        Ok(items) => {
            axum::Json(json!({ "items": items, "version": st.store.version() })).into_response()
        }
        Err(e) => storage_error(e),
    }
}

fn key(k: &str, namespace: String, name: String) -> Result<ResourceKey, Refused> {
    Ok(ResourceKey {
        kind: kind(k)?,
        namespace,
        name,
    })
}

async fn get_one(
    State(st): State<Shared>,
    Path((k, namespace, name)): Path<(String, String, String)>,
) -> Response {
    let key = match key(&k, namespace, name) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    match st.store.get(&key) {
        Ok(Some(item)) => axum::Json(item).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("{key} not found")),
        Err(e) => storage_error(e),
    }
}

async fn delete_one(
    State(st): State<Shared>,
    headers: HeaderMap,
    Path((k, namespace, name)): Path<(String, String, String)>,
) -> Response {
    let key = match key(&k, namespace, name) {
        Ok(k) => k,
        Err(r) => return r.into_response(),
    };
    let store = st.store.clone();
    let who = actor(&headers);
    let k2 = key.clone();
    match tokio::task::spawn_blocking(move || store.delete(&k2, &who)).await {
        Ok(Ok(Some(version))) => {
            axum::Json(json!({ "deleted": key.to_string(), "version": version })).into_response()
        }
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("{key} not found")),
        Ok(Err(e)) => storage_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct AuditQuery {
    /// How far back, e.g. `10m`, `2h`.
    since: Option<String>,
    /// Only records with this action (`denied`, `certificate-issued`, `configured`…).
    action: Option<String>,
    limit: Option<usize>,
}

async fn audit(State(st): State<Shared>, Query(q): Query<AuditQuery>) -> Response {
    let since = match q
        .since
        .as_deref()
        .map(trellis_core::duration::parse_duration)
    {
        None => None,
        Some(Ok(d)) => Some(trellis_core::time::rfc3339(
            std::time::SystemTime::now()
                .checked_sub(d)
                .unwrap_or(std::time::UNIX_EPOCH),
        )),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("since: {e}")),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    match st.store.audit(since.as_deref(), q.action.as_deref(), limit) {
        Ok(records) => axum::Json(json!({ "items": records })).into_response(),
        Err(e) => storage_error(e),
    }
}

/// The built-in dashboard: one self-contained page (no assets from the internet) that reads
/// this API.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct StatsQuery {
    service: Option<String>,
    /// Seconds, 10..=300 (default 60).
    window: Option<u32>,
    limit: Option<usize>,
}

/// The `service` parameter: `Ok(None)` when absent, an error message when invalid.
fn stats_service(q: &StatsQuery) -> Result<Option<ServiceName>, String> {
    q.service
        .as_deref()
        .map(|s| ServiceName::new(s).map_err(|e| format!("service: {e}")))
        .transpose()
}

/// `GET /api/v1/stats/services[?service=]`: golden signals per service, merged from its
/// proxies' windows.
async fn stats_services(State(st): State<Shared>, Query(q): Query<StatsQuery>) -> Response {
    let service = match stats_service(&q) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let gathered = st
        .observer
        .gather(service.as_ref(), q.window.unwrap_or(60), false)
        .await;
    let registry = st.hub.snapshot();
    axum::Json(crate::observe::services_view(
        &gathered,
        &registry,
        service.as_ref(),
    ))
    .into_response()
}

/// `GET /api/v1/stats/edges`: golden signals per caller → callee.
async fn stats_edges(State(st): State<Shared>, Query(q): Query<StatsQuery>) -> Response {
    let gathered = st
        .observer
        .gather(None, q.window.unwrap_or(60), false)
        .await;
    axum::Json(crate::observe::edges_view(
        &gathered,
        &st.hub.snapshot(),
        &st.trust_domain,
    ))
    .into_response()
}

/// `GET /api/v1/stats/routes?service=`: per route of a service.
async fn stats_routes(State(st): State<Shared>, Query(q): Query<StatsQuery>) -> Response {
    let service = match stats_service(&q).and_then(|s| s.ok_or("service is required".into())) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let gathered = st
        .observer
        .gather(Some(&service), q.window.unwrap_or(60), false)
        .await;
    axum::Json(crate::observe::routes_view(&gathered, &service)).into_response()
}

/// `GET /api/v1/stats/paths?service=`: the busiest paths of a service.
async fn stats_paths(State(st): State<Shared>, Query(q): Query<StatsQuery>) -> Response {
    let service = match stats_service(&q).and_then(|s| s.ok_or("service is required".into())) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let gathered = st
        .observer
        .gather(Some(&service), q.window.unwrap_or(60), true)
        .await;
    axum::Json(crate::observe::paths_view(
        &gathered,
        &service,
        q.limit.unwrap_or(20).min(1000),
    ))
    .into_response()
}

#[derive(Deserialize)]
struct TapQuery {
    service: String,
    path: Option<String>,
    method: Option<String>,
    /// Events per second per proxy (default 20, at most 100).
    rate: Option<u32>,
}

/// `GET /api/v1/tap?service=&path=&method=` (admin token): newline-delimited JSON, one line
/// per request as it finishes, until the client disconnects.
async fn tap(State(st): State<Shared>, Query(q): Query<TapQuery>) -> Response {
    let service = match ServiceName::new(q.service.as_str()) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("service: {e}")),
    };
    let stream = st.observer.tap(
        &service,
        q.path.unwrap_or_default(),
        q.method.unwrap_or_default(),
        q.rate.unwrap_or(20),
    );
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// `POST /v1/traces`: OTLP/HTTP (protobuf) export into the recent-traces view.
async fn ingest_traces(State(st): State<Shared>, body: Bytes) -> Response {
    use prost::Message;
    match trellis_api::otlp::ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            st.traces.ingest(request);
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                trellis_api::otlp::ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("not an OTLP ExportTraceServiceRequest: {e}"),
        ),
    }
}

#[derive(Deserialize)]
struct TracesQuery {
    limit: Option<usize>,
}

/// `GET /api/v1/traces`: the most recent traces exported to this control plane.
async fn list_traces(State(st): State<Shared>, Query(q): Query<TracesQuery>) -> Response {
    axum::Json(json!({ "items": st.traces.list(q.limit.unwrap_or(50).min(1000)) })).into_response()
}

/// `GET /api/v1/traces/{id}`: one trace's spans.
async fn get_trace(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    match st.traces.get(&id) {
        Some(spans) => axum::Json(json!({ "trace_id": id, "spans": spans })).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no trace {id} (only recent ones are kept)"),
        ),
    }
}

/// `GET /api/v1/prometheus/targets`: Prometheus HTTP service discovery (also usable as a
/// `file_sd` file): every registered proxy's admin address and the control plane itself.
async fn prometheus_targets(State(st): State<Shared>) -> Response {
    let mut groups = vec![json!({
        "targets": [st.http_addr.to_string()],
        "labels": { "job": "trellis-control" },
    })];
    for (service, instances) in st.hub.snapshot() {
        for inst in instances {
            let Some(admin) = inst.labels.get(ADMIN_LABEL) else {
                continue;
            };
            groups.push(json!({
                "targets": [admin],
                "labels": {
                    "job": "trellis-proxy",
                    "service": service,
                    "namespace": inst.namespace,
                    "instance_id": inst.instance_id,
                },
            }));
        }
    }
    axum::Json(Value::Array(groups)).into_response()
}

async fn services(State(st): State<Shared>) -> Response {
    let items: Vec<_> = st
        .hub
        .snapshot()
        .into_iter()
        .map(|(name, endpoints)| json!({ "name": name, "instances": endpoints }))
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

/// Registration label with a proxy's admin address (set by `trellis-proxy`).
const ADMIN_LABEL: &str = "trellis.dev/admin";

/// `GET /api/v1/explain?src=&dst=&method=&path=&header=`: what a call from SRC to DST does.
/// The route, backends, policy and endpoint health come from a proxy of SRC when one can be
/// asked (its `/explain`, the code that serves requests); otherwise from the control plane's
/// own view with the same core route selection. The authorization decision of each backend
/// is the core `authorize` over the policies that backend's proxies enforce.
async fn explain(
    State(st): State<Shared>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    use trellis_core::explain::ExplainQuery;
    use trellis_core::names::{Namespace, ServiceName};
    let q = match ExplainQuery::parse(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (Some(src), Ok(dst)) = (q.source.clone(), ServiceName::new(q.destination.as_str())) else {
        return error(StatusCode::BAD_REQUEST, "src and a valid dst are required");
    };
    let registry = st.hub.snapshot();
    let src_instances = ServiceName::new(src.as_str())
        .ok()
        .and_then(|s| registry.get(&s).cloned())
        .unwrap_or_default();
    let mut view = None;
    let mut asked = String::new();
    for inst in src_instances.iter().take(3) {
        let Some(admin) = inst
            .labels
            .get(ADMIN_LABEL)
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        else {
            continue;
        };
        if let Some(v) = ask_proxy(admin, &q.to_proxy_query()).await {
            view = Some(v);
            asked = format!("proxy {} of {src}", inst.instance_id);
            break;
        }
    }
    let mut view = match view {
        Some(v) => v,
        None => {
            asked = format!(
                "control plane (no proxy of {src} could be asked; endpoint health unknown)"
            );
            control_plane_view(&st, &q, &dst)
        }
    };
    let caller_ns = src_instances
        .first()
        .map(|i| i.namespace.clone())
        .unwrap_or_default();
    let caller = ServiceName::new(src.as_str())
        .ok()
        .map(|s| trellis_core::identity::SpiffeId::new(&st.trust_domain, caller_ns, s));
    let mut decisions = Vec::new();
    let backends: Vec<String> = view["backends"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["service"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for name in backends {
        let Ok(service) = ServiceName::new(name.as_str()) else {
            continue;
        };
        let namespace = registry
            .get(&service)
            .and_then(|eps| eps.first().map(|e| e.namespace.clone()))
            .unwrap_or_else(Namespace::default);
        let (policies, default, routes) = st.hub.authorization_view(&namespace, &service);
        let route = q.select(&routes).map(|r| r.name.clone());
        let decision = trellis_core::authz::authorize(
            &policies,
            default,
            &trellis_core::authz::AuthzRequest {
                caller: caller.as_ref(),
                method: Some(q.method.as_str()),
                path: Some(q.path_only()),
                port: 0,
                route: route.as_deref(),
            },
        );
        let port_rules = policies.iter().any(|p| {
            p.rules
                .iter()
                .any(|r| r.to.iter().any(|t| !t.ports.is_empty()))
        });
        decisions.push(json!({
            "service": name,
            "caller": caller.as_ref().map(|c| c.to_string()),
            "allowed": decision.allowed(),
            "reason": decision.reason,
            "audited": decision.audited,
            "note": port_rules.then_some("policies with port conditions depend on the app port; the destination proxy decides those"),
        }));
    }
    if let Some(obj) = view.as_object_mut() {
        obj.insert("source".into(), src.into());
        obj.insert("answeredBy".into(), asked.into());
        obj.insert("authorization".into(), decisions.into());
    }
    axum::Json(view).into_response()
}

/// The route, backends and registered endpoints from the control plane's own state.
fn control_plane_view(
    st: &ApiState,
    q: &trellis_core::explain::ExplainQuery,
    dst: &trellis_core::names::ServiceName,
) -> serde_json::Value {
    let Some((routes, policy, _)) = st.hub.destination_view(dst) else {
        return json!({"destination": dst.as_str(), "error": format!("no service is known for {:?}", dst.as_str())});
    };
    let rule = q.select(&routes).cloned();
    let backends: Vec<serde_json::Value> =
        trellis_core::explain::backend_shares(rule.as_ref(), dst)
        .into_iter()
        .map(|(name, weight, share)| {
            let found = st.hub.destination_view(&name);
            let (policy, endpoints) = match found {
                Some((_, p, eps)) => (json!(p), eps),
                None => (serde_json::Value::Null, Vec::new()),
            };
            json!({
                "service": name.as_str(),
                "weight": weight,
                "sharePercent": share,
                "policy": policy,
                "endpoints": endpoints.iter().map(|e| json!({"address": e.address, "zone": e.zone, "instance": e.instance_id, "state": "unknown"})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "destination": dst.as_str(),
        "request": {"method": q.method, "path": q.path, "headers": q.headers},
        "route": rule,
        "faults": policy.fault,
        "backends": backends,
    })
}

/// `GET /explain` on a proxy's admin port (HTTP/1.0, short timeout); `None` if unreachable.
async fn ask_proxy(admin: std::net::SocketAddr, query: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        let head = format!("GET /explain?{query} HTTP/1.0\r\nHost: {admin}\r\n\r\n");
        s.write_all(head.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.take(4 << 20).read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return None;
        }
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

async fn openapi() -> Response {
    axum::Json(openapi_document()).into_response()
}

/// The OpenAPI 3.1 description of this API.
pub fn openapi_document() -> serde_json::Value {
    let errors = json!({ "description": "rejected", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Errors" } } } });
    let kind_param = json!({ "name": "kind", "in": "path", "required": true, "schema": { "type": "string", "enum": Kind::ALL.map(|k| k.as_str()) } });
    let ns_param = json!({ "name": "namespace", "in": "path", "required": true, "schema": { "type": "string" } });
    let name_param =
        json!({ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Trellis control plane API", "version": "v1" },
        "paths": {
            "/api/v1/apply": { "post": {
                "summary": "Apply one or more resources (YAML or JSON, several documents), atomically",
                "parameters": [{ "name": "dryRun", "in": "query", "schema": { "type": "boolean" } }],
                "requestBody": { "required": true, "content": { "application/yaml": { "schema": { "type": "string" } }, "application/json": { "schema": {} } } },
                "responses": { "200": { "description": "applied", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ApplyResult" } } } }, "400": errors, "409": errors }
            }},
            "/api/v1/resources": { "get": { "summary": "All resources", "responses": { "200": { "description": "resources", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ResourceList" } } } } } } },
            "/api/v1/resources/{kind}": { "get": { "summary": "Resources of one kind", "parameters": [kind_param], "responses": { "200": { "description": "resources", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ResourceList" } } } }, "404": errors } } },
            "/api/v1/resources/{kind}/{namespace}/{name}": {
                "get": { "summary": "One resource", "parameters": [kind_param, ns_param, name_param], "responses": { "200": { "description": "the resource", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StoredResource" } } } }, "404": errors } },
                "delete": { "summary": "Delete one resource", "parameters": [kind_param, ns_param, name_param], "responses": { "200": { "description": "deleted", "content": { "application/json": { "schema": { "type": "object" } } } }, "404": errors } }
            },
            "/api/v1/audit": { "get": { "summary": "Audit log, newest first: configuration changes, certificates issued, denials reported by proxies", "parameters": [{ "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 0 } }, { "name": "since", "in": "query", "description": "how far back, e.g. 10m", "schema": { "type": "string" } }, { "name": "action", "in": "query", "description": "only this action (denied, certificate-issued, created, configured, deleted)", "schema": { "type": "string" } }], "responses": { "200": { "description": "records", "content": { "application/json": { "schema": { "type": "object", "properties": { "items": { "type": "array", "items": { "$ref": "#/components/schemas/AuditRecord" } } } } } } } } } },
            "/api/v1/services": { "get": { "summary": "Services and their live instances", "responses": { "200": { "description": "services", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/stats/services": { "get": { "summary": "Golden signals per service (inbound), merged from its proxies' windows", "parameters": [{ "name": "service", "in": "query", "schema": { "type": "string" } }, { "name": "window", "in": "query", "description": "seconds, 10..300", "schema": { "type": "integer" } }], "responses": { "200": { "description": "signals", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/stats/edges": { "get": { "summary": "Golden signals per caller -> callee (outbound)", "parameters": [{ "name": "window", "in": "query", "schema": { "type": "integer" } }], "responses": { "200": { "description": "signals", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/stats/routes": { "get": { "summary": "Golden signals per route of a service", "parameters": [{ "name": "service", "in": "query", "required": true, "schema": { "type": "string" } }, { "name": "window", "in": "query", "schema": { "type": "integer" } }], "responses": { "200": { "description": "signals", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/stats/paths": { "get": { "summary": "Busiest paths of a service", "parameters": [{ "name": "service", "in": "query", "required": true, "schema": { "type": "string" } }, { "name": "window", "in": "query", "schema": { "type": "integer" } }, { "name": "limit", "in": "query", "schema": { "type": "integer" } }], "responses": { "200": { "description": "signals", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/tap": { "get": { "summary": "Live request metadata of a service as newline-delimited JSON (admin token)", "parameters": [{ "name": "service", "in": "query", "required": true, "schema": { "type": "string" } }, { "name": "path", "in": "query", "schema": { "type": "string" } }, { "name": "method", "in": "query", "schema": { "type": "string" } }, { "name": "rate", "in": "query", "description": "events per second per proxy, at most 100", "schema": { "type": "integer" } }], "responses": { "200": { "description": "stream", "content": { "application/x-ndjson": {} } } } } },
            "/api/v1/traces": { "get": { "summary": "Recent traces exported to this control plane (POST /v1/traces, OTLP/HTTP protobuf)", "parameters": [{ "name": "limit", "in": "query", "schema": { "type": "integer" } }], "responses": { "200": { "description": "trace summaries", "content": { "application/json": { "schema": { "type": "object" } } } } } } },
            "/api/v1/traces/{id}": { "get": { "summary": "One recent trace's spans", "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }], "responses": { "200": { "description": "spans", "content": { "application/json": { "schema": { "type": "object" } } } }, "404": { "description": "not kept" } } } },
            "/api/v1/prometheus/targets": { "get": { "summary": "Prometheus HTTP service discovery: proxies' admin addresses and the control plane", "responses": { "200": { "description": "target groups", "content": { "application/json": { "schema": { "type": "array" } } } } } } }
        },
        "components": { "schemas": {
            "Errors": { "type": "object", "properties": { "errors": { "type": "array", "items": { "type": "object", "properties": {
                "document": { "type": "integer" }, "resource": { "type": ["string", "null"] }, "path": { "type": "string" }, "reason": { "type": "string" } } } } } },
            "ApplyResult": { "type": "object", "properties": { "version": { "type": "integer" }, "dryRun": { "type": "boolean" },
                "results": { "type": "array", "items": { "type": "object", "properties": { "resource": { "type": "string" }, "action": { "type": "string", "enum": ["created", "configured", "unchanged"] } } } },
                "warnings": { "type": "array", "items": { "type": "object" } } } },
            "StoredResource": { "type": "object", "properties": { "resource": { "type": "object" }, "version": { "type": "integer" }, "updated": { "type": "string" } } },
            "ResourceList": { "type": "object", "properties": { "items": { "type": "array", "items": { "$ref": "#/components/schemas/StoredResource" } }, "version": { "type": "integer" } } },
            "AuditRecord": { "type": "object", "properties": { "version": { "type": "integer" }, "time": { "type": "string" }, "actor": { "type": "string" }, "action": { "type": "string" }, "resource": { "type": "string" }, "old": {}, "new": {} } }
        } }
    })
}
